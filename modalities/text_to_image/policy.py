"""Flow-matching text-to-image policy (SD3 / FLUX transformers) that re-scores stored SDE transitions.

`FlowMatchingPolicy.module` is the transformer (LoRA-wrapped with peft when `lora` is set); the VAE and
the text encoder are frozen components. `log_probs` recomputes, at each row's trained transitions, the
velocity and the SDE step log-prob of the stored next latent (`modalities.text_to_image.sde`, fp32), so
re-scoring fresh samples gives ratio 1. Flow-GRPO backprops one timestep at a time; the Trainer asks for
all T at once, so with `gradient_checkpointing=True` every transformer call is wrapped in
`torch.utils.checkpoint` and only its inputs stay alive until backward. `export` writes the transformer in
diffusers' format (a `transformer/` folder, or LoRA weights that `pipeline.load_lora_weights` reads). The
transformer's forward (CFG, guidance) is `velocity.TransformerVelocity`; the gathered transitions `transitions`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modalities.text_to_image.attention import set_attention_backend
from modalities.text_to_image.export import load_export_into, write_export
from modalities.text_to_image.latents import latent_shape, unpack
from modalities.text_to_image.sde import Reduce, gaussian_kl, sde_step
from modalities.text_to_image.text_encoding import CachedTextEncoder, PipelineTextEncoder
from modalities.text_to_image.transitions import (
    Transitions,
    gather_transitions,
    rollout_image_size,
    scatter_transitions,
)
from modalities.text_to_image.velocity import Arch, CfgGradient, TransformerVelocity, param_dtype
from toolkit.distributed import unwrap
from toolkit.hf.generation import row_slices
from toolkit.hf.policy import check_choice, export_module, load_trainable_state_dict, trainable_state_dict
from toolkit.hf.reference import ReferenceSnapshot
from toolkit.rollout import Rollout

ReferenceMode = Literal["auto", "copy", "adapters_off", "none"]
TimestepMode = Literal["auto", "exact", "quantized"]
DTypeName = Literal["float32", "bfloat16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class FlowMatchingPolicy(TransformerVelocity):
    """An SD3 or FLUX transformer as a Policy, ReferencePolicy and AnalyticKLPolicy.

    Args:
        transformer: an `SD3Transformer2DModel` / `FluxTransformer2DModel` (or a module with their forward).
        arch: "sd3" (true CFG: batched [uncond; cond] forward) or "flux" (guidance embedding, one forward).
        vae: an `AutoencoderKL` for decoding (None: the sampler returns latents, no images).
        text_encoder: a `CachedTextEncoder` (caption → embeddings, cached).
        lora: peft `LoraConfig` kwargs (default target_modules: attention q/k/v/out); None = full fine-tune.
        reference: "adapters_off" (LoRA), "copy" (frozen deep copy), "none", or "auto" (LoRA → adapters_off).
        gradient_checkpointing: wrap every transformer call of `log_probs` in `torch.utils.checkpoint`.
        dtype: transformer weights: "float32" (master weights; bf16 autocast on CUDA) or "bfloat16".
        autocast: bf16 autocast for transformer forwards on CUDA (step math stays fp32).
        timestep_mode: time input: "exact" σ, "quantized" int(σ·1000)/1000 (Pref-GRPO FLUX), "auto" =
            quantized for flux, exact for sd3. The SDE always uses the exact σ.
        cfg_gradient: SD3 CFG gradient: "conditional" (v = sg(v_u) + w(v_c − sg(v_u))) or "both".
        uncond_without_grad: with "conditional", re-scoring runs the unconditional half as its own forward under
            `torch.no_grad()` (no activations kept for it); False batches [uncond; cond] through one forward with
            gradients and detaches v_u after (the same numbers to float rounding, more memory and work).
        attn_implementation: the transformer's diffusers attention backend ("native", "flash", "_flash_3",
            "sage", ..., or the transformers names "sdpa", "flash_attention_2", "flash_attention_3"); None keeps
            the model's (`modalities.text_to_image.attention`).
        micro_batch_size: transitions per transformer call when re-scoring (None = all at once).
        kl_reduce: reduction of the analytic KL over latent dims ("mean" = Flow-GRPO).
        vae_scale_factor: pixels per latent cell; None = from the VAE (2^(len(block_out_channels) − 1)) or 8.
        disable_dropout: zero every dropout (LoRA's too), so train-mode re-scoring equals sampling.
        pipeline: the diffusers pipeline (hub id or folder) the components come from (`from_pretrained` sets it);
            `export` copies its other components beside the trained transformer.
    """

    def __init__(
        self,
        transformer: nn.Module,
        arch: Arch = "sd3",
        vae: nn.Module | None = None,
        text_encoder: CachedTextEncoder | None = None,
        lora: Mapping[str, Any] | None = None,
        reference: ReferenceMode = "auto",
        gradient_checkpointing: bool = False,
        dtype: DTypeName = "float32",
        autocast: bool = True,
        timestep_mode: TimestepMode = "auto",
        cfg_gradient: CfgGradient = "conditional",
        uncond_without_grad: bool = True,
        attn_implementation: str | None = None,
        micro_batch_size: int | None = None,
        kl_reduce: Reduce = "mean",
        vae_scale_factor: int | None = None,
        disable_dropout: bool = True,
        pipeline: str | None = None,
    ) -> None:
        for name, value, choices in (
            ("arch", arch, Arch),
            ("reference", reference, ReferenceMode),
            ("dtype", dtype, DTypeName),
            ("timestep_mode", timestep_mode, TimestepMode),
            ("cfg_gradient", cfg_gradient, CfgGradient),
            ("kl_reduce", kl_reduce, Reduce),
        ):
            check_choice(name, value, choices)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if reference == "adapters_off" and lora is None:
            raise ValueError("reference='adapters_off' needs lora; use 'copy' or 'auto' for full fine-tuning")
        self.arch: Arch = arch
        self.pipeline = pipeline
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.text_encoder = text_encoder
        self.is_lora = lora is not None
        self.reference_mode: ReferenceMode = (
            ("adapters_off" if self.is_lora else "copy") if reference == "auto" else reference
        )
        self.gradient_checkpointing, self.autocast = gradient_checkpointing, autocast
        self.quantize_timesteps = timestep_mode == "quantized" or (timestep_mode == "auto" and arch == "flux")
        self.cfg_gradient, self.micro_batch_size, self.kl_reduce = cfg_gradient, micro_batch_size, kl_reduce
        self.uncond_without_grad = uncond_without_grad
        vae_config: Any = getattr(vae, "config", None)
        self.vae_scale_factor = vae_scale_factor or (
            2 ** (len(vae_config.block_out_channels) - 1) if vae_config is not None else 8
        )
        base = transformer if param_dtype(transformer) == _DTYPES[dtype] else transformer.to(_DTYPES[dtype])
        if attn_implementation is not None:
            set_attention_backend(base, attn_implementation)
        self.module: nn.Module = _wrap_lora(base, lora) if lora is not None else base
        if disable_dropout:
            for sub in self.module.modules():
                if isinstance(sub, nn.Dropout):
                    sub.p = 0.0
        self._snapshot = ReferenceSnapshot(self.module) if self.reference_mode == "copy" else None
        self._cache: tuple[Rollout, Transitions, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ components
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        arch: Arch = "sd3",
        lora: Mapping[str, Any] | None = None,
        dtype: DTypeName = "float32",
        component_dtype: DTypeName = "bfloat16",
        max_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> FlowMatchingPolicy:
        """Transformer, VAE and text encoders of a diffusers checkpoint (SD3.5 or FLUX.1-dev; GPU recipes)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

        check_choice("arch", arch, Arch)
        model_cls: Any = SD3Transformer2DModel if arch == "sd3" else FluxTransformer2DModel
        transformer = model_cls.from_pretrained(path, subfolder="transformer", torch_dtype=_DTYPES[dtype])
        vae = AutoencoderKL.from_pretrained(  # type: ignore[no-untyped-call]
            path, subfolder="vae", torch_dtype=_DTYPES[component_dtype]
        )
        encoder = PipelineTextEncoder.from_pretrained(path, arch, component_dtype, max_sequence_length)
        return cls(
            transformer, arch=arch, vae=vae, text_encoder=encoder, lora=lora, dtype=dtype, pipeline=path, **kwargs
        )

    def encode_prompts(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """([B, L, D], [B, P]) text conditioning on the policy's device (cached per caption)."""
        if self.text_encoder is None:
            raise ValueError("this FlowMatchingPolicy has no text_encoder")
        return self.text_encoder.encode(captions, self.device)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent: [C, h, w] (sd3) or packed [h/2 · w/2, 4C] tokens (flux)."""
        return latent_shape(self.arch, int(self.config.in_channels), height, width, self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor, height: int, width: int) -> Tensor:
        """[N, 3, H, W] float32 images in [0, 1] from final latents [N, ...] (VAE scaling and shift undone)."""
        if self.vae is None:
            raise ValueError("this FlowMatchingPolicy has no vae to decode with")
        vae: Any = self.vae.to(self.device)
        if self.arch == "flux":
            latents = unpack(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.float() / vae.config.scaling_factor + shift
        images: Tensor = vae.decode(latents.to(next(vae.parameters()).dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ scoring
    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs of the stored transitions at the trained steps (0 where masked)."""
        trans = self.transitions(rollout)
        logprobs, means, stds = self._score(self.module, rollout, trans)
        self._cache = (rollout, trans, means, stds)
        return scatter_transitions(rollout, trans, logprobs)

    @torch.no_grad()
    def ref_log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs under the reference weights, no grad."""
        trans = self.transitions(rollout)
        with self._reference_module() as reference:
            logprobs = self._score(reference, rollout, trans)[0]
        return scatter_transitions(rollout, trans, logprobs)

    def analytic_kl(self, rollout: Rollout) -> Tensor:
        """[N, T] closed-form KL ‖μ_θ − μ_ref‖² / (2σ²) per trained step (Flow-GRPO), differentiable.

        Reuses the current-policy means of the preceding `log_probs` call on the same rollout object.
        """
        if self._cache is not None and self._cache[0] is rollout:
            _, trans, means, stds = self._cache
        else:
            trans = self.transitions(rollout)
            _, means, stds = self._score(self.module, rollout, trans)
        self._cache = None
        with torch.no_grad(), self._reference_module() as reference:
            ref_means = self._score(reference, rollout, trans)[1]
        return scatter_transitions(rollout, trans, gaussian_kl(means, ref_means, stds, self.kl_reduce))

    def transitions(self, rollout: Rollout) -> Transitions:
        """Gather x_k, x_{k+1}, σ_k, σ_{k+1} and conditioning for every (row, trained step) in the mask."""
        return gather_transitions(rollout, self.device)

    def _score(self, module: nn.Module, rollout: Rollout, trans: Transitions) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs [M], means [M, ...], stds [M]) of the transitions, in chunks of `micro_batch_size`."""
        sde = rollout.data.get("sde", {})
        mode, reduce = sde.get("step_mode", "flow"), sde.get("reduce", "mean")
        size = rollout_image_size(rollout)
        count = trans.rows.numel()
        outs = []
        for part in row_slices(count, self.micro_batch_size or max(count, 1)):
            cond = {k: v[part] for k, v in trans.cond.items()}
            args = (trans.latents[part], trans.sigmas[part], cond, trans.guidance[part], module, size)
            # Policy and reference passes split CFG alike, so the analytic KL at the reference weights is exactly 0.
            v = self.velocity(*args, checkpointed=self.gradient_checkpointing, split_cfg=self.uncond_without_grad)
            outs.append(
                sde_step(
                    mode,
                    trans.latents[part],
                    v,
                    trans.sigmas[part],
                    trans.next_sigmas[part],
                    trans.eta[part],
                    trans.guards[part],
                    prev_sample=trans.next_latents[part],
                    reduce=reduce,
                )
            )
        if not outs:
            empty = trans.latents.float()
            return empty.new_zeros(0), empty, empty.new_zeros(0)
        return (
            torch.cat([o.log_prob for o in outs]),
            torch.cat([o.mean for o in outs]),
            torch.cat([o.std for o in outs]),
        )

    # ------------------------------------------------------------------ reference and state
    @contextlib.contextmanager
    def _reference_module(self) -> Iterator[nn.Module]:
        if self.reference_mode == "none":
            raise ValueError("this policy was built with reference='none'; set reference='auto' for a KL term")
        if self.reference_mode == "adapters_off":
            peft_model: Any = unwrap(self.module)
            with peft_model.disable_adapter():
                yield self.module
            return
        yield self.init_reference()

    def init_reference(self) -> nn.Module:
        """Create the frozen reference copy now (mode "copy"; the Trainer calls this before any update)."""
        if self._snapshot is None:
            return self.module
        return self._snapshot.take(self.module)

    def after_optimizer_step(self) -> None:
        """Called by the Trainer after each optimizer step: the weights are no longer the reference's."""
        if self._snapshot is not None:
            self._snapshot.mark_updated()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """LoRA adapter weights (trainable parameters) with LoRA, else the full transformer state dict."""
        return trainable_state_dict(self.module, self.is_lora)

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what `trainable_state_dict` returned (strict about missing and unexpected keys)."""
        load_trainable_state_dict(self.module, self.is_lora, state)

    def load_export(self, folder: str | Path) -> None:
        """Load what `export` wrote (`pytorch_lora_weights.safetensors`, or `transformer/` in diffusers' layout)
        into this policy's transformer: `renorm eval --checkpoint OUT` (modalities.text_to_image.export)."""
        load_export_into(unwrap(self.module), self.is_lora, Path(folder))

    def export(self, out_dir: str | Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the transformer in diffusers' format into `out_dir` (`renorm export`; the layouts:
        modalities.text_to_image.export): `transformer/` (+ the pipeline's other components, or `vae/`), or with LoRA
        `pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights(out_dir)` reads.

        Args:
            out_dir: an existing folder (written into).
            merge_lora: merge the adapters into the transformer and write it in full; afterwards the policy holds the
                merged transformer as a full-weight policy with no reference (the base weights are gone).
            dtype: cast the transformer in place before saving (None keeps it; copied components keep theirs).
        """
        module = export_module(self.module, self.is_lora, merge_lora, dtype)
        if merge_lora:
            self.module, self.is_lora, self.reference_mode, self._snapshot = module, False, "none", None
        write_export(module, self.arch, self.is_lora, Path(out_dir), pipeline=self.pipeline, vae=self.vae)


def _wrap_lora(base: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"target_modules": DEFAULT_LORA_TARGETS, **dict(lora)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        wrapped: nn.Module = get_peft_model(base, config)
    return wrapped
