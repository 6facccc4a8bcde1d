"""Multi-turn tool-loop sampler: Search-R1-style agents that call tools between generated turns.

Per turn, ONE rollout-engine request (`toolkit.engines`: `hf` by default, `server`, `vllm`) over the still-active
rows, whose prompts are the trajectories' token ids so far, runs until the first closing action tag (`</search>`,
`</{tool}>` for each tool, `</answer>`) or EOS; the last complete action is parsed; each tool is called once for all
rows that used it; the observation `<information>…</information>` is appended as token ids; after `max_turns` such
turns a final turn runs with tools disabled. Simplifications: the `hf` engine re-encodes each turn's whole context (a
server engine's prefix cache reuses it), and text the model wrote after a closing tag inside the same token is kept
(the model saw it), not cut as text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, get_args

import torch

from modalities.text_agent.sampler import (
    PromptTruncation,
    SingleTurnSampler,
    _prompt_key,
    _row_labels,
)
from modalities.text_agent.tool_loop import (
    ANSWER,
    ToolRequest,
    Trajectory,
    action_pattern,
    default_invalid_action_message,
    encode_observation,
    encode_text,
    parse_action,
    response_tensors,
    run_tools,
    tool_table,
)
from modalities.text_agent.tools.base import Tool
from toolkit.distributed import unwrap
from toolkit.engines import EngineName, GenerationRequest, GenerationResult, HFEngine, SamplingParams, ServerEngine
from toolkit.engines.vllm_engine import VLLMEngine
from toolkit.hf.generation import left_pad
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

TurnBoundary = Literal["action", "observation"]


class ToolLoopSampler(SingleTurnSampler):
    """Samples G multi-turn tool-using trajectories per prompt; the policy re-scores them unchanged.

    The rollout uses SingleTurnSampler's layout (`prompt_ids`, `prompt_attention_mask`,
    `response_ids`, `response_attention_mask`, `temperature`), the response being the model's turns
    and the observations between them. `mask` is True only on generated tokens; `data["info_mask"]`
    on observation tokens. Turns stop at the closing tags as engine stop strings, which match a tag whether it
    is one token (the tiny tokenizer) or spelled over several, and keep the token that completes it. Prompts and
    sampling settings are SingleTurnSampler's; turn k is one engine request seeded with `turn_seed(seed, k)`
    (turn 0 with the sampler's seed), so `hf` and `server` engines give the same trajectories. The engine's
    log-probs of the generated tokens are kept as `data["engine_logprobs"]` (0 on observations) and their
    mismatch with the re-scored old_logprobs logged, as in SingleTurnSampler.

    Args:
        tools: the tools, as a list (tag = each tool's `name`) or a mapping tag -> tool.
        max_turns: tool-using turns before the final turn, in which tools are disabled (only
            `</answer>` and EOS stop it; a tool tag there is plain text). docs/methods/ppr.md: 2 in the PPR scripts.
        max_new_tokens_per_turn: generation budget of one turn (docs/methods/ppr.md: 500).
        max_response_tokens: cap on the whole response, generated plus observation tokens; a row
            reaching it is truncated (`rollout.truncated`).
        max_observation_tokens: cap on one tool observation (docs/methods/ppr.md: 500); None = no cap.
        temperature, top_p, top_k, do_sample, chat_template, eos_token_ids, max_prompt_length,
            prompt_truncation, compute_old_logprobs: as in SingleTurnSampler.
        invalid_action_message: appended (unwrapped, not trained on) after a turn with no valid
            action; None = `default_invalid_action_message(tool names)`.
        final_turn_message: appended before the final turn to rows that used all `max_turns` turns
            ("" = nothing, as Search-R1: the final turn just runs with search disabled).
        observation_template: wraps each tool result; exactly one "{}". Search-R1 and PPR use
            "\n\n<information>{}</information>\n\n" with `strip_observation` (the official recipes set both).
        strip_observation: strip surrounding whitespace from each tool result before wrapping it (Search-R1's
            `search_results.strip()`; a passage list ends in a newline). False keeps the text as the tool gave it.
        tool_error_message: observation text of a failed call (`{name}`, `{error}`), wrapped too.
        turn_boundary: where `turn_ends` marks a turn: "action" = its last generated token;
            "observation" = the last token of the observation it triggered (PPR's official placement,
            docs/methods/ppr.md §6.1; those tokens are not trained, so run GAE over `response_attention_mask`).
        engine, engine_logprobs: as in SingleTurnSampler; every turn is one request of the active rows' token ids
            so far (a server engine's prefix cache then reuses the context instead of re-encoding it).
    """

    def __init__(
        self,
        tools: Sequence[Tool] | Mapping[str, Tool] = (),
        max_turns: int = 4,
        max_new_tokens_per_turn: int = 500,
        max_response_tokens: int = 2048,
        max_observation_tokens: int | None = 500,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        do_sample: bool = True,
        chat_template: bool = False,
        invalid_action_message: str | None = None,
        final_turn_message: str = "",
        observation_template: str = "\n<information>{}</information>\n",
        strip_observation: bool = False,
        tool_error_message: str = "The {name} tool failed: {error}",
        turn_boundary: TurnBoundary = "action",
        eos_token_ids: Sequence[int] | None = None,
        max_prompt_length: int | None = None,
        prompt_truncation: PromptTruncation = "error",
        compute_old_logprobs: bool = True,
        engine: EngineName | HFEngine | ServerEngine | VLLMEngine = "hf",
        engine_logprobs: bool = True,
    ) -> None:
        super().__init__(
            max_new_tokens=max_new_tokens_per_turn,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            do_sample=do_sample,
            chat_template=chat_template,
            eos_token_ids=eos_token_ids,
            max_prompt_length=max_prompt_length,
            prompt_truncation=prompt_truncation,
            compute_old_logprobs=compute_old_logprobs,
            engine=engine,
            engine_logprobs=engine_logprobs,
        )
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {max_turns}")
        if max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
        if max_observation_tokens is not None and max_observation_tokens < 1:
            raise ValueError(f"max_observation_tokens must be >= 1 or None, got {max_observation_tokens}")
        if observation_template.count("{}") != 1:
            raise ValueError(f"observation_template must contain exactly one '{{}}', got {observation_template!r}")
        if not isinstance(strip_observation, bool):
            raise ValueError(f"strip_observation={strip_observation!r} must be true or false")
        if turn_boundary not in get_args(TurnBoundary):
            raise ValueError(f"turn_boundary={turn_boundary!r} is not one of {list(get_args(TurnBoundary))}")
        self.tools = tool_table(tools)
        self.max_turns = max_turns
        self.max_response_tokens = max_response_tokens
        self.max_observation_tokens = max_observation_tokens
        self.invalid_action_message = (
            default_invalid_action_message(list(self.tools))
            if invalid_action_message is None
            else invalid_action_message
        )
        self.final_turn_message = final_turn_message
        self.observation_template = observation_template
        self.strip_observation = strip_observation
        self.tool_error_message = tool_error_message
        self.turn_boundary: TurnBoundary = turn_boundary
        self._tool_pattern = action_pattern([*self.tools, ANSWER])
        self._answer_pattern = action_pattern([ANSWER])

    def sample(self, policy: Policy, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        """G trajectories per prompt, group-major (`group_ids[i] = i // G`), re-scored for old_logprobs."""
        tokenizer, temperature, dicts, encoded, seed = self._prepare(policy, prompts, group_size, generator)
        rows = [Trajectory(list(ids), self.max_response_tokens) for ids in encoded for _ in range(group_size)]
        module = policy.module
        was_training = module.training
        module.eval()  # dropout off while sampling and re-scoring
        try:
            params = self._turn_params(policy, tokenizer, temperature)
            timings = self._run_loop(policy, tokenizer, rows, seed, params)
            device = next(unwrap(module).parameters()).device
            rollout = self._assemble_rollout(dicts, group_size, tokenizer, rows, temperature).to(device)
            rollout.metrics.update(timings)
            self._rescore(policy, rollout)
            if self.engine_logprobs:
                self._record_engine_logprobs(rollout, engine_rows(rows))
        finally:
            module.train(was_training)
        return rollout

    def _run_loop(
        self, policy: Policy, tokenizer: Any, rows: list[Trajectory], seed: int, params: dict[bool, SamplingParams]
    ) -> dict[str, float]:
        """Advance all rows turn by turn (one engine request per turn); returns timing and engine metrics."""
        timings = {"time/generate_s": 0.0, "time/tools_s": 0.0}
        for turn in range(self.max_turns + 1):
            final = turn == self.max_turns
            if final and turn > 0 and self.final_turn_message:
                message = encode_text(tokenizer, self.final_turn_message)
                for row in self._active(rows):
                    row.add_observation(message, partial(tokenizer.decode, skip_special_tokens=True))
            active = self._active(rows)
            if not active:
                break
            start = time.perf_counter()
            outputs, engine_metrics = self._generate_turn(policy, active, params[final], turn_seed(seed, turn))
            timings["time/generate_s"] += time.perf_counter() - start
            for key, value in engine_metrics.items():  # summed over turns (pushes, retries, sync time)
                timings[key] = timings.get(key, 0.0) + value
            calls, invalid = self._record_turn(tokenizer, active, outputs, final)
            start = time.perf_counter()
            self._observe(tokenizer, calls, invalid)
            timings["time/tools_s"] += time.perf_counter() - start
        return timings

    def _turn_params(self, policy: Policy, tokenizer: Any, temperature: float) -> dict[bool, SamplingParams]:
        """Sampling settings of tool turns (False: any closing tag stops) and the final turn (True: `</answer>`)."""
        base = self._sampling_params(policy, tokenizer, unwrap(policy.module), temperature)
        closing = tuple(f"</{name}>" for name in self.tools)
        answer = (f"</{ANSWER}>",)
        return {
            False: dataclasses.replace(base, stop_strings=closing + answer),
            True: dataclasses.replace(base, stop_strings=answer),
        }

    @staticmethod
    def _active(rows: list[Trajectory]) -> list[Trajectory]:
        """Rows still running; a row with no budget left is truncated and stops here."""
        for row in rows:
            if not row.done and row.remaining <= 0:
                row.truncated = row.done = True
        return [row for row in rows if not row.done]

    def _generate_turn(
        self, policy: Policy, rows: list[Trajectory], params: SamplingParams, seed: int
    ) -> tuple[list[tuple[list[int], bool, list[float]]], dict[str, float]]:
        """One engine request over `rows`' contexts: ((kept ids, stopped, engine log-probs) per row, engine metrics).

        A row that stopped (EOS or closing tag) keeps its ids through the stopping token; one that
        did not keeps at most its remaining response budget.
        """
        budget = min(self.max_new_tokens, max(row.remaining for row in rows))
        request = GenerationRequest(
            [row.prompt_ids + row.response for row in rows],
            dataclasses.replace(params, max_new_tokens=budget),
            num_samples=1,
            seed=seed,
            return_logprobs=self.engine_logprobs,
        )
        result = self.engine.generate(policy, request)
        result.check_rows(request)
        values = result.logprobs or [[0.0] * len(ids) for ids in result.token_ids]
        kept = []
        for row, ids, reason, logprobs in zip(rows, result.token_ids, result.finish_reasons, values, strict=True):
            stopped = reason == "stop" and len(ids) <= row.remaining
            n = len(ids) if stopped else min(len(ids), row.remaining)
            kept.append((ids[:n], stopped, logprobs[:n]))
        return kept, result.metrics

    def _record_turn(
        self,
        tokenizer: Any,
        rows: list[Trajectory],
        outputs: list[tuple[list[int], bool, list[float]]],
        final: bool,
    ) -> tuple[list[ToolRequest], list[Trajectory]]:
        """Append each row's turn and parse its action: (tool calls, rows with an invalid action to correct)."""
        calls: list[ToolRequest] = []
        invalid: list[Trajectory] = []
        for row, (ids, stopped, logprobs) in zip(rows, outputs, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            row.add_turn(ids, text, logprobs)
            if not stopped and row.remaining <= 0:
                row.truncated = row.done = True
                continue
            action = parse_action(text, self._answer_pattern if final else self._tool_pattern)
            if action is None:
                row.num_invalid += 1
                if not final:
                    invalid.append(row)
            elif action[0] == ANSWER:
                row.answered = True
            else:
                row.num_tool_calls += 1
                calls.append(ToolRequest(row, action[0], action[1]))
            row.done = row.done or final or row.answered
        return calls, invalid

    def _observe(self, tokenizer: Any, calls: list[ToolRequest], invalid: list[Trajectory]) -> None:
        """Call the tools (batched per tool) and append observations and correction messages."""
        decode = partial(tokenizer.decode, skip_special_tokens=True)
        results = run_tools(self.tools, calls, self.tool_error_message)
        for call, (text, failed) in zip(calls, results, strict=True):
            call.row.num_tool_errors += int(failed)
            body = text.strip() if self.strip_observation else text
            ids = encode_observation(tokenizer, self.observation_template, body, self.max_observation_tokens)
            call.row.add_observation(ids, decode)
        correction = encode_text(tokenizer, self.invalid_action_message)
        for row in invalid:
            row.add_observation(correction, decode)

    def _assemble_rollout(
        self, dicts: list[dict[str, Any]], group_size: int, tokenizer: Any, rows: list[Trajectory], temperature: float
    ) -> Rollout:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tensors = response_tensors(rows, pad, after_observation=self.turn_boundary == "observation")
        prompt_ids, prompt_mask = left_pad([row.prompt_ids for row in rows], pad)
        mask = tensors["mask"]
        prompts = [d for d in dicts for _ in range(group_size)]
        per_row = {
            "num_turns": torch.tensor([len(r.turns) for r in rows]),
            "num_tool_calls": torch.tensor([r.num_tool_calls for r in rows]),
            "num_invalid_actions": torch.tensor([r.num_invalid for r in rows]),
        }
        return Rollout(
            group_ids=torch.arange(len(rows)) // group_size,
            old_logprobs=torch.zeros(mask.shape, dtype=torch.float32),
            mask=mask,
            lengths=mask.sum(dim=1),
            truncated=torch.tensor([r.truncated for r in rows]),
            turn_ends=tensors["turn_ends"],
            prompts=prompts,
            completions=tokenizer.batch_decode([r.response for r in rows], skip_special_tokens=True),
            dataset_ids=_row_labels(dicts, group_size, "dataset"),
            task_ids=_row_labels(dicts, group_size, "task"),
            prompt_keys=[_prompt_key(d) for d in prompts],
            data={
                "prompt_ids": prompt_ids,
                "prompt_attention_mask": prompt_mask,
                "response_ids": tensors["response_ids"],
                "response_attention_mask": tensors["response_attention_mask"],
                "info_mask": tensors["info_mask"],
                "temperature": temperature,
                **per_row,
                "turn_texts": [r.turns for r in rows],
            },
            metrics=self._metrics(rows, tensors, prompt_mask),
        )

    def _metrics(
        self, rows: list[Trajectory], tensors: dict[str, torch.Tensor], prompt_mask: torch.Tensor
    ) -> dict[str, float]:
        n = len(rows)
        num_turns = sum(len(r.turns) for r in rows)
        lengths = tensors["mask"].sum(dim=1).float()
        metrics = {
            "agent/turns_mean": num_turns / n,
            "agent/tool_calls_mean": sum(r.num_tool_calls for r in rows) / n,
            "agent/invalid_action_rate": sum(r.num_invalid for r in rows) / max(num_turns, 1),
            "agent/tool_errors": float(sum(r.num_tool_errors for r in rows)),
            "agent/answered_frac": sum(r.answered for r in rows) / n,
            "rollout/length_mean": float(lengths.mean()),
            "rollout/length_max": float(lengths.max()),
            "rollout/response_tokens_mean": float(tensors["response_attention_mask"].sum(dim=1).float().mean()),
            "rollout/truncated_frac": sum(r.truncated for r in rows) / n,
            "rollout/prompt_length_mean": float(prompt_mask.sum(1).float().mean()),
        }
        return metrics


def turn_seed(seed: int, turn: int) -> int:
    """The engine seed of tool-loop turn `turn`: the sampler's seed for turn 0, a fixed odd stride apart after."""
    return (seed + turn * 0x9E3779B97F4A7C15) % 2**62


def engine_rows(rows: Sequence[Trajectory]) -> GenerationResult:
    """The trajectories' responses with the engine's log-prob per token (0 on observations), for the mismatch log."""
    return GenerationResult([row.response for row in rows], ["stop"] * len(rows), [row.engine_logprobs for row in rows])
