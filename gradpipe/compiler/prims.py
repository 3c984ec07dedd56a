"""The language's elementwise primitives: arithmetic, comparisons and math functions.

One table for every part of the compiler and runtime that needs to know them: the
builder (which names are math functions, how many arguments each takes), the emitter
(node names), the IR's arithmetic nodes (the port of each operand), ``explain`` and
``diff`` (how a node reads as text), and ``docs/ops.md``.

An arithmetic node (``Kind.ARITH``) holds one primitive; its operands sit on the ports
of :data:`PORTS`, each either an input edge (a signal) or an argument (a scalar).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["BINARY", "COMPARISONS", "FUNCTIONS", "PORTS", "NODE_NAMES", "SUMMARIES", "is_mask_op", "text"]

#: infix operators on numbers, lowest precedence group last: ``+ - * / % **``
BINARY = ("+", "-", "*", "/", "%", "**")
#: comparisons: a mask (per element) or a boolean (two scalars)
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

#: the math functions and how many arguments each takes
FUNCTIONS: dict[str, int] = {
    "abs": 1, "sign": 1, "sqrt": 1, "exp": 1, "log": 1,
    "max": 2, "min": 2, "clamp": 3, "where": 3,
}

#: the ports of each primitive's operands, in argument order
PORTS: dict[str, tuple[str, ...]] = {
    **{op: ("lhs", "rhs") for op in BINARY + COMPARISONS},
    "neg": ("lhs",),
    **{f: ("lhs",) for f, n in FUNCTIONS.items() if n == 1},
    "max": ("lhs", "rhs"), "min": ("lhs", "rhs"),
    "clamp": ("lhs", "lo", "hi"),
    # ``like`` (optional): for a mask choosing between two scalars, a signal to take the dtype from
    "where": ("cond", "lhs", "rhs", "like"),
}

#: the node name of each primitive (``main/mul``, ``main/lt``, ``main/where``)
NODE_NAMES: dict[str, str] = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "%": "mod", "**": "pow", "neg": "neg",
    "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne",
    **{f: f for f in FUNCTIONS},
}

#: one line per math function and operator, for ``docs/ops.md``
SUMMARIES: dict[str, str] = {
    "abs(x)": "|x|, elementwise",
    "sign(x)": "-1, 0 or 1 by the sign of x (sign(0) = 0); as a stage, the op `sign`",
    "sqrt(x)": "the square root of x (a constant must be >= 0)",
    "exp(x)": "e to the power x",
    "log(x)": "the natural logarithm of x (a constant must be > 0)",
    "max(a, b)": "the larger of a and b, elementwise (NaN if either is NaN)",
    "min(a, b)": "the smaller of a and b, elementwise (NaN if either is NaN)",
    "clamp(x, lo, hi)": "min(max(x, lo), hi)",
    "where(cond, a, b)": "a where cond holds, else b; cond is a mask or a boolean (a comparison)",
    "a < b, <=, >, >=, ==, !=": "a mask (per element) if a side is a signal, a boolean if both are scalars",
    "a % b": "remainder with the sign of b (Python's %): on scalars, whole numbers only; on signals, "
             "torch.remainder",
}


def is_mask_op(op: str) -> bool:
    """Whether the primitive's value is a mask or a boolean rather than a number."""
    return op in COMPARISONS


def text(op: str, operands: Sequence[str]) -> str:
    """How a primitive applied to ``operands`` reads: ``a * b``, ``-a``, ``clamp(x, lo, hi)``."""
    if op == "where":
        operands = operands[:3]
    if op == "neg":
        return f"-{operands[0]}"
    if op in BINARY or op in COMPARISONS:
        return f"{operands[0]} {op} {operands[1]}"
    return f"{op}({', '.join(operands)})"
