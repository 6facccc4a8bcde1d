"""References that must resolve: `_component_` import paths and citations of the method notes in docs/methods/.

(a) Every `_component_: dotted.path` in configs/**/*.yaml, README.md and docs/**/*.md imports.
(b) Every citation of a method note, old form `bnpo.md §5` / `spec/peers.md` or new form `docs/methods/bnpo.md §5`,
found in the code, configs, docs, tests and bench, names a file in docs/methods/ that has that section (a heading
numbered `5.` or `6.2`) or label (a heading or bold paragraph starting with `E1`, `D2`, `P5`, `M7`, ...).
Lists and ranges are read as such: `§12, §17 and E7`, `§3–§10`, `E1–E8`, `P3 (…), P4 (…)`.
(c) Every `bench/results/<file>` named in the docs, configs, code and bench/ exists (one results file per benchmark).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolkit.config import import_object

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods"
SCANNED = ("toolkit", "modalities", "rewards", "configs", "docs", "tests", "bench", "examples", "README.md")
SUFFIXES = frozenset({".py", ".md", ".yaml", ".yml"})
PLACEHOLDERS = frozenset({"dotted.path"})  # README's description of the syntax, not a component

COMPONENT = re.compile(r"_component_:\s*[\"']?([A-Za-z_][\w.]*)")
_REF = r"(?:§\s?\d+(?:\.\d+)*|[A-Z]\d+|\d+(?:\.\d+)*)\b"
_SEPARATOR = r"(?:,|/|&|\band\b|\bto\b|\boracles?\b|\bexamples?\b|–|—|-)"
_NEXT = rf"(?:\s*\([^()\n]*\))?(?:\s*\"[^\"\n]*\")?\s*{_SEPARATOR}\s*{_REF}"
CITATION = re.compile(
    r"(?<![\w/.-])(?P<prefix>docs/methods/|(?:/work/shared/)?spec/)?(?P<name>[A-Za-z][A-Za-z0-9_]*)\.md"
    rf"(?P<refs>\s+{_REF}(?:{_NEXT})*)?"
)
REF_TOKEN = re.compile(rf"(?P<sep>{_SEPARATOR})?\s*(?P<ref>{_REF})")
RANGE_SEPARATORS = frozenset({"–", "—", "-", "to"})
SECTION_HEADING = re.compile(r"^#{1,6}\s+(?:§\s?)?(\d+(?:\.\d+)*)(?:\.|\s)", re.MULTILINE)
LABEL_HEADING = re.compile(r"^(?:#{1,6}\s+|\s*(?:[-*]\s+)?\*\*)([A-Z]\d+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Citation:
    """One citation: the note's name, whether it had a path prefix, the sections/labels it points at, and where."""

    name: str
    prefixed: bool
    refs: tuple[str, ...]
    text: str
    start: int = 0


def method_names() -> set[str]:
    """The notes a bare `name.md` mention refers to (the index README.md is no method note)."""
    return {p.stem for p in METHODS.glob("*.md")} - {"README"}


def _expand(first: str, last: str) -> list[str]:
    """`§3`–`§5` → §3, §4, §5; `E1`–`E3` → E1, E2, E3; anything else → its two ends."""
    a, b = first.lstrip("§ "), last.lstrip("§ ")
    if first.startswith("§") and a.isdigit() and b.isdigit() and int(a) < int(b):
        return [f"§{i}" for i in range(int(a), int(b) + 1)]
    if a[:1].isalpha() and a[:1] == b[:1] and a[1:].isdigit() and b[1:].isdigit() and int(a[1:]) < int(b[1:]):
        return [f"{a[0]}{i}" for i in range(int(a[1:]), int(b[1:]) + 1)]
    return [first, last]


def parse_refs(refs: str) -> tuple[str, ...]:
    """The sections (normalised to `§N`) and labels of a citation's tail, ranges expanded."""
    out: list[str] = []
    for match in REF_TOKEN.finditer(re.sub(r"\([^()\n]*\)|\"[^\"\n]*\"", " ", refs)):
        raw = match["ref"].replace(" ", "")
        ref = raw if raw[0] in "§ABCDEFGHIJKLMNOPQRSTUVWXYZ" else f"§{raw}"
        if match["sep"] in RANGE_SEPARATORS and out:
            out[-1:] = _expand(out[-1], ref)
        else:
            out.append(ref)
    return tuple(out)


def find_citations(text: str, known: set[str]) -> list[Citation]:
    """Citations of method notes in `text`: a name followed by sections/labels, a `docs/methods/` or `spec/` path,
    or a bare mention of a known note (whose file must exist)."""
    found = []
    for match in CITATION.finditer(text):
        refs = parse_refs(match["refs"] or "")
        if refs or match["prefix"] or match["name"] in known:
            found.append(Citation(match["name"], bool(match["prefix"]), refs, match[0].strip(), match.start()))
    return found


def anchors(path: Path) -> set[str]:
    """`§N` for every numbered heading and the label of every labelled heading or bold paragraph of a note."""
    text = path.read_text(encoding="utf-8")
    return {f"§{n}" for n in SECTION_HEADING.findall(text)} | set(LABEL_HEADING.findall(text))


def unresolved(citation: Citation, methods: Path = METHODS) -> list[str]:
    """Why `citation` does not resolve against the notes in `methods` (empty when it does)."""
    path = methods / f"{citation.name}.md"
    if not path.is_file():
        return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist"]
    have = anchors(path)
    return [f"{citation.name}.md has no section or label {ref}" for ref in citation.refs if ref not in have]


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    return [f for f in files if f != Path(__file__).resolve() and "__pycache__" not in f.parts]


def component_paths() -> list[str]:
    sources = [*sorted((ROOT / "configs").rglob("*.y*ml")), ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    paths = {p for f in sources for p in COMPONENT.findall(f.read_text(encoding="utf-8"))}
    return sorted(paths - PLACEHOLDERS)


@pytest.mark.parametrize("dotted", component_paths())
def test_component_imports(dotted: str) -> None:
    import_object(dotted)


def test_every_citation_resolves() -> None:
    known, problems, count = method_names(), [], 0
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for citation in find_citations(text, known):
            count += 1
            line = text.count("\n", 0, citation.start) + 1
            problems += [f"{path.relative_to(ROOT)}:{line}: {citation.text!r}: {why}" for why in unresolved(citation)]
    assert count > 50, f"only {count} citations found: is the scan broken?"
    assert not problems, "unresolved method-note citations:\n" + "\n".join(problems)


BENCH_RESULT = re.compile(r"(?:bench/)?results/([\w.-]+\.(?:md|png))")


def test_bench_results_pointers_exist() -> None:
    results = ROOT / "bench" / "results"
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in scanned_files()
        if results not in path.parents
        for name in BENCH_RESULT.findall(path.read_text(encoding="utf-8", errors="replace"))
        if not (results / name).is_file()
    ]
    assert not missing, "pointers to missing bench results:\n" + "\n".join(missing)


# The synthetic citations below are assembled from variables so that the scan above, and the script that rewrites
# citations to the docs/methods/ form, never read them as real ones.
BNPO, DLER, PPR, DIDI, PREF, PEERS, NOPE = "bnpo", "dler", "ppr", "didi_instruct", "pref_grpo", "peers", "no_such_note"


def _problems(text: str) -> list[str]:
    return [why for c in find_citations(text, method_names()) for why in unresolved(c)]


@pytest.mark.parametrize(
    "text",
    [
        f"see {BNPO}.md §5 for the rule",
        f"see docs/methods/{BNPO}.md §5 for the rule",
        f"({PPR}.md §6.2; verl)",
        f"facts from `/work/shared/spec/{PEERS}.md`, TRL",
        f"facts from `docs/methods/{PEERS}.md`, TRL",
        f"arXiv:2509.25598 §{PPR}.md 6)",
        f"Spec {DIDI}.md §12, §17 and E7 (arXiv:2509.25035)",
        f"{BNPO}.md E1–E8 and {DLER}.md D1–D6 on hand-made rollouts",
        f"{PREF}.md P3 (Flow-GRPO step), P4 (DanceGRPO step), P8 (trained steps), the σ = 1",
    ],
)
def test_resolver_accepts_real_sections_in_both_forms(text: str) -> None:
    assert find_citations(text, method_names())
    assert _problems(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{BNPO}.md §99", "no section or label §99"),
        (f"docs/methods/{BNPO}.md §99", "no section or label §99"),
        (f"{DLER}.md D9", "no section or label D9"),
        (f"{BNPO}.md E1–E9", "no section or label E9"),
        (f"{NOPE}.md §1", "does not exist"),
        (f"docs/methods/{NOPE}.md", "does not exist"),
        (f"spec/{NOPE}.md", "does not exist"),
    ],
)
def test_resolver_rejects_made_up_citations(text: str, expected: str) -> None:
    problems = _problems(text)
    assert len(problems) == 1 and expected in problems[0], problems


def test_parse_refs_reads_lists_and_ranges() -> None:
    assert parse_refs(" §12, §17 and E7 (arXiv)") == ("§12", "§17", "E7")
    assert parse_refs(" §3–§6") == ("§3", "§4", "§5", "§6")
    assert parse_refs(" §4–5:") == ("§4", "§5")
    assert parse_refs(" P1-P3") == ("P1", "P2", "P3")
    assert parse_refs(" D1/D5") == ("D1", "D5")
    assert parse_refs(" §1.4/§6") == ("§1.4", "§6")
    assert parse_refs(" 6") == ("§6",)
    assert parse_refs(" §10 oracles M2–M4") == ("§10", "M2", "M3", "M4")


def test_non_citations_are_ignored() -> None:
    known = method_names()
    text = f"bench/results/didi_nfe.md, README.md, docs/algorithms.md and {BNPO}.md:"
    assert [c.name for c in find_citations(text, known)] == [BNPO]  # the bare note name only
    assert find_citations("architecture.md and STYLE.md", known) == []
