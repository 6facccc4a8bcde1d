"""Strict think/answer format reward (BNPO's optional format reward, arXiv:2506.02864 official code).

1 when the completion is exactly `<think>…</think><answer>…</answer>` with one of each tag, else 0. The
official rule is a full-string match with one occurrence of each tag; whether whitespace may separate
the blocks is not recorded in the spec, so it is an option (`allow_whitespace`, default True
[Our decision]). With `answer_tags=False` the answer is free text after `</think>` (R1-style outputs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import RewardOutput


def think_format_ok(
    text: str,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_open: str = "<answer>",
    answer_close: str = "</answer>",
    allow_whitespace: bool = True,
    answer_tags: bool = True,
) -> bool:
    """True when `text` is one think block followed by one answer block and nothing else.

    Args:
        text: the completion.
        think_open, think_close, answer_open, answer_close: the tags.
        allow_whitespace: whitespace may surround and separate the blocks.
        answer_tags: require the `<answer>…</answer>` block; False accepts any non-empty text after
            `</think>` (and then the answer tags must not appear).
    """
    tags = [think_open, think_close, answer_open, answer_close]
    counts = [text.count(tag) for tag in tags]
    if counts[:2] != [1, 1] or counts[2:] != ([1, 1] if answer_tags else [0, 0]):
        return False
    gap = r"\s*" if allow_whitespace else ""
    think = f"{re.escape(think_open)}.*?{re.escape(think_close)}"
    tail = f"{re.escape(answer_open)}.*?{re.escape(answer_close)}" if answer_tags else r"(?=.*\S).+"
    return re.fullmatch(f"{gap}{think}{gap}{tail}{gap}", text, flags=re.DOTALL) is not None


class ThinkFormatReward:
    """RewardModel: 1.0 for a strict `<think>…</think><answer>…</answer>` completion, else 0.0.

    Args: see `think_format_ok`. Metrics: `valid_rate`.
    """

    def __init__(
        self,
        think_open: str = "<think>",
        think_close: str = "</think>",
        answer_open: str = "<answer>",
        answer_close: str = "</answer>",
        allow_whitespace: bool = True,
        answer_tags: bool = True,
    ) -> None:
        tags = [think_open, think_close, answer_open, answer_close]
        if any(not tag for tag in tags) or len(set(tags)) != 4:
            raise ValueError(f"the four tags must be non-empty and distinct, got {tags}")
        self.tags = (think_open, think_close, answer_open, answer_close)
        self.allow_whitespace = allow_whitespace
        self.answer_tags = answer_tags

    def ok(self, text: str) -> bool:
        """`think_format_ok` with this reward's options."""
        return think_format_ok(text, *self.tags, allow_whitespace=self.allow_whitespace, answer_tags=self.answer_tags)

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        scores = [float(self.ok("" if s is None else str(s))) for s in samples]
        valid = sum(scores) / len(scores) if scores else 0.0
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), metrics={"valid_rate": valid})
