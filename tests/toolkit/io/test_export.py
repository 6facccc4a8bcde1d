"""The generic part of `renorm export` (toolkit/io/export.py) with a stand-in policy: strict weight loading,
the staged output folder, finding the run's config and splitting the command's arguments."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tests.demo_run import run_cli, tiny_config
from toolkit.cli import CORE_COMMANDS
from toolkit.config import dump_config
from toolkit.io.checkpoint import CheckpointError, CheckpointManager, CheckpointState
from toolkit.io.export import ExportablePolicy, export_checkpoint, load_trained_weights, split_export_args
from toolkit.io.redaction import REDACTED
from toolkit.train.runner import build_trainer, fit

HERE = "tests.toolkit.io.test_export"


class StandInPolicy:
    """An exportable policy over one linear layer; `export` writes its weights and how it was asked."""

    def __init__(self, width: int = 3, fail: bool = False, token: str = "") -> None:
        self.module = nn.Linear(width, 2)
        self.fail = fail

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    def export(self, out_dir: Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        weights = {k: v.to(dtype) if dtype is not None else v for k, v in self.module.state_dict().items()}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"))
        (out_dir / "asked.json").write_text(json.dumps({"merge_lora": merge_lora, "dtype": str(dtype)}))
        if self.fail:
            raise RuntimeError("disk full halfway")


class StatefulStandIn(StandInPolicy):
    """A stand-in that checkpoints state beyond its weights (as DiDi's EMA student); `export` writes that state."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.zeros(2)

    def state_dict(self) -> dict[str, Any]:
        return {"extra": self.extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.extra = state["extra"]

    def export(self, out_dir: Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        save_file({"extra": self.extra.contiguous()}, str(out_dir / "extra.safetensors"))


class NotExportable:
    def __init__(self) -> None:
        self.module = nn.Linear(3, 2)


def policy_node(component: str = "StandInPolicy", **kwargs: Any) -> dict[str, Any]:
    return {"policy": {"_component_": f"{HERE}.{component}", **kwargs}}


def trained_weights(width: int = 3) -> dict[str, Tensor]:
    return {"weight": torch.arange(2.0 * width).reshape(2, width) / 7, "bias": torch.tensor([0.5, -1.5])}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir with two checkpoints (steps 1 and 2) and its config.yaml."""
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    manager.save(CheckpointState(step=1, model={k: v * 0 for k, v in trained_weights().items()}))
    manager.save(CheckpointState(step=2, model=trained_weights()))
    dump_config(policy_node(), run / "config.yaml")
    return run


def test_stand_in_is_exportable() -> None:
    assert isinstance(StandInPolicy(), ExportablePolicy)
    assert not isinstance(NotExportable(), ExportablePolicy)
    assert "export" in CORE_COMMANDS


def test_export_loads_the_newest_checkpoint_and_writes_the_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    loaded = export_checkpoint(policy_node(), run_dir, out, dtype="bf16")
    assert loaded == run_dir / "checkpoints" / "step_00000002"
    written = load_file(str(out / "model.safetensors"))
    for name, value in trained_weights().items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], value.to(torch.bfloat16))
    assert json.loads((out / "asked.json").read_text()) == {"merge_lora": False, "dtype": "torch.bfloat16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]  # no staging folder left

    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(policy_node(), run_dir / "checkpoints" / "step_00000001", empty, merge_lora=True)
    assert load_file(str(empty / "model.safetensors"))["bias"].tolist() == [0.0, 0.0]
    assert json.loads((empty / "asked.json").read_text()) == {"merge_lora": True, "dtype": "None"}


def test_weights_must_match_the_policy_exactly(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape differs \(1\): \['weight: \(2, 3\) vs \(2, 4\)'\]"):
        export_checkpoint(policy_node(width=4), run_dir, tmp_path / "out")
    other = tmp_path / "other"
    CheckpointManager(other).save(CheckpointState(step=1, model={"weight": torch.zeros(2, 3), "scale": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"missing \(1\): \['bias'\]; unexpected \(1\): \['scale'\]"):
        load_trained_weights(StandInPolicy(), other)
    assert not (tmp_path / "out").exists()


def test_refusals(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no `policy:` node"):
        export_checkpoint({}, run_dir, out)
    with pytest.raises(ValueError, match="NotExportable cannot be exported yet"):
        export_checkpoint(policy_node("NotExportable"), run_dir, out)
    with pytest.raises(ValueError, match=r"dtype='fp16' is not one of \['auto', 'fp32', 'bf16'\]"):
        export_checkpoint(policy_node(), run_dir, out, dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['policy.token'\] hold '<redacted>'"):
        export_checkpoint(policy_node(token=REDACTED), run_dir, out)
    (out / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is not empty"):
        export_checkpoint(policy_node(), run_dir, out)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        export_checkpoint(policy_node(), tmp_path / "absent", tmp_path / "out2")


def test_a_corrupt_checkpoint_is_refused(run_dir: Path, tmp_path: Path) -> None:
    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte of a tensor: same size, another SHA-256
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: size or SHA-256 differs"):
        export_checkpoint(policy_node(), run_dir / "checkpoints" / "step_00000002", tmp_path / "out")


def test_a_failed_export_leaves_no_folder(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk full halfway"):
        export_checkpoint(policy_node(fail=True), run_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_stateful_policy_gets_its_checkpointed_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    manager.save(CheckpointState(step=1, model=trained_weights(), objects={"policy_state": {"extra": torch.ones(2)}}))
    export_checkpoint(policy_node("StatefulStandIn"), run, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "extra.safetensors"))["extra"].tolist() == [1.0, 1.0]
    manager.save(CheckpointState(step=2, model=trained_weights(), objects={"optimizer": {}}))
    with pytest.raises(CheckpointError, match="step_00000002 holds no policy_state for StatefulStandIn"):
        export_checkpoint(policy_node("StatefulStandIn"), run, tmp_path / "out2")
    objects = run / "checkpoints" / "step_00000001" / "objects.pt"
    data = bytearray(objects.read_bytes())
    data[-1] ^= 0xFF
    objects.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="objects.pt: size or SHA-256 differs"):
        export_checkpoint(policy_node("StatefulStandIn"), run / "checkpoints" / "step_00000001", tmp_path / "out3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_replace_swaps_a_finished_export(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_checkpoint(policy_node(), run_dir / "checkpoints" / "step_00000001", out)
    (out / "stale.txt").write_text("from the earlier export")
    with pytest.raises(FileExistsError, match="is not empty"):
        export_checkpoint(policy_node(), run_dir, out)
    export_checkpoint(policy_node(), run_dir, out, replace=True)
    assert sorted(p.name for p in out.iterdir()) == ["asked.json", "model.safetensors"]
    assert load_file(str(out / "model.safetensors"))["bias"].tolist() == [0.5, -1.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging or old folder left


def test_split_export_args(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = run_dir / "config.yaml"
    step = run_dir / "checkpoints" / "step_00000002"
    out = tmp_path / "out"
    assert split_export_args([str(run_dir), str(out)]) == (config, run_dir, out, [])
    assert split_export_args([str(step), str(out), "policy.width=4"]) == (config, step, out, ["policy.width=4"])
    (run_dir / "best").mkdir()
    assert split_export_args([str(run_dir / "best"), str(out)])[0] == config
    other = tmp_path / "other.yaml"
    overrides = ["a.b=[1, 2]", "+c=d", "~e.f"]
    assert split_export_args([str(other), str(step), str(out), *overrides]) == (other, step, out, overrides)
    assert split_export_args([str(run_dir), str(step), str(out)])[0] == config  # a run dir as CONFIG
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=3").mkdir()  # an existing path that reads like an override stays a path
    assert split_export_args([str(config), "lr=3", "out", "lr=4"]) == (config, Path("lr=3"), Path("out"), ["lr=4"])
    with pytest.raises(FileNotFoundError, match="pass the run's CONFIG first"):
        split_export_args([str(tmp_path), str(out)])
    with pytest.raises(ValueError, match="got 1 paths"):
        split_export_args([str(run_dir), "a=1"])


def test_cli(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = run_cli("export", run_dir, out, "--dtype", "fp32")
    assert code == 0, err
    assert load_file(str(out / "model.safetensors"))["bias"].tolist() == [0.5, -1.5]
    code, err = run_cli("export", run_dir, tmp_path / "out2", "policy.width=4")
    assert code == 2 and "renorm: error: checkpoint" in err and "shape differs" in err
    code, err = run_cli("export", run_dir, out)
    assert code == 1 and "is not empty" in err


def same_weights(checkpoint: Path, export: Path) -> bool:
    trained, written = load_file(str(checkpoint / "model.safetensors")), load_file(str(export / "model.safetensors"))
    return written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in trained)


def test_trainer_export_writes_the_finished_run(tmp_path: Path) -> None:
    """trainer.export: the last checkpoint lands in RUN_DIR/export/ (the demo's causal LM); extending the run
    replaces it with the new last checkpoint's weights; without the knob nothing is exported."""
    run = tmp_path / "run"
    first = fit(build_trainer(tiny_config(run, "trainer.num_steps=1", "trainer.export=true")))
    assert first is not None and first.name == "step_00000001"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "export").iterdir()}
    assert same_weights(first, run / "export")
    second = fit(build_trainer(tiny_config(run, "trainer.num_steps=2", "trainer.export=true")))
    assert second is not None and second.name == "step_00000002"
    assert same_weights(second, run / "export") and not same_weights(first, run / "export")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".export")]  # no staging or old folder left
    plain = tmp_path / "plain"
    fit(build_trainer(tiny_config(plain, "trainer.num_steps=1")))
    assert not (plain / "export").exists()


def not_exportable_lm(**kwargs: Any) -> Any:
    """A causal-LM policy whose export is switched off, as a policy of a modality without export would be."""
    from modalities.text_agent.policy import CausalLMPolicy

    class NoExportLM(CausalLMPolicy):
        export = None  # a Protocol member set to None: isinstance(..., ExportablePolicy) is False

    return NoExportLM(**kwargs)


def test_trainer_export_with_a_policy_that_cannot_export_fails_before_training(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "trainer.export=true")
    assert build_trainer(config).config.export  # the causal-LM policy exports: fine
    config["policy"] = {**config["policy"], "_component_": "tests.toolkit.io.test_export.not_exportable_lm"}
    with pytest.raises(ValueError, match=r"trainer.export is true but NoExportLM cannot be exported"):
        build_trainer(config)
