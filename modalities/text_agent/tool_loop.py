"""Token bookkeeping and tool dispatch for the multi-turn tool-loop sampler (Search-R1-style agents).

Each trajectory is a Python list of token ids: the model's turns and the observations appended
between them. Observations are tokenized once and appended as ids, so the model conditions on exactly
the tokens the policy later re-scores. Tools are called once per tool name per turn, batched over rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from modalities.text_agent.tools.base import Tool, ToolError

ANSWER = "answer"
# Tags the agent format already uses for something else; a tool cannot take their names.
RESERVED_NAMES = (ANSWER, "information", "think")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def tool_table(tools: Sequence[Tool] | Mapping[str, Tool]) -> dict[str, Tool]:
    """Tools by tag name (a mapping's keys, else each tool's `name`), validated."""
    table = dict(tools) if isinstance(tools, Mapping) else {}
    if not isinstance(tools, Mapping):
        for tool in tools:
            name = getattr(tool, "name", None)
            if not isinstance(name, str):
                raise ValueError(f"tool {tool!r:.80} has no string `name` attribute")
            if name in table:
                raise ValueError(f"two tools are named {name!r}")
            table[name] = tool
    for name, tool in table.items():
        if not _NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise ValueError(f"tool name {name!r} must match {_NAME.pattern} and not be one of {list(RESERVED_NAMES)}")
        if not callable(tool):
            raise ValueError(f"tool {name!r} is not callable")
    return table


def action_pattern(names: Sequence[str]) -> re.Pattern[str]:
    """Regex for a complete action `<name>content</name>` over `names` (Search-R1's action format)."""
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"<({alternatives})>(.*?)</\1>", re.DOTALL)


def parse_action(text: str, pattern: re.Pattern[str]) -> tuple[str, str] | None:
    """(name, stripped content) of the last complete action in `text`, or None (an invalid action).

    Turns stop at the first closing tag, so the last complete action is the one that ended the turn.
    """
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return matches[-1].group(1), matches[-1].group(2).strip()


def default_invalid_action_message(tool_names: Sequence[str]) -> str:
    """The correction appended after a turn with no valid action (wording ours, after Search-R1's).

    It names only opening tags: a complete `<answer>…</answer>` pair in it would be read as an
    answer by exact-match rewards that scan the whole trajectory.
    """
    uses = "".join(f"To use {name}, I should write the query inside <{name}> tags. " for name in tool_names)
    return (
        f"\nMy previous action is invalid. {uses}To give the final answer, I should write it inside "
        "<answer> tags. Let me try again.\n"
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def encode_observation(tokenizer: Any, template: str, text: str, max_tokens: int | None) -> list[int]:
    """Ids of `template` with `text` at its "{}", at most `max_tokens` of them.

    An overlong observation keeps the template's own tokens and cuts the inserted text (its parts
    tokenized separately); when even the template alone is longer, the ids are simply cut.
    """
    prefix, suffix = template.split("{}")
    ids = encode_text(tokenizer, prefix + text + suffix)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    head, tail = encode_text(tokenizer, prefix), encode_text(tokenizer, suffix)
    room = max_tokens - len(head) - len(tail)
    if room < 0:
        return ids[:max_tokens]
    return head + encode_text(tokenizer, text)[:room] + tail


@dataclass
class Trajectory:
    """One row's growing response: token ids, which of them the model generated, and its turns.

    `turn_starts[k]` / `action_ends[k]` index the first / last generated token of model turn k in
    `response`; `turns[k]` is {"action": generated text, "observation": text appended after it};
    `engine_logprobs` holds the engine's log-prob of each response token (0 on observations).
    """

    prompt_ids: list[int]
    budget: int
    response: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    action_ends: list[int] = field(default_factory=list)
    turns: list[dict[str, str]] = field(default_factory=list)
    engine_logprobs: list[float] = field(default_factory=list)
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    num_invalid: int = 0
    answered: bool = False
    truncated: bool = False
    done: bool = False

    @property
    def remaining(self) -> int:
        """Response tokens left before `max_response_tokens`."""
        return self.budget - len(self.response)

    def add_turn(self, ids: list[int], text: str, logprobs: Sequence[float] | None = None) -> None:
        """Append one model turn (trained tokens) and the engine's log-prob of each (None: zeros)."""
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"a turn of {len(ids)} tokens came with {len(logprobs)} engine log-probs")
        self.turn_starts.append(len(self.response))
        self.engine_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.response.extend(ids)
        self.generated.extend([True] * len(ids))
        self.action_ends.append(len(self.response) - 1)
        self.turns.append({"action": text, "observation": ""})

    def add_observation(self, ids: list[int], decode: Callable[[list[int]], str]) -> None:
        """Append observation tokens (not trained), cut to the budget; a cut ends the trajectory.

        The turn's observation text is `decode` of the ids kept: what the model saw.
        """
        if len(ids) > self.remaining:
            ids = ids[: self.remaining]
            self.truncated = self.done = True
        self.response.extend(ids)
        self.engine_logprobs.extend([0.0] * len(ids))
        self.generated.extend([False] * len(ids))
        self.turns[-1]["observation"] += decode(ids)

    def turn_boundaries(self, after_observation: bool) -> list[int]:
        """Per-turn boundary positions: the last generated token, or the turn's last token overall."""
        if not after_observation:
            return list(self.action_ends)
        return [start - 1 for start in self.turn_starts[1:]] + [len(self.response) - 1]


@dataclass
class ToolRequest:
    """A row's call of tool `name` with `query` in the current turn."""

    row: Trajectory
    name: str
    query: str


def run_tools(tools: Mapping[str, Tool], requests: Sequence[ToolRequest], error_message: str) -> list[tuple[str, bool]]:
    """(observation text, failed) per request: one batched call per tool name, in request order.

    A `ToolError` fails the whole call: each of its requests gets `error_message` formatted with
    `name` and `error`. Any other exception propagates (a bug, not a tool outage).
    """
    results: list[tuple[str, bool]] = [("", False)] * len(requests)
    by_name: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        by_name.setdefault(request.name, []).append(index)
    for name, indices in by_name.items():
        queries = [requests[i].query for i in indices]
        try:
            outputs = tools[name](queries)
        except ToolError as error:
            failure = error_message.format(name=name, error=error)
            outputs, failed = [failure] * len(queries), True
        else:
            failed = False
            if not isinstance(outputs, list) or len(outputs) != len(queries):
                raise ValueError(f"tool {name!r} must return a list of {len(queries)} strings, got {outputs!r:.200}")
            if not all(isinstance(o, str) for o in outputs):
                raise ValueError(f"tool {name!r} returned a non-string observation: {outputs!r:.200}")
        for i, output in zip(indices, outputs, strict=True):
            results[i] = (output, failed)
    return results


def pad_right(rows: Sequence[Sequence[Any]], fill: Any, dtype: torch.dtype) -> Tensor:
    """[N, max len] tensor of right-padded rows."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def response_tensors(rows: Sequence[Trajectory], pad_id: int, after_observation: bool) -> dict[str, Tensor]:
    """Right-padded [N, T] response ids, attention mask, trained mask, info mask and turn ends."""
    response_ids = pad_right([r.response for r in rows], pad_id, torch.long)
    attended = pad_right([[True] * len(r.response) for r in rows], False, torch.bool)
    generated = pad_right([r.generated for r in rows], False, torch.bool)
    turn_ends = torch.zeros_like(attended)
    for i, row in enumerate(rows):
        turn_ends[i, row.turn_boundaries(after_observation)] = True
    return {
        "response_ids": response_ids,
        "response_attention_mask": attended,
        "mask": generated,
        "info_mask": attended & ~generated,
        "turn_ends": turn_ends,
    }
