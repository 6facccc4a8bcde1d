"""The tiny search agent's warm start: disjoint from the shipped QA set, in the tool-loop sampler's exact layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from modalities.text_agent.agent_tiny import (
    RELATIONS,
    build_tiny_search_agent,
    shipped_file,
    shipped_words,
    trajectory_ids,
    warm_start_facts,
)
from modalities.text_agent.tiny import build_char_tokenizer
from modalities.text_agent.tool_loop import encode_observation, encode_text
from modalities.text_agent.tools.corpus import Document, SearchHit, format_hits
from toolkit.config import load_config
from toolkit.evaluation import EvalResult, evaluate

ROOT = Path(__file__).resolve().parents[3]
QA = ROOT / "data" / "text_agent" / "synthetic_qa.jsonl"
CORPUS = ROOT / "data" / "text_agent" / "corpus.jsonl"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_the_shipped_words_come_from_an_installed_wheel_too(tmp_path: Path) -> None:
    """A wheel has no repository around its modules: the files are found under <prefix>/share/renorm/, and a
    missing one is an error, not a silently empty word set (which would let warm-start names hit shipped ones)."""
    installed = tmp_path / "venv" / "share" / "renorm"
    (installed / "data" / "text_agent").mkdir(parents=True)
    (installed / "data" / "text_agent" / "corpus.jsonl").write_text(CORPUS.read_text())
    roots = (tmp_path / "site-packages", installed)
    assert shipped_file("corpus.jsonl", roots) == installed / "data" / "text_agent" / "corpus.jsonl"
    assert shipped_file("corpus.jsonl") == CORPUS  # the repository first
    with pytest.raises(FileNotFoundError, match="synthetic_qa.jsonl is in none of .*reinstall renorm"):
        shipped_file("synthetic_qa.jsonl", roots)


def test_warm_start_entities_never_occur_in_the_shipped_qa_set_or_corpus() -> None:
    facts = warm_start_facts(num_places=200, seed=0) + warm_start_facts(num_places=200, seed=0, random_letters=0.5)
    assert len(facts) == 2 * 200 * len(RELATIONS)
    assert facts[: 200 * len(RELATIONS)] != facts[200 * len(RELATIONS) :], "random_letters changes the names"
    shipped = words(QA.read_text()) | words(CORPUS.read_text())
    assert shipped == shipped_words((QA, CORPUS)) == shipped_words()
    template_words = words(" ".join(q + " " + d for q, d in RELATIONS.values()))
    entities = set()
    for row in facts:
        entities |= words(row["question"] + " " + row["document"] + " " + row["answer"]) - template_words - {"doc", "1"}
    assert entities and not entities & shipped
    answers = [row["answer"] for row in facts[: 200 * len(RELATIONS)]]
    assert len(set(answers)) == len(answers), "every warm-start answer of a set is a fresh name"
    shipped_questions = {json.loads(line)["question"] for line in QA.read_text().splitlines()}
    assert not shipped_questions & {row["question"] for row in facts}


def test_warm_start_uses_the_shipped_relation_wording() -> None:
    """Every shipped question is one of the four relation templates (only the entities differ)."""
    patterns = [
        re.compile(re.escape(q).replace(re.escape("{place}"), "[A-Z][a-z]+") + "$") for q, _ in RELATIONS.values()
    ]
    for line in QA.read_text().splitlines():
        question = json.loads(line)["question"]
        assert any(p.match(question) for p in patterns), question


def test_trajectory_ids_follow_the_tool_loop_layout() -> None:
    """Prompt, `<search>` turn, BM25-formatted observation + `<answer>` (untrained), answer turn."""
    tokenizer = build_char_tokenizer()
    row = warm_start_facts(num_places=1, seed=3)[0]
    ids, mask = trajectory_ids(tokenizer, row)
    assert len(ids) == len(mask)
    title, sentence = re.match(r'Doc 1\(Title: "(\w+)"\) (.*)\n$', row["document"]).groups()  # type: ignore[union-attr]
    hit = SearchHit(document=Document(id="d", contents=f'"{title}"\n{sentence}'), score=1.0)
    assert format_hits([hit]) == row["document"], "the warm start shows what BM25Search returns"
    prompt = encode_text(tokenizer, row["question"])
    search = encode_text(tokenizer, f"<search>{row['question']}</search>")
    observation = encode_observation(tokenizer, "<information>{}</information>", row["document"], None)
    final = encode_text(tokenizer, "<answer>")
    answer = encode_text(tokenizer, f"{row['answer']}</answer>")
    assert ids == prompt + search + observation + final + answer
    expected = [0] * len(prompt) + [1] * len(search) + [0] * (len(observation) + len(final)) + [1] * len(answer)
    assert mask == expected


def test_build_is_seeded_memoized_and_returns_fresh_copies() -> None:
    a = build_tiny_search_agent(seed=0, warm_start_steps=2, copy_steps=1, num_places=4, batch_size=2)
    b = build_tiny_search_agent(seed=0, warm_start_steps=2, copy_steps=1, num_places=4, batch_size=2)
    plain = build_tiny_search_agent(seed=0, warm_start_steps=0, copy_steps=0)
    assert a is not b
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), plain.parameters(), strict=True))
    with pytest.raises(ValueError, match="warm_start_steps"):
        build_tiny_search_agent(warm_start_steps=-1)


def test_greedy_eval_of_the_tiny_agent_is_deterministic(tmp_path: Path) -> None:
    """`renorm eval configs/text_agent/tiny.yaml sampler.do_sample=false`: every sample of a prompt is the same."""
    overrides = [
        "policy.model.warm_start_steps=0",
        "policy.model.copy_steps=0",
        "sampler.do_sample=false",
        "sampler.max_new_tokens_per_turn=6",
        "sampler.max_response_tokens=48",
        "sampler.max_observation_tokens=24",
        f"sampler.tools.0.corpus={CORPUS}",
        f"eval.data.paths={QA}",
        "eval.num_prompts=2",
        "eval.num_samples=3",
        f"trainer.run_dir={tmp_path}",
    ]
    cfg = load_config(ROOT / "configs" / "text_agent" / "tiny.yaml", overrides)
    first, second = evaluate(cfg), evaluate(cfg)
    assert isinstance(first, EvalResult) and isinstance(second, EvalResult)
    assert first.rows == second.rows and len(first.rows) == 6
    for prompt in range(2):
        samples = first.rows[3 * prompt : 3 * prompt + 3]
        assert all(row == samples[0] for row in samples), "greedy samples of one prompt differ"
