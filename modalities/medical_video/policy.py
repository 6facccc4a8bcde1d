"""Video VLM policy (Qwen2.5-VL / Qwen2-VL / Qwen3-VL): owns the model and processor, re-scores video rollouts.

Re-scoring feeds exactly what sampling fed (the prompt's `pixel_values_videos`, `video_grid_thw` and
`second_per_grid_ts`, with `mm_token_type_ids` so the model builds the same mRoPE positions), so the re-scored
log-probs equal the sampler's. Log-probs are those of the temperature-scaled full distribution, in fp32 even when
the model runs in bf16, a block of positions at a time (`toolkit.hf.logprobs`). The vision tower is frozen by
default; LoRA (peft) targets the language model only.
`export` writes a `save_pretrained` model + processor folder (or a PEFT adapter folder) for `renorm export`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.hf.attention import check_attn_implementation, set_attn_implementation
from toolkit.hf.generation import left_align, row_slices
from toolkit.hf.logprobs import token_log_probs_and_entropy
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
from toolkit.hf.reference import ReferenceSnapshot, is_sharded
from toolkit.rollout import Rollout

# Models whose forward takes one pooled vision-tower output per video as mm_encoder_outputs["video"].
EMBEDDING_REUSE_MODELS = ("qwen2_vl", "qwen2_5_vl")
# LoRA on the language model's linear layers only (the vision tower stays frozen).
LANGUAGE_LORA_TARGETS = r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class VideoFeatures:
    """One processed video as the model consumes it (shared by the G rows of a prompt).

    Attributes:
        pixel_values_videos: [P, C·2·14·14] flattened patches (P = t·h·w of the grid).
        video_grid_thw: [1, 3] int64 (t, h, w) patch grid.
        second_per_grid_ts: seconds per temporal grid step = temporal_patch_size / fps (mRoPE time axis).
        num_tokens: LLM placeholder tokens = t·h·w / merge².
    """

    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    second_per_grid_ts: float
    num_tokens: int


def video_batch(
    videos: Sequence[VideoFeatures], device: torch.device, embeds: Sequence[Tensor] | None = None
) -> dict[str, Any]:
    """The model's video kwargs for rows `videos` (one video per row, in row order).

    With `embeds` (one [tokens, D] vision-tower output per row, `VideoVLMPolicy.video_embeddings`) the model gets
    them as `mm_encoder_outputs` instead of the patches, so its vision tower does not run; the grid and the seconds
    per grid step still go in, for the mRoPE positions.
    """
    kwargs: dict[str, Any] = {
        "video_grid_thw": torch.cat([v.video_grid_thw for v in videos]).to(device),
        "second_per_grid_ts": torch.tensor([v.second_per_grid_ts for v in videos], device=device),
    }
    if embeds is None:
        kwargs["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos]).to(device)
    else:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=tuple(embeds))}
    return kwargs


def mm_token_types(input_ids: Tensor, video_token_id: int, image_token_id: int | None = None) -> Tensor:
    """[N, W] modality ids for mRoPE: 0 text, 1 image placeholder, 2 video placeholder."""
    types = (input_ids == video_token_id).long() * 2
    if image_token_id is not None:
        types = types + (input_ids == image_token_id).long()
    return types


class VideoVLMPolicy:
    """A Qwen-VL-family video model as a Policy, EntropyPolicy and ReferencePolicy.

    Args:
        model: a hub id or local path (`AutoModelForImageTextToText.from_pretrained`) or a built `nn.Module`.
        processor: the model's processor (tokenizer + video processor + chat template), a hub id/path, or None
            (loaded from `model` when that is a string).
        lora: peft `LoraConfig` kwargs; `target_modules` defaults to the language model's linear layers.
        freeze_vision: keep the vision tower (and its merger) frozen.
        gradient_checkpointing: recompute activations in backward (use_reentrant=False).
        dtype: "float32" keeps fp32 weights (bf16 autocast on CUDA), "bfloat16" casts them, "auto" keeps them.
        attn_implementation: attention kernel ("eager", "sdpa", "flash_attention_2", ...; None = the model's),
            checked before loading (`toolkit.hf.attention`): a hub id loads with it, a built module is switched.
        temperature, top_p, top_k: sampling settings the sampler inherits; log-probs use the temperature only.
        reference: "adapters_off" (LoRA), "copy" (frozen copy taken before the first update), "none", or "auto".
        micro_batch_size: rows per forward when re-scoring (None = all rows at once).
        autocast: bf16 autocast when the module is on CUDA.
        disable_dropout: zero every dropout, so train-mode re-scoring equals sampling.
        reuse_vision_embeddings: with the vision tower frozen, encode each distinct video once per rollout
            (`video_embeddings`) and feed the embeddings to generation, the old-log-prob pass and every training and
            reference forward (Qwen2-VL / Qwen2.5-VL on transformers with `mm_encoder_outputs`). A trainable tower
            is re-run in every forward, as its gradient needs.
    """

    def __init__(
        self,
        model: str | nn.Module,
        processor: Any = None,
        lora: Mapping[str, Any] | None = None,
        freeze_vision: bool = True,
        gradient_checkpointing: bool = False,
        dtype: DTypeName = "float32",
        attn_implementation: str | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        reference: ReferenceMode = "auto",
        micro_batch_size: int | None = None,
        autocast: bool = True,
        disable_dropout: bool = True,
        reuse_vision_embeddings: bool = True,
    ) -> None:
        reference_mode = check_policy_options(dtype, reference, temperature, top_p, micro_batch_size, lora is not None)
        check_attn_implementation(attn_implementation)
        self.reuse_vision_embeddings = reuse_vision_embeddings
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), top_k
        self.micro_batch_size, self.autocast, self.is_lora = micro_batch_size, autocast, lora is not None
        self.reference_mode: ReferenceMode = reference_mode
        self.processor = _load_processor(processor, model)
        base: Any = _build_model(model, dtype, attn_implementation)
        if freeze_vision:
            vision_tower(base).requires_grad_(False)
        shard_vision_tower_apart(base)
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.is_lora:
                base.enable_input_require_grads()
        self.module: nn.Module = (
            wrap_lora(base, lora, {"target_modules": LANGUAGE_LORA_TARGETS}) if lora is not None else base
        )
        if disable_dropout:
            zero_dropout(self.module)
        config = base.config
        self.video_token_id = int(config.video_token_id)
        self.image_token_id = getattr(config, "image_token_id", None)
        # Vision placeholders must never be generated (the re-scoring forward would read them as video slots):
        # the sampler suppresses them and the log-probs exclude them, so both see the same distribution.
        names = ("video_token_id", "image_token_id", "vision_start_token_id", "vision_end_token_id")
        self.suppressed_token_ids = sorted({int(v) for v in (getattr(config, n, None) for n in names) if v is not None})
        self._snapshot = ReferenceSnapshot(self.module) if self.reference_mode == "copy" else None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when enabled and the module is on CUDA; a no-op otherwise."""
        return bf16_autocast(self.autocast, self.device)

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs of the response tokens (0 where `rollout.mask` is False)."""
        return self._score(self.module, rollout)[0]

    def log_probs_and_entropy(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """([N, T] log-probs, [N, T] entropy) from one forward; both 0 where the mask is False."""
        return self._score(self.module, rollout)

    @torch.no_grad()
    def ref_log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs under the reference (adapters off or the frozen copy), no grad."""
        return reference_log_probs(
            self.reference_mode, self.module, self.init_reference, lambda module: self._score(module, rollout)[0]
        )

    def init_reference(self) -> nn.Module:
        """The module scoring the reference; in "copy" mode a frozen copy, taken before any update."""
        if self._snapshot is None:
            return self.module
        return self._snapshot.take(self.module)

    def after_optimizer_step(self) -> None:
        """Called by the Trainer after each optimizer step: the weights are no longer the reference's."""
        if self._snapshot is not None:
            self._snapshot.mark_updated()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights the trainer updates: the trainable parameters with LoRA, else the full state dict."""
        return trainable_state_dict(self.module, self.is_lora)

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what `trainable_state_dict` returned (strict about missing and unexpected keys)."""
        load_trainable_state_dict(self.module, self.is_lora, state)

    def load_export(self, folder: str | Path) -> None:
        """Load what `export` wrote (a transformers or a PEFT adapter folder): `renorm eval --checkpoint OUT`."""
        load_hf_export(self.module, self.is_lora, Path(folder))

    def export(self, out_dir: str | Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the policy as a Hugging Face folder into `out_dir` (`renorm export`, toolkit.io.export).

        Full fine-tuning: the model's `save_pretrained` (config.json, generation_config.json, safetensors) and the
        processor's (tokenizer, video/image processor configs, chat_template.jinja); loads with
        `AutoModelForImageTextToText.from_pretrained(out_dir)` and `AutoProcessor.from_pretrained(out_dir)`. LoRA:
        the PEFT adapter folder beside the processor; loads with `PeftModel.from_pretrained(base, out_dir)`.

        Args:
            out_dir: an existing folder (written into).
            merge_lora: merge the adapters into the base weights and save a full model; afterwards the policy holds
                the merged model as a full-weight policy with no reference (the base weights are gone).
            dtype: cast the module's weights in place before saving (None keeps them).

        Raises:
            ValueError: `merge_lora` without LoRA, or a full model holding weights its architecture lacks (the tiny
                model's `eos_logit` lm_head bias): `from_pretrained` would silently drop them.
        """
        module = export_module(self.module, self.is_lora, merge_lora, dtype)
        if merge_lora:  # the adapters are consumed: a full-weight policy with no reference from now on
            self.module, self.is_lora, self.reference_mode, self._snapshot = module, False, "none", None
        if not self.is_lora:
            _check_architecture_holds(module)
        module.save_pretrained(str(out_dir))
        self.processor.save_pretrained(str(out_dir))

    def video_embeddings(self, videos: Sequence[VideoFeatures]) -> list[Tensor] | None:
        """One [tokens, D] vision-tower output per row of `videos`, each distinct video encoded once, no grad.

        None when they may not stand in for the tower: `reuse_vision_embeddings` is off, the tower has trainable
        weights, or the model cannot take them (see `reuses_vision_embeddings`). Encoded under the policy's
        autocast, one video per call, as the forwards they replace encode it (on CPU the numbers are bitwise theirs).
        """
        if not self.reuses_vision_embeddings():
            return None
        model: Any = unwrap_model(unwrap(self.module))
        encoded: dict[int, Tensor] = {}
        with torch.no_grad(), self.autocast_context():
            for video in videos:
                if id(video) not in encoded:
                    pixels, grid = video.pixel_values_videos.to(self.device), video.video_grid_thw.to(self.device)
                    encoded[id(video)] = model.get_video_features(pixels, grid, return_dict=True).pooler_output[0]
        return [encoded[id(video)] for video in videos]

    def reuses_vision_embeddings(self) -> bool:
        """Whether forwards take precomputed video embeddings: the option is on, no vision weight trains (LoRA on
        the tower included), the model is a Qwen2-VL / Qwen2.5-VL whose forward has `mm_encoder_outputs`, and the
        tower's weights are whole on this rank (a sharded tower, FSDP or ZeRO-3, keeps running inside each forward:
        reusing its outputs there is not wired)."""
        model: Any = unwrap_model(unwrap(self.module))
        if not self.reuse_vision_embeddings or getattr(model.config, "model_type", None) not in EMBEDDING_REUSE_MODELS:
            return False
        tower = vision_tower(model)
        return (
            "mm_encoder_outputs" in inspect.signature(model.forward).parameters
            and not any(p.requires_grad for p in tower.parameters())
            and not is_sharded(tower)
        )

    def _score(self, module: nn.Module, rollout: Rollout) -> tuple[Tensor, Tensor]:
        data, num_steps = rollout.data, rollout.num_steps
        sampled_at = data.get("temperature")
        if sampled_at is not None and float(sampled_at) != self.temperature:
            raise ValueError(f"rollout sampled at temperature {sampled_at}, the policy scores at {self.temperature}")
        videos: list[VideoFeatures] = data["videos"]
        # The sampler's embeddings (or, for a rollout without them, one encoding per distinct video for this call).
        # They serve the reference module too: a frozen tower is the same in the reference copy and with adapters off.
        embeds = data.get("video_embeds") if self.reuses_vision_embeddings() else None
        if embeds is None or len(embeds) != len(videos):  # e.g. a rollout joined with one that had none
            embeds = self.video_embeddings(videos)
        device = next(module.parameters()).device
        prompt_ids, prompt_mask = left_align(data["prompt_ids"], data["prompt_attention_mask"].bool())
        input_ids = torch.cat([prompt_ids, data["response_ids"]], dim=1).to(device)
        attention = torch.cat([prompt_mask, data["response_attention_mask"].bool()], dim=1).to(device)
        logprobs, entropies = [], []
        for rows in row_slices(len(rollout), self.micro_batch_size or max(len(rollout), 1)):
            ids = input_ids[rows]
            with self.autocast_context():
                logits = module(
                    input_ids=ids,
                    attention_mask=attention[rows].long(),
                    mm_token_type_ids=mm_token_types(ids, self.video_token_id, self.image_token_id),
                    use_cache=False,
                    logits_to_keep=num_steps + 1,
                    **video_batch(videos[rows], device, None if embeds is None else embeds[rows]),
                ).logits
            lp, ent = token_log_probs_and_entropy(
                logits[:, -(num_steps + 1) : -1], ids[:, -num_steps:], self.temperature, self.suppressed_token_ids
            )
            logprobs.append(lp)
            entropies.append(ent)
        mask = rollout.mask.to(device)
        return torch.where(mask, torch.cat(logprobs), 0.0), torch.where(mask, torch.cat(entropies), 0.0)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of a Qwen-VL-family model (`model.model.visual` in transformers 5, else `model.visual`)."""
    for owner in (getattr(model, "model", None), model):
        visual = getattr(owner, "visual", None)
        if isinstance(visual, nn.Module):
            return visual
    raise ValueError(f"{type(model).__name__} has no `visual` tower; expected a Qwen2/2.5/3-VL model")


def shard_vision_tower_apart(model: Any) -> None:
    """Make the vision tower an FSDP unit of its own: accelerate's transformer auto-wrap (FSDP2) wraps the classes
    named in the model's `_no_split_modules`, which hold the tower's blocks but not the tower.

    `generate` encodes videos by calling the tower directly (`get_video_features`), outside the root forward that
    all-gathers the root unit's weights. With the patch embedding and the merger left in the root unit, that call met
    sharded weights (DTensors) and failed; as a unit, the tower gathers its own weights when it is called.
    """
    model._no_split_modules = {*(model._no_split_modules or ()), type(vision_tower(model)).__name__}


def _check_architecture_holds(model: Any) -> None:
    """ValueError naming the weights of `model` that a fresh model of its class and config lacks (they would be
    dropped by `from_pretrained`, changing the outputs)."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"{type(model).__name__} has no save_pretrained; only transformers models export")
    with torch.device("meta"):  # no memory; a copy of the config, which a constructor may edit
        fresh = type(model)(copy.deepcopy(model.config))
    extra = sorted(set(model.state_dict()) - set(fresh.state_dict()))
    if extra:
        raise ValueError(
            f"{type(model).__name__} holds weights its architecture lacks: {extra[:5]}; from_pretrained would drop "
            "them (the tiny model's lm_head bias: build it with eos_logit: null to export)"
        )


def _load_processor(processor: Any, model: Any) -> Any:
    if processor is None and isinstance(model, str):
        processor = model
    if isinstance(processor, str):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(processor, padding_side="left")
    if processor is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError("VideoVLMPolicy needs a processor with a tokenizer and a video_processor")
    return processor


def _build_model(model: str | nn.Module, dtype: DTypeName, attn_implementation: str | None) -> Any:
    if isinstance(model, str):
        from transformers import AutoModelForImageTextToText

        kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES.get(dtype, "auto")}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a hub id/path or an nn.Module, got {type(model).__name__}")
    set_attn_implementation(model, attn_implementation)
    return model.to(TORCH_DTYPES[dtype]) if dtype in TORCH_DTYPES else model
