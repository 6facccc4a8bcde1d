"""Causal-LM policy: owns a (optionally LoRA-wrapped) Hugging Face causal LM and re-scores text rollouts.

Log-probs are those of the temperature-scaled full next-token distribution — top-p/top-k only shape
the sampler's choice, as in TRL and verl — computed in fp32 even when the model runs in bf16 autocast, a block of
positions at a time (`toolkit.hf.logprobs`: no fp32 [N, T, V] copy of the logits).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modalities.text_agent.packing import (
    PackedLayout,
    check_packing_support,
    packed_layout,
    position_ids_from_mask,
)
from toolkit.hf.attention import check_attn_implementation, set_attn_implementation
from toolkit.hf.generation import left_align, row_slices
from toolkit.hf.logprobs import token_log_probs, token_log_probs_and_entropy
from toolkit.hf.policy import (
    TORCH_DTYPES,
    DTypeName,
    ReferenceMode,
    bf16_autocast,
    check_policy_options,
    export_module,
    load_hf_export,
    load_trainable_state_dict,
    reference_log_probs,
    trainable_state_dict,
    unwrap_model,
    wrap_lora,
    zero_dropout,
)
from toolkit.hf.reference import ReferenceSnapshot
from toolkit.rollout import Rollout


def sequence_tensors(data: Mapping[str, Any], num_steps: int) -> tuple[Tensor, Tensor]:
    """Full sequences [N, W] and bool attention mask whose last `num_steps` columns are the response.

    Two layouts are read: the sampler's split layout (`prompt_ids`, `prompt_attention_mask` [N, L],
    `response_ids`, `response_attention_mask` [N, T]) and a joined layout (`input_ids`,
    `attention_mask` [N, L + T], response = last T columns). Prompts are left-aligned (see
    `left_align`), so both survive `concat_rollouts`.
    """
    if "response_ids" in data:
        response_ids, response_mask = data["response_ids"], data["response_attention_mask"].bool()
        prompt_ids, prompt_mask = data["prompt_ids"], data["prompt_attention_mask"].bool()
    elif "input_ids" in data:
        input_ids, attention_mask = data["input_ids"], data["attention_mask"].bool()
        if input_ids.shape[1] <= num_steps:
            raise ValueError(f"input_ids has {input_ids.shape[1]} columns, needs a prompt before T={num_steps}")
        prompt_ids, response_ids = input_ids[:, :-num_steps], input_ids[:, -num_steps:]
        prompt_mask, response_mask = attention_mask[:, :-num_steps], attention_mask[:, -num_steps:]
    else:
        raise ValueError(f"rollout.data has neither 'response_ids' nor 'input_ids'; keys: {sorted(data)}")
    if response_ids.shape[1] != num_steps:
        raise ValueError(f"response_ids has {response_ids.shape[1]} columns, rollout has T={num_steps}")
    prompt_ids, prompt_mask = left_align(prompt_ids, prompt_mask)
    return torch.cat([prompt_ids, response_ids], dim=1), torch.cat([prompt_mask, response_mask], dim=1)


class CausalLMPolicy:
    """A causal LM as a Policy, EntropyPolicy and ReferencePolicy.

    Args:
        model: a hub id or local path (`AutoModelForCausalLM.from_pretrained`), a built `nn.Module`,
            or a mapping of transformers config kwargs including `model_type` (random init).
        tokenizer: a tokenizer, a hub id/path, or None (loaded from `model` when that is a string).
        lora: peft `LoraConfig` kwargs (task_type defaults to CAUSAL_LM); None trains all weights.
        gradient_checkpointing: recompute activations in backward (use_reentrant=False).
        dtype: parameter dtype. "float32" keeps fp32 master weights (bf16 autocast on CUDA),
            "bfloat16" casts the weights, "auto" keeps the checkpoint's / module's dtype.
        temperature: logits are divided by it before the softmax (must match the sampler's).
        top_p, top_k: sampling truncation the sampler inherits; log-probs ignore them.
        reference: "adapters_off" (LoRA only), "copy" (frozen deep copy, made lazily on the first
            `ref_log_probs` call or by `init_reference()`), "none", or "auto" (adapters_off with
            LoRA, copy otherwise).
        micro_batch_size: rows per forward pass when re-scoring (None = all rows at once).
        autocast: run forwards under bf16 autocast when the module is on CUDA.
        disable_dropout: zero every dropout (including LoRA's), so the on-policy ratio is exactly 1.
        attn_implementation: attention kernel ("eager", "sdpa", "flash_attention_2", ...; None = the model's), checked
            before the model loads (`toolkit.hf.attention`); a built module is switched to it.
        packed: padding-free re-scoring forwards (`packed_layout`): a micro-batch's attended tokens are concatenated
            into one row with per-sequence position ids and no attention mask, from which transformers builds the
            block-diagonal causal mask (or flash-attention's varlen path), and logits are taken only where a
            response token is predicted. The same log-probs as the padded forward to float rounding, no work on pads.
    """

    def __init__(
        self,
        model: str | nn.Module | Mapping[str, Any],
        tokenizer: Any = None,
        lora: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        dtype: DTypeName = "float32",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        reference: ReferenceMode = "auto",
        micro_batch_size: int | None = None,
        autocast: bool = True,
        disable_dropout: bool = True,
        attn_implementation: str | None = None,
        packed: bool = False,
    ) -> None:
        reference_mode = check_policy_options(dtype, reference, temperature, top_p, micro_batch_size, lora is not None)
        check_attn_implementation(attn_implementation)
        if packed:
            check_packing_support()
        self.packed = packed
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.micro_batch_size = micro_batch_size
        self.autocast = autocast
        self.is_lora = lora is not None
        self.reference_mode: ReferenceMode = reference_mode
        self.tokenizer = _load_tokenizer(tokenizer, model)
        base: Any = _build_model(model, dtype, attn_implementation)
        if gradient_checkpointing:
            _enable_checkpointing(base)
            if self.is_lora:
                base.enable_input_require_grads()
        self.module: nn.Module = wrap_lora(base, lora) if lora is not None else base
        if disable_dropout:
            zero_dropout(self.module)
        self._snapshot = ReferenceSnapshot(self.module) if self.reference_mode == "copy" else None
        self._accepts_logits_to_keep = (
            "logits_to_keep" in inspect.signature(unwrap_model(self.module).forward).parameters
        )

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when enabled and the module is on CUDA; a no-op otherwise."""
        return bf16_autocast(self.autocast, self.device)

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs of the response tokens (0 where `rollout.mask` is False)."""
        return self._score(self.module, rollout, with_entropy=False)[0]

    def log_probs_and_entropy(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """([N, T] log-probs, [N, T] entropy) from one forward; both 0 where the mask is False."""
        logprobs, entropy = self._score(self.module, rollout, with_entropy=True)
        assert entropy is not None
        return logprobs, entropy

    @torch.no_grad()
    def ref_log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs under the reference weights, no grad."""
        return reference_log_probs(
            self.reference_mode,
            self.module,
            self.init_reference,
            lambda module: self._score(module, rollout, with_entropy=False)[0],
        )

    def init_reference(self) -> nn.Module:
        """Create the frozen reference copy now (mode "copy"); returns the module scoring the reference.

        The copy must be taken from the initial weights: call this before the first optimizer step
        or checkpoint load if `ref_log_probs` is first needed later. A copy requested after the
        weights changed raises instead of silently using the wrong reference (`ReferenceSnapshot`).
        """
        if self._snapshot is None:
            return self.module
        return self._snapshot.take(self.module)

    @property
    def _reference(self) -> nn.Module | None:
        """The frozen reference copy once taken (None before, and outside "copy" mode)."""
        return self._snapshot.module if self._snapshot is not None else None

    def after_optimizer_step(self) -> None:
        """Called by the Trainer after each optimizer step: the weights are no longer the reference's."""
        if self._snapshot is not None:
            self._snapshot.mark_updated()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights the trainer updates: LoRA adapters (trainable parameters) only, else the full state dict."""
        return trainable_state_dict(self.module, self.is_lora)

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what `trainable_state_dict` returned (strict about missing and unexpected keys)."""
        load_trainable_state_dict(self.module, self.is_lora, state)

    def load_export(self, folder: str | Path) -> None:
        """Load what `export` wrote (a transformers or a PEFT adapter folder): `renorm eval --checkpoint OUT`."""
        load_hf_export(self.module, self.is_lora, Path(folder))

    def export(self, out_dir: str | Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the policy as a Hugging Face folder into `out_dir` (`renorm export`, toolkit.io.export).

        Full fine-tuning: `save_pretrained` (config.json, generation_config.json, safetensors shards); loads
        with `AutoModelForCausalLM.from_pretrained`. LoRA: the PEFT adapter folder (adapter_config.json,
        adapter_model.safetensors under PEFT's saved names); loads with `PeftModel.from_pretrained(base,
        out_dir)`. The tokenizer (with its chat template) is saved beside either.

        Args:
            out_dir: an existing folder (written into).
            merge_lora: merge the adapters into the base weights (`merge_and_unload`) and save a full model.
                This consumes the adapters: afterwards the policy holds the merged model, as a full-weight
                policy with no reference (reference="none": the base weights are gone).
            dtype: cast the module's weights in place before saving (None keeps them).
        """
        module = export_module(self.module, self.is_lora, merge_lora, dtype)
        if merge_lora:  # the adapters are consumed: a full-weight policy with no reference from now on
            self.module, self.is_lora, self.reference_mode, self._snapshot = module, False, "none", None
        if not callable(getattr(module, "save_pretrained", None)):
            raise ValueError(f"{type(module).__name__} has no save_pretrained; only transformers/peft models export")
        module.save_pretrained(str(out_dir))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))

    def _score(self, module: nn.Module, rollout: Rollout, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        num_steps = rollout.num_steps
        sampled_at = rollout.data.get("temperature")
        if sampled_at is not None and float(sampled_at) != self.temperature:
            raise ValueError(
                f"rollout was sampled at temperature {sampled_at}, the policy scores at {self.temperature}"
            )
        device = next(module.parameters()).device
        input_ids, attention_mask = (t.to(device) for t in sequence_tensors(rollout.data, num_steps))
        chunk = self.micro_batch_size or max(len(rollout), 1)
        mask = rollout.mask.to(device)
        if self.packed and bool((mask & ~attention_mask[:, -num_steps:]).any()):
            raise ValueError("rollout.mask trains response positions outside the attention mask: cannot pack them")
        logprobs, entropies = [], []
        for rows in row_slices(len(rollout), chunk):
            lp, ent = self._rows_log_probs(module, input_ids[rows], attention_mask[rows], num_steps, with_entropy)
            logprobs.append(lp)
            entropies.append(ent)
        result = torch.where(mask, torch.cat(logprobs), 0.0)
        entropy = torch.where(mask, torch.cat([e for e in entropies if e is not None]), 0.0) if with_entropy else None
        return result, entropy

    def _rows_log_probs(
        self, module: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_steps: int, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """([n, T] log-probs, [n, T] entropy or None) of the response tokens of rows [n, W], padded or packed."""
        if self.packed:
            layout = packed_layout(input_ids, attention_mask, num_steps)
            logits, tokens, unpack = self._packed_logits(module, layout), layout.tokens[layout.targets], layout.unpack
        else:
            logits = self._response_logits(module, input_ids, attention_mask, num_steps)
            tokens, unpack = input_ids[:, -num_steps:], _identity
        if not with_entropy:
            return unpack(token_log_probs(logits, tokens, self.temperature)), None
        logprobs, entropy = token_log_probs_and_entropy(logits, tokens, self.temperature)
        return unpack(logprobs), unpack(entropy)

    def _response_logits(self, module: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_steps: int) -> Tensor:
        """[n, T, V] logits predicting the last `num_steps` tokens of `input_ids`.

        The last token predicts nothing trained, so it is left out of the forward: the logits come out exactly
        [n, T, V] (no [n, T + 1, V] tensor whose slice would cost a zero-filled copy in backward).
        """
        inputs, mask = input_ids[:, :-1], attention_mask[:, :-1]
        kwargs: dict[str, Any] = {
            "input_ids": inputs,
            "attention_mask": mask.long(),
            "position_ids": position_ids_from_mask(mask),
            "use_cache": False,
        }
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = num_steps
        with self.autocast_context():
            logits: Tensor = module(**kwargs).logits
        return logits if self._accepts_logits_to_keep else logits[:, -num_steps:]

    def _packed_logits(self, module: nn.Module, layout: PackedLayout) -> Tensor:
        """[K, V] logits predicting the K attended response tokens, from one padding-free forward of `layout`."""
        predicting = layout.targets - 1  # a row's tokens are contiguous: its previous token predicts a target
        kwargs: dict[str, Any] = {
            "input_ids": layout.tokens[None],
            "position_ids": layout.positions[None],
            "use_cache": False,
        }
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = predicting
        with self.autocast_context():
            logits: Tensor = module(**kwargs).logits[0]
        return logits if self._accepts_logits_to_keep else logits[predicting]


def _identity(values: Tensor) -> Tensor:
    return values


def _load_tokenizer(tokenizer: Any, model: Any) -> Any:
    if tokenizer is None and isinstance(model, str):
        tokenizer = model
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _build_model(model: str | nn.Module | Mapping[str, Any], dtype: DTypeName, attn_implementation: str | None) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, dtype=TORCH_DTYPES.get(dtype, "auto"), **attention)
    if isinstance(model, Mapping):
        if "_component_" in model:
            raise ValueError("model is an unbuilt `_component_` node; build it with the config system first")
        if "model_type" not in model:
            raise ValueError(
                f"a model mapping needs 'model_type' (transformers config kwargs); got keys {sorted(model)}"
            )
        kwargs = dict(model)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        built: Any = AutoModelForCausalLM.from_config(config, **attention)
    elif isinstance(model, nn.Module):
        built = model
        set_attn_implementation(built, attn_implementation)
    else:
        raise ValueError(f"model must be a hub id/path, an nn.Module or a config mapping, got {type(model).__name__}")
    return built.to(TORCH_DTYPES[dtype]) if dtype in TORCH_DTYPES else built


def _enable_checkpointing(model: Any) -> None:
    """Activation checkpointing with use_reentrant=False (transformers >= 5 name, else the older one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
