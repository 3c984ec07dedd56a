"""Scalar expressions: hyperparameters, ``lr``, ``step``, ``loss`` and arithmetic on them.

Scalars are kept symbolic in the IR (a hyperparameter can change every step,
through an LR scheduler or a param group) and folded when every leaf is a
constant. Evaluation happens per parameter group at run time.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

__all__ = ["Scalar", "Const", "HP", "Src", "BinS", "NegS", "binop", "neg", "SCALAR_SOURCES"]

#: Scalars every pipeline can read: the group's learning rate, the step
#: counter (starts at 1), and the loss the closure returned.
SCALAR_SOURCES = ("lr", "step", "loss")

_OPS: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "**": operator.pow,
}


@dataclass(frozen=True)
class Const:
    value: int | float | bool

    def eval(self, env: Mapping[str, Any]) -> Any:
        return self.value

    def __str__(self) -> str:
        v = self.value
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)


@dataclass(frozen=True)
class HP:
    """A declared hyperparameter, optionally one item of a tuple (``betas[0]``)."""

    name: str
    index: int | None = None

    def eval(self, env: Mapping[str, Any]) -> Any:
        v = env[self.name]
        return v if self.index is None else v[self.index]

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


@dataclass(frozen=True)
class Src:
    """``lr``, ``step`` or ``loss``."""

    name: str

    def eval(self, env: Mapping[str, Any]) -> Any:
        v = env.get(self.name)
        if v is None:
            raise ValueError(f"the pipeline reads '{self.name}', which is not available in this step"
                             + (": pass a closure that returns the loss to step()" if self.name == "loss" else ""))
        return v

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class BinS:
    op: str
    left: "Scalar"
    right: "Scalar"

    def eval(self, env: Mapping[str, Any]) -> Any:
        return _OPS[self.op](self.left.eval(env), self.right.eval(env))

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class NegS:
    operand: "Scalar"

    def eval(self, env: Mapping[str, Any]) -> Any:
        return -self.operand.eval(env)

    def __str__(self) -> str:
        return f"-{self.operand}"


Scalar = Union[Const, HP, Src, BinS, NegS]


def binop(op: str, left: Scalar, right: Scalar) -> Scalar:
    """Build ``left op right``, folding it when both sides are constants.

    Raises ZeroDivisionError / OverflowError for constant operands that fail.
    """
    if isinstance(left, Const) and isinstance(right, Const):
        return Const(fold(op, left.value, right.value))
    return BinS(op, left, right)


_FLOAT_MAX = 1.7976931348623157e308


def fold(op: str, a: int | float, b: int | float) -> int | float:
    """``a op b`` for constants, refusing results that are not finite real numbers.

    Raises ZeroDivisionError, or OverflowError/ValueError for a result that does
    not fit a float or is complex.
    """
    if op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 \
            and b * math.log2(abs(a)) > 1024:
        raise OverflowError("the result is too large")
    value = _OPS[op](a, b)
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    check_finite(value)
    return value


def check_finite(value: int | float) -> None:
    """Raise OverflowError for a number that is not a finite float (or too large an int)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > _FLOAT_MAX:
            raise OverflowError("the number is too large")
    elif not math.isfinite(value):
        raise OverflowError("the result is not finite")


def neg(x: Scalar) -> Scalar:
    if isinstance(x, Const):
        return Const(-x.value)
    return NegS(x)


def leaves(x: Scalar):
    """Yield the HP and Src leaves of a scalar expression."""
    stack = [x]
    while stack:
        n = stack.pop()
        if isinstance(n, (HP, Src)):
            yield n
        elif isinstance(n, BinS):
            stack += [n.left, n.right]
        elif isinstance(n, NegS):
            stack.append(n.operand)
