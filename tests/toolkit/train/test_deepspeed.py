"""DeepSpeed through accelerate with the trainer's own micro-batching.

Everywhere: a stand-in accelerator that reports DeepSpeed (and wraps a real one) checks what the trainer does with
it: the config it fills (explicit micro-batch size, accumulation, clipping), one engine step per optimizer step
(`sync_gradients` False on every micro-batch but the last), no loss division by the accumulation count, a gradient
norm the engine does not report read as NaN, and resume refused. Where the `deepspeed` extra is installed (and
runs on CPU with DS_ACCELERATOR=cpu), two ZeRO-2 ranks over gloo match two DDP ranks after two steps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import toolkit.distributed
from tests.toolkit.train.test_ddp import free_port
from tests.toolkit.train.test_trainer import tiny_config
from toolkit.io.checkpoint import MODEL_FILE, load_checkpoint
from toolkit.train import sharding
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[3]


class DeepSpeedStandIn:
    """A real single-process accelerator that reports DeepSpeed and records what the trainer asks of it."""

    distributed_type = "DEEPSPEED"

    def __init__(self, inner: Any, explicit: dict[str, Any] | None = None) -> None:
        self.inner = inner
        config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", **(explicit or {})}
        plugin = type("Plugin", (), {"deepspeed_config": config, "zero_stage": 2})()
        self.state = type("State", (), {"deepspeed_plugin": plugin})()
        self.backward_calls: list[tuple[bool, dict[str, Any]]] = []
        self.sync_gradients = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self.backward_calls.append((self.sync_gradients, kwargs))
        loss.backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> None:
        return None  # what accelerate returns when the engine recorded no norm


def stand_in_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, **explicit: Any) -> Any:
    made = toolkit.distributed.make_accelerator
    monkeypatch.setattr(
        toolkit.distributed, "make_accelerator", lambda *a, **k: DeepSpeedStandIn(made(*a, **k), explicit)
    )
    return build_trainer(tiny_config(tmp_path, *overrides))


def test_the_trainer_fills_the_deepspeed_config_from_its_micro_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = stand_in_trainer(
        tmp_path, monkeypatch, "trainer.gradient_accumulation_steps=3", "trainer.num_minibatches=1"
    )
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    # 4 prompts × 4 samples = 16 rows, one minibatch, 3 micro-batches: ceil(16 / 3) = 6 rows each.
    assert config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 18
    assert config["gradient_clipping"] == 1.0  # tiny_grpo's trainer.max_grad_norm


def test_one_engine_step_per_optimizer_step_and_no_division_by_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = stand_in_trainer(tmp_path, monkeypatch, "trainer.gradient_accumulation_steps=2")
    metrics, _ = trainer.step()
    calls = trainer.accelerator.backward_calls
    # 2 minibatches × 2 micro-batches: the engine may reduce and step only on each minibatch's last backward.
    assert [sync for sync, _ in calls] == [False, True, False, True]
    assert all(kwargs == {"scale_wrt_gas": False} for _, kwargs in calls)
    assert trainer.accelerator.sync_gradients is True  # restored, or accelerate's optimizer wrapper skips step()
    assert math.isnan(metrics["optim/grad_norm"])  # no norm reported: NaN, never a crash or a made-up 0
    assert math.isfinite(metrics["loss/policy"])


def test_a_launch_config_value_that_contradicts_the_trainer_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 .*trainer.gradient_accumulation_steps"):
        stand_in_trainer(tmp_path, monkeypatch, gradient_accumulation_steps=4)
    trainer = stand_in_trainer(tmp_path / "agree", monkeypatch, gradient_accumulation_steps=2, gradient_clipping=1.0)
    assert trainer.accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] == 2


def test_a_deepspeed_checkpoint_holds_the_weights_but_resume_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = stand_in_trainer(tmp_path, monkeypatch)
    trainer.step()
    path = trainer.save()
    assert path is not None
    state = load_checkpoint(path)
    assert state.objects["optimizer"] is None and set(state.model) == set(trainer.policy.module.state_dict())
    with pytest.raises(ValueError, match="cannot resume .* under DeepSpeed"):
        trainer.load(path)


def test_grad_norm_reads_the_engine_norm_when_it_has_one() -> None:
    class Engine(DeepSpeedStandIn):
        def clip_grad_norm_(self, parameters: Any, max_norm: float) -> float:
            return 2.5

    assert sharding.grad_norm(Engine(None), [], None) == 2.5
    assert math.isnan(sharding.grad_norm(DeepSpeedStandIn(None), [], 1.0))


def test_a_reference_copy_of_an_already_partitioned_module_is_refused() -> None:
    from toolkit.hf.reference import ReferenceSnapshot

    module = torch.nn.Linear(2, 2)
    snapshot = ReferenceSnapshot(module)
    module.weight.ds_id = 0  # type: ignore[attr-defined]  # how ZeRO-3 marks a partitioned parameter
    with pytest.raises(RuntimeError, match="before the policy is sharded"):
        snapshot.take(module)


# ---------------------------------------------------------------------------------------------- the real engine

ZERO2_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_processes: 2
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
mixed_precision: "no"
use_cpu: false
rdzv_backend: static
same_network: true
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
"""


def launch(config: Path, *args: str) -> None:
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config)]
    command += ["--main_process_port", str(free_port()), "-m", "toolkit.cli", *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keeps a --target install
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_two_zero_ranks_match_two_ddp_ranks(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed", reason="the optional `deepspeed` extra is not installed")
    config = tmp_path / "zero.yaml"
    config.write_text(ZERO2_CPU.format(stage=stage))
    train = [
        "train",
        str(ROOT / "configs" / "demo" / "tiny_grpo.yaml"),
        f"data.path={ROOT / 'data' / 'demo' / 'letters.jsonl'}",
        "sampler.max_new_tokens=3",
        "trainer.prompts_per_step=4",
        "trainer.group_size=2",
        "trainer.num_minibatches=1",
        "trainer.gradient_accumulation_steps=2",
        "trainer.num_steps=2",
        "trainer.progress=false",
        "objective.entropy_coef=0.01",
        "objective.kl_coef=0.05",
    ]
    launch(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml", *train, f"trainer.run_dir={tmp_path / 'ddp'}")
    launch(config, *train, f"trainer.run_dir={tmp_path / 'zero'}")
    step = Path("checkpoints") / "step_00000002" / MODEL_FILE
    ddp, zero = load_file(str(tmp_path / "ddp" / step)), load_file(str(tmp_path / "zero" / step))
    assert ddp.keys() == zero.keys()
    worst = max(float((ddp[k] - zero[k]).abs().max()) for k in ddp)
    assert worst < 1e-5, f"ZeRO-{stage} and DDP weights differ by {worst}"
