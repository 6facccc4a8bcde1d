"""Helpers for policies over Hugging Face token models (causal LMs and VLMs) that modalities share.

Option checks and reference-mode resolution, LoRA wrapping, dropout removal, trainable-state extraction.
transformers and peft are imported inside the functions that need them, so `import toolkit` stays light.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap

ReferenceMode = Literal["auto", "copy", "adapters_off", "none"]
DTypeName = Literal["float32", "bfloat16", "auto"]
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_choice(name: str, value: str, choices: Any) -> None:
    """ValueError naming `value` and the allowed ones unless `value` is one of the Literal `choices`."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def check_policy_options(
    dtype: str, reference: str, temperature: float, top_p: float, micro_batch_size: int | None, is_lora: bool
) -> ReferenceMode:
    """Validate a token-model policy's shared options; returns the resolved reference mode.

    "auto" resolves to "adapters_off" with LoRA and "copy" for full fine-tuning; "adapters_off" needs LoRA.
    """
    check_choice("dtype", dtype, DTypeName)
    check_choice("reference", reference, ReferenceMode)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    if reference == "adapters_off" and not is_lora:
        raise ValueError("reference='adapters_off' needs lora; use 'copy' or 'auto' for full fine-tuning")
    if reference == "auto":
        return "adapters_off" if is_lora else "copy"
    mode: ReferenceMode = reference  # type: ignore[assignment]  # checked against ReferenceMode above
    return mode


def reference_log_probs(
    mode: ReferenceMode, module: nn.Module, reference: Callable[[], nn.Module], score: Callable[[nn.Module], Tensor]
) -> Tensor:
    """`score` under the reference weights: `module` with its adapters off, or the module `reference()` gives."""
    if mode == "none":
        raise ValueError("this policy was built with reference='none'; set reference to 'auto' for a KL term")
    if mode == "adapters_off":
        with module.disable_adapter():  # type: ignore[operator]
            return score(module)
    return score(reference())


def bf16_autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when enabled and `device` is CUDA; a no-op otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def zero_dropout(module: nn.Module) -> None:
    """Set every dropout probability in `module` to 0 (so train-mode re-scoring equals sampling)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if isinstance(getattr(sub, "attention_dropout", None), float):
            setattr(sub, "attention_dropout", 0.0)  # noqa: B010 (HF attention modules keep a float)


def wrap_lora(base: Any, lora: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> nn.Module:
    """`base` wrapped by peft with `LoraConfig(**defaults, **lora)`; task_type defaults to CAUSAL_LM."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"task_type": "CAUSAL_LM", **dict(defaults or {}), **dict(lora)})
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias; not actionable here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped: nn.Module = get_peft_model(base, config)
    return wrapped


def trainable_state_dict(module: nn.Module, is_lora: bool) -> dict[str, Tensor]:
    """The weights a trainer updates: the trainable (LoRA) parameters, else the full state dict.

    Names carry no DDP wrapper's "module." prefix, as Trainer.load expects.
    """
    bare = unwrap(module)
    if not is_lora:
        return bare.state_dict()
    return {name: p.detach() for name, p in bare.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, is_lora: bool, state: Mapping[str, Tensor]) -> None:
    """Load what `trainable_state_dict` returned: the full state dict, or exactly the LoRA adapters.

    Raises:
        ValueError: LoRA adapter names that differ from the module's (missing or unexpected).
    """
    if not is_lora:
        unwrap(module).load_state_dict(state)
        return
    expected = set(trainable_state_dict(module, is_lora))
    if set(state) != expected:
        raise ValueError(
            f"LoRA state keys differ: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    unwrap(module).load_state_dict(dict(state), strict=False)


def export_module(module: nn.Module, is_lora: bool, merge_lora: bool, dtype: torch.dtype | None) -> Any:
    """The bare Hugging Face model a policy exports: its LoRA adapters merged when asked, cast to `dtype`.

    Raises:
        ValueError: `merge_lora` for a policy that trains all weights.
    """
    bare: Any = unwrap(module)
    if merge_lora:
        if not is_lora:
            raise ValueError("merge_lora needs a LoRA policy; this one trains all weights (export it as is)")
        bare = bare.merge_and_unload()
    if dtype is not None:
        bare.to(dtype)
    return bare


def unwrap_model(module: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the module itself otherwise)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def load_peft_adapters(peft_model: nn.Module, state: Mapping[str, Tensor], source: Any) -> None:
    """Set a peft model's adapters from `state` under PEFT's saved names (`get_peft_model_state_dict`'s keys).

    Raises:
        ValueError: names that differ from the model's adapters (another rank, targets or base model).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model: Any = peft_model
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"{source}: the LoRA adapters differ from this config's (rank, targets or base model?): "
            f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
        )
    set_peft_model_state_dict(model, dict(state))


def load_hf_export(module: nn.Module, is_lora: bool, folder: Path) -> None:
    """Load a folder a token-model policy's `export` wrote (the inverse of `export_module` + `save_pretrained`).

    A PEFT adapter folder (`adapter_config.json`) goes into a LoRA policy's adapters; a transformers model
    folder (`config.json`) replaces a full-weight policy's weights, loaded with the model class's own
    `from_pretrained` (its key conversions, tied weights and shards included).

    Raises:
        ValueError: an adapter folder for a full-weight policy, a full (e.g. merged) model for a LoRA policy,
            or adapters of another shape.
        FileNotFoundError: a folder that is neither.
    """
    from safetensors.torch import load_file

    bare: Any = unwrap(module)
    if (folder / "adapter_config.json").is_file():
        if not is_lora:
            raise ValueError(
                f"{folder} holds LoRA adapters (adapter_config.json) but this config's policy trains all weights: "
                "evaluate it with the run's LoRA settings (policy.lora)"
            )
        load_peft_adapters(bare, load_file(str(folder / "adapter_model.safetensors")), folder)
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is neither a PEFT adapter folder (adapter_config.json) nor a transformers model folder "
            "(config.json): pass `renorm export`'s output, a checkpoint or a run dir"
        )
    if is_lora:
        raise ValueError(
            f"{folder} holds a full model (a merged export?) but this config's policy is LoRA: evaluate it with "
            "policy.lora unset and the policy's model loaded from the folder"
        )
    loaded = type(bare).from_pretrained(str(folder), torch_dtype=next(bare.parameters()).dtype)
    bare.load_state_dict(loaded.state_dict())
