"""Search agents end to end on CPU: tiny.yaml trains and evaluates; PPR's official path (judge -> ReNorm -> GAE
with a critic) and its GRPO-family variant run through the trainer with a BM25 tool in-process or an HTTP
retriever on loopback, a rule judge, a garbage/timeout judge endpoint or a tiny local HF judge.

Through the whole trainer step, observation tokens get exactly zero gradient and the ratio is 1 on-policy.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from modalities.text_agent.agent_metrics import answered_after_search, rule_judge_reply, searched
from modalities.text_agent.tools.retriever_server import make_server
from modalities.text_agent.tools.search import BM25Search
from rewards.judges.ppr import build_turn_messages
from toolkit.config import load_config
from toolkit.evaluation import evaluate
from toolkit.rollout import Rollout
from toolkit.train.runner import build_trainer
from toolkit.train.scoring import RewardFailure
from toolkit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs" / "text_agent"
QA = ROOT / "data" / "text_agent" / "synthetic_qa.jsonl"
CORPUS = ROOT / "data" / "text_agent" / "corpus.jsonl"
SMALL = [
    "trainer.progress=false",
    "trainer.save_every=0",
    "trainer.prompts_per_step=4",
    "policy.model.warm_start_steps=0",
    "policy.model.copy_steps=0",
    "sampler.max_new_tokens_per_turn=6",
    "sampler.max_response_tokens=48",
    "sampler.max_observation_tokens=24",
    f"data.paths={QA}",
    f"sampler.tools.0.corpus={CORPUS}",
]


def config(name: str, run_dir: Path, *overrides: str) -> dict[str, Any]:
    return load_config(CONFIGS / name, [*SMALL, f"trainer.run_dir={run_dir}", *overrides])


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class LossSpy:
    """Wraps the trainer's objective and micro_loss: keeps every micro-batch, its log-probs (grad retained)."""

    def __init__(self, trainer: Trainer) -> None:
        self.objective = trainer.objective
        self.micro_loss = trainer.micro_loss
        self.calls: list[tuple[Rollout, torch.Tensor]] = []
        self._micro: Rollout | None = None
        trainer.objective = self  # type: ignore[assignment]
        trainer.micro_loss = self.spy_micro_loss  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def spy_micro_loss(self, micro: Rollout, *denominators: float | None) -> Any:
        self._micro = micro
        return self.micro_loss(micro, *denominators)

    def __call__(self, logprobs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        logprobs.retain_grad()
        assert self._micro is not None
        self.calls.append((self._micro, logprobs))
        return self.objective(logprobs, *args, **kwargs)


def bias_towards_search(trainer: Trainer) -> None:
    """Nudge the random policy to search (soft bigram logits via a forward hook: still stochastic, ratio 1).

    After "?" (the prompt's end) or a newline it tends to write `<search>`, then "z", then `</search>`.
    """
    tokenizer = trainer.policy.tokenizer  # type: ignore[attr-defined]
    model = trainer.policy.module
    edges = {"?": {"<search>": 6.0}, "\n": {"<search>": 6.0}, "<search>": {"z": 4.0}, "z": {"</search>": 5.0}}
    bias = torch.zeros(model.config.vocab_size, model.config.vocab_size)
    for a, nexts in edges.items():
        for b, logit in nexts.items():
            bias[tokenizer.convert_tokens_to_ids(a), tokenizer.convert_tokens_to_ids(b)] = logit

    def add_bias(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        output.logits = output.logits + bias[ids[:, -output.logits.shape[1] :]]
        return output

    model.register_forward_hook(add_bias, with_kwargs=True)


def check_masking_and_ratio(spy: LossSpy) -> None:
    """Zero gradient on every observation token, non-zero on trained ones; ratio exactly 1 (one minibatch)."""
    assert spy.calls, "the objective was never called"
    info_tokens = 0
    for micro, logprobs in spy.calls:
        info = micro.data["info_mask"].bool()
        info_tokens += int(info.sum())
        assert logprobs.grad is not None
        assert not bool((info & micro.mask).any()), "an observation token is in the loss mask"
        assert bool((logprobs.grad[info] == 0).all()), "observation tokens received gradient"
        assert bool((logprobs.grad[~micro.mask] == 0).all())
        assert bool((logprobs.grad[micro.mask] != 0).any())
        ratio = torch.exp(logprobs.detach() - micro.old_logprobs)[micro.mask]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert info_tokens > 0, "no observation tokens in the batch: the check would be vacuous"


def test_tiny_yaml_trains_and_evaluates_per_dataset(tmp_path: Path) -> None:
    cfg = config(
        "tiny.yaml",
        tmp_path,
        "scheduler.name=constant_with_warmup",
        "scheduler.warmup_steps=4",
        f"eval.data.paths={QA}",
        "eval.num_prompts=2",
        "eval.num_samples=2",
        "objective.entropy_coef=0.01",  # a gradient even when every reward of this random policy is 0
    )
    trainer = build_trainer(cfg)
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # warm-up starts at 0 (plain "constant" ignores warmup_steps)
    before = parameters(trainer.policy.module)
    metrics, rollout = trainer.step()
    base_lr = trainer.scheduler.base_lrs[0]
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(base_lr * 2 / 4)  # 2 of 4 warm-up steps
    after = parameters(trainer.policy.module)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss/policy", "reward/score", "reward/em", "agent/tool_calls_mean", "agent/turns_mean"):
        assert math.isfinite(metrics[key]), key
    assert rollout.data["info_mask"].shape == rollout.mask.shape
    result = evaluate(cfg)
    assert set(result.per_dataset) == {"all", "synthetic"}
    row = result.per_dataset["synthetic"]
    assert {"em", "searched", "num_turns", "num_tool_calls"} <= set(row)
    assert 1.0 <= row["num_turns"] <= 2.0 and 0.0 <= row["num_tool_calls"] <= 1.0
    assert "num_tool_calls" in result.table()


def test_ppr_official_path_bm25_rule_judge_critic(tmp_path: Path) -> None:
    trainer = build_trainer(config("tiny_ppr.yaml", tmp_path, "trainer.num_minibatches=1"))
    assert trainer.critic is not None
    bias_towards_search(trainer)
    spy = LossSpy(trainer)
    critic_before = parameters(trainer.critic.critic.module)
    for _ in range(2):
        spy.calls.clear()
        metrics, rollout = trainer.step()
        check_masking_and_ratio(spy)
    assert metrics["judge/validity_rate"] == 1.0 and metrics["prm/validity_rate"] == 1.0
    assert metrics["agent/tool_calls_mean"] > 0 and metrics["judge/process_mean"] > 0  # searches were judged
    assert metrics["judge/turns"] > 0 and math.isfinite(metrics["loss/value"])
    assert metrics["policy/clip_frac"] == 0.0
    assert rollout.token_rewards is not None and rollout.turn_ends is not None and rollout.values is not None
    assert bool((rollout.token_rewards[~rollout.turn_ends] == 0).all())
    # GAE ran over observation tokens too (official): they carry advantages the loss then ignores.
    info = rollout.data["info_mask"].bool()
    assert bool((rollout.advantages[info] != 0).any())
    critic_after = parameters(trainer.critic.critic.module)
    assert any(not torch.equal(critic_before[k], critic_after[k]) for k in critic_before)


class FlakyJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that, in turn, times out, sends a non-JSON body, scores, or writes no score."""

    counter = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            kind = FlakyJudge.counter % 4
            FlakyJudge.counter += 1
        if kind == 0:
            time.sleep(1.5)  # past the client's timeout
        content = "Scores: <final_score>1,2</final_score>" if kind == 2 else "I will not score this."
        body = b"<<garbage>>" if kind == 1 else json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
        pass


def serve(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def retriever_url() -> Iterator[str]:
    for server in serve(make_server(BM25Search(str(CORPUS), top_k=1), "127.0.0.1", 0)):
        yield server.url


@pytest.fixture
def flaky_judge_url() -> Iterator[str]:
    FlakyJudge.counter = 0
    for server in serve(ThreadingHTTPServer(("127.0.0.1", 0), FlakyJudge)):
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"


def flaky_judge_config(tmp_path: Path, retriever_url: str, flaky_judge_url: str, *overrides: str) -> dict[str, Any]:
    cfg = config("tiny_ppr.yaml", tmp_path, "trainer.num_minibatches=1", "trainer.group_size=2", *overrides)
    cfg["sampler"]["tools"] = [
        {"_component_": "modalities.text_agent.tools.search.RetrieverClient", "url": retriever_url, "top_k": 1}
    ]
    cfg["transforms"][1]["judge"]["client"] = {
        "_component_": "rewards.judges.client.OpenAIChatClient",
        "base_url": flaky_judge_url,
        "model": "judge",
        "timeout_s": 0.5,
        "max_retries": 1,
        "backoff_s": 0.0,
        "max_concurrency": 1,
        "use_env_proxy": False,
    }
    cfg["transforms"][1]["judge"]["max_retries_invalid"] = 1
    cfg["critic"] = None
    cfg["normalizer"] = {"_component_": "toolkit.advantages.TurnGroupNormalizer", "eps": 1.0e-6}
    return cfg


def test_a_judge_failing_on_many_calls_stops_the_run(tmp_path: Path, retriever_url: str, flaky_judge_url: str) -> None:
    trainer = build_trainer(flaky_judge_config(tmp_path, retriever_url, flaky_judge_url))
    bias_towards_search(trainer)
    with pytest.raises(RewardFailure, match=r"judge/failure_rate = \d+% this step.*max_reward_failure_frac=0.05"):
        for _ in range(2):
            trainer.step()


def test_grpo_variant_http_retriever_and_flaky_judge(tmp_path: Path, retriever_url: str, flaky_judge_url: str) -> None:
    tolerant = "trainer.max_reward_failure_frac=1.0"  # the judge's timeouts and garbage are counted, not fatal
    trainer = build_trainer(flaky_judge_config(tmp_path, retriever_url, flaky_judge_url, tolerant))
    bias_towards_search(trainer)
    spy = LossSpy(trainer)
    texts: list[str] = []
    for _ in range(2):
        spy.calls.clear()
        metrics, rollout = trainer.step()
        check_masking_and_ratio(spy)
        texts += list(rollout.completions or [])
    tool = trainer.sampler.tools["search"]  # type: ignore[attr-defined]
    assert tool.num_requests >= 1 and tool.num_failures == 0  # the searches went over HTTP (one batch per turn)
    assert any("Doc 1(Title:" in text for text in texts)
    assert metrics["agent/tool_errors"] == 0.0
    assert metrics["judge/failures"] >= 1 and metrics["judge/invalid"] >= 1  # timeouts and garbage, counted
    assert 0.0 < metrics["judge/validity_rate"] < 1.0
    assert metrics["prm/validity_rate"] == pytest.approx(metrics["judge/validity_rate"])
    assert rollout.advantages is not None and rollout.advantages.shape == rollout.mask.shape
    assert torch.isfinite(rollout.advantages).all() and math.isfinite(metrics["loss/policy"])


def test_tiny_local_hf_judge_falls_back_and_counts(tmp_path: Path) -> None:
    cfg = config("tiny_ppr.yaml", tmp_path, "trainer.prompts_per_step=2")
    cfg["transforms"][1]["judge"]["client"] = {
        "_component_": "rewards.judges.client.HFChatClient",
        "model": {"_component_": "modalities.text_agent.tiny.build_tiny_qwen2", "seed": 5},
        "tokenizer": {"_component_": "modalities.text_agent.tiny.build_char_tokenizer"},
        "max_new_tokens": 8,  # `<final_score>` alone is 13 characters: never valid
    }
    cfg["transforms"][1]["judge"]["max_retries_invalid"] = 0
    trainer = build_trainer(cfg)
    metrics, rollout = trainer.step()
    assert metrics["judge/turns"] > 0 and metrics["judge/validity_rate"] == 0.0
    assert metrics["judge/invalid"] == metrics["judge/turns"]
    assert metrics["prm/validity_rate"] == 0.0 and math.isfinite(metrics["loss/policy"])
    assert all(score is None for row in rollout.data["process_rewards"] for score in row)


def test_missing_corpus_fails_at_build_time(tmp_path: Path) -> None:
    missing = tmp_path / "no_corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="no_corpus.jsonl"):
        build_trainer(config("tiny.yaml", tmp_path, f"sampler.tools.0.corpus={missing}"))
    assert not (tmp_path / "config.yaml").exists()  # nothing ran


def test_shaping_rewards_and_rule_judge() -> None:
    trajectory = "<search> zorvania </search>\n<information>Doc 1 ...</information>\n<answer> Quellport </answer>"
    assert searched(None, trajectory) == 1.0 and answered_after_search(None, trajectory) == 1.0
    assert searched(None, "<search></search><information>x</information>") == 0.0  # an empty query
    assert searched(None, "<search><search></search><information>x</information>") == 0.0  # a tag is no query
    assert answered_after_search(None, "<search>4</search><information>x</information><answer><search></answer>") == 0
    assert answered_after_search(None, "<answer> Quellport </answer><search> a </search><information>") == 0.0
    messages = build_turn_messages(
        "What is the capital of Zorvania?", [{"action": "<search> zorvania capital </search>", "observation": ""}], 0
    )
    assert rule_judge_reply(messages).endswith("<final_score>2,2</final_score>")
    off_topic = build_turn_messages("What is the capital of Zorvania?", ["<search> xq </search>"], 0)
    assert rule_judge_reply(off_topic).endswith("<final_score>1,2</final_score>")
    assert rule_judge_reply(build_turn_messages("Q?", ["no tags"], 0)).endswith("<final_score>0,2</final_score>")
