"""Ancestral sampling of absorbing-state (masked) diffusion: the reverse step, noise removal, the sampler loop.

Spec docs/methods/didi_instruct.md §3 (MDLM arXiv:2406.07524 Eq. 7 with SUBS; official `_sample_categorical`, E2).
For s < t a masked position becomes token v with probability (α_s − α_t)/(1 − α_t)·x_θ,v and stays masked with
(1 − α_s)/(1 − α_t); unmasked positions never change. The step builds the unnormalised q (sum 1 − α_t) and
samples argmax(q / E), E ~ Exp(1). All step math is float32 (the schedule float64) whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from modalities.diffusion_lm.schedules import MaskingSchedule

LogProbsFn = Callable[[Tensor, Tensor], Tensor]
FinalMode = Literal["sample", "argmax", "none"]
FINAL_MODES: tuple[str, ...] = ("sample", "argmax", "none")
TIME_GRIDS: tuple[str, ...] = ("uniform", "cosine")
T_MIN = 1e-5


def check_time_grid(value: str, field: str = "time_grid") -> str:
    """`value` if it is one of TIME_GRIDS, else a ValueError naming `field` (the config key that set it)."""
    if value not in TIME_GRIDS:
        raise ValueError(f"{field}={value!r} is not one of {TIME_GRIDS}")
    return value


def check_temperature(value: float, field: str = "temperature") -> float:
    """`value` as a float if it is finite and > 0, else a ValueError naming `field`."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a finite number > 0, got {value!r}")
    return float(value)


def temper(log_probs: Tensor, temperature: float) -> Tensor:
    """log softmax(log x_θ / T) [..., V]: x_θ sharpened (T < 1) or flattened (T > 1); unchanged at T = 1.

    [Our decision] The spec samples x_θ as is (T = 1). The mask's −inf log-probability (SUBS) stays −inf.
    """
    if temperature == 1.0:
        return log_probs
    return torch.log_softmax(log_probs.float() / temperature, dim=-1)


def _rows(value: Tensor | float, like: Tensor) -> Tensor:
    """A per-row coefficient (scalar or [B]) as float32 broadcastable against [B, L, V]."""
    value = torch.as_tensor(value, device=like.device)
    return value.reshape(-1, 1, 1).to(torch.float32) if value.dim() else value.to(torch.float32)


def sampling_grid(
    num_steps: int, t_min: float = T_MIN, device: torch.device | None = None, kind: str = "uniform"
) -> Tensor:
    """The N-step time grid [N+1] float64 from 1 down to t_min.

    "uniform" is the spec's linspace(1, t_min, N+1) (step size (1 − t_min)/N; §3, E7). "cosine" ([Our decision],
    MaskGIT's schedule) is t_i = t_min + (1 − t_min)·cos(π/2 · i/N): under the log-linear schedule the masked
    fraction follows cos(π/2 · i/N), so the first steps unmask few tokens and the last steps, which see the most
    context, unmask the most.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if check_time_grid(kind) == "uniform":
        return torch.linspace(1.0, t_min, num_steps + 1, dtype=torch.float64, device=device)
    s = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
    grid = t_min + (1.0 - t_min) * torch.cos(torch.pi / 2 * s)
    grid[-1] = t_min  # cos(π/2) is 6e-17, not 0
    return grid


def ancestral_q(p_x0: Tensor, alpha_t: Tensor | float, alpha_s: Tensor | float, mask_id: int) -> Tensor:
    """Unnormalised reverse-step probabilities (spec §3, E2).

    Args:
        p_x0: [B, L, V] predicted clean-token probabilities x_θ (the mask entry is overwritten).
        alpha_t, alpha_s: α at the current time t and the target s < t; scalars or [B].
        mask_id: the mask id m.

    Returns:
        q [B, L, V] float32 with q_v = x_θ,v·(α_s − α_t) for v ≠ m and q_m = 1 − α_s; each row sums to
        (1 − α_t) when x_θ sums to 1 over the real tokens.
    """
    q = p_x0.float() * (_rows(alpha_s, p_x0) - _rows(alpha_t, p_x0))
    stay = (1 - _rows(alpha_s, p_x0)).expand(q.shape[0], q.shape[1], 1)
    return torch.cat([q[..., :mask_id], stay, q[..., mask_id + 1 :]], dim=-1)


def sample_categorical(q: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample ids [...] from unnormalised probabilities q [..., V] as argmax(q / E), E ~ Exp(1) (Gumbel-max)."""
    noise = torch.empty(q.shape, dtype=torch.float32, device=q.device).exponential_(generator=generator)
    return (q.float() / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def ancestral_step(
    z: Tensor,
    p_x0: Tensor,
    alpha_t: Tensor | float,
    alpha_s: Tensor | float,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One reverse step z_t → z_s [B, L]: masked positions resampled from `ancestral_q`, others carried over."""
    proposal = sample_categorical(ancestral_q(p_x0, alpha_t, alpha_s, mask_id), generator)
    return torch.where(z == mask_id, proposal, z)


def denoise_final(
    z: Tensor,
    p_x0: Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    mode: str = "sample",
) -> Tensor:
    """Noise removal after the last step: every still-masked position gets a real token (spec §3).

    Args:
        z: [B, L] ids; p_x0: [B, L, V] predicted clean-token probabilities at t_min.
        mode: "sample" (official `_denoiser_update`: the step's distribution with the mask probability
            zeroed), "argmax" (MDLM's noise removal) or "none" (leave masks).
    """
    if mode not in FINAL_MODES:
        raise ValueError(f"final denoising mode must be one of {FINAL_MODES}, got {mode!r}")
    if mode == "none":
        return z
    probs = p_x0.float().clone()
    probs[..., mask_id] = 0.0
    tokens = sample_categorical(probs, generator) if mode == "sample" else probs.argmax(dim=-1)
    return torch.where(z == mask_id, tokens, z)


def block_bounds(length: int, block_size: int | None) -> list[tuple[int, int]]:
    """[start, end) of each semi-autoregressive block (one block of `length` when block_size is None)."""
    if block_size is None:
        return [(0, length)]
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    return [(start, min(start + block_size, length)) for start in range(0, length, block_size)]


class AncestralSampler:
    """The N-step ancestral sampler with optional caching and semi-autoregressive blocks.

    `log_probs_fn(z, t) -> [B, L, V]` log x_θ (SUBS applied). With `cache` the forward is skipped when z did
    not change since the last call (valid only for a denoiser that ignores t, e.g. MDLM teachers with σ
    zeroed); cached and uncached runs give identical samples for one generator seed. With `block_size`,
    blocks are generated left to right, each over the full N-step grid with later blocks still masked.
    `time_grid` picks the grid (`sampling_grid`: "uniform", the spec's, or "cosine"); `temperature` tempers x_θ
    (`temper`; 1, the spec's, leaves it as is). `num_forward` counts denoiser calls of the last `sample` (the NFE).
    """

    def __init__(
        self,
        log_probs_fn: LogProbsFn,
        schedule: MaskingSchedule,
        mask_id: int,
        cache: bool = True,
        final: str = "sample",
        t_min: float = T_MIN,
        time_grid: str = "uniform",
        temperature: float = 1.0,
    ) -> None:
        if final not in FINAL_MODES:
            raise ValueError(f"final must be one of {FINAL_MODES}, got {final!r}")
        self.time_grid = check_time_grid(time_grid)
        self.temperature = check_temperature(temperature)
        self.log_probs_fn, self.schedule, self.mask_id = log_probs_fn, schedule, mask_id
        self.cache, self.final, self.t_min = cache, final, t_min
        self.num_forward = 0
        self._cached: tuple[Tensor, Tensor] | None = None

    def _p_x0(self, z: Tensor, t: Tensor) -> Tensor:
        if self.cache and self._cached is not None and torch.equal(self._cached[0], z):
            return self._cached[1]
        self.num_forward += 1
        p_x0 = temper(self.log_probs_fn(z, t.to(torch.float32).expand(z.shape[0])), self.temperature).exp()
        self._cached = (z, p_x0)
        return p_x0

    @torch.no_grad()
    def sample(
        self, z: Tensor, num_steps: int, generator: torch.Generator | None = None, block_size: int | None = None
    ) -> Tensor:
        """Denoise z [B, L] (masks and any fixed prefix tokens) into ids [B, L] with N steps per block."""
        self.num_forward, self._cached = 0, None
        grid = sampling_grid(num_steps, self.t_min, z.device, self.time_grid)
        alphas = self.schedule.alpha(grid)
        for start, end in block_bounds(z.shape[1], block_size):
            active = torch.zeros_like(z, dtype=torch.bool)
            active[:, start:end] = True
            for i in range(num_steps):
                p_x0 = self._p_x0(z, grid[i])
                step = ancestral_step(z, p_x0, alphas[i], alphas[i + 1], self.mask_id, generator)
                z = torch.where(active, step, z)
            if self.final != "none" and bool((z[:, start:end] == self.mask_id).any()):
                p_x0 = self._p_x0(z, grid[-1])
                z = torch.where(active, denoise_final(z, p_x0, self.mask_id, generator, self.final), z)
        return z
