"""`renorm data prepare medvidbench | medvidbench-percentiles`: upstream-layout fixtures in, MedGRPO recipes read.

The fixture JSONs (tests/data/upstream/medvidbench) are the release's SFT layout; the frames and the mp4 they name are
generated here with the synthetic set's renderer, the test frames packed in a `testdata.zip` rooted one folder higher
than the JSON's paths (as a release archive may be). Each test writes to `data/NAME` in a fresh working directory, so
the recipes' relative paths resolve unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from modalities.medical_video.prepare import prepare_medvidbench, prepare_medvidbench_percentiles
from modalities.medical_video.synthetic import render_frames, write_mp4
from modalities.medical_video.video import VideoConfig, load_video
from toolkit.config import instantiate, load_config

ROOT = Path(__file__).resolve().parents[3]
UPSTREAM = ROOT / "tests" / "data" / "upstream"
RECIPES = ROOT / "configs" / "medical_video"
RECIPE = "medgrpo_qwen2.5-vl-7b.yaml"


def recipe_node(name: str, *keys: str | int) -> Any:
    node: Any = load_config(RECIPES / name)
    for key in keys:
        node = node[key]
    return instantiate(node, where=".".join(map(str, keys)))


def fake_frame(seed: int) -> Image.Image:
    frame = render_frames([[seed % 8, 4, seed % 8 + 10, 14]], 32, (200, 40 + seed, 40))[0]
    return Image.fromarray(frame)


def upstream_source(tmp_path: Path) -> Path:
    """The fixture JSONs plus the media they name: train frames as files, test frames in testdata.zip."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("cleaned_test_data_11_04.json", "train.json"):
        shutil.copy(UPSTREAM / "medvidbench" / name, source / name)
    train = json.loads((source / "train.json").read_text())
    for k, record in enumerate(train):
        if isinstance(record["video"], str):
            (source / record["video"]).parent.mkdir(parents=True, exist_ok=True)
            frames = render_frames([[2 * t, 4, 2 * t + 10, 14] for t in range(4)], 32, (40, 80, 200))
            write_mp4(source / record["video"], frames, fps=1.0)
            continue
        for t, frame in enumerate(record["video"]):
            (source / frame).parent.mkdir(parents=True, exist_ok=True)
            fake_frame(k + t).save(source / frame)
    test = json.loads((source / "cleaned_test_data_11_04.json").read_text())
    with zipfile.ZipFile(source / "testdata.zip", "w") as archive:
        for k, record in enumerate(test):
            for t, frame in enumerate(record["video"]):
                image = tmp_path / "frame.png"
                fake_frame(10 * k + t).save(image)
                archive.write(image, f"testdata/{frame}")
    return source


def test_medvidbench_writes_what_the_medgrpo_recipes_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = upstream_source(tmp_path)
    monkeypatch.chdir(tmp_path)
    written = prepare_medvidbench(Path("data/medvidbench"), source=str(source))
    assert [p.as_posix() for p in written] == ["data/medvidbench/test.json", "data/medvidbench/train.json",
                                               "data/medvidbench/media"]  # fmt: skip
    upstream = json.loads((source / "train.json").read_text())
    for recipe in (RECIPE, "no_norm_baseline.yaml"):
        data = recipe_node(recipe, "data")
        assert sorted(row["task"] for row in data.rows) == ["rc", "stg", "tal", "vs"]  # next_action is not an RL task
    rows = {row["task"]: row for row in data.rows}
    assert rows["tal"]["prompt"] == "When does the suturing happen in this AVOS clip?"
    assert rows["tal"]["answer"] == "1.0-3.0 seconds." and rows["tal"]["fps"] == 1.0
    assert rows["rc"]["rc_info"] == {"start_frame": 1, "start_frame_bbox": [8, 6, 24, 22]}
    assert rows["vs"]["dataset"] == "NurViD" and rows["stg"]["struc_info"]["bbox_dict"]["1.0"] == [4, 4, 14, 14]
    for frame, original in zip(rows["stg"]["video"], upstream[1]["video"], strict=True):
        assert Path(frame).absolute().is_relative_to(tmp_path / "data" / "medvidbench" / "media")
        assert os.path.samefile(frame, source / original)  # linked, not copied
    video = load_video(rows["tal"]["video"], VideoConfig(fps=1.0, min_pixels=784, max_pixels=1024))
    assert video.frames.shape[0] >= 2  # the mp4 decodes through the recipe's video path

    test_rows = recipe_node(RECIPE, "eval", "data").rows
    assert [row["task"] for row in test_rows] == ["tal", "rc", "stg"]  # shuffle: false keeps file order
    assert all(row["answer"] is None for row in test_rows)  # the public release has questions only
    assert test_rows[0]["prompt"].startswith("You are an expert in surgical video analysis.")
    assert test_rows[1]["rc_info"]["start_frame_bbox"] == [4, 4, 20, 24]
    with zipfile.ZipFile(source / "testdata.zip") as archive:
        member = archive.read("testdata/frames/AVOS/kcOqlifSukA_22425_25124/000002.jpg")
    assert Path(test_rows[0]["video"][1]).read_bytes() == member  # extracted from the zip


def test_medvidbench_limit_and_missing_media(tmp_path: Path) -> None:
    source = upstream_source(tmp_path)
    test_file, train_file, _ = prepare_medvidbench(tmp_path / "out", source=str(source), limit=1)
    assert len(json.loads(test_file.read_text())) == len(json.loads(train_file.read_text())) == 1
    (source / "testdata.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"11 of the 26 frames/videos .*\(first: \['frames/AVOS/kcOq"):
        prepare_medvidbench(tmp_path / "out2", source=str(source))
    assert not (tmp_path / "out2" / "train.json").exists()  # everything is found before anything is written


def test_medvidbench_rejects_a_source_without_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="UII-AI/MedVidBench.*--source"):  # offline (conftest): no download
        prepare_medvidbench(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cleaned_test_data_11_04.json"):
        prepare_medvidbench(tmp_path / "out", source=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "<video>\nQ"}]}]))
    with pytest.raises(ValueError, match=r"train\.json, record 0: malformed MedVidBench record"):
        prepare_medvidbench(tmp_path / "out", source=str(bad))
    evil = tmp_path / "evil"
    shutil.copytree(UPSTREAM / "medvidbench", evil)
    with zipfile.ZipFile(evil / "testdata.zip", "w") as archive:
        archive.writestr("../escape.jpg", b"x")
    with pytest.raises(ValueError, match="refusing the member '../escape.jpg'"):
        prepare_medvidbench(tmp_path / "out", source=str(evil))


def test_percentile_table_from_sft_predictions_feeds_the_recipe_transform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    predictions = str(UPSTREAM / "medvidbench-percentiles" / "results.json")
    (written,) = prepare_medvidbench_percentiles(Path("data/medvidbench-percentiles"), source=predictions)
    assert written.as_posix() == "data/medvidbench-percentiles/percentile_table.json"
    table = recipe_node(RECIPE, "transforms", 0).table  # LogisticDatasetNorm loads the recipe's table path
    # TAL x = IoU with the one ground-truth span (0 when unparsable); linear percentiles computed by hand.
    expected = {
        ("AVOS", "tal"): (0.1875, 0.375, 0.625),  # x = 1, 0.5, 0.25, 0
        ("CholecT50", "tal"): (0.625, 0.75, 0.875),  # x = 1, 0.5
        ("AVOS", "nap"): (0.25, 0.5, 0.75),  # x = 1, 0
    }
    assert set(table.pairs) == set(expected)
    for pair, values in expected.items():
        stats = table.pairs[pair]
        assert (stats.p25, stats.p50, stats.p75) == pytest.approx(values)
    tal = table.tasks["tal"]
    assert (tal.p25, tal.p50, tal.p75) == pytest.approx((0.3125, 0.5, 0.875))  # the pooled fallback entry
    (limited,) = prepare_medvidbench_percentiles(tmp_path / "few", source=predictions, limit=2)
    assert set(json.loads(limited.read_text())["pairs"]) == {"AVOS"}
    with pytest.raises(ValueError, match="--source"):
        prepare_medvidbench_percentiles(tmp_path / "none")


def test_registered_under_renorm_datasets() -> None:
    points = {point.name: point for point in entry_points(group="renorm.datasets")}
    assert (
        points["medvidbench"].load() is prepare_medvidbench
        and points["medvidbench-percentiles"].load() is prepare_medvidbench_percentiles
    )
