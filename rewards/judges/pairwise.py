"""Pref-GRPO pairwise preference judge: a VLM compares two images of one caption (arXiv:2508.20751).

Spec docs/methods/pref_grpo.md §2: every unordered pair i < j of a group is judged once with the lower index shown as
"Image 1" (order "one", official) or in both orders ("symmetric"); the judge reasons in <think> and answers
`Image 1 is better` / `Image 2 is better` in <answer>. Anything else counts as a tie (0.5 each); a failed
call is NaN in the matrix, which the win-rate math also treats as 0.5. Both are counted. Replies are read
"official" (the released reward function's rule) or "lenient" (ours, more verdicts recovered). The prompt
wording is ours (the structure follows the official UnifiedReward-Think prompt). Win rates are computed in
toolkit.reward_transforms.pref_grpo during training; `PairwiseWinRateReward` is the standalone RewardModel.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.base import RewardOutput
from rewards.image.clip import caption_text, to_pil_images
from rewards.judges.asking import ask_until_valid, check_client, stats_snapshot
from rewards.judges.client import JudgeClient, image_part

PromptStyle = Literal["unifiedreward_think", "answer_only"]
PairOrder = Literal["one", "symmetric"]
ReplyParsing = Literal["official", "lenient"]

THINK_PROMPT = (
    "You are given a text caption and two images generated from it (Image 1, then Image 2).\n"
    "Caption: {caption}\n\n"
    "Judge both images on semantic consistency with the caption, aesthetics, authenticity, and any other "
    "dimension that matters for this caption. Give each image a score from 1 to 10 on every dimension and "
    "add up each image's scores. Write your reasoning inside <think></think>, then give your verdict inside "
    "<answer></answer> as exactly 'Image 1 is better' or 'Image 2 is better'."
)
ANSWER_ONLY_PROMPT = (
    "You are given a text caption and two images generated from it (Image 1, then Image 2).\n"
    "Caption: {caption}\n\n"
    "Which image matches the caption better and looks better? Reply with exactly 'Image 1 is better' or "
    "'Image 2 is better' inside <answer></answer>."
)
PROMPTS = {"unifiedreward_think": THINK_PROMPT, "answer_only": ANSWER_ONLY_PROMPT}

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OFFICIAL_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def build_pair_messages(
    caption: str, first: Any, second: Any, prompt_style: PromptStyle = "unifiedreward_think"
) -> list[dict[str, Any]]:
    """One user message: Image 1, Image 2 (image parts), then the comparison instructions."""
    text = PROMPTS[prompt_style].format(caption=caption.strip())
    return [{"role": "user", "content": [image_part(first), image_part(second), {"type": "text", "text": text}]}]


def parse_preference(
    text: str | None, require_answer_tag: bool = False, parsing: ReplyParsing = "lenient"
) -> float | None:
    """1.0 when Image 1 wins, 0.0 when Image 2 wins, None when the reply says neither (garbage / tie).

    "lenient": the last <answer> block is read when present, else the whole reply (unless
    `require_answer_tag`); matching is case-insensitive on "image 1 is better" / "image 2 is better",
    and a reply naming both is ambiguous (None). "official": `parse_official_preference`
    (`require_answer_tag` does not apply: the official rule always needs the tag).
    """
    if parsing == "official":
        return parse_official_preference(text)
    if parsing != "lenient":
        raise ValueError(f"parsing={parsing!r} is not supported; allowed: ['lenient', 'official']")
    if text is None:
        return None
    answers = _ANSWER.findall(text)
    if not answers and require_answer_tag:
        return None
    answer = (answers[-1] if answers else text).lower()
    first, second = "image 1 is better" in answer, "image 2 is better" in answer
    if first == second:
        return None
    return 1.0 if first else 0.0


def parse_official_preference(text: str | None) -> float | None:
    """The released Pref-GRPO reward's reading of a reply (CodeGoat24/Pref-GRPO `_extract_answer`).

    Only the first `<answer>…</answer>` block counts (tags case-sensitive), stripped; when it is not
    empty, containing "Image 1 is better" (case-sensitive) wins for Image 1, else containing "Image 2
    is better" wins for Image 2; everything else, a missing or empty block included, is a tie (None).
    So a reply naming both verdicts goes to Image 1, and a truncated reply without `</answer>` is a tie.
    """
    if text is None:
        return None
    match = _OFFICIAL_ANSWER.search(text)
    answer = match.group(1).strip() if match else ""
    if not answer:
        return None
    if "Image 1 is better" in answer:
        return 1.0
    return 0.0 if "Image 2 is better" in answer else None


def pair_jobs(group_size: int, order: PairOrder) -> list[tuple[int, int]]:
    """(shown first, shown second) pairs: i < j in row-major order, then (j, i) for "symmetric"."""
    if group_size < 2:
        raise ValueError(f"pairwise judging needs group_size >= 2, got {group_size}")
    pairs = [(i, j) for i in range(group_size) for j in range(i + 1, group_size)]
    return pairs + [(j, i) for i, j in pairs] if order == "symmetric" else pairs


class PairwisePreferenceJudge:
    """Judges all pairs of a group with a VLM client; returns [G, G] preference matrices.

    Entry [a, b] is the judgement with image a shown first: 1 = a wins, 0 = b wins, 0.5 = tie or
    unparsable reply, NaN = the call failed; entries not judged are NaN (toolkit.reward_transforms.pref_grpo reads
    only the judged ones). After each call `last_metrics` holds judge/pairs, judge/ties (unparsable
    replies, 0.5), judge/failures (failed calls), judge/tie_rate, judge/reasks, judge/latency_s.

    Args:
        client: a JudgeClient that understands image parts (OpenAIChatClient, HFVisionChatClient, a fake).
        prompt_style: "unifiedreward_think" (CoT, official) or "answer_only".
        order: "one" (official) or "symmetric".
        require_answer_tag: only an <answer> block counts (False: a bare verdict counts too); "lenient" only.
        max_retries_invalid: re-asks of an unparsable reply (0 = official: it is a tie at once).
        parsing: "official" (the released reward's rule, `parse_official_preference`; official recipes) or
            "lenient" (`parse_preference`: last block, any case, a bare verdict counts unless
            `require_answer_tag`, both verdicts = tie).
    """

    def __init__(
        self,
        client: JudgeClient,
        prompt_style: PromptStyle = "unifiedreward_think",
        order: PairOrder = "one",
        require_answer_tag: bool = False,
        max_retries_invalid: int = 0,
        parsing: ReplyParsing = "lenient",
    ) -> None:
        if prompt_style not in PROMPTS:
            raise ValueError(f"prompt_style={prompt_style!r} is not supported; allowed: {sorted(PROMPTS)}")
        if order not in ("one", "symmetric"):
            raise ValueError(f"order={order!r} is not supported; allowed: ['one', 'symmetric']")
        if max_retries_invalid < 0:
            raise ValueError(f"max_retries_invalid must be >= 0, got {max_retries_invalid}")
        if parsing not in ("official", "lenient"):
            raise ValueError(f"parsing={parsing!r} is not supported; allowed: ['lenient', 'official']")
        check_client(client)
        self.client, self.prompt_style, self.order, self.parsing = client, prompt_style, order, parsing
        self.require_answer_tag, self.max_retries_invalid = require_answer_tag, max_retries_invalid
        self.last_metrics: dict[str, float] = {}
        self.last_replies: list[list[str | None]] = []

    def judge_group(self, caption: str, images: Sequence[Any] | Tensor) -> Tensor:
        """[G, G] preference matrix of one group (see the class docstring)."""
        return self.judge_groups([caption], [images])[0]

    def judge_groups(self, captions: Sequence[str], groups: Sequence[Sequence[Any] | Tensor]) -> list[Tensor]:
        """One [G_b, G_b] matrix per group; all pairs of all groups go to the client in one batch."""
        if len(captions) != len(groups):
            raise ValueError(f"{len(captions)} captions but {len(groups)} groups")
        jobs: list[tuple[int, int, int]] = []
        prompts: list[list[dict[str, Any]]] = []
        sizes = []
        for b, (caption, images) in enumerate(zip(captions, groups, strict=True)):
            pil = to_pil_images(images)
            sizes.append(len(pil))
            for first, second in pair_jobs(len(pil), self.order):
                jobs.append((b, first, second))
                prompts.append(build_pair_messages(caption_text(caption), pil[first], pil[second], self.prompt_style))
        began, before = time.perf_counter(), stats_snapshot(self.client)
        values, replies, reasks = self._ask(prompts)
        used = stats_snapshot(self.client).since(before)
        matrices = [torch.full((g, g), math.nan) for g in sizes]
        self.last_replies = [[] for _ in groups]
        for (b, first, second), value, reply in zip(jobs, values, replies, strict=True):
            matrices[b][first, second] = math.nan if reply is None else (0.5 if value is None else value)
            self.last_replies[b].append(reply)
        failures = sum(r is None for r in replies)
        ties = sum(v is None and r is not None for v, r in zip(values, replies, strict=True))
        self.last_metrics = {
            "judge/pairs": float(len(jobs)),
            "judge/ties": float(ties),
            "judge/failures": float(failures),
            "judge/failure_rate": failures / len(jobs) if jobs else 0.0,
            "judge/tie_rate": (ties + failures) / len(jobs) if jobs else 0.0,
            "judge/reasks": float(reasks),
            "judge/latency_s": used.mean_latency_s if used.requests else time.perf_counter() - began,
        }
        return matrices

    def _ask(self, prompts: list[list[dict[str, Any]]]) -> tuple[list[float | None], list[str | None], int]:
        """Ask every pair; re-ask unparsable replies up to max_retries_invalid times. (value, reply, re-asks)."""
        asked = ask_until_valid(
            self.client,
            prompts,
            lambda _, answer: parse_preference(answer, self.require_answer_tag, self.parsing),
            self.max_retries_invalid + 1,
        )
        return asked.values, asked.replies, asked.reasks


def local_win_rates(matrix: Tensor, order: PairOrder = "one", decimals: int | None = 3) -> Tensor:
    """w_i = wins_i / (G − 1) from one [G, G] matrix, NaN = 0.5 (spec §2; mirrors toolkit.reward_transforms.pref_grpo).

    rewards/ may not import toolkit, so the standalone reward keeps this four-line copy of the formula:
    with order "one" only entries a < b are read, with "symmetric" every off-diagonal entry, each pair
    then counting half per order. Rounded like Python's `round` (official: 3 decimals).
    """
    g = matrix.shape[0]
    p = torch.nan_to_num(matrix.double(), nan=0.5)
    used = torch.ones(g, g, dtype=torch.bool).triu(1) if order == "one" else ~torch.eye(g, dtype=torch.bool)
    wins = (used * p).sum(1) + (used * (1 - p)).sum(0)
    rates = wins / (g - 1) / (1.0 if order == "one" else 2.0)
    return torch.tensor([round(v, decimals) if decimals is not None else v for v in rates.tolist()]).float()


class PairwiseWinRateReward:
    """Standalone RewardModel: judge each group's pairs, score = win rate (`renorm score`, notebooks).

    Rows are grouped by metadata `group_ids` when given, else in consecutive blocks of `group_size`
    (group-major, as the samplers lay them out). The caption of a group is its first row's prompt.
    """

    def __init__(self, judge: PairwisePreferenceJudge, group_size: int | None = None, decimals: int | None = 3) -> None:
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.judge, self.group_size, self.decimals = judge, group_size, decimals

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        members = self._groups(len(samples), metadata.get("group_ids"))
        matrices = self.judge.judge_groups(
            [caption_text(prompts[rows[0]]) for rows in members], [[samples[r] for r in rows] for rows in members]
        )
        scores = torch.full((len(samples),), math.nan)
        for rows, matrix in zip(members, matrices, strict=True):
            scores[rows] = local_win_rates(matrix, self.judge.order, self.decimals)
        return RewardOutput(
            scores=scores, components={"win_rate": scores.clone()}, metrics=dict(self.judge.last_metrics)
        )

    def _groups(self, n: int, group_ids: Any) -> list[list[int]]:
        if group_ids is not None:
            ids = [int(g) for g in group_ids]
            return [[i for i in range(n) if ids[i] == g] for g in dict.fromkeys(ids)]
        if self.group_size is None or n % self.group_size:
            raise ValueError(f"{n} samples do not split into groups of group_size={self.group_size}; pass group_ids")
        return [list(range(s, s + self.group_size)) for s in range(0, n, self.group_size)]
