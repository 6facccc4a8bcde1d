"""`renorm` end to end through `toolkit.cli.main` (in-process) and the installed console script.

One tiny 2-step training run (module fixture) feeds the train, plot and eval tests. Bad input must exit 2
with a message naming the problem, before any model is built (the model factory is replaced by a spy).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from toolkit.cli import build_parser, main
from toolkit.io.checkpoint import CheckpointManager, CheckpointState, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
LETTERS = ROOT / "data" / "demo" / "letters.jsonl"
DATA = ROOT / "tests" / "data" / "cli"
FAST = [
    f"data.path={LETTERS}",
    "sampler.max_new_tokens=4",
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.progress=false",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*argv: str | Path) -> Result:
    """`main(argv)` with stdout/stderr captured; argparse's SystemExit becomes the exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- help


SUBCOMMAND_PURPOSE = {
    "train": "Train from a YAML config",
    "eval": "eval prompts",
    "score": "reward model standalone",
    "plot": "PNG curves",
    "merge": "Update-selective merging",
    "export": "Hugging Face folder",
    "config": "resolved config",
}


def registered_subcommands() -> dict[str, str]:
    """name -> description of every subcommand the parser has (core and `renorm.commands` plugins)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: parser.description or "" for name, parser in action.choices.items()}


def test_core_subcommands_are_registered() -> None:
    assert set(SUBCOMMAND_PURPOSE) <= set(registered_subcommands())


def test_top_level_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.code == 0
    for name, purpose in SUBCOMMAND_PURPOSE.items():
        assert name in result.out
        assert purpose in result.out
    for name in registered_subcommands():
        assert name in result.out


@pytest.mark.parametrize("name", sorted(SUBCOMMAND_PURPOSE))
def test_subcommand_help(name: str) -> None:
    result = run_cli(name, "--help")
    assert result.code == 0
    assert f"usage: renorm {name}" in result.out
    assert SUBCOMMAND_PURPOSE[name] in result.out


def test_every_registered_subcommand_has_help() -> None:
    for name, description in registered_subcommands().items():
        result = run_cli(name, "--help")
        assert result.code == 0, (name, result.err)
        assert description and " ".join(description.split()[:4]) in " ".join(result.out.split()), name


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("renorm")
    done = subprocess.run(
        [str(script), "config", str(CONFIG), "optimizer.lr=0.25"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["optimizer"]["lr"] == 0.25


def test_core_subcommands_do_not_import_torch_before_they_run() -> None:
    """Parsing a core command (and its `--help`) loads neither torch nor a modality plugin (~10 s of imports)."""
    probe = f"""
import sys
from toolkit.cli import main
for name in {sorted(SUBCOMMAND_PURPOSE)!r}:
    try:
        main([name, "--help"])
    except SystemExit:
        pass
print("HEAVY", sorted(m for m in ("torch", "transformers", "modalities") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_missing_subcommand_is_a_usage_error() -> None:
    result = run_cli()
    assert result.code == 2
    assert "COMMAND" in result.err


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def model_spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the tiny model factory by one that records the call and raises (signature kept for validation)."""
    import modalities.text_agent.tiny as tiny

    calls: list[dict[str, Any]] = []

    @functools.wraps(tiny.build_tiny_qwen2)
    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise AssertionError("the model factory was called")

    monkeypatch.setattr(tiny, "build_tiny_qwen2", spy)
    return calls


def test_model_spy_is_wired(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    """Control for the fail-fast tests: with a valid config the (spied) factory is reached."""
    with pytest.raises(AssertionError, match="model factory was called"):
        main(["train", str(CONFIG), *FAST, f"trainer.run_dir={tmp_path}"])
    assert len(model_spy) == 1


def assert_config_error(result: Result, *fragments: str) -> None:
    assert result.code == 2, result
    assert result.err.startswith("renorm: "), result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


def test_malformed_yaml_names_file_and_line(model_spy: list[dict[str, Any]]) -> None:
    result = run_cli("train", DATA / "malformed.yaml")
    assert_config_error(result, "malformed YAML", "malformed.yaml:4", "line 3")
    assert not model_spy


def test_unknown_key_names_it_and_the_closest_one(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", "optimizer.lrr=1")
    assert_config_error(result, "optimizer.lrr", "unknown key", "did you mean 'lr'")
    assert not model_spy and not tmp_path.joinpath("config.yaml").exists()


def test_unknown_key_in_a_later_section_fails_before_the_model(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    # `data` is built after `policy`: the whole tree must be validated before anything is built.
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", "data.shufle=false")
    assert_config_error(result, "data.shufle", "did you mean 'shuffle'")
    assert not model_spy


def test_wrong_type_names_key_and_expected_type(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", "trainer.num_steps=abc")
    assert_config_error(result, "trainer.num_steps", "expected int", "'abc'")
    assert not model_spy


def test_missing_config_file(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    result = run_cli("train", tmp_path / "nope.yaml")
    assert_config_error(result, "config file not found", "nope.yaml")
    assert not model_spy


def test_component_pointing_at_a_missing_class(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    bad = "objective._component_=toolkit.objective.policy_objective.PolicyObjectiv"
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", bad)
    assert_config_error(result, "objective._component_", "PolicyObjectiv", "did you mean 'PolicyObjective'")
    assert not model_spy


def test_eval_bad_reward_key_fails_before_the_model(model_spy: list[dict[str, Any]]) -> None:
    result = run_cli("eval", CONFIG, *FAST, "rewards.letters.ignore_space=false")
    assert_config_error(result, "rewards.letters.ignore_space", "did you mean 'ignore_spaces'")
    assert not model_spy


def test_resume_from_a_missing_checkpoint_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkpoint"
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", f"trainer.resume={missing}")
    assert result.code == 2
    assert "resume checkpoint not found" in result.err and str(missing) in result.err


# ---------------------------------------------------------------------------------------------- config


def test_config_prints_resolved_values() -> None:
    result = run_cli("config", CONFIG, "optimizer.lr=0.5", "+eval.num_prompts=3", "objective.term.clip_high=0.28")
    assert result.code == 0, result.err
    printed = yaml.safe_load(result.out)
    assert printed["optimizer"]["lr"] == 0.5
    assert printed["eval"] == {"num_prompts": 3}
    assert printed["objective"]["term"]["clip_high"] == 0.28
    assert printed["objective"]["_component_"] == "toolkit.objective.PolicyObjective"
    original = yaml.safe_load(CONFIG.read_text())
    assert printed["trainer"]["seed"] == original["trainer"]["seed"]  # untouched keys survive


def test_config_validate_exits_2_on_a_bad_key_before_any_model(model_spy: list[dict[str, Any]]) -> None:
    unchecked = run_cli("config", CONFIG, "optimizer.lrr=1")
    assert unchecked.code == 0  # printing alone checks no key
    result = run_cli("config", CONFIG, "optimizer.lrr=1", "--validate")
    assert_config_error(result, "optimizer.lrr", "unknown key", "did you mean 'lr'")
    assert not result.out and not model_spy
    typo = run_cli("config", CONFIG, "--validate", "trainer.num_stpes=3")  # overrides may follow the flag
    assert_config_error(typo, "trainer.num_stpes", "did you mean 'num_steps'")


def test_config_validate_runs_the_train_checks(tmp_path: Path, model_spy: list[dict[str, Any]]) -> None:
    ok = run_cli("config", CONFIG, "--validate")
    assert ok.code == 0, ok.err
    assert yaml.safe_load(ok.out)["optimizer"]["lr"] == 1e-3 and "is a valid run config" in ok.err
    preset = run_cli("config", ROOT / "configs" / "algorithms" / "grpo.yaml", "--validate")
    assert_config_error(preset, "policy: missing required field of RunSpec")  # a preset is no run config
    no_hook = run_cli("config", CONFIG, "trainer.eval_every=5", "--validate")  # a cross-section check of train
    assert no_hook.code == 2 and "needs an `eval.evaluator` hook" in no_hook.err
    assert not model_spy


def test_config_defaults_marks_what_the_config_leaves_out() -> None:
    result = run_cli("config", CONFIG, "--defaults", "optimizer.eps=1.0e-6")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "  lr: 0.001" in lines and "  eps: 1.0e-06" in lines  # set in the file or by an override: unmarked
    for default in (
        "  amsgrad: false  # default",
        "  gradient_accumulation_steps: 1  # default",
        "critic: null  # default",
    ):
        assert default in lines, default
    assert "    vocab_size: 128  # default" in lines  # a nested component (policy.model)
    printed = yaml.safe_load(result.out)
    from toolkit.config import load_config
    from toolkit.train.trainer_config import TrainerConfig

    loaded = load_config(CONFIG, ["optimizer.eps=1.0e-6"])
    assert {k: printed["trainer"][k] for k in loaded["trainer"]} == loaded["trainer"]
    assert set(printed["trainer"]) == {f for f in TrainerConfig.__dataclass_fields__}
    assert printed["objective"]["kl_estimator"] == "k3" and printed["data"]["shuffle"] is True


def test_config_defaults_output_loads_back_to_the_same_run(tmp_path: Path) -> None:
    from toolkit.config import load_config
    from toolkit.train.runner import validate_run_config

    result = run_cli("config", CONFIG, "--defaults", f"data.path={LETTERS}")
    assert result.code == 0, result.err
    saved = tmp_path / "with_defaults.yaml"
    saved.write_text(result.out, encoding="utf-8")
    spec, trainer, _ = validate_run_config(load_config(saved))
    _, original, _ = validate_run_config(load_config(CONFIG))
    assert trainer == original and spec.data["path"] == str(LETTERS)


def test_config_defaults_keeps_secrets_redacted() -> None:
    secret = "sk-defaults-0123456789"
    keyed = [
        "+rewards.keyed._component_=tests.toolkit.io.test_redaction.KeyedReward",
        f"+rewards.keyed.api_key={secret}",
    ]
    result = run_cli("config", CONFIG, "--defaults", *keyed)
    assert result.code == 0, result.err
    assert secret not in result.out and "    api_key: <redacted>" in result.out.splitlines()
    assert "    api_key_env: null  # default" in result.out.splitlines()


def test_config_resolves_interpolation_after_overrides(tmp_path: Path) -> None:
    recipe = ROOT / "configs" / "text_reasoning" / "tiny_grpo.yaml"
    result = run_cli("config", recipe, f"trainer.run_dir={tmp_path}")
    assert result.code == 0, result.err
    assert yaml.safe_load(result.out)["eval"]["evaluator"]["output_dir"] == f"{tmp_path}/eval"
    bad = run_cli("config", recipe, "eval.evaluator.output_dir=${trainer.rundir}/eval")
    assert_config_error(bad, "eval.evaluator.output_dir", "no key 'trainer.rundir'", "did you mean 'run_dir'")


# ---------------------------------------------------------------------------------------------- train


@dataclass
class TrainedRun:
    run_dir: Path
    result: Result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    # The entropy bonus guarantees the weights move even if every sampled reward is 0.
    result = run_cli(
        "train", CONFIG, *FAST, "trainer.num_steps=2", f"trainer.run_dir={run_dir}", "objective.entropy_coef=0.01"
    )
    return TrainedRun(run_dir, result)


def test_train_exits_zero_and_prints_the_before_after_table(trained: TrainedRun) -> None:
    assert trained.result.code == 0, trained.result.err[-3000:]
    out = trained.result.out
    assert "first" in out and "last" in out and "ratio" in out
    assert "reward/mean" in out and "rollout/length_mean" in out
    assert f"run dir: {trained.run_dir}" in out
    assert "step_00000002" in out


def test_train_writes_metrics_config_checkpoint_and_plots(trained: TrainedRun) -> None:
    assert trained.result.code == 0, trained.result.err[-3000:]
    records = read_jsonl(trained.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["reward/mean"] <= 1.0
        assert math.isfinite(record["loss/policy"])
    saved = yaml.safe_load((trained.run_dir / "config.yaml").read_text())
    assert saved["trainer"]["num_steps"] == 2 and saved["trainer"]["run_dir"] == str(trained.run_dir)
    assert saved["objective"]["entropy_coef"] == 0.01
    checkpoints = CheckpointManager(trained.run_dir).list()
    assert [p.name for p in checkpoints] == ["step_00000002"]
    state = load_checkpoint(checkpoints[0])
    assert state.step == 2 and state.meta["config"]["trainer"]["num_steps"] == 2
    assert "model.embed_tokens.weight" in state.model  # bare names, loadable into the policy
    plots = sorted((trained.run_dir / "plots").glob("*.png"))
    assert "reward.png" in {p.name for p in plots}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in plots)
    assert read_jsonl(trained.run_dir / "samples.jsonl")


def test_plot_writes_pngs(trained: TrainedRun, tmp_path: Path) -> None:
    out_dir = tmp_path / "plots"
    result = run_cli("plot", trained.run_dir, "--out-dir", out_dir, "--smooth", "2")
    assert result.code == 0, result.err
    listed = [Path(line) for line in result.out.splitlines() if line.strip()]
    assert out_dir / "reward.png" in listed and out_dir / "loss.png" in listed
    assert sorted(listed) == sorted(out_dir.glob("*.png"))
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000 for p in listed)


def test_plot_without_metrics_is_an_error(tmp_path: Path) -> None:
    result = run_cli("plot", tmp_path)
    assert result.code == 2
    assert "metrics.jsonl" in result.err


# ---------------------------------------------------------------------------------------------- eval


@pytest.fixture
def sampled_weights(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The policy weights the sampler sees at each `sample` call."""
    from modalities.text_agent.sampler import SingleTurnSampler

    seen: list[dict[str, torch.Tensor]] = []
    original = SingleTurnSampler.sample

    def sample(self: SingleTurnSampler, policy: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v.detach().clone() for k, v in policy.module.state_dict().items()})
        return original(self, policy, *args, **kwargs)

    monkeypatch.setattr(SingleTurnSampler, "sample", sample)
    return seen


def check_eval_json(path: Path, num_rows: int, datasets: set[str]) -> dict[str, Any]:
    report = json.loads(path.read_text())
    assert set(report) == {"metadata", "per_dataset", "rows"}
    assert len(report["rows"]) == num_rows == report["metadata"]["num_rows"]
    assert set(report["per_dataset"]) == {"all", *datasets}
    for name, means in report["per_dataset"].items():
        members = [r for r in report["rows"] if name == "all" or r["dataset"] == name]
        assert members
        assert 0.0 <= means["letters"] <= 1.0
        assert means["letters"] == pytest.approx(sum(r["letters"] for r in members) / len(members), abs=1e-9)
        assert means["length"] == pytest.approx(sum(r["length"] for r in members) / len(members), abs=1e-9)
    return report


@pytest.mark.timeout(120)
def test_eval_prints_table_and_writes_json(tmp_path: Path, sampled_weights: list[dict[str, torch.Tensor]]) -> None:
    output = tmp_path / "eval.json"
    result = run_cli("eval", CONFIG, *FAST, "+eval.num_prompts=5", "+eval.batch_size=2", "--output", output)
    assert result.code == 0, result.err[-3000:]
    assert "evaluation" in result.out and "letters" in result.out and "all" in result.out
    check_eval_json(output, num_rows=5, datasets=set())  # the demo data has no "dataset" field
    assert len(sampled_weights) == 3  # ceil(5 / 2) batches


@pytest.mark.timeout(120)
def test_eval_reports_each_dataset(tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    by_set = DATA / "letters_by_set.jsonl"
    overrides = [*FAST, f"data.path={by_set}", "+eval.num_prompts=6", "+eval.num_samples=2"]
    result = run_cli("eval", CONFIG, *overrides, "--output", output)
    assert result.code == 0, result.err[-3000:]
    report = check_eval_json(output, num_rows=12, datasets={"set_a", "set_b"})
    assert sum(r["dataset"] == "set_a" for r in report["rows"]) == 6
    assert "set_a" in result.out and "set_b" in result.out


@pytest.mark.timeout(120)
def test_eval_loads_the_checkpoint_weights(
    trained: TrainedRun, tmp_path: Path, sampled_weights: list[dict[str, torch.Tensor]]
) -> None:
    checkpoint = trained.run_dir / "checkpoints" / "step_00000002"
    args = ["eval", CONFIG, *FAST, "+eval.num_prompts=2", "--output"]
    assert run_cli(*args, tmp_path / "base.json").code == 0
    result = run_cli(*args, tmp_path / "tuned.json", "--checkpoint", checkpoint)
    assert result.code == 0, result.err[-3000:]
    check_eval_json(tmp_path / "tuned.json", num_rows=2, datasets=set())
    base, tuned = sampled_weights[0], sampled_weights[-1]
    saved = load_checkpoint(checkpoint).model
    assert set(saved) == set(tuned)
    assert all(torch.equal(saved[k], tuned[k]) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # training moved the weights


@pytest.mark.timeout(120)
def test_eval_output_holds_prompts_and_completions(tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    result = run_cli("eval", CONFIG, *FAST, "+eval.num_prompts=3", "+eval.num_samples=2", "--output", output)
    assert result.code == 0, result.err[-3000:]
    report = check_eval_json(output, num_rows=6, datasets=set())
    prompts = {json.loads(line)["prompt"] for line in LETTERS.read_text().splitlines() if line.strip()}
    for row in report["rows"]:
        assert row["prompt"] in prompts and isinstance(row["completion"], str)
    assert [r["prompt"] for r in report["rows"][::2]] == [r["prompt"] for r in report["rows"][1::2]]  # 2 per prompt
    assert report["metadata"]["max_text_chars"] == 4000 and report["metadata"]["truncated_texts"] == 0


def test_eval_output_truncates_long_texts_and_says_so(tmp_path: Path) -> None:
    from toolkit.evaluation.evaluate import EvalResult, write_output

    rows = [
        {"dataset": "all", "letters": 1.0, "prompt": "p" * 5000, "completion": "é" * 4000},
        {"dataset": "all", "letters": 0.0, "prompt": "short", "completion": "c" * 4001},
    ]
    write_output(tmp_path / "eval.json", EvalResult(per_dataset={"all": {"letters": 0.5}}, rows=rows))
    report = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    long_prompt, completion = report["rows"][0]["prompt"], report["rows"][0]["completion"]
    assert long_prompt == "p" * 4000 + "…[truncated 1000 chars]" and completion == "é" * 4000
    assert report["rows"][1] == {**rows[1], "completion": "c" * 4000 + "…[truncated 1 chars]"}
    assert report["metadata"]["truncated_texts"] == 2 and "4000 characters" in report["metadata"]["note"]
    assert rows[0]["prompt"] == "p" * 5000  # the in-memory result keeps the whole text
    assert report["per_dataset"] == {"all": {"letters": 0.5}}


def test_eval_rejects_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "other")
    path = manager.save(CheckpointState(step=1, model={"encoder.conv.weight": torch.zeros(3)}))
    result = run_cli("eval", CONFIG, *FAST, "+eval.num_prompts=1", "--checkpoint", path)
    assert result.code == 2
    assert "encoder.conv.weight" in result.err


# ---------------------------------------------------------------------------------------------- score


@pytest.fixture
def letter_rows(tmp_path: Path) -> Path:
    rows = [
        {"prompt": "Write a.", "completion": "aab", "target": "a"},  # 2/3
        {"prompt": "Write b.", "completion": "b b", "target": "b"},  # spaces ignored: 2/2
        {"prompt": "Write c.", "completion": "", "target": "c"},  # empty: 0
        {"prompt": "Write d.", "completion": "<d>xd", "target": "d"},  # tags stripped: "xd" -> 1/2
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_writes_exact_scores(letter_rows: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    result = run_cli("score", "rewards.text.toy.TargetCharReward", "--input", letter_rows, "--output", output)
    assert result.code == 0, result.err
    assert "scored 4 rows" in result.err
    scored = read_jsonl(output)
    assert [r["score"] for r in scored] == pytest.approx([2 / 3, 1.0, 0.0, 0.5], abs=1e-6)
    assert [r["completion"] for r in scored] == ["aab", "b b", "", "<d>xd"]  # input fields kept, in order
    assert all(r["target"] for r in scored)


def test_score_to_stdout_with_a_yaml_reward_and_small_batches(letter_rows: Path) -> None:
    strict = DATA / "strict_letters.yaml"  # ignore_spaces: false -> "b b" scores 2/3
    result = run_cli("score", strict, "--input", letter_rows, "--batch-size", "3")
    assert result.code == 0, result.err
    scored = [json.loads(line) for line in result.out.splitlines()]
    assert [r["score"] for r in scored] == pytest.approx([2 / 3, 2 / 3, 0.0, 0.5], abs=1e-6)


def test_score_malformed_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"completion": "a", "target": "a"}\n\n{"completion": "a", "target": \n')
    result = run_cli("score", "rewards.text.toy.TargetCharReward", "--input", path)
    assert result.code == 2
    assert f"{path}:3" in result.err and "not valid JSON" in result.err
    assert result.out == ""


def test_score_missing_input_file(tmp_path: Path) -> None:
    result = run_cli("score", "rewards.text.toy.TargetCharReward", "--input", tmp_path / "missing.jsonl")
    assert result.code == 2
    assert "input file not found" in result.err and "missing.jsonl" in result.err


def test_score_unknown_reward_is_a_config_error(letter_rows: Path) -> None:
    result = run_cli("score", "rewards.text.toy.TargetCharRewrd", "--input", letter_rows)
    assert_config_error(result, "TargetCharRewrd", "did you mean 'TargetCharReward'")


# ---------------------------------------------------------------------------------------------- merge


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    base.mkdir()
    tuned.mkdir()
    save_file({"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "step": torch.tensor([7])}, str(base / "model.safetensors"))
    save_file({"w": torch.tensor([2.0, -2.0, 5.0, 7.0]), "step": torch.tensor([7])}, str(tuned / "model.safetensors"))
    (tuned / "config.json").write_text('{"model_type": "toy"}')
    return base, tuned


@pytest.mark.parametrize(
    ("density", "scale", "expected_w"),
    [
        ("1", "1", [2.0, -2.0, 5.0, 7.0]),  # equals tuned
        # Δ = [1, -4, 2, 3]; density 0.5 keeps the 2 largest |Δ| (-4 and 3), scaled by 0.5.
        ("0.5", "0.5", [1.0, 0.0, 3.0, 5.5]),
    ],
)
def test_merge(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, density: str, scale: str, expected_w: list[float]
) -> None:
    base, tuned = two_checkpoints
    out = tmp_path / "merged"
    result = run_cli("merge", base, tuned, out, "--density", density, "--scale", scale)
    assert result.code == 0, result.err
    assert str(out) in result.out
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["w"], torch.tensor(expected_w))
    assert torch.equal(merged["step"], torch.tensor([7]))
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'


def test_merge_missing_checkpoint_is_an_error(two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = two_checkpoints
    result = run_cli("merge", base, tmp_path / "absent", tmp_path / "out", "--density", "1")
    assert result.code == 2
    assert "absent" in result.err


def test_summary_table_lists_reward_components_and_averages_finite_values() -> None:
    from toolkit.cli import summary_keys
    from toolkit.io.console import mean_records

    record = {"reward/mean": 1.0, "reward/em": 0.5, "reward/em/nan_frac": 0.0, "agent/tool_calls_mean": 1.0}
    keys = summary_keys(record)
    assert keys[:2] == ["reward/mean", "reward/em"] and "reward/em/nan_frac" not in keys
    assert "agent/tool_calls_mean" in keys
    mean = mean_records([{"a": 1.0, "b": float("nan")}, {"a": 3, "b": 2.0, "c": "text"}])
    assert mean == {"a": 2.0, "b": 2.0}


def test_version_comes_from_the_installed_metadata() -> None:
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.code == 0 and result.out.strip() == f"renorm {version('renorm')}"


def test_hydra_target_gets_a_hint(tmp_path: Path) -> None:
    result = run_cli("train", CONFIG, *FAST, f"trainer.run_dir={tmp_path}", "+normalizer._target_=x.Y")
    assert result.code == 2 and "normalizer._target_: Hydra's _target_ is spelled _component_ here" in result.err


def test_the_renorm_command_closes_the_process_group_that_main_keeps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`entry` (the `renorm` script, `python -m toolkit.cli`) destroys a distributed run's process group before the
    interpreter exits; `main` leaves it to callers that run several commands under one launch."""
    import torch.distributed as dist

    from toolkit import cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(sys, "argv", ["renorm", "--version"])
        with pytest.raises(SystemExit):
            cli.main()  # --version exits through argparse
        assert dist.is_initialized()
        monkeypatch.setattr(cli, "main", lambda: 0)
        assert cli.entry() == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
