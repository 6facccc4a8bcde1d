"""Pref-GRPO's pairwise judge as a reward transform: judge every group's images, store the matrices.

`PairwiseJudgeTransform` runs before `toolkit.reward_transforms.PairwiseWinRate` in a recipe's `transforms:`:
it asks the judge (rewards.judges.pairwise.PairwisePreferenceJudge or anything with `judge_groups`) for
one [G, G] preference matrix per group — all pairs of all groups in one client batch — and writes them in
the [N, G] layout PairwiseWinRate reads (row n = row i of its group's matrix, i = n's position in its group).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from toolkit.rollout import Rollout

PairOrder = Literal["one", "symmetric"]


class PairwiseJudgeTransform:
    """Writes `rollout.data[key]` [N, G] from one judge call per step (a RewardTransform).

    Args:
        judge: an object with `judge_groups(captions, groups) -> list[Tensor [G, G]]` and optionally
            `last_metrics` (judge/pairs, judge/ties, judge/failures, judge/latency_s, ...).
        order: override the judge's pair order ("one" = official, "symmetric"); None keeps the judge's.
        key: the rollout.data key (PairwiseWinRate's `key`).
    """

    def __init__(self, judge: Any, order: PairOrder | None = None, key: str = "pairwise") -> None:
        if order is not None and order not in ("one", "symmetric"):
            raise ValueError(f"order={order!r} is not one of ['one', 'symmetric', None]")
        if not callable(getattr(judge, "judge_groups", None)):
            raise ValueError(f"judge {type(judge).__name__} has no judge_groups(captions, groups) method")
        if order is not None and hasattr(judge, "order"):
            judge.order = order
        self.judge, self.key = judge, key

    def __call__(self, rollout: Rollout) -> Rollout:
        if rollout.completions is None or rollout.prompts is None:
            raise ValueError("PairwiseJudgeTransform needs rollout.prompts and rollout.completions (images)")
        group_ids = rollout.group_ids.cpu()
        groups = [torch.nonzero(group_ids == g).flatten().tolist() for g in torch.unique(group_ids).tolist()]
        sizes = {len(rows) for rows in groups}
        if len(sizes) != 1:
            raise ValueError(f"PairwiseJudgeTransform needs equal group sizes, got {sorted(sizes)}")
        size = sizes.pop()
        if size < 2:
            raise ValueError("pairwise judging needs group_size >= 2 (G = 1 has no pairs)")
        captions = [_caption(rollout.prompts[rows[0]]) for rows in groups]
        images = [[rollout.completions[i] for i in rows] for rows in groups]
        began = time.perf_counter()
        matrices = self.judge.judge_groups(captions, images)
        stored = torch.full((len(rollout), size), float("nan"))
        for rows, matrix in zip(groups, matrices, strict=True):
            stored[torch.tensor(rows)] = torch.as_tensor(matrix, dtype=torch.float32).cpu()
        rollout.data[self.key] = stored
        rollout.metrics.update({k: float(v) for k, v in getattr(self.judge, "last_metrics", {}).items()})
        rollout.metrics["time/judge_s"] = time.perf_counter() - began
        return rollout


def _caption(prompt: Any) -> str:
    if isinstance(prompt, dict):
        return str(prompt["prompt"])
    return str(prompt)
