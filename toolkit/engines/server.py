"""The `server` rollout engine: an OpenAI-compatible `/v1/completions` endpoint that takes prompts as token ids and
returns token ids and log-probs (`renorm serve-policy`, `vllm serve`), plus a versioned weight channel. SGLang's
completions endpoint is not verified yet.

Weight sync ("push"): before generating, the policy's weights are sent to `POST /v1/weights` when they changed
since the last push (after every optimizer step), as safetensors in the transfer dtype: the full state dict, or
the LoRA adapters alone (the server keeps them unmerged). Each push gets a new version, and every completion
request names the version it expects: a server serving another one (a restart, a lost push) answers 409 and the
same version is sent again. With several trainer ranks (DDP, FSDP2) each rank generates its own share of rollouts
but one push per version reaches the server: the weights are gathered once (sharded ones collectively), rank 0
sends them and broadcasts the version or the failure (`toolkit.engines.weight_sync` states the rules). A stock
`vllm serve` has no `/v1/weights`: weight_sync "vllm_lora" loads the LoRA adapters through its runtime LoRA
endpoints (`toolkit.engines.vllm_lora`, which also says why full weights cannot go there), and "none" serves its
fixed weights. Connection failures, timeouts and 5xx are retried `max_retries` times with exponential backoff,
then `EngineUnavailableError` names the server: a rollout is never silently empty. Simplified: the whole payload
is one request.

Multimodal requests (video) carry `GenerationRequest.multimodal` in the `renorm_multimodal` field: each distinct
tensor once, as base64 safetensors, with how each key batches (`toolkit.engines.multimodal`); the server rebuilds
the model inputs for its own batching and acknowledges the field. Only `renorm serve-policy` serves it (vLLM's
completions endpoint takes no multimodal token prompts): an answer without the acknowledgement is an error, never
a text-only rollout. A request whose tensors exceed `multimodal_chunk_bytes` goes as several consecutive requests
(chunk k seeded with seed + k: sampled tokens then differ from one `hf` call's; greedy ones do not). Suppressed
tokens travel as `renorm_suppress_token_ids` (serve-policy sets their logits to -inf, as the `hf` engine) and as
a `logit_bias` of -100 (the floor `vllm serve` accepts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Literal, get_args

from toolkit.engines.base import FinishReason, GenerationRequest, GenerationResult, require_portable
from toolkit.engines.multimodal import WIRE_FIELD, encode_multimodal, prompt_chunks
from toolkit.engines.vllm_lora import VLLMLoRA
from toolkit.engines.weight_sync import RenormPush, WeightChannel
from toolkit.engines.weights import VERSION_FIELD, TransferDtype
from toolkit.interfaces import Policy

log = logging.getLogger(__name__)
WeightSync = Literal["push", "vllm_lora", "none"]
SUPPRESS_FIELD = "renorm_suppress_token_ids"
VLLM_MIN_LOGIT_BIAS = -100.0  # vLLM's OpenAI server clamps logit_bias to [-100, 100]
TOKEN_PREFIX = "token_id:"
_RETRYABLE_STATUS = (429, 500, 502, 503, 504)


class EngineUnavailableError(RuntimeError):
    """The engine's server could not be reached (or kept failing) after every retry."""


class _Retryable(Exception):
    """A failure worth another attempt: the connection, a timeout, a 5xx, or stale weights."""


class ServerEngine:
    """Generates through an OpenAI-compatible completions server.

    Args:
        url: the server's API root (`.../v1`).
        model: the served model name sent as "model"; None = the first id of `GET /v1/models`.
        weight_sync: "push" the policy's weights to `POST /v1/weights` whenever they changed (`renorm
            serve-policy`); "vllm_lora" load its LoRA adapters into a `vllm serve` as a new adapter per version
            (needs `adapter_dir`); "none" for a server whose weights are kept current some other way (or frozen).
        transfer_dtype: dtype of the pushed floating weights; "policy" keeps the policy's.
        timeout_s: per HTTP request.
        max_retries: further attempts after a failed one (connection, timeout, 5xx, stale weights).
        retry_backoff_s: wait before the first retry; doubled for each next one.
        api_key_env: environment variable holding a bearer token the server requires (None: none sent).
        multimodal_chunk_bytes: most tensor bytes of a multimodal request sent at once (more: consecutive
            requests of whole prompts); keep it under the server's `max_multimodal_bytes`.
        adapter_dir: "vllm_lora" only: where rank 0 writes each version's PEFT adapter folder, a directory the
            server reads at the same path (the same machine or a shared filesystem).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8001/v1",
        model: str | None = None,
        weight_sync: WeightSync = "push",
        transfer_dtype: TransferDtype = "policy",
        timeout_s: float = 600.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        api_key_env: str | None = None,
        multimodal_chunk_bytes: int = 256 * 1024**2,
        adapter_dir: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if weight_sync not in get_args(WeightSync):
            raise ValueError(f"weight_sync={weight_sync!r} is not one of {list(get_args(WeightSync))}")
        if transfer_dtype not in get_args(TransferDtype):
            raise ValueError(f"transfer_dtype={transfer_dtype!r} is not one of {list(get_args(TransferDtype))}")
        if timeout_s <= 0 or retry_backoff_s < 0 or max_retries < 0:
            raise ValueError(
                f"need timeout_s > 0, retry_backoff_s >= 0 and max_retries >= 0; got {timeout_s}, "
                f"{retry_backoff_s}, {max_retries}"
            )
        if multimodal_chunk_bytes < 1:
            raise ValueError(f"multimodal_chunk_bytes must be >= 1, got {multimodal_chunk_bytes}")
        self.url = url.rstrip("/")
        self.model = model
        self.weight_sync: WeightSync = weight_sync
        if weight_sync == "none":
            log.warning(
                "server engine at %s with weight_sync='none': it samples from whatever weights it serves, not the "
                "policy being trained (watch rollout/engine_logprob_abs_diff_mean)",
                url,
            )
        self.transfer_dtype: TransferDtype = transfer_dtype
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.multimodal_chunk_bytes = multimodal_chunk_bytes
        self._headers = {"Content-Type": "application/json"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"api_key_env={api_key_env!r} names an environment variable that is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._sync = self._weight_channel(adapter_dir)

    def _weight_channel(self, adapter_dir: str | None) -> WeightChannel | None:
        """What keeps the server's weights current (None for weight_sync "none")."""
        if (adapter_dir is None) == (self.weight_sync == "vllm_lora"):
            raise ValueError(f"adapter_dir={adapter_dir!r}: it is needed by weight_sync='vllm_lora' and only there")
        session = uuid.uuid4().hex[:12]
        if self.weight_sync == "push":
            return WeightChannel(RenormPush(self._post, self._headers), self.transfer_dtype, session, _Retryable)
        if self.weight_sync == "vllm_lora":
            assert adapter_dir is not None  # checked above
            lora = VLLMLoRA(self.url, self._headers, adapter_dir, self.timeout_s, _Retryable)
            return WeightChannel(lora, self.transfer_dtype, f"renorm-{session}", _Retryable)
        return None

    @property
    def served_version(self) -> str | None:
        """The weights version every completion request of this engine assumes (None before the first push)."""
        return self._sync.version if self._sync is not None else None

    @property
    def num_pushes(self) -> int:
        """Weight payloads this rank sent: new versions (rank 0) and repairs after a server lost one (any rank)."""
        return self._sync.num_pushes if self._sync is not None else 0

    def generate(self, policy: Policy, request: GenerationRequest) -> GenerationResult:
        """The server's completions of `request`, after bringing its weights up to date (weight_sync "push").

        Raises:
            EngineUnavailableError: every attempt failed (the last error is named).
            ValueError: the server refused the request (4xx), answered outside the protocol, or ignored its
                multimodal inputs.
            NotImplementedError: a multimodal request without its serialisable `multimodal` form.
        """
        require_portable(request, "server")
        if request.multimodal is None:
            return self._complete(policy, request)
        chunks = prompt_chunks(request.multimodal, self.multimodal_chunk_bytes)
        if len(chunks) == 1:
            return self._complete(policy, request)
        return merge_results([self._complete(policy, part) for part in split_request(request, chunks)])

    def _complete(self, policy: Policy, request: GenerationRequest) -> GenerationResult:
        """One completions call (after a weight push when due), retried on connection failures, 5xx and 409."""
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                start = time.perf_counter()
                synced = self.sync_weights(policy)
                sync_s = time.perf_counter() - start
                payload = self._post_json("/completions", completion_body(request, self._model_name(), self._expects()))
            except _Retryable as error:
                last = error
                continue
            result = parse_completions(payload, request)
            result.metrics.update(
                {"time/weight_sync_s": sync_s, "engine/weight_pushed": float(synced), "engine/retries": float(attempt)}
            )
            return result
        raise EngineUnavailableError(
            f"the rollout server at {self.url} failed {self.max_retries + 1} attempts "
            f"(max_retries={self.max_retries}); last error: {last}. "
            "Is `renorm serve-policy` (or vllm serve) still running there?"
        )

    def sync_weights(self, policy: Policy) -> bool:
        """Push the policy's weights when they changed since the last push (True), or send a version the server
        lost again. With several ranks every rank calls it at its first generate after a weights change (a
        collective: `toolkit.engines.weight_sync`)."""
        return self._sync.sync(policy) if self._sync is not None else False

    def _expects(self) -> str | None:
        return self._sync.transport.expects(self._sync.version) if self._sync is not None else None

    def _model_name(self) -> str:
        adapter = self._sync.transport.model_name(self._sync.version) if self._sync is not None else None
        if adapter is not None:
            return adapter
        if self.model is None:
            models = self._request("GET", "/models", None, self._headers).get("data")
            if not isinstance(models, list) or not models or not isinstance(models[0], dict) or "id" not in models[0]:
                raise ValueError(f"GET {self.url}/models listed no model: {models!r:.200}")
            self.model = str(models[0]["id"])
        return self.model

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post(path, json.dumps(body).encode("utf-8"), self._headers)

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        return self._request("POST", path, body, headers)

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> dict[str, Any]:
        """The JSON answer of one HTTP request; `_Retryable` for failures worth retrying, ValueError for the rest."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (http(s) only)
                raw = response.read()
        except urllib.error.HTTPError as error:
            message = _error_message(error)
            lost_adapter = error.code == 404 and path == "/completions" and self.weight_sync == "vllm_lora"
            if (error.code == 409 or lost_adapter) and self._sync is not None:
                self._sync.mark_lost()  # the server serves other weights (a restart): send ours again, then retry
                raise _Retryable(f"{error.code} stale weights: {message}") from error
            if error.code in _RETRYABLE_STATUS:
                raise _Retryable(f"{method} {path}: HTTP {error.code}: {message}") from error
            raise ValueError(
                f"the rollout server at {self.url} refused {method} {path}: {error.code} {message}"
            ) from error
        except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
            raise _Retryable(f"{method} {path}: {error}") from error
        try:
            payload = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"{method} {self.url}{path} did not answer JSON: {raw[:200]!r}") from error
        if not isinstance(payload, dict):
            raise ValueError(f"{method} {self.url}{path} answered {type(payload).__name__}, not a JSON object")
        return payload


def completion_body(request: GenerationRequest, model: str, version: str | None) -> dict[str, Any]:
    """The `/v1/completions` body of `request`: token-id prompts, n samples each, token ids and log-probs back.

    `return_token_ids` / `return_tokens_as_token_ids`, `top_k`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`
    and `include_stop_str_in_output` are vLLM's extensions of the OpenAI protocol (serve-policy reads them too).
    """
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "prompt": [[int(t) for t in ids] for ids in request.prompt_ids],
        "n": request.num_samples,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature if params.do_sample else 0.0,
        "top_p": params.top_p if params.do_sample else 1.0,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "seed": request.seed,
        "stop_token_ids": list(params.eos_token_ids),
        "ignore_eos": True,  # stop at exactly `stop_token_ids` (the sampler's EOS list), not the model's own EOS too
        "stop": list(params.stop_strings),
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": False,
    }
    if request.return_logprobs:
        body["logprobs"] = 0  # the sampled token's log-prob only
    if version is not None:
        body[VERSION_FIELD] = version
    if params.suppress_token_ids:
        body[SUPPRESS_FIELD] = [int(t) for t in params.suppress_token_ids]
        body["logit_bias"] = {str(int(t)): VLLM_MIN_LOGIT_BIAS for t in params.suppress_token_ids}
    if request.multimodal is not None:
        body[WIRE_FIELD] = encode_multimodal(request.multimodal)
    return body


def split_request(request: GenerationRequest, chunks: list[range]) -> list[GenerationRequest]:
    """`request` as one request per consecutive prompt range, chunk k seeded with `request.seed + k`."""
    assert request.multimodal is not None  # only multimodal requests are split
    parts = []
    for index, prompts in enumerate(chunks):
        multimodal = request.multimodal.select(prompts)
        parts.append(
            dataclasses.replace(
                request,
                prompt_ids=request.prompt_ids[prompts.start : prompts.stop],
                seed=request.seed + index,
                model_inputs=multimodal.model_inputs(request.num_samples),
                multimodal=multimodal,
            )
        )
    return parts


def merge_results(results: list[GenerationResult]) -> GenerationResult:
    """One result of consecutive chunks' results: rows concatenated, metrics summed, the last chunk's version (a
    re-push between chunks renames the same weights)."""
    logprobs = None if results[0].logprobs is None else [row for r in results for row in r.logprobs or []]
    metrics: dict[str, float] = {}
    for result in results:
        for name, value in result.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value
    return GenerationResult(
        [ids for r in results for ids in r.token_ids],
        [reason for r in results for reason in r.finish_reasons],
        logprobs,
        results[-1].weights_version,
        metrics,
    )


def parse_completions(payload: dict[str, Any], request: GenerationRequest) -> GenerationResult:
    """The `GenerationResult` of a `/v1/completions` answer (choices ordered by their index).

    Raises:
        ValueError: a missing or malformed field, a row count or finish reason outside the request, or empty rows.
    """
    choices = payload.get("choices")
    if not isinstance(choices, list) or len(choices) != request.num_rows:
        count = len(choices) if isinstance(choices, list) else choices
        raise ValueError(f"the server answered {count!r} choices for {request.num_rows} requested rows")
    tokens: list[list[int]] = []
    reasons: list[FinishReason] = []
    logprobs: list[list[float]] = []
    for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        ids, values, reason = _parse_choice(choice, request.return_logprobs)
        tokens.append(ids)
        reasons.append(reason)
        logprobs.append(values)
    if request.multimodal is not None and not isinstance(payload.get(WIRE_FIELD), dict):
        raise ValueError(
            f"the server did not acknowledge {WIRE_FIELD}: it generated without the video/image inputs. "
            "Multimodal requests need `renorm serve-policy` (vLLM's completions endpoint takes no multimodal prompts)"
        )
    version = payload.get(VERSION_FIELD)
    result = GenerationResult(
        tokens, reasons, logprobs if request.return_logprobs else None, str(version) if version else None
    )
    result.check_rows(request)
    return result


def _parse_choice(choice: Any, with_logprobs: bool) -> tuple[list[int], list[float], FinishReason]:
    if not isinstance(choice, dict):
        raise ValueError(f"a completion choice must be an object, got {choice!r:.100}")
    reason = choice.get("finish_reason")
    if reason not in get_args(FinishReason):
        raise ValueError(f"choice {choice.get('index')} finished with {reason!r}, not one of {get_args(FinishReason)}")
    block = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None and block.get("tokens") is not None:
        ids = [_token_id(token) for token in block["tokens"]]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(
            f"choice {choice.get('index')} has no token ids: the server must support return_token_ids or "
            "return_tokens_as_token_ids (vLLM and renorm serve-policy do)"
        )
    values: list[float] = []
    if with_logprobs:
        given = block.get("token_logprobs")
        if not isinstance(given, list) or len(given) != len(ids) or any(v is None for v in given):
            raise ValueError(f"choice {choice.get('index')} has no log-prob for every token: {given!r:.100}")
        values = [float(v) for v in given]
    finish: FinishReason = "stop" if reason == "stop" else "length"  # one of the two, checked above
    return ids, values, finish


def _token_id(token: Any) -> int:
    if isinstance(token, str) and token.startswith(TOKEN_PREFIX) and token[len(TOKEN_PREFIX) :].isdigit():
        return int(token[len(TOKEN_PREFIX) :])
    raise ValueError(f"token {token!r:.40} is not 'token_id:N' (send return_tokens_as_token_ids)")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
    except (ValueError, OSError):
        return str(error.reason)
    if isinstance(body, dict):
        detail = body.get("error", body)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    return str(body)
