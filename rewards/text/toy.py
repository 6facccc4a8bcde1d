"""Toy verifiable text rewards for the CPU demo and tests (no model, no download)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import RewardOutput


class TargetCharReward:
    """Fraction of the completion's characters that equal the row's target character.

    The demo task: the prompt asks for a letter (`target` in the prompt dict), and the reward is
    the share of the answer made of that letter — 0 for an empty answer. Verifiable, dense enough
    for a 2-layer random-init model to learn on a CPU in a minute. Markup tags such as `<search>`
    are removed first (`strip_tags`): otherwise a policy learns to spell letters with tag tokens.
    """

    _TAG = re.compile(r"<[^<>]*>")

    def __init__(self, ignore_spaces: bool = True, strip_tags: bool = True, min_length: int = 1) -> None:
        if min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {min_length}")
        self.ignore_spaces = ignore_spaces
        self.strip_tags = strip_tags
        self.min_length = min_length

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        targets = metadata.get("target")
        if targets is None or len(targets) != len(samples):
            raise ValueError("TargetCharReward needs a per-row 'target' field (one character per prompt)")
        scores = []
        for sample, target in zip(samples, targets, strict=True):
            if not isinstance(target, str) or len(target) != 1:
                raise ValueError(f"target must be a single character, got {target!r}")
            text = self._TAG.sub("", str(sample)) if self.strip_tags else str(sample)
            text = text.replace(" ", "") if self.ignore_spaces else text
            hits = sum(ch == target for ch in text)
            scores.append(hits / max(len(text), self.min_length))
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))
