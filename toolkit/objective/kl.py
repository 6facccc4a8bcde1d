"""Per-step KL estimators to a reference policy, and the closed-form KL between Gaussian SDE steps.

The sample-based estimators follow Schulman's note "Approximating KL Divergence" (k1, k2, k3), with
verl's names as aliases (`kl` = k1, `mse` = k2, `low_var_kl` = k3). Every function works on [N, T]
float tensors and returns the per-step value; masking and aggregation are the caller's job
(`toolkit.objective.policy_objective.aggregate_loss`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "kl", "mse", "low_var_kl"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
_CANONICAL: dict[str, str] = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}

K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π(y) − log π_ref(y): unbiased for KL(π‖π_ref) under y ~ π, but can be negative per sample.

    Args:
        logprobs: [N, T] log-probs under the current policy (differentiable).
        ref_logprobs: [N, T] log-probs under the reference policy.

    Returns:
        [N, T] per-step estimate.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π − log π_ref)² (verl `mse`; DLER paper Table 4): biased, non-negative, low variance.

    Args:
        logprobs: [N, T] current-policy log-probs.
        ref_logprobs: [N, T] reference log-probs.

    Returns:
        [N, T] per-step estimate (≥ 0).
    """
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    log_ratio_clamp: float | None = K3_LOG_RATIO_CLAMP,
    value_clamp: float | None = K3_VALUE_CLAMP,
) -> Tensor:
    """k3 = r − 1 − log r with r = π_ref/π (verl `low_var_kl`): unbiased under y ~ π and non-negative.

    Clamping as verl's `kl_penalty(..., "low_var_kl")`: the log-ratio log r is clamped to ±20 before
    the exponential, and the result to [−10, 10] (so in practice to [0, 10]). Clamped entries get
    zero gradient. Pass `None` to disable either clamp.

    Args:
        logprobs: [N, T] current-policy log-probs.
        ref_logprobs: [N, T] reference log-probs.
        log_ratio_clamp: bound on |log π_ref − log π| before `exp`.
        value_clamp: bound on |k3|.

    Returns:
        [N, T] per-step estimate (≥ 0).
    """
    log_r = ref_logprobs - logprobs
    if log_ratio_clamp is not None:
        log_r = log_r.clamp(-log_ratio_clamp, log_ratio_clamp)
    k3 = torch.expm1(log_r) - log_r
    if value_clamp is not None:
        k3 = k3.clamp(-value_clamp, value_clamp)
    return k3


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Dispatch to k1 / k2 / k3 by name (verl aliases accepted).

    Args:
        logprobs: [N, T] current-policy log-probs.
        ref_logprobs: [N, T] reference log-probs.
        estimator: one of `KL_ESTIMATORS`.

    Returns:
        [N, T] per-step KL estimate.
    """
    name = _CANONICAL.get(estimator)
    if name is None:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {KL_ESTIMATORS}")
    if name == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if name == "k2":
        return kl_k2(logprobs, ref_logprobs)
    return kl_k3(logprobs, ref_logprobs)


def gaussian_mean_kl(
    mean: Tensor, ref_mean: Tensor, std: Tensor | float, reduce: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Closed-form KL between two Gaussians with the same std: ‖μ_θ − μ_ref‖² / (2σ²).

    This is Flow-GRPO's KL for SDE denoising steps (docs/methods/pref_grpo.md §2/§4; arXiv:2505.05470), with the
    squared distance averaged (Flow-GRPO parity, `reduce="mean"`) or summed over the non-batch
    dims. Stack one call per trained step to get the [N, T] tensor `PolicyObjective` accepts as `kl`.

    Args:
        mean: [N, ...] step mean under the current policy (differentiable), computed in float32.
        ref_mean: [N, ...] step mean under the reference policy.
        std: noise std of the step: a float, or a tensor with one element or one per row (any shape).
        reduce: "mean" or "sum" over the non-batch dims of the squared distance.

    Returns:
        [N] per-row KL of this step.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must have the same shape")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r} is not one of ('mean', 'sum')")
    sq = (mean.float() - ref_mean.float()).square().flatten(1)
    dist = sq.mean(dim=1) if reduce == "mean" else sq.sum(dim=1)
    var = torch.as_tensor(std, dtype=torch.float32, device=mean.device).reshape(-1).square()
    if var.numel() not in (1, dist.numel()):
        raise ValueError(f"std has {var.numel()} elements; expected 1 or one per row ({dist.numel()})")
    return dist / (2.0 * var)
