"""ToolLoopSampler: the policy contract through the tool loop, masks, turn bookkeeping, tools and limits.

Scripted policies make actions reliable: a bigram logit table, added to the tiny Qwen2's logits by a
forward hook (next-token bias = table[current token]), works the same under `generate`'s KV cache
and under full-sequence re-scoring, so the scripted model is still an ordinary policy (ratio 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast, StoppingCriteriaList, StopStringCriteria

from modalities.text_agent.agent_metrics import answered_after_search, searched
from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.policy_server import PolicyServer
from modalities.text_agent.tiny import build_char_tokenizer
from modalities.text_agent.tool_loop import (
    Tool,
    action_pattern,
    default_invalid_action_message,
    encode_observation,
    parse_action,
)
from modalities.text_agent.tool_sampler import ToolLoopSampler, turn_seed
from modalities.text_agent.tools.base import ToolError
from modalities.text_agent.tools.retriever_server import serving
from rewards.judges.ppr import split_trajectory
from tests.contracts import PolicyContract
from tests.modalities.text_agent.test_text_policy import sgd_step
from tests.tiny import TINY_VOCAB_SIZE, tiny_lm
from toolkit.config import load_config
from toolkit.engines import ServerEngine
from toolkit.hf.generation import left_pad
from toolkit.rollout import Rollout

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
EOS = "<|im_end|>"
OBSERVATION = "\n<information>France capital</information>\n"
SHORT_CORRECTION = "\nInvalid.\n"  # the default correction is ~200 char tokens: slow contexts on CPU


class DictSearch:
    """A fake search tool: dictionary lookup, recording every batched call."""

    name = "search"

    def __init__(self, answers: Mapping[str, str] | None = None) -> None:
        self.answers = dict(answers or {"paris": "France capital"})
        self.calls: list[list[str]] = []

    def __call__(self, queries: list[str]) -> list[str]:
        self.calls.append(list(queries))
        return [self.answers.get(q, "no result") for q in queries]


class FailingTool:
    """A tool (tag <fx>, closed by the multi-token "</fx>") whose every call raises ToolError."""

    name = "fx"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, queries: list[str]) -> list[str]:
        self.calls.append(list(queries))
        raise ToolError("backend down")


def tokenizer() -> PreTrainedTokenizerFast:
    """The char tokenizer plus "<fx>" as one token; "</fx>" stays five characters (string matching)."""
    return build_char_tokenizer(extra_tokens=["<fx>"])


def chain(*tokens: str, logit: float = 50.0) -> dict[str, dict[str, float]]:
    """Bigram edges tokens[i] -> tokens[i + 1]."""
    return {a: {b: logit} for a, b in zip(tokens, tokens[1:], strict=False)}


def merge(*tables: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for table in tables:
        for a, nexts in table.items():
            out.setdefault(a, {}).update(nexts)
    return out


def scripted_policy(edges: dict[str, dict[str, float]], seed: int = 0, **kwargs: Any) -> CausalLMPolicy:
    """CausalLMPolicy whose logits get `edges[current token][next token]` added (a forward hook)."""
    tok = tokenizer()
    bias = torch.zeros(TINY_VOCAB_SIZE, TINY_VOCAB_SIZE)
    for a, nexts in edges.items():
        for b, logit in nexts.items():
            bias[tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)] += logit
    model = tiny_lm(seed, eos_logit=None)
    model.register_buffer("bigram_bias", bias)

    def add_bias(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        output.logits = output.logits + module.bigram_bias[ids[:, -output.logits.shape[1] :]]
        return output

    model.register_forward_hook(add_bias, with_kwargs=True)
    return CausalLMPolicy(model=model, tokenizer=tok, **kwargs)


# "?" prompts search "paris", "!" prompts end the turn with EOS (invalid), "#" prompts call the failing
# fx tool with query "q"; after an observation ("\n") every row answers 42.
SEARCH = chain("?", "<search>", "p", "a", "r", "i", "s", "</search>")
INVALID = chain("!", "z", EOS)
FAIL = chain("#", "<fx>", "q", "<", "/", "f", "x", ">")
ANSWER = chain("\n", "<answer>", "4", "2", "</answer>")
SCRIPT = merge(SEARCH, INVALID, FAIL, ANSWER)
# Always search; "</search>" -> "<answer>" is only reachable in the final turn, where it does not stop.
ALWAYS_SEARCH = merge(SEARCH, chain("\n", "<search>"), chain("</search>", "<answer>", "4", "2", "</answer>"))


def run(
    policy: CausalLMPolicy, prompts: list[Any], group_size: int = 1, seed: int = 0, **kwargs: Any
) -> tuple[Rollout, DictSearch, FailingTool, list[int]]:
    search, fail = DictSearch(), FailingTool()
    options = {"max_turns": 4, "max_new_tokens_per_turn": 12, "max_response_tokens": 512, **kwargs}
    sampler = ToolLoopSampler(tools=[search, fail], **options)
    calls = count_generate_calls(policy)
    rollout = sampler.sample(policy, prompts, group_size, torch.Generator().manual_seed(seed))
    return rollout, search, fail, calls


def count_generate_calls(policy: CausalLMPolicy) -> list[int]:
    """Wrap the model's `generate`; the returned list holds the number of rows of each call."""
    model: Any = policy.module
    original, calls = model.generate, []

    def counting(**kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(**kwargs)

    model.generate = counting
    return calls


def row_text(rollout: Rollout, row: int, where: torch.Tensor) -> str:
    ids = rollout.data["response_ids"][row][where[row]]
    return str(tokenizer().decode(ids))


# Contract: soft scripts, so trajectories are random (searching 1-2 times, random queries) yet tool-using.


def soft_script() -> dict[str, dict[str, float]]:
    edges = merge(chain("?", "<search>", logit=20.0))
    edges["<search>"] = dict.fromkeys(LETTERS, 4.0)
    for letter in LETTERS:
        edges[letter] = {**dict.fromkeys(LETTERS, 1.0), "</search>": 4.0}
    edges["\n"] = {"<answer>": 4.0, "<search>": 4.0}
    edges["<answer>"] = dict.fromkeys(DIGITS, 4.0)
    for digit in DIGITS:
        edges[digit] = {**dict.fromkeys(DIGITS, 1.0), "</answer>": 4.0}
    return edges


class TestToolLoopContract(PolicyContract):
    def make_policy(self) -> CausalLMPolicy:
        return scripted_policy(soft_script())

    def make_sampler(self) -> ToolLoopSampler:
        return ToolLoopSampler(
            tools=[DictSearch()],
            max_turns=2,
            max_new_tokens_per_turn=8,
            max_response_tokens=60,
            max_observation_tokens=10,
            invalid_action_message=SHORT_CORRECTION,
        )

    def make_prompts(self) -> list[Any]:
        return [{"prompt": "Where?", "id": "a"}, {"prompt": "Capital of X?", "id": "b"}, "Who?"]

    def perturb_masked_steps(self, rollout: Rollout, mask: torch.Tensor) -> Rollout:
        # Tokens after a row's last trained step (and all of row 0) only feed masked positions.
        steps = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask, steps, -1).amax(dim=1, keepdim=True)
        change = steps > last
        change[0] = True
        ids = rollout.data["response_ids"]
        data = {**rollout.data, "response_ids": torch.where(change, (ids + 7) % TINY_VOCAB_SIZE, ids)}
        return dataclasses.replace(rollout, data=data)

    def test_trajectories_use_the_tool(self) -> None:
        rollout = self.sample(self.make_policy())
        assert rollout.data["num_tool_calls"].sum() > 0 and rollout.data["info_mask"].any()
        assert (rollout.data["num_turns"] > 1).any()


def test_observations_are_masked_out_and_marked_as_information() -> None:
    rollout, search, _, _ = run(scripted_policy(SCRIPT), ["Where?"])
    mask, info = rollout.mask[0], rollout.data["info_mask"][0]
    assert row_text(rollout, 0, rollout.mask) == "<search>paris</search><answer>42</answer>"
    assert row_text(rollout, 0, rollout.data["info_mask"]) == OBSERVATION
    assert not (mask & info).any() and torch.equal(mask | info, rollout.data["response_attention_mask"][0])
    # The observation sits between the two turns, as appended ids.
    positions = info.nonzero().flatten()
    assert positions.min() == 7 and positions.max() == 7 + len(tokenizer().encode(OBSERVATION)) - 1
    assert search.calls == [["paris"]]
    assert rollout.completions == ["<search>paris</search>" + OBSERVATION + "<answer>42</answer>"]
    assert rollout.data["turn_texts"][0] == [
        {"action": "<search>paris</search>", "observation": OBSERVATION},
        {"action": "<answer>42</answer>", "observation": ""},
    ]


def test_observation_tokens_get_zero_gradient() -> None:
    policy = scripted_policy(SCRIPT)
    rollout, *_ = run(policy, ["Where?", "Who?"])
    info = rollout.data["info_mask"]
    policy.module.train()
    logprobs = policy.log_probs(rollout)
    assert info.any() and torch.all(logprobs[info] == 0)
    logprobs[info].sum().backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in policy.module.parameters())


def test_turn_ends_mark_the_last_generated_token_of_each_turn() -> None:
    rollout, *_ = run(scripted_policy(SCRIPT), ["Where?", "Oops!", "Calc#"])
    ids, ends = rollout.data["response_ids"], rollout.turn_ends
    tok = tokenizer()
    for row, first_turn_last in ((0, "</search>"), (1, EOS), (2, ">")):
        positions = ends[row].nonzero().flatten().tolist()
        assert len(positions) == int(rollout.data["num_turns"][row]) == 2
        assert tok.convert_ids_to_tokens(ids[row, positions].tolist()) == [first_turn_last, "</answer>"]
        assert rollout.mask[row, positions].all()
        assert not rollout.mask[row, positions[0] + 1]  # an observation follows the first turn
    assert torch.equal(rollout.lengths, rollout.mask.sum(dim=1))


def test_observation_boundary_puts_turn_ends_after_the_observation() -> None:
    rollout, *_ = run(scripted_policy(SCRIPT), ["Where?"], turn_boundary="observation")
    positions = rollout.turn_ends[0].nonzero().flatten().tolist()
    info = rollout.data["info_mask"][0]
    assert info[positions[0]] and not info[positions[0] + 1]  # the observation's last token
    assert positions[1] == int(rollout.data["response_attention_mask"][0].sum()) - 1


def test_invalid_action_gets_the_correction_and_is_counted() -> None:
    rollout, *_ = run(scripted_policy(SCRIPT), ["Where?", "Oops!"])
    message = default_invalid_action_message(["search", "fx"])
    assert row_text(rollout, 1, rollout.data["info_mask"]) == message
    assert rollout.data["turn_texts"][1][0] == {"action": "z", "observation": message}
    assert rollout.data["num_invalid_actions"].tolist() == [0, 1]
    assert rollout.data["num_tool_calls"].tolist() == [1, 0]
    assert rollout.metrics["agent/invalid_action_rate"] == pytest.approx(1 / 4)
    assert rollout.metrics["agent/answered_frac"] == 1.0
    # The message must not contain a complete answer (EM rewards scan the whole trajectory).
    assert parse_action(message, action_pattern(["answer"])) is None


def test_tool_error_becomes_a_counted_observation_and_multi_token_tags_stop() -> None:
    rollout, search, fail, _ = run(scripted_policy(SCRIPT), ["Calc#", "Where?"], group_size=2)
    assert fail.calls == [["q", "q"]] and search.calls == [["paris", "paris"]]
    assert rollout.metrics["agent/tool_errors"] == 2.0
    turn = rollout.data["turn_texts"][0][0]
    assert turn["action"] == "<fx>q</fx>"
    assert turn["observation"] == "\n<information>The fx tool failed: backend down</information>\n"
    assert rollout.data["num_tool_calls"].tolist() == [1, 1, 1, 1]
    assert rollout.data["turn_texts"][0][1]["action"] == "<answer>42</answer>"


def test_max_turns_then_a_final_turn_without_tools() -> None:
    rollout, search, _, calls = run(scripted_policy(ALWAYS_SEARCH), ["Where?", "Who?"], max_turns=2)
    assert calls == [2, 2, 2]  # one batched generate per turn: 2 tool turns + the final turn
    assert search.calls == [["paris", "paris"], ["paris", "paris"]]
    assert rollout.data["num_turns"].tolist() == [3, 3] and rollout.data["num_tool_calls"].tolist() == [2, 2]
    final = rollout.data["turn_texts"][0][2]
    assert final == {"action": "<search>paris</search><answer>42</answer>", "observation": ""}
    assert rollout.metrics["agent/answered_frac"] == 1.0 and not rollout.truncated.any()


def test_final_turn_message_is_appended_as_an_observation() -> None:
    message = "\nAnswer now.\n"
    rollout, *_ = run(scripted_policy(ALWAYS_SEARCH), ["Where?"], max_turns=1, final_turn_message=message)
    assert row_text(rollout, 0, rollout.data["info_mask"]) == OBSERVATION + message
    assert rollout.data["turn_texts"][0][0]["observation"] == OBSERVATION + message
    assert rollout.data["num_turns"].tolist() == [2]


def test_zero_max_turns_answers_at_once() -> None:
    rollout, search, _, calls = run(scripted_policy(ALWAYS_SEARCH), ["Where?"], max_turns=0, final_turn_message="x")
    assert calls == [1] and search.calls == [] and not rollout.data["info_mask"].any()
    assert rollout.data["turn_texts"][0] == [{"action": "<search>paris</search><answer>42</answer>", "observation": ""}]


def test_one_generate_per_turn_over_the_active_rows() -> None:
    rollout, _, _, calls = run(scripted_policy(SCRIPT), ["Where?", "Oops!", "Calc#"], group_size=2)
    assert calls == [6, 6]
    assert rollout.data["num_turns"].tolist() == [2] * 6


def test_response_budget_truncates_an_observation() -> None:
    rollout, *_ = run(scripted_policy(SCRIPT), ["Where?"], max_response_tokens=12)
    assert rollout.truncated.tolist() == [True] and rollout.num_steps == 12
    assert rollout.data["info_mask"][0].sum() == 5 and rollout.mask[0].sum() == 7
    assert rollout.data["num_turns"].tolist() == [1] and rollout.metrics["agent/answered_frac"] == 0.0
    assert rollout.turn_ends[0].nonzero().flatten().tolist() == [6]


def test_response_budget_truncates_a_turn_before_its_action() -> None:
    rollout, search, _, _ = run(scripted_policy(SCRIPT), ["Where?", "Oops!"], max_response_tokens=4)
    assert search.calls == []
    assert rollout.truncated.tolist() == [True, True]  # "z<eos>" fits, its correction only in part
    assert rollout.data["num_turns"].tolist() == [1, 1] and rollout.data["info_mask"].sum(dim=1).tolist() == [0, 2]
    assert row_text(rollout, 0, rollout.mask) == "<search>par"
    torch.testing.assert_close(rollout.old_logprobs, scripted_policy(SCRIPT).log_probs(rollout), atol=1e-5, rtol=0)


def test_turn_budget_without_an_action_is_invalid() -> None:
    rollout, search, _, calls = run(scripted_policy(SCRIPT), ["Where?"], max_turns=1, max_new_tokens_per_turn=3)
    assert search.calls == [] and calls == [1, 1]
    assert rollout.data["num_invalid_actions"].tolist() == [2] and not rollout.truncated.any()
    assert rollout.metrics["agent/answered_frac"] == 0.0


def test_observation_cap_keeps_the_template() -> None:
    tok = tokenizer()
    template = "\n<information>{}</information>\n"
    ids = encode_observation(tok, template, "France capital", max_tokens=6)
    assert tok.decode(ids) == "\n<information>Fr</information>\n"
    assert tok.decode(encode_observation(tok, template, "France capital", max_tokens=3)) == "\n<information>F"
    assert tok.decode(encode_observation(tok, template, "ok", max_tokens=None)) == "\n<information>ok</information>\n"
    rollout, *_ = run(scripted_policy(SCRIPT), ["Where?"], max_observation_tokens=6)
    assert row_text(rollout, 0, rollout.data["info_mask"]) == "\n<information>Fr</information>\n"


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng() -> None:
    policy = scripted_policy(soft_script())
    state = torch.get_rng_state()
    first, *_ = run(
        policy, ["Where?", "Who?"], group_size=3, seed=5, max_turns=2, invalid_action_message=SHORT_CORRECTION
    )
    assert torch.equal(torch.get_rng_state(), state)
    second, *_ = run(
        policy, ["Where?", "Who?"], group_size=3, seed=5, max_turns=2, invalid_action_message=SHORT_CORRECTION
    )
    assert first.data["turn_texts"] == second.data["turn_texts"]
    assert torch.equal(first.data["response_ids"], second.data["response_ids"])


def test_parse_action_takes_the_last_complete_action() -> None:
    pattern = action_pattern(["search", "answer"])
    assert parse_action("<think>x</think><search> a b </search>", pattern) == ("search", "a b")
    assert parse_action("<search>a</search> then <answer>b</answer>", pattern) == ("answer", "b")
    assert parse_action("<search>a</answer>", pattern) is None
    assert parse_action("<search>a\nb</search>", pattern) == ("search", "a\nb")


def test_fake_tools_satisfy_the_tool_protocol() -> None:
    assert isinstance(DictSearch(), Tool) and isinstance(FailingTool(), Tool)


class BrokenTool:
    name = "search"

    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error

    def __call__(self, queries: list[str]) -> list[str]:
        if self.error is not None:
            raise self.error
        return list(self.result)


@pytest.mark.parametrize(
    ("tool", "error", "match"),
    [
        (BrokenTool(result=["a", "b"]), ValueError, "must return a list of 1 strings"),
        (BrokenTool(result=[3]), ValueError, "non-string observation"),
        (BrokenTool(error=KeyError("bug")), KeyError, "bug"),
    ],
)
def test_broken_tools_fail_loudly(tool: BrokenTool, error: type[Exception], match: str) -> None:
    sampler = ToolLoopSampler(tools=[tool], max_new_tokens_per_turn=12)
    with pytest.raises(error, match=match):
        sampler.sample(scripted_policy(SCRIPT), ["Where?"], 1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tools": [BrokenTool(), BrokenTool()]}, "two tools are named"),
        ({"tools": {"answer": BrokenTool()}}, "not be one of"),
        ({"tools": {"a b": BrokenTool()}}, "must match"),
        ({"observation_template": "<information></information>"}, "exactly one"),
        ({"strip_observation": "yes"}, "strip_observation"),
        ({"turn_boundary": "middle"}, "turn_boundary='middle'"),
        ({"max_turns": -1}, "max_turns"),
        ({"max_response_tokens": 0}, "max_response_tokens"),
        ({"max_observation_tokens": 0}, "max_observation_tokens"),
        ({"max_new_tokens_per_turn": 0}, "max_new_tokens"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ToolLoopSampler(**kwargs)


# Search-R1 / PPR observation text (PeterGriffinJin/Search-R1 a14dc3a4ffc6fe88c1e95038d9738e21ba3f7a06 and
# Zhuohao-Li/ppr 4b496fac21d7c5052c1b689471ff1a1de6e6147a, search_r1/llm_agent/generation.py and
# search_utils/llm_agent/generation.py `execute_predictions`): the passages, stripped, between two blank-line pairs.
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "text_agent"
PASSAGES = 'Doc 1(Title: "Paris") France capital\nDoc 2(Title: "Lyon") second city\n'  # `format_hits` layout


def observed(sampler_node: Mapping[str, Any]) -> str:
    """The observation text a recipe's sampler settings give the scripted search turn."""
    options = {k: sampler_node[k] for k in ("observation_template", "strip_observation") if k in sampler_node}
    sampler = ToolLoopSampler(
        tools=[DictSearch({"paris": PASSAGES})],
        max_turns=1,
        max_new_tokens_per_turn=12,
        max_observation_tokens=sampler_node.get("max_observation_tokens"),
        **options,
    )
    rollout = sampler.sample(scripted_policy(SCRIPT), ["Where?"], 1, torch.Generator().manual_seed(0))
    text = rollout.data["turn_texts"][0][0]["observation"]
    assert row_text(rollout, 0, rollout.data["info_mask"]) == text  # what the model saw, token for token
    return str(text)


@pytest.mark.parametrize("recipe", ["ppr_qwen2.5-3b.yaml", "search_r1_grpo.yaml", "ppr_grpo.yaml"])
def test_official_recipes_produce_the_official_observation_text(recipe: str) -> None:
    sampler_node = load_config(CONFIGS / recipe)["sampler"]
    assert observed(sampler_node) == "\n\n<information>" + PASSAGES.strip() + "</information>\n\n"


def test_tiny_demo_and_the_default_keep_the_passage_as_given() -> None:
    assert observed(load_config(CONFIGS / "tiny.yaml")["sampler"]) == "<information>" + PASSAGES + "</information>"
    assert observed({}) == "\n<information>" + PASSAGES + "</information>\n"


@pytest.mark.parametrize(
    "template",
    ["\n<information>{}</information>\n", "\n\n<information>{}</information>\n\n", "<information>{}</information>"],
)
def test_trajectory_readers_parse_every_observation_form(template: str) -> None:
    """agent_metrics (shaping rewards) and the PPR judge's turn split read ours, the official and the tiny form."""

    def trajectory(observation: str) -> str:
        return "<search>paris</search>" + template.replace("{}", observation) + "<answer>42</answer>"

    for body in (PASSAGES, PASSAGES.strip()):
        text = trajectory(body)
        assert searched(None, text) == 1.0 and answered_after_search(None, text) == 1.0
        turns = split_trajectory(text)
        assert [t["action"] for t in turns] == ["<search>paris</search>", "<answer>42</answer>"]
        assert PASSAGES.strip() in turns[0]["observation"]
    failed = trajectory("The search tool failed: backend down")
    assert searched(None, failed) == 0.0 and answered_after_search(None, failed) == 0.0


# Engines: every turn is one request of the trajectories' token ids so far (issue 22).


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[PolicyServer]:
    """`renorm serve-policy`'s server on a loopback thread, holding other weights (seed 1) until the engine pushes."""
    with serving(PolicyServer(scripted_policy(soft_script(), seed=1), ("127.0.0.1", 0))) as server:
        yield server


class TestToolLoopServerContract(TestToolLoopContract):
    """The tool-loop contract (ratio 1, masks, observations untrained) through the server engine."""

    server: PolicyServer

    @pytest.fixture(autouse=True)
    def _server(self, scripted_server: PolicyServer) -> None:
        self.server = scripted_server

    def make_sampler(self) -> ToolLoopSampler:
        sampler = super().make_sampler()
        sampler.engine = ServerEngine(self.server.url, retry_backoff_s=0.01)
        return sampler


def test_server_tool_loop_equals_the_hf_one_after_an_update(scripted_server: PolicyServer) -> None:
    """Same trajectories, masks, old log-probs and observation tokens through `hf` and `server`, also after a step."""
    policy = scripted_policy(soft_script())
    options: dict[str, Any] = {"max_turns": 2, "max_new_tokens_per_turn": 8, "max_response_tokens": 60}
    options |= {"max_observation_tokens": 10, "invalid_action_message": SHORT_CORRECTION}
    engines: list[Any] = ["hf", ServerEngine(scripted_server.url, retry_backoff_s=0.01)]
    samplers = [ToolLoopSampler(tools=[DictSearch()], engine=engine, **options) for engine in engines]
    prompts = ["Where?", "Capital of X?", "Who?"]
    for step in range(2):
        local, served = (s.sample(policy, prompts, 3, torch.Generator().manual_seed(step)) for s in samplers)
        assert local.data["turn_texts"] == served.data["turn_texts"] and local.completions == served.completions
        assert (local.data["num_turns"] > 1).any() and local.data["info_mask"].any()  # multi-turn, observed
        for key in ("response_ids", "response_attention_mask", "info_mask", "prompt_ids", "num_tool_calls"):
            assert torch.equal(local.data[key], served.data[key]), key
        for name in ("old_logprobs", "mask", "turn_ends", "truncated"):
            assert torch.equal(getattr(local, name), getattr(served, name)), name
        assert not (local.mask & local.data["info_mask"]).any()  # observation tokens are never trained
        for rollout in (local, served):  # the engine's log-probs are the policy's on generated tokens, 0 elsewhere
            engine = rollout.data["engine_logprobs"]
            torch.testing.assert_close(engine[rollout.mask], rollout.old_logprobs[rollout.mask], atol=1e-5, rtol=0)
            assert (
                torch.all(engine[~rollout.mask] == 0) and rollout.metrics["rollout/engine_logprob_abs_diff_max"] < 1e-5
            )
        assert served.metrics["engine/weight_pushed"] == 1.0  # pushed once per step (first turn), then current
        with torch.no_grad():
            ratio = torch.exp(policy.log_probs(served) - served.old_logprobs)[served.mask]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
        sgd_step(policy, local)


def test_hf_engine_first_turn_is_todays_seeded_generate() -> None:
    """Turn 0 is exactly `generate` under torch.manual_seed(the sampler's seed), as before the engine seam."""
    policy = scripted_policy(soft_script())
    rollout, *_ = run(policy, ["Where?", "Who?"], group_size=2, seed=3, max_turns=0, max_new_tokens_per_turn=8)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)).item())
    assert turn_seed(seed, 0) == seed and turn_seed(seed, 1) != seed
    tok = tokenizer()
    rows = [tok("Where?")["input_ids"]] * 2 + [tok("Who?")["input_ids"]] * 2
    ids, mask = left_pad(rows, tok.pad_token_id)
    stop = StopStringCriteria(tokenizer=tok, stop_strings=["</answer>"])
    torch.manual_seed(seed)
    out = policy.module.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=True,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        stopping_criteria=StoppingCriteriaList([stop]),
    )[:, ids.shape[1] :]
    for row in range(4):
        n = int(rollout.lengths[row])
        assert rollout.data["response_ids"][row, :n].tolist() == out[row, :n].tolist()
