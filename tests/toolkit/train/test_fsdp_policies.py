"""FSDP2 for the video (Qwen2.5-VL) and text-to-image (SD3 + LoRA, flow matching) policies on two CPU ranks (gloo).

Per tiny config (shrunk by overrides), two launches from the same seed: 2-rank DDP (configs/accelerate/cpu_ddp.yaml,
`renorm train`, 2 steps) and 2-rank FSDP (configs/accelerate/cpu_fsdp.yaml, tests/data/cli/fsdp_train_check.py: the
same 2 steps, then a copy of the run killed after its step-1 checkpoint resumed to step 2, then sampling calls with
and without the gathered weights). test_fsdp.py covers the text policy, test_fsdp_copies.py the diffusion LM.

Measured here: FSDP and DDP weights agree bitwise after both steps (two ranks: each reduction adds the same two
numbers, in either order) and the per-step losses too; the pre-clip gradient norm may differ in the last bits (2e-10
at t2i's first step: FSDP sums the squares of each rank's shards first). The tests allow float tolerance for parity
and ask bitwise for the resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.toolkit.train.test_fsdp import ddp_and_fsdp_runs, weights
from toolkit.io.checkpoint import read_manifest

ROOT = Path(__file__).resolve().parents[3]
STEPS = ("checkpoints/step_00000001", "checkpoints/step_00000002")
COMMON = ["trainer.prompts_per_step=2", "trainer.group_size=2", "trainer.progress=false", "trainer.keep_last=3"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "video": (
        "configs/medical_video/tiny.yaml",
        [
            "sampler.max_new_tokens=4",
            "objective.entropy_coef=0.01",  # a gradient through the whole model although every advantage is 0 here
            "objective.kl_coef=0.05",  # the frozen reference copy is taken, sharded and scored
        ],
    ),
    "t2i": ("configs/text_to_image/tiny.yaml", ["sampler.num_steps=3"]),  # 2 minibatches: 2 optimizer steps a step
}
# FSDP units each policy must have (accelerate's transformer auto-wrap; FSDP's class prefix dropped).
UNITS = {
    "video": {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Qwen2_5_VisionTransformerPretrainedModel"},
    "t2i": {"JointTransformerBlock"},
}
COMPARED = ("loss/policy", "loss/kl", "loss/entropy", "optim/grad_norm")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name: str = request.param
    config, overrides = CONFIGS[name]
    train = ["train", str(ROOT / config), *COMMON, *overrides]
    return {"name": name, **ddp_and_fsdp_runs(tmp_path_factory.mktemp(f"fsdp-{name}"), train)}


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_fsdp_training_matches_ddp(runs: dict[str, Any]) -> None:
    seen = [(r["rank"], r["world_size"], r["engine"], r["step"]) for r in runs["reports"]]
    assert seen == [(0, 2, "fsdp", 2), (1, 2, "fsdp", 2)]
    for step in STEPS:
        ddp, fsdp = weights(runs["ddp"], step), weights(runs["fsdp"], step)
        assert ddp.keys() == fsdp.keys() and all(ddp[k].shape == fsdp[k].shape for k in ddp)
        worst = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
        assert worst < 1e-6, f"{runs['name']} {step}: FSDP and DDP weights differ by {worst}"
    first, last = weights(runs["ddp"], STEPS[0]), weights(runs["ddp"], STEPS[1])
    assert max(float((last[k] - first[k]).abs().max()) for k in last) > 1e-4  # the weights really moved
    ddp_rows, fsdp_rows = metrics(runs["ddp"]), metrics(runs["fsdp"])
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in fsdp_rows] == [1, 2]
    for ddp_row, fsdp_row in zip(ddp_rows, fsdp_rows, strict=True):
        for key in COMPARED:
            assert math.isclose(ddp_row[key], fsdp_row[key], rel_tol=1e-5, abs_tol=1e-9), (runs["name"], key)
    assert all(row["optim/grad_norm"] > 0 for row in fsdp_rows)


@pytest.mark.integration
def test_fsdp_resume_from_the_step_1_checkpoint_is_exact(runs: dict[str, Any]) -> None:
    manifest = set(read_manifest(runs["fsdp"] / STEPS[0])["files"])
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= manifest  # resumed from shards
    uninterrupted, resumed = weights(runs["fsdp"], STEPS[1]), weights(runs["killed"], STEPS[1])
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted), runs["name"]
    rows = metrics(runs["killed"])
    assert [r["step"] for r in rows] == [1, 2]
    assert all(rows[1][key] == metrics(runs["fsdp"])[1][key] for key in COMPARED), runs["name"]


@pytest.mark.integration
def test_fsdp_units_and_sampling_with_and_without_gathered_weights(runs: dict[str, Any]) -> None:
    """Each policy's blocks are FSDP units (the reference copy sharded the same); sampling works under
    `gathered_weights` (one all-gather per unit) and without it. The video sampling call without it failed before
    the vision tower was its own unit: `generate` runs the tower outside the root forward (DTensor weights)."""
    for report in runs["reports"]:
        assert UNITS[runs["name"]] <= set(report["fsdp_unit_classes"]), report
        assert report["reference_is_copy"] == (runs["name"] == "video"), report  # t2i: LoRA adapters off
        assert report["reference_units"] == report["fsdp_units"], report
        gathered = report["all_gathers_gathered_6_tokens"]
        assert 0 < gathered <= report["fsdp_units"] and gathered == report["all_gathers_gathered_2_tokens"], report
        assert report["all_gathers_6_tokens"] > gathered, report


# ---------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("lora", [None, {"r": 2}])
def test_video_policy_names_its_vision_tower_as_an_fsdp_unit(lora: dict[str, int] | None) -> None:
    """What accelerate's transformer auto-wrap reads (`_no_split_modules`, through a PEFT wrapper too) names the
    tower and its blocks, each a class of this model; the model class's own set is left as it was."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from modalities.medical_video.policy import VideoVLMPolicy
    from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(seed=0)
    module: Any = VideoVLMPolicy(model, build_tiny_processor(), lora=lora).module
    names = set(module._no_split_modules)
    assert UNITS["video"] <= names
    assert all(get_module_class_from_name(module, name) is not None for name in names)
    assert "Qwen2_5_VisionTransformerPretrainedModel" not in set(type(model)._no_split_modules or ())
