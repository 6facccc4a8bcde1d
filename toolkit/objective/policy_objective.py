"""GRPO-family objective: policy term × ratio level × KL × entropy × loss aggregation, plus the PPO critic loss.

Orthogonal pure functions (verl `core_algos` style) composed by `PolicyObjective`; named algorithms
are presets over its keyword arguments. All math runs in float32, also for bf16 inputs. Simplified:
the KL and entropy terms reuse the policy term's aggregation (as verl does), metrics are local to
the micro-batch, and distributed denominators come from the caller (`loss_denominators`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from toolkit.objective.aggregation import (
    AGGREGATIONS,
    Aggregation,
    ObjectiveOutput,
    _check_shapes,
    aggregate_loss,
    loss_denominators,
    masked_token_mean,
    value_loss,
)
from toolkit.objective.kl import KL_ESTIMATORS, KLEstimator, kl_estimate, kl_k3

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "ObjectiveOutput",
    "PolicyObjective",
    "aggregate_loss",
    "loss_denominators",
    "masked_token_mean",
    "value_loss",
]

PolicyTerm = Literal["clip", "cispo", "sapo"]
RatioLevel = Literal["token", "sequence"]


@dataclass
class PolicyTermOutput:
    """Per-step losses [N, T] of a policy term and where its clips were active ([N, T] bool)."""

    losses: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence log-ratio log s_i = mean of the token log-ratios over the mask (arXiv:2507.18071).

    Args:
        log_ratio: [N, T] log π − log π_old.
        mask: [N, T] bool, True = trained step.

    Returns:
        [N] mean log-ratio per row; rows with an empty mask get 0 (ratio 1).
    """
    count = mask.sum(dim=-1).clamp_min(1)
    return torch.where(mask, log_ratio, 0.0).sum(dim=-1) / count


def gspo_token_log_ratio(logprobs: Tensor, seq_log_ratio: Tensor) -> Tensor:
    """GSPO-token log-ratio: value = log s_i, gradient = per-token ∇log π (arXiv:2507.18071, GSPO-token).

    log s_{i,t} = sg[log s_i] + log π(y_t) − sg[log π(y_t)], so every token carries the sequence ratio
    while its gradient flows only through its own log-prob.

    Args:
        logprobs: [N, T] current log-probs (differentiable).
        seq_log_ratio: [N] sequence log-ratio (detached here).

    Returns:
        [N, T] log-ratio whose value is constant along T.
    """
    return seq_log_ratio.detach().unsqueeze(-1) + (logprobs - logprobs.detach())


def ppo_clip_loss(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None = None
) -> PolicyTermOutput:
    """PPO clip with decoupled bounds (clip-higher, DAPO arXiv:2503.14476) and optional dual clip.

    l = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)); with dual clip c (arXiv:1912.09729),
    l = min(l, −c·A) where A < 0. Clipped branches are constants, so their gradient is zero.

    Args:
        ratio: [N, T] importance ratio π/π_old (differentiable).
        advantages: [N, T] advantages.
        clip_low: ε_low.
        clip_high: ε_high.
        dual_clip: c > 1, or None for no dual clip.

    Returns:
        Per-step losses and the low/high/dual clip indicators.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    dual = torch.zeros_like(negative)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = negative & (losses > bound)
        losses = torch.where(dual, bound, losses)
    with torch.no_grad():
        low = negative & (ratio < 1.0 - clip_low)
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return PolicyTermOutput(losses, low, high, dual)


def cispo_loss(
    ratio: Tensor, logprobs: Tensor, advantages: Tensor, eps_low: float | None, eps_high: float
) -> PolicyTermOutput:
    """CISPO: l = −sg(clip(ρ, 1 − ε_low, 1 + ε_high))·A·log π (MiniMax-M1, arXiv:2506.13585).

    Every token keeps its gradient; only the (stop-gradient) IS weight is clipped. The paper sets no
    lower bound (`eps_low=None`) and tunes ε_high only.

    Args:
        ratio: [N, T] importance ratio (only its value is used).
        logprobs: [N, T] current log-probs (differentiable).
        advantages: [N, T] advantages.
        eps_low: lower clip distance, or None for no lower bound.
        eps_high: upper clip distance.

    Returns:
        Per-step losses; `clipped_low/high` mark clipped IS weights.
    """
    weight = ratio.detach()
    lower = None if eps_low is None else 1.0 - eps_low
    weight = weight.clamp(lower, 1.0 + eps_high)
    losses = -weight * advantages * logprobs
    high = ratio.detach() > 1.0 + eps_high
    low = torch.zeros_like(high) if lower is None else ratio.detach() < lower
    return PolicyTermOutput(losses, low, high, torch.zeros_like(high))


def sapo_loss(ratio: Tensor, advantages: Tensor, tau_pos: float, tau_neg: float) -> PolicyTermOutput:
    """SAPO soft gate: l = −(4/τ)·σ(τ(ρ − 1))·A, τ = τ_pos if A > 0 else τ_neg (arXiv:2511.20347).

    The gradient weight 4σ(1 − σ)·ρ is 1 on-policy and decays smoothly off-policy (faster for the
    larger τ_neg), replacing the hard clip band. Formula as stated in the paper's abstract/objective
    and implemented identically in TRL (`sapo_temperature_pos/neg`, defaults 1.0/1.05).

    Args:
        ratio: [N, T] importance ratio (differentiable).
        advantages: [N, T] advantages.
        tau_pos: temperature for positive advantages.
        tau_neg: temperature for non-positive advantages.

    Returns:
        Per-step losses; no hard clips (indicators all False).
    """
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    none = torch.zeros_like(advantages, dtype=torch.bool)
    return PolicyTermOutput(-gate * advantages, none, none, none)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_number(name: str, value: float, low: float, *, strict: bool = False, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok or not value < high:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(
            f"{name}={value!r} must be a finite number {bound}" + (f" and < {high}" if high < math.inf else "")
        )


class PolicyObjective:
    """Policy loss of the GRPO family: `policy_term × ratio_level × KL × entropy × aggregation`.

    loss = agg(policy term) + kl_coef·agg(KL to reference) − entropy_coef·agg(entropy).

    Presets (configs/algorithms): GRPO = clip + seq_mean_token_mean; DAPO = clip_high 0.28 +
    token_mean; Dr. GRPO = seq_mean_token_sum_norm + norm_length; GSPO = ratio_level "sequence" +
    seq_mean_token_mean (arXiv:2507.18071); CISPO = policy_term "cispo"; SAPO = "sapo"; DLER/BNPO =
    clip 0.2/0.28 + dual_clip 10 (+ seq_mean_token_sum for BNPO).

    Numerical safety: log π − log π_old is clamped to ±`log_ratio_clamp` before `exp` (verl clamps
    at ±20), so a ratio never overflows; tokens beyond the clamp get no gradient at token level.
    Masked steps are replaced by zeros before any arithmetic, so NaN/inf padding cannot leak into
    the loss or the gradient, and masked steps get exactly zero gradient. Non-finite values inside
    the mask raise ValueError (after the forward pass, which already synchronises for metrics).
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        policy_term: PolicyTerm = "clip",
        ratio_level: RatioLevel = "token",
        kl_estimator: KLEstimator = "k3",
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        aggregation: Aggregation = "token_mean",
        norm_length: float | None = None,
        cispo_eps_low: float | None = None,
        cispo_eps_high: float = 0.28,
        sapo_tau_pos: float = 1.0,
        sapo_tau_neg: float = 1.05,
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        """Validate and store the config (keyword names are the YAML keys).

        Args:
            clip_low: ε_low of the PPO clip, in [0, 1).
            clip_high: ε_high of the PPO clip (clip-higher when > clip_low).
            dual_clip: dual-clip bound c > 1 for negative advantages (verl `clip_ratio_c`), or None.
            policy_term: "clip" (PPO), "cispo" (arXiv:2506.13585) or "sapo" (arXiv:2511.20347).
            ratio_level: "token" or "sequence" (GSPO-token ratio, arXiv:2507.18071).
            kl_estimator: "k1"/"kl", "k2"/"mse", "k3"/"low_var_kl" (see `toolkit.objective.kl`).
            kl_coef: weight of the KL-to-reference loss; > 0 needs `ref_logprobs` or an analytic `kl`.
            entropy_coef: weight of the entropy bonus; > 0 needs `entropy`.
            aggregation: one of `AGGREGATIONS` (see `aggregate_loss`).
            norm_length: constant normalizer (max response length) for "seq_mean_token_sum_norm".
            cispo_eps_low: CISPO lower IS-weight clip distance; None = no lower bound (paper).
            cispo_eps_high: CISPO upper clip distance; the paper does not publish its value, 0.28
                (DAPO's ε_high) is [Our decision]: tune it.
            sapo_tau_pos: SAPO temperature for A > 0 (TRL default 1.0).
            sapo_tau_neg: SAPO temperature for A <= 0 (TRL default 1.05).
            log_ratio_clamp: bound on |log π − log π_old| before `exp`; None disables it.
        """
        _check_number("clip_low", clip_low, 0.0, high=1.0)
        _check_number("clip_high", clip_high, 0.0)
        if dual_clip is not None:
            _check_number("dual_clip", dual_clip, 1.0, strict=True)
        _check_choice("policy_term", policy_term, get_args(PolicyTerm))
        _check_choice("ratio_level", ratio_level, get_args(RatioLevel))
        _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _check_number("kl_coef", kl_coef, 0.0)
        _check_number("entropy_coef", entropy_coef, 0.0)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        if aggregation == "seq_mean_token_sum_norm" and norm_length is None:
            raise ValueError("norm_length=None: aggregation='seq_mean_token_sum_norm' needs a constant norm_length > 0")
        if norm_length is not None:
            _check_number("norm_length", norm_length, 0.0, strict=True)
        if cispo_eps_low is not None:
            _check_number("cispo_eps_low", cispo_eps_low, 0.0)
        _check_number("cispo_eps_high", cispo_eps_high, 0.0)
        _check_number("sapo_tau_pos", sapo_tau_pos, 0.0, strict=True)
        _check_number("sapo_tau_neg", sapo_tau_neg, 0.0, strict=True)
        if log_ratio_clamp is not None:
            _check_number("log_ratio_clamp", log_ratio_clamp, 0.0, strict=True)
        self.clip_low, self.clip_high, self.dual_clip = float(clip_low), float(clip_high), dual_clip
        self.policy_term, self.ratio_level, self.aggregation = policy_term, ratio_level, aggregation
        self.kl_estimator, self.kl_coef, self.entropy_coef = kl_estimator, float(kl_coef), float(entropy_coef)
        self.norm_length = norm_length
        self.cispo_eps_low, self.cispo_eps_high = cispo_eps_low, float(cispo_eps_high)
        self.sapo_tau_pos, self.sapo_tau_neg = float(sapo_tau_pos), float(sapo_tau_neg)
        self.log_ratio_clamp = log_ratio_clamp

    @property
    def needs_reference(self) -> bool:
        """True when the loss uses a KL to a reference policy (the trainer must build one)."""
        return self.kl_coef > 0

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
        kl: Tensor | None = None,
        num_tokens: float | None = None,
        num_seqs: float | None = None,
    ) -> ObjectiveOutput:
        """Compute the loss of one micro-batch.

        Args:
            logprobs: [N, T] current log-probs (differentiable; any float dtype, computed in float32).
            old_logprobs: [N, T] log-probs at sampling time.
            advantages: [N] (broadcast over T) or [N, T].
            mask: [N, T] bool, True = trained step.
            ref_logprobs: [N, T] reference log-probs for the KL estimator.
            entropy: [N, T] per-step entropy (needed when entropy_coef > 0).
            kl: [N, T] precomputed KL to the reference (e.g. closed-form Gaussian KL of diffusion
                steps, `toolkit.objective.kl.gaussian_mean_kl`); replaces the estimator when given.
            num_tokens: global token count of the minibatch (see `aggregate_loss`).
            num_seqs: global non-empty row count of the minibatch.

        Returns:
            The loss and metrics. `loss/policy + loss/kl + loss/entropy == loss`; `policy/*` are
            token means over this micro-batch's mask (0.0 for an all-False mask). `policy/kl` and
            `policy/entropy` are present only when their inputs are.
        """
        self._check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl)
        lp, old = (torch.where(mask, t.float(), 0.0) for t in (logprobs, old_logprobs))
        adv_full = (advantages.float().unsqueeze(-1) if advantages.dim() == 1 else advantages.float()).expand_as(lp)
        adv = torch.where(mask, adv_full, 0.0)
        ratio = self._ratio(lp, old, mask)
        term = self._policy_term(ratio, lp, adv)
        kl_steps = self._kl_steps(lp, mask, ref_logprobs, kl)
        entropy_steps = None if entropy is None else torch.where(mask, entropy.float(), 0.0)
        stats = self._loss_terms(term.losses, kl_steps, entropy_steps, mask, num_tokens, num_seqs)
        loss = stats["loss/policy"] + stats["loss/kl"] + stats["loss/entropy"]
        stats.update(self._step_stats(term, ratio, lp, old, mask, kl_steps, entropy_steps))
        inputs = [t for t in (logprobs, old_logprobs, adv_full, ref_logprobs, entropy, kl) if t is not None]
        stats["_nonfinite"] = torch.stack([(~torch.isfinite(t.detach()) & mask).sum() for t in inputs]).sum()
        stats["_num_tokens"], stats["_num_seqs"] = loss_denominators(mask)
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()
        metrics = dict(zip(stats, values, strict=True))
        self._check_after(metrics, num_tokens, num_seqs)
        return ObjectiveOutput(loss, {k: v for k, v in metrics.items() if not k.startswith("_")})

    def _loss_terms(
        self,
        policy_steps: Tensor,
        kl_steps: Tensor | None,
        entropy_steps: Tensor | None,
        mask: Tensor,
        num_tokens: float | None,
        num_seqs: float | None,
    ) -> dict[str, Tensor]:
        """The three signed, weighted loss terms; a zero-weight term is an exact 0 (not added to the graph)."""

        def agg(values: Tensor) -> Tensor:
            return aggregate_loss(values, mask, self.aggregation, num_tokens, num_seqs, self.norm_length)

        terms = {"loss/policy": agg(policy_steps)}
        zero = terms["loss/policy"].new_zeros(())
        terms["loss/kl"] = self.kl_coef * agg(kl_steps) if kl_steps is not None and self.kl_coef > 0 else zero
        terms["loss/entropy"] = zero
        if entropy_steps is not None and self.entropy_coef > 0:
            terms["loss/entropy"] = -self.entropy_coef * agg(entropy_steps)
        return terms

    def _ratio(self, lp: Tensor, old: Tensor, mask: Tensor) -> Tensor:
        """[N, T] importance ratio at the configured level, from the clamped log-ratio."""
        log_ratio = lp - old
        if self.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-self.log_ratio_clamp, self.log_ratio_clamp)
        if self.ratio_level == "sequence":
            log_ratio = gspo_token_log_ratio(lp, sequence_log_ratio(log_ratio, mask))
        return torch.exp(log_ratio)

    def _policy_term(self, ratio: Tensor, lp: Tensor, adv: Tensor) -> PolicyTermOutput:
        if self.policy_term == "cispo":
            return cispo_loss(ratio, lp, adv, self.cispo_eps_low, self.cispo_eps_high)
        if self.policy_term == "sapo":
            return sapo_loss(ratio, adv, self.sapo_tau_pos, self.sapo_tau_neg)
        return ppo_clip_loss(ratio, adv, self.clip_low, self.clip_high, self.dual_clip)

    def _kl_steps(self, lp: Tensor, mask: Tensor, ref_logprobs: Tensor | None, kl: Tensor | None) -> Tensor | None:
        """Per-step KL: the analytic `kl` if given, else the estimator on `ref_logprobs`, else None."""
        if kl is not None:
            return torch.where(mask, kl.float(), 0.0)
        if ref_logprobs is not None:
            return torch.where(
                mask, kl_estimate(lp, torch.where(mask, ref_logprobs.float(), 0.0), self.kl_estimator), 0.0
            )
        return None

    def _step_stats(
        self,
        term: PolicyTermOutput,
        ratio: Tensor,
        lp: Tensor,
        old: Tensor,
        mask: Tensor,
        kl_steps: Tensor | None,
        entropy_steps: Tensor | None,
    ) -> dict[str, Tensor]:
        """Token means over the mask; approx_kl is k3 of KL(π_old ‖ π) on the token log-ratio."""
        with torch.no_grad():
            stats = {
                "policy/clip_frac": (term.clipped_low | term.clipped_high).float(),
                "policy/clip_frac_low": term.clipped_low.float(),
                "policy/clip_frac_high": term.clipped_high.float(),
                "policy/dual_clip_frac": term.dual_clipped.float(),
                "policy/ratio_mean": ratio,
                "policy/approx_kl": kl_k3(old, lp),
            }
            if kl_steps is not None:
                stats["policy/kl"] = kl_steps
            if entropy_steps is not None:
                stats["policy/entropy"] = entropy_steps
            return {k: masked_token_mean(v.detach(), mask) for k, v in stats.items()}

    def _check_inputs(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logprobs: Tensor | None,
        entropy: Tensor | None,
        kl: Tensor | None,
    ) -> None:
        others = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "entropy": entropy, "kl": kl}
        _check_shapes(logprobs, mask, others)
        if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)}, expected [N]={tuple(logprobs.shape[:1])} "
                f"or [N, T]={tuple(logprobs.shape)}"
            )
        if self.kl_coef > 0 and ref_logprobs is None and kl is None:
            raise ValueError(f"kl_coef={self.kl_coef} > 0 needs ref_logprobs or a precomputed kl tensor")
        if self.entropy_coef > 0 and entropy is None:
            raise ValueError(f"entropy_coef={self.entropy_coef} > 0 needs the entropy tensor [N, T]")

    @staticmethod
    def _check_after(metrics: dict[str, float], num_tokens: float | None, num_seqs: float | None) -> None:
        """Errors that need the synchronised statistics: non-finite inputs, too-small denominators."""
        if metrics["_nonfinite"] > 0:
            raise ValueError(f"{int(metrics['_nonfinite'])} non-finite values inside the mask of the objective inputs")
        for name, given, local in (
            ("num_tokens", num_tokens, metrics["_num_tokens"]),
            ("num_seqs", num_seqs, metrics["_num_seqs"]),
        ):
            if given is not None and float(given) < local - 1e-6:
                raise ValueError(f"{name}={given} is smaller than this micro-batch's own count {local:g}")
