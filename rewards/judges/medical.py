"""Medical caption judge (MedGRPO arXiv:2512.06581 / MedVidBench leaderboard rubric, spec docs/methods/medgrpo.md §5).

Five 1–5 ratings of a prediction *relative to* a reference caption (comparative similarity scoring):
R2 medical terminology, R3 anatomical / instrument detail, R8 specificity, R5 clinical context, R4 action / state.
The reply must give all five as lines `R2: 4` (also `R2 = 4`, `R2 4`, `**R2**: 4`); otherwise the sample is re-asked
with exponential back-off (at most `max_attempts` asks); still unparsable -> NaN, counted. The training-time prompt
was not released; this prompt paraphrases the evaluation rubric.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardOutput
from rewards.judges.asking import ask_until_valid, check_client, client_from_config, stats_snapshot
from rewards.judges.client import JudgeClient

ASPECTS: tuple[str, ...] = ("R2", "R3", "R8", "R5", "R4")

SYSTEM_PROMPT = """You are an expert medical evaluator of surgical and clinical video descriptions.
Compare the PREDICTION with the REFERENCE and rate how closely the prediction matches the reference on each
dimension below (1 = no match at all, 5 = matches the reference fully). Rate similarity to the reference, not
general writing quality.

R2 Medical terminology accuracy: 1 wrong or lay terms; 2 mostly imprecise; 3 partly correct; 4 mostly correct;
   5 the same precise terminology as the reference.
R3 Anatomical and instrument detail: 1 wrong structures/instruments; 2 mostly wrong; 3 some correct; 4 mostly
   correct; 5 all structures and instruments of the reference, correctly named.
R8 Specificity and level of detail: 1 generic; 2 vague; 3 some specific details; 4 most details; 5 as specific
   as the reference.
R5 Clinical context relevance: 1 unrelated context; 2 weak; 3 partly relevant; 4 mostly relevant; 5 the same
   clinical context and purpose as the reference.
R4 Action and state accuracy: 1 wrong actions/states; 2 mostly wrong; 3 partly correct; 4 mostly correct;
   5 the actions and states of the reference.

Reply with exactly five lines and nothing else:
R2: <1-5>
R3: <1-5>
R8: <1-5>
R5: <1-5>
R4: <1-5>"""

REASK_PROMPT = "Your reply did not give all five ratings. Reply with exactly the five lines R2:, R3:, R8:, R5:, R4:."

_LINE = re.compile(r"^\s*[*_`#>\-\s]*(R[23458])[*_`\s]*(?:[:=]\s*|\s+)[*_`\s]*(\d+)\b")


def parse_rubric(text: str | None) -> dict[str, int] | None:
    """The five ratings {R2, R3, R8, R5, R4} of a judge reply, each 1..5; None unless all five parse.

    One rating per line, `R2: 4`, `R2 = 4`, `R2 4` or `**R2**: 4`; the first line naming an aspect counts.
    """
    if not isinstance(text, str):
        return None
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(1) not in found:
            found[match.group(1)] = int(match.group(2))
    if set(found) != set(ASPECTS) or not all(1 <= v <= 5 for v in found.values()):
        return None
    return {aspect: found[aspect] for aspect in ASPECTS}


def rubric_score(ratings: Mapping[str, int]) -> float:
    """Judge score of one sample: the mean of its five ratings (1–5)."""
    return sum(ratings[a] for a in ASPECTS) / len(ASPECTS)


def aggregate_rubrics(rows: Sequence[Mapping[str, int] | None]) -> float:
    """Evaluator aggregate over samples: mean over aspects of each aspect's mean, aspects with mean 0 ignored.

    Failed samples (None) are excluded; NaN when nothing is left.
    """
    valid = [r for r in rows if r is not None]
    if not valid:
        return math.nan
    means = [sum(r[a] for r in valid) / len(valid) for a in ASPECTS]
    kept = [m for m in means if m != 0]
    return sum(kept) / len(kept) if kept else math.nan


def build_messages(prediction: str, reference: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages asking for the five ratings of `prediction` against `reference`."""
    user = f"REFERENCE:\n{reference.strip()}\n\nPREDICTION:\n{prediction.strip()}"
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


@dataclass
class JudgedCaptions:
    """Result of `MedicalCaptionJudge.judge`.

    Attributes:
        scores: [N] float32 mean rating (1–5); NaN where the judge failed.
        ratings: per row the five ratings, None where the judge failed.
        replies: per row the judge's last reply (None = request failed).
        metrics: judge/requests, judge/failures, judge/failure_rate, judge/reasks, judge/latency_s.
    """

    scores: Tensor
    ratings: list[dict[str, int] | None]
    replies: list[str | None]
    metrics: dict[str, float]


class MedicalCaptionJudge:
    """Five-aspect medical caption judge; as a RewardModel it scores `samples` against metadata `answer`.

    Args:
        client: any JudgeClient (OpenAIChatClient for GPT-4.1 / vLLM, HFChatClient, FakeJudgeClient).
        max_attempts: asks per sample until all five ratings parse (the evaluator uses 5).
        backoff_s: sleep before re-ask k is backoff_s · 2^(k-1), capped at max_backoff_s (0 = no sleep).
        reask_with_feedback: a re-ask shows the bad reply and a format reminder; False re-sends the prompt.
        system_prompt: replaces the rubric prompt.
        reference_key: metadata key holding the reference text.
    """

    def __init__(
        self,
        client: JudgeClient,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        reask_with_feedback: bool = True,
        system_prompt: str | None = None,
        reference_key: str = "answer",
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s}, {max_backoff_s}")
        check_client(client)
        self.client, self.max_attempts = client, max_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.reask_with_feedback = reask_with_feedback
        self.system_prompt = system_prompt if system_prompt is not None else SYSTEM_PROMPT
        self.reference_key = reference_key

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MedicalCaptionJudge:
        """Build from keyword arguments; a mapping `client` becomes OpenAIChatClient (base_url) or HFChatClient."""
        kwargs = dict(config)
        if "client" in kwargs:
            kwargs["client"] = client_from_config(kwargs["client"])
        return cls(**kwargs)

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        references = metadata.get(self.reference_key)
        if references is None:
            raise ValueError(f"MedicalCaptionJudge needs metadata {self.reference_key!r} (the reference captions)")
        result = self.judge([str(s or "") for s in samples], [str(r or "") for r in references])
        return RewardOutput(scores=result.scores, metrics=result.metrics)

    def judge(self, predictions: Sequence[str], references: Sequence[str]) -> JudgedCaptions:
        """Rate every (prediction, reference) pair; failures are NaN and counted."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        before = stats_snapshot(self.client)
        prompts = [build_messages(p, r, self.system_prompt) for p, r in zip(predictions, references, strict=True)]
        ratings, replies, reasks = self._ask(prompts)
        used = stats_snapshot(self.client).since(before)
        failures = sum(r is None for r in ratings)
        n = len(prompts)
        scores = torch.tensor([rubric_score(r) if r else math.nan for r in ratings], dtype=torch.float32)
        metrics = {
            "judge/requests": float(n),
            "judge/failures": float(failures),
            "judge/failure_rate": failures / n if n else 0.0,
            "judge/reasks": float(reasks),
            "judge/latency_s": used.mean_latency_s,
        }
        return JudgedCaptions(scores, ratings, replies, metrics)

    def _ask(self, prompts: list[list[dict[str, str]]]) -> tuple[list[dict[str, int] | None], list[str | None], int]:
        """Ask until all five ratings parse (failed requests too), backing off between rounds."""
        asked = ask_until_valid(
            self.client,
            prompts,
            lambda _, answer: parse_rubric(answer),
            self.max_attempts,
            reminder=(lambda _: REASK_PROMPT) if self.reask_with_feedback else None,
            reask_failed=True,
            before_reask=self._back_off,
        )
        return asked.values, asked.replies, asked.reasks

    def _back_off(self, attempt: int) -> None:
        if self.backoff_s > 0:
            time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
