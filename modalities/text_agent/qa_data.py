"""QA prompt data for search agents: NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, Musique, Bamboogle.

Rows in the Search-R1 / FlashRAG layout (`{"id", "question", "golden_answers", ...}`) from `.jsonl`,
`.json`, `.parquet` or `.csv` files, `save_to_disk` folders or hub ids (`toolkit.io.datasets`; Search-R1's
processed parquet with `reward_model.ground_truth.target` and `data_source` is read too, other layouts
through `fields`). Each row becomes a prompt dict `{"prompt", "question", "golden_answers", "dataset", "id"}`
with the search-agent instruction template. The dataset name comes from a `dataset`/`data_source` field,
else from the hub config, file or folder name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.data import PromptDataset
from toolkit.io.datasets import is_hub_id, load_records, map_record, read_json_records

# Our wording of Search-R1's "base" instruction structure (docs/methods/ppr.md §2). It holds exactly one
# `<answer>...</answer>` match, which the official EM rule (>= 2 matches in prompt + response) assumes.
SEARCH_TEMPLATE = (
    "Answer the question. Reason inside <think> </think> each time you get new information. "
    "If you are missing knowledge, call the search engine with <search> query </search>; its top results "
    "come back between <information> and </information>. Search as often as you need. When you need no "
    "more information, give the final answer, without explanation, in answer tags, for example "
    "<answer> Paris </answer>. Question: {question}\n"
)
# A short variant for tiny character-level models (same single example answer).
COMPACT_TEMPLATE = "Search: <search> query </search>. Answer: <answer> word </answer>. Question: {question}\n"
TEMPLATES = {"search_r1": SEARCH_TEMPLATE, "compact": COMPACT_TEMPLATE, "question": "{question}"}

# Aliases (lower case, separators removed) -> canonical FlashRAG dataset names.
DATASET_ALIASES = {
    "nq": "nq",
    "naturalquestions": "nq",
    "triviaqa": "triviaqa",
    "popqa": "popqa",
    "hotpotqa": "hotpotqa",
    "2wikimultihopqa": "2wikimultihopqa",
    "2wiki": "2wikimultihopqa",
    "musique": "musique",
    "bamboogle": "bamboogle",
}


def resolve_template(template: str) -> str:
    """A named template ("search_r1", "compact", "question") or a custom string with "{question}"."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)} or a string containing '{{question}}'")
    return template


def build_prompt(question: str, template: str = "search_r1") -> str:
    """The instruction prompt for one question; a "?" is added when the question lacks one (as Search-R1)."""
    text = question.strip()
    if not text.endswith("?"):
        text += "?"
    return resolve_template(template).replace("{question}", text)


def dataset_name_for(path: str | Path) -> str:
    """The canonical dataset of a file from its name or its folder ("nq/test.jsonl" -> "nq"), else its stem."""
    file = Path(path)
    for candidate in (file.stem, file.parent.name):
        lowered = candidate.lower()
        whole = re.sub(r"[^a-z0-9]", "", lowered)
        if whole in DATASET_ALIASES:
            return DATASET_ALIASES[whole]
        for part in re.split(r"[^a-z0-9]+", lowered):
            if part in DATASET_ALIASES:
                return DATASET_ALIASES[part]
    return file.stem


def read_rows(
    path: str | Path,
    *,
    config: str | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs of a source, with `fields` mapped in; locations name the file and line or row.

    `.jsonl` / `.json` files are read here (errors name the line); parquet, CSV, dataset folders and hub ids
    go through `toolkit.io.datasets.load_records`, whose `config`, `split` and `fields` these are.

    Raises:
        FileNotFoundError: no such file or folder (or an uncached hub id offline).
        ValueError: a malformed line (with its number), a row that is not an object, or a missing field.
    """
    if not is_hub_id(path):
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"QA data file not found: {file}")
        if file.is_file() and file.suffix not in (".parquet", ".csv"):
            if config is not None or split is not None:
                raise ValueError(f"config and split apply to hub ids and dataset folders, not to the file {file}")
            return [(where, map_record(row, fields, where)) for where, row in read_json_records(file)]
    rows = load_records(path, config=config, split=split, fields=fields)
    return [(f"{path}, row {i}", row) for i, row in enumerate(rows)]


def _golden_answers(row: Mapping[str, Any], where: str) -> list[str]:
    value = next((row[k] for k in ("golden_answers", "answers", "answer") if row.get(k) is not None), None)
    if value is None:
        truth = (row.get("reward_model") or {}).get("ground_truth") or {}
        value = truth.get("target") if isinstance(truth, Mapping) else None
    if isinstance(value, (str, int, float)):
        value = [value]
    answers = [str(v) for v in value] if isinstance(value, Iterable) else []
    if not answers:
        raise ValueError(f"{where}: no golden answers (fields golden_answers, answers, answer); keys {sorted(row)}")
    return answers


def qa_prompt(
    row: Mapping[str, Any], where: str, index: int, template: str, dataset: str | None, inferred: str
) -> dict[str, Any]:
    """The prompt dict of one row: {"prompt", "question", "golden_answers", "dataset", "id"}.

    The dataset is `dataset` when given, else the row's `dataset`/`data_source` field, else `inferred`.
    The id is `"{dataset}/{row id}"` (FlashRAG ids such as "test_0" repeat across datasets).
    """
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: missing or empty 'question'; keys {sorted(row)}")
    name = str(dataset or row.get("dataset") or row.get("data_source") or inferred)
    return {
        "prompt": build_prompt(question, template),
        "question": question.strip(),
        "golden_answers": _golden_answers(row, where),
        "dataset": name,
        "id": f"{name}/{index if row.get('id') is None else row['id']}",
    }


def load_qa_file(
    path: str | Path,
    dataset: str | None = None,
    template: str = "search_r1",
    splits: Sequence[str] | None = None,
    max_rows: int | None = None,
    *,
    config: str | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Prompt dicts of one source (in source order).

    Args:
        path: a `.jsonl`, `.json`, `.parquet` or `.csv` file, a `save_to_disk` folder or a hub id.
        dataset: the dataset name of every row; None = the row's field, else inferred from the hub config
            or the file name.
        template: see `resolve_template`.
        splits: keep only rows whose `split` column is one of these; None keeps every row.
        max_rows: keep the first `max_rows` rows (after the split filter); None keeps all.
        config, split, fields: the hub subset, the hub/DatasetDict split and the field mapping (see
            `toolkit.io.datasets.load_records`), e.g. `fields={"golden_answers": "reward_model.ground_truth"}`.
    """
    resolve_template(template)
    inferred = dataset_name_for(f"{path}/{config}" if config else path)
    records = []
    for index, (where, row) in enumerate(read_rows(path, config=config, split=split, fields=fields)):
        if splits is not None and row.get("split") not in splits:
            continue
        records.append(qa_prompt(row, where, index, template, dataset, inferred))
        if max_rows is not None and len(records) >= max_rows:
            break
    return records


class SearchQADataset(PromptDataset):
    """Several QA sources mixed into one endless, seeded, resumable prompt stream (a DataSource).

    Args:
        paths: one source or a list: `.jsonl`, `.json`, `.parquet`, `.csv` files, `save_to_disk` folders, hub ids.
        dataset_names: one name per path, overriding the rows' fields and the file names.
        template: "search_r1", "compact", "question", or a custom string with "{question}".
        splits: keep only rows whose `split` column is listed (e.g. ["train"] for the synthetic set).
        max_per_dataset: the first N rows of each file; None = all.
        shuffle, seed: as PromptDataset (each epoch a seeded permutation of all files' rows).
        config, split: the hub subset and the split to load (hub ids, saved DatasetDicts) for every path;
            `split` picks what is loaded, `splits` filters rows by their `split` column.
        fields: {row key: dotted path} for every path, e.g. {"question": "query", "golden_answers": "answers"}.
    """

    def __init__(
        self,
        paths: str | list[str],
        dataset_names: list[str] | None = None,
        template: str = "search_r1",
        splits: list[str] | None = None,
        max_per_dataset: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        config: str | None = None,
        split: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        files = [paths] if isinstance(paths, str) else list(paths)
        if not files:
            raise ValueError("SearchQADataset needs at least one path")
        if dataset_names is not None and len(dataset_names) != len(files):
            raise ValueError(f"{len(dataset_names)} dataset_names for {len(files)} paths")
        if max_per_dataset is not None and max_per_dataset < 1:
            raise ValueError(f"max_per_dataset must be >= 1 or None, got {max_per_dataset}")
        records: list[dict[str, Any]] = []
        for i, file in enumerate(files):
            name = dataset_names[i] if dataset_names is not None else None
            loaded = load_qa_file(
                file, name, template, splits, max_per_dataset, config=config, split=split, fields=fields
            )
            if not loaded:
                raise ValueError(f"{file}: no QA rows (splits={splits})")
            records.extend(loaded)
        super().__init__(records=records, shuffle=shuffle, seed=seed)
        self.paths = files
