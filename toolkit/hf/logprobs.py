"""Log-probs (and entropies) of chosen tokens under softmax(logits / temperature), fp32, a block of positions at a time.

The direct formula, `scaled = logits.float() / temperature` then `gather - logsumexp(scaled)`, makes fp32 [N, T, V]
copies and keeps one alive for backward: at micro-batch 16 × 4k tokens × 152k vocab that is ~19 GB of bf16 logits
plus ~39 GB per fp32 copy. Here one autograd Function runs the same ops on blocks of positions: forward keeps only
the logits (alive anyway as the model's output) and the [..., T] normalizers, backward recomputes each block's
softmax and writes the logits' gradient block by block. Per block the ops are the direct formula's, so on CPU the
log-probs are bit-identical (a row's reduction does not depend on the other rows); the gradient of the log-probs
replays autograd's own backward ops (exp(x - lse)·(-g), then the target's +g, then / temperature), the entropy's is
the closed form p·(E[x] - x). Simplified: the lm_head matmul is not fused in (the logits exist in full, once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# fp32 elements per block temporary (256 MB): at V = 152k a block is ~440 positions.
BLOCK_ELEMENTS = 2**26
# On the CPU (4 MB): temporaries under glibc's mmap threshold are reused from the heap, where each fresh 256 MB block
# would be page-faulted in again (at V = 512, 128 x 128 positions: 0.65-0.8x the time of one block, same values).
CPU_BLOCK_ELEMENTS = 2**20


def token_log_probs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
    chunk_rows: int | None = None,
) -> Tensor:
    """fp32 log pi(token) under softmax(logits / temperature), computed a block of positions at a time.

    Args:
        logits: [..., T, V] next-token logits aligned with `tokens`, any float dtype (a strided view is fine).
        tokens: [..., T] int64 token ids.
        temperature: > 0; logits are divided by it before the softmax.
        suppressed: token ids given probability 0 (their logits set to -inf), e.g. ids the sampler never emits.
        chunk_rows: positions per block (None: as many as fit `BLOCK_ELEMENTS` fp32 values, `CPU_BLOCK_ELEMENTS`
            on the CPU, at least 1).

    Returns:
        [..., T] float32 log-probs, differentiable with respect to `logits`.
    """
    logprobs, _ = _apply(logits, tokens, temperature, suppressed, chunk_rows, with_entropy=False)
    return logprobs


def token_log_probs_and_entropy(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_log_probs` (bit-identical) and the entropy H = logsumexp(x) - sum_v softmax(x)_v x_v, x = logits / T.

    Args: as `token_log_probs`; suppressed ids (probability 0) add nothing to the entropy.

    Returns:
        ([..., T] log-probs, [..., T] entropy), float32, both differentiable with respect to `logits`.
    """
    return _apply(logits, tokens, temperature, suppressed, chunk_rows, with_entropy=True)


def _apply(
    logits: Tensor,
    tokens: Tensor,
    temperature: float,
    suppressed: Sequence[int],
    chunk_rows: int | None,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    if logits.dim() < 2 or logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits must be [..., T, V] and tokens [..., T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    vocab = logits.shape[-1]
    budget = CPU_BLOCK_ELEMENTS if logits.device.type == "cpu" else BLOCK_ELEMENTS
    rows = chunk_rows or max(1, budget // vocab)
    blocked = logits.unsqueeze(0) if logits.dim() == 2 else logits.flatten(0, -3)  # [A, T, V], a view when possible
    targets = tokens.reshape(blocked.shape[:-1])
    ids = torch.tensor(list(suppressed), dtype=torch.long, device=logits.device) if suppressed else None
    logprobs, entropy = _SelectedLogProbs.apply(blocked, targets, float(temperature), ids, rows, with_entropy)
    return logprobs.reshape(tokens.shape), entropy.reshape(tokens.shape) if with_entropy else entropy


def _blocks(num_rows: int, num_steps: int, chunk_rows: int) -> list[tuple[slice, slice]]:
    """(rows, steps) index pairs covering [A, T] in blocks of about `chunk_rows` positions."""
    if num_steps >= chunk_rows:
        steps = [slice(s, s + chunk_rows) for s in range(0, num_steps, chunk_rows)]
        return [(slice(a, a + 1), s) for a in range(num_rows) for s in steps]
    per_block = max(1, chunk_rows // max(num_steps, 1))
    return [(slice(a, a + per_block), slice(None)) for a in range(0, num_rows, per_block)]


def _scaled(block: Tensor, temperature: float, suppressed: Tensor | None) -> Tensor:
    """fp32 logits / temperature of one block, suppressed ids at -inf (exactly the direct formula's ops).

    fp32 logits at temperature 1 with nothing suppressed come back as `block` itself: callers only read it.
    """
    scaled = block.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip a full pass (and a copy of fp32 logits)
        scaled = scaled / temperature
    return scaled if suppressed is None else scaled.index_fill(-1, suppressed, -torch.inf)


class _SelectedLogProbs(torch.autograd.Function):
    """([A, T] log-probs, [A, T] entropy or an empty tensor) from [A, T, V] logits, block by block."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        temperature: float,
        suppressed: Tensor | None,
        chunk_rows: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        shape, device = logits.shape[:-1], logits.device
        logprobs = torch.empty(shape, dtype=torch.float32, device=device)
        normalizers = torch.empty(shape, dtype=torch.float32, device=device)
        expected = torch.empty(shape if with_entropy else (0,), dtype=torch.float32, device=device)
        for rows, steps in _blocks(shape[0], shape[1], chunk_rows):
            scaled = _scaled(logits[rows, steps], temperature, suppressed)
            normalizer = torch.logsumexp(scaled, dim=-1)
            picked = scaled.gather(-1, targets[rows, steps].unsqueeze(-1)).squeeze(-1)
            logprobs[rows, steps] = picked - normalizer
            normalizers[rows, steps] = normalizer
            if with_entropy:
                probs = torch.softmax(scaled, dim=-1)
                expected[rows, steps] = torch.where(probs > 0, probs * scaled, 0.0).sum(-1)
        ctx.save_for_backward(logits, targets, normalizers, expected)
        ctx.settings = (temperature, suppressed, chunk_rows, with_entropy)
        entropy = normalizers - expected if with_entropy else expected
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, targets, normalizers, expected = ctx.saved_tensors
        temperature, suppressed, chunk_rows, with_entropy = ctx.settings
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for rows, steps in _blocks(logits.shape[0], logits.shape[1], chunk_rows):
            scaled = _scaled(logits[rows, steps], temperature, suppressed)
            grad = grad_logprobs[rows, steps]
            # fp32 logits without the entropy term: computed in place in the output block (same ops, same values).
            in_place = grad_logits.dtype == torch.float32 and not (with_entropy and grad_entropy is not None)
            # d(picked - logsumexp)/dx as autograd computes it: exp(x - lse) * (-g), plus g at the target.
            out = grad_logits[rows, steps] if in_place else None
            probs = torch.sub(scaled, normalizers[rows, steps].unsqueeze(-1), out=out).exp_()
            if with_entropy and grad_entropy is not None:
                # Plus dH/dx = p (E[x] - x): p (g_H (E[x] - x) - g), 0 where p = 0 (suppressed ids: x = -inf).
                spread = (expected[rows, steps].unsqueeze(-1) - scaled).mul_(grad_entropy[rows, steps].unsqueeze(-1))
                block = torch.where(probs > 0, spread.sub_(grad.unsqueeze(-1)).mul_(probs), 0.0)
            else:
                block = probs.mul_((-grad).unsqueeze(-1))
            block.scatter_add_(-1, targets[rows, steps].unsqueeze(-1), grad.unsqueeze(-1))
            if suppressed is not None:
                block.index_fill_(-1, suppressed, 0.0)
            if in_place:
                if temperature != 1.0:
                    block.div_(temperature)
            else:
                grad_logits[rows, steps] = block / temperature
        return grad_logits, None, None, None, None, None
