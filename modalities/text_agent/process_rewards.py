"""Principle process rewards for tool-loop rollouts: judge each intermediate turn, store the scores for ReNorm.

Chain (spec docs/methods/ppr.md §5-6): ProcessRewardTransform -> toolkit.reward_transforms.ReNorm -> GAE (official PPR)
or a
group normalizer (GRPO-family variant). The final answer turn is never judged: it carries the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rewards.judges.ppr import PrincipleProcessJudge, question_text, split_trajectory
from toolkit.reward_transforms.common import safe_mean
from toolkit.rollout import Rollout


class ProcessRewardTransform:
    """Calls a PrincipleProcessJudge on a rollout; writes `rollout.data[output_key]` for ReNorm.

    Per row the turns are `rollout.data[turns_key]` (the tool-loop sampler's (action, observation)
    pairs), or, when absent, the completion text split at `<information>` blocks. With
    `rollout.turn_ends`, a row with K turn ends gets its first K - 1 turns judged (the list may hold K
    turns, the last being the final answer, or only the K - 1 intermediate ones); without it, every
    turn but the last. The question is the prompt dict's `judge.question_key` entry, else its prompt's
    user message.

    Writes: `rollout.data[output_key]` = N lists of r_p (None = invalid; ReNorm's `invalid_prm`
    places those), reward component `component` = the judge's per-row mean (its own invalid policy;
    NaN = nothing judged; `rollout.scores` is left alone, so ReNorm still reads the outcome there),
    and metrics `judge/*` and `reward/<component>`.

    Args:
        judge: the judge, or a mapping of its keyword arguments (see PrincipleProcessJudge.from_config).
        turns_key: rollout.data key of the per-row turns.
        output_key: rollout.data key ReNorm reads (its `key`).
        component: reward component name for the per-row mean; None adds no component.
    """

    def __init__(
        self,
        judge: PrincipleProcessJudge | Mapping[str, Any],
        turns_key: str = "turn_texts",
        output_key: str = "process_rewards",
        component: str | None = "process",
    ) -> None:
        self.judge = judge if isinstance(judge, PrincipleProcessJudge) else PrincipleProcessJudge.from_config(judge)
        self.turns_key, self.output_key, self.component = turns_key, output_key, component

    def __call__(self, rollout: Rollout) -> Rollout:
        n = len(rollout)
        questions = [self._question(row) for row in rollout.prompts or [None] * n]
        turns = self._judged_turns(rollout)
        result = self.judge.judge(questions, turns)
        rollout.data[self.output_key] = result.process_rewards
        if self.component is not None:
            rollout.rewards[self.component] = result.scores
            rollout.metrics[f"reward/{self.component}"] = safe_mean(result.scores)
        rollout.metrics.update(result.metrics)
        return rollout

    def _question(self, row: Any) -> str:
        if row is None:
            raise ValueError("ProcessRewardTransform needs rollout.prompts (the questions for the judge)")
        if isinstance(row, Mapping) and isinstance(row.get(self.judge.question_key), str):
            return str(row[self.judge.question_key])
        return question_text(row.get("prompt") if isinstance(row, Mapping) else row)

    def _judged_turns(self, rollout: Rollout) -> list[list[Any]]:
        """The turns to judge per row (all but the final one)."""
        n = len(rollout)
        if self.turns_key in rollout.data:
            rows: Sequence[Sequence[Any]] = rollout.data[self.turns_key]
        elif rollout.completions is not None:
            rows = [split_trajectory(str(text)) for text in rollout.completions]
        else:
            raise ValueError(f"rollout.data has no {self.turns_key!r} and rollout.completions is not set")
        if len(rows) != n:
            raise ValueError(f"rollout.data[{self.turns_key!r}] has {len(rows)} rows, expected N={n}")
        if rollout.turn_ends is None:
            return [list(row)[:-1] for row in rows]
        num_mid = (rollout.turn_ends.sum(dim=1) - 1).clamp_min(0).tolist()
        out = []
        for i, (row, k) in enumerate(zip(rows, num_mid, strict=True)):
            if len(row) not in (k, k + 1):
                raise ValueError(
                    f"row {i} has {k + 1} turn ends but {len(row)} turns (expected {k + 1}, or {k} without the final)"
                )
            out.append(list(row)[:k])
        return out
