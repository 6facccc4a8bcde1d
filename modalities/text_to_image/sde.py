"""Flow-matching SDE steps with Gaussian log-probs, the sigma schedule and trained-step subsampling.

One pure-function module shared by `FlowSDESampler` (sampling) and `FlowMatchingPolicy` (re-scoring), so
both compute the same numbers. Rectified-flow convention: x_σ = (1 − σ) x_0 + σ ε, σ = 1 is noise, the
network predicts v ≈ ε − x_0. All step math runs in float32 whatever the model's dtype (docs/methods/pref_grpo.md §1).
Simplified: sigmas are per-row tensors (one σ per batch row), never per-element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from toolkit.objective.kl import gaussian_mean_kl

StepMode = Literal["flow", "dance"]
Reduce = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One SDE transition: next latent, its log-prob [N], the Gaussian mean and the noise std [N]."""

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def _check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def sd3_time_shift(shift: float, t: Tensor | float) -> Tensor:
    """Static time shift σ = shift·t / (1 + (shift − 1)·t) (SD3, arXiv:2403.03206 eq. 23).

    Args:
        shift: the shift s (3 in Pref-GRPO / Flow-GRPO); 1 = no shift.
        t: unshifted times in [0, 1] (any shape).

    Returns:
        Shifted sigmas, same shape as `t`, float32.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def sigma_schedule(num_steps: int, shift: float = 3.0, scheduler: Any = None) -> Tensor:
    """[S + 1] float32 sampling grid σ_0 = 1 > … > σ_S = 0 (docs/methods/pref_grpo.md §1.3).

    Args:
        num_steps: S denoising steps.
        shift: static shift applied to `linspace(1, 0, S + 1)` (ignored when `scheduler` is given).
        scheduler: optional diffusers flow-matching scheduler; its own sigmas after
            `set_timesteps(S)` are used instead (e.g. FLUX's resolution-dependent shift).

    Returns:
        The sigmas, decreasing, first 1 (or the scheduler's first) and last 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if scheduler is not None:
        scheduler.set_timesteps(num_steps)
        sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32).cpu()
        if sigmas.numel() != num_steps + 1:
            raise ValueError(f"the scheduler gave {sigmas.numel()} sigmas, expected {num_steps + 1}")
        return sigmas
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return sd3_time_shift(shift, torch.linspace(1.0, 0.0, num_steps + 1))


def _per_row(value: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or [N] value as a float32 tensor broadcastable against x [N, ...]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected a scalar or [N={x.shape[0]}] tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """log N(sample; mean, std²) per element, reduced over all non-batch dims.

    Args:
        sample: [N, ...] float32.
        mean: [N, ...] float32.
        std: [N, 1, ...] broadcastable std (> 0).
        reduce: "mean" (Flow-GRPO / Pref-GRPO parity) or "sum" (the exact joint log-density).

    Returns:
        [N] float32 log-probs.
    """
    _check("reduce", reduce, get_args(Reduce))
    elementwise = -((sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    flat = elementwise.flatten(1)
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)


def _finish(
    mean: Tensor,
    std: Tensor,
    noise: Tensor | None,
    prev_sample: Tensor | None,
    generator: torch.Generator | None,
    reduce: Reduce,
) -> StepOutput:
    if prev_sample is not None and noise is not None:
        raise ValueError("give at most one of noise and prev_sample")
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduce)
    return StepOutput(prev_sample, log_prob, mean, std.flatten())


def flow_grpo_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: Tensor | float,
    sigma_guard: Tensor | float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce = "mean",
) -> StepOutput:
    """Flow-GRPO SDE step (arXiv:2505.05470 eq. 9–12; docs/methods/pref_grpo.md §1.1, P3).

    s = η·sqrt(σ / (1 − σ̃)) with σ̃ = `sigma_guard` where σ == 1 (no 1/0 at the first step), Δ = σ' − σ,
    μ = x·(1 + s²Δ/(2σ)) + v·(1 + s²(1 − σ)/(2σ))·Δ, x' = μ + s·sqrt(−Δ)·ε.

    Args:
        x: [N, ...] current latent x_k (any float dtype; computed in float32).
        v: [N, ...] predicted velocity.
        sigma: σ_k, scalar or [N].
        sigma_next: σ_{k+1} < σ_k, scalar or [N].
        eta: noise level η (0.7), scalar or [N].
        sigma_guard: σ̃ used where σ == 1; the grid's σ_1 (Flow-GRPO `sigmas[1]`).
        noise: optional ε [N, ...]; drawn from `generator` when neither it nor `prev_sample` is given.
        prev_sample: the observed x_{k+1} to score (re-scoring); then no noise is drawn.
        generator: RNG for ε.
        reduce: log-prob reduction over non-batch dims ("mean" for parity, or "sum").

    Returns:
        StepOutput(prev_sample x_{k+1}, log_prob [N], mean μ, std [N] = s·sqrt(−Δ)).
    """
    x, v = x.float(), v.float()
    s_cur, s_next, eta_t = _per_row(sigma, x), _per_row(sigma_next, x), _per_row(eta, x)
    guard = _per_row(sigma_guard, x)
    delta = s_next - s_cur
    denominator = 1.0 - torch.where(s_cur >= 1.0, guard, s_cur)
    s = eta_t * torch.sqrt(s_cur / denominator)
    mean = x * (1.0 + s**2 * delta / (2.0 * s_cur)) + v * (1.0 + s**2 * (1.0 - s_cur) / (2.0 * s_cur)) * delta
    std = s * torch.sqrt(-delta)
    return _finish(mean, std, noise, prev_sample, generator, reduce)


def dance_grpo_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: Tensor | float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce = "mean",
) -> StepOutput:
    """DanceGRPO SDE step (arXiv:2505.07818; docs/methods/pref_grpo.md §1.2, P4).

    μ = x + Δ·v + (−½η²·score)·Δ with x̂_0 = x − σv and score = −(x − (1 − σ)x̂_0)/σ²;
    std = η·sqrt(σ − σ'). The log-prob keeps the Gaussian constants (Pref-GRPO v1 drops them by
    accident; ratios are unaffected).

    Args:
        x, v: [N, ...] latent and velocity; sigma, sigma_next, eta: scalars or [N].
        noise, prev_sample, generator, reduce: as in `flow_grpo_step`.

    Returns:
        StepOutput(prev_sample, log_prob [N], mean, std [N]).
    """
    x, v = x.float(), v.float()
    s_cur, s_next, eta_t = _per_row(sigma, x), _per_row(sigma_next, x), _per_row(eta, x)
    delta = s_next - s_cur
    x0_hat = x - s_cur * v
    score = -(x - (1.0 - s_cur) * x0_hat) / s_cur**2
    mean = x + delta * v + (-0.5 * eta_t**2 * score) * delta
    std = eta_t * torch.sqrt(-delta)
    return _finish(mean, std, noise, prev_sample, generator, reduce)


def sde_step(
    mode: StepMode,
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: Tensor | float,
    sigma_guard: Tensor | float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce = "mean",
) -> StepOutput:
    """Dispatch to `flow_grpo_step` ("flow") or `dance_grpo_step` ("dance"); same arguments."""
    _check("step_mode", mode, get_args(StepMode))
    if mode == "flow":
        return flow_grpo_step(x, v, sigma, sigma_next, eta, sigma_guard, noise, prev_sample, generator, reduce)
    return dance_grpo_step(x, v, sigma, sigma_next, eta, noise, prev_sample, generator, reduce)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float, reduce: Reduce = "mean") -> Tensor:
    """Flow-GRPO's closed-form step KL ‖μ_θ − μ_ref‖² / (2σ²), [N] (wraps `toolkit.objective.kl.gaussian_mean_kl`)."""
    return gaussian_mean_kl(mean, ref_mean, std, reduce)


def num_trained_steps(num_steps: int, ignore_last: bool, train_step_fraction: float) -> int:
    """T = ⌊K·fraction⌋ with K = S − 1 when `ignore_last` else S (P8: 25 → 24 → 14)."""
    candidates = num_steps - 1 if ignore_last else num_steps
    if candidates < 1:
        raise ValueError(f"num_steps={num_steps} with ignore_last={ignore_last} leaves no step to train")
    if not 0.0 < train_step_fraction <= 1.0:
        raise ValueError(f"train_step_fraction must be in (0, 1], got {train_step_fraction}")
    count = int(math.floor(candidates * train_step_fraction + 1e-9))
    if count < 1:
        raise ValueError(f"train_step_fraction={train_step_fraction} of {candidates} steps trains no step")
    return count


def trained_steps(
    num_steps: int,
    ignore_last: bool,
    train_step_fraction: float,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> Tensor:
    """[N, T] int64 trained transition indices: a fresh random permutation per sample, first T kept, sorted.

    DanceGRPO / Pref-GRPO draw `randperm` over the S (or S − 1 with `ignore_last`) transitions per sample
    and train the first ⌊K·train_step_fraction⌋ (docs/methods/pref_grpo.md §1.3, P8). Sorting within a row changes
    nothing (the set is what is trained) and keeps layouts comparable.

    Args:
        num_steps: S sampling steps.
        ignore_last: drop the last transition σ_{S−1} → 0 from the candidates.
        train_step_fraction: fraction of the candidates trained per sample.
        generator: RNG for the permutations (CPU).
        num_samples: N rows.

    Returns:
        [N, T] sorted indices in [0, K).
    """
    count = num_trained_steps(num_steps, ignore_last, train_step_fraction)
    candidates = num_steps - 1 if ignore_last else num_steps
    rows = [torch.randperm(candidates, generator=generator)[:count] for _ in range(num_samples)]
    if not rows:
        return torch.empty(0, count, dtype=torch.long)
    return torch.stack(rows).sort(dim=1).values
