"""The tiny CPU search agent: a random-init 2-layer Qwen2 warm-started to search and to copy, in code and seeded.

A random-init model never writes a useful query, so an exact-match reward gives it nothing to learn from
(trained from scratch it learns the format only: `<search>4</search>`, then answer "4").
`build_tiny_search_agent` therefore runs a few supervised steps on whole trajectories in the tool-loop
layout — question, `<search>` the question `</search>`, the retrieved document, answer copied from it —
about *invented warm-start entities* (`warm_start_facts`): names built from syllables that are never a
country, place or answer of the shipped synthetic QA set (data/text_agent), so no question of that set,
train or test, is seen; only the four relation templates are shared (the "pretrained" skill). A stand-in
for a pretrained instruction model: it knows the protocol and copies imperfectly, which GRPO then sharpens.
Warm-started weights are memoized per argument set within a process.
"""

from __future__ import annotations

import copy
import functools
import random
import string
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from modalities.text_agent.tiny import PAD_TOKEN_ID, build_char_tokenizer, build_tiny_qwen2, supervised_step
from toolkit.io.console import ProgressBar

# relation -> (question template, document sentence); the wording of data/text_agent/make_synthetic.py.
RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("What is the capital of {place}?", "The capital of {place} is {answer}, its largest city."),
    "currency": (
        "What is the currency of {place}?",
        "The currency of {place} is the {answer}, issued by its central bank.",
    ),
    "river": ("Which river flows through {place}?", "The main river that flows through {place} is the {answer}."),
    "founder": ("Who founded {place}?", "{place} was founded by {answer} many centuries ago."),
}
_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "w",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "rk", "nd", "m")
# Where the shipped data lives: the repository, or <prefix>/share/renorm/ for an installed wheel (pyproject's
# data-files, the layout the tiny configs' `${config_dir}/../../data/...` paths read).
DATA_ROOTS = (Path(__file__).resolve().parents[2], Path(sys.prefix) / "share" / "renorm")
SHIPPED_FILES = ("synthetic_qa.jsonl", "corpus.jsonl")


def invented_name(rng: random.Random, random_letters: float = 0.0) -> str:
    """A capitalised pseudo-word: 2-3 syllables ("Brelanth"), or with probability `random_letters` 5-9 random letters.

    Random-letter names ("Qxvtelm") force copying by attention (induction) rather than by a model of how
    names sound, so that the copy transfers to the shipped set's differently-built names.
    """
    if random_letters > 0 and rng.random() < random_letters:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 9))).capitalize()
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))]
    return ("".join(syllables) + rng.choice(_CODAS)).capitalize()


def shipped_file(name: str, roots: Sequence[Path] = DATA_ROOTS) -> Path:
    """`data/text_agent/NAME` of the first root that holds it.

    Raises:
        FileNotFoundError: no root holds it (a broken install): the warm start could not avoid the shipped words.
    """
    for root in roots:
        path = root / "data" / "text_agent" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the shipped data/text_agent/{name} is in none of {[str(r) for r in roots]}: reinstall renorm "
        "(the tiny agent's warm start must know the shipped words to stay disjoint from them)"
    )


def shipped_words(paths: Iterable[Path] | None = None) -> set[str]:
    """Every lower-cased word of the shipped QA set and corpus (default: `shipped_file` of each)."""
    words: set[str] = set()
    for path in paths if paths is not None else [shipped_file(name) for name in SHIPPED_FILES]:
        for line in path.read_text(encoding="utf-8").splitlines():
            words.update("".join(c if c.isalnum() else " " for c in line.lower()).split())
    return words


def warm_start_facts(num_places: int = 200, seed: int = 0, random_letters: float = 0.0) -> list[dict[str, str]]:
    """Questions, supporting documents and answers about `num_places` invented places x 4 relations.

    Every place and answer is a fresh `invented_name(rng, random_letters)`, never a word of the shipped QA set or corpus
    (`shipped_words`), and never used twice: the warm start is disjoint from every shipped question.
    Rows: {"question", "document" (Search-R1 observation line: `Doc 1(Title: "P") sentence`), "answer"}.
    """
    rng = random.Random(seed)
    taken = shipped_words()
    names: list[str] = []
    while len(names) < num_places * (1 + len(RELATIONS)):
        name = invented_name(rng, random_letters)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    rows = []
    for i in range(num_places):
        place = names[i]
        for j, (question, sentence) in enumerate(RELATIONS.values()):
            answer = names[num_places + i * len(RELATIONS) + j]
            text = sentence.format(place=place, answer=answer)
            rows.append(
                {
                    "question": question.format(place=place),
                    "document": f'Doc 1(Title: "{place}") {text}\n',
                    "answer": answer,
                }
            )
    return rows


def trajectory_ids(tokenizer: PreTrainedTokenizerFast, row: dict[str, str]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one warm-start trajectory in tiny.yaml's tool-loop layout.

    prompt = the bare question; turn 1 = `<search>question</search>`; observation
    `<information>document</information>` then the final-turn message `<answer>` (not trained);
    turn 2 = `answer</answer>` (the sampler stops each turn at its closing tag, so no EOS follows).
    The loss covers the two generated turns only.
    """
    pieces = [
        (row["question"], 0),
        (f"<search>{row['question']}</search>", 1),
        (f"<information>{row['document']}</information><answer>", 0),
        (f"{row['answer']}</answer>", 1),
    ]
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in pieces:
        piece = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def supervised_steps(
    model: Qwen2ForCausalLM,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """`steps` AdamW next-token steps on random batches of (ids, loss mask), token-mean loss; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    model.train()
    bar = ProgressBar(steps, description="warm start", print_every=max(1, steps // 10))
    for step in range(steps):
        if step % 10 == 0:
            bar.update(step)
        batch = rng.choices(examples, k=batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [PAD_TOKEN_ID] * (width - len(s)) for s, _ in batch])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
        loss_mask = torch.tensor([m + [0] * (width - len(m)) for _, m in batch])
        loss = supervised_step(model, optimizer, ids, attention, loss_mask)
    bar.update(steps)
    bar.close()
    model.eval()
    return float(loss.detach())


@functools.lru_cache(maxsize=4)
def _warm_started(
    seed: int, steps: int, copy_steps: int, num_places: int, lr: float, batch_size: int, hidden_size: int
) -> Qwen2ForCausalLM:
    model = build_tiny_qwen2(seed=seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    tokenizer = build_char_tokenizer()
    # Phase 1: pseudo-word names (the protocol, and copying starts); phase 2: half random-letter names, a
    # fresh optimizer and another batch order (copying by attention, which transfers to the shipped names).
    phases = [(steps, 0.0, seed), (copy_steps, 0.5, seed + 7)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for num_steps, random_letters, batch_seed in phases:
            if num_steps > 0:
                rows = warm_start_facts(num_places, seed, random_letters)
                examples = [trajectory_ids(tokenizer, row) for row in rows]
                supervised_steps(model, examples, num_steps, lr, batch_size, batch_seed)
    return model


def build_tiny_search_agent(
    seed: int = 0,
    warm_start_steps: int = 1000,
    copy_steps: int = 250,
    num_places: int = 200,
    lr: float = 3e-3,
    batch_size: int = 16,
    hidden_size: int = 64,
) -> Qwen2ForCausalLM:
    """The tiny Qwen2 (`build_tiny_qwen2(seed, hidden_size)`) after a two-phase supervised warm start.

    Measured (seed 0, defaults): teacher-forced, 62% of the shipped questions get their whole query right and
    72% their whole answer (0% / 5% after phase 1 alone); sampled at temperature 1, EM 0.19 on the train split.

    Args:
        seed: model initialisation, invented facts and batch order.
        warm_start_steps: phase-1 steps on pseudo-word names (0 and copy_steps 0 = the plain random-init model).
        copy_steps: phase-2 steps on names half of which are random letters.
        num_places: invented places of the warm-start set (x 4 relations = trajectories).
        lr, batch_size: warm-start AdamW learning rate and trajectories per step.
        hidden_size: model width (intermediate size 2x).

    Returns:
        A fresh copy (callers may train it): the warm start runs once per argument set per process.
    """
    if warm_start_steps < 0 or copy_steps < 0 or num_places < 1 or batch_size < 1:
        raise ValueError(
            "need warm_start_steps >= 0, copy_steps >= 0, num_places >= 1, batch_size >= 1; got "
            f"{warm_start_steps}, {copy_steps}, {num_places}, {batch_size}"
        )
    return copy.deepcopy(_warm_started(seed, warm_start_steps, copy_steps, num_places, lr, batch_size, hidden_size))
