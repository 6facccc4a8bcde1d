"""Judge clients: one `complete(conversations) -> texts` interface for every LLM/VLM judge.

`OpenAIChatClient` talks to any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, OpenAI)
with the standard library only: a bounded thread pool, per-request timeouts and exponential back-off
on transient errors. `HFChatClient` runs a local transformers causal LM; `FakeJudgeClient` wraps a
function for tests and demos. A conversation that fails yields None and is counted in `stats`.
Images ride in content parts `{"type": "image", "image": PIL.Image}` (see `image_part`); the HTTP client
sends them as OpenAI `image_url` parts with base64 PNG data URLs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from torch import nn

from rewards.judges.hf_generation import (
    complete_in_batches,
    generate_new_text,
    left_padding,
    load_model_and_preprocessor,
)

log = logging.getLogger(__name__)

# OpenAI chat format: {"role": ..., "content": str | [{"type": "text", "text": ...}, {"type": "image_url", ...}]}.
Message = Mapping[str, Any]
Conversation = Sequence[Message]


@dataclass
class ClientStats:
    """Running counters of a client (cumulative; take `since(earlier)` for one call's share).

    Attributes:
        requests: conversations asked for.
        attempts: HTTP requests or generate calls made, retries included.
        failures: conversations that ended as None.
        latency_s: summed seconds per conversation, from its first attempt to its last.
    """

    requests: int = 0
    attempts: int = 0
    failures: int = 0
    latency_s: float = 0.0

    @property
    def retries(self) -> int:
        return self.attempts - self.requests

    @property
    def mean_latency_s(self) -> float:
        return self.latency_s / self.requests if self.requests else 0.0

    def since(self, earlier: ClientStats) -> ClientStats:
        """The counts accumulated after the snapshot `earlier`."""
        return ClientStats(
            self.requests - earlier.requests,
            self.attempts - earlier.attempts,
            self.failures - earlier.failures,
            self.latency_s - earlier.latency_s,
        )

    def snapshot(self) -> ClientStats:
        return replace(self)

    def as_metrics(self, prefix: str = "judge") -> dict[str, float]:
        return {
            f"{prefix}/requests": float(self.requests),
            f"{prefix}/failures": float(self.failures),
            f"{prefix}/retries": float(self.retries),
            f"{prefix}/latency_s": self.mean_latency_s,
        }


@runtime_checkable
class JudgeClient(Protocol):
    """Answers a batch of chat conversations: one text per conversation, None = failed after retries."""

    def complete(self, batch: Sequence[Conversation]) -> list[str | None]: ...


class FakeJudgeClient:
    """Deterministic judge for tests and demos: `fn(messages) -> str | None` per conversation.

    Every conversation asked is kept in `conversations` (in order) for assertions.
    """

    def __init__(self, fn: Callable[[list[dict[str, Any]]], str | None]) -> None:
        self.fn = fn
        self.stats = ClientStats()
        self.conversations: list[list[dict[str, Any]]] = []

    def complete(self, batch: Sequence[Conversation]) -> list[str | None]:
        out: list[str | None] = []
        for conversation in batch:
            messages = [dict(m) for m in conversation]
            self.conversations.append(messages)
            out.append(self.fn(messages))
        self.stats.requests += len(batch)
        self.stats.attempts += len(batch)
        self.stats.failures += sum(text is None for text in out)
        return out


class _TransientError(Exception):
    """A failed attempt worth retrying (5xx, 408, 429, timeout, dropped connection, malformed reply)."""

    def __init__(self, reason: str, retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _PermanentError(Exception):
    """A failed attempt that retrying cannot fix (4xx other than 408/429)."""


class OpenAIChatClient:
    """Client of an OpenAI-compatible `POST {base_url}/chat/completions` endpoint (stdlib HTTP).

    Conversations of one `complete` call run in a thread pool of at most `max_concurrency` workers.
    Timeouts, connection errors, malformed replies, HTTP 5xx, 408 and 429 are retried with exponential
    back-off `backoff_s · 2^(attempt-1)` (capped at `max_backoff_s`; a 429's Retry-After is honoured up
    to the cap); other 4xx fail at once. `timeout_s` bounds each socket operation of an attempt.

    Args:
        base_url: e.g. "http://localhost:8000/v1".
        model: the served model name sent in each request.
        api_key: bearer token; None sends no Authorization header (local servers).
        api_key_env: name of an environment variable holding the key (read at construction).
        extra_body: more request fields (e.g. {"top_p": 1.0, "chat_template_kwargs": {...}}).
        use_env_proxy: honour http(s)_proxy environment variables; False connects directly.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 16,
        temperature: float = 0.0,
        max_tokens: int = 512,
        extra_body: Mapping[str, Any] | None = None,
        use_env_proxy: bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        _check_positive(timeout_s=timeout_s, max_concurrency=max_concurrency, max_tokens=max_tokens)
        _check_non_negative(max_retries=max_retries, backoff_s=backoff_s, temperature=temperature)
        if api_key is not None and api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env={api_key_env!r}: that environment variable is not set")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.max_retries = model, timeout_s, max_retries
        self.backoff_s, self.max_backoff_s, self.max_concurrency = backoff_s, max_backoff_s, max_concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body or {})
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)
        self.stats = ClientStats()

    def complete(self, batch: Sequence[Conversation]) -> list[str | None]:
        if not batch:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(batch))) as pool:
            results = list(pool.map(self._complete_one, batch))
        # Counters are updated here, in the calling thread, so the workers need no lock.
        for text, attempts, seconds in results:
            self.stats.requests += 1
            self.stats.attempts += attempts
            self.stats.failures += text is None
            self.stats.latency_s += seconds
        return [text for text, _, _ in results]

    def payload(self, conversation: Conversation) -> dict[str, Any]:
        """The JSON request body for one conversation."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [openai_message(m) for m in conversation],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        body.update(self.extra_body)
        return body

    def _complete_one(self, conversation: Conversation) -> tuple[str | None, int, float]:
        """(text or None, attempts made, seconds spent) for one conversation."""
        data = json.dumps(self.payload(conversation)).encode("utf-8")
        start = time.perf_counter()
        wait = 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, max(wait, self.backoff_s * 2 ** (attempt - 1))))
            try:
                return self._attempt(data), attempt + 1, time.perf_counter() - start
            except _PermanentError as err:
                log.warning("judge request to %s failed without retry: %s", self.url, err)
                return None, attempt + 1, time.perf_counter() - start
            except _TransientError as err:
                wait = err.retry_after_s
                log.info(
                    "judge request to %s failed (attempt %d/%d): %s", self.url, attempt + 1, self.max_retries + 1, err
                )
        log.warning("judge request to %s failed after %d attempts", self.url, self.max_retries + 1)
        return None, self.max_retries + 1, time.perf_counter() - start

    def _attempt(self, data: bytes) -> str:
        request = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            status, retry_after = err.code, _retry_after_s(err.headers.get("Retry-After") if err.headers else None)
            err.close()
            if status in (408, 429) or status >= 500:
                raise _TransientError(f"HTTP {status}", retry_after) from err
            raise _PermanentError(f"HTTP {status}") from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # timeouts are OSErrors
            raise _TransientError(f"{type(err).__name__}: {err}") from err
        try:
            return _message_text(json.loads(body))
        except ValueError as err:
            raise _TransientError(f"malformed reply: {err}") from err


def _message_text(reply: Any) -> str:
    """The first choice's message content of a chat-completions reply (ValueError when absent)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"no choices[0].message.content in {str(reply)[:200]!r}") from err
    if isinstance(content, list):  # some servers return content parts
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    if not isinstance(content, str):
        raise ValueError(f"message content is {type(content).__name__}, not text")
    return content


def _retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to the exponential back-off
        return 0.0


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def image_data_url(image: Any, image_format: str = "PNG") -> str:
    """A PIL image as a base64 data URL (`data:image/png;base64,...`), RGB."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format)
    mime = "jpeg" if image_format.upper() in ("JPEG", "JPG") else image_format.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_part(image: Any) -> dict[str, Any]:
    """A content part carrying a PIL image: `{"type": "image", "image": image}`.

    OpenAIChatClient turns it into an `image_url` part with a PNG data URL; HF vision clients pass the
    image to their processor.
    """
    return {"type": "image", "image": image}


def openai_message(message: Message) -> dict[str, Any]:
    """A message in OpenAI chat format: `image` parts holding PIL images become `image_url` data-URL parts;
    string content and every other part pass through unchanged."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, (list, tuple)):
        out["content"] = [_openai_part(p) for p in content]
    return out


def _openai_part(part: Any) -> Any:
    if isinstance(part, Mapping) and part.get("type") == "image" and hasattr(part.get("image"), "save"):
        return {"type": "image_url", "image_url": {"url": image_data_url(part["image"])}}
    return part


def text_only_messages(conversation: Conversation) -> list[dict[str, str]]:
    """Messages with string content: text parts are joined; any non-text part raises ValueError."""
    out = []
    for message in conversation:
        content = message.get("content", "")
        if not isinstance(content, str):
            kinds = {p.get("type") if isinstance(p, Mapping) else type(p).__name__ for p in content}
            if kinds - {"text"}:
                raise ValueError(f"a text-only judge got content parts {sorted(map(str, kinds))}; use a VLM client")
            content = "".join(str(p.get("text", "")) for p in content)
        out.append({"role": str(message["role"]), "content": content})
    return out


class HFChatClient:
    """A local transformers causal LM as judge: chat template, batched left-padded generation.

    Greedy when `temperature == 0`, else sampling with `temperature` and `top_p`. Text-only: content
    parts must all be text. A CUDA out-of-memory error in a batch yields None for that batch
    (counted); any other error is raised.

    Args:
        model: a hub id / local path (loaded with AutoModelForCausalLM) or a loaded module.
        tokenizer: a tokenizer, or its id/path; None loads it from `model` when that is a string. A
            tokenizer without a pad token gets eos as its pad token.
        batch_size: conversations per `generate` call.
        device: where a loaded model is moved; None keeps a module where it is and puts a model
            loaded from a string on CUDA when available.
        dtype: dtype for loading from a string ("auto" by default).
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size, top_p=top_p)
        _check_non_negative(temperature=temperature)
        model, tokenizer = load_model_and_preprocessor(
            model, tokenizer, AutoModelForCausalLM, AutoTokenizer, device, dtype, "HFChatClient", "tokenizer"
        )
        if tokenizer.pad_token is None:  # batched generation pads; eos is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = (
            max_new_tokens,
            temperature,
            top_p,
            batch_size,
        )
        self.stats = ClientStats()

    def complete(self, batch: Sequence[Conversation]) -> list[str | None]:
        texts = [
            self.tokenizer.apply_chat_template(text_only_messages(c), tokenize=False, add_generation_prompt=True)
            for c in batch
        ]
        return complete_in_batches(texts, self.batch_size, self._generate, self.stats, "judge generation")

    def _generate(self, prompts: list[str]) -> list[str | None]:
        with left_padding(self.tokenizer):
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return generate_new_text(self.model, self.tokenizer, inputs, self.max_new_tokens, self.temperature, self.top_p)
