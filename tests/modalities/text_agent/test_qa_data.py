"""QA data loaders (Search-R1 / FlashRAG layout, parquet), the prompt template, and the shipped synthetic set."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from modalities.text_agent.qa_data import (
    SearchQADataset,
    build_prompt,
    dataset_name_for,
    load_qa_file,
    read_rows,
)
from rewards.text.qa import ANSWER_PATTERN, ExactMatchReward

DATA = Path(__file__).resolve().parents[3] / "data" / "text_agent"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def flashrag_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"test_{i}", "question": f"{prefix} question {i}", "golden_answers": [f"A{i}", f"B{i}"], "metadata": {}}
        for i in range(n)
    ]


def test_flashrag_jsonl_to_prompt_dicts(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "nq" / "test.jsonl", flashrag_rows("who", 2))
    records = load_qa_file(file)
    assert [sorted(r) for r in records] == [["dataset", "golden_answers", "id", "prompt", "question"]] * 2
    first = records[0]
    assert first["dataset"] == "nq" and first["id"] == "nq/test_0" and first["golden_answers"] == ["A0", "B0"]
    assert first["question"] == "who question 0"
    assert first["prompt"] == build_prompt("who question 0") and first["prompt"].endswith("Question: who question 0?\n")
    assert "<search> query </search>" in first["prompt"] and "<information>" in first["prompt"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("nq/test.jsonl", "nq"),
        ("data/nq_train.jsonl", "nq"),
        ("2wikimultihopqa/dev.jsonl", "2wikimultihopqa"),
        ("flashrag/2wiki.jsonl", "2wikimultihopqa"),
        ("HotpotQA-dev.jsonl", "hotpotqa"),
        ("triviaqa/test.parquet", "triviaqa"),
        ("bamboogle/test.jsonl", "bamboogle"),
        ("musique_dev.json", "musique"),
        ("popqa/test.jsonl", "popqa"),
        ("mine/custom_set.jsonl", "custom_set"),
    ],
)
def test_dataset_name_from_file_or_folder(path: str, expected: str) -> None:
    assert dataset_name_for(path) == expected


def test_prompt_template_and_question_mark() -> None:
    assert build_prompt("Who is it", "{question}") == "Who is it?"
    assert build_prompt(" Who is it? ", "question") == "Who is it?"
    assert build_prompt("x", "compact").endswith("Question: x?\n")
    for name in ("search_r1", "compact"):  # exactly one example answer: the official >= 2 EM rule holds
        assert len(ANSWER_PATTERN.findall(build_prompt("q", name))) == 1
    with pytest.raises(ValueError, match="containing '\\{question\\}'"):
        build_prompt("q", "no placeholder")


def test_malformed_and_incomplete_rows_name_the_line(tmp_path: Path) -> None:
    good = flashrag_rows("q", 1)[0]
    bad = write_jsonl(tmp_path / "hotpotqa.jsonl", [good, "", '{"question": "broken"'])
    with pytest.raises(ValueError, match=r"hotpotqa.jsonl, line 3: malformed JSON"):
        load_qa_file(bad)
    no_question = write_jsonl(tmp_path / "a.jsonl", [good, {"id": 1, "golden_answers": ["x"]}])
    with pytest.raises(ValueError, match=r"a.jsonl, line 2: missing or empty 'question'"):
        load_qa_file(no_question)
    no_answer = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "golden_answers": []}])
    with pytest.raises(ValueError, match=r"b.jsonl, line 1: no golden answers"):
        load_qa_file(no_answer)
    not_object = write_jsonl(tmp_path / "c.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"c.jsonl, line 1: expected a JSON object"):
        read_rows(not_object)
    with pytest.raises(FileNotFoundError, match="QA data file not found: .*missing.jsonl"):
        load_qa_file(tmp_path / "missing.jsonl")


def test_answer_fields_dataset_fields_and_json_lists(tmp_path: Path) -> None:
    rows = [
        {"question": "q1", "answer": "single", "data_source": "nq"},
        {"question": "q2", "answers": [1990], "dataset": "popqa", "id": "x"},
    ]
    file = tmp_path / "mixed.json"
    file.write_text(json.dumps(rows))
    first, second = load_qa_file(file)
    assert (first["golden_answers"], first["dataset"], first["id"]) == (["single"], "nq", "nq/0")
    assert (second["golden_answers"], second["dataset"], second["id"]) == (["1990"], "popqa", "popqa/x")
    assert [r["dataset"] for r in load_qa_file(file, dataset="override")] == ["override", "override"]


def test_search_r1_parquet(tmp_path: Path) -> None:
    import pandas as pd

    assert importlib.util.find_spec("pyarrow") is not None
    frame = pd.DataFrame(
        {
            "id": ["train_0", "train_1"],
            "question": ["who wrote it", "where is it"],
            "data_source": ["hotpotqa", "hotpotqa"],
            "reward_model": [
                {"style": "rule", "ground_truth": {"target": ["Ann", "Anne"]}},
                {"style": "rule", "ground_truth": {"target": ["Here"]}},
            ],
        }
    )
    file = tmp_path / "train.parquet"
    frame.to_parquet(file)
    records = load_qa_file(file)
    assert [r["golden_answers"] for r in records] == [["Ann", "Anne"], ["Here"]]
    assert [r["id"] for r in records] == ["hotpotqa/train_0", "hotpotqa/train_1"]
    assert records[1]["prompt"].endswith("Question: where is it?\n")


def test_mixed_dataset_is_a_resumable_data_source(tmp_path: Path) -> None:
    nq = write_jsonl(tmp_path / "nq" / "test.jsonl", flashrag_rows("nq", 5))
    bamboogle = write_jsonl(tmp_path / "bamboogle" / "test.jsonl", flashrag_rows("bb", 3))
    data = SearchQADataset([str(nq), str(bamboogle)], seed=3)
    assert len(data) == 8 and len({r["id"] for r in data.records}) == 8  # "test_0" twice, ids stay unique
    first = data.next_batch(3)
    state = data.state_dict()
    following = data.next_batch(6)
    resumed = SearchQADataset([str(nq), str(bamboogle)], seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_batch(6) == following
    assert {r["dataset"] for r in first + following} == {"nq", "bamboogle"}
    capped = SearchQADataset([str(nq), str(bamboogle)], dataset_names=["a", "b"], max_per_dataset=2, shuffle=False)
    assert [r["id"] for r in capped.records] == ["a/test_0", "a/test_1", "b/test_0", "b/test_1"]
    with pytest.raises(ValueError, match="2 dataset_names for 1 paths"):
        SearchQADataset(str(nq), dataset_names=["a", "b"])


def test_shipped_synthetic_set() -> None:
    train = SearchQADataset(str(DATA / "synthetic_qa.jsonl"), splits=["train"], template="compact")
    test = SearchQADataset(str(DATA / "synthetic_qa.jsonl"), splits=["test"])
    assert (len(train), len(test)) == (32, 8)
    assert not {r["question"] for r in train.records} & {r["question"] for r in test.records}
    assert {r["dataset"] for r in train.records} == {"synthetic"}
    corpus = {d["id"]: d["contents"] for d in map(json.loads, (DATA / "corpus.jsonl").read_text().splitlines())}
    assert len(corpus) == 60
    rows = [json.loads(line) for line in (DATA / "synthetic_qa.jsonl").read_text().splitlines()]
    for row in rows:
        (answer,) = row["golden_answers"]
        assert re.fullmatch(r"[A-Z][a-z]+", answer) and answer.lower() not in row["question"].lower()
        holders = [doc_id for doc_id, text in corpus.items() if re.search(rf"\b{answer}\b", text)]
        assert holders == [row["support_doc_id"]]  # the fact is in exactly one document
    completion = "<search> capital of Zorvania </search><answer> Quellport </answer>"
    prompt = next(r for r in train.records if r["question"] == "What is the capital of Zorvania?")
    score = ExactMatchReward()([prompt["prompt"]], [completion], golden_answers=[prompt["golden_answers"]])
    assert score.scores.tolist() == [1.0]


def test_shipped_files_are_the_generator_output() -> None:
    spec = importlib.util.spec_from_file_location("make_synthetic", DATA / "make_synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    questions, corpus = module.build()
    assert (DATA / "synthetic_qa.jsonl").read_text() == "".join(json.dumps(q) + "\n" for q in questions)
    assert (DATA / "corpus.jsonl").read_text() == "".join(json.dumps(d) + "\n" for d in corpus)


# ------------------------------------------------------------------------------- sources through toolkit.io.datasets


def qa_sources(tmp_path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Three layouts of the same two questions as {name: (source, extra node keys)}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    verl = [
        {
            "data_source": "nq",
            "prompt": [{"role": "user", "content": "long instruction"}],
            "extra_info": {"question": q, "index": i},
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
        }
        for i, (q, answers) in enumerate([("who wrote it", ["Ann"]), ("where is it", ["Here", "There"])])
    ]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "search_r1.parquet")
    csv = tmp_path / "nq.csv"
    csv.write_text("query,answer\nwho wrote it,Ann\nwhere is it,Here\n")
    saved = tmp_path / "nq_saved"  # stands in for a FlashRAG hub dataset: splits, `question` + `golden_answers`
    rows = [{"id": "test_0", "question": "who wrote it", "golden_answers": ["Ann"]}]
    rows.append({"id": "test_1", "question": "where is it", "golden_answers": ["Here", "There"]})
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(rows), "dev": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(saved))
    return {
        "verl_parquet": (str(tmp_path / "search_r1.parquet"), {"fields": {"question": "extra_info.question"}}),
        "csv": (str(csv), {"fields": {"question": "query"}}),
        "save_to_disk": (str(saved), {"split": "test"}),
    }


@pytest.mark.parametrize("layout", ["verl_parquet", "csv", "save_to_disk"])
def test_sources_through_a_config_node_give_the_same_prompts(tmp_path: Path, layout: str) -> None:
    from toolkit.config import instantiate, validate

    source, options = qa_sources(tmp_path)[layout]
    node = {"_component_": "modalities.text_agent.qa_data.SearchQADataset", "paths": source, "shuffle": False}
    validate({**node, **options}, "data")
    data = instantiate({**node, **options}, where="data")
    assert [(r["question"], r["dataset"]) for r in data.records] == [("who wrote it", "nq"), ("where is it", "nq")]
    assert [r["prompt"] for r in data.records] == [build_prompt("who wrote it"), build_prompt("where is it")]
    assert data.records[0]["golden_answers"] == ["Ann"] and data.records[1]["golden_answers"][0] == "Here"
    first = data.next_batch(1)
    resumed = SearchQADataset(source, shuffle=False, **options)
    resumed.load_state_dict(json.loads(json.dumps(data.state_dict())))
    assert resumed.next_batch(3) == data.next_batch(3) and first[0]["question"] == "who wrote it"


def test_hub_config_names_the_dataset_and_bad_sources_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    with pytest.raises(FileNotFoundError, match=r"'RUC-NLPIR/FlashRAG_datasets' \(config 'nq'\).*renorm data prepare"):
        SearchQADataset("RUC-NLPIR/FlashRAG_datasets", config="nq", split="test")
    saved, _ = qa_sources(tmp_path)["save_to_disk"]
    assert {r["id"] for r in load_qa_file(saved, split="dev")} == {"nq/test_0"}  # the folder name gives "nq"
    with pytest.raises(ValueError, match=r"fields.question: 'query' not found .*columns: \['golden_answers', 'id'"):
        load_qa_file(saved, split="test", fields={"question": "query"})
    jsonl = write_jsonl(tmp_path / "nq.jsonl", flashrag_rows("q", 1))
    with pytest.raises(ValueError, match="not to the file"):
        load_qa_file(jsonl, split="train")
    with pytest.raises(ValueError, match=r"nq.jsonl, line 1: fields.golden_answers: 'answers' not found"):
        load_qa_file(jsonl, fields={"golden_answers": "answers"})
