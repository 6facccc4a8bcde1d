"""Math reasoning problems: MATH-500 / AIME / AMC / Minerva / OlympiadBench / verl layouts.

`load_problems` reads any `toolkit.io.datasets` source (JSONL, a JSON list, parquet, CSV, a `save_to_disk` folder
or a hub id; `fields` maps nested columns such as verl's `reward_model.ground_truth`) and maps the
usual field names onto one record: `problem` (from problem/question/prompt, case-insensitive), `answer`
(from answer/final_answer/solution; a solution's last `\\boxed{}` becomes the answer, the solution is kept)
and `dataset`. `ReasoningDataset` turns files into a PromptDataset with a prompt template (e.g. the R1
"Let's think step by step and output the final answer within \\boxed{}." suffix) or chat messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.text.math import gold_answer
from toolkit.data import PromptDataset
from toolkit.io.datasets import load_records, source_name

PROBLEM_KEYS = ("problem", "question", "prompt", "input")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "solution")
ID_KEYS = ("id", "unique_id", "idx", "problem_id")


def _field(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    lowered = {str(k).lower(): k for k in row}
    for key in keys:
        if key in lowered and row[lowered[key]] not in (None, ""):
            return key, row[lowered[key]]
    return None


def normalize_problem(row: Mapping[str, Any], index: int, dataset: str, source: str) -> dict[str, Any]:
    """One benchmark row -> {"id", "problem", "answer", "dataset", ...the row's other fields}."""
    problem = _field(row, PROBLEM_KEYS)
    if problem is None:
        raise ValueError(
            f"{source}, row {index}: no problem field (looked for {list(PROBLEM_KEYS)}); keys {sorted(row)}"
        )
    out = {str(k): v for k, v in row.items()}
    found = _field(row, ANSWER_KEYS)
    gold = gold_answer({found[0]: found[1]}, [found[0]]) if found is not None else None
    if gold is None:
        raise ValueError(f"{source}, row {index}: no answer field (looked for {list(ANSWER_KEYS)}); keys {sorted(row)}")
    if found is not None and found[0] == "solution":
        out["solution"] = found[1]
    ident = _field(row, ID_KEYS)
    out.update(problem=str(problem[1]), answer=gold, dataset=dataset, id=f"{dataset}/{ident[1] if ident else index}")
    return out


def load_problems(
    path: str | Path,
    dataset: str | None = None,
    max_problems: int | None = None,
    *,
    config: str | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Normalized problems of one benchmark source; `dataset` defaults to its name (file stem, hub dataset name).

    `config`, `split` and `fields` are those of `toolkit.io.datasets.load_records`; mapped fields (e.g.
    `{problem: prompt.0.content, answer: reward_model.ground_truth}`) are found before the usual names.
    """
    name = dataset or source_name(path)
    rows = load_records(path, config=config, split=split, fields=fields, max_rows=max_problems)
    return [normalize_problem(row, i, name, str(path)) for i, row in enumerate(rows)]


PLACEHOLDER = "{problem}"


def format_prompt(problem: str, template: str, system_prompt: str | None, chat: bool) -> str | list[dict[str, str]]:
    """The prompt for one problem: `template` with each `{problem}` replaced, as chat messages when `chat`.

    Only `{problem}` is a placeholder; every other brace is literal, so a template may ask for `\\boxed{}`
    (`str.format` would raise on it).
    """
    text = template.replace(PLACEHOLDER, problem)
    if not chat:
        return text if system_prompt is None else f"{system_prompt}\n{text}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*messages, {"role": "user", "content": text}]


class ReasoningDataset(PromptDataset):
    """Math problems from one or more sources as a seeded, resumable prompt stream.

    Args:
        paths: one source, a list of sources (dataset = file stem or hub dataset name), or {dataset name:
            source}; a source is a local file, a `save_to_disk` folder or a hub id (`toolkit.io.datasets`).
        prompt_template: the prompt text with a `{problem}` placeholder; other braces are literal (`\\boxed{}`).
        system_prompt: a system message (chat) or a first line (plain text); None for none.
        chat: build chat messages (the sampler applies the tokenizer's chat template).
        max_problems: keep the first N problems of each source.
        shuffle, seed: see PromptDataset.
        config, split: the hub subset and split of every source (hub ids, saved DatasetDicts).
        fields: {record key: dotted path} for every source, e.g. {"problem": "prompt.0.content",
            "answer": "reward_model.ground_truth"} for verl's layout.
    """

    def __init__(
        self,
        paths: str | list[str] | dict[str, str],
        prompt_template: str = "{problem}",
        system_prompt: str | None = None,
        chat: bool = False,
        max_problems: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        config: str | None = None,
        split: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        if PLACEHOLDER not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{problem}}', got {prompt_template!r}")
        if max_problems is not None and max_problems < 1:
            raise ValueError(f"max_problems must be >= 1 or None, got {max_problems}")
        named = _named_paths(paths)
        records = []
        for name, path in named.items():
            for row in load_problems(path, name, max_problems, config=config, split=split, fields=fields):
                row["prompt"] = format_prompt(row["problem"], prompt_template, system_prompt, chat)
                records.append(row)
        self.datasets = list(named)
        super().__init__(records=records, shuffle=shuffle, seed=seed)


def _named_paths(paths: str | list[str] | dict[str, str]) -> dict[str, str]:
    if isinstance(paths, str):
        return {source_name(paths): paths}
    if isinstance(paths, Mapping):
        named = {str(k): str(v) for k, v in paths.items()}
    else:
        named = {}
        for path in paths:
            stem = source_name(path)
            if stem in named:
                raise ValueError(f"two sources named {stem!r}: give {{name: path}} instead of a list")
            named[stem] = str(path)
    if not named:
        raise ValueError("paths must name at least one problem file")
    return named
