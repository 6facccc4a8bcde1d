"""The text-to-image policy's exports in diffusers' formats, and loading them back (`renorm export`, `renorm eval`).

Full fine-tuning: `transformer/` (`save_pretrained`), plus the pipeline's other components and `model_index.json`
when the policy was loaded from a pipeline (else `vae/`). LoRA: `pytorch_lora_weights.safetensors` in diffusers'
layout (`transformer.` keys, the LoRA config as metadata), which `pipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from modalities.text_to_image.latents import Arch
from toolkit.hf.policy import load_peft_adapters

LORA_FILE = "pytorch_lora_weights.safetensors"


def write_export(module: Any, arch: Arch, is_lora: bool, out: Path, pipeline: str | None, vae: Any) -> None:
    """Write the (possibly peft-wrapped) transformer `module` into the existing folder `out`."""
    if is_lora:
        save_lora_weights(module, arch, out)
        return
    module.save_pretrained(str(out / "transformer"))
    if pipeline is not None:
        copy_pipeline_components(pipeline, out, skip="transformer")
    elif callable(getattr(vae, "save_pretrained", None)):
        vae.save_pretrained(str(out / "vae"))


def load_export_into(module: Any, is_lora: bool, out: Path) -> None:
    """Load an export folder into the transformer `module` (its adapters with LoRA, its weights otherwise).

    Raises:
        ValueError: LoRA weights for a full-weight policy, or a full transformer for a LoRA one.
        FileNotFoundError: `out` holds neither.
    """
    lora_file = out / LORA_FILE
    if not (lora_file.is_file() or (out / "transformer").is_dir()):
        raise FileNotFoundError(f"{out} holds neither transformer/ nor {LORA_FILE}: pass `renorm export`'s OUT")
    if lora_file.is_file() != is_lora:
        found = "LoRA weights" if lora_file.is_file() else "a full transformer (a merged export?)"
        raise ValueError(f"{out} holds {found} but this config's policy is {'LoRA' if is_lora else 'full'}")
    if is_lora:
        from safetensors.torch import load_file

        saved = load_file(str(lora_file))
        load_peft_adapters(
            module, {"base_model.model." + k.removeprefix("transformer."): v for k, v in saved.items()}, lora_file
        )
        return
    dtype = next(module.parameters()).dtype
    module.load_state_dict(
        type(module).from_pretrained(str(out), subfolder="transformer", torch_dtype=dtype).state_dict()
    )


def save_lora_weights(peft_model: nn.Module, arch: Arch, out_dir: Path) -> None:
    """The adapters of a peft-wrapped transformer as diffusers LoRA weights (`pytorch_lora_weights.safetensors`)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    model: Any = peft_model
    layers = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    pipeline_cls: Any = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
    pipeline_cls.save_lora_weights(
        str(out_dir),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),  # rank, alpha and targets
    )


def copy_pipeline_components(source: str, out_dir: Path, skip: str) -> None:
    """Copy `model_index.json` and every component folder but `skip` of the pipeline `source` (folder or hub id)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download, snapshot_download

        names = _component_names(Path(hf_hub_download(source, "model_index.json")))
        patterns = ["model_index.json", *(f"{name}/*" for name in names if name != skip)]
        folder = Path(snapshot_download(source, allow_patterns=patterns))
    for name in _component_names(folder / "model_index.json"):
        if name == skip:
            continue
        if not (folder / name).is_dir():
            raise ValueError(f"pipeline {source}: model_index.json names component {name!r}, but {name}/ is missing")
        shutil.copytree(folder / name, out_dir / name)  # symlinks (a hub cache) are copied as files
    shutil.copy2(folder / "model_index.json", out_dir / "model_index.json")


def _component_names(model_index: Path) -> list[str]:
    """The components a `model_index.json` lists (entries `name: [library, class]` that are not null)."""
    index = json.loads(model_index.read_text(encoding="utf-8"))
    return [
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and None not in v and len(v) == 2
    ]
