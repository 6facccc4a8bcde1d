"""Trained flow-matching policies leave the toolkit in diffusers' formats: tiny.yaml trained for a step (LoRA as
shipped, and full fine-tuning) exports a `transformer/` folder or diffusers LoRA weights that load back with the trained
outputs; a policy loaded from a pipeline folder exports a whole pipeline `DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file
from torch import Tensor, nn

from modalities.text_to_image.policy import FlowMatchingPolicy
from modalities.text_to_image.text_encoding import PipelineTextEncoder
from modalities.text_to_image.tiny import build_tiny_flux, build_tiny_policy, build_tiny_sd3, build_tiny_vae
from tests.export_round_trip import assert_export_loads_back
from tests.modalities.text_to_image.test_t2i_policy import LORA, perturb_lora, tiny_config
from tests.tiny_pipelines import save_pipeline
from toolkit.io.export import export_checkpoint
from toolkit.train.runner import build_trainer, fit

LORA_FILE = "pytorch_lora_weights.safetensors"


def sd3_inputs(text_len: int = 16) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, text_len, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([250.0, 700.0]),
    }


def flux_inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(2, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([0.25, 0.7]),
        "img_ids": ids.reshape(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5, 3.5]),
    }


def output_of(module: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    module.eval()
    with torch.no_grad():
        out: Tensor = module(**inputs, return_dict=False)[0]
    return out


def train_one_step(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], Tensor]:
    config = tiny_config(run_dir, "trainer.num_steps=1", "trainer.prompts_per_step=1", *overrides)
    trainer = build_trainer(config)
    fit(trainer)
    return config, output_of(trainer.policy.module, sd3_inputs())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Tensor]:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    return (run_dir, *train_one_step(run_dir))


def test_full_fine_tune_writes_transformer_and_vae(tmp_path: Path) -> None:
    config, trained = train_one_step(tmp_path / "run", "policy.lora=null", "policy.reference=auto")
    out = tmp_path / "exported"
    export_checkpoint(config, tmp_path / "run", out)
    assert sorted(p.name for p in out.iterdir()) == ["transformer", "vae"]  # built in code: no model_index.json
    transformer = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    assert not torch.equal(output_of(build_tiny_sd3(0), sd3_inputs()), trained)  # the step moved the weights
    assert torch.equal(output_of(transformer, sd3_inputs()), trained)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    fresh = build_tiny_vae(0).state_dict()
    assert all(torch.equal(value, fresh[name]) for name, value in vae.state_dict().items())
    policy = assert_export_loads_back(config, tmp_path / "run", out)  # renorm eval --checkpoint OUT
    assert torch.equal(output_of(policy.module, sd3_inputs()), trained)


def test_lora_weights_load_into_a_transformer(lora_run: tuple[Path, dict[str, Any], Tensor], tmp_path: Path) -> None:
    run_dir, config, trained = lora_run
    export_checkpoint(config, run_dir, tmp_path / "lora")
    assert [p.name for p in (tmp_path / "lora").iterdir()] == [LORA_FILE]
    names = load_file(str(tmp_path / "lora" / LORA_FILE)).keys()
    assert names and all(n.startswith("transformer.") and ("lora_A" in n or "lora_B" in n) for n in names)
    base = build_tiny_sd3(0)
    assert not torch.equal(output_of(base, sd3_inputs()), trained)  # the adapters learned something
    # rank 4 and alpha 8 come from the LoRA config saved as metadata (without it diffusers would assume alpha = rank)
    base.load_lora_adapter(tmp_path / "lora", prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(output_of(base, sd3_inputs()), trained, atol=1e-6, rtol=1e-6)

    export_checkpoint(config, run_dir, tmp_path / "merged", merge_lora=True)
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged" / "transformer")
    torch.testing.assert_close(output_of(merged, sd3_inputs()), trained, atol=1e-5, rtol=1e-5)

    policy = assert_export_loads_back(config, run_dir, tmp_path / "lora")  # renorm eval --checkpoint OUT
    assert torch.equal(output_of(policy.module, sd3_inputs()), trained)
    with pytest.raises(ValueError, match="holds a full transformer .*policy is LoRA"):
        assert_export_loads_back(config, run_dir, tmp_path / "merged")


def test_flux_lora_and_full_exports(tmp_path: Path) -> None:
    policy = build_tiny_policy("flux", with_vae=False, lora=LORA)
    perturb_lora(policy)
    trained = output_of(policy.module, flux_inputs())
    policy.export(tmp_path / "lora")
    base = build_tiny_flux(0)
    base.load_lora_adapter(tmp_path / "lora", prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(output_of(base, flux_inputs()), trained, atol=1e-6, rtol=1e-6)

    full = build_tiny_policy("flux", seed=1, with_vae=False)
    (tmp_path / "full").mkdir()
    full.export(tmp_path / "full", dtype=torch.bfloat16)
    written = load_file(str(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "full" / "transformer", torch_dtype=torch.bfloat16)
    bf16 = {k: v.to(torch.bfloat16) for k, v in flux_inputs().items()}
    assert torch.equal(output_of(loaded, bf16), output_of(full.module, bf16))  # the policy was cast in place
    with pytest.raises(ValueError, match="merge_lora needs a LoRA policy"):
        full.export(tmp_path / "again", merge_lora=True)


# ---------------------------------------------------------------- a policy loaded from a pipeline folder
@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline folder: transformer, VAE, scheduler, two CLIP text towers (16 + 16 = 32 wide) and a T5."""
    return save_pipeline(tmp_path_factory.mktemp("pipeline") / "sd3", "sd3")


def from_pipeline(folder: Path, **kwargs: Any) -> FlowMatchingPolicy:
    return FlowMatchingPolicy.from_pretrained(
        str(folder), arch="sd3", component_dtype="float32", max_sequence_length=8, **kwargs
    )


def test_full_export_of_a_pipeline_policy_is_a_pipeline(sd3_pipeline: Path, tmp_path: Path) -> None:
    policy = from_pipeline(sd3_pipeline)
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = output_of(policy.module, sd3_inputs(24))
    policy.export(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model_index.json", "transformer", "vae", "text_encoder_3"}
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    assert torch.equal(output_of(pipeline.transformer, sd3_inputs(24)), trained)
    embeds, pooled = policy.encode_prompts(["a red apple"])
    again = PipelineTextEncoder(pipeline, "sd3", max_sequence_length=8).encode(["a red apple"])
    assert torch.equal(again[0], embeds) and torch.equal(again[1], pooled)  # the text encoders came along


def test_lora_export_of_a_pipeline_policy_loads_with_load_lora_weights(sd3_pipeline: Path, tmp_path: Path) -> None:
    policy = from_pipeline(sd3_pipeline, lora=LORA)
    perturb_lora(policy)
    trained = output_of(policy.module, sd3_inputs(24))
    policy.export(tmp_path)
    pipeline: Any = DiffusionPipeline.from_pretrained(sd3_pipeline)
    pipeline.load_lora_weights(tmp_path)
    torch.testing.assert_close(output_of(pipeline.transformer, sd3_inputs(24)), trained, atol=1e-6, rtol=1e-6)
