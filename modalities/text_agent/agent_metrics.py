"""Search-agent trajectory statistics, usable as shaping rewards (`rewards.base.FunctionReward`) and a rule judge.

`searched` / `answered` read a tool-loop trajectory text (the sampler's `rollout.completions`): they
are lenient on purpose (stray text or tags elsewhere do not matter), unlike `rewards.text.qa.FormatReward`,
so a random-init tiny model gets a signal before it writes whole well-formed trajectories; a query or an
answer must still hold a letter or digit (a tag alone is no query). A failed search (the tool raised
`ToolError`, so the observation is the tool loop's error message, `FAILED_SEARCH`) earns nothing.
`rule_judge_reply` stands in for the PPR judge model in CPU configs and tests (with
`rewards.judges.client.FakeJudgeClient`): a deterministic reply in the judge's output format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# How the tool loop's observation of a failed search starts: `ToolLoopSampler`'s default
# `tool_error_message` ("The {name} tool failed: {error}") for the tool named "search".
FAILED_SEARCH = "The search tool failed:"
_SEARCH_CALL = re.compile(rf"<search>(.*?)</search>\s*<information>(\s*{re.escape(FAILED_SEARCH)})?", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_RESPONSE = re.compile(r"\*\*Response\*\*:(.*)", re.DOTALL)
_QUERY = re.compile(r"\*\*Query\*\*:(.*?)\*\*Response\*\*:", re.DOTALL)
_WORD = re.compile(r"[a-z0-9]{3,}")
_TAG = re.compile(r"</?[A-Za-z_]+>")
_TEXT = re.compile(r"[A-Za-z0-9]")


def has_text(content: str) -> bool:
    """True when `content` holds a letter or digit outside markup tags (`<search><search>` is empty)."""
    return bool(_TEXT.search(_TAG.sub("", content)))


def successful_searches(text: str) -> list[re.Match[str]]:
    """The search calls with a query (see `has_text`) whose observation is not a failure message, in order.

    Each match ends where the observation text begins (after `<information>`).
    """
    return [m for m in _SEARCH_CALL.finditer(text) if has_text(m.group(1)) and m.group(2) is None]


def searched(prompt: Any, completion: str | None, **_: Any) -> float:
    """1.0 when the trajectory called the search tool with a query and got results back (not a failure message)."""
    return float(bool(successful_searches(completion or "")))


def answered(prompt: Any, completion: str | None, **_: Any) -> float:
    """1.0 when the trajectory holds an `<answer>...</answer>` with text in it (see `has_text`), else 0.0."""
    return float(any(has_text(match) for match in _ANSWER.findall(completion or "")))


def answered_after_search(prompt: Any, completion: str | None, **_: Any) -> float:
    """1.0 when an answer with text follows the observation of the first successful search, else 0.0.

    Unlike `answered`, an answer given without searching (or after failed searches only) earns nothing,
    so a policy that answers at once (which ends the episode) is not a cheaper optimum than searching first.
    """
    text = completion or ""
    calls = successful_searches(text)
    if not calls:
        return 0.0
    call = calls[0]
    rest = text[call.end() :]
    closing = rest.find("</information>")
    return answered(prompt, rest[closing:] if closing >= 0 else "")


def rule_judge_reply(messages: Sequence[Mapping[str, Any]]) -> str:
    """A deterministic PPR-judge reply for one judge conversation (built by `rewards.judges.ppr`).

    Scores the judged turn ("**Response**") out of 2: one point for a `<search>` with a non-empty query,
    one more when the query shares a word (3+ letters, case-folded) with the question ("**Query**",
    whose first line is the question). No point without a search.
    """
    user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    response = _RESPONSE.search(user)
    query_block = _QUERY.search(user)
    turn = response.group(1) if response else ""
    question = query_block.group(1).strip().split("\n", 1)[0] if query_block else ""
    search = re.search(r"<search>(.*?)</search>", turn, re.DOTALL)
    score = 0
    if search and has_text(search.group(1)):
        score = 1 + int(bool(set(_WORD.findall(search.group(1).lower())) & set(_WORD.findall(question.lower()))))
    analysis = "Analysis: rule-based turn check (a search was issued; its query overlaps the question)."
    return f"{analysis}\nScores: <final_score>{score},2</final_score>"
