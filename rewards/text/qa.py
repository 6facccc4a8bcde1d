"""Open-domain QA rewards for search agents: exact match, token F1 and the Search-R1 trajectory format.

Answers are normalized as in SQuAD (lower-case, punctuation removed, articles a/an/the removed,
whitespace collapsed) and compared with every golden answer of the row (list per row in metadata
`golden_answers`, `answers` or `answer`; a row without any is not applicable: NaN).

The answer is the LAST `<answer>...</answer>` of the text. Official Search-R1 / PPR `qa_em` searches
prompt + response and needs at least 2 matches, because the prompt's instructions contain an example
answer; that is the default here (`include_prompt=True`, `min_answer_tags=2`; prompts lacking the
example are counted in `prompts_without_example` and warned about). For such prompts use
`include_prompt=False, min_answer_tags=1`. Note: Search-R1's own template holds TWO matches
(`<answer> and </answer>` and `<answer> Beijing </answer>`), so there the rule never fires and an
answer-less response is scored as "Beijing"; our templates (`qa_data.py`) hold exactly one.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from rewards.base import RewardOutput

log = logging.getLogger(__name__)

ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
DEFAULT_ANSWER_KEYS = ("golden_answers", "answers", "answer")
MatchMode = Literal["exact", "substring"]


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def as_answer_list(golden: Any) -> list[str]:
    """Golden answers as a list of strings (a single string or number becomes a one-item list)."""
    if golden is None:
        return []
    if isinstance(golden, (str, int, float)):
        return [str(golden)]
    return [str(g) for g in golden]


def exact_match(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized golden answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(g) for g in as_answer_list(golden_answers)))


def substring_match(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """1.0 if any normalized golden answer occurs inside the normalized prediction (Search-R1's `subem`)."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(g) in predicted for g in as_answer_list(golden_answers)))


def f1_score(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """SQuAD token F1 between normalized prediction and golden answer, max over golden answers."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for golden in as_answer_list(golden_answers):
        reference = normalize_answer(golden).split()
        common = sum((Counter(predicted) & Counter(reference)).values())
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def extract_answer(text: str, min_answer_tags: int = 1) -> str | None:
    """The stripped content of the last `<answer>...</answer>`; None with fewer than `min_answer_tags` of them."""
    matches = ANSWER_PATTERN.findall(text)
    if not matches or len(matches) < min_answer_tags:
        return None
    return str(matches[-1]).strip()


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string as is, chat messages' contents joined, None as ""."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        parts = [m.get("content", "") if isinstance(m, Mapping) else str(m) for m in prompt]
        return "\n".join(p if isinstance(p, str) else str(p) for p in parts)
    return str(prompt)


def golden_answers_per_row(metadata: Mapping[str, Any], n: int, answers_key: str | None) -> list[list[str]]:
    """The golden answers of each of the n rows, from the first metadata key present."""
    keys = (answers_key,) if answers_key is not None else DEFAULT_ANSWER_KEYS
    for key in keys:
        values = metadata.get(key)
        if values is not None:
            if isinstance(values, (str, bytes)) or len(values) != n:
                raise ValueError(f"metadata {key!r} must hold one entry per row ({n}), got {values!r:.200}")
            return [as_answer_list(v) for v in values]
    raise ValueError(f"QA rewards need golden answers per row in metadata {list(keys)}; got keys {sorted(metadata)}")


class _AnswerReward:
    """Shared extraction: last `<answer>` of (prompt +) sample, golden answers per row, NaN without them."""

    def __init__(self, min_answer_tags: int, include_prompt: bool, answers_key: str | None) -> None:
        if isinstance(min_answer_tags, bool) or min_answer_tags < 1:
            raise ValueError(f"min_answer_tags must be >= 1, got {min_answer_tags}")
        self.min_answer_tags = min_answer_tags
        self.include_prompt = include_prompt
        self.answers_key = answers_key
        self._warned = False

    def score(self, answer: str, golden: list[str]) -> float:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        goldens = golden_answers_per_row(metadata, len(samples), self.answers_key)
        scores, answered, unprimed = [], 0, 0
        for prompt, sample, golden in zip(prompts, samples, goldens, strict=True):
            head = prompt_text(prompt) if self.include_prompt else ""
            unprimed += len(ANSWER_PATTERN.findall(head)) < self.min_answer_tags - 1
            answer = extract_answer(head + str(sample or ""), self.min_answer_tags)
            answered += answer is not None
            if not golden:
                scores.append(math.nan)
            else:
                scores.append(0.0 if answer is None else self.score(answer, golden))
        self._warn_unprimed(unprimed)
        n = max(len(samples), 1)
        metrics = {"answer_rate": answered / n, "prompts_without_example": float(unprimed)}
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), metrics=metrics)

    def _warn_unprimed(self, count: int) -> None:
        if count and not self._warned:
            self._warned = True
            log.warning(
                "%d prompt(s) show fewer than %d example <answer> tag(s), so one <answer> in the completion "
                "is not enough for min_answer_tags=%d; for such prompts use include_prompt=False, min_answer_tags=1",
                count,
                self.min_answer_tags - 1,
                self.min_answer_tags,
            )


class ExactMatchReward(_AnswerReward):
    """Exact match of the last `<answer>` against the golden answers (Search-R1 / PPR `qa_em`).

    Args:
        min_answer_tags: `<answer>` matches needed in the searched text (official: 2, see module doc).
        include_prompt: search prompt + sample (official) or the sample only.
        match: "exact" (official EM) or "substring" (a golden answer inside the answer, Search-R1's subEM).
        answers_key: metadata key of the golden answers; None tries golden_answers, answers, answer.
        format_score: score of an extracted but wrong answer (official 0).
    """

    def __init__(
        self,
        min_answer_tags: int = 2,
        include_prompt: bool = True,
        match: MatchMode = "exact",
        answers_key: str | None = None,
        format_score: float = 0.0,
    ) -> None:
        if match not in get_args(MatchMode):
            raise ValueError(f"match={match!r} is not one of {list(get_args(MatchMode))}")
        super().__init__(min_answer_tags, include_prompt, answers_key)
        self.match: MatchMode = match
        self.format_score = format_score

    def score(self, answer: str, golden: list[str]) -> float:
        hit = exact_match(answer, golden) if self.match == "exact" else substring_match(answer, golden)
        return 1.0 if hit else self.format_score


class F1Reward(_AnswerReward):
    """SQuAD token F1 of the last `<answer>` against the golden answers (max over them).

    Args: as `ExactMatchReward` (min_answer_tags, include_prompt, answers_key).
    """

    def __init__(self, min_answer_tags: int = 2, include_prompt: bool = True, answers_key: str | None = None) -> None:
        super().__init__(min_answer_tags, include_prompt, answers_key)

    def score(self, answer: str, golden: list[str]) -> float:
        return f1_score(answer, golden)


_TAG = re.compile(r"<(/?)(think|search|answer|information)>")


def search_format_error(text: str, require_think: bool = False, require_search: bool = False) -> str | None:
    """Why a search-agent trajectory is malformed, or None when it is well formed.

    Well formed: tags never nest or dangle; every `</search>` is followed (only whitespace between)
    by an `<information>` block and every `<information>` block follows a search; exactly one
    non-empty `<answer>` ends the text; with `require_think`, each action comes after a `<think>`
    block of the same turn; with `require_search`, at least one search. Text inside `<information>`
    (retrieved documents) is not checked.
    """
    open_tag, info_expected_at, turn_thought = "", -1, False
    searches, answer_end = 0, -1
    for m in _TAG.finditer(text):
        closing, tag = m.group(1) == "/", m.group(2)
        if open_tag == "information" and not (closing and tag == "information"):
            continue
        if open_tag:
            if not closing or tag != open_tag:
                return f"<{m.group(1)}{tag}> inside <{open_tag}>"
            open_tag = ""
            if tag == "think":
                turn_thought = True
            elif tag == "search":
                searches, info_expected_at = searches + 1, m.end()
            elif tag == "information":
                turn_thought = False
            else:
                answer_end = m.end()
            continue
        if closing:
            return f"</{tag}> without <{tag}>"
        if answer_end >= 0:
            return "tags after the answer"
        if info_expected_at >= 0:
            if tag != "information" or text[info_expected_at : m.start()].strip():
                return "a search is not directly followed by an <information> block"
            info_expected_at = -1
        elif tag == "information":
            return "an <information> block without a search before it"
        if tag in ("search", "answer") and require_think and not turn_thought:
            return f"<{tag}> without a <think> block before it"
        open_tag = tag
    return _final_format_error(text, open_tag, info_expected_at, answer_end, searches, require_search)


def _final_format_error(
    text: str, open_tag: str, info_expected_at: int, answer_end: int, searches: int, require_search: bool
) -> str | None:
    if open_tag:
        return f"<{open_tag}> is never closed"
    if info_expected_at >= 0:
        return "a search is not followed by an <information> block"
    if answer_end < 0:
        return "no <answer>"
    if text[answer_end:].strip():
        return "text after the answer"
    if not (extract_answer(text) or ""):
        return "empty <answer>"
    if require_search and searches == 0:
        return "no <search>"
    return None


class FormatReward:
    """Search-agent trajectory format: `valid_score` when `search_format_error` finds nothing, else `invalid_score`.

    [Our decision] Search-R1/PPR use no format reward for training (`format_score = 0`); this one
    is for logging or for weighting in, with `WeightedSum`. It reads the sample (trajectory) only.

    Args:
        require_think: every action needs a `<think>` block earlier in its turn.
        require_search: at least one search.
        valid_score, invalid_score: the two scores.
    """

    def __init__(
        self,
        require_think: bool = False,
        require_search: bool = False,
        valid_score: float = 1.0,
        invalid_score: float = 0.0,
    ) -> None:
        self.require_think = require_think
        self.require_search = require_search
        self.valid_score = valid_score
        self.invalid_score = invalid_score

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        errors = [search_format_error(str(s or ""), self.require_think, self.require_search) for s in samples]
        scores = [self.valid_score if e is None else self.invalid_score for e in errors]
        valid = sum(e is None for e in errors)
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32), metrics={"valid_rate": valid / max(len(samples), 1)}
        )
