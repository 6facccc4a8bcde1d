"""The policy server of `renorm serve-policy` (`serve_policy.py`): a policy behind an OpenAI-compatible completions
server, generating with the `hf` engine, with the weight channel the `server` engine pushes to.

POST /v1/completions  prompts as token ids (or strings, tokenized here), n, max_tokens, temperature, top_p, top_k,
                      seed, stop_token_ids, stop, ignore_eos (as vLLM: the model's EOS ends a completion unless set;
                      stop_token_ids always do), logprobs (0 only: the sampled token's), and vLLM's extras
                      (token ids come back in `token_ids` and, with logprobs, as "token_id:N" tokens);
                      `renorm_weights_version` names the weights the client expects (another one: 409);
                      `renorm_suppress_token_ids` (and `logit_bias` entries <= -100) are never sampled (-inf logits,
                      as the hf engine); `renorm_multimodal` carries per-prompt model inputs (video patches, grids,
                      token types: base64 safetensors, `toolkit.engines.multimodal`), checked against the model's
                      forward before generating (400 naming the field) and acknowledged in the answer
POST /v1/weights      safetensors bytes (`toolkit.engines.weights`): the full state dict or the LoRA adapters
GET  /v1/models, /health

The HTTP hardening is serve-retriever's (`tools/retriever_server`: socket timeouts, Content-Length checks, JSON
errors naming the limit, one access-log line per request), plus caps on rows, prompt and completion tokens,
request, multimodal and weight bytes; loopback by default, and an optional bearer token (`--api-key-env`).
Requests are served one at a time: one model, one lock. `policy_requests.py` reads and checks the completions body.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from modalities.text_agent.policy_requests import parse_body, parse_completion_request
from modalities.text_agent.tools.retriever_server import (
    REQUEST_QUEUE_SIZE,
    BadRequest,
    FairLock,
    RetrieveHandler,
    ServerLimits,
    exceeds_depth,
)
from toolkit.distributed import unwrap
from toolkit.engines import GenerationResult, HFEngine
from toolkit.engines.multimodal import WIRE_FIELD, encoded_size
from toolkit.engines.server import TOKEN_PREFIX
from toolkit.engines.weights import VERSION_FIELD, decode_weights
from toolkit.hf.policy import unwrap_model

log = logging.getLogger(__name__)
INITIAL_VERSION = "initial"  # the config's own weights, before any push
# forward() arguments a multimodal payload may not set: the engine's own (ids, mask, cache) or not tensors.
RESERVED_INPUTS = frozenset(
    {"self", "input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds", "labels"}
    | {"use_cache", "logits_to_keep", "cache_position", "return_dict", "output_attentions", "output_hidden_states"}
    | {"mm_encoder_outputs", "kwargs"}
)


@dataclass(frozen=True)
class PolicyServerLimits:
    """What one request may ask; each limit, when hit, is named in the 4xx answer."""

    max_rows: int = 1024  # prompts × n per request
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_request_bytes: int = 8 * 1024 * 1024  # a completions body, outside renorm_multimodal's tensors
    max_weights_bytes: int = 16 * 1024**3  # a weights body
    timeout_s: float = 60.0  # per socket read/write
    max_multimodal_bytes: int = 1024**3  # renorm_multimodal's tensors (decoded) in one completions body

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


class PolicyServer(ThreadingHTTPServer):
    """Serves `policy` with an `HFEngine`; `limits` (serve-retriever's, for the shared handler) and `caps` are read
    by the handler. `weights_version` is the version of the weights being served."""

    daemon_threads = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(
        self,
        policy: Any,
        address: tuple[str, int],
        model_name: str = "policy",
        caps: PolicyServerLimits | None = None,
        generation_batch_size: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.caps = caps if caps is not None else PolicyServerLimits()
        self.limits = ServerLimits(max_body_bytes=self.caps.max_weights_bytes, timeout_s=self.caps.timeout_s)
        super().__init__(address, PolicyHandler)
        self.policy = policy
        self.engine = HFEngine(generation_batch_size)
        self.model_name = model_name
        self.api_key = api_key
        self.lock = FairLock()
        self.weights_version = INITIAL_VERSION
        model = unwrap_model(unwrap(policy.module))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
        self.model_inputs = frozenset(inspect.signature(model.forward).parameters) - RESERVED_INPUTS
        config = getattr(model, "config", None)
        # Qwen-VL placeholders: a grid's t·h·w patches make t·h·w / merge² tokens of its id in the prompt.
        self.merge_size = int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1)
        grids = {"video_grid_thw": "video_token_id", "image_grid_thw": "image_token_id"}
        self.placeholders = {k: int(getattr(config, v)) for k, v in grids.items() if hasattr(config, v)}
        policy.module.eval()  # no dropout while serving

    @property
    def url(self) -> str:
        """The API root (`.../v1`), with the port actually bound (port 0 picks a free one)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def complete(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, answer) of a completions body: 409 for a stale version, else the completions."""
        request, expected, skip_special = parse_completion_request(payload, self)
        with self.lock:
            if expected is not None and expected != self.weights_version:
                message = f"stale weights: serving {self.weights_version!r}, the client expects {expected!r}"
                return 409, {"error": message, VERSION_FIELD: self.weights_version}
            try:
                result = self.engine.generate(self.policy, request)
            except ValueError as error:  # the model refused the inputs (e.g. video tokens vs. patches)
                if request.multimodal is None:
                    raise
                raise BadRequest(f"{WIRE_FIELD} does not fit the model: {error}"[:2000]) from error
            version = self.weights_version
        result.weights_version = version
        answer = completion_response(result, self.model_name, self.policy.tokenizer, skip_special)
        if request.multimodal is not None:
            answer[WIRE_FIELD] = {"prompts": len(request.multimodal.prompts), "bytes": request.multimodal.num_bytes}
        return 200, answer

    def load_weights(self, body: bytes) -> dict[str, Any]:
        """Load a weights payload (full or LoRA) and serve it from the next request on."""
        try:
            weights, version, kind = decode_weights(body)
        except ValueError as error:
            raise BadRequest(str(error)) from error
        served = "lora" if getattr(self.policy, "is_lora", False) else "full"
        if kind != served:
            raise BadRequest(f"pushed {kind} weights but this server's policy trains {served} weights (its config)")
        with self.lock:
            try:
                if callable(getattr(self.policy, "load_trainable_state_dict", None)):
                    self.policy.load_trainable_state_dict(weights)
                else:
                    unwrap(self.policy.module).load_state_dict(weights)
            except (RuntimeError, ValueError) as error:  # missing/unexpected keys, shape mismatches
                raise BadRequest(f"the pushed weights do not fit this server's policy: {error}"[:2000]) from error
            self.weights_version = version
        return {VERSION_FIELD: version, "num_tensors": len(weights)}


def completion_response(result: GenerationResult, model: str, tokenizer: Any, skip_special: bool) -> dict[str, Any]:
    """An OpenAI `text_completion` object with vLLM's `token_ids` and "token_id:N" log-prob tokens."""
    choices = []
    for index, (ids, reason) in enumerate(zip(result.token_ids, result.finish_reasons, strict=True)):
        logprobs = None
        if result.logprobs is not None:
            logprobs = {
                "tokens": [f"{TOKEN_PREFIX}{t}" for t in ids],
                "token_logprobs": result.logprobs[index],
                "top_logprobs": None,
                "text_offset": None,
            }
        text = tokenizer.decode(ids, skip_special_tokens=skip_special)
        choices.append({"index": index, "text": text, "token_ids": ids, "logprobs": logprobs, "finish_reason": reason})
    completion_tokens = sum(len(ids) for ids in result.token_ids)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"completion_tokens": completion_tokens},
        VERSION_FIELD: result.weights_version,
    }


class PolicyHandler(RetrieveHandler):
    """Serves the completions, weights, models and health endpoints of a `PolicyServer`."""

    server: PolicyServer  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self._rows: int | None = None
        self._tokens: int | None = None
        super().handle_one_request()

    def do_GET(self) -> None:
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is never read here: it must not be parsed as the next request
        path = self.path.rstrip("/")
        if path == "/health":
            answer = {"status": "ok", "model": self.server.model_name, VERSION_FIELD: self.server.weights_version}
            self._send(200, answer)
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._send(404, {"error": f"unknown path {self.path}; GET /health or /v1/models"})

    def do_POST(self) -> None:
        path = self.path.rstrip("/")
        if path not in ("/v1/completions", "/v1/weights"):
            self.close_connection = True  # the body is not read: it must not be parsed as the next request
            self._send(404, {"error": f"unknown path {self.path}; POST /v1/completions or /v1/weights"})
            return
        try:
            self._authorize()
            if path == "/v1/completions":
                status, answer = self._completions()
            else:
                status, answer = 200, self.server.load_weights(self._read_body())
        except BadRequest as error:
            self._send(error.status, {"error": str(error)})
            return
        except Exception as error:  # a generation failure: 500, which the client retries
            log.exception("%s failed", path)
            self._send(500, {"error": f"{path} failed: {type(error).__name__}: {error}"})
            return
        self._send(status, answer)

    def _completions(self) -> tuple[int, dict[str, Any]]:
        caps = self.server.caps
        length = self.headers.get("Content-Length", "").strip()
        allowed = caps.max_request_bytes + encoded_size(caps.max_multimodal_bytes)
        if length.isdigit() and int(length) > allowed:
            self.close_connection = True  # the body is not read
            raise BadRequest(
                f"body of {length} bytes is over max_request_bytes={caps.max_request_bytes} plus the base64 of "
                f"max_multimodal_bytes={caps.max_multimodal_bytes}",
                413,
            )
        payload = parse_body(self._read_body(), caps.max_request_bytes)
        if exceeds_depth(payload, self.server.limits.max_json_depth):
            raise BadRequest(f"body nests deeper than max_json_depth={self.server.limits.max_json_depth}")
        status, answer = self.server.complete(payload)
        if status == 200:
            self._rows = len(answer["choices"])
            self._tokens = answer["usage"]["completion_tokens"]
        return status, answer

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self.close_connection = True
            raise BadRequest("missing or wrong bearer token (Authorization: Bearer ...)", 401)

    def _log_access(self, status: int) -> None:
        method, _, rest = getattr(self, "requestline", "")[:300].partition(" ")
        path = rest.partition(" ")[0][:200].encode("ascii", "backslashreplace").decode()
        elapsed_ms = (time.perf_counter() - getattr(self, "_start", time.perf_counter())) * 1000
        rows, tokens = getattr(self, "_rows", None), getattr(self, "_tokens", None)
        log.info(
            "%s %s %s %d rows=%s tokens=%s weights=%s %.1fms",
            self.client_address[0],
            method[:10] or "-",
            path or "-",
            status,
            "-" if rows is None else rows,
            "-" if tokens is None else tokens,
            self.server.weights_version,
            elapsed_ms,
        )
