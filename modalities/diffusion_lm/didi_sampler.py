"""DiDi-Instruct two-step student rollouts: all-mask → z_τ → x with τ ~ Beta(A, B) (arXiv:2509.25035).

Spec docs/methods/didi_instruct.md §8, §11. Prompts are data rows {"input_ids": [L]} (the "real" sequences); each row is
repeated G times and its G student samples form one group (for unconditional generation a prompt is only a
grouping device). The rollout records what re-scoring, the discriminator reward and the time weighting need:
`data["z_tau"|"x"|"tau"|"tau_density"]` [N, ...], completions {"text", "tokens", "tau"} per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from modalities.diffusion_lm.didi_policy import StudentPolicy, step_log_probs
from modalities.diffusion_lm.sampling import ancestral_step, check_time_grid, sampling_grid
from modalities.diffusion_lm.time_weighting import beta_density
from toolkit.rollout import Rollout

TauMode = Literal["beta", "uniform"]


def sample_tau(
    num: int,
    generator: torch.Generator,
    mode: TauMode = "beta",
    a: float = 1.0,
    b: float = 1.0,
    low: float = 0.02,
    high: float = 1 - 1e-3,
) -> Tensor:
    """τ [N] ~ Beta(a, b) ("uniform" = Beta(1, 1)) clamped to [low, high], seeded by `generator` (spec §8).

    Args:
        num: N.
        generator: torch generator (a numpy stream is seeded from it, so draws are reproducible).
        mode: "beta" or "uniform".
        a, b: Beta shapes (release config 1, 1; initial config 2, 2).
        low, high: clamp bounds [tau_min_eps, 1 − sampling_eps].
    """
    if mode not in get_args(TauMode):
        raise ValueError(f"tau_mode={mode!r} is not one of {get_args(TauMode)}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    a, b = (1.0, 1.0) if mode == "uniform" else (a, b)
    draws = np.random.default_rng(seed).beta(a, b, size=num)
    return torch.from_numpy(draws).float().clamp(low, high)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """`generator` itself on CPU; on an accelerator a device generator seeded from it."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


class TwoStepStudentSampler:
    """Samples two-step student trajectories z_1 = all-mask → z_τ → x for `StudentPolicy` (see module docstring).

    Step 1 runs t = 1 → τ, step 2 τ → t0_eps with the ancestral update; `remask_prob` re-masks that share of
    step-1 unmaskings (0 in every config seen). Step 2 is a trained step only when z_τ has masked positions.

    `num_steps` > 2 ([Our decision], off by default) trains on the few-step sampler the student is evaluated
    with: N ancestral steps over linspace(1, t0_eps, N+1), log q_ν(x) = the sum of the N step log-probs (the
    same score decomposition as §8, through N − 1 intermediate states). τ ~ π is then drawn independently of
    the path and is only the discriminator's corruption time (the IKL estimator of §5: t ~ π, x ~ p_ν,
    z_t ~ Q(·|x)), so ω(τ) weighting keeps its meaning. Steps that start with no masked position are masked out.
    `time_grid` = "cosine" ([Our decision], N > 2 only) rolls out on the cosine grid instead (`sampling_grid`):
    train on the grid the student will be sampled with.
    """

    def __init__(
        self,
        tau_mode: TauMode = "beta",
        tau_a: float = 1.0,
        tau_b: float = 1.0,
        tau_min_eps: float = 0.02,
        sampling_eps: float = 1e-3,
        t0_eps: float = 1e-3,
        remask_prob: float = 0.0,
        tokenizer: Any = None,
        num_steps: int = 2,
        tau_per_group: bool = False,
        time_grid: str = "uniform",
    ) -> None:
        """Validate and store the config.

        Args:
            tau_mode: "beta" (Beta(tau_a, tau_b)) or "uniform".
            tau_a, tau_b: Beta shapes > 0 (release: 1, 1).
            tau_min_eps, sampling_eps: τ is clamped to [tau_min_eps, 1 − sampling_eps] ([0.02, 0.999]).
            t0_eps: end time of step 2 (1e-3).
            remask_prob: fraction of step-1 unmaskings put back to the mask, in [0, 1).
            tokenizer: decodes completions to text when given.
            num_steps: trained student steps per rollout: 2 (spec §8, coupled τ) or N > 2 (the N-step grid).
            tau_per_group: one τ per group instead of one per sample (spec §11: per sample). [Our decision] The
                reward's scale depends on τ (how much of the sample the discriminator sees), so per-sample τ puts
                "which τ was drawn" into the group z-score; a shared τ lets the group mean remove it.
            time_grid: the N-step rollout's grid, "uniform" (linspace) or "cosine" (N > 2 only).
        """
        if tau_mode not in get_args(TauMode):
            raise ValueError(f"tau_mode={tau_mode!r} is not one of {get_args(TauMode)}")
        if tau_a <= 0 or tau_b <= 0:
            raise ValueError(f"Beta shapes must be > 0, got tau_a={tau_a}, tau_b={tau_b}")
        if not 0.0 < tau_min_eps < 1.0 - sampling_eps < 1.0 or not 0.0 < t0_eps < tau_min_eps:
            raise ValueError(
                f"need 0 < t0_eps < tau_min_eps < 1 - sampling_eps, got {t0_eps}, {tau_min_eps}, {sampling_eps}"
            )
        if not 0.0 <= remask_prob < 1.0:
            raise ValueError(f"remask_prob={remask_prob} must be in [0, 1)")
        self.tau_mode, self.tau_a, self.tau_b = tau_mode, float(tau_a), float(tau_b)
        self.tau_low, self.tau_high, self.t0_eps = tau_min_eps, 1.0 - sampling_eps, t0_eps
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps={num_steps!r} must be an integer >= 2")
        if num_steps > 2 and remask_prob > 0:
            raise ValueError("remask_prob applies to the two-step rollout only (num_steps=2)")
        if check_time_grid(time_grid) != "uniform" and num_steps == 2:
            raise ValueError(
                f"time_grid={time_grid!r} applies to N-step rollouts (num_steps > 2); the two-step "
                "rollout's times are 1 → τ → t0_eps"
            )
        self.remask_prob, self.tokenizer, self.num_steps = remask_prob, tokenizer, num_steps
        self.time_grid = time_grid
        self.tau_per_group = bool(tau_per_group)

    def sample(self, policy: StudentPolicy, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        real = repeat_rows(prompts, group_size)
        n, device = real.shape[0], policy.device
        share = group_size if self.tau_per_group else 1
        tau = sample_tau(n // share, generator, self.tau_mode, self.tau_a, self.tau_b, self.tau_low, self.tau_high)
        tau = tau.repeat_interleave(share)
        density = beta_density(tau, *((1.0, 1.0) if self.tau_mode == "uniform" else (self.tau_a, self.tau_b)))
        tau = tau.to(device)
        gen = device_generator(generator, device)
        data: dict[str, Tensor] = {"tau": tau, "tau_density": density.to(device), "real_ids": real.to(device)}
        with torch.no_grad():
            if self.num_steps == 2:
                z_tau, x, logprobs = self.trajectory(policy, n, real.shape[1], tau, gen)
                live = (z_tau == policy.mask_id).any(-1)
                mask = torch.stack([torch.ones(n, dtype=torch.bool, device=device), live], 1)
                data.update(z_tau=z_tau, x=x)
            else:
                path, times, logprobs = self.multi_step_trajectory(policy, n, real.shape[1], gen)
                x, mask = path[:, -1], (path[:, :-1] == policy.mask_id).any(-1)
                data.update(z_path=path, t_path=times, x=x)
        rows = [dict(prompt) for prompt in prompts for _ in range(group_size)]
        return Rollout(
            group_ids=torch.arange(n, device=device) // group_size,
            old_logprobs=torch.where(mask, logprobs, 0.0).float(),
            mask=mask,
            prompts=rows,
            completions=self.completions(x, tau),
            data=data,
            metrics={"rollout/tau_mean": float(tau.mean()), "rollout/masked_after_step2": _masked_frac(x, policy)},
        )

    def multi_step_trajectory(
        self, policy: StudentPolicy, n: int, length: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(path [N, T+1, L] all-mask → x, times [N, T+1], step log-probs [N, T]) on the T-step grid to t0_eps."""
        schedule, mask_id, device = policy.student.schedule, policy.mask_id, policy.device
        grid = sampling_grid(self.num_steps, self.t0_eps, device, self.time_grid)
        z = torch.full((n, length), mask_id, dtype=torch.long, device=device)
        path, logprobs = [z], []
        for t_hi, t_lo in zip(grid[:-1], grid[1:], strict=True):
            t = torch.full((n,), float(t_hi), device=device)
            log_probs = policy.x0_log_probs(z, t)
            z_next = ancestral_step(z, log_probs.exp(), schedule.alpha(t_hi), schedule.alpha(t_lo), mask_id, generator)
            logprobs.append(step_log_probs(log_probs, z, z_next, mask_id, policy.logprob_mode))
            path.append(z_next)
            z = z_next
        times = grid.float().unsqueeze(0).expand(n, -1).contiguous()
        return torch.stack(path, 1), times, torch.stack(logprobs, 1)

    def trajectory(
        self, policy: StudentPolicy, n: int, length: int, tau: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(z_τ [N, L], x [N, L], step log-probs [N, 2]) of one two-step student rollout."""
        schedule, mask_id = policy.student.schedule, policy.mask_id
        z_1 = torch.full((n, length), mask_id, dtype=torch.long, device=tau.device)
        alpha_1, alpha_tau = schedule.alpha(torch.ones_like(tau)), schedule.alpha(tau)
        log_probs_1 = policy.x0_log_probs(z_1, torch.ones_like(tau))
        z_tau = ancestral_step(z_1, log_probs_1.exp(), alpha_1, alpha_tau, mask_id, generator)
        if self.remask_prob > 0:
            drop = torch.rand(z_tau.shape, generator=generator, device=z_tau.device) < self.remask_prob
            z_tau = torch.where(drop & (z_tau != mask_id), mask_id, z_tau)
        log_probs_2 = policy.x0_log_probs(z_tau, tau)
        alpha_0 = schedule.alpha(torch.full_like(tau, self.t0_eps))
        x = ancestral_step(z_tau, log_probs_2.exp(), alpha_tau, alpha_0, mask_id, generator)
        logprobs = torch.stack(
            [
                step_log_probs(log_probs_1, z_1, z_tau, mask_id, policy.logprob_mode),
                step_log_probs(log_probs_2, z_tau, x, mask_id, policy.logprob_mode),
            ],
            dim=1,
        )
        return z_tau, x, logprobs

    def completions(self, x: Tensor, tau: Tensor) -> list[dict[str, Any]]:
        """Per-row {"text", "tokens", "tau"} (text None without a tokenizer); the discriminator reads them."""
        texts: Sequence[str | None] = [None] * x.shape[0]
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(x.tolist(), skip_special_tokens=False)
        return [
            {"text": text, "tokens": row, "tau": float(t)}
            for text, row, t in zip(texts, x.tolist(), tau.tolist(), strict=True)
        ]


def repeat_rows(prompts: Sequence[Any], group_size: int) -> Tensor:
    """[B·G, L] LongTensor of the prompts' `input_ids`, each row repeated G times (group-major)."""
    if not prompts or group_size < 1:
        raise ValueError(f"need at least one prompt row and group_size >= 1, got {len(prompts)}, {group_size}")
    if not all(isinstance(p, Mapping) and "input_ids" in p for p in prompts):
        raise ValueError("TwoStepStudentSampler prompts must be data rows {'input_ids': [L]} (e.g. TokenDataset)")
    lengths = {len(p["input_ids"]) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"data rows have different lengths {sorted(lengths)}")
    rows = torch.tensor([list(p["input_ids"]) for p in prompts], dtype=torch.long)
    return rows.repeat_interleave(group_size, dim=0)


def _masked_frac(x: Tensor, policy: StudentPolicy) -> float:
    return float((x == policy.mask_id).float().mean())
