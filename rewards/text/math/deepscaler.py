"""DeepScaleR's answer checks (the correctness reward DLER trains with), re-derived from the released behaviour.

Reference: `deepscaler_reward_fn` in NVlabs/DLER (`verl-dler/verl/utils/reward_score/deepscaler/`), a copy of
agentica-project/deepscaler's `math_utils` with math-verify added in front. An answer is the content of the last
`\\boxed{...}` of the text between the first and the second `</think>`; it is correct when any of three checks
accepts it against any gold alternative: math-verify on the bare strings, equality after the MATH dataset's
("mathd") string normalization, or a sympy difference check after a looser normalization. Deliberate
difference: powers written with `**` and factorials never reach sympy (the released check can hang on them).
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any

THINK_CLOSE = "</think>"
_WRAPPED_IN_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")


class _Unnormalizable(Exception):
    """The mathd normalization gave up on this string (the released code then compares it as it is)."""


# ---------------------------------------------------------------------------------------------- extraction


def deepscaler_solution(response: str) -> str | None:
    """The graded part of a response: between the first `</think>` and the next one (None without any)."""
    parts = response.split(THINK_CLOSE)
    return parts[1] if len(parts) > 1 else None


def deepscaler_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` content as DeepScaleR reads it.

    Requires the literal `\\boxed{` at the last `\\boxed` (so `\\boxed 7` and `\\fbox{7}` give None) and takes
    the text up to the first `}` that brings the brace count, started at that `\\boxed`, back to zero.
    """
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("\\boxed{", start):
        return None
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : index]
    return None


# ---------------------------------------------------------------------------------------------- mathd


_MATHD_EDITS: tuple[tuple[str, str], ...] = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
)
_CANONICAL_FRACTION = re.compile(r"(0|-?[1-9][0-9]*)/(0|-?[1-9][0-9]*)")


def mathd_normalize(answer: str) -> str:
    """The MATH dataset's answer normalization, as DeepScaleR's `grade_answer_mathd` applies it."""
    answer = answer.strip()
    wrapped = _WRAPPED_IN_TEXT.search(answer)
    if wrapped is not None:
        answer = wrapped.group("text").strip()
    try:
        return _mathd_clean(answer)
    except _Unnormalizable:
        return answer


def _mathd_clean(text: str) -> str:
    for old, new in _MATHD_EDITS:
        text = text.replace(old, new)
    if "\\text{ " in text:  # a unit after the number: keep what precedes it
        before, *rest = text.split("\\text{ ")
        if len(rest) != 1:
            raise _Unnormalizable
        text = before
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text.startswith("."):
        text = "0" + text
    if text.count("=") == 1 and len(text.split("=")[0]) <= 2:  # "x = 3" -> "3"
        text = text.split("=")[1]
    text = _brace_sqrt_arguments(text).replace(" ", "")
    text = _brace_frac_arguments(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    fraction = _CANONICAL_FRACTION.fullmatch(text)
    if fraction is not None:
        text = "\\frac{" + fraction.group(1) + "}{" + fraction.group(2) + "}"
    return text


def _brace_sqrt_arguments(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`: a one-character argument gets braces."""
    head, *tails = text.split("\\sqrt")
    out = [head]
    for tail in tails:
        if not tail:
            raise _Unnormalizable
        out.append("\\sqrt" + (tail if tail[0] == "{" else "{" + tail[0] + "}" + tail[1:]))
    return "".join(out)


def _brace_frac_arguments(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; a dangling `\\frac1` keeps the whole text."""
    head, *tails = text.split("\\frac")
    out = [head]
    for tail in tails:
        if not tail:
            raise _Unnormalizable
        if tail[0] == "{":
            out.append("\\frac" + tail)
        elif len(tail) < 2:
            return text
        elif tail[1] == "{":
            out.append("\\frac{" + tail[0] + "}" + tail[1:])
        else:
            out.append("\\frac{" + tail[0] + "}{" + tail[1] + "}" + tail[2:])
    return "".join(out)


def grade_mathd(given: str, gold: str) -> bool:
    """Equal after `mathd_normalize`."""
    return mathd_normalize(given) == mathd_normalize(gold)


# ---------------------------------------------------------------------------------------------- sympy


_SYMPY_EDITS: tuple[tuple[str, str], ...] = (
    ("\\%", "%"),
    ("\\$", "$"),
    ("$", ""),
    ("%", ""),
    (" or ", " , "),
    (" and ", " , "),
    ("million", "*10^6"),
    ("billion", "*10^9"),
    ("trillion", "*10^12"),
)
_UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month", "year",
    "foot", "feet", "inch", "yard",
)  # fmt: skip
_UNIT_PATTERNS = tuple(re.compile(word + r"(es)?(s)? *(\^[0-9]+)?") for word in _UNIT_WORDS)
_LATEX_SYMBOLS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_THOUSANDS_COMMA = re.compile(r"(\d),(\d\d\d)($|\D)")
_BAD_POWERS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_BRACKETS = "()[]"


def sympy_normalize(expr: str) -> str:
    """DeepScaleR's looser normalization before the sympy check (units, words, LaTeX to text, case)."""
    wrapped = _WRAPPED_IN_TEXT.search(expr)
    if wrapped is not None:
        expr = wrapped.group("text")
    for old, new in _SYMPY_EDITS:
        expr = expr.replace(old, new)
    for pattern in _UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr[:1] == "{" and expr[-1:] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    number = _as_float(expr)
    if number is not None and _near_integer(number):
        expr = str(round(number))
    if "\\" in expr:
        expr = _latex_to_text(expr)
    expr = re.sub("- *", "-", expr)
    expr = re.sub("([0-9]) +([0-9])", r"\1+\2", expr)  # a mixed number "7 3/4" -> "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_integer_string(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _near_integer(number: float) -> bool:
    try:
        return abs(number - int(round(number))) <= 1e-7
    except (OverflowError, ValueError):  # inf, nan
        return False


def _drop_thousands_commas(expr: str) -> str:
    while True:
        shorter = _THOUSANDS_COMMA.sub(r"\1\2\3", expr)
        if shorter == expr:
            return expr
        expr = shorter


def _is_integer_string(expr: str) -> bool:
    number = _as_float(_drop_thousands_commas(expr))
    return number is not None and _near_integer(number)


@lru_cache(maxsize=1)
def _latex_converter() -> Any:
    from pylatexenc.latex2text import LatexNodes2Text

    # pylatexenc logs a warning for every malformed macro (`\\frac` without arguments): one per graded answer
    logging.getLogger("pylatexenc.latex2text").setLevel(logging.ERROR)
    return LatexNodes2Text()


def _latex_to_text(expr: str) -> str:
    """LaTeX to plain text with pylatexenc (as the released code does); the input unchanged when that fails."""
    source = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    try:
        text = str(_latex_converter().latex_to_text(source))
    except Exception:  # noqa: BLE001 - pylatexenc raises many types on malformed LaTeX; the released code keeps the input
        return expr
    for symbol, name in _LATEX_SYMBOLS:
        text = text.replace(symbol, name)
    return text.strip()


def _split_tuple(expr: str) -> list[str]:
    """Elements of a tuple or interval `(a,b)` / `[a,b)`; anything else is one element."""
    expr = _drop_thousands_commas(expr)
    if not expr:
        return []
    inner = expr[1:-1]
    if len(expr) > 2 and expr[0] in _BRACKETS and expr[-1] in _BRACKETS and not any(c in inner for c in _BRACKETS):
        return [element.strip() for element in inner.split(",")]
    return [expr]


def _is_fraction(expr: str) -> bool:
    return re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", expr) is not None


def _sympy_allowed(expr: str) -> bool:
    """The released guards (at most 2 distinct letters, no braced or parenthesized or stacked exponents), plus
    ours: `**` is read as `^` for those guards, and factorials are refused."""
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    powers = "".join(expr.split()).replace("**", "^")
    if len(letters) > 2 or "!" in expr or "^{" in powers or "^(" in powers:
        return False
    return not any(pattern.search(powers) for pattern in _BAD_POWERS)


def _equal_under_sympy(gold: str, given: str) -> bool:
    difference = f"({gold})-({given})"
    if not _sympy_allowed(difference):
        return False
    import sympy
    from sympy.parsing import sympy_parser

    transformations = (*sympy_parser.standard_transformations, sympy_parser.implicit_multiplication_application)
    try:
        parsed = sympy_parser.parse_expr(difference.replace("^", "**"), transformations=transformations)
        return bool(sympy.simplify(parsed) == 0)
    except Exception:  # noqa: BLE001 - any parse or simplify failure means "not shown equal", as released
        return False


def grade_sympy(given: str, gold: str) -> bool:
    """DeepScaleR's `grade_answer_sympy`: equal normalized strings, or element-wise sympy equality."""
    gold_norm, given_norm = sympy_normalize(gold), sympy_normalize(given)
    if gold_norm == given_norm:
        return True
    if not given_norm:
        return False
    gold_items, given_items = _split_tuple(gold_norm), _split_tuple(given_norm)
    if len(gold_items) > 1 and (gold_norm[0] != given_norm[0] or gold_norm[-1] != given_norm[-1]):
        return False  # (a,b) against [a,b]
    if len(gold_items) != len(given_items):
        return False
    return all(_elements_equal(g, p) for g, p in zip(gold_items, given_items, strict=True))


def _elements_equal(gold: str, given: str) -> bool:
    if _is_fraction(gold) and _is_fraction(given):
        return gold == given  # an unreduced fraction is not accepted
    if _is_integer_string(gold) != _is_integer_string(given):
        return False  # an integer gold needs an integer answer
    return _equal_under_sympy(gold, given)


def deepscaler_golds(values: list[Any]) -> list[str]:
    """Gold alternatives as DeepScaleR prepares them: `str()` of each; one holding `\\boxed` gives its boxed content."""
    golds = []
    for value in values:
        text = str(value)
        gold = deepscaler_boxed(text) if "\\boxed" in text else text
        if gold is not None:
            golds.append(gold)
    return golds
