"""Training-curve PNGs from a run's metrics.jsonl: one figure per metric family, and run-vs-run overlays.

matplotlib is imported inside the functions and renders through a bare `Figure` (Agg canvas, no pyplot,
no global backend switch), so `import toolkit` stays light and plotting works headless.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from toolkit.io.logging import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# (file stem, title, y label, key prefixes, layout); a key may belong to several families (loss/kl: kl and loss).
# "overlay" draws every key on one axes; "panels" gives each key its own axes (shared step axis) because the
# family mixes units or scales (token counts with truncation fractions, policy loss with KL).
FAMILIES: tuple[tuple[str, str, str, tuple[str, ...], Literal["overlay", "panels"]], ...] = (
    ("reward", "Reward", "reward", ("reward/",), "overlay"),
    ("advantage", "Advantage", "advantage", ("advantage/",), "overlay"),
    ("kl", "KL divergence", "KL", ("loss/kl", "policy/approx_kl"), "overlay"),
    ("clip", "Clip fraction", "fraction", ("policy/clip_frac",), "overlay"),
    ("length", "Rollout length and truncation", "", ("rollout/length", "rollout/truncat"), "panels"),
    ("normalizer", "Normalizer statistics", "", ("normalizer/",), "panels"),
    ("loss", "Losses", "", ("loss/",), "panels"),
    ("time", "Time per stage", "seconds", ("time/",), "overlay"),
    ("entropy", "Policy entropy", "entropy", ("policy/entropy",), "overlay"),
    ("optim", "Optimizer", "", ("optim/",), "panels"),
)
_MARKER_MAX_POINTS = 50  # draw point markers on short series so a single point is visible


def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over records that have it; non-finite values and nulls become NaN."""
    steps: list[int] = []
    values: list[float] = []
    for record in records:
        if key not in record or not isinstance(record.get("step"), int):
            continue
        value = record[key]
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        steps.append(record["step"])
        values.append(number if math.isfinite(number) else math.nan)
    return steps, values


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values; NaN positions stay NaN (gaps in the plot)."""
    _check_window(window)
    out: list[float] = []
    recent: list[float] = []
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        recent = [*recent[-(window - 1) :], value] if window > 1 else [value]
        out.append(sum(recent) / len(recent))
    return out


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"smooth/window must be an int >= 1 (1 = no smoothing), got {window!r}")


def group_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Family stem -> metric keys with at least one finite value, in first-seen order; empty families omitted."""
    keys = list(dict.fromkeys(k for record in records for k in record if k != "step"))
    with_data = [k for k in keys if any(math.isfinite(v) for v in metric_series(records, k)[1])]
    groups = {stem: [k for k in with_data if k.startswith(prefixes)] for stem, _, _, prefixes, _ in FAMILIES}
    return {stem: members for stem, members in groups.items() if members}


def _load_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (is {run_dir} a run directory?)")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{path} holds no metric records")
    return records


def _new_figure(title: str, ylabels: Sequence[str]) -> tuple[Figure, list[Axes]]:
    """A figure with one axes per y label, stacked and sharing the step axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5 if len(ylabels) == 1 else 1.0 + 2.2 * len(ylabels)), dpi=100, layout="constrained")
    axes = list(fig.subplots(len(ylabels), 1, sharex=True, squeeze=False)[:, 0])
    fig.suptitle(title)
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig, axes


def _draw(ax: Axes, steps: Sequence[int], values: Sequence[float], label: str, smooth: int) -> None:
    marker = "o" if len(steps) <= _MARKER_MAX_POINTS else None
    if smooth == 1:
        ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.5)
        return
    (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=1.0)
    ax.plot(steps, moving_average(values, smooth), color=raw.get_color(), label=f"{label} (avg {smooth})")


def _save(fig: Figure, axes: Sequence[Axes], path: Path) -> Path:
    for ax in axes:
        ax.legend(fontsize="small", loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, smooth: int = 1) -> list[Path]:
    """Write one PNG per metric family that has data (see `FAMILIES`) and return their paths.

    Args:
        run_dir: Run directory holding metrics.jsonl.
        out_dir: Where to write (default `run_dir/plots`).
        smooth: Trailing moving-average window (1 = raw curves; >1 draws raw faintly plus the average).

    Raises:
        FileNotFoundError: metrics.jsonl is missing. ValueError: it has no records, or bad `smooth`.
    """
    _check_window(smooth)
    run_dir = Path(run_dir)
    records = _load_records(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    groups = group_metrics(records)
    written = []
    for stem, title, ylabel, _, layout in FAMILIES:
        if stem not in groups:
            continue
        keys = groups[stem]
        ylabels = [ylabel] if layout == "overlay" else keys
        fig, axes = _new_figure(f"{title} — {run_dir.name}", ylabels)
        for i, key in enumerate(keys):
            _draw(axes[0 if layout == "overlay" else i], *metric_series(records, key), label=key, smooth=smooth)
        written.append(_save(fig, axes, out / f"{stem}.png"))
    return written


def plot_compare(
    run_dirs: Sequence[str | Path],
    metric: str,
    out: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int = 1,
) -> Path:
    """Overlay `metric` from several runs (e.g. GRPO vs DLER) in one PNG at `out`; labels default to dir names."""
    _check_window(smooth)
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("plot_compare needs at least one run directory")
    names = list(labels) if labels is not None else [d.name for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"got {len(names)} labels for {len(dirs)} run directories")
    fig, axes = _new_figure(metric, [metric])
    for run_dir, name in zip(dirs, names, strict=True):
        records = _load_records(run_dir)
        steps, values = metric_series(records, metric)
        if not any(math.isfinite(v) for v in values):
            available = sorted({k for record in records for k in record if k != "step"})
            close = difflib.get_close_matches(metric, available, n=3)
            raise ValueError(f"{run_dir / METRICS_FILE} has no finite {metric!r} values; closest keys: {close}")
        _draw(axes[0], steps, values, label=name, smooth=smooth)
    return _save(fig, axes, Path(out))
