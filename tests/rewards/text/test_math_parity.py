"""Parity of `MathAccuracyReward`'s official modes with the released reward functions they reproduce.

Expected scores are what the released functions return for these inputs, derived by reading their code (never
copied) and running them beside ours with math-verify 0.9.0:

* mode="deepscaler": `deepscaler_reward_fn` of NVlabs/DLER at ea7d4f7b54eff6e85267fab1af4863d0aec27d51,
  `verl-dler/verl/utils/reward_score/deepscaler/` (math_reward.py, math_utils/utils.py), the DeepScaleR reward
  (agentica-project/rllm at 874daa4acb7f451dc2a4b2b6e8ce28f5aa88d1f5, rllm/rewards/) with math-verify added first.
* mode="bnpo": `accuracy_reward` of changyi7231/BNPO at a9c51b9848283286ff3c51afbba2a867977a2e36,
  recipe/bnpo/src/reward_manager.py.
* mode="verl_math_verify": `compute_score` of volcengine/verl at b178a3cd56f58b2d502255daba591e92833930a7,
  verl/utils/reward_score/math_verify.py.

Where the official function cannot take an input (a list of golds in bnpo/verl, a row without a gold) the
toolkit's rule applies: alternatives, NaN. Remaining differences: docs/methods/dler.md and docs/methods/bnpo.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from rewards.text.math import MathAccuracyReward, grade_mathd, grade_sympy, mathd_normalize, sympy_normalize
from toolkit.config import load_config

FILLER = " and so on" * 60  # 600 characters of prose without numbers
R1 = "<think>\nLet me compute.\n</think>\n\n"  # an R1-distill completion: the prompt already opened <think>

# (completion, gold, official score)
DEEPSCALER_CASES: list[tuple[str, Any, float]] = [
    (R1 + "So the answer is \\boxed{7}.", "7", 1.0),
    ("So the answer is \\boxed{7}.", "7", 0.0),  # no </think>: format error
    ("\\boxed{7} while thinking</think> the answer is 7.", "7", 0.0),  # no box after </think>
    (R1 + "The answer is 7.", "7", 0.0),  # a bare number is not extracted
    (R1 + "\\boxed 7", "7", 0.0),  # only the braced form is read
    (R1 + "\\fbox{7}", "7", 0.0),  # \fbox is never read (the \boxed test comes first)
    (R1 + "$\\boxed{7}$ and then $\\boxed{8}$", "8", 1.0),  # the last box
    (R1 + "$\\boxed{7}$ and then $\\boxed{8}$", "7", 0.0),
    ("a</think> \\boxed{7} </think> \\boxed{8}", "7", 1.0),  # graded between the first and second </think>
    ("a</think> \\boxed{7} </think> \\boxed{8}", "8", 0.0),
    ("a</think> no box </think> \\boxed{7}", "7", 0.0),
    (R1 + "\\boxed{\\boxed{7}}", "7", 1.0),  # the innermost (last) \boxed
    (R1 + "\\boxed{\\frac{1}{2", "\\frac{1}{2}", 0.0),  # unbalanced: cut mid-answer
    (R1 + "\\boxed{}", "7", 0.0),
    (R1 + "\\boxed{1024}", "2^{10}", 0.0),  # math-verify reads the bare "2^{10}" as 2; sympy refuses "^{"
    (R1 + "\\boxed{2^{10}}", "1024", 0.0),
    (R1 + "\\boxed{3}", "\\log_2 8", 0.0),  # bare LaTeX: math-verify reads 8
    (R1 + "\\boxed{1.5e3}", "1500", 1.0),  # sympy normalization: float("1.5e3") is a whole number
    (R1 + "\\boxed{\\emptyset}", "\\varnothing", 1.0),  # both become the same symbol in LaTeX-to-text
    (R1 + "\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    (R1 + "\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    (R1 + "\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    (R1 + "\\boxed{2/4}", "\\frac{1}{2}", 1.0),  # math-verify accepts what sympy's fraction rule would not
    (R1 + "\\boxed{1,000}", "1000", 1.0),
    (R1 + "\\boxed{90^\\circ}", "90", 1.0),
    (R1 + "\\boxed{5\\%}", "5", 1.0),
    (R1 + "\\boxed{x = 5}", "5", 1.0),  # mathd drops a short left-hand side
    (R1 + "\\boxed{3 \\text{ cm}}", "3", 1.0),  # mathd drops a unit after "\text{ "
    (R1 + "\\boxed{\\text{Tuesday}}", "Tuesday", 1.0),  # mathd unwraps \text{}
    (R1 + "\\boxed{tuesday}", "Tuesday", 1.0),  # sympy normalization is case-insensitive
    (R1 + "\\boxed{Wednesday}", "Tuesday", 0.0),
    (R1 + "\\boxed{A}", "(A)", 1.0),
    (R1 + "\\boxed{(1,2)}", "(2,1)", 0.0),
    (R1 + "\\boxed{[1,2]}", "(1,2)", 0.0),  # an interval's brackets must match
    (R1 + "\\boxed{(x-1)(x+1)}", "x^2-1", 1.0),
    (R1 + "\\boxed{7 3/4}", "\\frac{31}{4}", 1.0),  # a mixed number
    (R1 + "\\boxed{8}", "7", 0.0),
    (R1 + "\\boxed{7}", "The solution ends with \\boxed{7}.", 1.0),  # a boxed gold gives its box
    (R1 + "\\boxed{7}", 7, 1.0),  # numbers are compared through str()
    (R1 + "\\boxed{\\frac{1}{2}}", 0.5, 1.0),
    (R1 + "\\boxed{five}", ["5", "five"], 1.0),  # a list holds alternatives
    (R1 + "\\boxed{5}", ["5", "five"], 1.0),
    (R1 + "\\boxed{6}", ["5", "five"], 0.0),
]

BNPO_CASES: list[tuple[str, Any, float]] = [
    ("So the answer is \\boxed{7}.", "7", 1.0),
    ("\\boxed{7}" + FILLER, "7", 0.0),  # the answer lies before the last 500 characters
    ("x" * 600 + " so \\boxed{7}", "7", 1.0),
    ("The answer is 7.", "7", 0.0),  # LaTeX extraction only: a bare number is not read
    ("The final answer is $7$.", "7", 1.0),
    ("$7$", "7", 0.0),  # no anchor and no box: not extracted
    ("\\boxed{7} first, then \\boxed{8}", "8", 0.0),  # boxes in one stretch of text are read as the set {7, 8}
    ("\\boxed{7} first, then \\boxed{8}", "7", 0.0),
    ("$\\boxed{7}$ first, then $\\boxed{8}$", "8", 1.0),  # separate math spans: the last box
    ("<think>maybe \\boxed{3}</think> so \\boxed{7}", "7", 1.0),  # the tag ends the span (no </think> rule)
    ("<think>maybe \\boxed{3}</think> so \\boxed{7}", "3", 0.0),
    ("so \\boxed 7", "7", 0.0),  # math-verify reads only the braced form
    ("so \\fbox{7}", "7", 0.0),
    ("\\boxed{1024}", "2^{10}", 1.0),  # the gold is parsed as \boxed{2^{10}}
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{3}", "\\log_2 8", 1.0),
    ("\\boxed{1500}", "1.5e3", 0.0),
    ("\\boxed{\\emptyset}", "\\varnothing", 0.0),  # \varnothing parses as a symbol, \emptyset as the empty set
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{(1,2)}", "(1,2)", 1.0),
    ("\\boxed{(2,1)}", "(1,2)", 0.0),
    ("\\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\text{Tuesday}}", "Tuesday", 1.0),  # both sides parse to the same product of letters
    ("\\boxed{Wednesday}", "Tuesday", 0.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("\\boxed{8}", "7", 0.0),
    ("\\boxed{\\frac{1}{2", "\\frac{1}{2}", 0.0),
    ("no answer at all", "7", 0.0),
    ("\\boxed{7}", "\\frac{1}{", 0.0),  # a gold that does not parse scores 0
    ("\\boxed{7}", "so \\boxed{7}.", 1.0),  # a worked solution gives its last box (BNPO's data preparation)
    ("\\boxed{5}", ["5", "five"], 1.0),
    ("\\boxed{6}", ["5", "6"], 1.0),
    ("\\boxed{4}", ["5", "6"], 0.0),
]

VERL_CASES: list[tuple[str, Any, float]] = [
    ("So the answer is \\boxed{7}.", "7", 1.0),
    ("The answer is 7.", "7", 1.0),  # plain expressions are extracted too
    ("7", "7", 1.0),
    ("\\boxed{7}" + FILLER, "7", 1.0),  # the whole output, no 500-character window
    ("The answer is 8.", "7", 0.0),
    ("<think>maybe 3</think> the answer is 7", "7", 1.0),
    ("\\boxed{7} first, then \\boxed{8}", "8", 0.0),  # boxes in one stretch of text are read as the set {7, 8}
    ("$\\boxed{7}$ first, then $\\boxed{8}$", "8", 1.0),
    ("$\\boxed{7}$ first, then $\\boxed{8}$", "7", 0.0),
    ("so \\boxed 7", "7", 1.0),  # the plain-expression extraction finds the 7
    ("so \\fbox{7}", "7", 0.0),
    ("\\boxed{1024}", "2^{10}", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{3}", "\\log_2 8", 1.0),
    ("1.5e3", "1500", 0.0),
    ("\\boxed{\\emptyset}", "\\varnothing", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is 1/2.", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{(1,2)}", "(1,2)", 1.0),
    ("\\boxed{(2,1)}", "(1,2)", 0.0),
    ("\\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\text{Tuesday}}", "Tuesday", 1.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{8}", "7", 0.0),
    ("no answer at all", "7", 0.0),
    ("\\boxed{7}", "\\frac{1}{", 0.0),  # a gold that does not parse scores 0
    ("\\boxed{7}", "so \\boxed{7}.", 1.0),
    ("\\boxed{5}", ["5", "five"], 1.0),
    ("\\boxed{6}", ["5", "6"], 1.0),
    ("\\boxed{4}", ["5", "6"], 0.0),
]


def score(mode: str, completion: str, gold: Any) -> float:
    return float(MathAccuracyReward(mode=mode)([""], [completion], answer=[gold]).scores[0])  # type: ignore[arg-type]


@pytest.mark.parametrize(("completion", "gold", "expected"), DEEPSCALER_CASES)
def test_deepscaler_mode_matches_deepscaler_reward_fn(completion: str, gold: Any, expected: float) -> None:
    assert score("deepscaler", completion, gold) == expected


@pytest.mark.parametrize(("completion", "gold", "expected"), BNPO_CASES)
def test_bnpo_mode_matches_bnpo_accuracy_reward(completion: str, gold: Any, expected: float) -> None:
    assert score("bnpo", completion, gold) == expected


@pytest.mark.parametrize(("completion", "gold", "expected"), VERL_CASES)
def test_verl_math_verify_mode_matches_verl_compute_score(completion: str, gold: Any, expected: float) -> None:
    assert score("verl_math_verify", completion, gold) == expected


# ------------------------------------------------------------------------------------------- DeepScaleR pieces


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("\\text{ Tuesday }", "Tuesday"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\sqrt3", "\\sqrt{3}"),
        (".5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("03/4", "03/4"),  # not a canonical integer ratio
        ("k = 5", "5"),
        ("abc = 5", "abc=5"),  # a long left-hand side stays
        ("5 \\text{ m}", "5"),
        ("5 \\text{ m} \\text{ s}", "5 \\text{ m} \\text{ s}"),  # two units: the normalization gives up
        ("1\\frac", "1\\frac"),  # a dangling \frac: the normalization gives up
    ],
)
def test_mathd_normalization(answer: str, normalized: str) -> None:
    assert mathd_normalize(answer) == normalized


@pytest.mark.parametrize(
    ("expr", "normalized"),
    [
        ("1.5e3", "1500"),
        ("\\$1,000", "1000"),
        ("2 million", "2*10^6"),
        ("5 meters", "5"),
        ("\\text{Tuesday}", "tues"),  # "day" is one of the unit words it removes
        ("\\frac{1}{2}", "1/2"),
        ("7 3/4", "7+3/4"),
        ("{7}", "7"),
    ],
)
def test_sympy_normalization(expr: str, normalized: str) -> None:
    assert sympy_normalize(expr) == normalized


def test_sympy_check_rules_and_our_power_guard() -> None:
    assert grade_sympy("2/4", "1/2") is False  # unreduced fractions are compared as strings
    assert grade_sympy("2.0", "2") is True
    assert grade_sympy("2.5", "2") is False  # an integer gold needs an integer answer
    assert grade_sympy("\\sqrt{2}/2", "1/\\sqrt{2}") is True
    assert grade_sympy("2^(1/2)", "\\sqrt{2}") is False  # "^(" never reaches sympy
    assert grade_sympy("2**(1/2)", "\\sqrt{2}") is False  # ours: ** is guarded like ^ (released: True)
    assert grade_sympy("9**9**9", "1/2") is False  # would not finish under the released guards
    assert grade_mathd("\\left( 1,2 \\right)", "(1,2)") is True


# ------------------------------------------------------------------------------------------- reward plumbing


def test_outcomes_are_counted_per_mode() -> None:
    samples = [R1 + "\\boxed{7}", "\\boxed{7}", R1 + "no box", R1 + "\\boxed{\\text{Tuesday}}", R1 + "\\boxed{1.5e3}"]
    out = MathAccuracyReward(mode="deepscaler")([""] * 5, samples, answer=["7", "7", "7", "Tuesday", "1500"])
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert (out.metrics["no_think"], out.metrics["no_answer"]) == (1.0, 1.0)
    assert (out.metrics["mathd_fallback"], out.metrics["sympy_fallback"]) == (1.0, 1.0)
    out = MathAccuracyReward(mode="bnpo")([""] * 3, ["\\boxed{7}", "none", "\\boxed{7}"], answer=["7", "7", "\\frac{"])
    assert out.scores.tolist() == [1.0, 0.0, 0.0]
    assert (out.metrics["no_answer"], out.metrics["unusable_gold"]) == (1.0, 1.0)


def test_rows_without_gold_are_nan_in_every_mode() -> None:
    for mode in ("lenient", "deepscaler", "bnpo", "verl_math_verify"):
        out = MathAccuracyReward(mode=mode)([""] * 3, [R1 + "\\boxed{7}"] * 3, answer=[None, "", []])  # type: ignore[arg-type]
        assert all(math.isnan(s) for s in out.scores.tolist()) and out.metrics["missing_gold"] == 3.0


def test_official_modes_refuse_lenient_options() -> None:
    with pytest.raises(ValueError, match="mode='ground_truth'"):
        MathAccuracyReward(mode="ground_truth")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="think_mode='require' only shapes mode='lenient'"):
        MathAccuracyReward(mode="deepscaler", think_mode="require")
    with pytest.raises(ValueError, match="last_n_chars=300"):
        MathAccuracyReward(mode="bnpo", last_n_chars=300)
    assert MathAccuracyReward(mode="bnpo", last_n_chars=500).mode == "bnpo"  # states the official window
    with pytest.raises(ValueError, match="gold=None"):
        MathAccuracyReward().grade("\\boxed{7}", None)
    assert MathAccuracyReward(mode="deepscaler").grade("a</think>\\boxed{7}", ["8", "7"]) == (1.0, "correct")


RECIPES = Path(__file__).resolve().parents[3] / "configs" / "text_reasoning"


@pytest.mark.parametrize(
    ("recipe", "mode"),
    [
        ("dler_r1-distill-1.5b.yaml", "deepscaler"),
        ("dler_r1-distill-1.5b_official.yaml", "deepscaler"),
        ("da_dler_r1-distill-1.5b.yaml", "deepscaler"),
        ("bnpo_qwen2.5-math-7b.yaml", "bnpo"),
        ("tiny.yaml", "lenient"),
    ],
)
def test_recipes_name_their_grading_mode(recipe: str, mode: str) -> None:
    accuracy = load_config(RECIPES / recipe, [])["rewards"]["accuracy"]
    assert accuracy.get("mode", "lenient") == mode
