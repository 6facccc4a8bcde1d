"""Multi-turn tool-loop sampler: Search-R1-style agents that call tools between generated turns.

Per turn, ONE batched HF `generate` over the still-active rows runs until the first closing action
tag (`</search>`, `</{tool}>` for each tool, `</answer>`) or EOS; the last complete action is parsed;
each tool is called once for all rows that used it; the observation `<information>…</information>`
is appended as token ids; after `max_turns` such turns a final turn runs with tools disabled.
Simplifications: every turn re-encodes its whole context (no KV cache kept across turns), and text the
model wrote after a closing tag inside the same token is kept (the model saw it), not cut as text.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, get_args

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from modalities.text_agent.sampler import (
    PromptTruncation,
    SingleTurnSampler,
    _prompt_key,
    _row_labels,
    left_pad,
)
from modalities.text_agent.tool_loop import (
    ANSWER,
    Tool,
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
from toolkit.distributed import unwrap
from toolkit.engines.hf import EndTracker
from toolkit.hf.generation import plain_generation_config, rng_devices
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

TurnBoundary = Literal["action", "observation"]


class ToolLoopSampler(SingleTurnSampler):
    """Samples G multi-turn tool-using trajectories per prompt; the policy re-scores them unchanged.

    The rollout uses SingleTurnSampler's layout (`prompt_ids`, `prompt_attention_mask`,
    `response_ids`, `response_attention_mask`, `temperature`), the response being the model's turns
    and the observations between them. `mask` is True only on generated tokens; `data["info_mask"]`
    on observation tokens. Turns stop through `StopStringCriteria` on the closing tags, which matches
    a tag whether it is one token (the tiny tokenizer) or spelled over several, and keeps the token
    that completes it. Prompts, seeding and sampling settings are SingleTurnSampler's.

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
            timings = self._run_loop(policy, tokenizer, rows, seed, temperature)
            device = next(unwrap(module).parameters()).device
            rollout = self._assemble_rollout(dicts, group_size, tokenizer, rows, temperature).to(device)
            rollout.metrics.update(timings)
            self._rescore(policy, rollout)
        finally:
            module.train(was_training)
        return rollout

    def _run_loop(
        self, policy: Policy, tokenizer: Any, rows: list[Trajectory], seed: int, temperature: float
    ) -> dict[str, float]:
        """Advance all rows turn by turn (one `generate` per turn); returns timing metrics."""
        model = unwrap(policy.module)  # generate() lives on the bare model, not on its DDP wrapper
        device = next(model.parameters()).device
        config, eos, stops = self._turn_settings(policy, tokenizer, model, temperature)
        autocast = getattr(policy, "autocast_context", contextlib.nullcontext)
        timings = {"time/generate_s": 0.0, "time/tools_s": 0.0}
        with torch.random.fork_rng(devices=rng_devices(device)), torch.no_grad(), plain_generation_config(model):
            torch.manual_seed(seed)
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
                with autocast():
                    outputs = self._generate_turn(model, active, config, stops[final], eos.to(device))
                timings["time/generate_s"] += time.perf_counter() - start
                calls, invalid = self._record_turn(tokenizer, active, outputs, final)
                start = time.perf_counter()
                self._observe(tokenizer, calls, invalid)
                timings["time/tools_s"] += time.perf_counter() - start
        return timings

    def _turn_settings(
        self, policy: Policy, tokenizer: Any, model: Any, temperature: float
    ) -> tuple[GenerationConfig, torch.Tensor, dict[bool, StopStringCriteria]]:
        """Generation config, EOS ids and the stop criteria of tool turns (False) and the final turn (True)."""
        config, eos, _ = self._sampling_config(policy, tokenizer, model, temperature)
        closing = [f"</{name}>" for name in self.tools]
        stops = {
            False: StopStringCriteria(tokenizer=tokenizer, stop_strings=[*closing, f"</{ANSWER}>"]),
            True: StopStringCriteria(tokenizer=tokenizer, stop_strings=[f"</{ANSWER}>"]),
        }
        return config, torch.tensor(eos, dtype=torch.long), stops

    @staticmethod
    def _active(rows: list[Trajectory]) -> list[Trajectory]:
        """Rows still running; a row with no budget left is truncated and stops here."""
        for row in rows:
            if not row.done and row.remaining <= 0:
                row.truncated = row.done = True
        return [row for row in rows if not row.done]

    def _generate_turn(
        self,
        model: Any,
        rows: list[Trajectory],
        config: GenerationConfig,
        stop: StopStringCriteria,
        eos: torch.Tensor,
    ) -> list[tuple[list[int], bool]]:
        """One batched `generate` over `rows`' contexts: (kept ids, stopped) per row.

        A row that stopped (EOS or closing tag) keeps its ids through the stopping token; one that
        did not keeps at most its remaining response budget.
        """
        device = eos.device
        config.max_new_tokens = min(self.max_new_tokens, max(row.remaining for row in rows))
        contexts = [row.prompt_ids + row.response for row in rows]
        input_ids, attention_mask = left_pad(contexts, config.pad_token_id, device)
        tracker = EndTracker(input_ids.shape[1], eos, stop, len(rows))
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([tracker]),
        )
        new_ids = output[:, input_ids.shape[1] :].tolist()
        kept = []
        for row, ids, end in zip(rows, new_ids, tracker.ends.tolist(), strict=True):
            stopped = 0 <= end < row.remaining
            kept.append((ids[: end + 1] if stopped else ids[: row.remaining], stopped))
        return kept

    def _record_turn(
        self, tokenizer: Any, rows: list[Trajectory], outputs: list[tuple[list[int], bool]], final: bool
    ) -> tuple[list[ToolRequest], list[Trajectory]]:
        """Append each row's turn and parse its action: (tool calls, rows with an invalid action to correct)."""
        calls: list[ToolRequest] = []
        invalid: list[Trajectory] = []
        for row, (ids, stopped) in zip(rows, outputs, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            row.add_turn(ids, text)
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
