"""Load MDLM-format checkpoints (kuleshov-group/mdlm, DUO, DiDi-Instruct teachers) into our `DiT`.

What maps: our DiT uses MDLM's module names, so every key `backbone.<name>` (Lightning `.ckpt` "state_dict",
a plain state dict, or a safetensors file; the `backbone.` prefix is optional) maps to `<name>` unchanged:
`vocab_embed.embedding`, `sigma_map.mlp.{0,2}.*`, `blocks.<i>.{norm1,norm2}.weight`, `blocks.<i>.attn_qkv.weight`,
`blocks.<i>.attn_out.weight`, `blocks.<i>.mlp.{0,2}.*`, `blocks.<i>.adaLN_modulation.*`,
`output_layer.{norm_final.weight,linear.*,adaLN_modulation.*}`. Dropped: `rotary_emb.inv_freq` (recomputed) and
non-backbone keys (`noise.*`, the Lightning EMA, optimizer state). The config is inferred from the shapes; heads
default to hidden/64 (12/16/20 for small/medium/large). `use_ema` reads a Lightning checkpoint's EMA
`shadow_params`, which MDLM stores in `backbone.parameters()` order (our parameter order is the same).

A Lightning `.ckpt` pickles more than tensors: MDLM's `hyper_parameters` hold an OmegaConf config and the tokenizer
object. They load with `torch.load(weights_only=True)`, the objects of data-container packages (`CONTAINER_PACKAGES`)
allow-listed as inert `OpaqueObject`s that keep their pickled arguments and state: no code of theirs (or the file's)
runs, and only tensors are read. A file naming any other class or function is refused: nothing here unpickles code
(convert such a file to safetensors where you trust it).

The exported layout (`renorm export` of a DiDi student, `save_dlm_folder`): `model.safetensors` (the DiT state dict,
our names), `config.json` ({"format": "renorm-dlm", "format_version": 1, "dit_config", "schedule" (class name),
"schedule_args", "time_conditioning", "final", "weights": "ema"|"student", "dtype"}) and, when known, the tokenizer's
`save_pretrained` files. `load_dlm_folder` reads it; `load_dlm` takes it or a `train-teacher` run/checkpoint.
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import typing
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modalities.diffusion_lm.dit import DiT, DiTConfig
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.schedules import make_schedule
from modalities.diffusion_lm.teacher import load_teacher, teacher_meta

PREFIX = "backbone."
DROPPED = ("rotary_emb.inv_freq",)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
DLM_FORMAT, DLM_FORMAT_VERSION = "renorm-dlm", 1
DLM_WEIGHTS, DLM_CONFIG = "model.safetensors", "config.json"
SCHEDULE_NAMES = {"LogLinearSchedule": "loglinear", "LinearSchedule": "linear", "CosineSchedule": "cosine"}


# Packages whose pickled objects a Lightning checkpoint carries as data (configs, tokenizers, loop state).
CONTAINER_PACKAGES = (
    "omegaconf",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "tokenizers",
    "numpy",
)
# Plain types such objects' state names (OmegaConf metadata: `object_type=dict`, `ref_type=typing.Any`, ...).
PLAIN_GLOBALS: dict[str, Any] = {
    f"{t.__module__}.{t.__qualname__}": t
    for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bool, collections.OrderedDict)
} | {"collections.defaultdict": collections.defaultdict, "typing.Any": typing.Any}


class OpaqueObject:
    """An object of a class a checkpoint names but that is never imported: its pickled arguments and state as data."""

    qualified_name = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


def container_globals(path: Path) -> list[Any]:
    """(object, name) for `torch.serialization.safe_globals`: every non-tensor global of the zip checkpoint at `path`.

    Plain types map to themselves and classes of `CONTAINER_PACKAGES` to inert `OpaqueObject` subclasses.

    Raises:
        ValueError: the file names another class or function (refused: loading it could run code).
    """
    allowed: list[Any] = []
    unknown: list[str] = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        if name in PLAIN_GLOBALS:
            allowed.append((PLAIN_GLOBALS[name], name))
        elif name.split(".")[0] in CONTAINER_PACKAGES:
            allowed.append((type(name.rsplit(".", 1)[-1], (OpaqueObject,), {"qualified_name": name}), name))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"{path} pickles objects beyond tensors and data containers ({', '.join(sorted(unknown))}), so it is not "
            "loaded (that could run code from the file); save its state dict as .safetensors where you trust it"
        )
    return allowed


def _read_raw(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    try:
        with torch.serialization.safe_globals(_safe_globals(path)):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects beyond tensors and data containers, so it is not loaded (that could run "
            "code from the file); save its state dict as .safetensors where you trust it"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a checkpoint dict or a state dict, got {type(loaded).__name__}")
    return loaded


def _safe_globals(path: Path) -> list[Any]:
    """`container_globals` of a zip-format file; none for a legacy file (its tensors load without help)."""
    return container_globals(path) if zipfile.is_zipfile(path) else []


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
    **config_overrides: Any,
) -> DiT:
    """A DiT holding an MDLM-format checkpoint's backbone (see the module docstring for the key mapping).

    Args:
        path: `.ckpt` (Lightning), `.pt`/`.bin` state dict or `.safetensors`.
        use_ema: load the EMA weights of a Lightning checkpoint instead of the raw ones.
        num_heads: attention heads (not recoverable from shapes); default hidden/64.
        config_overrides: other DiTConfig fields (max_length, dropout, time_conditioning, mask_id).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"MDLM checkpoint not found: {file}")
    state = mdlm_backbone_state(_read_raw(file), use_ema)
    model = DiT(infer_dit_config(state, num_heads, **config_overrides))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{file}: keys do not map onto the DiT; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_mdlm_checkpoint(model: DiT, path: str | Path) -> None:
    """Write `model` as an MDLM-style checkpoint {"state_dict": {"backbone.<name>": tensor}} (for interchange)."""
    torch.save({"state_dict": {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}}, Path(path))


def save_dlm_folder(
    model: MaskedDiffusionLM,
    out_dir: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a DiT-backed masked diffusion LM in the exported layout (module docstring) into the folder `out_dir`.

    Args:
        model: the model to write (its backbone must be our `DiT`).
        tokenizer: saved with `save_pretrained` beside the weights (None: none); see `check_tokenizer_fits`.
        dtype: cast the written weights (None keeps them).
        extra: more JSON fields for config.json (e.g. {"weights": "ema"}).
    """
    import safetensors.torch

    backbone = model.backbone
    if not isinstance(backbone, DiT):
        raise ValueError(
            f"only DiT backbones export to the renorm-dlm layout; this model's is {type(backbone).__name__}"
        )
    check_tokenizer_fits(tokenizer, backbone.config.vocab_size)
    out = Path(out_dir)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in backbone.state_dict().items()}
    safetensors.torch.save_file(state, str(out / DLM_WEIGHTS), metadata={"format": "pt"})
    meta = {k: v for k, v in teacher_meta(model).items() if k != "kind"}
    written = next(iter(state.values())).dtype
    config = {"format": DLM_FORMAT, "format_version": DLM_FORMAT_VERSION, **meta, "final": model.final}
    config |= {"dtype": str(written).removeprefix("torch."), **dict(extra or {})}
    (out / DLM_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def check_tokenizer_fits(tokenizer: Any, vocab_size: int) -> None:
    """ValueError unless `tokenizer` (None passes) has at most `vocab_size` ids: the word-level tokenizer holds the
    mask id (equal sizes), GPT-2's does not (MDLM appends the mask: one id fewer); more ids are another model's."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} ids, more than the model's vocab_size {vocab_size}: another model's "
            "tokenizer (pass the one the model was trained with)"
        )


def is_dlm_folder(path: str | Path) -> bool:
    """True when `path` is a folder holding an exported renorm-dlm `config.json`."""
    file = Path(path) / DLM_CONFIG
    if not file.is_file():
        return False
    try:
        return bool(json.loads(file.read_text(encoding="utf-8")).get("format") == DLM_FORMAT)
    except (ValueError, AttributeError):
        return False


def load_dlm_folder(
    path: str | Path, device: torch.device | str = "cpu", mixed_precision: str = "no"
) -> MaskedDiffusionLM:
    """The masked diffusion LM of an exported folder (`save_dlm_folder`), in fp32 on `device`, in eval mode."""
    folder = Path(path)
    if not is_dlm_folder(folder):
        raise ValueError(f"{folder} is not an exported diffusion-LM folder (no {DLM_CONFIG} with format {DLM_FORMAT})")
    config = json.loads((folder / DLM_CONFIG).read_text(encoding="utf-8"))
    if config.get("format_version") != DLM_FORMAT_VERSION:
        raise ValueError(f"{folder}: format_version {config.get('format_version')} is not {DLM_FORMAT_VERSION}")
    import safetensors.torch

    backbone = DiT(DiTConfig(**config["dit_config"]))
    backbone.load_state_dict(safetensors.torch.load_file(str(folder / DLM_WEIGHTS), device="cpu"))
    model = MaskedDiffusionLM(
        backbone,
        schedule=make_schedule(SCHEDULE_NAMES[config["schedule"]], **config["schedule_args"]),
        time_conditioning=bool(config["time_conditioning"]),
        mixed_precision=mixed_precision,
        final=config["final"],
    )
    return model.to(device).eval()


def load_dlm(path: str | Path, device: torch.device | str = "cpu", mixed_precision: str = "no") -> MaskedDiffusionLM:
    """An exported folder (`load_dlm_folder`) or a `train-teacher` run or checkpoint directory (`load_teacher`)."""
    if is_dlm_folder(path):
        return load_dlm_folder(path, device, mixed_precision)
    return load_teacher(path, device, mixed_precision)


def load_dlm_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in an exported folder, or None when it holds none (or `path` is not one)."""
    if not is_dlm_folder(path) or not (Path(path) / "tokenizer.json").is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
