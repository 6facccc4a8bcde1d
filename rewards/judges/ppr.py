"""Principle process reward model (PPRM) of PPR: a judge scores each intermediate turn of a search agent.

arXiv:2509.25598 (only the abstract was available; prompt structure and parsing follow the official code,
spec docs/methods/ppr.md §3): the judge writes its own principles, scores the turn against each and ends with
`<final_score>SCORE,MAX</final_score>`; r_p = SCORE / MAX in [0, 1]. The prompt wording here is ours.
Invalid outputs are re-asked, then replaced by an explicit, counted policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.base import RewardOutput
from rewards.judges.asking import ask_until_valid, check_client, client_from_config, stats_snapshot
from rewards.judges.client import JudgeClient

InvalidPolicy = Literal["paper", "neutral", "zero", "skip"]
INVALID_POLICIES: tuple[str, ...] = ("paper", "neutral", "zero", "skip")

DEFAULT_PRINCIPLES = (
    "1. Use of evidence: does the turn take correct facts from the <information> it has seen, given the question?\n"
    "2. Search query: is the <search> query correct, specific and aimed at what the question still needs?\n"
    "3. Search decision: is it right to search at this point, or should the agent have stopped searching?"
)

SYSTEM_PROMPT = """You are a strict judge of a search agent that answers a question over several turns.
Judge only the **Response**: a single turn of this multi-turn interaction. It may not contain a final answer.

Write down reasonable principles for judging this turn, then score the turn on each principle separately.
Consider these principles first:
{principles}

Format rule: all text of the Response must be inside <think>, <search>, <information> or <answer> tags.
If any text lies outside these tags, SCORE must be 0.

Reply with exactly two lines:
Analysis: <the principles and how the turn does on each>
Scores: <final_score>SCORE,MAX_SCORE</final_score>
SCORE and MAX_SCORE are integers with 0 <= SCORE <= MAX_SCORE, for example <final_score>4,6</final_score>."""

REASK_PROMPT = (
    "Your reply did not end with a valid <final_score>SCORE,MAX_SCORE</final_score> (two integers, "
    "0 <= SCORE <= MAX_SCORE, MAX_SCORE > 0). Reply again with exactly the two lines Analysis: and Scores:."
)

_FINAL_SCORE = re.compile(r"<final_score>(.*?)</final_score>", re.DOTALL)
_SCORE_PAIR = re.compile(r"\s*([+-]?\d+)\s*,\s*([+-]?\d+)\s*")
_INFORMATION = re.compile(r"(<information>.*?</information>)", re.DOTALL)
_CHATML_USER = re.compile(r"<\|im_start\|>user(.*?)<\|im_end\|>", re.DOTALL)


def parse_final_score(text: str | None) -> tuple[int, int] | None:
    """(SCORE, MAX) from the last `<final_score>SCORE,MAX</final_score>` of `text`; None when invalid.

    Invalid (spec docs/methods/ppr.md §3): no tag, the last tag not two integers, MAX <= 0, SCORE < 0 or SCORE > MAX.
    An earlier well-formed tag does not rescue a malformed last one.
    """
    if text is None:
        return None
    tags = _FINAL_SCORE.findall(text)
    if not tags:
        return None
    match = _SCORE_PAIR.fullmatch(tags[-1])
    if match is None:
        return None
    score, max_score = int(match.group(1)), int(match.group(2))
    if max_score <= 0 or score < 0 or score > max_score:
        return None
    return score, max_score


def build_system_prompt(principles: str | None = None) -> str:
    """The judge's system prompt; `principles` replaces the three default principles (format rules stay)."""
    return SYSTEM_PROMPT.format(principles=(principles if principles is not None else DEFAULT_PRINCIPLES).strip())


def as_turn(turn: Any) -> tuple[str, str]:
    """(action, observation) from {"action", "observation"}, an (action, observation) pair or a bare action."""
    if isinstance(turn, str):
        return turn, ""
    if isinstance(turn, Mapping):
        if "action" not in turn:
            raise ValueError(f"a turn dict needs an 'action' key, got keys {sorted(turn)}")
        return str(turn["action"]), str(turn.get("observation") or "")
    if isinstance(turn, Sequence) and len(turn) == 2:
        return str(turn[0]), str(turn[1] or "")
    raise ValueError(f"a turn must be a dict, an (action, observation) pair or a string, got {turn!r}")


def format_turn(action: str, observation: str) -> str:
    """A turn as the judge sees it: the model's text plus the `<information>` block it triggered."""
    obs = observation.strip()
    if not obs:
        return action.strip()
    if "<information>" not in obs:
        obs = f"<information>{obs}</information>"
    return f"{action.strip()}\n\n{obs}"


def build_turn_messages(
    question: str, turns: Sequence[Any], index: int, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """Chat messages judging turn `index`: Query = question + all earlier turns, Response = that turn."""
    if not 0 <= index < len(turns):
        raise ValueError(f"turn index {index} out of range for {len(turns)} turns")
    pairs = [as_turn(t) for t in turns[: index + 1]]
    query = "\n\n".join([question.strip(), *(format_turn(a, o) for a, o in pairs[:-1])])
    user = f"[Conversation Context]\n**Query**: {query}\n\n**Response**: {format_turn(*pairs[-1])}"
    return [
        {"role": "system", "content": system_prompt if system_prompt is not None else build_system_prompt()},
        {"role": "user", "content": user},
    ]


def split_trajectory(text: str) -> list[dict[str, str]]:
    """Turns of a trajectory text: each `<information>...</information>` block closes a turn.

    The text after the last block is the final turn (dropped when empty, i.e. the trajectory ended
    on an observation).
    """
    pieces = _INFORMATION.split(text)
    turns = [{"action": pieces[k].strip(), "observation": pieces[k + 1]} for k in range(0, len(pieces) - 1, 2)]
    if pieces[-1].strip() or not turns:
        turns.append({"action": pieces[-1].strip(), "observation": ""})
    return turns


def question_text(prompt: Any) -> str:
    """The question of a prompt: a ChatML string's user message, a chat's last user message, or the text."""
    if isinstance(prompt, str):
        match = _CHATML_USER.search(prompt)
        return (match.group(1) if match else prompt).strip()
    if isinstance(prompt, Mapping):
        return question_text(prompt.get("question") or prompt.get("prompt") or "")
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            content = users[-1].get("content", "")
            if not isinstance(content, str):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
            return content.strip()
    raise ValueError(f"cannot find a question in prompt {str(prompt)[:200]!r}")


@dataclass
class JudgedTurns:
    """A judge call's result.

    Attributes:
        process_rewards: per row, one r_p per judged turn (score_scale · SCORE / MAX); None = invalid.
        scores: [N] float32, per row the mean over turns after the invalid policy; NaN when nothing is left.
        outputs: per row, the judge's last raw reply per turn (None = request failed).
        metrics: judge/turns, judge/validity_rate, judge/invalid, judge/failures, judge/reasks,
            judge/latency_s (mean seconds per request), judge/process_mean (mean of the valid r_p).
    """

    process_rewards: list[list[float | None]]
    scores: Tensor
    outputs: list[list[str | None]]
    metrics: dict[str, float]


class PrincipleProcessJudge:
    """PPRM as a RewardModel: scores every intermediate turn, returns the per-row mean.

    Per row, turns come from metadata `turns_key` (a list of {"action", "observation"} dicts or pairs),
    else are split from the completion text at `<information>` blocks; the question is metadata
    `question_key`, else the prompt's user message. The final turn (the answer) is not judged unless
    `judge_final_turn` (spec §3: it gets the outcome reward instead). Per-turn scores of the last call
    are kept in `last_process_rewards` (None = invalid) for ReNorm.

    Args:
        client: any JudgeClient.
        principles: replaces the default principle list of the system prompt.
        max_retries_invalid: re-asks of a turn whose reply did not parse (a failed request, None from
            the client, was already retried by the client and is not re-asked).
        reask_with_feedback: a re-ask shows the invalid reply and a format reminder (useful at
            temperature 0, where the same prompt yields the same reply); False re-sends the prompt.
        invalid_policy: value of a turn still invalid after re-asks, in `scores`: "paper" (0.0, what the
            official code leaves at the position; the paper is silent), "zero" (0.0), "neutral" (0.5 ·
            score_scale) or "skip" (left out of the row mean). None -> "neutral" ("paper" under
            official_compat). `last_process_rewards` keeps None either way; ReNorm applies its own option.
        score_scale: r_p = score_scale · SCORE / MAX; keep 1.0 for ReNorm, which expects [0, 1].
    """

    def __init__(
        self,
        client: JudgeClient,
        principles: str | None = None,
        max_retries_invalid: int = 2,
        reask_with_feedback: bool = True,
        invalid_policy: InvalidPolicy | None = None,
        official_compat: bool = False,
        score_scale: float = 1.0,
        judge_final_turn: bool = False,
        question_key: str = "question",
        turns_key: str = "turns",
    ) -> None:
        policy = invalid_policy or ("paper" if official_compat else "neutral")
        if policy not in INVALID_POLICIES:
            raise ValueError(f"invalid_policy={policy!r} is not supported; allowed: {list(INVALID_POLICIES)}")
        if max_retries_invalid < 0:
            raise ValueError(f"max_retries_invalid must be >= 0, got {max_retries_invalid}")
        if not (score_scale > 0 and math.isfinite(score_scale)):
            raise ValueError(f"score_scale must be a finite number > 0, got {score_scale}")
        check_client(client)
        self.client, self.invalid_policy = client, policy
        self.system_prompt = build_system_prompt(principles)
        self.max_retries_invalid, self.reask_with_feedback = max_retries_invalid, reask_with_feedback
        self.score_scale, self.judge_final_turn = score_scale, judge_final_turn
        self.question_key, self.turns_key = question_key, turns_key
        self.last_process_rewards: list[list[float | None]] = []

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrincipleProcessJudge:
        """Build from keyword arguments; a mapping `client` becomes OpenAIChatClient (has base_url) or
        HFChatClient (has model)."""
        kwargs = dict(config)
        if "client" in kwargs:
            kwargs["client"] = client_from_config(kwargs["client"])
        return cls(**kwargs)

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        given_questions = metadata.get(self.question_key)
        given_turns = metadata.get(self.turns_key)
        questions, turns = [], []
        for i, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            given = given_questions[i] if given_questions is not None else None
            questions.append(given if isinstance(given, str) else question_text(prompt))
            row = given_turns[i] if given_turns is not None else split_trajectory(str(sample))
            turns.append(list(row) if self.judge_final_turn else list(row)[:-1])
        result = self.judge(questions, turns)
        return RewardOutput(scores=result.scores, metrics=result.metrics)

    def judge(self, questions: Sequence[str], turns: Sequence[Sequence[Any]]) -> JudgedTurns:
        """Judge every given turn of every row (the caller chooses which turns); sets last_process_rewards."""
        if len(questions) != len(turns):
            raise ValueError(f"{len(questions)} questions but {len(turns)} rows of turns")
        jobs = [(i, k) for i, row in enumerate(turns) for k in range(len(row))]
        prompts = [build_turn_messages(questions[i], turns[i], k, self.system_prompt) for i, k in jobs]
        before = stats_snapshot(self.client)
        values, replies, reasks = self._ask(prompts)
        used = stats_snapshot(self.client).since(before)
        process: list[list[float | None]] = [[None] * len(row) for row in turns]
        outputs: list[list[str | None]] = [[None] * len(row) for row in turns]
        for (i, k), value, reply in zip(jobs, values, replies, strict=True):
            process[i][k], outputs[i][k] = value, reply
        self.last_process_rewards = process
        invalid = sum(v is None for v in values)
        valid = [v for v in values if v is not None]
        metrics = {
            "judge/turns": float(len(jobs)),
            "judge/validity_rate": 1.0 - invalid / len(jobs) if jobs else 1.0,
            "judge/invalid": float(invalid),
            "judge/failures": float(sum(r is None for r in replies)),
            "judge/failure_rate": sum(r is None for r in replies) / len(jobs) if jobs else 0.0,
            "judge/reasks": float(reasks),
            "judge/latency_s": used.mean_latency_s,
            "judge/process_mean": sum(valid) / len(valid) if valid else 0.0,
        }
        scores = torch.tensor([self._row_score(row) for row in process], dtype=torch.float32)
        return JudgedTurns(process, scores, outputs, metrics)

    def _ask(self, prompts: list[list[dict[str, str]]]) -> tuple[list[float | None], list[str | None], int]:
        """Ask all prompts, re-ask the unparsable ones; (r_p or None, last reply, re-asks made)."""
        asked = ask_until_valid(
            self.client,
            prompts,
            lambda _, answer: self._process_reward(parse_final_score(answer)),
            self.max_retries_invalid + 1,
            reminder=(lambda _: REASK_PROMPT) if self.reask_with_feedback else None,
        )
        return asked.values, asked.replies, asked.reasks

    def _process_reward(self, parsed: tuple[int, int] | None) -> float | None:
        return None if parsed is None else self.score_scale * parsed[0] / parsed[1]

    def _row_score(self, row: Sequence[float | None]) -> float:
        fill = {"paper": 0.0, "zero": 0.0, "neutral": 0.5 * self.score_scale, "skip": None}[self.invalid_policy]
        kept = [v if v is not None else fill for v in row]
        numbers = [v for v in kept if v is not None]
        return sum(numbers) / len(numbers) if numbers else math.nan
