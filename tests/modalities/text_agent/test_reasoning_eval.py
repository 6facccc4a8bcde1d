"""Reasoning evaluation: pass@1 over k samples, lengths and truncation per dataset on hand-made completions,
DLER Table 1 output, JSON and the accuracy-vs-length plot across checkpoints, the benchmark file layouts,
and `renorm eval configs/text_reasoning/tiny.yaml` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from modalities.text_agent.reasoning_data import ReasoningDataset, load_problems
from modalities.text_agent.reasoning_eval import (
    AVERAGE,
    ReasoningEvalResult,
    ReasoningEvaluator,
    format_table,
    pass_at_1,
    summarize,
)
from rewards.text.math import MathAccuracyReward
from toolkit.cli import main as renorm
from toolkit.io.checkpoint import CheckpointManager, CheckpointState
from toolkit.rollout import Rollout

ROOT = Path(__file__).resolve().parents[3]


def test_pass_at_1_averages_over_samples_then_problems() -> None:
    assert pass_at_1([[1, 0, 0, 0], [1, 1, 1, 1]]) == pytest.approx(0.625)
    assert pass_at_1([[1, math.nan], [0, 0]]) == pytest.approx(0.5)  # NaN samples are skipped
    assert math.isnan(pass_at_1([[math.nan]]))


def test_summarize_per_dataset_and_unweighted_average() -> None:
    rows = [
        {"dataset": "A", "problem_id": "p1", "correct": 1.0, "length": 10, "truncated": False},
        {"dataset": "A", "problem_id": "p1", "correct": 0.0, "length": 30, "truncated": True},
        {"dataset": "A", "problem_id": "p2", "correct": 1.0, "length": 20, "truncated": False},
        {"dataset": "A", "problem_id": "p2", "correct": 1.0, "length": 20, "truncated": False},
        {"dataset": "B", "problem_id": "q1", "correct": 0.0, "length": 100, "truncated": True},
        {"dataset": "B", "problem_id": "q1", "correct": math.nan, "length": 100, "truncated": True},
    ]
    out = summarize(rows)
    assert out["A"] == {
        "accuracy": 75.0,
        "length": 20.0,
        "truncation": 25.0,
        "num_problems": 2.0,
        "num_samples": 4.0,
        "ungraded": 0.0,
    }
    assert out["B"]["accuracy"] == 0.0 and out["B"]["ungraded"] == 1.0 and out["B"]["truncation"] == 100.0
    assert out[AVERAGE] == {"accuracy": 37.5, "length": 60.0, "truncation": 62.5}


def test_table_puts_accuracy_and_length_side_by_side() -> None:
    results = {"base": {"MATH": {"accuracy": 84.31, "length": 5500.0}, AVERAGE: {"accuracy": 84.31, "length": 5500.0}}}
    header, rule, row = format_table(results).splitlines()
    assert [c.strip() for c in header.split(" | ")[1:3]] == ["MATH acc", "MATH L"] and set(rule) == {"-"}
    assert [c.strip() for c in row.split(" | ")[1:3]] == ["84.31", "5500"]


# ------------------------------------------------------------------------------------------- the evaluator


class WeightPolicy:
    """A stand-in policy: one weight whose sign decides whether the scripted sampler answers correctly."""

    def __init__(self) -> None:
        self.module = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.module.weight.fill_(-1.0)


class ScriptedSampler:
    """Fixed completions: problem i gets `pattern[i % len(pattern)]` (correct or not per sample, k = 2)."""

    def __init__(self, pattern: list[list[bool]], length: int = 5) -> None:
        self.pattern, self.length = pattern, length

    def sample(self, policy: Any, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        trained = float(policy.module.weight) > 0  # a "trained" checkpoint answers everything
        rows, completions, lengths = [], [], []
        for prompt in prompts:
            for j in range(group_size):
                ok = trained or self.pattern[int(prompt["id"].split("-")[-1]) % len(self.pattern)][j]
                rows.append(prompt)
                completions.append(f"</think>\\boxed{{{prompt['answer'] if ok else 'wrong'}}}")
                lengths.append(self.length if not trained else 2)
        n = len(rows)
        return Rollout(
            group_ids=torch.arange(n) // group_size,
            old_logprobs=torch.zeros(n, self.length),
            mask=torch.ones(n, self.length, dtype=torch.bool),
            lengths=torch.tensor(lengths),
            truncated=torch.tensor([length >= self.length for length in lengths]),
            prompts=rows,
            completions=completions,
        )


def problems_file(tmp_path: Path) -> ReasoningDataset:
    rows = [{"id": f"p-{i}", "problem": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ReasoningDataset({"toy": str(path)}, shuffle=False)


def test_evaluator_on_hand_made_completions(tmp_path: Path) -> None:
    policy, data = WeightPolicy(), problems_file(tmp_path)
    sampler = ScriptedSampler([[True, False], [True, True], [False, False], [True, True]])
    reward = {"accuracy": MathAccuracyReward(think_mode="require", require_boxed=True)}
    checkpoint = CheckpointManager(tmp_path / "run").save(CheckpointState(step=7, model={"weight": torch.ones(1, 1)}))
    evaluator = ReasoningEvaluator(num_samples=2, batch_size=3, checkpoints=[str(checkpoint)], output_dir=str(tmp_path))
    result = evaluator(policy=policy, sampler=sampler, rewards=reward, data=data)
    assert result.results["base"]["toy"]["accuracy"] == pytest.approx(100 * (0.5 + 1 + 0 + 1) / 4)
    assert result.results["base"]["toy"]["length"] == 5.0 and result.results["base"]["toy"]["truncation"] == 100.0
    assert result.results["step_00000007"]["toy"]["accuracy"] == 100.0
    assert result.results["step_00000007"][AVERAGE]["length"] == 2.0
    saved = json.loads((tmp_path / "reasoning_eval.json").read_text())
    assert saved["results"] == result.results and len(saved["rows"]) == 16
    assert (tmp_path / "accuracy_vs_length.png").stat().st_size > 0
    assert "toy acc" in result.table() and "step_00000007" in result.table()


def test_evaluator_rejects_bad_setups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        ReasoningEvaluator(num_samples=0)
    evaluator = ReasoningEvaluator(num_samples=1, correct_reward="missing")
    with pytest.raises(ValueError, match="correct_reward 'missing'"):
        evaluator(
            policy=WeightPolicy(),
            sampler=ScriptedSampler([[True]]),
            rewards={"accuracy": MathAccuracyReward()},
            data=problems_file(tmp_path),
        )


# ------------------------------------------------------------------------------------------- file layouts


def test_benchmark_layouts(tmp_path: Path) -> None:
    (tmp_path / "math500.jsonl").write_text(json.dumps({"problem": "p", "answer": "\\frac{1}{2}", "unique_id": "u1"}))
    (tmp_path / "aime24.json").write_text(json.dumps([{"ID": "2024-I-1", "Problem": "q", "Answer": 204}]))
    (tmp_path / "minerva.jsonl").write_text(json.dumps({"problem": "m", "solution": "so \\boxed{3.5}"}))
    table = pa.table({"question": ["o"], "final_answer": [["$3$"]], "id": [11]})
    pq.write_table(table, tmp_path / "olympiadbench.parquet")
    got = {p.stem: load_problems(p)[0] for p in sorted(tmp_path.iterdir())}
    assert got["math500"]["answer"] == "\\frac{1}{2}" and got["math500"]["id"] == "math500/u1"
    assert got["aime24"]["problem"] == "q" and got["aime24"]["answer"] == "204"
    assert got["minerva"]["answer"] == "3.5" and got["minerva"]["solution"] == "so \\boxed{3.5}"
    assert got["olympiadbench"]["answer"] == "3" and got["olympiadbench"]["dataset"] == "olympiadbench"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "answer": "1"}))
    with pytest.raises(ValueError, match="no problem field"):
        load_problems(tmp_path / "bad.jsonl")


def test_prompt_templates_and_chat(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}))
    plain = ReasoningDataset(str(tmp_path / "a.jsonl"), prompt_template="{problem} Think.", system_prompt="S")
    assert plain.records[0]["prompt"] == "S\n1+1? Think."
    chat = ReasoningDataset([str(tmp_path / "a.jsonl")], system_prompt="S", chat=True)
    assert chat.records[0]["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}]
    with pytest.raises(ValueError, match="problem"):
        ReasoningDataset(str(tmp_path / "a.jsonl"), prompt_template="no slot")


def test_verl_parquet_and_saved_dataset_through_a_config_node(tmp_path: Path) -> None:
    """verl's layout (chat-list `prompt`, `reward_model.ground_truth`) and a `save_to_disk` folder standing in for
    a hub dataset give the same problems once `fields` maps them; the stream resumes exactly."""
    import datasets

    from toolkit.config import instantiate, validate

    problems = [("1+1?", "2"), ("2+3?", "5"), ("4+4?", "8")]
    verl = [
        {
            "data_source": "arith",
            "prompt": [{"role": "user", "content": q}],
            "reward_model": {"style": "rule", "ground_truth": a},
        }
        for q, a in problems
    ]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "verl_train.parquet")
    rows = [{"question": q, "solution": f"so \\boxed{{{a}}}", "idx": i} for i, (q, a) in enumerate(problems)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    node = {
        "_component_": "modalities.text_agent.reasoning_data.ReasoningDataset",
        "paths": {"verl": str(tmp_path / "verl_train.parquet")},
        "fields": {"problem": "prompt.0.content", "answer": "reward_model.ground_truth"},
        "prompt_template": "{problem} Think.",
        "seed": 1,
    }
    validate(node, "data")
    from_verl = instantiate(node, where="data")
    from_saved = ReasoningDataset({"verl": str(saved)}, prompt_template="{problem} Think.", seed=1, split="test")
    keys = ("problem", "answer", "prompt", "dataset")
    assert [[r[k] for k in keys] for r in from_verl.records] == [[r[k] for k in keys] for r in from_saved.records]
    assert [r["answer"] for r in from_saved.records] == ["2", "5", "8"]
    assert [r["id"] for r in from_saved.records] == ["verl/0", "verl/1", "verl/2"]
    from_verl.next_batch(2)
    state = json.loads(json.dumps(from_verl.state_dict()))
    resumed = instantiate(node, where="data")
    resumed.load_state_dict(state)
    assert [r["problem"] for r in resumed.next_batch(4)] == [r["problem"] for r in from_verl.next_batch(4)]
    with pytest.raises(
        ValueError, match=r"fields.answer: 'reward_model.truth' not found .*\['ground_truth', 'style'\]"
    ):
        ReasoningDataset(str(tmp_path / "verl_train.parquet"), fields={"answer": "reward_model.truth"})
    assert ReasoningDataset(str(saved), split="test", max_problems=1).datasets == ["saved"]


RECIPES = sorted((Path(__file__).resolve().parents[3] / "configs" / "text_reasoning").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_reasoning_recipe_builds_its_data_with_its_own_template(tmp_path: Path, recipe: Path) -> None:
    """The shipped templates ask for `\\boxed{}`: building the data must keep it (str.format raised here)."""
    from toolkit.config import instantiate, load_config

    (tmp_path / "a.jsonl").write_text(json.dumps({"problem": "1+{x}?", "answer": "2"}))
    config = load_config(recipe)
    for node in (config["data"], (config.get("eval") or {}).get("data")):
        if node is None:
            continue
        data = instantiate({**node, "paths": {"a": str(tmp_path / "a.jsonl")}}, where="data")
        prompt = data.records[0]["prompt"]
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        assert text.startswith("1+{x}?") and text.count("{") == text.count("}")
        template = node.get("prompt_template", "{problem}")
        assert text == template.replace("{problem}", "1+{x}?")


# ------------------------------------------------------------------------------------------- renorm eval


def test_renorm_eval_runs_the_tiny_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "eval.json"
    overrides = ["policy.model.warm_start_steps=0", "eval.evaluator.max_problems=3", "eval.evaluator.num_samples=2"]
    config = str(ROOT / "configs" / "text_reasoning" / "tiny.yaml")
    assert renorm(["eval", config, *overrides, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "add acc" in printed and "sub L" in printed and "Avg acc" in printed
    results = json.loads(output.read_text())["results"]["base"]
    assert set(results) == {"add", "sub", AVERAGE}
    assert results["add"]["num_problems"] == 3 and results["add"]["num_samples"] == 6


def test_metrics_name_each_dataset_and_the_average_for_eval_every() -> None:
    result = ReasoningEvalResult({"policy": {"add": {"accuracy": 50.0, "length": 3.0}, AVERAGE: {"accuracy": 50.0}}})
    assert result.metrics() == {"add/accuracy": 50.0, "add/length": 3.0, f"{AVERAGE}/accuracy": 50.0}
    with pytest.raises(ValueError, match="one evaluated policy"):
        ReasoningEvalResult({"a": {}, "b": {}}).metrics()
