"""The `calculator` tool: arithmetic on exact rationals, through a small AST evaluator (never ``eval``).

Numbers are ``fractions.Fraction``: ``0.1 + 0.2`` is exactly ``3/10`` and ``48/2`` is ``24``. Functions
whose results are irrational in general (``sqrt`` of a non-square, ``pi``, ``e``, powers with a fractional
exponent) give floats, shown as decimals. Every limit below is checked *before* the work is done, so an
expression can fail but never hang or exhaust memory.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from fractions import Fraction

from .base import Tool, ToolError, tool_from_function

MAX_LENGTH = 1000  # characters of an expression
MAX_DEPTH = 50  # nesting of the parsed expression
MAX_EXPONENT = 10_000  # |n| in x ** n
MAX_DIGITS = 1000  # decimal digits of any numerator or denominator along the way
_MAX_BITS = int(MAX_DIGITS * 3.33) + 4

Number = Fraction | float

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
}


def _exact(x: Number) -> bool:
    return isinstance(x, Fraction)


def _check(x: Number) -> Number:
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ToolError("the result is too large (overflow)")
        return x
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > _MAX_BITS:
        raise ToolError(f"a number in the calculation has more than {MAX_DIGITS} digits")
    return x


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ToolError("sqrt of a negative number")
    if _exact(x):
        n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if n * n == x.numerator and d * d == x.denominator:
            return Fraction(n, d)
    return math.sqrt(x)


def _round(x: Number, ndigits: Number = Fraction(0)) -> Number:
    if not (_exact(ndigits) and ndigits.denominator == 1) or abs(ndigits) > MAX_DIGITS:
        raise ToolError("round's second argument must be a whole number of digits")
    return Fraction(round(Fraction(x), int(ndigits)))


def _int_fn(f: Callable[[Fraction], int]) -> Callable[[Number], Number]:
    return lambda x: Fraction(f(Fraction(x)))


def _log(x: Number, base: Number | None = None) -> Number:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise ToolError("log needs a positive number (and a positive base other than 1)")
    return math.log(x) if base is None else math.log(x, base)


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": _sqrt, "abs": abs, "round": _round, "floor": _int_fn(math.floor), "ceil": _int_fn(math.ceil),
    "min": min, "max": max, "log": _log, "exp": lambda x: math.exp(x),
}
CONSTANTS: dict[str, Number] = {"pi": math.pi, "e": math.e}


def _power(a: Number, b: Number) -> Number:
    if _exact(b) and b.denominator == 1:
        n = int(b)
        if abs(n) > MAX_EXPONENT:
            raise ToolError(f"exponent {n} is beyond the limit of {MAX_EXPONENT}")
        if a == 0 and n < 0:
            raise ToolError("division by zero (0 to a negative power)")
        if _exact(a):
            bits = max(a.numerator.bit_length(), a.denominator.bit_length())
            if bits * abs(n) > _MAX_BITS and abs(a) != 1:
                raise ToolError(f"the result would have more than {MAX_DIGITS} digits")
            return a ** n
    if a < 0:
        raise ToolError("a negative number to a fractional power is not a real number")
    try:
        return float(a) ** float(b)
    except OverflowError:
        raise ToolError("the result is too large (overflow)") from None


def _divide(a: Number, b: Number, op: ast.operator) -> Number:
    if b == 0:
        raise ToolError("division by zero")
    if isinstance(op, ast.Div):
        return a / b
    if isinstance(op, ast.FloorDiv):
        return Fraction(a // b) if _exact(a) and _exact(b) else float(a // b)
    return a % b


class _Evaluator:
    def __init__(self, text: str) -> None:
        self.text = text

    def eval(self, node: ast.AST, depth: int = 0) -> Number:
        if depth > MAX_DEPTH:
            raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep")
        d = depth + 1
        if isinstance(node, ast.Expression):
            return self.eval(node.body, d)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ToolError(f"not a number: {node.value!r}")
            if isinstance(node.value, int):
                return _check(Fraction(node.value))
            # The literal as written: 0.1 is exactly 1/10, not the binary float nearest to it.
            literal = (ast.get_source_segment(self.text, node) or repr(node.value)).replace("_", "")
            try:
                return _check(Fraction(literal))
            except (ValueError, ZeroDivisionError):
                return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            x = self.eval(node.operand, d)
            return -x if isinstance(node.op, ast.USub) else x
        if isinstance(node, ast.BinOp):
            a, b = self.eval(node.left, d), self.eval(node.right, d)
            if isinstance(node.op, ast.Pow):
                return _check(_power(a, b))
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                return _check(_divide(a, b, node.op))
            if type(node.op) in _BINARY:
                return _check(_BINARY[type(node.op)](a, b))  # type: ignore[arg-type]
            if isinstance(node.op, ast.BitXor):
                raise ToolError("'^' is not a power here: write 2**3 for powers")
            raise ToolError(f"operator {type(node.op).__name__} is not supported (use + - * / // % **)")
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise ToolError(f"unknown name {node.id!r} (constants: {', '.join(CONSTANTS)})")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise ToolError(f"unknown function (available: {', '.join(FUNCTIONS)})")
            if node.keywords or not node.args:
                raise ToolError(f"{node.func.id}() takes one or more numbers, no keywords")
            args = [self.eval(a, d) for a in node.args]
            try:
                return _check(FUNCTIONS[node.func.id](*args))
            except TypeError:
                raise ToolError(f"{node.func.id}() got the wrong number of arguments ({len(args)})") from None
            except OverflowError:
                raise ToolError("the result is too large (overflow)") from None
        raise ToolError(f"{type(node).__name__} is not arithmetic: use numbers, + - * / // % **, parentheses "
                        f"and {', '.join(FUNCTIONS)}")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression: a Fraction when exact, a float otherwise."""
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_LENGTH} characters")
    if text.count("(") > MAX_DEPTH * 2:
        raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ToolError(f"not an arithmetic expression: {getattr(e, 'msg', e)}") from None
    except RecursionError:
        raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep") from None
    return _Evaluator(text).eval(tree)


def format_number(x: Number) -> str:
    """Integers as integers; other exact results as a fraction and a decimal; floats to 12 digits."""
    if isinstance(x, float):
        return f"{x:.12g}"
    if x.denominator == 1:
        return str(x.numerator)
    return f"{x.numerator}/{x.denominator} ≈ {float(x):.12g}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. 48/2 or 5*(3+2).

    Args:
        expression: numbers, + - * / // % ** and parentheses; sqrt, abs, round, floor, ceil, min, max,
            log, exp; the constants pi and e.
    """
    return format_number(evaluate(expression))


def calculator_tool() -> Tool:
    """The calculator as a Tool, named `calculator`."""
    return tool_from_function(calculate, name="calculator")
