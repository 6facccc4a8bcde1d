"""Weight sync for an external `vllm serve`: the LoRA adapters as a PEFT folder, loaded through vLLM's runtime LoRA
endpoints (`ServerEngine(weight_sync="vllm_lora", adapter_dir=...)`).

What a stock `vllm serve` accepts, as vLLM documents it ("LoRA Adapters › Dynamically serving LoRA Adapters",
docs.vllm.ai/en/v0.10.0/features/lora.html, unchanged through the v0.3x docs) and its OpenAI server's handlers
(`OpenAIServingModels.load_lora_adapter`/`unload_lora_adapter`) implement:
- the server runs with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora --max-lora-rank R` (R at least
  the adapter's r); without the variable the routes do not exist (404);
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` loads the PEFT folder at `lora_path`, read by the *server*
  (so `adapter_dir` must be a path the server sees the same way: the same machine or a shared filesystem). 200 with
  a plain-text "Success: ..." body; 400 when the name is already loaded; 404/500 when no adapter loads from there;
- `POST /v1/unload_lora_adapter {"lora_name"}`: 200, or 404 for a name it does not know;
- a completions request names the adapter as its "model"; an unknown name is answered 404.
Each version is a fresh adapter name (its weights version, `<session>-<n>`): vLLM caches adapters by name, and its
in-place reload (`load_inplace`) exists in recent releases only. The previous adapter is unloaded and its folder
deleted once the new one is served. A restarted server answers 404 for the adapter's name: the rank that sees it
loads the same folder again (a 400 "already been loaded" then means another rank did it first).

Full weights: no HTTP endpoint of a stock `vllm serve` takes a weights payload. vLLM's weight-transfer API
(`/init_weight_transfer_engine`, `/update_weights`, ...: `VLLM_SERVER_DEV_MODE=1` and `--weight-transfer-config`,
docs.vllm.ai/en/v0.32.0/training/weight_transfer/) only coordinates: the tensors move by NCCL broadcast (or CUDA IPC)
between trainer and server GPUs, with vLLM's trainer-side engine in the trainer. It is not implemented here; for full
weights use `renorm serve-policy` (weight_sync "push") or the colocated `vllm` engine.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.engines.weights import WeightsKind
from toolkit.interfaces import Policy

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ALREADY_LOADED = "already been loaded"


class VLLMLoRA:
    """The `vllm_lora` weight transport (`toolkit.engines.weight_sync.WeightTransport`), one adapter per version.

    Args:
        url: the server's API root (`.../v1`).
        headers: sent with every request (JSON content type, a bearer token).
        adapter_dir: where rank 0 writes the adapter folders; the server must read it at the same path.
        timeout_s: per HTTP request.
        retryable: the exception the engine retries (connection failures, timeouts, 5xx and 429 raise it).
    """

    kinds: tuple[WeightsKind, ...] = ("lora",)

    def __init__(
        self, url: str, headers: dict[str, str], adapter_dir: str, timeout_s: float, retryable: type[Exception]
    ) -> None:
        self.url, self.headers, self.timeout_s, self.retryable = url, headers, timeout_s, retryable
        self.adapter_dir = Path(adapter_dir).expanduser().resolve()  # absolute: the server resolves it, not us
        self.current: str | None = None

    def send(self, version: str, weights: tuple[dict[str, Tensor], WeightsKind], policy: Policy) -> None:
        """Write the adapters as folder `adapter_dir/version`, load them under that name, then drop the previous."""
        folder = write_peft_adapter(self.adapter_dir / version, weights[0], unwrap(policy.module))
        self._load(version, folder)
        previous, self.current = self.current, version
        if previous is not None and previous != version:
            self._unload(previous)

    def resend(self, version: str, read_weights: Callable[[], Any]) -> None:
        """Load the version's folder again (it is still on disk: no weights are read)."""
        self._load(version, self.adapter_dir / version)

    def model_name(self, version: str | None) -> str | None:
        """Requests name the served adapter."""
        return version

    def expects(self, version: str | None) -> str | None:
        """vLLM knows no renorm weights versions: a lost adapter shows as a 404 for its name instead."""
        return None

    def _load(self, name: str, folder: Path) -> None:
        status, text = self._call("/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if status == 200 or (status == 400 and _ALREADY_LOADED in text):  # loaded, by an earlier attempt or a rank
            return
        raise ValueError(
            f"vllm serve at {self.url} did not load LoRA adapter {name!r} from {folder}: HTTP {status}: "
            f"{error_message(text)}. It needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --enable-lora with "
            f"--max-lora-rank at least the adapter's r, and {self.adapter_dir} readable at that path"
        )

    def _unload(self, name: str) -> None:
        """Unload an older adapter and delete its folder; a failure only warns (the new adapter already serves)."""
        try:
            status, text = self._call("/unload_lora_adapter", {"lora_name": name})
        except self.retryable as error:
            status, text = 0, str(error)
        if status not in (200, 404):  # 404: the server no longer knows it (a restart)
            log.warning("vllm serve at %s did not unload LoRA adapter %s: %s", self.url, name, error_message(text))
        shutil.rmtree(self.adapter_dir / name, ignore_errors=True)

    def _call(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        """(status, body text) of a JSON POST: vLLM answers these routes in plain text on success."""
        data = json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (http(s) only)
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            if error.code >= 500 or error.code == 429:
                raise self.retryable(f"POST {path}: HTTP {error.code}: {error_message(text)}") from error
            return int(error.code), text
        except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
            raise self.retryable(f"POST {path}: {error}") from error


def write_peft_adapter(folder: Path, weights: Mapping[str, Tensor], model: nn.Module) -> Path:
    """Write `weights` (LoRA tensors named as in the PeftModel `model`) as a PEFT adapter folder: the model's
    `adapter_config.json` and `adapter_model.safetensors` with PEFT's saved names (what `vllm serve` and
    `PeftModel.from_pretrained` read). Written beside and renamed, so no partial folder is ever seen under its name.

    Raises:
        ValueError: `model` is not a PEFT model with a "default" adapter, or `weights` hold no adapter tensor.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a PEFT model with a 'default' adapter: no LoRA to serve")
    state = get_peft_model_state_dict(model, state_dict=dict(weights))
    if not state:
        raise ValueError(f"none of the {len(weights)} pushed tensors is an adapter weight of {type(model).__name__}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.save_pretrained(str(partial))
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(partial / ADAPTER_WEIGHTS))
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's folder for this version
    partial.rename(folder)
    return folder


def error_message(text: str) -> str:
    """The message of a vLLM error body (`{"error": {"message"}}`, `{"message"}` or FastAPI's `{"detail"}`)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", inner.get("detail", inner)))[:500]
        return str(inner)[:500]
    return text[:500]
