"""`renorm data prepare` for the text recipes, offline on the tiny upstream-layout fixtures in tests/data/upstream/.

Each preparer writes where the real recipe reads (`data/NAME/...`, from a temporary working directory), and the
recipe's own `data:` / `eval.data:` node then loads the files: the problems, prompts and answers must come out as
the upstream rows say. The wiki-18 corpus is searched through its saved BM25 index as `renorm serve-retriever
--index-dir` loads it; the e5 index parts are joined and checked against faiss's flat-index header.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from modalities.text_agent import prepare
from modalities.text_agent.cli import register as register_serve_retriever
from modalities.text_agent.qa_data import build_prompt
from modalities.text_agent.tools.search import BM25Search
from toolkit.config import instantiate, load_config
from toolkit.io.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parents[3]
UPSTREAM = ROOT / "tests" / "data" / "upstream"
# The fixture of each math set: the hub dataset's columns in its file format (DeepScaleR a JSON list, MATH parquet).
MATH_FIXTURES = {
    "deepscaler": "deepscaler/deepscaler.json",
    "math": "math/train-00000-of-00001.parquet",
    **{name: f"{name}/test.jsonl" for name in ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")},
}
# The answers the upstream rows hold, read by hand: AIME24's "\boxed{9}" solution, AMC's float 45.0, MATH's worked
# solutions, OlympiadBench's ["$-2$", "$2$"] (one answer in two parts).
MATH_ANSWERS = {
    "deepscaler": ["100", "\\frac{3}{4}", "6"],
    "math": ["4", "2", "10"],
    "math500": ["\\frac{1}{3}", "5", "4"],
    "aime24": ["9", "24"],
    "aime25": ["10", "16"],
    "amc23": ["45", "1.5"],
    "minerva": ["10", "9"],
    "olympiadbench": ["8", "-2, 2"],
}
DLER = ROOT / "configs" / "text_reasoning" / "dler_r1-distill-1.5b.yaml"
BNPO = ROOT / "configs" / "text_reasoning" / "bnpo_qwen2.5-math-7b.yaml"
PPR = ROOT / "configs" / "text_agent" / "ppr_qwen2.5-3b.yaml"


# Upstream columns each record carries along as they are.
MATH_KEPT = {
    "deepscaler": ("solution",),
    "math": ("level", "type"),
    "math500": ("solution", "subject", "level", "unique_id"),
    "aime24": ("url",),
    "aime25": (),
    "amc23": ("url",),
    "minerva": (),
    "olympiadbench": ("subfield", "answer_type", "unit"),
}


def upstream_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a math fixture, read straight from its file."""
    file = UPSTREAM / MATH_FIXTURES[name]
    if file.suffix == ".parquet":
        return pq.read_table(file).to_pylist()
    if file.suffix == ".json":
        return json.loads(file.read_text(encoding="utf-8"))
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]


def prepare_recipe_paths(node: dict[str, Any]) -> None:
    """Run `renorm data prepare NAME --out data/NAME` for every path of a data node (in the working directory)."""
    paths = node["paths"].values() if isinstance(node["paths"], dict) else node["paths"]
    for path in map(Path, paths):
        assert path.parts[0] == "data", f"{path}: recipes read data/NAME/<file>"
        name = path.parts[1]
        source = UPSTREAM / MATH_FIXTURES[name] if name in MATH_FIXTURES else UPSTREAM / name
        written = prepare_dataset(name, Path("data") / name, source=str(source))
        assert path in written, f"`renorm data prepare {name}` wrote {written}, the recipe reads {path}"


def prepared_recipe_data(recipe: Path, section: str) -> tuple[dict[str, Any], Any]:
    """(node, dataset): a recipe's `data` or `eval.data` node built after preparing every path it reads."""
    config = load_config(recipe)
    node = config["data"] if section == "data" else config["eval"]["data"]
    prepare_recipe_paths(node)
    return node, instantiate(node, where=section)


@pytest.mark.parametrize(
    ("recipe", "section", "user_suffix", "system"),
    [
        (DLER, "data", " Let's think step by step and output the final answer within \\boxed{}.", None),
        (DLER, "eval.data", " Let's think step by step and output the final answer within \\boxed{}.", None),
        (BNPO, "data", "", "Please reason step by step, and put your final answer within \\boxed{}."),
        (BNPO, "eval.data", "", "Please reason step by step, and put your final answer within \\boxed{}."),
    ],
    ids=["dler-train", "dler-eval", "bnpo-train", "bnpo-eval"],
)
def test_reasoning_recipe_reads_what_prepare_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: Path, section: str, user_suffix: str, system: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    node, dataset = prepared_recipe_data(recipe, section)
    for label, path in node["paths"].items():
        name = Path(path).parts[1]
        rows = [r for r in dataset.records if r["dataset"] == label]
        assert [r["answer"] for r in rows] == MATH_ANSWERS[name], label
        upstream = upstream_rows(name)
        problems = [row.get("problem", row.get("question")) for row in upstream]
        assert [r["problem"] for r in rows] == problems
        assert [{k: r[k] for k in MATH_KEPT[name]} for r in rows] == [
            {k: u[k] for k in MATH_KEPT[name]} for u in upstream
        ]
        expected = [{"role": "user", "content": p + user_suffix} for p in problems]
        if system is not None:
            expected = [[{"role": "system", "content": system}, message] for message in expected]
        assert [r["prompt"] for r in rows] == [m if isinstance(m, list) else [m] for m in expected]
        assert len({r["id"] for r in rows}) == len(rows) and all(r["id"].startswith(f"{label}/") for r in rows)


def test_limit_keeps_the_first_rows_and_a_wrong_layout_names_the_column(tmp_path: Path) -> None:
    [file] = prepare.prepare_deepscaler(tmp_path / "ds", source=str(UPSTREAM / MATH_FIXTURES["deepscaler"]), limit=2)
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in rows] == MATH_ANSWERS["deepscaler"][:2] and file.name == "train.jsonl"

    swapped = tmp_path / "amc_as_math500.jsonl"  # AMC23's columns (question, answer) where MATH-500's are expected
    swapped.write_text((UPSTREAM / MATH_FIXTURES["amc23"]).read_text(encoding="utf-8"), encoding="utf-8")
    target = tmp_path / "math500" / "test.jsonl"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 0: no column 'problem' \(not the HuggingFaceH4/MATH-500 layout\)"):
        prepare.prepare_math500(target.parent, source=str(swapped))
    assert target.read_text(encoding="utf-8") == "old\n", "a failed preparation must leave the old file whole"
    assert sorted(p.name for p in target.parent.iterdir()) == ["test.jsonl"], "no temp file left behind"


def test_a_solution_without_a_boxed_answer_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "aime.jsonl"
    bad.write_text(json.dumps({"id": 1, "problem": "Find x.", "solution": "x is 7", "url": ""}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: 'solution' holds no \\boxed\{\} answer"):
        prepare.prepare_aime24(tmp_path / "out", source=str(bad))


def test_default_source_is_the_hub_and_offline_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match="'HuggingFaceH4/MATH-500' is not in the local Hugging Face cache"):
        prepare.prepare_math500(tmp_path / "math500")
    with pytest.raises(FileNotFoundError, match="'wiki-18.jsonl.gz' of the hub dataset 'PeterJinGo/wiki-18-corpus'"):
        prepare.prepare_wiki18(tmp_path / "wiki18")
    assert not (tmp_path / "math500").exists() and not (tmp_path / "wiki18").exists()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("section", ["data", "eval.data"])
def test_search_agent_recipe_reads_what_prepare_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str
) -> None:
    monkeypatch.chdir(tmp_path)
    node, dataset = prepared_recipe_data(PPR, section)
    expected = [
        dict(row, dataset=Path(path).parts[1])
        for path in node["paths"]
        for row in read_jsonl(UPSTREAM.joinpath(*Path(path).parts[1:]))
    ]
    assert [(r["dataset"], r["id"]) for r in dataset.records] == [
        (e["dataset"], f"{e['dataset']}/{e['id']}") for e in expected
    ]
    assert [r["golden_answers"] for r in dataset.records] == [e["golden_answers"] for e in expected]
    assert [r["prompt"] for r in dataset.records] == [build_prompt(e["question"], "search_r1") for e in expected]
    if section == "eval.data":
        assert len({r["dataset"] for r in dataset.records}) == 7


def test_flashrag_source_may_be_the_repository_root_and_bad_rows_are_named(tmp_path: Path) -> None:
    written = prepare.prepare_nq(tmp_path / "nq", source=str(UPSTREAM), limit=1)  # UPSTREAM/nq/{train,test}.jsonl
    assert [p.name for p in written] == ["train.jsonl", "test.jsonl"]
    assert [len(read_jsonl(p)) for p in written] == [1, 1]

    folder = tmp_path / "upstream_popqa"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps({"id": "test_0", "question": "q?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl, row 0: 'golden_answers' must be a non-empty list"):
        prepare.prepare_popqa(tmp_path / "popqa", source=str(folder))
    with pytest.raises(FileNotFoundError, match=r"musique: no dev split in .*upstream_popqa"):
        prepare.prepare_musique(tmp_path / "musique", source=str(folder))


def test_wiki18_corpus_and_its_bm25_index_serve_searches(tmp_path: Path) -> None:
    out = tmp_path / "data" / "wiki18"
    written = prepare.prepare_wiki18(out, source=str(UPSTREAM / "wiki18"))
    corpus = out / "wiki-18.jsonl"
    assert written[0] == corpus and all(p.is_relative_to(out / "bm25") for p in written[1:]) and len(written) > 2
    with gzip.open(UPSTREAM / "wiki18" / "wiki-18.jsonl.gz", "rt", encoding="utf-8") as handle:
        assert read_jsonl(corpus) == [json.loads(line) for line in handle]
    # What `renorm serve-retriever data/wiki18/wiki-18.jsonl --index-dir data/wiki18/bm25` loads (its default BM25
    # settings must match the saved index's), with rebuilding forbidden.
    parser = argparse.ArgumentParser()
    register_serve_retriever(parser.add_subparsers())
    args = parser.parse_args(["serve-retriever", str(corpus), "--index-dir", str(out / "bm25"), "--top-k", "1"])
    search = BM25Search(
        args.corpus, top_k=args.top_k, k1=args.k1, b=args.b, index_dir=args.index_dir, build_index=False
    )
    hits = search.retrieve(["who wrote the moonstone", "red planet"])
    assert [h[0].document.title for h in hits] == ['"Wilkie Collins"', '"Mars"']

    # A rerun with a limit replaces corpus and index together (a stale index would not match the corpus).
    prepare.prepare_wiki18(out, source=str(UPSTREAM / "wiki18" / "wiki-18.jsonl.gz"), limit=3)
    assert len(read_jsonl(corpus)) == 3
    assert len(BM25Search(str(corpus), index_dir=str(out / "bm25"), build_index=False)) == 3


def test_wiki18_reads_the_title_text_layout_and_names_a_bad_line(tmp_path: Path) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_text(json.dumps({"id": "d1", "title": "Canberra", "text": "Capital of Australia."}) + "\n")
    prepare.prepare_wiki18(tmp_path / "out", source=str(source))
    assert read_jsonl(tmp_path / "out" / "wiki-18.jsonl") == [
        {"id": "d1", "contents": '"Canberra"\nCapital of Australia.'}
    ]
    source.write_text(source.read_text() + '{"id": "d2", "contents": \n')
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: malformed JSON"):
        prepare.prepare_wiki18(tmp_path / "out", source=str(source))


def test_wiki18_e5_parts_join_into_a_whole_flat_index(tmp_path: Path) -> None:
    parts = UPSTREAM / "wiki18-e5"
    [index] = prepare.prepare_wiki18_e5(tmp_path / "e5", source=str(parts))
    assert index.name == "e5_Flat.index"
    assert index.read_bytes() == (parts / "part_aa").read_bytes() + (parts / "part_ab").read_bytes()
    assert prepare.check_flat_index(index) == (4, 8)  # 8 passages of the wiki18 fixture, 4 dimensions

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "part_aa").write_bytes((parts / "part_aa").read_bytes())
    (cut / "part_ab").write_bytes((parts / "part_ab").read_bytes()[:-4])  # an interrupted download
    with pytest.raises(ValueError, match=r"169 bytes, but a flat index of 8 x 4 vectors has 173"):
        prepare.prepare_wiki18_e5(tmp_path / "e5_cut", source=str(cut))
    assert not (tmp_path / "e5_cut" / "e5_Flat.index").exists()
    with pytest.raises(ValueError, match="limit does not apply to wiki18-e5"):
        prepare.prepare_wiki18_e5(tmp_path / "e5", source=str(parts), limit=3)
