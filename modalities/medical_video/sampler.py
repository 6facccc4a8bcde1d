"""Batched video sampler: G answers per (video, question) prompt from a rollout engine (`toolkit.engines`; `hf` = HF
`generate` on the policy's module, one call per chunk of rows, the video inputs passed as the request's model inputs;
`server` = `renorm serve-policy`, sent each prompt's video once; `vllm` = the trainer's vision embeddings as vLLM's
`multi_modal_data`).

Each prompt's video is read, sized and patchified once (an LRU cache keyed by the record's video, fps, region box and
the video settings), then shared by its G rows. A video that cannot be read is a counted, logged skip of that prompt
(`video/skipped_prompts`), never a crash. old_logprobs come from re-scoring the finished rollout with the policy (one
no-grad forward), so the on-policy ratio is exactly 1; they are log-probs of the temperature-scaled full distribution
(top-p/top-k only restrict which token is drawn), as in TRL and verl.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from modalities.medical_video.data import region_box
from modalities.medical_video.policy import VideoFeatures, video_batch
from modalities.medical_video.policy import mm_token_types as _mm_token_types
from modalities.medical_video.video import VideoCache, VideoConfig, VideoError, load_video
from toolkit.distributed import unwrap
from toolkit.engines import EngineName, GenerationRequest, HFEngine, SamplingParams, ServerEngine, build_engine
from toolkit.engines.base import GenerationResult, record_engine_logprobs
from toolkit.engines.hf import model_eos_ids
from toolkit.engines.multimodal import Batching, MultimodalInputs
from toolkit.engines.vllm_engine import VLLMEngine
from toolkit.hf.generation import check_sampler_options, left_pad
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

log = logging.getLogger(__name__)
VIDEO_PLACEHOLDER = "<|video_pad|>"


class VideoSampler:
    """Samples G completions per prompt dict {"prompt": question, "video": path | frame list, "fps", ...}.

    Extra prompt keys (answer, task, dataset, struc_info, rc_info, id, ...) stay in `rollout.prompts` and reach the
    reward models as metadata; "dataset"/"task" fill `rollout.dataset_ids`/`task_ids`. Sampling is reproducible from
    `generator` (one seed drawn from it is the engine's; the `hf` engine seeds `generate` inside
    `torch.random.fork_rng`).

    Args:
        video: a VideoConfig or its kwargs (fps, frame and pixel limits, resize mode, reader, box drawing, cache).
        max_new_tokens: generation budget per completion (256 = the released inference setting).
        temperature, top_p, top_k: None inherits the policy's values; top_k 0 = off.
        do_sample: False = greedy (evaluation).
        system_prompt: an optional system message (e.g. the one-shot format example); None = none (spec §3).
        generation_batch_size: rows per `generate` call of the `hf` engine (None = all N rows in one call).
        compute_old_logprobs: re-score for old_logprobs; False leaves zeros (evaluation only).
        engine_logprobs: ask the engine for its log-probs of the sampled tokens, keep them as
            `data["engine_logprobs"]` [N, T] and log their mismatch with the re-scored old_logprobs
            (`rollout/engine_logprob_abs_diff_mean`, `_max`); the sampled tokens are the same either way.
        engine: what generates: "hf" (HF `generate` on the policy's module, the default), "server" (`renorm
            serve-policy` on this config: the patches, grids and token types travel per prompt in the request's
            `multimodal` form; greedy and sampled tokens equal `hf`'s for a seed while the request fits one
            `multimodal_chunk_bytes`), "vllm" (colocated, `enable_mm_embeds=True`), or an engine node with options.
    """

    def __init__(
        self,
        video: VideoConfig | Mapping[str, Any] | None = None,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        do_sample: bool = True,
        system_prompt: str | None = None,
        generation_batch_size: int | None = None,
        compute_old_logprobs: bool = True,
        engine: EngineName | HFEngine | ServerEngine | VLLMEngine = "hf",
        engine_logprobs: bool = True,
    ) -> None:
        check_sampler_options(max_new_tokens, temperature, top_p, top_k, generation_batch_size)
        self.video = video if isinstance(video, VideoConfig) else VideoConfig(**dict(video or {}))
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k, self.do_sample = temperature, top_p, top_k, do_sample
        self.system_prompt = system_prompt
        self.generation_batch_size = generation_batch_size
        self.compute_old_logprobs = compute_old_logprobs
        self.engine_logprobs = engine_logprobs
        self.engine = build_engine(engine, generation_batch_size)
        # Set by the Trainer when its update is on-policy: it then takes old_logprobs from its own first forward.
        self.defer_old_logprobs = False
        self.cache: VideoCache[VideoFeatures] = VideoCache(self.video.cache_size)
        self.skipped_total = 0

    def sample(self, policy: Policy, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        """G samples per readable prompt, group-major (`group_ids[i] = i // G`), re-scored for old_logprobs."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        temperature = self._temperature(policy)
        hits, misses = self.cache.hits, self.cache.misses
        dicts, videos = self._load_videos(policy, prompts)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        encoded = [self._encode(policy, d, v) for d, v in zip(dicts, videos, strict=True)]
        module = policy.module
        was_training = module.training
        module.eval()
        try:
            start = time.perf_counter()
            row_videos = [v for v in videos for _ in range(group_size)]
            # A frozen vision tower encodes each prompt's video once here; generation, the old-log-prob pass and the
            # training forwards take these embeddings (None: the tower runs in every forward).
            embeds = getattr(policy, "video_embeddings", lambda _: None)(row_videos)
            prompt_ids, prompt_mask, response_ids, result = self._generate(
                policy, encoded, videos, group_size, embeds, seed, temperature
            )
            sequences = (prompt_ids, prompt_mask, response_ids)
            rollout = self._build_rollout(policy, dicts, videos, group_size, sequences, temperature)
            if embeds is not None:
                rollout.data["video_embeds"] = embeds
            rollout.metrics["time/generate_s"] = time.perf_counter() - start
            rollout.metrics["video/skipped_prompts"] = float(len(prompts) - len(dicts))
            rollout.metrics["video/cache_hits"] = float(self.cache.hits - hits)
            rollout.metrics["video/cache_misses"] = float(self.cache.misses - misses)
            rollout.metrics["video/tokens_mean"] = sum(v.num_tokens for v in videos) / len(videos)
            rescored = self.compute_old_logprobs and not self.defer_old_logprobs
            if rescored:
                with torch.no_grad():
                    rollout.old_logprobs = policy.log_probs(rollout).detach()
            record_engine_logprobs(rollout, result, compare=rescored)
            rollout.metrics.update(result.metrics)  # the engine's own (weight sync time, retries, ...)
        finally:
            module.train(was_training)
        return rollout

    def video_features(self, policy: Policy, prompt: Mapping[str, Any]) -> VideoFeatures:
        """The prompt's processed video (cached); raises VideoError when it cannot be read."""
        video, fps, box = prompt.get("video"), prompt.get("fps"), region_box(prompt.get("rc_info"))
        if video is None:
            raise VideoError(str(prompt.get("id", "?")), "the prompt has no 'video'")
        source = video if isinstance(video, str) else tuple(str(v) for v in video)
        processor = getattr(policy, "processor")  # noqa: B009 (a Policy protocol has no processor attribute)
        key = (source, fps, box, self.video.key(), id(processor))
        return self.cache.get(key, lambda: _patchify(processor, load_video(video, self.video, fps, box)))

    def _load_videos(self, policy: Policy, prompts: list[Any]) -> tuple[list[dict[str, Any]], list[VideoFeatures]]:
        dicts, videos, errors = [], [], []
        for prompt in prompts:
            if not isinstance(prompt, dict) or "prompt" not in prompt:
                raise ValueError(f"a video prompt must be a dict with 'prompt' and 'video', got {prompt!r:.80}")
            try:
                videos.append(self.video_features(policy, prompt))
            except VideoError as error:
                errors.append(str(error))
                log.warning("skipping prompt %s: %s", prompt.get("id", "?"), error)
                continue
            dicts.append(prompt)
        self.skipped_total += len(errors)
        if not dicts:
            raise VideoError("<batch>", f"none of the {len(prompts)} prompts has a readable video: {errors[:3]}")
        return dicts, videos

    def _temperature(self, policy: Policy) -> float:
        policy_temperature = float(getattr(policy, "temperature", 1.0))
        temperature = policy_temperature if self.temperature is None else float(self.temperature)
        if self.compute_old_logprobs and self.do_sample and temperature != policy_temperature:
            raise ValueError(
                f"sampler temperature {temperature} differs from the policy's {policy_temperature}: the re-scored "
                "old_logprobs would not be the sampling distribution's (set compute_old_logprobs=False to evaluate)"
            )
        return temperature

    def _encode(self, policy: Policy, prompt: Mapping[str, Any], video: VideoFeatures) -> list[int]:
        processor = getattr(policy, "processor")  # noqa: B009
        messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": "video"}, {"type": "text", "text": str(prompt["prompt"])}]
        messages.append({"role": "user", "content": content})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(VIDEO_PLACEHOLDER) != 1:
            raise ValueError(f"the chat template must render one {VIDEO_PLACEHOLDER} per video, got: {text!r:.200}")
        text = text.replace(VIDEO_PLACEHOLDER, VIDEO_PLACEHOLDER * video.num_tokens)
        ids: list[int] = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids

    def _generate(
        self,
        policy: Policy,
        prompts: list[list[int]],
        videos: list[VideoFeatures],
        group_size: int,
        embeds: list[Tensor] | None,
        seed: int,
        temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor, GenerationResult]:
        """Left-padded prompts [N, L] (+ bool mask), responses [N, T] padded with the pad id and the engine's result,
        for P `prompts` (their `videos`) and G = `group_size` rows each; `embeds` has one entry per row."""
        module = unwrap(policy.module)
        device = next(module.parameters()).device
        params = self._sampling_params(policy, module, temperature)
        pad = params.pad_token_id
        assert pad is not None  # set by _sampling_params
        video_id, image_id = int(getattr(policy, "video_token_id")), getattr(policy, "image_token_id", None)  # noqa: B009
        row_videos = [v for v in videos for _ in range(group_size)]

        def video_inputs(part: slice, ids: Tensor) -> dict[str, Any]:
            """The model's video inputs for rows `part` (left-padded prompt ids `ids`)."""
            return {
                "mm_token_type_ids": _mm_token_types(ids, video_id, image_id),
                **video_batch(row_videos[part], device, None if embeds is None else embeds[part]),
            }

        portable = video_prompt_inputs(prompts, videos, video_id, image_id)
        request = GenerationRequest(prompts, params, group_size, seed, self.engine_logprobs, video_inputs, portable)
        result = self.engine.generate(policy, request)
        result.check_rows(request)
        prompt_ids, prompt_mask = left_pad(request.rows(), pad, device)
        return prompt_ids, prompt_mask, result.padded_tokens(pad).to(device), result

    def _sampling_params(self, policy: Policy, module: nn.Module, temperature: float) -> SamplingParams:
        """This sampler's settings as engine `SamplingParams`, falling back to the policy's (and its suppressed ids)."""
        tokenizer = getattr(policy, "tokenizer")  # noqa: B009
        eos = model_eos_ids(tokenizer, module)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        top_p = self.top_p if self.top_p is not None else float(getattr(policy, "top_p", 1.0))
        top_k = self.top_k if self.top_k is not None else (getattr(policy, "top_k", None) or 0)
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            do_sample=self.do_sample,
            eos_token_ids=tuple(eos),
            pad_token_id=int(pad),
            suppress_token_ids=tuple(int(t) for t in getattr(policy, "suppressed_token_ids", [])),
        )

    def _build_rollout(
        self,
        policy: Policy,
        dicts: list[dict[str, Any]],
        videos: list[VideoFeatures],
        group_size: int,
        sequences: tuple[Tensor, Tensor, Tensor],
        temperature: float,
    ) -> Rollout:
        prompt_ids, prompt_mask, response_ids = sequences
        device = response_ids.device
        eos = list(self._sampling_params(policy, unwrap(policy.module), temperature).eos_token_ids)
        is_end = torch.isin(response_ids, torch.tensor(eos, device=device))
        finished = is_end.any(dim=1)
        first_end = torch.where(is_end, torch.arange(response_ids.shape[1], device=device), response_ids.shape[1])
        lengths = torch.where(finished, first_end.amin(dim=1) + 1, response_ids.shape[1])
        response_mask = torch.arange(response_ids.shape[1], device=device)[None, :] < lengths[:, None]
        tokenizer = getattr(policy, "tokenizer")  # noqa: B009
        completions = tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(response_ids.tolist(), lengths.tolist(), strict=True)], skip_special_tokens=True
        )
        rows = [d for d in dicts for _ in range(group_size)]
        return Rollout(
            group_ids=torch.arange(len(rows), device=device) // group_size,
            old_logprobs=torch.zeros(response_ids.shape, dtype=torch.float32, device=device),
            mask=response_mask.clone(),
            lengths=lengths,
            truncated=~finished,
            prompts=rows,
            completions=completions,
            dataset_ids=_labels(rows, "dataset"),
            task_ids=_labels(rows, "task"),
            prompt_keys=[str(d["id"]) if "id" in d else json.dumps(d["prompt"]) for d in rows],
            data={
                "prompt_ids": prompt_ids,
                "prompt_attention_mask": prompt_mask,
                "response_ids": response_ids,
                "response_attention_mask": response_mask,
                "videos": [v for v in videos for _ in range(group_size)],
                "temperature": temperature,
            },
            metrics={
                "rollout/length_mean": float(lengths.float().mean()),
                "rollout/truncated_frac": float((~finished).float().mean()),
                "rollout/prompt_length_mean": float(prompt_mask.sum(1).float().mean()),
            },
        )


def video_prompt_inputs(
    prompts: list[list[int]], videos: list[VideoFeatures], video_token_id: int, image_token_id: int | None
) -> MultimodalInputs:
    """The serialisable form of the prompts' video inputs (`GenerationRequest.multimodal`): each prompt's patches,
    grid and seconds per grid step (concatenated across rows), and its token types (left-padded as its ids).

    Always the patches, even when the sampler reuses vision embeddings: the engine's model runs its own tower (the
    same frozen weights; on CPU the same numbers), and vLLM gets embeddings its engine computes from the patches.
    """
    per_prompt = []
    for ids, video in zip(prompts, videos, strict=True):
        types = _mm_token_types(torch.tensor(ids, dtype=torch.long), video_token_id, image_token_id)
        per_prompt.append(
            {
                "pixel_values_videos": video.pixel_values_videos,
                "video_grid_thw": video.video_grid_thw,
                "second_per_grid_ts": torch.tensor([video.second_per_grid_ts]),
                "mm_token_type_ids": types,
            }
        )
    batching: dict[str, Batching] = {key: "concat" for key in per_prompt[0]}
    batching["mm_token_type_ids"] = "left_pad"
    return MultimodalInputs(tuple(per_prompt), batching)


def _patchify(processor: Any, video: Any) -> VideoFeatures:
    """Flatten a ProcessedVideo into the model's patches with the processor's own normalisation (no resize)."""
    video_processor = processor.video_processor
    kwargs: dict[str, Any] = {"do_resize": False, "return_tensors": "pt"}
    kwargs["do_sample_frames"] = False  # frames were sampled by the video pipeline
    if hasattr(video_processor, "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False  # sizing is done already (qwen-vl-utils rules)
    out = video_processor(videos=[video.frames], **kwargs)
    grid = out["video_grid_thw"].long()
    merge = int(getattr(video_processor, "merge_size", 2))
    temporal = int(getattr(video_processor, "temporal_patch_size", 2))
    return VideoFeatures(
        pixel_values_videos=out["pixel_values_videos"],
        video_grid_thw=grid,
        second_per_grid_ts=temporal / video.fps,
        num_tokens=int(grid.prod()) // merge**2,
    )


def _labels(rows: list[dict[str, Any]], key: str) -> list[str] | None:
    if not any(key in d for d in rows):
        return None
    return [str(d.get(key, "default")) for d in rows]
