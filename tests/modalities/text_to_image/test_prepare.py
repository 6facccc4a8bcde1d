"""`renorm data prepare pickscore | unigenbench`: upstream-layout fixtures in, the recipes' own data nodes read them.

Each test runs in a fresh working directory and writes to `data/NAME`, so the recipe's relative paths resolve
unchanged: the files land exactly where the shipped YAML looks for them.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from modalities.text_to_image.prepare import prepare_pickscore, prepare_unigenbench
from toolkit.cli import main
from toolkit.config import instantiate, load_config
from toolkit.io.prepare import describe

ROOT = Path(__file__).resolve().parents[3]
UPSTREAM = ROOT / "tests" / "data" / "upstream"
RECIPES = ROOT / "configs" / "text_to_image"


def recipe_data(name: str, *keys: str) -> Any:
    """The object a recipe's node (e.g. "data" or "eval", "evaluator") builds, from the current directory."""
    node: Any = load_config(RECIPES / name)
    for key in keys:
        node = node[key]
    return instantiate(node, where=".".join(keys))


def test_pickscore_writes_what_the_flow_grpo_recipe_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    written = prepare_pickscore(Path("data/pickscore"), source=str(UPSTREAM / "pickscore"))
    assert [p.as_posix() for p in written] == ["data/pickscore/train.txt", "data/pickscore/test.txt"]
    data = recipe_data("flow_grpo_sd3.5_pickscore.yaml", "data")
    prompts = [record["prompt"] for record in data.records]
    upstream = (UPSTREAM / "pickscore" / "train.txt").read_text().splitlines()
    assert prompts == [line.strip() for line in upstream]  # flow_grpo strips each line
    assert prompts[3] == "portrait of a robot gardener watering tulips,   studio lighting , 35mm,"
    assert [record["id"] for record in data.records] == [str(i) for i in range(6)]
    assert Path("data/pickscore/test.txt").read_text().splitlines()[2] == "an astronaut reading a newspaper on the moon"


def test_pickscore_limit_and_a_clone_root_as_source(tmp_path: Path) -> None:
    clone = tmp_path / "flow_grpo"
    (clone / "dataset" / "pickscore").mkdir(parents=True)
    for name in ("train.txt", "test.txt"):
        (clone / "dataset" / "pickscore" / name).write_text((UPSTREAM / "pickscore" / name).read_text())
    train, test = prepare_pickscore(tmp_path / "out", source=str(clone), limit=2)
    assert len(train.read_text().splitlines()) == 2 and len(test.read_text().splitlines()) == 2
    assert train.read_text().startswith("a watercolor fox curled up asleep")


def test_unigenbench_writes_what_pref_grpo_and_the_baseline_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    written = prepare_unigenbench(Path("data/unigenbench"), source=str(UPSTREAM / "unigenbench"))
    assert sorted(p.name for p in written) == ["test_prompts_en.csv", "train_prompt.txt"]
    for recipe in ("pref_grpo_flux.yaml", "score_grpo_baseline.yaml"):
        prompts = [record["prompt"] for record in recipe_data(recipe, "data").records]
        assert len(prompts) == 4 and prompts[1].startswith("Please draw three owls")
    evaluator = recipe_data("pref_grpo_flux.yaml", "eval", "evaluator")  # loads the CSV as `renorm unigenbench` does
    assert [p.index for p in evaluator.prompts] == [0, 1, 2]
    assert evaluator.prompts[2].prompt.endswith('the word "OPEN" written on the glass.')
    assert evaluator.prompts[1].testpoints == [
        "Attribute - Quantity",
        "Attribute - Color",
        "Relationship - Interaction",
    ]
    assert evaluator.prompts[0].categories["Primary Categories"] == "Creative Divergence"


def test_unigenbench_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    captions, csv_file = prepare_unigenbench(tmp_path, source=str(UPSTREAM / "unigenbench" / "data"), limit=1)
    assert captions.read_text().count("\n") == 1
    lines = csv_file.read_text().splitlines()
    assert lines[0] == "index,prompt_en,sub_dims_en" and lines[1].startswith("0,") and len(lines) == 2


def test_a_source_without_the_upstream_layout_fails_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.txt").write_text("a cat\n")
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        prepare_pickscore(tmp_path / "out", source=str(tmp_path / "src"))
    (tmp_path / "src" / "train_prompt.txt").write_text("a cat\n")
    (tmp_path / "src" / "test_prompts_en.csv").write_text("index,prompt\n0,a cat\n")
    with pytest.raises(ValueError, match="sub_dims_en"):
        prepare_unigenbench(tmp_path / "out", source=str(tmp_path / "src"))
    assert not (tmp_path / "out").exists()  # nothing written from a bad source


def test_offline_default_source_fetches_nothing_and_names_the_way_out(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1: the download manager must refuse, and the error must say what to pass.
    with pytest.raises(FileNotFoundError, match="--source"):
        prepare_pickscore(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_registered_and_run_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    points = {point.name: point for point in entry_points(group="renorm.datasets")}
    assert points["pickscore"].load() is prepare_pickscore and points["unigenbench"].load() is prepare_unigenbench
    out = tmp_path / "data" / "pickscore"
    argv = ["data", "prepare", "pickscore", "--out", str(out), "--source", str(UPSTREAM / "pickscore"), "--limit", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "train.txt"), str(out / "test.txt")]
    assert (out / "train.txt").read_text().splitlines()[2] == "A cup of coffee next to an open notebook"
    assert describe(prepare_unigenbench).startswith("UniGenBench prompts: train_prompt.txt (9,999 training captions)")
