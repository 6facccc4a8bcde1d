"""`renorm data list|prepare`, the `renorm.datasets` registry, and the hint a missing `data/NAME/...` file gets.

The registry test holds every registered preparer (any modality) to the shared contract. A recipe whose data is
missing must fail while its config is validated, before any policy is built, naming the command that writes it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

import toolkit.io.prepare as prepare_module
from toolkit.cli import main
from toolkit.config import load_config
from toolkit.evaluation import evaluate
from toolkit.io.datasets import check_data_paths, load_records
from toolkit.io.prepare import atomic_output, describe, prepare_hint, registered, write_jsonl
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[3]
DEEPSCALER = ROOT / "tests" / "data" / "upstream" / "deepscaler" / "deepscaler.json"
DLER = ROOT / "configs" / "text_reasoning" / "dler_r1-distill-1.5b.yaml"
TEXT_DATASETS = {"deepscaler", "math", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench"} | {
    "nq", "hotpotqa", "triviaqa", "popqa", "2wikimultihopqa", "musique", "bamboogle", "wiki18", "wiki18-e5"
}  # fmt: skip


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_every_registered_preparer_follows_the_contract() -> None:
    points = registered()
    assert set(points) >= TEXT_DATASETS, f"missing: {sorted(TEXT_DATASETS - set(points))}"
    for name, point in points.items():
        assert name == name.lower() and all(c.isalnum() or c in "-_" for c in name), name
        preparer = point.load()
        module, _, function = point.value.partition(":")
        assert module.startswith("modalities.") and module.endswith(".prepare"), point.value
        assert function == f"prepare_{name.replace('-', '_')}", point.value
        parameters = inspect.signature(preparer).parameters
        assert list(parameters)[:1] == ["out"], name
        assert [(k, p.kind) for k, p in parameters.items() if k != "out"] == [
            ("source", inspect.Parameter.KEYWORD_ONLY),
            ("limit", inspect.Parameter.KEYWORD_ONLY),
        ], name
        assert parameters["source"].default is None, f"{name}: no --source must mean the upstream default"
        limit = parameters["limit"].default  # None = all rows (a very large corpus may default to a sample)
        assert limit is None or (isinstance(limit, int) and limit > 0), name
        assert describe(preparer), f"{name}: the docstring's first line is what `renorm data list` prints"


def test_data_list_prints_each_name_with_its_description() -> None:
    code, out, _ = run_cli("data", "list")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) >= TEXT_DATASETS
    assert "agentica-org/DeepScaleR-Preview-Dataset" in lines["deepscaler"]
    assert "RUC-NLPIR/FlashRAG_datasets" in lines["nq"]


def test_data_prepare_writes_under_out(tmp_path: Path) -> None:
    out = tmp_path / "data" / "deepscaler"
    code, stdout, stderr = run_cli("data", "prepare", "deepscaler", "--out", str(out), "--source", str(DEEPSCALER))
    assert code == 0, stderr
    assert stdout.split() == [str(out / "train.jsonl")] and "wrote 1 file(s)" in stderr
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in rows] == ["100", "\\frac{3}{4}", "6"]

    code, _, _ = run_cli(
        "data", "prepare", "deepscaler", "--out", str(out), "--source", str(DEEPSCALER), "--limit", "1"
    )
    assert code == 0 and len((out / "train.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_data_prepare_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    code, _, err = run_cli("data", "prepare", "deepscaller", "--out", str(tmp_path))
    assert code == 2 and "unknown dataset 'deepscaller'; known datasets: " in err and "deepscaler" in err
    code, _, err = run_cli("data", "prepare", "deepscaler", "--out", str(tmp_path), "--limit", "0")
    assert code == 2 and "limit must be >= 1" in err
    code, _, err = run_cli("data", "prepare", "nq", "--out", str(tmp_path), "--source", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err


def test_prepare_hint_names_the_command_for_the_data_name_convention() -> None:
    assert prepare_hint("data/deepscaler/train.jsonl") == (
        "; `renorm data prepare deepscaler --out data/deepscaler` writes it"
    )
    assert prepare_hint("/srv/runs/data/nq/test.jsonl").endswith("--out /srv/runs/data/nq` writes it")
    assert prepare_hint("data/my_own/train.jsonl") == "" and prepare_hint("deepscaler/train.jsonl") == ""


def test_missing_prepared_file_names_its_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/math500/test.jsonl; `renorm data prepare math500 --out data/"):
        load_records("data/math500/test.jsonl")
    # "data/nq" is shaped like a hub id: still a missing folder of the convention, and nothing is fetched.
    with pytest.raises(FileNotFoundError, match=r"not found: data/nq; `renorm data prepare nq --out data/nq`"):
        load_records("data/nq")
    with pytest.raises(FileNotFoundError, match=r"^data file or folder not found: elsewhere/x.jsonl$"):
        load_records("elsewhere/x.jsonl")
    node = {"_component_": "x", "paths": {"MATH": "data/math500/test.jsonl"}}
    with pytest.raises(FileNotFoundError, match=r"^eval.data.paths.MATH: .*renorm data prepare math500"):
        check_data_paths(node, "eval.data")
    check_data_paths({"paths": ["agentica-org/DeepScaleR-Preview-Dataset"]}, "data")  # a hub id: the loader's job


def exploding_policy(**kwargs: Any) -> None:
    raise AssertionError("the policy was built although the data file is missing")


def test_recipe_with_missing_data_fails_before_the_policy_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no data/ here
    config = load_config(DLER, [f"trainer.run_dir={tmp_path / 'run'}"])
    config["policy"] = {"_component_": f"{__name__}.exploding_policy", "model": "never/loaded"}
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        build_trainer(config)
    assert str(error.value) == (
        "data.paths.deepscaler: data file or folder not found: data/deepscaler/train.jsonl; "
        "`renorm data prepare deepscaler --out data/deepscaler` writes it"
    )
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()
    code, _, err = run_cli("config", str(DLER), "--validate")
    assert code == 2 and "renorm data prepare deepscaler --out data/deepscaler" in err


def test_eval_with_missing_eval_data_fails_before_the_policy_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(DLER, [f"trainer.run_dir={tmp_path / 'run'}"])
    config["policy"] = {"_component_": f"{__name__}.exploding_policy", "model": "never/loaded"}
    with pytest.raises(FileNotFoundError, match=r"^eval.data.paths.MATH: .*renorm data prepare math500"):
        evaluate(config)


def test_no_limit_leaves_the_preparers_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without --limit a preparer keeps its own default (OpenWebText: not all 8M documents)."""
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(prepare_module, "load_preparer", lambda name: lambda out, **kw: seen.append(kw) or [])
    prepare_module.prepare_dataset("openwebtext", tmp_path)
    prepare_module.prepare_dataset("openwebtext", tmp_path, limit=7)
    assert seen == [{"source": None}, {"source": None, "limit": 7}]


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl(target, [{"a": 1}, {"a": "é"}]) == 2
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"a": "é"}\n'
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_output(target) as handle:
        handle.write("partial")
        raise RuntimeError("disk on fire")
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"a": "é"}\n'
    assert [p.name for p in target.parent.iterdir()] == ["rows.jsonl"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_output(target, "a"):
        pass
