"""Sample-quality metrics of masked diffusion LMs: generative perplexity and unigram entropy (spec §13, E8).

Generative perplexity is token-weighted over all samples (not a mean of per-sample perplexities) under a
causal-LM evaluator; the valid tokens of a row are every non-EOS token plus its first EOS. The paper uses
GPT-2-large; `train_tiny_causal_lm` trains a tiny GPT-2 on a corpus for CPU experiments. The NFE table
(teacher vs student over step counts) lives in `nfe_table.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unigram_entropy(tokens: Tensor) -> Tensor:
    """Per-row unigram entropy −Σ_v (c_v/L)·ln(c_v/L) in nats (spec §13, E8: [1,1,2,3] → 1.039721).

    Args:
        tokens: [B, L] token ids.

    Returns:
        [B] float64 entropies (average them for the reported number).
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [B, L] tensor, got shape {tuple(tokens.shape)}")
    ids = tokens.long()
    counts = torch.zeros(ids.shape[0], int(ids.max()) + 1, dtype=torch.float64, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    entropy: Tensor = torch.special.entr(counts / ids.shape[1]).sum(dim=1)
    return entropy


def first_eos_valid_mask(targets: Tensor, eos_id: int | None) -> Tensor:
    """[B, T] bool: every non-EOS target plus the first EOS of each row (spec §13).

    Args:
        targets: [B, T] next-token targets.
        eos_id: the evaluator's EOS id, or None (every target valid).
    """
    if eos_id is None:
        return torch.ones_like(targets, dtype=torch.bool)
    is_eos = targets == eos_id
    first = is_eos & (is_eos.long().cumsum(dim=1) == 1)
    return ~is_eos | first


def generative_perplexity_from_nll(nll: Tensor, valid: Tensor) -> float:
    """exp(Σ nll·valid / Σ valid): token-weighted perplexity (spec §13, E8: → exp(10.5/5) = 8.166170).

    Args:
        nll: [B, T] per-token negative log-likelihoods (entries outside `valid` are ignored, NaN included).
        valid: [B, T] bool.

    Returns:
        The perplexity as a float (NaN when no token is valid).
    """
    total = torch.where(valid, nll.double(), 0.0).sum()
    count = valid.sum()
    return float(torch.exp(total / count)) if int(count) > 0 else float("nan")


def token_nll(model: nn.Module, input_ids: Tensor) -> Tensor:
    """[B, T−1] next-token NLL of rows [B, T] under a causal LM (HF-style `model(input_ids).logits`), fp32."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


class CausalLMEvaluator:
    """Generative perplexity of token rows or texts under a causal LM (GPT-2-large in the paper).

    Rows are scored in chunks of `max_length` tokens with `batch_size` rows per forward; when a tokenizer is
    given, texts are re-tokenised (truncated to `max_length`, right-padded with EOS) as the official metric.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        eos_id: int | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
    ) -> None:
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def nll_and_valid(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """([B, T−1] NLL, [B, T−1] valid mask) of rows [B, T], computed chunk by chunk."""
        self.model.eval()
        nlls, valids = [], []
        for batch in _batches(input_ids, self.batch_size):
            nll_parts, target_parts = [], []
            for start in range(0, batch.shape[1], self.max_length):
                chunk = batch[:, start : start + self.max_length]
                if chunk.shape[1] > 1:
                    nll_parts.append(token_nll(self.model, chunk.to(self.device)).cpu())
                    target_parts.append(chunk[:, 1:])
            nlls.append(torch.cat(nll_parts, dim=1))
            valids.append(first_eos_valid_mask(torch.cat(target_parts, dim=1), self.eos_id))
        return torch.cat(nlls), torch.cat(valids)

    def perplexity_of_ids(self, input_ids: Tensor) -> float:
        """Token-weighted generative perplexity of [B, T] token rows."""
        nll, valid = self.nll_and_valid(input_ids)
        return generative_perplexity_from_nll(nll, valid)

    def perplexity_of_texts(self, texts: Sequence[str]) -> float:
        """Re-tokenise `texts` with the evaluator's tokenizer, then `perplexity_of_ids`."""
        if self.tokenizer is None:
            raise ValueError("perplexity_of_texts needs the evaluator's tokenizer")
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] for t in texts]
        width = max(len(r) for r in rows)
        pad = self.eos_id if self.eos_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        return self.perplexity_of_ids(ids)


def build_tiny_gpt2(
    vocab_size: int, max_length: int = 64, num_layers: int = 2, hidden: int = 64, seed: int = 0
) -> nn.Module:
    """A tiny random-init GPT-2 (spec §19's evaluator stand-in), built in code."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_length,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def train_tiny_causal_lm(
    model: nn.Module,
    batches: Callable[[], Iterator[Tensor]] | Iterator[Tensor],
    num_steps: int,
    lr: float = 3e-3,
    progress: bool = True,
) -> list[float]:
    """Train a causal LM on [B, T] id batches with AdamW for `num_steps`; returns the loss curve.

    Args:
        model: an HF causal LM (`model(input_ids, labels=...)`).
        batches: an iterator (or a factory of one) of LongTensor batches.
        num_steps: optimizer steps.
        lr: peak learning rate (linear warm-up over 10% of the steps, then constant).
        progress: show a progress bar.
    """
    from rich.progress import Progress

    it = batches() if callable(batches) else batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, num_steps // 10)
    losses: list[float] = []
    model.train()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluator LM", total=num_steps)
        for step in range(num_steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            ids = next(it).to(next(model.parameters()).device)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, description=f"evaluator LM loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _batches(rows: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, rows.shape[0], size):
        yield rows[start : start + size]
