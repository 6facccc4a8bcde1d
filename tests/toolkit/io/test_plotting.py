"""Tests for toolkit.io.plotting: the layout rules (series per axes, duplicates, zeros, diagnostics apart, headline
families, overview), smoothing, run overlays and error messages. Layouts are checked on the matplotlib Figure objects
(`build_figures`) and the pure plans (`plan_figures`), not by image diffs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from toolkit.cli import main
from toolkit.io.logging import MetricsLogger
from toolkit.io.plot_layout import (
    MAX_SERIES_PER_AXES,
    auto_ema_alpha,
    exponential_moving_average,
    group_metrics,
    is_diagnostic,
    moving_average,
)
from toolkit.io.plotting import (
    build_figures,
    make_smoother,
    metric_table,
    plan_figures,
    plot_compare,
    plot_run,
    plot_runs,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMPONENTS = [f"reward/c{i}" for i in range(9)]  # 9 reward components: more than fit one axes
DIAGNOSTICS = ["reward/em/nan_frac", "reward/format/valid_rate", "reward/judge/failures", "reward_stats/nonfinite"]
ALWAYS_ZERO = ["loss/kl", "reward/em/prompts_without_example", "policy/clip_frac_high"]


def _record(step: int, steps: int, scale: float) -> dict[str, float]:
    """The metric families of the text-agent demo, with its pathologies: duplicates, always-zero series, counts."""
    reward = scale * (1 - math.exp(-step / 5)) + 0.01 * math.sin(step)
    record = {
        "reward/mean": reward,
        "reward/score": reward,  # identical to reward/mean at every step
        "reward/score_mean": reward,
        **{key: (i + 1) / 10 * reward + 0.001 * i * step for i, key in enumerate(COMPONENTS)},
        "reward/em/nan_frac": 0.1 * (step % 3),
        "reward/format/valid_rate": 1 - 0.01 * (step % 4),
        "reward/judge/failures": float(step % 5 + 2),
        "reward_stats/nonfinite": float(step % 2),
        "agent/turns_mean": 2.0 - 0.01 * step,
        "agent/tool_calls_mean": 1.0 + 0.01 * step,
        "agent/invalid_action_rate": 0.5 / step,
        "advantage/mean": 1e-8 * math.cos(step),
        "advantage/std": 0.8 + 0.01 * math.sin(step),
        "advantage/illusory_frac": 0.25 + 0.05 * math.sin(step),
        "policy/approx_kl": 1e-3 / step,
        "policy/clip_frac": 0.01 * (step % 3),
        "rollout/length_mean": 10.0 + step,
        "rollout/truncated_frac": 0.1,
        "optim/grad_norm": 1.0 + 0.1 * math.cos(step),
        "time/step_s": 1.5,
        "normalizer/zero_variance_groups": 0.25,
        "normalizer/zero_variance_groups_count": 2.0,
        **dict.fromkeys(ALWAYS_ZERO, 0.0),
    }
    if step == 4:
        record["policy/approx_kl"] = math.nan
    if step % 5 == 0:  # evaluation every 5 steps
        record |= {"eval/accuracy": step / steps, "eval/length": 100.0 - step, "eval/judge/failure_rate": 0.0}
    return record


def _make_run(run_dir: Path, steps: int = 20, scale: float = 1.0) -> None:
    with MetricsLogger(run_dir) as logger:
        for step in range(1, steps + 1):
            logger.log(step, _record(step, steps, scale))


def _records(steps: int = 20, scale: float = 1.0) -> list[dict[str, Any]]:
    return [{"step": step, **_record(step, steps, scale)} for step in range(1, steps + 1)]


def _lines(ax: Axes) -> list[Line2D]:
    """The labelled (legend) lines of an axes; faint raw curves are labelled "_raw"."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _plans(*runs: list[dict[str, Any]]) -> dict[str, Any]:
    named = {f"run{i}": records for i, records in enumerate(runs)}
    return {plan.stem: plan for plan in plan_figures(metric_table(named), list(named))}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))


# ------------------------------------------------------------------------------------------------- layout rules


def test_at_most_six_distinct_colours_per_axes() -> None:
    figures = build_figures({"run": _records()})
    for stem, fig in figures.items():
        for ax in fig.axes:
            lines = _lines(ax)
            assert 1 <= len(lines) <= MAX_SERIES_PER_AXES, (stem, [line.get_label() for line in lines])
            colors = [line.get_color() for line in lines]
            assert len(set(colors)) == len(colors), (stem, colors)  # no repeating colour cycle within an axes
    # 9 components + mean: the reward family is split over two axes of 5, none over 6
    reward_axes = figures["reward"].axes
    assert [len(_lines(ax)) for ax in reward_axes] == [5, 5]


def test_a_family_too_large_for_one_axes_is_split_by_a_shared_name_part() -> None:
    """MedGRPO's per-(dataset, task) normalization: 2 datasets x 4 tasks x raw/normalized = 16 series. By dataset
    (8 per axes) does not fit; by task does: each axes compares both datasets' raw and normalized reward of one task,
    titled with the shared parts and labelled by the others. Without the always-zero raw series, by dataset fits."""
    datasets, tasks = ("Endo", "Lap"), ("tal", "stg", "vs", "rc")
    keys = [f"dataset_norm/{d}:{task}/{kind}" for d in datasets for task in tasks for kind in ("raw", "normalized")]

    def panels(zero: set[str]) -> list[Any]:
        records = [
            {"step": s, **{k: 0.0 if k in zero else 0.1 * s + 0.01 * i for i, k in enumerate(keys)}}
            for s in range(1, 6)
        ]
        [plan] = [p for p in plan_figures(metric_table({"run": records}), ["run"]) if p.stem == "dataset_norm"]
        return list(plan.panels)

    by_task = panels(set())
    assert [panel.title for panel in by_task] == [f"dataset_norm/*:{task}/*" for task in tasks]
    assert by_task[0].labels == ("Endo · raw", "Endo · normalized", "Lap · raw", "Lap · normalized")
    by_dataset = panels({f"dataset_norm/{d}:{task}/raw" for d in datasets for task in ("tal", "stg")})
    assert [panel.title for panel in by_dataset] == ["dataset_norm/Endo:*/*", "dataset_norm/Lap:*/*"]
    assert by_dataset[0].labels == (
        "tal · normalized",
        "stg · normalized",
        "vs · raw",
        "vs · normalized",
        "rc · raw",
        "rc · normalized",
    )


def test_legends_sit_outside_the_data() -> None:
    fig = build_figures({"run": _records()})["reward"]
    fig.draw_without_rendering()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # right of the axes, not over the data


def test_duplicates_merged_and_always_zero_series_dropped() -> None:
    plans = _plans(_records())
    drawn = [key for plan in plans.values() for panel in plan.panels for key in panel.keys]
    assert "reward/mean" in drawn
    assert "reward/score" not in drawn and "reward/score_mean" not in drawn
    for key in ALWAYS_ZERO:
        assert key not in drawn
    fig = build_figures({"run": _records()})["reward"]
    labels = [line.get_label() for ax in fig.axes for line in _lines(ax)]
    assert "mean\n(= score, score_mean)" in labels  # the merged duplicates are named in the legend
    assert len(labels) == len(set(labels)) == 10
    note = build_figures({"run": _records()})["kl"].get_supxlabel()
    assert "always 0, not drawn: loss/kl" in note


def test_diagnostics_on_their_own_axes() -> None:
    plans = _plans(_records())
    for plan in plans.values():
        for panel in plan.panels:
            kinds = {is_diagnostic(key) for key in panel.keys}
            assert len(kinds) == 1, (plan.stem, panel.keys)  # never a diagnostic next to a reward or value
    reward_keys = {key for panel in plans["reward"].panels for key in panel.keys}
    assert reward_keys == {"reward/mean", *COMPONENTS}
    diagnostics = [panel.keys for panel in plans["reward_diagnostics"].panels]
    # bounded in [0, 1] -> a "fraction" axes (reward_stats/nonfinite is 0 or 1 here); unbounded -> "count"
    fractions = ("reward/em/nan_frac", "reward/format/valid_rate", "reward_stats/nonfinite")
    assert diagnostics == [fractions, ("reward/judge/failures",)]
    assert {key for keys in diagnostics for key in keys} == set(DIAGNOSTICS)
    assert [panel.ylabel for panel in plans["reward_diagnostics"].panels] == ["fraction", "count"]


def test_eval_agent_and_illusory_advantage_are_plotted() -> None:
    plans = _plans(_records())
    assert [panel.keys for panel in plans["eval"].panels] == [("eval/accuracy",), ("eval/length",)]  # scales apart
    assert {key for panel in plans["agent"].panels for key in panel.keys} == {
        "agent/turns_mean",
        "agent/tool_calls_mean",
        "agent/invalid_action_rate",
    }
    advantage = {panel.keys: panel.ylabel for panel in plans["advantage"].panels}
    assert advantage[("advantage/illusory_frac",)] == "fraction"
    eval_fig = build_figures({"run": _records()})["eval"]
    (accuracy,) = _lines(eval_fig.axes[0])
    assert list(accuracy.get_xdata()) == [5, 10, 15, 20]  # eval points only, no gaps in between


def test_overview_holds_the_headline_panels() -> None:
    overview = _plans(_records())["overview"]
    keys = [panel.keys for panel in overview.panels]
    assert keys == [
        ("reward/mean",),
        ("eval/accuracy",),
        ("eval/length",),
        ("policy/approx_kl",),  # loss/kl is always 0: no panel, named in the note
        ("rollout/length_mean",),
        ("policy/clip_frac",),
        ("optim/grad_norm",),
    ]
    assert overview.columns == 2
    assert any("loss/kl" in note for note in overview.notes)
    # many eval metrics (of many scales): at most 2 eval panels, the headline panels after them still there
    many = [{**r, **{f"eval/m{i}": 10.0**i for i in range(8)}} for r in _records()]
    keys = [panel.keys for panel in _plans(many)["overview"].panels]
    assert sum(key.startswith("eval/") for panel in keys for key in panel) <= 2 * MAX_SERIES_PER_AXES
    assert len([panel for panel in keys if panel[0].startswith("eval/")]) == 2
    assert keys[-1] == ("optim/grad_norm",)


def test_plot_run_writes_overview_and_family_pngs(tmp_path: Path) -> None:
    _make_run(tmp_path)
    written = plot_run(tmp_path)
    names = [p.name for p in written]
    assert names[0] == "overview.png"
    for name in ("reward.png", "reward_diagnostics.png", "eval.png", "agent.png", "advantage.png", "kl.png"):
        assert name in names
    assert all(p.parent == tmp_path / "plots" for p in written)
    for path in written:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)


def test_png_is_a_real_image(tmp_path: Path) -> None:
    from matplotlib.image import imread

    _make_run(tmp_path)
    (path,) = [p for p in plot_run(tmp_path, out_dir=tmp_path / "out", smooth=3) if p.name == "reward.png"]
    image = imread(path)
    assert image.shape[1] == 1000 and image.shape[0] > 400
    assert image.std() > 0.01  # not a blank canvas


def test_a_large_family_is_split_over_several_figures() -> None:
    records = [{"step": s, **{f"time/stage{i}_s": 0.1 * (i + 1) * s for i in range(40)}} for s in range(1, 6)]
    plans = _plans(records)
    assert [stem for stem in plans if stem.startswith("time")] == ["time", "time_2"]
    for stem in ("time", "time_2"):
        assert all(len(panel.keys) <= MAX_SERIES_PER_AXES for panel in plans[stem].panels)
    drawn = [key for stem in ("time", "time_2") for panel in plans[stem].panels for key in panel.keys]
    assert sorted(drawn) == sorted(f"time/stage{i}_s" for i in range(40))


def test_group_metrics_membership() -> None:
    records = [
        {"step": 1, "loss/kl": 0.1, "loss/policy": 1.0, "policy/approx_kl": 0.2, "normalizer/alpha": 2.0},
        {"step": 2, "optim/grad_norm": 3.0, "policy/entropy": 1.2, "judge/latency_s": 1.0, "reward/x/nan_frac": 0.1},
    ]
    assert group_metrics(records) == {
        "kl": ["loss/kl", "policy/approx_kl"],
        "entropy": ["policy/entropy"],
        "loss": ["loss/kl", "loss/policy"],
        "optim": ["optim/grad_norm"],
        "normalizer": ["normalizer/alpha"],
        "reward_diagnostics": ["reward/x/nan_frac"],
        "judge": ["judge/latency_s"],  # a prefix no family claims gets its own figure
    }
    # reward/<model>/<metric> next to the model's score reward/<model>: the model's own metric, not a reward
    records = [{"step": 1, "reward/disc": 0.5, "reward/disc/loss": 0.7, "reward/protein/valid": 1.0}]
    assert group_metrics(records) == {
        "reward": ["reward/disc", "reward/protein/valid"],
        "reward_models": ["reward/disc/loss"],
    }


# ------------------------------------------------------------------------------------------------- several runs


def test_overlay_draws_one_line_per_run(tmp_path: Path) -> None:
    records_a, records_b = _records(), _records(steps=15, scale=0.5)
    figures = build_figures({"grpo": records_a, "dler": records_b})
    for stem, fig in figures.items():
        legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend_labels == ["grpo", "dler"], stem
        for ax in fig.axes:
            lines = _lines(ax)
            assert len(lines) == 2 and lines[0].get_color() != lines[1].get_color(), stem  # both runs log every key
            assert ax.get_title(loc="left")  # one metric per panel, named in its title
    reward = figures["reward"]
    mean_ax = next(ax for ax in reward.axes if ax.get_title(loc="left").startswith("reward/mean"))
    assert [line.get_label() for line in _lines(mean_ax)] == ["grpo", "dler"]
    assert len(_lines(mean_ax)[1].get_xdata()) == 15


def test_plot_runs_default_out_dir(tmp_path: Path) -> None:
    _make_run(tmp_path / "grpo")
    _make_run(tmp_path / "dler", scale=0.5)
    written = plot_runs([tmp_path / "grpo", tmp_path / "dler"])
    assert {p.parent for p in written} == {tmp_path / "compare_grpo_vs_dler"}
    assert written[0].name == "overview.png"


def test_cli_plot_several_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_run(tmp_path / "a")
    _make_run(tmp_path / "b", scale=0.5)
    out = tmp_path / "cmp"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(out), "--ema", "0.3"]) == 0
    listed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert out / "overview.png" in listed and sorted(listed) == sorted(out.glob("*.png"))
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "a"), "--ema", "0.3", "--smooth", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "a"), "--ema", "1.5"]) == 2
    assert "ema must be a number in (0, 1]" in capsys.readouterr().err


def test_plot_compare(tmp_path: Path) -> None:
    _make_run(tmp_path / "grpo")
    _make_run(tmp_path / "dler", scale=0.5)
    out = plot_compare([tmp_path / "grpo", tmp_path / "dler"], "reward/mean", tmp_path / "cmp" / "reward.png")
    assert out == tmp_path / "cmp" / "reward.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="2 labels for 1 run"):
        plot_compare([tmp_path / "grpo"], "reward/mean", tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match=r"no finite 'reward/men'.*reward/mean"):
        plot_compare([tmp_path / "grpo"], "reward/men", tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------- smoothing


def test_moving_average_oracle() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    out = moving_average([1.0, math.nan, 3.0, 5.0], 2)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2:] == [2.0, 4.0]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError, match="smooth/window"):
        moving_average([1.0], 0)


def test_ema_oracle_and_default() -> None:
    out = exponential_moving_average([1.0, 3.0, math.nan, 5.0], 0.5)
    assert out[:2] == [1.0, 2.0] and math.isnan(out[2]) and out[3] == 3.5
    assert exponential_moving_average([1.0, 3.0], 1.0) == [1.0, 3.0]
    assert auto_ema_alpha(5) == 1.0 and auto_ema_alpha(30) == 0.5 and auto_ema_alpha(10**6) == pytest.approx(2 / 101)
    smoother, text = make_smoother()
    assert smoother([1.0] * 5) is None and "EMA" in text  # short series: raw only
    assert make_smoother(ema=1.0)[0]([1.0, 2.0] * 50) is None
    assert make_smoother(smooth=2)[0]([1.0, 3.0]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="not both"):
        make_smoother(smooth=2, ema=0.5)
    with pytest.raises(ValueError, match="ema must be"):
        make_smoother(ema=0.0)


def test_smoothed_curves_draw_the_raw_curve_faintly() -> None:
    fig = build_figures({"run": _records(steps=40)})["overview"]
    ax = fig.axes[0]
    raw = [line for line in ax.get_lines() if line.get_label() == "_raw"]
    (smooth,) = _lines(ax)
    assert len(raw) == 1 and raw[0].get_alpha() == 0.25 and raw[0].get_color() == smooth.get_color()
    assert "curves: EMA" in fig.get_supxlabel()


# ------------------------------------------------------------------------------------------------- errors


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


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, toolkit.io.logging, toolkit.io.plotting; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
