"""Load MDLM-format checkpoints (kuleshov-group/mdlm, DUO, DiDi-Instruct teachers) into our `DiT`.

What maps: our DiT uses MDLM's module names, so every key `backbone.<name>` (Lightning `.ckpt` "state_dict",
a plain state dict, or a safetensors file; the `backbone.` prefix is optional) maps to `<name>` unchanged:
`vocab_embed.embedding`, `sigma_map.mlp.{0,2}.*`, `blocks.<i>.{norm1,norm2}.weight`, `blocks.<i>.attn_qkv.weight`,
`blocks.<i>.attn_out.weight`, `blocks.<i>.mlp.{0,2}.*`, `blocks.<i>.adaLN_modulation.*`,
`output_layer.{norm_final.weight,linear.*,adaLN_modulation.*}`. Dropped: `rotary_emb.inv_freq` (recomputed) and
non-backbone keys (`noise.*`, the Lightning EMA, optimizer state). The config is inferred from the shapes; heads
default to hidden/64 (12/16/20 for small/medium/large). `use_ema` reads a Lightning checkpoint's EMA
`shadow_params`, which MDLM stores in `backbone.parameters()` order (our parameter order is the same).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modalities.diffusion_lm.dit import DiT, DiTConfig

PREFIX = "backbone."
DROPPED = ("rotary_emb.inv_freq",)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _read_raw(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects beyond tensors (Lightning .ckpt hyper-parameters); pass "
            "allow_pickle=True only for a checkpoint you trust"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a checkpoint dict or a state dict, got {type(loaded).__name__}")
    return loaded


def mdlm_backbone_state(raw: dict[str, Any], use_ema: bool = False) -> dict[str, Tensor]:
    """Backbone tensors of an MDLM checkpoint dict, keys with the `backbone.` prefix stripped."""
    state = raw.get("state_dict", raw)
    has_prefix = any(k.startswith(PREFIX) for k in state)
    backbone = {
        (k[len(PREFIX) :] if has_prefix else k): v
        for k, v in state.items()
        if isinstance(v, Tensor) and (k.startswith(PREFIX) or not has_prefix)
    }
    backbone = {k: v for k, v in backbone.items() if k not in DROPPED}
    if "vocab_embed.embedding" not in backbone:
        raise ValueError("not an MDLM DiT checkpoint: no (backbone.)vocab_embed.embedding tensor")
    if use_ema:
        shadow = (raw.get("ema") or {}).get("shadow_params")
        if not shadow:
            raise ValueError("use_ema=True but the checkpoint has no ema.shadow_params")
        backbone = _apply_shadow(backbone, list(shadow))
    return backbone


def _apply_shadow(state: dict[str, Tensor], shadow: list[Tensor]) -> dict[str, Tensor]:
    config = infer_dit_config(state)
    with torch.device("meta"):
        names = [name for name, _ in DiT(config).named_parameters()]
    if len(shadow) < len(names):
        raise ValueError(f"ema.shadow_params has {len(shadow)} tensors, the DiT has {len(names)} parameters")
    out = dict(state)
    for name, tensor in zip(names, shadow, strict=False):
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(
                f"EMA tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(state[name].shape)}"
            )
        out[name] = tensor
    return out


def infer_dit_config(state: dict[str, Tensor], num_heads: int | None = None, **overrides: Any) -> DiTConfig:
    """DiTConfig from backbone tensor shapes (vocab, hidden, blocks, cond_dim, mlp_ratio); heads = hidden/64."""
    vocab_size, hidden = state["vocab_embed.embedding"].shape
    num_blocks = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    cond_dim = state["sigma_map.mlp.0.weight"].shape[0]
    mlp_ratio = state["blocks.0.mlp.0.weight"].shape[0] // hidden if num_blocks else 4
    fields: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "num_blocks": num_blocks,
        "num_heads": num_heads or max(1, int(hidden) // 64),
        "cond_dim": int(cond_dim),
        "mlp_ratio": int(mlp_ratio),
    }
    return DiTConfig(**{**fields, **overrides})


def load_mdlm_checkpoint(
    path: str | Path,
    use_ema: bool = False,
    num_heads: int | None = None,
    allow_pickle: bool = False,
    **config_overrides: Any,
) -> DiT:
    """A DiT holding an MDLM-format checkpoint's backbone (see the module docstring for the key mapping).

    Args:
        path: `.ckpt` (Lightning), `.pt`/`.bin` state dict or `.safetensors`.
        use_ema: load the EMA weights of a Lightning checkpoint instead of the raw ones.
        num_heads: attention heads (not recoverable from shapes); default hidden/64.
        allow_pickle: unpickle arbitrary objects (needed for Lightning `.ckpt` files; runs code from the file,
            so only for trusted checkpoints). False loads tensors and plain containers only.
        config_overrides: other DiTConfig fields (max_length, dropout, time_conditioning, mask_id).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"MDLM checkpoint not found: {file}")
    state = mdlm_backbone_state(_read_raw(file, allow_pickle), use_ema)
    model = DiT(infer_dit_config(state, num_heads, **config_overrides))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{file}: keys do not map onto the DiT; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_mdlm_checkpoint(model: DiT, path: str | Path) -> None:
    """Write `model` as an MDLM-style checkpoint {"state_dict": {"backbone.<name>": tensor}} (for interchange)."""
    torch.save({"state_dict": {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}}, Path(path))
