"""A stand-in for `vllm serve --enable-lora` with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, on loopback: the request
and response shapes of vLLM's runtime LoRA endpoints and its completions endpoint, as its docs describe them
("Dynamically serving LoRA Adapters", docs.vllm.ai/en/v0.10.0/features/lora.html) and its OpenAI server's
handlers implement them (`OpenAIServingModels.load_lora_adapter` / `unload_lora_adapter`, the v0.8-era module and
the current one: plain-text success bodies, `{"error": {...}}` JSON errors, 404 for an unknown model).

Generation is serve-policy's (`PolicyServer.complete`, the `hf` engine); each adapter is read from its PEFT folder
with peft (`load_adapter`), as vLLM reads `adapter_config.json` + `adapter_model.safetensors`, and kept unmerged.
There is no `/v1/weights`: vLLM has none.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from modalities.text_agent.policy_server import PolicyServer
from toolkit.distributed import unwrap

BASE_MODEL = "tiny-base"


class VLLMStandIn(PolicyServer):
    """Serves a LoRA `policy`'s base model under BASE_MODEL and every loaded adapter under its name.

    `runtime_lora_updating=False` is a server started without the variable: the LoRA routes do not exist (404).
    `loads` / `unloads` record the adapter names in request order.
    """

    def __init__(self, policy: Any, address: tuple[str, int], runtime_lora_updating: bool = True) -> None:
        super().__init__(policy, address, model_name=BASE_MODEL)
        self.RequestHandlerClass = VLLMHandler
        self.runtime_lora_updating = runtime_lora_updating
        self.adapters: dict[str, str] = {}  # name -> lora_path
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.serving_lock = threading.Lock()  # the active adapter is chosen per request

    def load_adapter(self, name: str, path: str) -> tuple[int, str | dict[str, Any]]:
        if name in self.adapters:
            message = f"The lora adapter '{name}' has already been loaded."
            return 400, _error(message, "InvalidUserInput", 400)
        try:
            with self.serving_lock:
                unwrap(self.policy.module).load_adapter(path, adapter_name=name)
        except (OSError, ValueError) as error:
            return 404, _error(
                f"Loading lora {name} failed: No adapter found for {path}: {error}", "NotFoundError", 404
            )
        self.adapters[name] = path
        self.loads.append(name)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, name: str) -> tuple[int, str | dict[str, Any]]:
        if name not in self.adapters:
            return 404, _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        with self.serving_lock:
            module = unwrap(self.policy.module)
            if name in module.active_adapters:
                module.set_adapter("default")  # what a request for the base model leaves active here
            module.delete_adapter(name)
        del self.adapters[name]
        self.unloads.append(name)
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def complete_as(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Completions with the adapter named by "model" (404 for a name it does not serve)."""
        name = payload.get("model")
        if name != BASE_MODEL and name not in self.adapters:
            return 404, _error(f"The model `{name}` does not exist.", "NotFoundError", 404, param="model")
        module = unwrap(self.policy.module)
        with self.serving_lock:
            if name == BASE_MODEL:
                with module.disable_adapter():
                    return self.complete(payload)
            module.set_adapter(name)
            return self.complete(payload)

    def model_list(self) -> dict[str, Any]:
        cards = [{"id": BASE_MODEL, "object": "model", "parent": None}]
        cards += [
            {"id": name, "object": "model", "root": path, "parent": BASE_MODEL} for name, path in self.adapters.items()
        ]
        return {"object": "list", "data": cards}


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class VLLMHandler(BaseHTTPRequestHandler):
    """vLLM's routes: GET /v1/models; POST /v1/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter."""

    server: VLLMStandIn  # type: ignore[assignment]

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._reply(200, self.server.model_list())
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        path = self.path.rstrip("/")
        lora_route = path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
        if lora_route and self.headers.get("Content-Type") != "application/json":
            self._reply(415, {"detail": "Unsupported Media Type: Only 'application/json' is allowed"})
        elif lora_route and self.server.runtime_lora_updating:
            if path == "/v1/load_lora_adapter":
                self._reply(*self.server.load_adapter(body["lora_name"], body["lora_path"]))
            else:
                self._reply(*self.server.unload_adapter(body["lora_name"]))
        elif path == "/v1/completions":
            self._reply(*self.server.complete_as(body))
        else:
            self._reply(404, {"detail": "Not Found"})

    def _reply(self, status: int, answer: str | dict[str, Any]) -> None:
        text = answer if isinstance(answer, str) else json.dumps(answer)
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the stand-in records what the tests check (`loads`, `unloads`)."""
