"""Helpers for policies over Hugging Face token models (causal LMs and VLMs) that modalities share.

Option checks and reference-mode resolution, LoRA wrapping, dropout removal, trainable-state extraction,
left padding/alignment, row chunking and the sampling context (plain generation config, forked RNG devices).
transformers and peft are imported inside the functions that need them, so `import toolkit` stays light.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def check_sampler_options(
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    generation_batch_size: int | None,
) -> None:
    """Validate a token sampler's shared generation options (None = the policy's setting)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if generation_batch_size is not None and generation_batch_size < 1:
        raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size}")


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


def unwrap_model(module: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the module itself otherwise)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def row_slices(num_rows: int, chunk: int) -> Iterator[slice]:
    """Consecutive row slices of at most `chunk` rows."""
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to one width: ([N, L] int64 ids, [N, L] bool attention mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids.to(device), mask.to(device)


def left_align(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's attended tokens to the right end, keeping their order ([N, L] -> [N, L]).

    `concat_rollouts` right-pads prompts of different widths, which leaves masked columns between a
    prompt and its response; the response's first token must be predicted from the last real
    prompt token, so prompts are re-left-padded before the forward.
    """
    order = torch.argsort(attention_mask.int(), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices `torch.random.fork_rng` must fork so seeded sampling on `device` leaves global RNGs alone."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def plain_generation_config(module: nn.Module) -> Iterator[None]:
    """Give the model a default GenerationConfig while sampling, so a checkpoint's defaults (repetition penalty,
    top-k, ...) cannot move the sampled distribution away from the one the policy scores."""
    from transformers import GenerationConfig

    model: Any = unwrap_model(module)
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        model.generation_config = saved
