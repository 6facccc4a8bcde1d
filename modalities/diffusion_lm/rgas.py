"""Reward-guided ancestral sampler (RGAS) of DiDi-Instruct: gradient tilting, then candidate re-ranking.

Spec docs/methods/didi_instruct.md §12, §17 and E7 (arXiv:2509.25035; official `generate_samples` /
`reward_guided_ancestral_step` @7825a02). The first K = int(N·(1 − ρ)) steps add h·clamp(∇ D, ±1) to the
student's raw logits at masked positions (D sees soft tokens); the remaining steps draw M candidates and
pick one with probability softmax(score) (released) or softmax(h·score) (development copy).
Switches: `reranker: released|dev`, `student_sigma: real|zero`, and the final denoiser is whichever
model the caller passes (`final_denoiser: ema|backbone` in the spec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalities.diffusion_lm.sampling import (
    T_MIN,
    ancestral_q,
    ancestral_step,
    denoise_final,
    sample_categorical,
    sampling_grid,
)
from modalities.diffusion_lm.schedules import MaskingSchedule

Reranker = Literal["released", "dev"]
StudentSigma = Literal["real", "zero"]


@dataclass
class RGASSchedule:
    """Step plan of RGAS: times [N+1] float64, mean step size, tilting-step count K and the h of each step [N]."""

    timesteps: Tensor
    dt: float
    num_tilt_steps: int
    guidance: list[float]


def rgas_schedule(
    num_steps: int,
    rerank_ratio: float = 0.5,
    h_start: float = 30.0,
    h_end: float = 40.0,
    reranker: Reranker = "released",
    t_min: float = T_MIN,
    time_grid: str = "uniform",
) -> RGASSchedule:
    """RGAS time grid and guidance ramp (spec §12, E7: N = 8, ρ = 0.5 → K = 4, h = [30, 33.33, 36.67, 40]).

    Released: h_i = h0 + i/max(1, K−1)·(h1 − h0) on the K tilting steps, 0 on the re-ranking steps.
    Dev: h_i = h0 + i/max(1, N−1)·(h1 − h0) on every step (also the re-ranking temperature).

    Args:
        num_steps: N sampling steps.
        rerank_ratio: ρ, the fraction of steps that re-rank.
        h_start, h_end: h0, h1.
        reranker: "released" or "dev".
        t_min: last time of the grid (1e-5).
        time_grid: "uniform" (the spec's linspace) or "cosine" (`sampling.sampling_grid`).
    """
    if reranker not in get_args(Reranker):
        raise ValueError(f"reranker={reranker!r} is not one of {get_args(Reranker)}")
    if num_steps < 1 or not 0.0 <= rerank_ratio <= 1.0:
        raise ValueError(f"need num_steps >= 1 and 0 <= rerank_ratio <= 1, got {num_steps}, {rerank_ratio}")
    k = int(num_steps * (1 - rerank_ratio))
    if reranker == "released":
        guidance = [h_start + i / max(1, k - 1) * (h_end - h_start) if i < k else 0.0 for i in range(num_steps)]
    else:
        guidance = [h_start + i / max(1, num_steps - 1) * (h_end - h_start) for i in range(num_steps)]
    timesteps = sampling_grid(num_steps, t_min, kind=time_grid)
    return RGASSchedule(timesteps, (1.0 - t_min) / num_steps, k, guidance)


def tilt_logits(logits: Tensor, grad: Tensor, masked: Tensor, h: float) -> Tensor:
    """logits + h·clamp(grad·masked, −1, 1) (spec §12; E7: [2,1,0,−1], g [0.5,−2,0.1,0], h 30 → [17,−29,3,−1]).

    Args:
        logits: [B, L, V] raw student logits.
        grad: [B, L, V] ∂(Σ_masked D)/∂logits.
        masked: [B, L] bool, masked positions (others get no tilt).
        h: guidance scale.
    """
    return logits + h * (grad * masked[..., None]).clamp(-1.0, 1.0)


def rerank_probs(scores: Tensor, h: float = 1.0, reranker: Reranker = "released") -> Tensor:
    """Candidate probabilities softmax(scores) (released) or softmax(h·scores) (dev) over [B, M] (E7)."""
    if reranker not in get_args(Reranker):
        raise ValueError(f"reranker={reranker!r} is not one of {get_args(Reranker)}")
    return torch.softmax(scores.float() * (h if reranker == "dev" else 1.0), dim=-1)


def discriminator_gradient(discriminator: nn.Module, logits: Tensor, x: Tensor, sigma: Tensor, mask_id: int) -> Tensor:
    """∂/∂logits of Σ_{masked ℓ} D(soft_in, σ)[ℓ]; soft_in = logits where masked, 1e9·one-hot elsewhere (fp32)."""
    masked = x == mask_id
    one_hot = F.one_hot(x, logits.shape[-1]).float() * 1e9
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_(True)
        soft = torch.where(masked[..., None], leaf, one_hot)
        total = (discriminator(soft, sigma).float() * masked).sum()
        (grad,) = torch.autograd.grad(total, leaf)
    return grad


@torch.no_grad()
def rgas_sample(
    student: nn.Module,
    discriminator: nn.Module,
    schedule: MaskingSchedule,
    x: Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
    *,
    num_candidates: int = 4,
    h_start: float = 30.0,
    h_end: float = 40.0,
    rerank_ratio: float = 0.5,
    reranker: Reranker = "released",
    student_sigma: StudentSigma = "real",
    final_denoiser: nn.Module | None = None,
    final_mode: str = "sample",
    time_grid: str = "uniform",
) -> Tensor:
    """Generate from x [B, L] (all masks, or a prefix + masks) with RGAS; unmasked tokens never change.

    Args:
        student: the (EMA) student backbone, called raw as `student(x, σ)` (spec §12: no SUBS).
        discriminator: D(tokens or soft tokens, σ) -> [B, L] logits.
        schedule: the masking schedule.
        num_steps: N.
        num_candidates: M candidates per re-ranking step.
        h_start, h_end, rerank_ratio, reranker: see `rgas_schedule`.
        student_sigma: "real" feeds σ_t = −log α_t (released numbers), "zero" the σ = 0 of training.
        final_denoiser: backbone for the final noise removal (σ = 0, SUBS); default `student`.
        final_mode: `denoise_final` mode.
        time_grid: the sampling grid, "uniform" (spec) or "cosine".
    """
    if student_sigma not in get_args(StudentSigma):
        raise ValueError(f"student_sigma={student_sigma!r} is not one of {get_args(StudentSigma)}")
    mask_id: int = student.mask_id  # type: ignore[assignment]  # a DenoiserBackbone attribute
    plan = rgas_schedule(num_steps, rerank_ratio, h_start, h_end, reranker, time_grid=time_grid)
    alphas = schedule.alpha(plan.timesteps).to(x.device)
    rows = x.shape[0]
    for i in range(num_steps):
        sigma_t = (-torch.log(alphas[i])).float().expand(rows)
        logits = student(x, sigma_t if student_sigma == "real" else torch.zeros_like(sigma_t)).float()
        if i < plan.num_tilt_steps:
            grad = discriminator_gradient(discriminator, logits, x, sigma_t, mask_id)
            logits = tilt_logits(logits, grad, x == mask_id, plan.guidance[i])
            x = ancestral_step(x, torch.softmax(logits, -1), alphas[i], alphas[i + 1], mask_id, generator)
            continue
        q = ancestral_q(torch.softmax(logits, -1), alphas[i], alphas[i + 1], mask_id)
        draws = sample_categorical(q[:, None].expand(-1, num_candidates, -1, -1), generator)
        candidates = torch.where(x[:, None] == mask_id, draws, x[:, None])
        sigma_s = (-torch.log(alphas[i + 1])).float().expand(rows * num_candidates)
        scores = discriminator(candidates.reshape(rows * num_candidates, -1), sigma_s).float().sum(-1)
        probs = rerank_probs(scores.view(rows, num_candidates), plan.guidance[i], reranker)
        pick = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        x = candidates[torch.arange(rows, device=x.device), pick]
    return final_step(final_denoiser or student, x, mask_id, generator, final_mode)


def final_step(backbone: nn.Module, x: Tensor, mask_id: int, generator: torch.Generator | None, mode: str) -> Tensor:
    """Noise removal at t_min with `backbone` (σ = 0, SUBS), only when masks remain."""
    from modalities.diffusion_lm.masked_diffusion import subs_log_probs

    if not bool((x == mask_id).any()) or mode == "none":
        return x
    logits = backbone(x, torch.zeros(x.shape[0], device=x.device))
    return denoise_final(x, subs_log_probs(logits, x, mask_id).exp(), mask_id, generator, mode)
