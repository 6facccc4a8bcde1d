"""Math answer correctness: `MathAccuracyReward` with a lenient grader and three released reward functions.

Modes: "lenient" (default; math-verify over a configurable region, then a normalized string comparison);
"deepscaler" (DLER's `deepscaler_reward_fn`: the boxed answer between the first and second `</think>`,
math-verify, then mathd and sympy fallbacks); "bnpo" (BNPO's `accuracy_reward`: gold parsed as `\\boxed{gold}`,
first LaTeX match in the last 500 characters, no string fallback); "verl_math_verify" (verl's math-verify
reward). A list of gold answers holds alternatives. Scores are 1/0, NaN only when a row has no gold answer.
"""

from rewards.text.math.deepscaler import deepscaler_boxed, grade_mathd, grade_sympy, mathd_normalize, sympy_normalize
from rewards.text.math.extraction import (
    BOXED_COMMANDS,
    DEFAULT_ANSWER_KEYS,
    ThinkMode,
    answer_region,
    gold_answer,
    gold_answers,
    last_boxed,
    normalize_answer_string,
    raw_gold_values,
)
from rewards.text.math.grader import MathGrader, TimeoutMode
from rewards.text.math.reward import MathAccuracyReward, MathMode

__all__ = [
    "BOXED_COMMANDS",
    "DEFAULT_ANSWER_KEYS",
    "MathAccuracyReward",
    "MathGrader",
    "MathMode",
    "ThinkMode",
    "TimeoutMode",
    "answer_region",
    "deepscaler_boxed",
    "gold_answer",
    "gold_answers",
    "grade_mathd",
    "grade_sympy",
    "last_boxed",
    "mathd_normalize",
    "normalize_answer_string",
    "raw_gold_values",
    "sympy_normalize",
]
