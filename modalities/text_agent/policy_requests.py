"""Reading a `/v1/completions` body for `policy_server.PolicyServer`: the JSON under its byte caps, then each field
type- and range-checked into a `GenerationRequest` (prompts as ids or strings, sampling settings, suppressed ids,
`renorm_multimodal` inputs). Every refusal is a `BadRequest` naming the field and the limit.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from modalities.text_agent.tools.retriever_server import BadRequest
from toolkit.distributed import unwrap
from toolkit.engines import GenerationRequest, SamplingParams
from toolkit.engines.hf import model_eos_ids
from toolkit.engines.multimodal import WIRE_FIELD, MultimodalInputs, MultimodalTooLarge, decode_multimodal
from toolkit.engines.server import SUPPRESS_FIELD, VLLM_MIN_LOGIT_BIAS
from toolkit.engines.weights import VERSION_FIELD

if TYPE_CHECKING:
    from modalities.text_agent.policy_server import PolicyServer


def parse_body(body: bytes, max_request_bytes: int) -> Any:
    """The JSON of a completions body whose part outside `renorm_multimodal.tensors` (one long base64 string) is
    within `max_request_bytes`. A longer body must owe its length to that string: checked before parsing by its
    count of JSON separators, so that a huge body of small items is never parsed into a huge Python object.

    Raises:
        BadRequest: 413 over the cap, 400 not JSON.
    """
    over = BadRequest(f"body of {len(body)} bytes is over max_request_bytes={max_request_bytes}", 413)
    large = len(body) > max_request_bytes
    if large and sum(body.count(c) for c in (b"[", b"{", b",", b":")) > max_request_bytes // 2:
        raise over
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise over if large else BadRequest(f"body is not valid JSON: {error}") from error
    multimodal = payload.get(WIRE_FIELD) if isinstance(payload, dict) else None
    tensors = multimodal.get("tensors") if isinstance(multimodal, dict) else None
    if len(body) - (len(tensors) if isinstance(tensors, str) else 0) > max_request_bytes:
        raise over
    return payload


def _field(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(f"{name!r} must be {kind}, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"{name!r} must be {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def _prompts(payload: dict[str, Any], server: PolicyServer) -> list[list[int]]:
    """The prompts as token-id lists (strings tokenized with the policy's tokenizer), range- and size-checked."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' must be token ids, a list of token-id lists, a string or a list of strings")
    prompts: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            item = list(server.policy.tokenizer(item, add_special_tokens=True)["input_ids"])
        if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise BadRequest("each prompt must be a list of token ids or a string")
        if not item or len(item) > server.caps.max_prompt_tokens:
            raise BadRequest(
                f"a prompt has {len(item)} tokens; allowed 1..max_prompt_tokens={server.caps.max_prompt_tokens}"
            )
        if min(item) < 0 or max(item) >= server.vocab_size:
            raise BadRequest(f"token ids must be in [0, {server.vocab_size}), got {min(item)}..{max(item)}")
        prompts.append(item)
    return prompts


def parse_completion_request(payload: Any, server: PolicyServer) -> tuple[GenerationRequest, str | None, bool]:
    """(request, the weights version the client expects or None, skip_special_tokens) of a completions body.

    Raises:
        BadRequest: a field of the wrong type or range, streaming/echo/top alternatives, or over a cap (413 rows).
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    for flag in ("stream", "echo", "use_beam_search"):
        if payload.get(flag):
            raise BadRequest(f"'{flag}' is not supported by renorm serve-policy")
    prompts = _prompts(payload, server)
    n = _field(payload, "n", int, 1)
    if n < 1 or len(prompts) * n > server.caps.max_rows:
        raise BadRequest(f"{len(prompts)} prompts × n={n} rows; allowed 1..max_rows={server.caps.max_rows}", 413)
    max_tokens = _field(payload, "max_tokens", int, 16)
    if not 1 <= max_tokens <= server.caps.max_new_tokens:
        raise BadRequest(f"'max_tokens' {max_tokens} is outside 1..max_new_tokens={server.caps.max_new_tokens}")
    logprobs = _field(payload, "logprobs", int, None)
    if logprobs is not None and logprobs != 0:
        raise BadRequest("'logprobs' must be 0 (the sampled token's log-prob); top alternatives are not served")
    temperature = float(_field(payload, "temperature", (int, float), 1.0))
    stop = _field(payload, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    stop_ids = _field(payload, "stop_token_ids", list, [])
    if not all(isinstance(s, str) and s for s in stop) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("'stop' must be non-empty strings and 'stop_token_ids' integers")
    ignore_eos = _field(payload, "ignore_eos", bool, False)
    model_eos = [] if ignore_eos else model_eos_ids(server.policy.tokenizer, unwrap(server.policy.module))
    eos = list(dict.fromkeys([*stop_ids, *model_eos]))
    top_k = _field(payload, "top_k", int, 0)
    seed = _field(payload, "seed", int, None)
    multimodal = _multimodal(payload, server, prompts)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=float(_field(payload, "top_p", (int, float), 1.0)),
            top_k=max(top_k, 0),
            do_sample=temperature > 0,
            eos_token_ids=tuple(eos),
            stop_strings=tuple(stop),
            suppress_token_ids=_suppressed(payload, server),
        )
        request = GenerationRequest(
            prompts,
            params,
            n,
            int.from_bytes(os.urandom(7), "little") if seed is None else seed,
            logprobs is not None,
            None if multimodal is None else multimodal.model_inputs(n),
            multimodal,
        )
    except ValueError as error:
        raise BadRequest(str(error)) from error
    expected = _field(payload, VERSION_FIELD, str, None)
    return request, expected, bool(_field(payload, "skip_special_tokens", bool, True))


def _suppressed(payload: dict[str, Any], server: PolicyServer) -> tuple[int, ...]:
    """The never-sampled ids: `renorm_suppress_token_ids` and every `logit_bias` entry at vLLM's floor (-100)."""
    ids = list(_field(payload, SUPPRESS_FIELD, list, []))
    bias = _field(payload, "logit_bias", dict, {})
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadRequest(f"{SUPPRESS_FIELD!r} must be a list of token ids")
    for key, value in bias.items():
        if not key.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"'logit_bias' must map token ids to numbers, got {key!r:.20}: {value!r:.20}")
        if value > VLLM_MIN_LOGIT_BIAS:
            raise BadRequest(f"'logit_bias' is served only as suppression (values <= -100), got {key}: {value}")
        ids.append(int(key))
    if ids and (min(ids) < 0 or max(ids) >= server.vocab_size):
        raise BadRequest(f"suppressed token ids must be in [0, {server.vocab_size}), got {min(ids)}..{max(ids)}")
    return tuple(sorted(set(ids)))


def _multimodal(payload: dict[str, Any], server: PolicyServer, prompts: list[list[int]]) -> MultimodalInputs | None:
    """The request's `renorm_multimodal` inputs (None: text only), decoded and checked against the prompts and the
    model's forward."""
    if payload.get(WIRE_FIELD) is None:
        return None
    try:
        inputs = decode_multimodal(payload[WIRE_FIELD], server.caps.max_multimodal_bytes)
    except MultimodalTooLarge as error:
        raise BadRequest(str(error), 413) from error
    except ValueError as error:
        raise BadRequest(str(error)) from error
    try:
        inputs.check_prompts([len(ids) for ids in prompts])
        inputs.check_placeholders(prompts, server.placeholders, server.merge_size)
    except ValueError as error:
        raise BadRequest(f"{WIRE_FIELD}.{error}") from error  # both checks name "prompts[i]..."
    unknown = sorted(set(inputs.batching) - server.model_inputs)
    if unknown:
        raise BadRequest(
            f"{WIRE_FIELD}.batching names {unknown}, which this model's forward does not take; it takes "
            f"{sorted(server.model_inputs)[:20]}"
        )
    return inputs
