"""UniGenBench testpoint judge: a VLM scores one image 0/1 on each testpoint of its prompt.

Spec docs/methods/pref_grpo.md §7 (official eval/*_eval.py): the judge sees the prompt, its testpoints with their
generic definitions and prompt-specific descriptions, analyses only visible content, and answers a list of
binary scores in `<score>[...]</score>` whose length equals the number of testpoints. The prompt wording
and definitions are ours. The official script re-asks forever on a bad reply; here re-asks are bounded and
a reply still invalid after them is None (counted; the benchmark leaves it out of the accuracy).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

_SCORE = re.compile(r"<score>(.*?)</score>", re.DOTALL)


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
    """The binary scores of the last `<score>[...]</score>` block; None unless it is a list of `count` 0/1 values."""
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

    After each `judge` call `last_metrics` holds judge/images, judge/invalid, judge/failures (failed
    requests), judge/reasks and judge/latency_s (mean seconds per request).

    Args:
        client: any JudgeClient that understands image parts.
        max_retries_invalid: re-asks of a reply without a valid score list (a failed request is not re-asked:
            the client already retried it).
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, client: JudgeClient, max_retries_invalid: int = 2) -> None:
        if max_retries_invalid < 0:
            raise ValueError(f"max_retries_invalid must be >= 0, got {max_retries_invalid}")
        check_client(client)
        self.client, self.max_retries_invalid = client, max_retries_invalid
        self.last_metrics: dict[str, float] = {}

    def judge(self, items: Sequence[TestpointItem]) -> tuple[list[list[int] | None], list[str | None]]:
        """(scores per item or None, last raw reply per item)."""
        prompts = [build_testpoint_messages(i.prompt, i.testpoints, i.descriptions, i.image) for i in items]
        counts = [len(i.testpoints) for i in items]
        before = stats_snapshot(self.client)
        asked = ask_until_valid(
            self.client,
            prompts,
            lambda k, answer: parse_testpoint_scores(answer, counts[k]),
            self.max_retries_invalid + 1,
            reminder=lambda k: REASK_PROMPT.format(count=counts[k]),
        )
        scores, replies = asked.values, asked.replies
        used = stats_snapshot(self.client).since(before)
        self.last_metrics = {
            "judge/images": float(len(items)),
            "judge/invalid": float(sum(s is None for s in scores)),
            "judge/failures": float(sum(r is None for r in replies)),
            "judge/reasks": float(asked.reasks),
            "judge/latency_s": used.mean_latency_s,
        }
        return scores, replies
