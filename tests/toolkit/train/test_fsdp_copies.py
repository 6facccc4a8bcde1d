"""Copies of the policy's weights under FSDP2 on two CPU ranks (gloo): DiDi's EMA and the frozen reference.

One `accelerate launch` of tests/data/cli/fsdp_copies_check.py trains the tiny DiDi config (fixed discriminator:
its self-training refuses several processes) for 2 steps, resumes a copy killed during step 2, then prepares a text
policy with its reference. The EMA is checked against the one-process EMA rule applied to the same student weights,
through resume and export; the reference against the policy's initial weights and the memory it takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.toolkit.train.test_fsdp import launch
from toolkit import cli
from toolkit.config import instantiate, load_config
from toolkit.io.checkpoint import MODEL_FILE, OBJECTS_FILE
from toolkit.io.integrity import safe_torch_load

ROOT = Path(__file__).resolve().parents[3]
DIDI = ROOT / "configs" / "diffusion_lm" / "tiny.yaml"
OVERRIDES = ["rewards.discriminator.train=false", "trainer.progress=false", "trainer.keep_last=3"]
STEP_1, STEP_2 = "checkpoints/step_00000001", "checkpoints/step_00000002"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-copies")
    script = str(ROOT / "tests" / "data" / "cli" / "fsdp_copies_check.py")
    launch("cpu_fsdp.yaml", script, str(out), "train", str(DIDI), *OVERRIDES)
    return out


def reports(run: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(run.glob("report-rank*.json"))]


def saved_ema(checkpoint: Path) -> dict[str, torch.Tensor]:
    ema: dict[str, torch.Tensor] = safe_torch_load(checkpoint / OBJECTS_FILE)["policy_state"]["ema"]
    return ema


@pytest.mark.integration
def test_sharded_ema_matches_the_one_process_ema_and_updates_without_collectives(run: Path) -> None:
    policy = instantiate(load_config(run / "didi" / "config.yaml")["policy"], where="policy")
    initial = {k: v.clone() for k, v in policy.ema.state_dict().items()}  # taken from the seeded initial student
    for step in (STEP_1, STEP_2):
        student = load_file(str(run / "didi" / step / MODEL_FILE))
        policy.module.load_state_dict(student)  # the FSDP run's student after this step
        policy.after_optimizer_step()  # the one-process EMA rule
        gathered = saved_ema(run / "didi" / step)
        assert gathered.keys() == initial.keys()
        worst = max(float((gathered[k] - v).abs().max()) for k, v in policy.ema.state_dict().items())
        assert worst < 1e-7, f"{step}: the FSDP EMA differs from the one-process EMA by {worst}"
        moved = max(float((gathered[k] - student[k]).abs().max()) for k in student)
        assert moved > 1e-5  # the EMA lags the student: not a copy of it
    for report in reports(run):
        assert report["step"] == 2
        assert report["ema_local_numel"] <= report["ema_numel"] // 2 + 1000, report  # this rank's shards only
        assert report["ema_update_collectives"] == 0, report  # a lerp of local shards
        assert report["ema_gather_collectives"] > 0, report  # the counter does count collectives


@pytest.mark.integration
def test_sharded_ema_resumes_exactly_from_its_shards(run: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(run / "didi" / STEP_1 / "sharded")).read_metadata().state_dict_metadata
    assert any(key.startswith("policy_state.ema.") for key in keys)
    uninterrupted, resumed = saved_ema(run / "didi" / STEP_2), saved_ema(run / "didi-killed" / STEP_2)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert safe_torch_load(run / "didi-killed" / STEP_2 / OBJECTS_FILE)["policy_state"]["num_updates"] == 2


@pytest.mark.integration
def test_export_of_an_fsdp_checkpoint_writes_the_ema(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert cli.main(["export", str(run / "didi" / "config.yaml"), str(run / "didi" / STEP_2), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["weights"] == "ema"
    written, ema = load_file(str(out / "model.safetensors")), saved_ema(run / "didi" / STEP_2)
    assert written.keys() == ema.keys() and all(torch.equal(written[k], ema[k]) for k in ema)


@pytest.mark.integration
def test_reference_is_filled_from_the_policy_shards_without_a_full_copy(run: Path) -> None:
    for report in reports(run):
        reference = report["reference"]
        skeleton, full_copy = reference["skeleton"], reference["full_copy"]
        weights = skeleton["weights"]
        assert reference["reference_equals_initial"] and reference["snapshot_is_reference"], report
        assert reference["logits_max_diff"] == 0.0, report
        assert skeleton["reference_taken"] == 0, report  # what init_reference() returned held no storage
        assert skeleton["reference_local"] <= 0.55 * weights, report  # this rank's shards after prepare
        # Peak host memory over take + prepare. Both include the policy's own new shards while its whole weights are
        # still alive (1/2 of them on 2 ranks); a whole copy of the reference adds its full size on top.
        assert skeleton["peak_extra"] <= 0.65 * weights, report
        assert full_copy["peak_extra"] - skeleton["peak_extra"] >= 0.85 * weights, report
