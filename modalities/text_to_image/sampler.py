"""Flow-matching SDE sampler with per-step log-probs (Flow-GRPO / DanceGRPO rollouts, docs/methods/pref_grpo.md §1, §5).

Every denoising step is an SDE step (`modalities.text_to_image.sde`); its log-prob is recorded as it is
sampled (no extra forward), the whole latent trajectory is stored for re-scoring, and the trained
transitions are drawn per sample (`ignore_last`, `train_step_fraction`). The final latent is decoded by
the policy's VAE into PIL images (`rollout.completions`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import Tensor

from modalities.text_to_image.policy import FlowMatchingPolicy
from modalities.text_to_image.sde import Reduce, StepMode, sde_step, sigma_schedule, trained_steps
from toolkit.config.types import read_text_file
from toolkit.rollout import Rollout


class FlowSDESampler:
    """G images per prompt with the SDE sampler; old_logprobs are the sampled steps' log-probs.

    Prompts are dicts with "prompt" (the caption) and optional "id", "dataset", ... (kept in
    `rollout.prompts`); a bare string is accepted. Reproducible from the trainer's generator: one seed is
    drawn from it and seeds a generator on the policy's device for the initial noise and every step.

    Args:
        num_steps: S denoising steps (Pref-GRPO 25, Flow-GRPO 10 for SD3.5).
        guidance_scale: SD3: true-CFG scale w (≤ 1 = no unconditional branch); FLUX: the guidance
            embedding value (3.5 for FLUX.1-dev).
        eta: SDE noise level η (flow 0.7; dance 0.3 in DanceGRPO).
        step_mode: "flow" (Flow-GRPO SDE) or "dance" (DanceGRPO).
        shift: static shift of the sigma grid (3).
        use_scheduler_sigmas: take the sigmas from `scheduler` instead of the static shift.
        scheduler: a diffusers flow-matching scheduler (only with `use_scheduler_sigmas`).
        init_same_noise: all G samples of a prompt start from the same initial latent.
        ignore_last: never train the last transition σ_{S−1} → 0.
        train_step_fraction: fraction of the candidate transitions trained per sample (0.6 → 14 of 24).
        height, width: image size in pixels.
        logprob_reduce: "mean" over latent dims (parity) or "sum".
        negative_prompt: unconditional caption for SD3 CFG.
        decode: decode final latents to PIL images (False: `completions` are the latents).
    """

    def __init__(
        self,
        num_steps: int = 25,
        guidance_scale: float = 3.5,
        eta: float = 0.7,
        step_mode: StepMode = "flow",
        shift: float = 3.0,
        use_scheduler_sigmas: bool = False,
        scheduler: Any = None,
        init_same_noise: bool = True,
        ignore_last: bool = True,
        train_step_fraction: float = 0.6,
        height: int = 512,
        width: int = 512,
        logprob_reduce: Reduce = "mean",
        negative_prompt: str = "",
        decode: bool = True,
    ) -> None:
        if step_mode not in get_args(StepMode):
            raise ValueError(f"step_mode={step_mode!r} is not one of {list(get_args(StepMode))}")
        if logprob_reduce not in get_args(Reduce):
            raise ValueError(f"logprob_reduce={logprob_reduce!r} is not one of {list(get_args(Reduce))}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0 (the SDE needs noise for log-probs), got {eta}")
        if use_scheduler_sigmas and scheduler is None:
            raise ValueError("use_scheduler_sigmas=True needs a scheduler")
        self.sigmas = sigma_schedule(num_steps, shift, scheduler if use_scheduler_sigmas else None)
        trained_steps(num_steps, ignore_last, train_step_fraction)  # validates the subsampling settings
        self.num_steps, self.guidance_scale, self.eta = num_steps, float(guidance_scale), float(eta)
        self.step_mode: StepMode = step_mode
        self.init_same_noise, self.ignore_last = init_same_noise, ignore_last
        self.train_step_fraction = train_step_fraction
        self.height, self.width = height, width
        self.logprob_reduce: Reduce = logprob_reduce
        self.negative_prompt, self.decode = negative_prompt, decode

    def sample(
        self, policy: FlowMatchingPolicy, prompts: list[Any], group_size: int, generator: torch.Generator
    ) -> Rollout:
        """G samples per prompt, group-major (`group_ids[i] = i // G`)."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        dicts = [_as_prompt_dict(p) for p in prompts]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        module = policy.module
        was_training = module.training
        module.eval()
        try:
            start = time.perf_counter()
            with torch.no_grad():
                rollout = self._sample(policy, dicts, group_size, seed)
            rollout.metrics["time/generate_s"] = time.perf_counter() - start
        finally:
            module.train(was_training)
        return rollout

    def conditioning(self, policy: FlowMatchingPolicy, captions: list[str], group_size: int) -> dict[str, Tensor]:
        """Per-row text conditioning [N, ...] (with the negative prompt's when SD3 runs true CFG)."""
        embeds, pooled = policy.encode_prompts(captions)
        cond = {
            "prompt_embeds": embeds.repeat_interleave(group_size, 0),
            "pooled_prompt_embeds": pooled.repeat_interleave(group_size, 0),
        }
        if policy.arch == "sd3" and self.guidance_scale > 1.0:
            neg, neg_pooled = policy.encode_prompts([self.negative_prompt])
            n = cond["prompt_embeds"].shape[0]
            cond["negative_prompt_embeds"] = neg.expand(n, *neg.shape[1:]).contiguous()
            cond["negative_pooled_prompt_embeds"] = neg_pooled.expand(n, -1).contiguous()
        return cond

    def initial_noise(
        self, policy: FlowMatchingPolicy, num_prompts: int, group_size: int, generator: torch.Generator
    ) -> Tensor:
        """[N, ...] float32 x_0 ~ N(0, I); shared within a group when `init_same_noise`."""
        shape = policy.latent_shape(self.height, self.width)
        draws = num_prompts if self.init_same_noise else num_prompts * group_size
        noise = torch.randn((draws, *shape), generator=generator, device=policy.device, dtype=torch.float32)
        return noise.repeat_interleave(group_size, 0) if self.init_same_noise else noise

    def _sample(self, policy: FlowMatchingPolicy, dicts: list[dict[str, Any]], group_size: int, seed: int) -> Rollout:
        device = policy.device
        rng = torch.Generator(device=device).manual_seed(seed)
        cond = self.conditioning(policy, [str(d["prompt"]) for d in dicts], group_size)
        x = self.initial_noise(policy, len(dicts), group_size, rng)
        n = x.shape[0]
        sigmas = self.sigmas.to(device)
        guidance = torch.full((n,), self.guidance_scale, device=device)
        eta = torch.full((n,), self.eta, device=device)
        trajectory, logprobs = [x], []
        for k in range(self.num_steps):
            sigma = sigmas[k].expand(n)
            v = policy.velocity(x, sigma, cond, guidance, image_size=(self.height, self.width))
            out = sde_step(
                self.step_mode, x, v, sigma, sigmas[k + 1], eta, sigmas[1], generator=rng, reduce=self.logprob_reduce
            )
            x = out.prev_sample
            trajectory.append(x)
            logprobs.append(out.log_prob)
        cpu_rng = torch.Generator().manual_seed(seed)
        steps = trained_steps(self.num_steps, self.ignore_last, self.train_step_fraction, cpu_rng, n).to(device)
        old_logprobs = torch.stack(logprobs, dim=1).gather(1, steps)
        data: dict[str, Any] = {
            "latents": torch.stack(trajectory, dim=1),
            "step_indices": steps,
            "sigmas": sigmas.expand(n, -1).contiguous(),
            "eta": eta,
            "guidance_scale": guidance,
            "image_size": torch.tensor([[self.height, self.width]], device=device).expand(n, 2).contiguous(),
            "sde": {"step_mode": self.step_mode, "reduce": self.logprob_reduce},
            **cond,
        }
        return self._build_rollout(policy, dicts, group_size, old_logprobs, data)

    def _build_rollout(
        self,
        policy: FlowMatchingPolicy,
        dicts: list[dict[str, Any]],
        group_size: int,
        old_logprobs: Tensor,
        data: dict[str, Any],
    ) -> Rollout:
        n = old_logprobs.shape[0]
        final = data["latents"][:, -1]
        completions: list[Any] = list(final.cpu())
        if self.decode and policy.vae is not None:
            completions = to_pil(policy.decode(final, self.height, self.width))
        rows = [d for d in dicts for _ in range(group_size)]
        datasets = [str(d.get("dataset", "default")) for d in rows] if any("dataset" in d for d in dicts) else None
        return Rollout(
            group_ids=torch.arange(n, device=old_logprobs.device) // group_size,
            old_logprobs=old_logprobs.float(),
            mask=torch.ones_like(old_logprobs, dtype=torch.bool),
            lengths=torch.full((n,), old_logprobs.shape[1], dtype=torch.long, device=old_logprobs.device),
            prompts=rows,
            completions=completions,
            dataset_ids=datasets,
            prompt_keys=[str(d.get("id", d["prompt"])) for d in rows],
            data=data,
        )


def to_pil(images: Tensor) -> list[Any]:
    """[N, 3, H, W] floats in [0, 1] → N RGB `PIL.Image.Image`."""
    from PIL import Image

    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def _as_prompt_dict(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        return dict(prompt)
    raise ValueError(f"a prompt must be a caption string or a dict with a 'prompt' key, got {prompt!r:.80}")


def read_captions(path: str, column: str | None = None) -> list[dict[str, Any]]:
    """Prompt records from a caption file, for `toolkit.data.PromptDataset(records=...)`.

    `.txt`: one caption per non-empty line (UniGenBench `data/train_prompt.txt`); `.csv`: the `column`
    field (default: "prompt_en", else "prompt", UniGenBench `test_prompts_en.csv`); anything else is
    JSON Lines with a "prompt" field. Records get "id" = line/row index unless they carry one.
    """
    import csv
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caption file not found: {file}")
    text = read_text_file(file)
    if file.suffix == ".txt":
        records = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    elif file.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        key = column or next((k for k in ("prompt_en", "prompt") if rows and k in rows[0]), None)
        if key is None or (rows and key not in rows[0]):
            raise ValueError(f"{file}: no caption column {column or 'prompt_en/prompt'}; columns: {list(rows[0])}")
        records = [{**row, "prompt": row[key]} for row in rows]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{file} holds no captions")
    return [{"id": str(i), **r} for i, r in enumerate(records)]
