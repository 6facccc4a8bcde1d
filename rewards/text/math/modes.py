"""How each grading mode turns a completion and its gold alternatives into 1/0: one small class per mode.

`lenient` is this toolkit's forgiving grader (the tiny recipes' default); `deepscaler`, `bnpo` and
`verl_math_verify` reproduce the released reward functions named in their docstrings (differences that remain
are listed in docs/methods/dler.md and docs/methods/bnpo.md). Each class prepares a row's gold alternatives once
(`prepare`) and grades a completion against them (`grade` -> (score, outcome)).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from rewards.text.math.deepscaler import (
    deepscaler_boxed,
    deepscaler_golds,
    deepscaler_solution,
    grade_mathd,
    grade_sympy,
)
from rewards.text.math.extraction import ThinkMode, answer_region, gold_answers, last_boxed, normalize_answer_string
from rewards.text.math.grader import MathGrader

Prepared = list[tuple[str, list[Any]]]  # (gold text, its math-verify parse) per alternative


class LenientGrading:
    """The toolkit's own grader: math-verify over a region, then a normalized string comparison of the boxed answer.

    Args:
        think_mode, think_close, last_n_chars: which part is graded (`extraction.answer_region`).
        require_boxed: grade only the last `\\boxed{}` of the region (none there: 0).
        string_fallback: also accept a boxed answer whose normalized string equals a normalized gold.
    """

    counted = ("no_think", "no_answer", "string_fallback")

    def __init__(
        self,
        grader: MathGrader,
        think_mode: ThinkMode,
        think_close: str,
        require_boxed: bool,
        last_n_chars: int | None,
        string_fallback: bool,
    ) -> None:
        self.grader, self.think_mode, self.think_close = grader, think_mode, think_close
        self.require_boxed, self.last_n_chars, self.string_fallback = require_boxed, last_n_chars, string_fallback

    def prepare(self, values: list[Any]) -> Prepared:
        return [(gold, self.grader.parse_gold(gold)) for gold in gold_answers({"answer": values}, ["answer"])]

    def grade(self, completion: str, golds: Prepared) -> tuple[float, str]:
        region = answer_region(completion, self.think_mode, self.think_close, self.last_n_chars)
        if region is None:
            return 0.0, "no_think"
        boxed = last_boxed(region)
        if self.require_boxed and boxed is None:
            return 0.0, "no_answer"
        prediction = self.grader.parse("\\boxed{" + boxed + "}" if self.require_boxed and boxed else region)
        if any(self.grader.verify(parsed, prediction) for _, parsed in golds):
            return 1.0, "correct"
        if self.string_fallback and boxed is not None:
            answer = normalize_answer_string(boxed)
            if any(answer == normalize_answer_string(gold) for gold, _ in golds):
                return 1.0, "string_fallback"
        return 0.0, "wrong" if prediction or boxed is not None else "no_answer"


class DeepScaleRGrading:
    """DLER's `deepscaler_reward_fn` (NVlabs/DLER, verl-dler/verl/utils/reward_score/deepscaler/).

    The text between the first and second `</think>` must hold `\\boxed{...}`; its last one is checked against
    each gold with math-verify on the bare strings, then the mathd normalization, then sympy.
    """

    counted = ("no_think", "no_answer", "mathd_fallback", "sympy_fallback", "unusable_gold")

    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader

    def prepare(self, values: list[Any]) -> Prepared:
        return [(gold, self.grader.parse(gold)) for gold in deepscaler_golds(values)]

    def grade(self, completion: str, golds: Prepared) -> tuple[float, str]:
        solution = deepscaler_solution(completion)
        if solution is None:
            return 0.0, "no_think"
        answer = deepscaler_boxed(solution)
        if answer is None:
            return 0.0, "no_answer"
        if not golds:
            return 0.0, "unusable_gold"
        parsed_answer = self.grader.parse(answer)
        for gold, parsed_gold in golds:
            if self.grader.verify(parsed_gold, parsed_answer):
                return 1.0, "correct"
            if grade_mathd(answer, gold):
                return 1.0, "mathd_fallback"
            if grade_sympy(answer, gold):
                return 1.0, "sympy_fallback"
        return 0.0, "wrong"


@lru_cache(maxsize=1)
def _bnpo_configs() -> tuple[list[Any], list[Any]]:
    """BNPO's (gold, prediction) extraction configs: LaTeX only, boxed first; the gold may go without an anchor."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    def config(lenient: bool) -> list[Any]:
        normalization = NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=lenient, nits=lenient, boxed="all"
        )
        return [
            LatexExtractionConfig(
                normalization_config=normalization, boxed_match_priority=0, try_extract_without_anchor=lenient
            )
        ]

    return config(True), config(False)


def _gold_strings(values: list[Any]) -> list[str]:
    """Gold alternatives for the boxed-gold modes: `str()` of each, a worked solution's last boxed content."""
    golds = []
    for value in values:
        text = str(value)
        boxed = last_boxed(text) if "\\boxed" in text else None
        golds.append(text if boxed is None else boxed)
    return golds


def _grade_boxed_gold(
    grader: MathGrader, golds: Prepared, parse_prediction: Callable[[], list[Any]]
) -> tuple[float, str]:
    """The boxed-gold modes' decision: no parsable gold -> 0; no extracted prediction -> 0; else verify."""
    if not any(parsed for _, parsed in golds):
        return 0.0, "unusable_gold"
    prediction = parse_prediction()
    if not prediction:
        return 0.0, "no_answer"
    return (1.0, "correct") if any(grader.verify(parsed, prediction) for _, parsed in golds) else (0.0, "wrong")


class BNPOGrading:
    """BNPO's `accuracy_reward` (changyi7231/BNPO, recipe/bnpo/src/reward_manager.py).

    Gold parsed as `\\boxed{gold}` (LaTeX only, no string fallback); the prediction is the first LaTeX match,
    boxed first, in the last 500 characters of the output, with no `</think>` handling.
    """

    counted = ("no_answer", "unusable_gold")
    last_n_chars = 500

    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader

    def prepare(self, values: list[Any]) -> Prepared:
        gold_config, _ = _bnpo_configs()
        return [
            (gold, self.grader.parse("\\boxed{" + gold + "}", gold_config, "no_fallback", "first_match"))
            for gold in _gold_strings(values)
        ]

    def grade(self, completion: str, golds: Prepared) -> tuple[float, str]:
        _, prediction_config = _bnpo_configs()
        tail = completion[-self.last_n_chars :]
        return _grade_boxed_gold(
            self.grader, golds, lambda: self.grader.parse(tail, prediction_config, "first_match", "first_match")
        )


class VerlMathVerifyGrading:
    """verl's `math_verify.compute_score` (volcengine/verl, verl/utils/reward_score/math_verify.py).

    Gold parsed as `\\boxed{gold}` with math-verify's LaTeX extraction; the whole output parsed with plain
    expressions and LaTeX (math-verify's `math_metric`), no `</think>` handling.
    """

    counted = ("no_answer", "unusable_gold")

    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader

    def prepare(self, values: list[Any]) -> Prepared:
        from math_verify import LatexExtractionConfig

        return [(g, self.grader.parse("\\boxed{" + g + "}", [LatexExtractionConfig()])) for g in _gold_strings(values)]

    def grade(self, completion: str, golds: Prepared) -> tuple[float, str]:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        config = [ExprExtractionConfig(), LatexExtractionConfig()]
        return _grade_boxed_gold(self.grader, golds, lambda: self.grader.parse(completion, config))
