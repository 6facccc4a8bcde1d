"""A calculator tool: safe arithmetic on numbers, parsed with `ast` and evaluated node by node (never `eval`).

Allowed: int/float literals, + - * / // % **, unary + -, parentheses. Names, calls, attributes,
strings, comparisons and everything else are rejected, and so are huge powers, results and inputs,
so a policy cannot make the tool hang or allocate without bound.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_expression(
    expression: str, max_length: int = 200, max_exponent: float = 1000.0, max_magnitude: float = 1e100
) -> int | float:
    """The value of an arithmetic expression.

    Args:
        expression: e.g. "3 * (4 + 5) / 2"; `^` is read as power.
        max_length: longest accepted expression in characters.
        max_exponent: largest |exponent| of a power.
        max_magnitude: largest |value| of any intermediate result.

    Raises:
        ValueError: not arithmetic, a limit exceeded, division by zero, or a non-finite result.
    """
    text = expression.strip().replace("^", "**")
    if not text:
        raise ValueError("empty expression")
    if len(text) > max_length:
        raise ValueError(f"expression longer than {max_length} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from error
    return _evaluate(tree.body, max_exponent, max_magnitude)


def _evaluate(node: ast.AST, max_exponent: float, max_magnitude: float) -> int | float:
    value: int | float
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand, max_exponent, max_magnitude))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, max_exponent, max_magnitude)
        right = _evaluate(node.right, max_exponent, max_magnitude)
        if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
            raise ValueError(f"exponent {right} is larger than {max_exponent}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as error:
            raise ValueError("division by zero") from error
        except OverflowError as error:
            raise ValueError("result too large") from error
    else:
        raise ValueError(f"unsupported syntax: {type(node).__name__}")
    if isinstance(value, complex):
        raise ValueError("complex result")
    if abs(value) > max_magnitude or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"result too large or not finite (limit {max_magnitude:g})")
    return value


def format_number(value: int | float, significant_digits: int = 12) -> str:
    """Integers exactly; floats with `significant_digits` digits and no trailing zeros (2.0 -> "2")."""
    if isinstance(value, int):
        return str(value)
    return format(value, f".{significant_digits}g")


class Calculator:
    """The calculator tool: `<calculator>2 * (3 + 4)</calculator>` -> "14".

    A bad expression is the policy's mistake, not a failed call: its observation is
    `"error: <reason>"` and the other queries of the batch are unaffected.

    Args:
        name: the action tag the model uses.
        max_length, max_exponent, max_magnitude: limits of `evaluate_expression`.
        significant_digits: digits of float results.
    """

    def __init__(
        self,
        name: str = "calculator",
        max_length: int = 200,
        max_exponent: float = 1000.0,
        max_magnitude: float = 1e100,
        significant_digits: int = 12,
    ) -> None:
        if max_length < 1 or max_exponent < 0 or max_magnitude <= 0 or significant_digits < 1:
            raise ValueError(
                f"invalid limits: max_length={max_length}, max_exponent={max_exponent}, "
                f"max_magnitude={max_magnitude}, significant_digits={significant_digits}"
            )
        self.name = name
        self.max_length = max_length
        self.max_exponent = max_exponent
        self.max_magnitude = max_magnitude
        self.significant_digits = significant_digits

    def __call__(self, queries: list[str]) -> list[str]:
        return [self._one(query) for query in queries]

    def _one(self, query: str) -> str:
        try:
            value = evaluate_expression(query, self.max_length, self.max_exponent, self.max_magnitude)
        except ValueError as error:
            return f"error: {error}"
        return format_number(value, self.significant_digits)
