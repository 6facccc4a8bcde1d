"""Trained video-VLM policies leave the toolkit: tiny.yaml trained for 2 steps (full fine-tuning and LoRA) is exported
and loaded back with transformers / peft, giving the trained policy's logits on a fixed video + text input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from tests.export_round_trip import assert_export_loads_back
from tests.modalities.medical_video.test_video_policy import tiny_config
from toolkit.config import instantiate
from toolkit.io.export import export_checkpoint
from toolkit.train.runner import build_trainer, fit

# The tiny model's default eos_logit is an lm_head bias Qwen2.5-VL does not have: exported models are built without it.
NO_BIAS = "policy.model.eos_logit=null"
LORA = "policy.lora={r: 4, lora_alpha: 8}"
DIGITS = {
    "digits": {
        "_component_": "rewards.base.FunctionReward",
        "fn": {"_component_": "tests.modalities.medical_video.test_video_policy.digit_fraction", "_partial_": True},
    }
}
BOOKKEEPING = {"COMPLETE", "objects.pt", "rng.pt", "meta.json"}


@dataclass
class TrainedRun:
    run_dir: Path
    config: dict[str, Any]
    inputs: dict[str, Tensor]  # a chat-templated question about a 4-frame video, processed by the tiny processor
    logits: Tensor  # [1, L, V] the trained policy's


def fixed_inputs(processor: Any) -> dict[str, Tensor]:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "where is the box?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    video = torch.arange(4 * 56 * 56 * 3, dtype=torch.float32).reshape(4, 56, 56, 3).remainder(251).to(torch.uint8)
    # Frames already sized as the sampler sizes them (no resize, no frame sampling), as VideoSampler calls it.
    kwargs = {"do_resize": False, "do_sample_frames": False, "cap_pixels_per_frame": False}
    return dict(processor(text=[text], videos=[video.numpy()], videos_kwargs=kwargs, return_tensors="pt"))


def logits_of(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    model.eval()
    with torch.no_grad():
        out: Tensor = model(**inputs, use_cache=False).logits
    return out


def train(run_dir: Path, *overrides: str) -> TrainedRun:
    config = tiny_config(run_dir, "trainer.num_steps=2", NO_BIAS, *overrides)
    config["rewards"] = DIGITS  # a reward that varies between a random model's answers, so the weights move
    trainer = build_trainer(config)
    fit(trainer)
    policy: Any = trainer.policy
    inputs = fixed_inputs(policy.processor)
    assert (inputs["input_ids"] == policy.video_token_id).sum() == 8  # 4 frames of 56x56: 2 x 4 merged tokens
    return TrainedRun(Path(config["trainer"]["run_dir"]), config, inputs, logits_of(policy.module, inputs))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train(tmp_path_factory.mktemp("lora"), LORA)


def test_full_model_and_processor_load_with_auto_classes(full_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    checkpoint = export_checkpoint(full_run.config, full_run.run_dir, out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files and not files & BOOKKEEPING

    model = AutoModelForImageTextToText.from_pretrained(out)
    # transformers writes Qwen2.5-VL's hub key layout (model.layers.*, visual.*) and maps it back on loading.
    trained, loaded = load_file(str(checkpoint / "model.safetensors")), model.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    base = instantiate(full_run.config["policy"]["model"], where="policy.model")
    assert not torch.equal(logits_of(base, full_run.inputs), full_run.logits)  # the run changed the weights
    assert torch.equal(logits_of(model, full_run.inputs), full_run.logits)  # exact in fp32, video input included
    assert model.generation_config.eos_token_id == 3

    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == build_tiny_processor().chat_template
    again = fixed_inputs(processor)
    assert again.keys() == full_run.inputs.keys()
    assert all(torch.equal(again[k], full_run.inputs[k]) for k in again)


def test_bf16_export(full_run: TrainedRun, tmp_path: Path) -> None:
    export_checkpoint(full_run.config, full_run.run_dir, tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in full_run.inputs.items()}
    torch.testing.assert_close(logits_of(model, inputs).float(), full_run.logits, atol=0.1, rtol=0.05)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_lora_adapter_folder_and_merged_model(lora_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    export_checkpoint(lora_run.config, lora_run.run_dir, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "chat_template.jinja"} <= files
    assert "config.json" not in files
    names = load_file(str(out / "adapter_model.safetensors")).keys()
    assert names and all("lora_" in n and "visual" not in n for n in names)
    base = instantiate(lora_run.config["policy"]["model"], where="policy.model")
    assert not torch.equal(logits_of(base, lora_run.inputs), lora_run.logits)  # the adapters learned something
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, out), lora_run.inputs), lora_run.logits)

    merged = tmp_path / "merged"
    export_checkpoint(lora_run.config, lora_run.run_dir, merged, merge_lora=True)
    assert not any("lora" in name for name in load_file(str(merged / "model.safetensors")))
    model = AutoModelForImageTextToText.from_pretrained(merged)
    # W + s·BA is rounded once where the adapter path rounds x·A·B: equal up to fp32 rounding.
    torch.testing.assert_close(logits_of(model, lora_run.inputs), lora_run.logits, atol=1e-5, rtol=1e-5)


def test_weights_the_architecture_lacks_are_refused(tmp_path: Path) -> None:
    policy = VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor())  # eos_logit: an lm_head bias
    with pytest.raises(ValueError, match=r"holds weights its architecture lacks: \['lm_head.bias'\]"):
        policy.export(tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="merge_lora needs a LoRA policy"):
        policy.export(tmp_path, merge_lora=True)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_eval_takes_the_export_folder(full_run: TrainedRun, lora_run: TrainedRun, tmp_path: Path) -> None:
    for run, name in ((full_run, "full"), (lora_run, "lora")):
        export_checkpoint(run.config, run.run_dir, tmp_path / name)
        policy = assert_export_loads_back(run.config, run.run_dir, tmp_path / name)
        assert torch.equal(logits_of(policy.module, run.inputs), run.logits)
