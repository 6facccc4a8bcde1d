"""UniGenBench testpoint judge: a VLM scores one image 0/1 on each testpoint of its prompt.

Spec docs/methods/pref_grpo.md §7 (official eval/*_eval.py): the judge sees the prompt, its testpoints with their
generic definitions and prompt-specific descriptions, analyses only visible content, and answers a list of
binary scores in `<score>[...]</score>` whose length equals the number of testpoints. The prompt wording
and definitions are ours. Replies are read "official" (as the released evaluation script, CodeGoat24/UniGenBench
eval/src/eval_common.py: acceptance, then what its scoring makes of an accepted reply) or "lenient" (ours). A
reply still invalid after the bounded re-asks is None (counted; the benchmark leaves it out of the accuracy).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rewards.judges.asking import ask_until_valid, check_client, stats_snapshot
from rewards.judges.client import JudgeClient, image_part

# The 27 sub-dimensions and what each checks (our paraphrase of the benchmark's definitions).
TESTPOINT_DEFINITIONS: dict[str, str] = {
    "Attribute - Size": "size, height, length, thickness or width of an entity",
    "Attribute - Expression": "a facial expression that conveys a clear emotion",
    "Attribute - Quantity": "the exact number of entities, especially three or more",
    "Attribute - Material": "materials and textures",
    "Attribute - Color": "colors",
    "Attribute - Shape": "shapes",
    "Action - Full-body (Character/Anthropomorphic)": "full-body actions of characters or anthropomorphic beings",
    "Action - Hand (Character/Anthropomorphic)": "hand actions and well-formed hands (no missing or broken fingers)",
    "Action - Animal": "actions performed by animals",
    "Action - Contact Interaction": "physical contact between entities",
    "Action - Non-contact Interaction": "interactions without contact, such as eye contact",
    "Action - State": "a sustained state of an entity, usually given by a verb",
    "Relationship - Comparison": "attributes compared between two entities",
    "Relationship - Composition": "an entity made of one or more other entities",
    "Relationship - Inclusion": "an entity inside a container or on a surface (e.g. a picture on a wall)",
    "Relationship - Similarity": "similarities between different entities",
    "Compound - Imagination": "things impossible in real life",
    "Compound - Feature Matching": "different entities carrying their own, different attributes",
    "Grammar - Negation": "negations in the prompt are respected",
    "Grammar - Pronoun Reference": "pronouns resolved to the right entity",
    "Grammar - Consistency": "attributes shared among entities",
    "Entity Layout - Two-Dimensional Space": "arrangement of entities in the image plane",
    "Entity Layout - Three-Dimensional Space": "arrangement of entities in depth",
    "World Knowledge": "knowledge of landmarks, famous works, domain facts and culture",
    "Style": "art, painting, photography and design styles, and artists' styles",
    "Text Generation": "the requested text rendered exactly, with nothing missing or added",
    "Logical Reasoning": "the intent behind the prompt, which needs reasoning to depict",
}

SYSTEM_PROMPT = """You check whether a generated image satisfies a text-to-image prompt, one checkpoint at a time.
Prompt: {prompt}

Checkpoints and what each one checks:
{definitions}

What each checkpoint means for this prompt:
{descriptions}

For each checkpoint, describe only what is directly visible in the image (no guessing, no back story, \
leave out anything uncertain) and decide whether the image meets it: 1 if it does, 0 if not.
Answer in this format, each list with exactly {count} elements in checkpoint order:
<analysis>["analysis of checkpoint 1", ...]</analysis>
<score>[1, 0, ...]</score>"""

REASK_PROMPT = "Your reply had no valid <score>[...]</score> list of {count} values, each 0 or 1. Answer again."

ScoreParsing = Literal["official", "lenient"]
# The released script's --max_retries default: one ask plus 10 re-asks of the same prompt.
OFFICIAL_MAX_RETRIES = 10
LENIENT_MAX_RETRIES = 2

_SCORE = re.compile(r"<score>(.*?)</score>", re.DOTALL)
_ANALYSIS = re.compile(r"<analysis>(.*?)</analysis>", re.DOTALL)


def build_testpoint_messages(
    prompt: str, testpoints: Sequence[str], descriptions: Sequence[str], image: Any
) -> list[dict[str, Any]]:
    """One user message: the image, then the checkpoint instructions for `prompt`."""
    if len(testpoints) != len(descriptions):
        raise ValueError(f"{len(testpoints)} testpoints but {len(descriptions)} descriptions")
    definitions = "\n".join(f"- {t}: {TESTPOINT_DEFINITIONS.get(t, 'as named')}" for t in testpoints)
    described = "\n".join(f"- {t}: {d}" for t, d in zip(testpoints, descriptions, strict=True))
    text = SYSTEM_PROMPT.format(
        prompt=prompt.strip(), definitions=definitions, descriptions=described, count=len(testpoints)
    )
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]


def parse_testpoint_scores(text: str | None, count: int) -> list[int] | None:
    """Lenient reading: the binary scores of the last `<score>[...]</score>` block.

    None (invalid: re-asked) unless the block is a list of `count` values, each 0 or 1 (int or float, not bool).
    """
    if text is None:
        return None
    blocks = _SCORE.findall(text)
    if not blocks:
        return None
    try:
        values = ast.literal_eval(blocks[-1].strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(values, (list, tuple)) or len(values) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1) for v in values):
        return None
    return [int(v) for v in values]


@dataclass(frozen=True)
class AcceptedReply:
    """A reply the official reading accepts (not re-asked); `scores` None = its scoring leaves the image out."""

    scores: list[int] | None


def _literal(block: str) -> Any:
    """`ast.literal_eval` of a tag's stripped content; a ValueError for anything it cannot read."""
    try:
        return ast.literal_eval(block.strip())
    except (SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise ValueError(str(error)) from error


def accept_official_reply(text: str | None, count: int) -> tuple[Any, Any] | None:
    """(analysis, score) objects when the released script accepts the reply, else None (it asks again).

    Accepted: the FIRST `<analysis>…</analysis>` and the FIRST `<score>…</score>` (case-sensitive tags)
    both read as Python literals whose lengths both equal `count`: any sized literal passes (a string, a
    tuple, values such as True, 2 or "1"). Where the released script would crash instead (a literal
    without a length, one that cannot be stored as JSON), the reply is treated as not accepted.
    """
    if text is None:
        return None
    analysis_block, score_block = _ANALYSIS.search(text), _SCORE.search(text)
    if analysis_block is None or score_block is None:
        return None
    try:
        analysis, score = _literal(analysis_block.group(1)), _literal(score_block.group(1))
        if len(analysis) != count or len(score) != count:
            return None
        json.dumps({"analysis": analysis, "score": score}, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return None
    return analysis, score


def official_image_scores(analysis: Any, score: Any) -> list[int] | None:
    """What the released scoring makes of an accepted reply: 1 where a value equals 1, else 0.

    The script stores the reply as JSON and reads it back as a Python literal, skipping the image when
    that fails (any true/false/null/NaN/Infinity anywhere in the analysis or scores, e.g. a True score or
    a None analysis) or when the scores are not a list after the round trip (a string, a mapping). So
    1 and 1.0 pass, 0, 2, -1, "1" and [1] fail, and None here means the image is left out.
    """
    stored = json.dumps({"analysis": analysis, "score": score}, ensure_ascii=False, indent=4)
    try:
        values = ast.literal_eval(stored)["score"]
    except Exception:  # the released scoring skips the row on any error
        return None
    if not isinstance(values, list):
        return None
    return [int(value == 1) for value in values]


def parse_official_scores(text: str | None, count: int) -> AcceptedReply | None:
    """Official reading: None = not accepted (re-asked), else the accepted reply's scores (None = left out)."""
    accepted = accept_official_reply(text, count)
    return None if accepted is None else AcceptedReply(official_image_scores(*accepted))


@dataclass
class TestpointItem:
    """One (prompt, image) to judge."""

    __test__ = False  # not a pytest class despite the name

    prompt: str
    testpoints: list[str]
    descriptions: list[str]
    image: Any


class TestpointJudge:
    """Scores images 0/1 per testpoint with a VLM client; invalid replies are re-asked, then None.

    After each `judge` call `last_metrics` holds judge/images, judge/invalid (no accepted reply),
    judge/excluded (accepted but left out by the official scoring), judge/failures (failed requests),
    judge/reasks and judge/latency_s (mean seconds per request).

    Args:
        client: any JudgeClient that understands image parts.
        parsing: "official" (`parse_official_scores`: the released script's acceptance and scoring; it re-sends
            the same prompt, failed requests included) or "lenient" (`parse_testpoint_scores`: re-asks show
            the bad reply and a format reminder; a failed request is not re-asked: the client retried it).
        max_retries_invalid: re-asks of a reply that is not accepted; None = 10 for "official" (the script's
            --max_retries default), 2 for "lenient".
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(
        self, client: JudgeClient, max_retries_invalid: int | None = None, parsing: ScoreParsing = "official"
    ) -> None:
        if parsing not in ("official", "lenient"):
            raise ValueError(f"parsing={parsing!r} is not supported; allowed: ['lenient', 'official']")
        if max_retries_invalid is None:
            max_retries_invalid = OFFICIAL_MAX_RETRIES if parsing == "official" else LENIENT_MAX_RETRIES
        if max_retries_invalid < 0:
            raise ValueError(f"max_retries_invalid must be >= 0, got {max_retries_invalid}")
        check_client(client)
        self.client, self.max_retries_invalid, self.parsing = client, max_retries_invalid, parsing
        self.last_metrics: dict[str, float] = {}

    def judge(self, items: Sequence[TestpointItem]) -> tuple[list[list[int] | None], list[str | None]]:
        """(scores per item or None, last raw reply per item)."""
        prompts = [build_testpoint_messages(i.prompt, i.testpoints, i.descriptions, i.image) for i in items]
        counts = [len(i.testpoints) for i in items]
        before = stats_snapshot(self.client)
        official = self.parsing == "official"
        asked = ask_until_valid(
            self.client,
            prompts,
            lambda k, answer: _parse(answer, counts[k], official),
            self.max_retries_invalid + 1,
            reminder=None if official else (lambda k: REASK_PROMPT.format(count=counts[k])),
            reask_failed=official,
        )
        scores = [None if v is None else v.scores for v in asked.values]
        used = stats_snapshot(self.client).since(before)
        self.last_metrics = {
            "judge/images": float(len(items)),
            "judge/invalid": float(sum(v is None for v in asked.values)),
            "judge/excluded": float(sum(v is not None and v.scores is None for v in asked.values)),
            "judge/failures": float(sum(r is None for r in asked.replies)),
            "judge/reasks": float(asked.reasks),
            "judge/latency_s": used.mean_latency_s,
        }
        return scores, asked.replies


def _parse(answer: str | None, count: int, official: bool) -> AcceptedReply | None:
    """The ask loop's parser: None re-asks; the lenient reading accepts only what it can score."""
    if official:
        return parse_official_scores(answer, count)
    scores = parse_testpoint_scores(answer, count)
    return None if scores is None else AcceptedReply(scores)
