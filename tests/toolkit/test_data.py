"""PromptDataset: exact resume, seeded epoch reshuffles, file formats and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.data import PromptDataset, epoch_permutation
from toolkit.interfaces import DataSource


def records(n: int) -> list[dict[str, object]]:
    return [{"prompt": f"q{i}", "answer": str(i)} for i in range(n)]


def ids(batch: list[dict[str, object]]) -> list[object]:
    return [row["id"] for row in batch]


def take(dataset: PromptDataset, batch_size: int, count: int) -> list[list[object]]:
    stream = dataset.batches(batch_size, torch.Generator().manual_seed(0))
    return [ids(next(stream)) for _ in range(count)]


def test_implements_the_data_source_protocol() -> None:
    assert isinstance(PromptDataset(records=records(3)), DataSource)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), batch_size=st.integers(1, 7), before=st.integers(0, 6), seed=st.integers(0, 3))
def test_resume_continues_exactly_where_the_run_stopped(n: int, batch_size: int, before: int, seed: int) -> None:
    uninterrupted = take(PromptDataset(records=records(n), seed=seed), batch_size, before + 4)
    first = PromptDataset(records=records(n), seed=seed)
    assert take(first, batch_size, before) == uninterrupted[:before]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints go through JSON
    resumed = PromptDataset(records=records(n), seed=seed)
    resumed.load_state_dict(state)
    assert take(resumed, batch_size, 4) == uninterrupted[before:]


def test_three_batches_then_resume_matches_an_uninterrupted_stream() -> None:
    reference = take(PromptDataset(records=records(5), seed=7), 2, 6)
    run = PromptDataset(records=records(5), seed=7)
    assert take(run, 2, 3) == reference[:3]
    assert run.state_dict() == {"epoch": 1, "position": 1, "num_records": 5}
    resumed = PromptDataset(records=records(5), seed=7)
    resumed.load_state_dict(run.state_dict())
    assert take(resumed, 2, 3) == reference[3:]


def test_epochs_are_permutations_reshuffled_deterministically() -> None:
    n = 12
    dataset = PromptDataset(records=records(n), seed=3)
    epochs = [ids(dataset.next_batch(n)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(i) for i in range(n)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs == [
        ids(PromptDataset(records=records(n), seed=3).next_batch(3 * n))[i * n : (i + 1) * n] for i in range(3)
    ]
    assert [str(i) for i in epoch_permutation(n, 3, 1)] == epochs[1]
    assert epoch_permutation(n, 4, 0) != epoch_permutation(n, 3, 0)


def test_the_passed_generator_does_not_change_the_order() -> None:
    a = PromptDataset(records=records(6)).batches(4, torch.Generator().manual_seed(1))
    b = PromptDataset(records=records(6)).batches(4, torch.Generator().manual_seed(2))
    assert [ids(next(a)) for _ in range(3)] == [ids(next(b)) for _ in range(3)]


def test_no_shuffle_keeps_file_order_and_wraps() -> None:
    dataset = PromptDataset(records=records(3), shuffle=False)
    assert take(dataset, 2, 3) == [["0", "1"], ["2", "0"], ["1", "2"]]


def test_records_are_copied_and_normalized() -> None:
    dataset = PromptDataset(
        records=[{"question": "what?", "id": "x"}, {"question": "who?"}], prompt_key="question", shuffle=False
    )
    batch = dataset.next_batch(2)
    assert batch == [
        {"question": "what?", "id": "x", "prompt": "what?"},
        {"question": "who?", "prompt": "who?", "id": "1"},
    ]
    batch[0]["prompt"] = "changed"
    assert dataset.records[0]["prompt"] == "what?"


def test_jsonl_and_json_files_load(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": "b"}\n')
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "id": "b"}]))
    for path in (jsonl, as_json):
        assert PromptDataset(path=str(path), shuffle=False).next_batch(2) == [
            {"prompt": "a", "id": "0"},
            {"prompt": "b", "id": "b"},
        ]


def test_the_demo_file_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "data" / "demo" / "letters.jsonl"
    if not path.exists():
        pytest.skip("demo data not present")
    assert len(PromptDataset(path=str(path))) > 0


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PromptDataset(path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2"):
        PromptDataset(path=str(bad))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"prompt": "a"}\n3\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        PromptDataset(path=str(scalar))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        PromptDataset(path=str(empty))
    with pytest.raises(ValueError, match="missing prompt key 'prompt'"):
        PromptDataset(records=[{"question": "q"}])
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataset()
    with pytest.raises(ValueError, match="empty"):
        PromptDataset(records=[])


def test_bad_states_and_batch_sizes_raise() -> None:
    dataset = PromptDataset(records=records(3))
    with pytest.raises(ValueError, match="4 records"):
        dataset.load_state_dict({"epoch": 0, "position": 0, "num_records": 4})
    with pytest.raises(ValueError, match="position=3"):
        dataset.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="batch_size"):
        next(dataset.batches(0, torch.Generator()))


def test_fields_and_max_rows_apply_to_in_memory_records() -> None:
    rows = [{"question": {"text": f"q{i}"}, "gold": str(i)} for i in range(4)]
    dataset = PromptDataset(
        records=rows, fields={"prompt": "question.text", "answer": "gold"}, max_rows=3, shuffle=False
    )
    assert [(r["prompt"], r["answer"], r["id"]) for r in dataset.records] == [
        ("q0", "0", "0"),
        ("q1", "1", "1"),
        ("q2", "2", "2"),
    ]
    assert dataset.records[0]["question"] == {"text": "q0"}  # the row's own columns stay
    with pytest.raises(ValueError, match=r"records, row 0: fields.prompt: 'question.txt' not found"):
        PromptDataset(records=rows, fields={"prompt": "question.txt"})
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        PromptDataset(records=rows, max_rows=0)


def test_parquet_and_csv_files_load(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "b"}]), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt\na\nb\n")
    for name in ("p.parquet", "p.csv"):
        assert PromptDataset(path=str(tmp_path / name), shuffle=False).next_batch(2) == [
            {"prompt": "a", "id": "0"},
            {"prompt": "b", "id": "1"},
        ]
