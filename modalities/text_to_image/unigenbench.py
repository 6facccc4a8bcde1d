"""UniGenBench: generate k images per benchmark prompt, judge each testpoint 0/1 with a VLM, aggregate.

Spec docs/methods/pref_grpo.md §7. The prompt CSV has columns `index`, `prompt_<lang>` and `sub_dims_<lang>` (JSON with
"Testpoints" and "Testpoint Description" lists plus the prompt's categories). A sub-dimension's accuracy is
Σ scores / #(image, testpoint) pairs; its primary dimension is the text before the first "-", stripped (the
official code keeps a trailing space, e.g. "Attribute "). "overall" here is the mean over primary
dimensions: the leaderboard's own aggregation is not in the official code (unverified). Judge replies are
read as the released evaluation script reads them by default (`parsing: official`, see
rewards.judges.unigenbench); images without an accepted reply after the re-asks, or left out by the official
scoring, are left out of the counts and reported. Results are resumable: prompts already in `results.jsonl`
are skipped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rewards.judges.unigenbench import ScoreParsing, TestpointItem, TestpointJudge
from toolkit.config.types import read_text_file
from toolkit.io.atomic import write_json_atomic

# generate(captions, k, generator) -> k PIL images per caption.
Generate = Callable[[list[str], int, torch.Generator], list[list[Image.Image]]]


@dataclass
class BenchPrompt:
    """One benchmark prompt with its testpoints (parallel lists) and categories."""

    index: int
    prompt: str
    testpoints: list[str]
    descriptions: list[str]
    categories: dict[str, Any] = field(default_factory=dict)


def load_unigenbench_csv(path: str | Path, language: str = "en") -> list[BenchPrompt]:
    """Prompts of a UniGenBench CSV (`index`, `prompt_<language>`, `sub_dims_<language>`).

    Raises ValueError naming the file and row on a missing column, bad JSON or unequal testpoint lists.
    """
    prompt_col, dims_col = f"prompt_{language}", f"sub_dims_{language}"
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    missing = {"index", prompt_col, dims_col} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; found {reader.fieldnames}")
    return [_bench_prompt(row, prompt_col, dims_col, f"{path}:{line}") for line, row in enumerate(reader, 2)]


def _bench_prompt(row: Mapping[str, str], prompt_col: str, dims_col: str, where: str) -> BenchPrompt:
    try:
        dims = json.loads(row[dims_col])
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {dims_col} is not valid JSON ({err.msg})") from err
    testpoints, descriptions = dims.get("Testpoints"), dims.get("Testpoint Description")
    if not isinstance(testpoints, list) or not isinstance(descriptions, list) or len(testpoints) != len(descriptions):
        raise ValueError(f"{where}: Testpoints and Testpoint Description must be lists of equal length")
    categories = {k: v for k, v in dims.items() if k not in ("Testpoints", "Testpoint Description")}
    return BenchPrompt(
        int(row["index"]), row[prompt_col], [str(t) for t in testpoints], [str(d) for d in descriptions], categories
    )


def primary_dimension(testpoint: str) -> str:
    """ "Attribute - Color" -> "Attribute"; a testpoint without "-" is its own primary dimension."""
    return testpoint.split("-", 1)[0].strip()


@dataclass
class DimensionScores:
    """Accuracy per primary and sub-dimension: {name: (correct, total)} and the derived rates."""

    primary: dict[str, tuple[int, int]]
    sub: dict[str, tuple[int, int]]
    invalid_images: int = 0

    def rates(self, level: str = "primary") -> dict[str, float]:
        counts = self.primary if level == "primary" else self.sub
        return {k: c / t for k, (c, t) in sorted(counts.items()) if t}

    @property
    def overall(self) -> float:
        """Mean over primary dimensions (the leaderboard's formula is unverified; spec §7)."""
        rates = self.rates("primary")
        return sum(rates.values()) / len(rates) if rates else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "primary": self.rates("primary"),
            "sub": self.rates("sub"),
            "counts": {"primary": self.primary, "sub": self.sub},
            "invalid_images": self.invalid_images,
        }


def aggregate_scores(records: Iterable[Mapping[str, Any]]) -> DimensionScores:
    """Aggregate judged images: each record has "testpoints" and "scores" (a 0/1 list or None = invalid)."""
    primary: dict[str, list[int]] = {}
    sub: dict[str, list[int]] = {}
    invalid = 0
    for record in records:
        scores = record.get("scores")
        if scores is None:
            invalid += 1
            continue
        for testpoint, score in zip(record["testpoints"], scores, strict=True):
            for table, key in ((primary, primary_dimension(testpoint)), (sub, testpoint.strip())):
                counts = table.setdefault(key, [0, 0])
                counts[0] += int(score == 1)
                counts[1] += 1
    return DimensionScores(
        {k: (v[0], v[1]) for k, v in primary.items()}, {k: (v[0], v[1]) for k, v in sub.items()}, invalid
    )


def contact_sheet(images: Sequence[Image.Image], path: str | Path, tile: int = 256) -> Path:
    """Save the images side by side (each resized to `tile`×`tile`) as one PNG, atomically."""
    sheet = Image.new("RGB", (tile * max(1, len(images)), tile), "white")
    for k, image in enumerate(images):
        sheet.paste(image.convert("RGB").resize((tile, tile)), (k * tile, 0))
    return _atomic_save(sheet, Path(path))


def _atomic_save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of results.jsonl; a torn last line (interrupted write) is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class UniGenBenchReport:
    """Scores of a run and where its files are (results.jsonl, scores.json, images/, sheets/)."""

    scores: DimensionScores
    out_dir: Path
    num_prompts: int
    metrics: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"UniGenBench ({self.num_prompts} prompts, {self.out_dir})")
        table.add_column("dimension")
        table.add_column("accuracy", justify="right")
        table.add_column("correct / total", justify="right")
        for name, (correct, total) in sorted(self.scores.primary.items()):
            table.add_row(name, f"{correct / total:.4f}" if total else "-", f"{correct} / {total}")
            for sub, (c, t) in sorted(self.scores.sub.items()):
                if sub != name and primary_dimension(sub) == name:
                    table.add_row(f"  {sub}", f"{c / t:.4f}" if t else "-", f"{c} / {t}")
        table.add_row("overall (mean of primary)", f"{self.scores.overall:.4f}", "")
        if self.scores.invalid_images:
            table.add_row("images left out (invalid or skipped judge replies)", "", str(self.scores.invalid_images))
        console = Console(record=True, width=120)
        with console.capture() as capture:
            console.print(table)
        return capture.get()


def image_records(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One {"testpoints", "scores"} record per judged image of the per-prompt results."""
    return [
        {"testpoints": r["testpoints"], "scores": image["scores"]} for r in results for image in r.get("images", [])
    ]


def run_unigenbench(
    prompts: Sequence[BenchPrompt],
    generate: Generate,
    judge: TestpointJudge,
    out_dir: str | Path,
    num_images: int = 4,
    batch_size: int = 4,
    seed: int = 0,
    show_progress: bool = True,
) -> UniGenBenchReport:
    """Generate `num_images` per prompt, judge every image, write results; prompts already done are skipped.

    Files in `out_dir`: images/{index}_{j}.png, sheets/{index}.png (contact sheet), results.jsonl (one line
    per prompt, appended and fsynced as each batch finishes), scores.json (written atomically at the end).
    Each batch's generator is seeded from `seed` and its first prompt index, so a resumed run draws the
    same images for the remaining prompts as an uninterrupted one.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    out = Path(out_dir)
    results_path = out / "results.jsonl"
    done = {int(r["index"]) for r in read_results(results_path)}
    todo = [p for p in prompts if p.index not in done]
    totals = {"judge/invalid": 0.0, "judge/excluded": 0.0, "judge/failures": 0.0, "judge/reasks": 0.0}
    columns = (TextColumn("unigenbench"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("prompts", total=len(prompts), completed=len(prompts) - len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            lines = _run_batch(batch, generate, judge, out, num_images, seed)
            for key in totals:
                totals[key] += judge.last_metrics.get(key, 0.0)
            _append_lines(results_path, lines)
            progress.advance(task, len(batch))
    wanted = {p.index for p in prompts}
    results = [r for r in read_results(results_path) if int(r["index"]) in wanted]
    scores = aggregate_scores(image_records(results))
    write_json_atomic(out / "scores.json", {**scores.as_json(), "num_prompts": len(results), "judge": totals})
    return UniGenBenchReport(scores, out, len(results), totals)


def _run_batch(
    batch: Sequence[BenchPrompt], generate: Generate, judge: TestpointJudge, out: Path, num_images: int, seed: int
) -> list[str]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch[0].index)
    images = generate([p.prompt for p in batch], num_images, generator)
    if len(images) != len(batch) or any(len(row) != num_images for row in images):
        raise ValueError(f"generate returned {[len(r) for r in images]} images for {len(batch)} prompts x {num_images}")
    items = [
        TestpointItem(p.prompt, p.testpoints, p.descriptions, image)
        for p, row in zip(batch, images, strict=True)
        for image in row
    ]
    scores, replies = judge.judge(items)
    lines = []
    for b, (prompt, row) in enumerate(zip(batch, images, strict=True)):
        entries = []
        for j, image in enumerate(row):
            path = _atomic_save(image.convert("RGB"), out / "images" / f"{prompt.index}_{j}.png")
            k = b * num_images + j
            entries.append({"path": str(path.relative_to(out)), "scores": scores[k], "reply": replies[k]})
        contact_sheet(row, out / "sheets" / f"{prompt.index}.png")
        record = {"index": prompt.index, "prompt": prompt.prompt, "testpoints": prompt.testpoints, "images": entries}
        lines.append(json.dumps({**record, "categories": prompt.categories}))
    return lines


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def policy_generate(policy: Any, sampler: Any) -> Generate:
    """Adapt a policy + sampler pair (e.g. FlowMatchingPolicy + FlowSDESampler) to `generate`.

    `sampler.sample(policy, [{"prompt": caption}, ...], k, generator)` must return a rollout whose
    `completions` are the N = B·k images, group-major (rows [b·k, (b+1)·k) belong to caption b).
    """

    def generate(captions: list[str], k: int, generator: torch.Generator) -> list[list[Image.Image]]:
        with torch.no_grad():
            rollout = sampler.sample(policy, [{"prompt": c} for c in captions], k, generator)
        images = list(rollout.completions)
        if len(images) != len(captions) * k:
            raise ValueError(f"sampler returned {len(images)} images for {len(captions)} captions x {k}")
        return [images[b * k : (b + 1) * k] for b in range(len(captions))]

    return generate


class UniGenBenchEvaluator:
    """`eval.evaluator` hook for `renorm eval`: runs UniGenBench on the loaded policy.

    Args:
        csv_path: the benchmark CSV (e.g. UniGenBench's data/test_prompts_en.csv).
        judge: a JudgeClient node (OpenAIChatClient for a vLLM-served judge, HFVisionChatClient, ...).
        out_dir: results folder; None uses `output` without its suffix, else "unigenbench".
        num_images: images per prompt (benchmark protocol: 4).
        max_prompts: evaluate only the first N prompts (None = all).
        parsing: how judge replies are read: "official" (the released evaluation script) or "lenient".
        max_retries_invalid: re-asks of a reply that is not accepted (None: 10 official, 2 lenient).
    """

    def __init__(
        self,
        csv_path: str,
        judge: Any,
        out_dir: str | None = None,
        language: str = "en",
        num_images: int = 4,
        batch_size: int = 4,
        max_prompts: int | None = None,
        seed: int = 0,
        max_retries_invalid: int | None = None,
        parsing: ScoreParsing = "official",
    ) -> None:
        self.prompts = load_unigenbench_csv(csv_path, language)[:max_prompts]
        self.judge = TestpointJudge(judge, max_retries_invalid=max_retries_invalid, parsing=parsing)
        self.out_dir, self.num_images, self.batch_size, self.seed = out_dir, num_images, batch_size, seed

    def __call__(self, policy: Any, sampler: Any, output: str | None = None, **_: Any) -> UniGenBenchReport:
        out = self.out_dir or (str(Path(output).with_suffix("")) if output else "unigenbench")
        generate = policy_generate(policy, sampler)
        return run_unigenbench(self.prompts, generate, self.judge, out, self.num_images, self.batch_size, self.seed)
