"""Write the synthetic search-QA set and its corpus: facts about invented countries, unknowable without search.

    python data/text_agent/make_synthetic.py        # rewrites synthetic_qa.jsonl and corpus.jsonl here

10 invented countries x 4 relations (capital, currency, river, founder) = 40 questions with one-word
invented answers. Each fact sits in exactly one corpus document; the corpus adds one general document
per country (same name, no fact) and 10 facts about other invented places (same relation words,
answers never asked) as distractors: 60 documents. Countries 0-7 are the "train" split, 8-9 "test".
Deterministic: fixed lists and a seeded shuffle of the corpus order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
NUM_TRAIN_COUNTRIES = 8

COUNTRIES = [
    "Zorvania", "Pellandria", "Kestoria", "Brumelia", "Ostavia",
    "Vendralia", "Quarnis", "Talmerra", "Yslandor", "Fennoria",
]  # fmt: skip
OTHER_PLACES = [
    "Drelmark", "Hollowmere", "Sarnwick", "Ulvena", "Corbastia",
    "Miravel", "Grinholt", "Pavonne", "Wendrake", "Ashcombe",
]  # fmt: skip
FEATURES = [
    "mountain lakes", "wool markets", "glass towers", "salt flats", "night festivals",
    "stone bridges", "copper mines", "pine forests", "river ferries", "spice gardens",
]  # fmt: skip
# relation -> (question template, document template, answers for COUNTRIES then OTHER_PLACES)
RELATIONS: dict[str, tuple[str, str, list[str]]] = {
    "capital": (
        "What is the capital of {place}?",
        "The capital of {place} is {answer}, its largest city.",
        ["Quellport", "Ambervik", "Dornholm", "Saltmere", "Corvale", "Briskane", "Tolvaro", "Maristead",
         "Ironhythe", "Lunmoor", "Kelbury", "Ossifel", "Tarnhelm"],
    ),
    "currency": (
        "What is the currency of {place}?",
        "The currency of {place} is the {answer}, issued by its central bank.",
        ["Dralmark", "Venlume", "Oskrin", "Talbet", "Murzel", "Quindar", "Pellock", "Zirrin",
         "Haskorn", "Yeldra", "Brindle", "Coppet", "Saurin"],
    ),
    "river": (
        "Which river flows through {place}?",
        "The main river that flows through {place} is the {answer}.",
        ["Ambrel", "Tessawe", "Korrin", "Vaunder", "Lissop", "Marrow", "Ethrin", "Gondal",
         "Rushwyn", "Pelago", "Ostrel", "Fenwater", "Caldra"],
    ),
    "founder": (
        "Who founded {place}?",
        "{place} was founded by {answer} many centuries ago.",
        ["Orlanth", "Bexley", "Iskander", "Morwen", "Thadeus", "Quilla", "Redmond", "Savrin",
         "Elowen", "Dagrun", "Halvard", "Peregrin", "Tovald"],
    ),
}  # fmt: skip


def build() -> tuple[list[dict[str, object]], list[dict[str, str]]]:
    """(questions, corpus documents), deterministically."""
    docs: list[tuple[str, str, str | None]] = []  # (title, text, supporting-fact key)
    questions = []
    for ci, country in enumerate(COUNTRIES):
        docs.append((country, f"{country} is a small country known for its {FEATURES[ci]}.", None))
        for relation, (question, sentence, answers) in RELATIONS.items():
            key = f"{country}/{relation}"
            docs.append((country, sentence.format(place=country, answer=answers[ci]), key))
            questions.append(
                {
                    "question": question.format(place=country),
                    "golden_answers": [answers[ci]],
                    "dataset": "synthetic",
                    "split": "train" if ci < NUM_TRAIN_COUNTRIES else "test",
                    "key": key,
                }
            )
    relation_names = list(RELATIONS)
    for pi, place in enumerate(OTHER_PLACES):
        relation = relation_names[pi % len(relation_names)]
        _, sentence, answers = RELATIONS[relation]
        answer = answers[len(COUNTRIES) + pi % (len(answers) - len(COUNTRIES))]
        docs.append((place, sentence.format(place=place, answer=answer), None))
    order = list(range(len(docs)))
    random.Random(SEED).shuffle(order)
    corpus, doc_id_of = [], {}
    for position, index in enumerate(order):
        title, text, fact = docs[index]
        doc_id = f"doc-{position:03d}"
        corpus.append({"id": doc_id, "contents": f'"{title}"\n{text}'})
        if fact is not None:
            doc_id_of[fact] = doc_id
    records: list[dict[str, object]] = []
    for qi, q in enumerate(questions):
        key = str(q.pop("key"))
        records.append({"id": f"synthetic-{qi:03d}", **q, "support_doc_id": doc_id_of[key]})
    return records, corpus


def write_jsonl(path: Path, rows: list[dict[str, object]] | list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    questions, corpus = build()
    write_jsonl(HERE / "synthetic_qa.jsonl", questions)
    write_jsonl(HERE / "corpus.jsonl", corpus)
    print(f"wrote {len(questions)} questions and {len(corpus)} documents to {HERE}")


if __name__ == "__main__":
    main()
