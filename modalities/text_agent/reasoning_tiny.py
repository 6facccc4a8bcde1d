"""The tiny CPU reasoner and its synthetic arithmetic task (single-digit sums and differences).

A random-init model almost never writes `</think>` and a digit in the right place, so a 0/1 correctness
reward would give it nothing to learn from. `build_tiny_reasoner` therefore warm-starts the 2-layer
random-init Qwen2 of `tiny.py` with a few seconds of supervised steps, in code and seeded, on
`<think>` + k dots + `</think>` + answer for half of the problems (k uniform in 0..`max_filler`): a
stand-in for a pretrained reasoning model. It knows the format, "thinks" for a random length (the dots
carry no information, so shorter thinking costs no accuracy — the situation DLER targets), answers the
problems it saw about 40% of the time and guesses on the others (chance is 1/10), which gives RL easy
and hard prompts. Warm-started weights are memoized per argument set within a process.
"""

from __future__ import annotations

import copy
import functools
import random

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from modalities.text_agent.tiny import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    build_char_tokenizer,
    build_tiny_qwen2,
    supervised_step,
)


def arithmetic_problems() -> list[dict[str, str]]:
    """a+b (a + b <= 9) and a-b (b <= a) for a, b in 0..9: 55 + 55 problems, answers 0..9, in a fixed order."""
    rows = []
    for a in range(10):
        for b in range(10):
            if a + b <= 9:
                rows.append({"id": f"add-{a}-{b}", "problem": f"{a}+{b}=", "answer": str(a + b), "dataset": "add"})
            if b <= a:
                rows.append({"id": f"sub-{a}-{b}", "problem": f"{a}-{b}=", "answer": str(a - b), "dataset": "sub"})
    return rows


def warm_start_problems(fraction: float, seed: int) -> list[dict[str, str]]:
    """The problems the warm start shows the model: each kept with probability `fraction` (seeded)."""
    rng = random.Random(seed)
    return [row for row in arithmetic_problems() if rng.random() < fraction]


def _batch(
    tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]], rng: random.Random, max_filler: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, W] ids, attention mask and loss mask (completion tokens only) of one batch."""
    sequences, loss_masks = [], []
    for row in rows:
        prompt = list(tokenizer(row["problem"])["input_ids"])
        target = "<think>" + "." * rng.randint(0, max_filler) + "</think>" + row["answer"]
        completion = [*tokenizer(target)["input_ids"], EOS_TOKEN_ID]
        sequences.append(prompt + completion)
        loss_masks.append([0] * len(prompt) + [1] * len(completion))
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [PAD_TOKEN_ID] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in loss_masks])
    return ids, attention, loss_mask


def warm_start(
    model: Qwen2ForCausalLM,
    rows: list[dict[str, str]],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    max_filler: int = 10,
    seed: int = 0,
) -> float:
    """Supervised next-token steps on the think/answer format (AdamW, token-mean loss); returns the last loss."""
    tokenizer = build_char_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            ids, attention, loss_mask = _batch(tokenizer, rng.choices(rows, k=batch_size), rng, max_filler)
            loss = supervised_step(model, optimizer, ids, attention, loss_mask)
    model.eval()
    return float(loss.detach())


@functools.lru_cache(maxsize=4)
def _warm_started(seed: int, steps: int, fraction: float, max_filler: int, lr: float) -> Qwen2ForCausalLM:
    model = build_tiny_qwen2(seed=seed)
    if steps > 0:
        warm_start(model, warm_start_problems(fraction, seed), steps, lr=lr, max_filler=max_filler, seed=seed)
    return model


def build_tiny_reasoner(
    seed: int = 0,
    warm_start_steps: int = 150,
    warm_start_fraction: float = 0.5,
    max_filler: int = 10,
    lr: float = 3e-3,
) -> Qwen2ForCausalLM:
    """The 2-layer random-init Qwen2 (`build_tiny_qwen2(seed)`) after `warm_start_steps` supervised steps.

    Args:
        seed: model initialisation, problem selection and filler lengths.
        warm_start_steps: supervised steps (0 = the plain random-init model).
        warm_start_fraction: share of the 110 problems shown during the warm start.
        max_filler: longest "thinking" (dots) in the warm-start targets.
        lr: warm-start learning rate.

    Returns:
        A fresh copy (callers may train it): the warm start runs once per argument set per process.
    """
    if warm_start_steps < 0 or not 0.0 < warm_start_fraction <= 1.0 or max_filler < 0:
        raise ValueError(
            f"need warm_start_steps >= 0, 0 < warm_start_fraction <= 1, max_filler >= 0; got "
            f"{warm_start_steps}, {warm_start_fraction}, {max_filler}"
        )
    return copy.deepcopy(_warm_started(seed, warm_start_steps, warm_start_fraction, max_filler, lr))
