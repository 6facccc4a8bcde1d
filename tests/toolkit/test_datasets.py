"""toolkit.io.datasets: one loader over verl parquet, JSONL, CSV, `save_to_disk` folders and hub ids, with field
mappings into nested columns; PromptDataset built from each through a config node; offline errors; resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from toolkit.config import instantiate, load_config, validate
from toolkit.data import PromptDataset
from toolkit.io.datasets import is_hub_id, load_records, lookup, source_name

QUESTIONS = [("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6")]
EXPECTED = [{"prompt": q, "answer": a, "id": str(i)} for i, (q, a) in enumerate(QUESTIONS)]


def verl_rows() -> list[dict[str, Any]]:
    """verl's layout: a chat-list `prompt`, `reward_model.ground_truth`, `data_source`, `extra_info`."""
    return [
        {
            "data_source": "arith",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": a},
            "extra_info": {"index": i, "split": "train"},
        }
        for i, (q, a) in enumerate(QUESTIONS)
    ]


def write_verl_parquet(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(verl_rows()), path)
    return path


@pytest.fixture
def offline_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty Hugging Face home: nothing can be fetched and no real cache is read or written.

    `datasets` reads these variables when first imported, so its module settings are pointed there too.
    """
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home


def sources(tmp_path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Four layouts of the same three problems: {name: (source, extra node keys)}."""
    parquet = write_verl_parquet(tmp_path / "verl.parquet")
    jsonl = tmp_path / "trl.jsonl"
    jsonl.write_text("".join(json.dumps({"question": q, "solution": a}) + "\n" for q, a in QUESTIONS))
    csv = tmp_path / "plain.csv"
    csv.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in QUESTIONS))
    saved = tmp_path / "hub_stand_in"  # a DatasetDict on disk, as `renorm data prepare` would leave a hub dataset
    rows = [{"query": q, "reward_model": {"ground_truth": a}} for q, a in QUESTIONS]
    splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    return {
        "verl_parquet": (
            str(parquet),
            {"fields": {"prompt": "prompt.-1.content", "answer": "reward_model.ground_truth"}},
        ),
        "jsonl": (str(jsonl), {"fields": {"prompt": "question", "answer": "solution"}}),
        "csv": (str(csv), {"fields": {"prompt": "question"}}),
        "save_to_disk": (
            str(saved),
            {"split": "train", "fields": {"prompt": "query", "answer": "reward_model.ground_truth"}},
        ),
    }


def build_from_yaml(tmp_path: Path, node: dict[str, Any]) -> PromptDataset:
    """Write `data: node` to a YAML file and build it as a run would: load, validate, instantiate."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps({"data": {"_component_": "toolkit.data.PromptDataset", **node}}))
    config = load_config(config_file)
    validate(config["data"], "data")
    data = instantiate(config["data"], where="data")
    assert isinstance(data, PromptDataset)
    return data


@pytest.mark.parametrize("layout", ["verl_parquet", "jsonl", "csv", "save_to_disk"])
def test_every_layout_gives_the_same_records(tmp_path: Path, offline_hf_home: Path, layout: str) -> None:
    source, options = sources(tmp_path)[layout]
    data = build_from_yaml(tmp_path, {"path": source, "shuffle": False, **options})
    assert [{k: r[k] for k in ("prompt", "answer", "id")} for r in data.records] == EXPECTED
    assert [{k: r[k] for k in ("prompt", "answer", "id")} for r in data.next_batch(3)] == EXPECTED


def test_verl_rows_keep_their_columns_and_chat_prompt(tmp_path: Path) -> None:
    parquet = write_verl_parquet(tmp_path / "verl.parquet")
    data = PromptDataset(path=str(parquet), fields={"answer": "reward_model.ground_truth"}, shuffle=False)
    first = data.records[0]
    assert first["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert (first["answer"], first["data_source"], first["extra_info"]) == (
        "2",
        "arith",
        {"index": 0, "split": "train"},
    )


def test_max_rows_and_seeded_shuffle_match_in_memory_records(tmp_path: Path) -> None:
    source, options = sources(tmp_path)["verl_parquet"]
    from_file = PromptDataset(path=source, max_rows=2, seed=5, **options)
    assert len(from_file) == 2
    in_memory = PromptDataset(records=verl_rows()[:2], seed=5, **options)
    assert from_file.next_batch(6) == in_memory.next_batch(6)
    assert len(load_records(source, max_rows=10)) == 3
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        load_records(source, max_rows=0)


def test_resume_state_round_trip_from_a_saved_dataset(tmp_path: Path) -> None:
    source, options = sources(tmp_path)["save_to_disk"]
    reference = PromptDataset(path=source, seed=3, **options)
    expected = [reference.next_batch(2) for _ in range(5)]
    run = PromptDataset(path=source, seed=3, **options)
    assert [run.next_batch(2) for _ in range(2)] == expected[:2]
    state = json.loads(json.dumps(run.state_dict()))  # checkpoints go through JSON
    assert state == {"epoch": 1, "position": 1, "num_records": 3}
    resumed = PromptDataset(path=source, seed=3, **options)
    resumed.load_state_dict(state)
    stream = resumed.batches(2, torch.Generator())
    assert [next(stream) for _ in range(3)] == expected[2:]


def test_an_uncached_hub_id_offline_names_the_id_and_the_ways_out(offline_hf_home: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        PromptDataset(path="renorm-tests/not-cached", config="main", split="train")
    message = str(raised.value)
    assert "'renorm-tests/not-cached'" in message and "config 'main'" in message
    assert "offline" in message and "network access" in message and "renorm data prepare" in message
    assert not (offline_hf_home / "datasets" / "renorm-tests___not-cached").exists()


def test_a_wrong_field_names_the_missing_column_and_the_available_ones(tmp_path: Path) -> None:
    source, _ = sources(tmp_path)["verl_parquet"]
    with pytest.raises(ValueError) as raised:
        PromptDataset(path=source, fields={"answer": "reward_model.truth"})
    message = str(raised.value)
    assert "verl.parquet, row 0: fields.answer: 'reward_model.truth' not found" in message
    assert "under 'reward_model': no key 'truth'; keys: ['ground_truth', 'style']" in message
    assert "columns: ['ability', 'data_source', 'extra_info', 'prompt', 'reward_model']" in message
    with pytest.raises(ValueError, match=r"fields.prompt: 'question' not found \(no key 'question'.*columns: \["):
        PromptDataset(path=source, fields={"prompt": "question"})
    jsonl, _ = sources(tmp_path)["jsonl"]
    with pytest.raises(ValueError, match=r"trl.jsonl, line 1: fields.answer: 'answer' not found"):
        load_records(jsonl, fields={"answer": "answer"})


def test_splits_and_configs_are_checked(tmp_path: Path) -> None:
    saved, _ = sources(tmp_path)["save_to_disk"]
    assert len(load_records(saved, split="test")) == 1
    with pytest.raises(ValueError, match=r"has the splits \['train', 'test'\]: choose one with split"):
        load_records(saved)
    with pytest.raises(ValueError, match=r"has no split 'dev'; splits: \['train', 'test'\]"):
        load_records(saved, split="dev")
    with pytest.raises(ValueError, match="config='x' applies to hub ids"):
        load_records(saved, config="x", split="train")
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": "p"}]).save_to_disk(str(single))
    assert load_records(single) == [{"prompt": "p"}]
    with pytest.raises(ValueError, match="single dataset without splits; drop split='train'"):
        load_records(single, split="train")
    parquet, _ = sources(tmp_path)["verl_parquet"]
    with pytest.raises(ValueError, match="do not apply to records"):
        PromptDataset(records=[{"prompt": "p"}], split="train")
    with pytest.raises(ValueError, match="not to the file"):
        load_records(parquet, split="train")


def test_a_folder_of_data_files_loads_like_a_hub_snapshot(tmp_path: Path, offline_hf_home: Path) -> None:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    write_verl_parquet(folder / "train.parquet")
    rows = load_records(folder, fields={"answer": "reward_model.ground_truth"})
    assert [r["answer"] for r in rows] == ["2", "4", "6"] and rows[0]["data_source"] == "arith"


def test_csv_cells_stay_strings_and_bad_rows_are_named(tmp_path: Path) -> None:
    csv = tmp_path / "a.csv"
    csv.write_text('question,answer\n"What, exactly?",007\n')
    assert load_records(csv) == [{"question": "What, exactly?", "answer": "007"}]
    csv.write_text("question,answer\nq,1,extra\n")
    with pytest.raises(ValueError, match=r"a.csv, line 2: more cells than the 2 columns"):
        load_records(csv)


def test_dotted_paths() -> None:
    row = {"a.b": 1, "a": {"b": 2, "c": [{"d": 3}, {"d": 4}]}}
    assert lookup(row, "a.b") == 1  # a column whose name holds the dot wins
    assert (lookup(row, "a.c.0.d"), lookup(row, "a.c.-1.d")) == (3, 4)
    with pytest.raises(LookupError, match=r"'2' is not an index of a list of 2"):
        lookup(row, "a.c.2.d")
    with pytest.raises(LookupError, match=r"cannot look up 'x' in a int"):
        lookup(row, "a.b.x")


def test_hub_ids_and_local_paths_are_told_apart(tmp_path: Path) -> None:
    assert is_hub_id("openai/gsm8k") and is_hub_id("gsm8k")
    assert not is_hub_id("data/demo/letters.jsonl") and not is_hub_id("missing.parquet") and not is_hub_id("a/b/c")
    assert not is_hub_id(Path("openai/gsm8k")) and not is_hub_id(str(tmp_path))
    assert source_name("HuggingFaceH4/MATH-500") == "MATH-500" and source_name("data/x/aime24.jsonl") == "aime24"
    with pytest.raises(FileNotFoundError, match="data file or folder not found: .*missing.parquet"):
        load_records(str(tmp_path / "missing.parquet"))
