"""Secrets never written: redact API keys, tokens and passwords from configs, run files, trackers and logs.

A key is secret when its name says so (case-insensitive): it contains `api_key`, `password`, `secret`,
`authorization` or `credential`, or it is `token` or an access token's name (`hf_token`, `access_token`,
`wandb_token` ...) — not a tokenizer's `pad_token` or a count like `max_tokens`. Redaction replaces its
value by `REDACTED` and also scrubs every string elsewhere that contains a secret value (a key pasted into
a URL), including the values of environment variables that `*_env` keys name (`api_key_env: OPENAI_API_KEY`)
and the values a config read with `${env:NAME}` from a variable whose name says it is a secret (`OPENAI_API_KEY`,
`HF_TOKEN`), wherever they landed. Once `register_secrets` has seen a config, every log record is scrubbed the same way.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"
SECRET_KEY_PARTS = ("api_key", "apikey", "password", "passwd", "secret", "authorization", "credential")
_SECRET_TOKEN = re.compile(
    r"^(.*_)?(hf|hub|huggingface|access|auth|bearer|api|github|gh|wandb|refresh|session|oauth|private|user)_?token$"
)
_MIN_SECRET_CHARS = 4  # shorter values ("", "x") would scrub unrelated text
_ENV_SECRETS: set[str] = set()  # values configs in this process read with ${env:NAME} from a secret NAME


def is_secret_key(key: str) -> bool:
    """True when a config key's name says it holds a secret (`api_key`, `hub_token`, `password` ...).

    `*_env` keys name an environment variable (their value is not the secret) and are not secret keys.
    """
    lowered = key.lower().replace("-", "_")
    if lowered.endswith("_env"):
        return False
    return lowered == "token" or bool(_SECRET_TOKEN.match(lowered)) or any(p in lowered for p in SECRET_KEY_PARTS)


def note_env_value(name: str, value: str) -> None:
    """Record that a config read `value` from the environment variable `name` (`${env:NAME}` interpolation).

    When `name` says it is a secret (`is_secret_key`: `OPENAI_API_KEY`, `HF_TOKEN` ...), `value` counts as a secret
    of every config from now on: `redact` writes it as `REDACTED` and log records are scrubbed of it, whatever key
    it was interpolated into (`base_url: https://host/?key=${env:OPENAI_API_KEY}`).
    """
    if is_secret_key(name) and len(value) >= _MIN_SECRET_CHARS:
        _ENV_SECRETS.add(value)


def secret_values(config: Any) -> set[str]:
    """The string values of secret keys in a nested config, and the environment values its `*_env` keys name."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                name = str(key)
                if isinstance(value, str) and is_secret_key(name):
                    found.add(value)
                elif isinstance(value, str) and name.lower().endswith("_env") and os.environ.get(value):
                    found.add(os.environ[value])
                else:
                    visit(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                visit(item)

    visit(config)
    return {value for value in found if len(value) >= _MIN_SECRET_CHARS}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `REDACTED` (longest first)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact(config: Any, extra_secrets: Iterable[str] = ()) -> Any:
    """A copy of `config` with secret keys' values replaced by `REDACTED` and secret values scrubbed from strings.

    Mappings come back as dicts and tuples as lists; other values are returned as they are.
    """
    secrets = secret_values(config) | _ENV_SECRETS | set(extra_secrets)

    def copy(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {
                key: REDACTED if is_secret_key(str(key)) and value is not None else copy(value)
                for key, value in node.items()
            }
        if isinstance(node, (list, tuple)):
            return [copy(item) for item in node]
        if isinstance(node, str):
            return scrub(node, secrets)
        return node

    return copy(config)


_SECRETS: set[str] = set()
_BASE_FACTORY = logging.getLogRecordFactory()


def _scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Builds each log record, then replaces any registered secret in its message (whatever handler prints it)."""
    record = _BASE_FACTORY(*args, **kwargs)
    if _SECRETS:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record is logging's own error to report
            return record
        cleaned = scrub(message, _SECRETS)
        if cleaned != message:
            record.msg, record.args = cleaned, None
    return record


def register_secrets(config: Any) -> set[str]:
    """Remember the secrets of `config` and scrub them from every log record from now on; returns them."""
    secrets = secret_values(config) | _ENV_SECRETS
    _SECRETS.update(secrets)
    if logging.getLogRecordFactory() is not _scrubbing_factory:
        logging.setLogRecordFactory(_scrubbing_factory)
    return secrets
