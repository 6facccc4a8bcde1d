"""bench/engines_gpu.py on a CPU: the `--cpu-smoke` run end to end (workload folder, one subprocess per side, JSON
results, the report table and the FIGURE line), and the pure pieces its GPU sides rely on: the `vllm serve` command
line, the engine nodes against the engines' constructors, and the TRL settings against the installed GRPOConfig."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench import engines_gpu, vllm_serve
from bench.engines_report import SIDES, figure_line, status, summarize
from bench.trainer_vs_trl import GROUP_SIZE
from bench.vllm_serve import vllm_serve_command, vllm_server
from toolkit.config.schema import import_object
from toolkit.engines import ServerEngine

ROOT = Path(__file__).resolve().parents[2]
# A stand-in for `vllm serve` on the given --port: answers GET /health with 200 and, like vLLM's API server with its
# engine core, keeps a child process; prints both pids. FAIL=1 in the environment: print and exit 3 instead.
FAKE_VLLM = """
import http.server, os, subprocess, sys
if os.environ.get("FAIL"):
    print("engine core failed to start", flush=True)
    sys.exit(3)
core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("pids", os.getpid(), core.pid, flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def args() -> argparse.Namespace:
    """The GPU run's defaults, with a model folder named."""
    parsed = engines_gpu.parse_args([])
    parsed.model_dir = "/models/tiny"
    return parsed


def test_vllm_serve_command_serves_the_folder_on_loopback_sized_like_the_colocated_sides(
    args: argparse.Namespace,
) -> None:
    command = vllm_serve_command(["vllm"], "/models/tiny", 8123, engines_gpu.serve_options(args))
    assert command[:3] == ["vllm", "serve", "/models/tiny"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8123",
        "--served-model-name": engines_gpu.SERVED_NAME,
        "--dtype": "bfloat16",
        "--gpu-memory-utilization": str(args.gpu_memory_utilization),
        "--max-model-len": str(args.max_new_tokens + engines_gpu.PROMPT_ROOM),
        "--max-num-seqs": str(args.num_prompts * GROUP_SIZE),  # a step's completions, as TRL colocated
        "--seed": str(args.seed),
    }
    assert vllm_serve_command(["vllm"], "m", 1, {"enforce-eager": True})[-1] == "--enforce-eager"
    with pytest.raises(ValueError, match="host"):
        vllm_serve_command(["vllm"], "m", 1, {"host": "0.0.0.0"})


def gone(pid: int, within_s: float = 10.0) -> bool:
    """True once no process has `pid` (polled: a killed grandchild is reaped by init, not by us)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_vllm_server_is_up_inside_the_block_and_its_whole_process_group_stops_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    monkeypatch.setattr(vllm_serve, "vllm_launcher", lambda: [sys.executable, str(script)])
    log = tmp_path / "serve.log"
    with vllm_server("/models/tiny", {"served-model-name": "x"}, log, timeout_s=60) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as response:
            assert response.status == 200
        server, core = (int(pid) for pid in log.read_text().split()[1:3])
    assert gone(server) and gone(core)  # the engine-core stand-in went with its server
    monkeypatch.setenv("FAIL", "1")
    failing = vllm_server("/models/tiny", {}, log, timeout_s=60)
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*engine core failed to start"), failing:
        pass


@pytest.mark.parametrize("side", ["hf", "vllm", "server"])
def test_engine_nodes_bind_to_the_engines_constructors(args: argparse.Namespace, side: str) -> None:
    node = engines_gpu.engine_node(side, args, args.model_dir, "http://127.0.0.1:9/v1")
    options = {key: value for key, value in node.items() if key != "_component_"}
    inspect.signature(import_object(node["_component_"])).bind(**options)  # a renamed keyword fails here
    if side == "vllm":
        assert options["max_model_len"] == args.max_new_tokens + engines_gpu.PROMPT_ROOM
        assert options["enable_sleep"] is False
    if side == "server":  # built for real: no request is sent at construction
        engine = ServerEngine(**options)
        assert (engine.weight_sync, engine.model, engine.served_version) == ("none", engines_gpu.SERVED_NAME, None)


def test_renorm_config_trains_the_saved_folder_in_bf16_with_the_sides_engine(args: argparse.Namespace) -> None:
    config = engines_gpu.renorm_side_config(args, "vllm", "/tmp/run", None)
    assert config["policy"]["model"] == "/models/tiny"
    assert config["trainer"]["mixed_precision"] == "bf16" and config["trainer"]["prompts_per_step"] == args.num_prompts
    assert config["sampler"]["eos_token_ids"] == [] and config["sampler"]["max_new_tokens"] == args.max_new_tokens
    assert config["sampler"]["engine"]["_component_"] == "toolkit.engines.VLLMEngine"
    assert len(config["data"]["records"]) == args.num_prompts


def test_trl_settings_name_fields_of_the_installed_grpo_config(args: argparse.Namespace, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="the `bench` extra (TRL) is not installed")
    fields = {field.name for field in dataclasses.fields(trl.GRPOConfig)}
    for side in ("trl", "trl-vllm"):
        settings = engines_gpu.trl_side_settings(args, side)
        assert not set(settings) - fields, f"{side}: GRPOConfig has no {sorted(set(settings) - fields)}"
        assert settings["bf16"] and not settings["use_cpu"] and settings["generation_kwargs"] is None
    vllm = engines_gpu.trl_side_settings(args, "trl-vllm")
    assert (vllm["use_vllm"], vllm["vllm_mode"], vllm["vllm_enable_sleep_mode"]) == (True, "colocate", False)
    assert vllm["vllm_max_model_length"] == args.max_new_tokens + engines_gpu.PROMPT_ROOM
    args.cuda = False  # GRPOConfig validates bf16 against the device: build the CPU variant of the vLLM side
    config = trl.GRPOConfig(output_dir=str(tmp_path), **engines_gpu.trl_side_settings(args, "trl-vllm"))
    batch = args.num_prompts * GROUP_SIZE
    assert config.use_vllm and config.steps_per_generation == 1 and config.generation_batch_size == batch


def test_saved_workload_cannot_stop_early_and_every_model_id_is_a_token(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    args = engines_gpu.parse_args(["--cpu-smoke"])
    folder = engines_gpu.save_workload(tmp_path / "model", args)
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    vocab = args.vocab_size
    assert config.vocab_size == vocab and config.eos_token_id is None
    assert str(config.dtype).removeprefix("torch.") == "bfloat16"  # vLLM's dtype "auto" reads it
    assert tokenizer.eos_token_id == vocab and len(tokenizer) == vocab + 1  # EOS is one id past the model's logits
    assert all(tokenizer.convert_ids_to_tokens(i) is not None for i in range(vocab))


def test_figure_line_gives_ratios_against_trl_with_vllm_or_the_seconds_without_it() -> None:
    rows = {"wall_s": [2.0, 4.0, 3.0], "generate_s": [1.0, 1.0, 2.0], "length": [8.0] * 3, "reward": [0.5] * 3}
    summary = summarize(rows, completions=4)
    assert (summary["median_s"], summary["min_s"], summary["tokens_per_s"]) == (3.0, 2.0, 32.0)
    base = {"median_s": 2.0}
    line = figure_line({"hf": {"median_s": 3.0}, "trl-vllm": base}, {})
    assert line == "FIGURE: s/step vs TRL+vLLM colocate (2.000 s): hf 1.50x"
    line = figure_line({"hf": {"median_s": 3.0}}, {"trl-vllm": {"skipped": "vllm not installed"}})
    assert line == "FIGURE: TRL+vLLM skipped (vllm not installed); s/step hf 3.000"
    line = figure_line({"trl-vllm": base}, {"server": {"failed": "timed out after 120 s"}, "trl-vllm": {}})
    assert line == "FIGURE: FAIL server; s/step vs TRL+vLLM colocate (2.000 s)"  # failures lead: never truncated away
    assert status({"failed": "exit code 1"}) == "FAIL (exit code 1)"


def test_cpu_smoke_runs_the_hf_and_trl_sides_and_reports_the_rest_skipped(tmp_path: Path) -> None:
    out = tmp_path / "smoke.md"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "bench" / "engines_gpu.py"), "--cpu-smoke", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()}
    length = f"{engines_gpu.SMOKE['max_new_tokens']:.1f}"  # every completion runs the whole budget
    hf = rows[SIDES["hf"]]
    assert hf[1] == "ok" and float(hf[2].split(" / ")[0]) > 0 and hf[6] == length
    for side in ("vllm", "server", "trl-vllm"):
        assert rows[SIDES[side]][1] == "skipped (needs CUDA and vLLM)"
    trl = rows[SIDES["trl"]]
    if importlib.util.find_spec("trl") is not None:
        assert trl[1] == "ok" and trl[6] == length and float(trl[5]) > 0  # generation tokens/s measured
    else:
        assert trl[1] == "skipped (trl not installed)"
    figure = [line for line in done.stdout.splitlines() if line.startswith("FIGURE: ")]
    assert len(figure) == 1 and figure[0].startswith("FIGURE: TRL+vLLM skipped (needs CUDA and vLLM); s/step hf ")


@pytest.mark.parametrize("visible", [None, "3"])
def test_importing_the_bench_keeps_the_devices_it_was_given(visible: str | None) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    environment.update({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible})
    code = "import os, bench.engines_gpu; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(visible)  # bench.trainer_vs_trl hides CUDA only when run as the CPU bench
