"""`renorm data prepare openwebtext | uniref50`: upstream-layout parquet fixtures in, the recipes' data nodes read them.

Each test runs in a fresh working directory and writes to `data/NAME`, so the recipe's relative paths resolve
unchanged. Only sizes (and the OWT recipe's GPT-2 tokenizer, a hub download) are overridden.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modalities.diffusion_lm.prepare import prepare_openwebtext, prepare_uniref50
from modalities.diffusion_lm.protein.fasta import read_fasta
from modalities.diffusion_lm.protein.tokenizer import ProteinVocab
from modalities.diffusion_lm.text_data import pack_documents
from toolkit.config import instantiate, load_config

ROOT = Path(__file__).resolve().parents[3]
UPSTREAM = ROOT / "tests" / "data" / "upstream"
RECIPES = ROOT / "configs" / "diffusion_lm"


def recipe_data(name: str, *overrides: str) -> Any:
    return instantiate(load_config(RECIPES / name, list(overrides))["data"], where="data")


def upstream_rows(name: str, split: str = "train") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(UPSTREAM / name / "data" / f"{split}-00000-of-00001.parquet").to_pylist()
    return rows


def test_openwebtext_writes_one_document_per_line_for_the_didi_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (written,) = prepare_openwebtext(Path("data/openwebtext"), source=str(UPSTREAM / "openwebtext"))
    assert written.as_posix() == "data/openwebtext/train.txt"
    lines = written.read_text().splitlines()
    assert len(lines) == 4  # the whitespace-only document is dropped
    assert lines[0] == (
        "The city council met on Tuesday to discuss the new bicycle lanes. Members argued about parking, safety and "
        "cost. A vote is expected next month."
    )
    assert lines[1].startswith("Scientists released a study on sleep and memory.  Participants")  # inner spaces kept
    assert lines[2].endswith("rye bread. The owner credits a starter that is forty years old.")
    tokenizer = (
        "{_component_: modalities.diffusion_lm.text_data.build_text_tokenizer, corpus: data/openwebtext/train.txt}"
    )
    data = recipe_data("didi_instruct_owt_small.yaml", f"data.tokenizer={tokenizer}", "data.seq_len=8")
    tok = data.tokenizer
    first = [tok.bos_token_id, *tok.encode("The city council met on Tuesday to", add_special_tokens=False)]
    assert data.chunks[0] == first  # [BOS] doc [EOS] ... packed, as MDLM's wrapped OWT loader
    packed, stream = [i for chunk in data.chunks for i in chunk], pack_documents(lines, tok)
    assert packed == stream[: len(packed)] and len(stream) - len(packed) < 8  # every document, in file order
    assert stream.count(tok.bos_token_id) == stream.count(tok.eos_token_id) == 4


def test_openwebtext_limit_and_a_saved_dataset_as_source(tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "owt_saved"
    datasets.Dataset.from_list(upstream_rows("openwebtext")).save_to_disk(str(saved))
    (written,) = prepare_openwebtext(tmp_path / "out", source=str(saved), limit=2)
    assert [line.split()[0] for line in written.read_text().splitlines()] == ["The", "Scientists"]


def test_uniref50_writes_standard_residue_fasta_for_the_dplm_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (written,) = prepare_uniref50(Path("data/uniref50"), source=str(UPSTREAM / "uniref50"))
    assert written.as_posix() == "data/uniref50/train.fasta"
    upstream = [row["seq"] for row in upstream_rows("uniref50")]
    records = read_fasta(written)  # validates: the 20 standard residues only
    assert [r.id for r in records] == ["UniRef50_train_0", "UniRef50_train_2", "UniRef50_train_3", "UniRef50_train_5"]
    assert [r.sequence for r in records] == [upstream[0], upstream[2], upstream[3], upstream[5]]  # X and U rows out
    data = recipe_data("protein_dplm.yaml")
    # split "train" holds out the last record; "crop" keeps the first 128 residues of those with that many.
    vocab = ProteinVocab.from_layout("esm")
    assert data.chunks == [vocab.encode(upstream[i][:128], add_special_tokens=False) for i in (0, 2)]


def test_uniref50_dataset_dict_source_limit_and_missing_column(tmp_path: Path) -> None:
    import datasets

    splits = {split: datasets.Dataset.from_list(upstream_rows("uniref50", split)) for split in ("train", "valid")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    (written,) = prepare_uniref50(tmp_path / "out", source=str(tmp_path / "saved"), limit=3)
    assert [r.id for r in read_fasta(written)] == ["UniRef50_train_0", "UniRef50_train_2"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sequence": ["MKV"]}), bad)
    with pytest.raises(ValueError, match="no 'seq' column"):
        prepare_uniref50(tmp_path / "bad_out", source=str(bad))
    assert not (tmp_path / "bad_out" / "train.fasta").exists()


def test_offline_hub_default_fetches_nothing_and_names_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--source"):  # conftest sets HF_HUB_OFFLINE=1
        prepare_openwebtext(tmp_path / "out", limit=3)
    assert not (tmp_path / "out" / "train.txt").exists()
    with pytest.raises(ValueError, match="limit"):
        prepare_uniref50(tmp_path / "out", source=str(UPSTREAM / "uniref50"), limit=0)


def test_registered_under_renorm_datasets() -> None:
    points = {point.name: point for point in entry_points(group="renorm.datasets")}
    assert points["openwebtext"].load() is prepare_openwebtext and points["uniref50"].load() is prepare_uniref50
