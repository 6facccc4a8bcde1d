"""SUBS log-prob statistics of a masked diffusion LM a block of positions at a time: no fp32 [N, L, V] copies.

`masked_diffusion.subs_log_probs` materialises fp32 [N, L, V] log-probs, and the DiDi student's step log-probs,
entropy and teacher divergence (`didi_policy`) and the MDLM NELBO (`teacher`) then make several more [N, L, V]
temporaries and keep some alive for backward. Each of them reads only positions where z is the mask (elsewhere SUBS
carries z with log-prob 0 and they are masked out), so one autograd Function here takes the masked positions a block
at a time and runs the direct formulas' own ops on each block: mask logit set to −1e6, log-softmax, then the gather,
the entropy −Σ p log p and the forward / reverse KL to the teacher. Backward recomputes each block's log-softmax and
writes the logits' gradient block by block. On CPU the forward values are bitwise the direct formulas' (a row's
reductions do not depend on other rows); gradients follow autograd's chain (∂/∂s per term, then the log-softmax
backward g − p·Σg, the mask column zeroed) and agree to float rounding. Outputs are 0 where z is not the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NEG_INF = -1e6  # SUBS "−∞" (masked_diffusion.NEG_INF, the official value)
# fp32 elements per block temporary (256 MB): at GPT-2's V = 50,258 a block is ~1,335 positions.
BLOCK_ELEMENTS = 2**26
REGULARIZATIONS = ("jeffrey", "forward_kl", "reverse_kl")


@dataclass
class SubsStats:
    """[N, L] float32 statistics of SUBS log x_θ at the masked positions (0 elsewhere); None when not asked for.

    Attributes:
        picked: log x_θ(z)[target].
        entropy: −Σ_v p_v log p_v.
        divergence: (1 − β)·KL(T‖S) + β·KL(S‖T) to the teacher (β per `regularization`).
    """

    picked: Tensor | None
    entropy: Tensor | None
    divergence: Tensor | None


def subs_stats(
    logits: Tensor,
    z: Tensor,
    mask_id: int,
    targets: Tensor | None = None,
    entropy: bool = False,
    teacher_logits: Tensor | None = None,
    regularization: str = "jeffrey",
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> SubsStats:
    """Per-position statistics of SUBS(logits) at positions where `z` is the mask, computed in blocks.

    Args:
        logits: [N, L, V] raw backbone logits (any float dtype; differentiable).
        z: [N, L] ids; SUBS masks the mask logit and keeps the carry-over one-hot where z is not the mask.
        mask_id: the mask id.
        targets: [N, L] ids whose log-prob to pick (None: no `picked`).
        entropy: also compute the entropy.
        teacher_logits: [N, L, V] raw teacher logits (no gradient) for the divergence (None: no `divergence`).
        regularization, beta: "jeffrey" ((1 − β)·forward + β·reverse), "forward_kl" or "reverse_kl".
        chunk_rows: positions per block (None: as many as fit `BLOCK_ELEMENTS` fp32 values, at least 1).

    Returns:
        SubsStats of [N, L] float32 tensors, differentiable with respect to `logits`.
    """
    if logits.dim() != 3 or logits.shape[:-1] != z.shape:
        raise ValueError(f"logits must be [N, L, V] and z [N, L], got {tuple(logits.shape)} and {tuple(z.shape)}")
    for name, other in (("targets", targets), ("teacher_logits", teacher_logits)):
        if other is not None and other.shape[: z.dim()] != z.shape:
            raise ValueError(f"{name} must match z {tuple(z.shape)} in its leading dims, got {tuple(other.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization={regularization!r} is not one of {list(REGULARIZATIONS)}")
    vocab = logits.shape[-1]
    # (forward, reverse) weights; 1·f + 0·r is f exactly (both are finite), so one sum serves the three modes.
    weights = {"forward_kl": (1.0, 0.0), "reverse_kl": (0.0, 1.0)}.get(regularization, (1 - beta, beta))
    settings = (mask_id, entropy, weights, chunk_rows or max(1, BLOCK_ELEMENTS // vocab))
    positions = (z.reshape(-1) == mask_id).nonzero().squeeze(1)
    flat_targets = targets.reshape(-1) if targets is not None else None
    flat_teacher = teacher_logits.reshape(-1, vocab).detach() if teacher_logits is not None else None
    outputs = _SubsStats.apply(logits.reshape(-1, vocab), positions, flat_targets, flat_teacher, settings)
    shaped = [value.reshape(z.shape) if value.numel() else None for value in outputs]
    return SubsStats(*shaped)


def _log_softmax(block: Tensor, mask_id: int) -> Tensor:
    """fp32 SUBS log-probs of a block of masked positions [b, V] (the direct formula's ops)."""
    column = torch.zeros(block.shape[-1], dtype=torch.bool, device=block.device)
    column[mask_id] = True
    return torch.log_softmax(block.float().masked_fill(column, NEG_INF), dim=-1)


class _SubsStats(torch.autograd.Function):
    """(picked, entropy, divergence) [P] float32 (empty when not asked) from flat logits [P, V], block by block."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        positions: Tensor,
        targets: Tensor | None,
        teacher: Tensor | None,
        settings: tuple[int, bool, tuple[float, float], int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        mask_id, with_entropy, (forward_weight, reverse_weight), chunk = settings
        count, device = logits.shape[0], logits.device
        outputs = [
            torch.zeros(count if wanted else 0, dtype=torch.float32, device=device)
            for wanted in (targets is not None, with_entropy, teacher is not None)
        ]
        picked, entropy, divergence = outputs
        for start in range(0, positions.numel(), chunk):
            index = positions[start : start + chunk]
            s = _log_softmax(logits[index], mask_id)
            if targets is not None:
                picked[index] = s.gather(-1, targets[index].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                entropy[index] = -(s.exp() * s).sum(-1)
            if teacher is not None:
                t = _log_softmax(teacher[index], mask_id)
                forward = (t.exp() * (t - s)).sum(-1)
                reverse = (s.exp() * (s - t)).sum(-1)
                divergence[index] = forward_weight * forward + reverse_weight * reverse
        ctx.save_for_backward(logits, positions, targets, teacher)
        ctx.settings = settings
        return picked, entropy, divergence

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, positions, targets, teacher = ctx.saved_tensors
        mask_id, with_entropy, (forward_weight, reverse_weight), chunk = ctx.settings
        grad_picked, grad_entropy, grad_divergence = grads
        grad_logits = torch.zeros_like(logits)
        for start in range(0, positions.numel(), chunk):
            index = positions[start : start + chunk]
            s = _log_softmax(logits[index], mask_id)
            p = s.exp()
            grad_s = torch.zeros_like(s)
            if targets is not None and grad_picked is not None:  # gather's backward
                grad_s.scatter_add_(-1, targets[index].unsqueeze(-1), grad_picked[index].unsqueeze(-1))
            if with_entropy and grad_entropy is not None:  # H = −Σ exp(s)·s
                minus = -grad_entropy[index].unsqueeze(-1)
                grad_s += minus * p + (minus * s) * p
            if teacher is not None and grad_divergence is not None:
                t = _log_softmax(teacher[index], mask_id)
                g = grad_divergence[index].unsqueeze(-1)
                grad_s -= (forward_weight * g) * t.exp()  # ∂/∂s Σ q (t − s)
                reverse = reverse_weight * g
                grad_s += reverse * (s - t) * p + reverse * p  # ∂/∂s Σ exp(s)(s − t)
            grad_x = grad_s - p * grad_s.sum(-1, keepdim=True)  # log-softmax backward
            grad_x[:, mask_id] = 0.0  # the masked mask logit takes no gradient
            grad_logits[index] = grad_x.to(grad_logits.dtype)
        return grad_logits, None, None, None, None
