"""The layout of the training-curve figures, decided without matplotlib: metric families, duplicate and
always-zero pruning, axes of at most `MAX_SERIES_PER_AXES` series of comparable scale, the overview, and the
smoothers. `toolkit.io.plotting` draws what `plan_figures` decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    pass

Records = Sequence[Mapping[str, Any]]
Series = tuple[list[int], list[float]]  # (steps, values), NaN where a value is missing or non-finite
Table = Mapping[str, Sequence[Series]]  # metric key -> its series in each run, in run order
T = TypeVar("T")
Smoother = Callable[[Sequence[float]], list[float] | None]  # None: draw the raw curve only

MAX_SERIES_PER_AXES = 6
MAX_PANELS_PER_FIGURE = 6  # single run: stacked axes; several runs: 2 columns of one-metric panels
_OVERVIEW_PANELS_PER_HEADLINE = 2  # at most 2 eval (or KL) panels in overview.png
_SCALE_RATIO = 30.0  # series whose peak magnitudes differ more than this go on separate axes
# A metric is a diagnostic (own axes, own reward figure) when a `_`-token of its last path part is one of these.
# fmt: off
_DIAGNOSTIC_TOKENS = frozenset((
    "nan", "nonfinite", "invalid", "fail", "failed", "failure", "failures", "error", "errors", "fallback", "fallbacks",
    "timeout", "timeouts", "retries", "reasks", "skipped", "missing", "applicable", "without", "count", "rate", "frac",
    "rows", "requests", "hits", "misses",
))
# fmt: on


@dataclass(frozen=True)
class Family:
    """Metrics drawn together: keys starting with one of `prefixes` (a key may be in several families)."""

    stem: str
    title: str
    prefixes: tuple[str, ...]
    ylabel: str = ""
    diagnostics: Literal["any", "only", "exclude"] = "any"  # "only": just the diagnostic keys; "exclude": none
    split_scales: bool = True  # False: one unit (seconds), keep small series on the same axes


FAMILIES: tuple[Family, ...] = (
    Family("reward", "Reward", ("reward/",), "reward", diagnostics="exclude"),
    Family("eval", "Evaluation", ("eval/",)),
    Family("agent", "Agent", ("agent/",)),
    Family("advantage", "Advantage", ("advantage/",), "advantage"),
    Family("kl", "KL divergence", ("loss/kl", "policy/approx_kl", "policy/kl", "kl/"), "KL"),
    Family("clip", "Clipping and importance ratio", ("policy/clip_frac", "policy/dual_clip_frac", "policy/ratio")),
    Family("length", "Rollout length and truncation", ("rollout/",), "tokens"),
    Family("entropy", "Policy entropy", ("policy/entropy",), "entropy"),
    Family("loss", "Losses", ("loss/",), "loss"),
    Family("optim", "Optimizer", ("optim/",)),
    Family("normalizer", "Normalizer statistics", ("normalizer/",)),
    Family("reward_diagnostics", "Reward diagnostics", ("reward/", "reward_stats/"), diagnostics="only"),
    Family("reward_models", "Reward-model metrics", ("reward_model/",)),  # see `_families`
    Family("time", "Time per stage", ("time/",), "seconds", split_scales=False),
)
# overview.png, after the reward: eval/*; (candidate keys, draw only the first present)
_OVERVIEW = (
    (("reward/mean", "reward/score_mean", "reward/score"), True),
    (("loss/kl", "policy/approx_kl", "policy/kl"), False),
    (("rollout/length_mean", "rollout/response_tokens_mean"), True),
    (("policy/clip_frac",), True),
    (("optim/grad_norm",), True),
)


@dataclass(frozen=True)
class Panel:
    """One axes: `keys` with their legend `labels` (one run), or one key drawn once per run (several runs)."""

    keys: tuple[str, ...]
    labels: tuple[str, ...]
    ylabel: str = ""
    title: str = ""


@dataclass(frozen=True)
class FigurePlan:
    """One PNG: `stem`.png with `panels` in `columns` columns; `notes` name what was merged or left out."""

    stem: str
    title: str
    panels: tuple[Panel, ...]
    notes: tuple[str, ...] = ()
    columns: int = 1


def metric_series(records: Records, key: str) -> tuple[list[int], list[float]]:
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


def exponential_moving_average(values: Sequence[float], alpha: float) -> list[float]:
    """s_t = alpha·x_t + (1 − alpha)·s_{t−1}, started at the first finite value; NaN positions stay NaN."""
    _check_alpha(alpha)
    out: list[float] = []
    state = math.nan
    for value in values:
        if math.isfinite(value):
            state = value if math.isnan(state) else alpha * value + (1 - alpha) * state
        out.append(state if math.isfinite(value) else math.nan)
    return out


def auto_ema_alpha(num_points: int) -> float:
    """The default EMA weight: a span of ~1/10 of the series (2/(span + 1)), between 1 (no smoothing) and 100."""
    span = min(100.0, num_points / 10)
    return min(1.0, 2.0 / (span + 1.0))


def make_smoother(smooth: int | None = None, ema: float | None = None) -> tuple[Smoother, str]:
    """The curve smoother and its description: `ema` (weight of the newest point), `smooth` (trailing-mean
    window) or, with neither, an EMA with `auto_ema_alpha`. 1 for either means raw curves only."""
    if smooth is not None and ema is not None:
        raise ValueError(f"give smooth (moving-average window) or ema (EMA weight), not both: {smooth=}, {ema=}")
    if smooth is not None:
        _check_window(smooth)
        return (lambda v: moving_average(v, smooth) if smooth > 1 else None), (
            f"trailing mean of {smooth}; faint: raw" if smooth > 1 else "raw"
        )
    if ema is not None:
        _check_alpha(ema)
        return (lambda v: exponential_moving_average(v, ema) if ema < 1 else None), (
            f"EMA α={ema:g}; faint: raw" if ema < 1 else "raw"
        )

    def auto(values: Sequence[float]) -> list[float] | None:
        alpha = auto_ema_alpha(sum(math.isfinite(v) for v in values))
        return exponential_moving_average(values, alpha) if alpha < 1 else None

    return auto, "EMA (span ≈ 1/10 of the run); faint: raw"


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"smooth/window must be an int >= 1 (1 = no smoothing), got {window!r}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(
            f"ema must be a number in (0, 1] (weight of the newest point; 1 = no smoothing), got {alpha!r}"
        )


def is_diagnostic(key: str) -> bool:
    """True for failure/nan/invalid fractions, rates and counts (`reward/em/nan_frac`, `reward_stats/...`)."""
    return key.startswith("reward_stats/") or bool(_DIAGNOSTIC_TOKENS & set(key.rsplit("/", 1)[-1].split("_")))


def _fallback_family(key: str) -> Family:
    head = key.split("/", 1)[0] if "/" in key else "other"
    return Family(re.sub(r"[^A-Za-z0-9_.-]", "_", head), head, (f"{head}/",) if "/" in key else ("",))


def _claims(family: Family, key: str) -> bool:
    if not key.startswith(family.prefixes):
        return False
    return family.diagnostics == "any" or is_diagnostic(key) == (family.diagnostics == "only")


def _families(keys: Sequence[str]) -> dict[str, tuple[Family, list[str]]]:
    """Family stem -> (family, its keys in first-seen order); keys no family claims get one per path head.

    `reward/<model>/<metric>` next to the model's score `reward/<model>` is the model's own metric (a
    discriminator's loss, a judge's latency): it goes to "reward_models", not among the rewards.
    """
    present = set(keys)
    out: dict[str, tuple[Family, list[str]]] = {f.stem: (f, []) for f in FAMILIES}
    for key in keys:
        route = key
        if key.startswith("reward/") and "/".join(key.split("/")[:2]) in present - {key} and not is_diagnostic(key):
            route = "reward_model/" + key.removeprefix("reward/")
        claimed = [f for f in FAMILIES if _claims(f, route)]
        for family in claimed or [_fallback_family(route)]:
            out.setdefault(family.stem, (family, []))[1].append(key)
    return {stem: entry for stem, entry in out.items() if entry[1]}


def metric_table(runs: Mapping[str, Records]) -> dict[str, list[Series]]:
    """Key -> its (steps, values) in each run (run order), for the keys with a finite value in some run."""
    keys = dict.fromkeys(k for records in runs.values() for record in records for k in record if k != "step")
    table = {k: [metric_series(records, k) for records in runs.values()] for k in keys}
    return {k: series for k, series in table.items() if _finite(series)}


def _finite(series: Sequence[Series]) -> list[float]:
    return [v for _, values in series for v in values if math.isfinite(v)]


def group_metrics(records: Records) -> dict[str, list[str]]:
    """Family stem -> metric keys with at least one finite value, in first-seen order; empty families omitted."""
    return {stem: keys for stem, (_, keys) in _families(list(metric_table({"run": records}))).items()}


def _prune(table: Table, keys: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Keys to draw -> the exact duplicates (equal at every step of every run) merged into them; always-0 keys."""
    zero = [k for k in keys if all(v == 0 for v in _finite(table[k]))]
    kept: dict[str, list[str]] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for key in sorted((k for k in keys if k not in zero), key=lambda k: k != "reward/mean"):  # stable
        signature = tuple(
            (tuple(steps), tuple(None if math.isnan(v) else float(f"{v:.12g}") for v in values))
            for steps, values in table[key]
        )
        first = first_of.setdefault(signature, key)
        kept.setdefault(first, []).append(key)
    return {k: kept[k][1:] for k in sorted(keys, key=lambda k: k != "reward/mean") if k in kept}, zero  # headline first


def _label(key: str, duplicates: Sequence[str], prefix: str = "", sep: str = "\n") -> str:
    """`key` without the panel's `prefix`, naming its duplicates: "mean\\n(= score, score_mean)"."""

    def short(k: str) -> str:
        return k[len(prefix) :] if k.startswith(prefix) else k

    return short(key) + (f"{sep}(= {', '.join(short(d) for d in duplicates)})" if duplicates else "")


def _common_prefix(keys: Sequence[str]) -> str:
    """The path parts every key shares before its last one ("eval/gen_ppl/"), or ""."""
    common: list[str] = []
    for parts in zip(*(k.split("/")[:-1] for k in keys), strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return "".join(f"{p}/" for p in common)


def _scale_clusters(keys: Sequence[str], peak: Mapping[str, float]) -> list[list[str]]:
    """Keys whose peak |value| are within `_SCALE_RATIO` of their cluster's largest, clusters in first-seen order."""
    clusters: list[list[str]] = []
    for key in sorted(keys, key=lambda k: -peak[k]):
        if clusters and peak[key] * _SCALE_RATIO >= peak[clusters[-1][0]]:
            clusters[-1].append(key)
        else:
            clusters.append([key])
    order = {k: i for i, k in enumerate(keys)}
    return sorted((sorted(c, key=order.__getitem__) for c in clusters), key=lambda c: order[c[0]])


def _chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """`items` in the fewest chunks of at most `size`, balanced (7 by 6 -> 4 + 3)."""
    per = math.ceil(len(items) / math.ceil(len(items) / size)) if items else 1
    return [list(items[i : i + per]) for i in range(0, len(items), per)]


def _axes_groups(table: Table, keys: Sequence[str], family: Family) -> list[tuple[str, list[str]]]:
    """(y label, keys) per axes: values, then fractions, then counts; scales apart; at most MAX_SERIES_PER_AXES."""
    kinds: dict[str, list[str]] = {family.ylabel: [], "fraction": [], "count": []}  # values first
    for key in keys:
        if family.diagnostics != "only" and not is_diagnostic(key):
            kinds[family.ylabel].append(key)
        else:
            kinds["fraction" if all(0 <= v <= 1 for v in _finite(table[key])) else "count"].append(key)
    peak = {k: max(abs(v) for v in _finite(table[k])) for k in keys}
    groups = []
    for ylabel, members in kinds.items():
        clusters = [members] if ylabel == "fraction" or not family.split_scales else _scale_clusters(members, peak)
        groups += [(ylabel, chunk) for cluster in clusters for chunk in _split_alike(cluster)]
    return groups


def _tokens(key: str) -> list[str]:
    """`key` cut at "/" and ":" with the separators kept: "a/b:c" -> ["a", "/", "b", ":", "c"]."""
    return re.split(r"([/:])", key)


def _split_alike(keys: Sequence[str]) -> list[list[str]]:
    """`keys` in axes of at most MAX_SERIES_PER_AXES, keys that share a name part together.

    Of the groupings by one part of the name ("dataset_norm/SynthLap:vs/raw" by dataset, task or raw/normalized),
    the one with the fewest axes that all fit is taken (by dataset: each axes holds one dataset's raw and normalized
    rewards per task), unless it needs more than one axes beyond balanced chunks in order, which are the fallback.
    """
    if len(keys) <= MAX_SERIES_PER_AXES:
        return [list(keys)] if keys else []
    tokens = {k: _tokens(k) for k in keys}
    chunks = _chunks(keys, MAX_SERIES_PER_AXES)
    best: list[list[str]] | None = None
    for i in range(0, max(len(t) for t in tokens.values()), 2):
        by_part: dict[str, list[str]] = {}
        for key in keys:
            by_part.setdefault(tokens[key][i] if i < len(tokens[key]) else "", []).append(key)
        fits = 1 < len(by_part) < len(keys) and max(len(g) for g in by_part.values()) <= MAX_SERIES_PER_AXES
        if fits and len(by_part) <= len(chunks) + 1 and (best is None or len(by_part) < len(best)):
            best = list(by_part.values())
    return best if best is not None else chunks


def _pattern(keys: Sequence[str]) -> tuple[str, tuple[str, ...]] | None:
    """(title, labels) for keys whose names differ only in some parts: the title names the shared parts with "*"
    for the others ("dataset_norm/*:vs/*"), each label its own parts ("SynthLap · raw"); None when the names have
    different shapes or differ in their first part."""
    tokens = [_tokens(k) for k in keys]
    if len({len(t) for t in tokens}) != 1 or len({t[0] for t in tokens}) != 1:
        return None
    varying = [i for i in range(0, len(tokens[0]), 2) if len({t[i] for t in tokens}) > 1]
    if not varying or varying == [len(tokens[0]) - 1]:
        return None  # only the last part differs: the plain prefix title says it
    title = "".join("*" if i in varying else part for i, part in enumerate(tokens[0]))
    return title, tuple(" · ".join(t[i] for i in varying) for t in tokens)


def _panels(
    names: Sequence[str], groups: Sequence[tuple[str, list[str]]], merged: Mapping[str, list[str]]
) -> list[Panel]:
    """One panel per axes group (one run), or one panel per key with a line per run (several runs)."""
    if len(names) > 1:
        return [
            Panel((k,), tuple(names), ylabel, _label(k, merged[k], sep=" ")) for ylabel, keys in groups for k in keys
        ]
    panels = []
    for ylabel, keys in groups:
        pattern = _pattern(keys) if len(keys) > 1 and not any(merged[k] for k in keys) else None
        if pattern is not None:
            panels.append(Panel(tuple(keys), pattern[1], ylabel, pattern[0]))
            continue
        prefix = _common_prefix(keys) if len(keys) > 1 else ""
        labels = tuple(_label(k, merged[k], prefix) for k in keys)
        panels.append(
            Panel(tuple(keys), labels, ylabel, prefix if len(keys) > 1 else _label(keys[0], merged[keys[0]], sep=" "))
        )
    return panels


def _zero_note(zero: Sequence[str]) -> tuple[str, ...]:
    return (f"always 0, not drawn: {', '.join(zero)}",) if zero else ()


def _overview_plan(table: Table, names: Sequence[str]) -> FigurePlan | None:
    """The headline panels: reward, eval/*, KL (if nonzero), response length, clip fraction, grad norm."""
    wanted = [[k for k in candidates if k in table][: 1 if first else None] for candidates, first in _OVERVIEW]
    wanted.insert(1, [k for k in table if k.startswith("eval/") and not is_diagnostic(k)])
    panels: list[Panel] = []
    zero: list[str] = []
    for keys in wanted:
        merged, dropped = _prune(table, keys)
        zero += dropped
        headline = _panels(names, _axes_groups(table, list(merged), Family("overview", "", ("",))), merged)
        panels += headline[:_OVERVIEW_PANELS_PER_HEADLINE]  # many eval metrics: the rest are in eval.png
    if not panels:
        return None
    return FigurePlan("overview", f"Overview — {' vs '.join(names)}", tuple(panels), _zero_note(zero), columns=2)


def plan_figures(table: Table, names: Sequence[str]) -> list[FigurePlan]:
    """The figures for the runs `names` (in `table`'s run order): overview first, then each metric family."""
    overview = _overview_plan(table, names)
    plans = [overview] if overview is not None else []
    for stem, (family, members) in _families(list(table)).items():
        merged, zero = _prune(table, members)
        pages = _chunks(_panels(names, _axes_groups(table, list(merged), family), merged), MAX_PANELS_PER_FIGURE)
        for page, panels in enumerate(pages, start=1):
            suffix = f" ({page}/{len(pages)})" if len(pages) > 1 else ""
            title = f"{family.title} — {' vs '.join(names)}{suffix}"
            plans.append(
                FigurePlan(
                    stem if page == 1 else f"{stem}_{page}",
                    title,
                    tuple(panels),
                    _zero_note(zero),
                    1 if len(names) == 1 else 2,
                )
            )
    return plans
