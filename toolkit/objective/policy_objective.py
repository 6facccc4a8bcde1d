"""GRPO-family objective: policy term × ratio level × KL × entropy × loss aggregation, plus the PPO critic loss.

Orthogonal pieces (verl `core_algos` style) composed by `PolicyObjective`: the policy term is a component
(`toolkit.objective.terms`), the rest are modes; named algorithms are presets over its arguments. All math
runs in float32, also for bf16 inputs. Simplified: the KL and entropy terms reuse the policy term's
aggregation (as verl does), metrics are local to the micro-batch, and distributed denominators come from the
caller (`loss_denominators`).
"""

from __future__ import annotations

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
from toolkit.objective.terms import ClipTerm, PolicyTerm, PolicyTermOutput, _check_number

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

RatioLevel = Literal["token", "sequence"]


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


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


class PolicyObjective:
    """Policy loss of the GRPO family: `term × ratio_level × KL × entropy × aggregation`.

    loss = agg(policy term) + kl_coef·agg(KL to reference) − entropy_coef·agg(entropy).

    Presets (configs/algorithms): GRPO = ClipTerm + seq_mean_token_mean; DAPO = ClipTerm(clip_high=0.28) +
    token_mean; Dr. GRPO = seq_mean_token_sum_norm + norm_length; GSPO = ratio_level "sequence" +
    seq_mean_token_mean (arXiv:2507.18071); CISPO = CISPOTerm; SAPO = SAPOTerm; DLER/BNPO =
    ClipTerm 0.2/0.28 + dual_clip 10 (+ seq_mean_token_sum for BNPO).

    The ratio level is a mode of the objective, not a term: GSPO's sequence ratio composes with any term.

    Numerical safety: log π − log π_old is clamped to ±`log_ratio_clamp` before `exp` (verl clamps
    at ±20), so a ratio never overflows; tokens beyond the clamp get no gradient at token level.
    Peer conventions that are options here, off by default: verl's dual clip (`ClipTerm(dual_clip=3)`,
    its `clip_ratio_c`), verl's GSPO bound on the sequence log-ratio (`sequence_log_ratio_clamp=10`),
    verl's CISPO lower bound (`CISPOTerm(clip_low=0.2)`) and TRL's row count that includes fully masked
    rows (`count_empty_rows`).
    Masked steps are replaced by zeros before any arithmetic, so NaN/inf padding cannot leak into
    the loss or the gradient, and masked steps get exactly zero gradient. Non-finite values inside
    the mask raise ValueError (after the forward pass, which already synchronises for metrics).
    """

    def __init__(
        self,
        term: PolicyTerm | None = None,
        ratio_level: RatioLevel = "token",
        kl_estimator: KLEstimator = "k3",
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        aggregation: Aggregation = "token_mean",
        norm_length: float | None = None,
        log_ratio_clamp: float | None = 20.0,
        sequence_log_ratio_clamp: float | None = None,
        count_empty_rows: bool = False,
    ) -> None:
        """Validate and store the config (keyword names are the YAML keys).

        Args:
            term: the per-step policy loss, a `PolicyTerm` (`toolkit.objective.ClipTerm`, `CISPOTerm`,
                `SAPOTerm`, ...); None = `ClipTerm()` (PPO clip 0.2/0.2).
            ratio_level: "token" or "sequence" (GSPO-token ratio, arXiv:2507.18071).
            kl_estimator: "k1"/"kl", "k2"/"mse", "k3"/"low_var_kl" (see `toolkit.objective.kl`).
            kl_coef: weight of the KL-to-reference loss; > 0 needs `ref_logprobs` or an analytic `kl`.
            entropy_coef: weight of the entropy bonus; > 0 needs `entropy`.
            aggregation: one of `AGGREGATIONS` (see `aggregate_loss`).
            norm_length: constant normalizer (max response length) for "seq_mean_token_sum_norm".
            log_ratio_clamp: bound on |log π − log π_old| before `exp`; None disables it.
            sequence_log_ratio_clamp: upper bound on GSPO's sequence log-ratio log s_i (ratio_level
                "sequence" only); a row above it gets ratio exp(bound) and no policy gradient. verl's GSPO
                loss uses 10 (and no token-level clamp: `log_ratio_clamp: null`); None = no bound.
            count_empty_rows: True = rows whose mask is all False (TRL `mask_truncated_completions`) count
                in the `seq_mean_*` denominators, as TRL's `grpo`/`dr_grpo` losses divide by every row; the
                caller then passes `num_rows` with `num_seqs`. False = only non-empty rows count (verl).
        """
        term = ClipTerm() if term is None else term
        if not isinstance(term, PolicyTerm):
            raise ValueError(
                f"term={term!r} is not a PolicyTerm: use a node such as "
                "{_component_: toolkit.objective.ClipTerm, clip_low: 0.2, clip_high: 0.2} "
                "(or CISPOTerm, SAPOTerm)"
            )
        _check_choice("ratio_level", ratio_level, get_args(RatioLevel))
        _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _check_number("kl_coef", kl_coef, 0.0)
        _check_number("entropy_coef", entropy_coef, 0.0)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        if aggregation == "seq_mean_token_sum_norm" and norm_length is None:
            raise ValueError("norm_length=None: aggregation='seq_mean_token_sum_norm' needs a constant norm_length > 0")
        if norm_length is not None:
            _check_number("norm_length", norm_length, 0.0, strict=True)
        if log_ratio_clamp is not None:
            _check_number("log_ratio_clamp", log_ratio_clamp, 0.0, strict=True)
        if sequence_log_ratio_clamp is not None:
            _check_number("sequence_log_ratio_clamp", sequence_log_ratio_clamp, 0.0, strict=True)
            if ratio_level != "sequence":
                raise ValueError(
                    f"sequence_log_ratio_clamp={sequence_log_ratio_clamp} needs ratio_level='sequence', "
                    f"got {ratio_level!r}"
                )
        if not isinstance(count_empty_rows, bool):
            raise ValueError(f"count_empty_rows={count_empty_rows!r} must be true or false")
        self.term, self.ratio_level, self.aggregation = term, ratio_level, aggregation
        self.kl_estimator, self.kl_coef, self.entropy_coef = kl_estimator, float(kl_coef), float(entropy_coef)
        self.norm_length = norm_length
        self.log_ratio_clamp = log_ratio_clamp
        self.sequence_log_ratio_clamp = sequence_log_ratio_clamp
        self.count_empty_rows = count_empty_rows

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
        num_rows: float | None = None,
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
            num_rows: global count of all rows of the minibatch, empty ones included; the `seq_mean_*`
                denominator when `count_empty_rows` (needed then whenever `num_seqs` is given).

        Returns:
            The loss and metrics. `loss/policy + loss/kl + loss/entropy == loss`; `policy/*` are
            token means over this micro-batch's mask (0.0 for an all-False mask). `policy/kl` and
            `policy/entropy` are present only when their inputs are.
        """
        self._check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl)
        num_seqs = self._row_denominator(num_seqs, num_rows)
        lp, old = (torch.where(mask, t.float(), 0.0) for t in (logprobs, old_logprobs))
        adv_full = (advantages.float().unsqueeze(-1) if advantages.dim() == 1 else advantages.float()).expand_as(lp)
        adv = torch.where(mask, adv_full, 0.0)
        ratio = self._ratio(lp, old, mask)
        term = self.term(ratio, lp, adv)
        kl_steps = self._kl_steps(lp, mask, ref_logprobs, kl)
        entropy_steps = None if entropy is None else torch.where(mask, entropy.float(), 0.0)
        stats = self._loss_terms(term.losses, kl_steps, entropy_steps, mask, num_tokens, num_seqs)
        loss = stats["loss/policy"] + stats["loss/kl"] + stats["loss/entropy"]
        stats.update(self._step_stats(term, ratio, lp, old, mask, kl_steps, entropy_steps))
        inputs = [t for t in (logprobs, old_logprobs, adv_full, ref_logprobs, entropy, kl) if t is not None]
        stats["_nonfinite"] = torch.stack([(~torch.isfinite(t.detach()) & mask).sum() for t in inputs]).sum()
        stats["_num_tokens"], stats["_num_seqs"] = loss_denominators(mask)
        if self.count_empty_rows:
            stats["_num_seqs"] = torch.tensor(float(mask.shape[0]), device=mask.device)
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()
        metrics = dict(zip(stats, values, strict=True))
        self._check_after(metrics, num_tokens, num_seqs)
        return ObjectiveOutput(loss, {k: v for k, v in metrics.items() if not k.startswith("_")})

    def _row_denominator(self, num_seqs: float | None, num_rows: float | None) -> float | None:
        """The `seq_mean_*` denominator the caller gave: `num_rows` with `count_empty_rows`, else `num_seqs`."""
        if not self.count_empty_rows:
            return num_seqs
        if num_seqs is not None and num_rows is None and self.aggregation != "token_mean":
            raise ValueError(
                "count_empty_rows=True needs num_rows (the global count of all rows, empty ones included) "
                "whenever num_seqs is given: num_seqs counts only rows with a non-empty mask"
            )
        return num_rows

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
            return aggregate_loss(
                values, mask, self.aggregation, num_tokens, num_seqs, self.norm_length, self.count_empty_rows
            )

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
            if self.sequence_log_ratio_clamp is not None:
                log_ratio = log_ratio.clamp(max=self.sequence_log_ratio_clamp)
        return torch.exp(log_ratio)

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

    def _check_after(self, metrics: dict[str, float], num_tokens: float | None, num_seqs: float | None) -> None:
        """Errors that need the synchronised statistics: non-finite inputs, too-small denominators."""
        if metrics["_nonfinite"] > 0:
            raise ValueError(f"{int(metrics['_nonfinite'])} non-finite values inside the mask of the objective inputs")
        for name, given, local in (
            ("num_tokens", num_tokens, metrics["_num_tokens"]),
            ("num_rows" if self.count_empty_rows else "num_seqs", num_seqs, metrics["_num_seqs"]),
        ):
            if given is not None and float(given) < local - 1e-6:
                raise ValueError(f"{name}={given} is smaller than this micro-batch's own count {local:g}")
