"""Training-curve PNGs from metrics.jsonl: an overview, one figure per metric family, and run-vs-run overlays.

Layout rules (what a researcher reads): at most `MAX_SERIES_PER_AXES` distinct-coloured series per axes, legends
outside the data, diagnostics (nan/invalid/failure fractions, rates, counts) on their own axes, series of very
different scales on separate axes, exact duplicates merged into one line whose label names the others, and
always-zero or never-finite series left out (named in a note under the figure). Curves are smoothed with an EMA by
default and the raw values drawn faintly behind. `plan_figures` decides the layout without matplotlib;
`build_figures` returns the matplotlib `Figure`s (no pyplot, no global backend switch: `import toolkit` stays light).
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.io.logging import METRICS_FILE, read_metrics
from toolkit.io.plot_layout import (
    FigurePlan,
    Panel,
    Records,
    Smoother,
    Table,
    make_smoother,
    metric_series,
    metric_table,
    plan_figures,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


_MARKER_MAX_POINTS = 50  # draw point markers on short raw series so a single point is visible
_PALETTE = "tab10"  # 10 distinct colours; an axes never holds more than MAX_SERIES_PER_AXES (or 10 runs)
_MAX_RUNS = 10


def render_figure(
    plan: FigurePlan, table: Table, names: Sequence[str], smoother: Smoother, smoothing: str = ""
) -> Figure:
    """The matplotlib Figure of `plan` (`fig.axes` in panel order; one labelled line per series, raw ones "_raw")."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    count = len(plan.panels)
    columns = max(1, min(plan.columns, count))
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(6.5 * columns if columns > 1 else 10.0, 1.4 + 2.4 * rows), dpi=100, layout="constrained")
    axes: list[Axes] = list(fig.subplots(rows, columns, sharex=True, squeeze=False).flat)
    for extra in axes[count:]:
        fig.delaxes(extra)
    colors = list(colormaps[_PALETTE].colors)  # type: ignore[attr-defined]
    several = len(names) > 1
    for ax, panel in zip(axes, plan.panels, strict=False):
        for i, key in enumerate(panel.keys):
            for j, (steps, values) in enumerate(table.get(key, [])):
                if steps:
                    _draw(ax, steps, values, panel.labels[j if several else i], colors[j if several else i], smoother)
        _decorate(ax, panel, legend=not several and len(panel.keys) > 1, below=columns > 1)
    series = [
        (j, steps) for panel in plan.panels for key in panel.keys for j, (steps, _) in enumerate(table.get(key, []))
    ]
    _step_axes(axes[:count], columns, [x for _, steps in series for x in steps])
    drawn = {j for j, steps in series if steps}
    runs = {j: names[j] for j in sorted(drawn)} if several else {}  # legend: the runs with data here, colour kept
    _add_titles(fig, plan, runs, colors, [f"curves: {smoothing}"] if smoothing else [])
    return fig


def _step_axes(axes: Sequence[Axes], columns: int, steps: Sequence[int]) -> None:
    """Label the bottom axes of each column "step"; give one or two steps room for integer ticks."""
    for column in range(columns):
        bottom = axes[max(range(column, len(axes), columns))]
        bottom.set_xlabel("step")
        bottom.tick_params(labelbottom=True)
    if steps and max(steps) - min(steps) < 2:  # shared x: setting one axes sets all
        axes[0].set_xlim(min(steps) - 1, max(steps) + 1)


def _decorate(ax: Axes, panel: Panel, legend: bool, below: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 12.5 or 0.96 ticks
    ax.set_title(panel.title, fontsize="medium", loc="left")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if legend and below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, fontsize="small", frameon=False)
    elif legend:  # right of the axes
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _add_titles(
    fig: Figure, plan: FigurePlan, runs: Mapping[int, str], colors: Sequence[Any], notes: list[str]
) -> None:
    """The title (heading the legend of `runs`, run index -> name, when comparing) and the notes under the figure."""
    from matplotlib.lines import Line2D

    if runs:  # a suptitle and an "outside" figure legend would overlap: the legend carries the title
        handles = [Line2D([], [], color=colors[j], linewidth=2, label=name) for j, name in runs.items()]
        fig.legend(
            handles=handles,
            loc="outside upper center",
            ncols=min(len(runs), 5),
            frameon=False,
            title=plan.title,
            title_fontsize="large",
        )
    else:
        fig.suptitle(plan.title)
    text = "\n".join(textwrap.fill(n, 100 if plan.columns == 1 else 140) for n in [*notes, *plan.notes])
    if text:
        fig.supxlabel(text, fontsize="small", color="0.35")


def _draw(ax: Axes, steps: Sequence[int], values: Sequence[float], label: str, color: Any, smoother: Smoother) -> None:
    smoothed = smoother(values)
    if smoothed is None:
        marker = "o" if len(steps) <= _MARKER_MAX_POINTS else None
        ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3, linewidth=1.5)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0, label="_raw")
    ax.plot(steps, smoothed, color=color, label=label, linewidth=1.8, marker="o" if len(steps) == 1 else None)


def build_figures(
    runs: Mapping[str, Records], smooth: int | None = None, ema: float | None = None
) -> dict[str, Figure]:
    """File stem -> Figure for one run or an overlay of several ({name: records}); what `plot_runs` writes."""
    if not runs:
        raise ValueError("build_figures needs at least one run")
    smoother, smoothing = make_smoother(smooth, ema)
    table, names = metric_table(runs), list(runs)
    return {plan.stem: render_figure(plan, table, names, smoother, smoothing) for plan in plan_figures(table, names)}


def _load_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (is {run_dir} a run directory?)")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{path} holds no metric records")
    return records


def _load_runs(dirs: Sequence[Path], labels: Sequence[str] | None) -> dict[str, list[dict[str, Any]]]:
    """Run name (`labels`, else the directory name; the path when names clash) -> records."""
    if not dirs:
        raise ValueError("need at least one run directory")
    if len(dirs) > _MAX_RUNS:
        raise ValueError(f"got {len(dirs)} run directories; at most {_MAX_RUNS} can be told apart on one axes")
    names = list(labels) if labels is not None else [d.resolve().name for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"got {len(names)} labels for {len(dirs)} run directories")
    if len(set(names)) < len(names):  # runs/a/run vs runs/b/run
        names = [str(d) for d in dirs]
    return {name: _load_records(d) for name, d in zip(names, dirs, strict=True)}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    smooth: int | None = None,
    ema: float | None = None,
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Write overview.png and one PNG per metric family (`<family>_2.png`, ... when it needs more panels).

    One run: each family's series share axes by kind and scale. Several runs: one panel per metric with the
    same metric from each run, one colour per run, legend = run names (`labels`, default the directory names).

    Args:
        run_dirs: Run directories holding metrics.jsonl.
        out_dir: Where to write (default `RUN/plots` for one run, `compare_A_vs_B/` next to the first run).
        smooth: Trailing moving-average window instead of the default EMA (1 = raw curves only).
        ema: EMA weight of the newest point in (0, 1] (1 = raw); default: a span of ~1/10 of each series.
        labels: Legend names of the runs.

    Raises:
        FileNotFoundError: a metrics.jsonl is missing. ValueError: no records, bad smoothing, too many runs.
    """
    dirs = [Path(d) for d in run_dirs]
    smoother, smoothing = make_smoother(smooth, ema)
    runs = _load_runs(dirs, labels)
    if out_dir is None:
        compare = re.sub(r"[^A-Za-z0-9_.-]+", "_", "compare_" + "_vs_".join(runs))[:120]
        out_dir = dirs[0] / "plots" if len(dirs) == 1 else dirs[0].resolve().parent / compare
    table, names = metric_table(runs), list(runs)
    return [
        _save(render_figure(plan, table, names, smoother, smoothing), Path(out_dir) / f"{plan.stem}.png")
        for plan in plan_figures(table, names)
    ]


def plot_run(
    run_dir: str | Path, out_dir: str | Path | None = None, smooth: int | None = None, ema: float | None = None
) -> list[Path]:
    """`plot_runs` for one run (default out dir `run_dir/plots`)."""
    return plot_runs([run_dir], out_dir, smooth=smooth, ema=ema)


def plot_compare(
    run_dirs: Sequence[str | Path],
    metric: str,
    out: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int | None = None,
    ema: float | None = None,
) -> Path:
    """Overlay `metric` from several runs (e.g. GRPO vs DLER) in one PNG at `out`; labels default to dir names."""
    dirs = [Path(d) for d in run_dirs]
    smoother, smoothing = make_smoother(smooth, ema)
    runs = _load_runs(dirs, labels)
    table = {metric: [metric_series(records, metric) for records in runs.values()]}
    for run_dir, (_, values) in zip(dirs, table[metric], strict=True):
        if not any(math.isfinite(v) for v in values):
            available = sorted({k for record in _load_records(run_dir) for k in record if k != "step"})
            close = difflib.get_close_matches(metric, available, n=3)
            raise ValueError(f"{run_dir / METRICS_FILE} has no finite {metric!r} values; closest keys: {close}")
    plan = FigurePlan(Path(out).stem, f"{metric} — {' vs '.join(runs)}", (Panel((metric,), tuple(runs), "", metric),))
    return _save(render_figure(plan, table, list(runs), smoother, smoothing), Path(out))
