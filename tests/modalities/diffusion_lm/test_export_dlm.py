"""A trained DiDi student leaves the toolkit: configs/diffusion_lm/tiny.yaml trained for a step is exported as
model.safetensors + config.json (+ tokenizer), the EMA student by default, and loads back through the Python API and
`renorm dlm sample` with the trained model's logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from modalities.diffusion_lm.checkpoint_io import load_dlm, load_dlm_folder, load_dlm_tokenizer, save_dlm_folder
from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.text_data import build_text_tokenizer
from modalities.diffusion_lm.tiny import build_tiny_teacher
from tests.demo_run import run_cli
from tests.modalities.diffusion_lm.test_didi_e2e import _config
from toolkit.config import instantiate
from toolkit.io.export import export_checkpoint, load_export
from toolkit.train.runner import build_trainer, fit

TOKENIZER = {"_component_": "modalities.diffusion_lm.text_data.build_text_tokenizer"}


def fixed_input(mask_id: int) -> tuple[Tensor, Tensor]:
    z = torch.randint(0, mask_id, (2, 16), generator=torch.Generator().manual_seed(0))
    z[0, ::2] = mask_id
    z[1, 3:] = mask_id
    return z, torch.tensor([0.5, 0.9])


def log_probs(model: MaskedDiffusionLM, z: Tensor, t: Tensor) -> Tensor:
    with torch.no_grad():
        return model.log_probs_x0(z, t)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], StudentPolicy]:
    run_dir = tmp_path_factory.mktemp("didi") / "run"
    config = _config(run_dir, 1)
    trainer = build_trainer(config)
    fit(trainer)
    policy = trainer.policy
    assert isinstance(policy, StudentPolicy)
    return run_dir, config, policy


def with_policy(config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The run config with policy fields set (as `renorm export ... policy.key=value` overrides would)."""
    changed = copy.deepcopy(config)
    changed["policy"].update(fields)
    return changed


def test_ema_student_exports_and_loads(trained: tuple[Path, dict[str, Any], StudentPolicy], tmp_path: Path) -> None:
    run_dir, config, policy = trained
    out = tmp_path / "student"
    export_checkpoint(with_policy(config, tokenizer=TOKENIZER), run_dir, out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "renorm-dlm" and meta["weights"] == "ema" and meta["dtype"] == "float32"
    assert meta["dit_config"]["hidden_size"] == 64 and meta["schedule"] == "LogLinearSchedule"
    assert policy.ema is not None
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[k], v) for k, v in policy.ema.state_dict().items())

    model = load_dlm_folder(out)
    z, t = fixed_input(model.mask_id)
    expected = log_probs(policy.ema_model(), z, t)
    assert torch.equal(log_probs(model, z, t), expected)
    assert not torch.equal(log_probs(policy.student, z, t), expected)  # the EMA, not the student
    assert torch.equal(log_probs(load_dlm(out), z, t), expected)  # the loader `renorm dlm sample` uses
    tokenizer = load_dlm_tokenizer(out)
    assert tokenizer is not None and tokenizer.get_vocab() == build_text_tokenizer().get_vocab()

    samples = tmp_path / "samples.jsonl"
    code, err = run_cli("dlm", "sample", out, "--num-samples", "2", "--num-steps", "4", "--output", samples)
    assert code == 0, err
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["input_ids"]) == 32 and r["text"] for r in rows)

    fresh = instantiate(config["policy"], where="policy")  # renorm eval --checkpoint OUT: the exported EMA student
    load_export(fresh, out)
    assert torch.equal(log_probs(fresh.student, z, t), expected) and fresh.ema is not None
    assert all(torch.equal(fresh.ema.state_dict()[k], v) for k, v in policy.ema.state_dict().items())


def test_raw_student_and_no_tokenizer(trained: tuple[Path, dict[str, Any], StudentPolicy], tmp_path: Path) -> None:
    run_dir, config, policy = trained
    out = tmp_path / "raw"
    export_checkpoint(with_policy(config, export_weights="student", tokenizer=None), run_dir, out, dtype="bf16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["weights"] == "student" and meta["dtype"] == "bfloat16"
    model = load_dlm_folder(out)  # fp32 parameters holding the bf16-rounded weights
    for name, value in policy.module.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value.to(torch.bfloat16).float()), name
    assert load_dlm_tokenizer(out) is None
    code, err = run_cli("dlm", "sample", out, "--num-samples", "1", "--num-steps", "2")  # the shipped corpus's words
    assert code == 0, err
    corpus = tmp_path / "other.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(100)) + "\n")
    code, err = run_cli("dlm", "sample", out, "--corpus", corpus, "--num-steps", "2")
    assert code == 2 and "tokenizer has 105 ids, more than the model's vocab_size" in err


def test_refusals(trained: tuple[Path, dict[str, Any], StudentPolicy], tmp_path: Path) -> None:
    run_dir, config, _ = trained
    with pytest.raises(ValueError, match="merge_lora needs a LoRA policy"):
        export_checkpoint(config, run_dir, tmp_path / "merged", merge_lora=True)
    with pytest.raises(ValueError, match="policy.export_weights: expected one of 'ema', 'student'"):
        export_checkpoint(with_policy(config, export_weights="best"), run_dir, tmp_path / "best")
    with pytest.raises(ValueError, match="tokenizer has 66 ids, more than the model's vocab_size 65"):
        save_dlm_folder(build_tiny_teacher(), tmp_path, build_text_tokenizer(words=[f"w{i}" for i in range(61)]))
    with pytest.raises(ValueError, match="is not an exported diffusion-LM folder"):
        load_dlm_folder(tmp_path / "absent")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "best").exists()
