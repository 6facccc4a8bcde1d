"""Tests for toolkit.io.plotting: per-family PNGs, smoothing, comparisons and error messages."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.io.logging import MetricsLogger
from toolkit.io.plotting import group_metrics, moving_average, plot_compare, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make_run(run_dir: Path, steps: int = 20, reward_scale: float = 1.0) -> None:
    with MetricsLogger(run_dir) as logger:
        for step in range(1, steps + 1):
            logger.log(
                step,
                {
                    "reward/mean": reward_scale * (1 - math.exp(-step / 5)),
                    "reward/accuracy": step / steps,
                    "loss/policy": -0.1 * step,
                    "loss/kl": 1e-3 * step if step != 4 else math.nan,
                    "policy/clip_frac": 0.05,
                    "rollout/length_mean": 10.0 + step,
                    "rollout/truncated_frac": 0.0,
                    "time/step_s": 1.5,
                    "advantage/mean": math.nan,  # present but never finite -> no advantage.png
                },
            )


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))


def test_plot_run_writes_expected_families(tmp_path: Path) -> None:
    _make_run(tmp_path)
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["reward.png", "kl.png", "clip.png", "length.png", "loss.png", "time.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)
    for path in written:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)
    assert not (tmp_path / "plots" / "advantage.png").exists()
    assert not (tmp_path / "plots" / "normalizer.png").exists()


def test_png_is_a_real_image(tmp_path: Path) -> None:
    from matplotlib.image import imread

    _make_run(tmp_path)
    (path,) = [p for p in plot_run(tmp_path, out_dir=tmp_path / "out", smooth=3) if p.name == "reward.png"]
    image = imread(path)
    assert image.shape[:2] == (450, 800)
    assert image.std() > 0.01  # not a blank canvas


def test_group_metrics_membership() -> None:
    records = [
        {"step": 1, "loss/kl": 0.1, "loss/policy": 1.0, "policy/approx_kl": 0.2, "normalizer/alpha": 2.0},
        {"step": 2, "optim/grad_norm": 3.0, "optim/lr": 1e-5, "policy/entropy": 1.2, "other/x": 1.0},
    ]
    groups = group_metrics(records)
    assert groups == {
        "kl": ["loss/kl", "policy/approx_kl"],
        "normalizer": ["normalizer/alpha"],
        "loss": ["loss/kl", "loss/policy"],
        "entropy": ["policy/entropy"],
        "optim": ["optim/grad_norm", "optim/lr"],
    }


def test_moving_average_oracle() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    out = moving_average([1.0, math.nan, 3.0, 5.0], 2)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2:] == [2.0, 4.0]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError, match="smooth/window"):
        moving_average([1.0], 0)


def test_missing_metrics_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        plot_run(tmp_path)


def test_empty_metrics_file_names_path(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl holds no metric records"):
        plot_run(tmp_path)


def test_bad_smooth_rejected(tmp_path: Path) -> None:
    _make_run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="smooth"):
        plot_run(tmp_path, smooth=0)


def test_plot_compare(tmp_path: Path) -> None:
    _make_run(tmp_path / "grpo")
    _make_run(tmp_path / "dler", reward_scale=0.5)
    out = plot_compare([tmp_path / "grpo", tmp_path / "dler"], "reward/mean", tmp_path / "cmp" / "reward.png")
    assert out == tmp_path / "cmp" / "reward.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="2 labels for 1 run"):
        plot_compare([tmp_path / "grpo"], "reward/mean", tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match=r"no finite 'reward/men'.*reward/mean"):
        plot_compare([tmp_path / "grpo"], "reward/men", tmp_path / "x.png")


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, toolkit.io.logging, toolkit.io.plotting; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_mixed_scale_families_get_one_panel_per_key(tmp_path: Path) -> None:
    from matplotlib.image import imread

    _make_run(tmp_path)
    paths = {p.name: p for p in plot_run(tmp_path)}
    length_png = imread(paths["length.png"])  # rollout/length_mean and rollout/truncated_frac: two panels
    reward_png = imread(paths["reward.png"])  # two reward keys overlaid on one axes
    assert reward_png.shape[:2] == (450, 800)
    assert length_png.shape[:2] == (540, 800)
