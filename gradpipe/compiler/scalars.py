"""Scalar expressions: hyperparameters, ``lr``, ``step``, ``loss`` and arithmetic on them.

Scalars are kept symbolic in the IR (a hyperparameter can change every step,
through an LR scheduler or a param group) and folded when every leaf is a
constant. Evaluation happens per parameter group at run time.

Besides ``+ - * / **`` and negation there are the integer remainder ``a % b``
(whole numbers only, the sign of ``b`` as in Python), comparisons (:class:`CmpS`,
a boolean) and the math functions (:class:`FnS`: ``abs sqrt exp log max min clamp
where``; ``sign`` is a function of signals only: ``sign(1)`` is the op ``sign``
given an argument it does not take). A value that cannot be computed raises
ZeroDivisionError, OverflowError or ValueError (``sqrt`` of a negative number,
``log`` of one that is not positive, ``%`` of a fraction), both when folding and
per step.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

__all__ = ["Scalar", "Const", "HP", "Src", "BinS", "NegS", "CmpS", "FnS", "binop", "neg", "compare", "call",
           "is_bool", "children", "SCALAR_SOURCES"]

#: Scalars every pipeline can read: the group's learning rate, the step
#: counter (starts at 1), and the loss the closure returned.
SCALAR_SOURCES = ("lr", "step", "loss")

def int_mod(a: Any, b: Any) -> int:
    """``a % b`` on whole numbers, with the sign of ``b`` (Python's ``%``).

    Raises ValueError when a side is not a whole number, ZeroDivisionError for ``b = 0``.
    """
    for v in (a, b):
        if isinstance(v, bool) or not float(v).is_integer():
            raise ValueError(f"'%' needs whole numbers, got {v!r}")
    if b == 0:
        raise ZeroDivisionError("'%' by zero")
    return int(a) % int(b)


_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "**": operator.pow,
    "%": int_mod,
}

_CMPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


def _sqrt(x: Any) -> float:
    """sqrt(x) for x >= 0; ValueError otherwise."""
    if x < 0:
        raise ValueError(f"sqrt of a negative number ({float(x):g})")
    return math.sqrt(x)


def _log(x: Any) -> float:
    """ln(x) for x > 0; ValueError otherwise."""
    if x <= 0:
        raise ValueError(f"log of a number that is not positive ({float(x):g})")
    return math.log(x)


def _max(a: Any, b: Any) -> Any:
    """max(a, b), NaN if either is NaN (as torch.maximum)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a if a >= b else b


def _min(a: Any, b: Any) -> Any:
    """min(a, b), NaN if either is NaN (as torch.minimum)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a if a <= b else b


#: the math functions on numbers (``where`` is evaluated lazily by :class:`FnS`)
_FNS: dict[str, Callable[..., Any]] = {
    "abs": abs, "sqrt": _sqrt, "exp": math.exp, "log": _log,
    "max": _max, "min": _min, "clamp": lambda x, lo, hi: _min(_max(x, lo), hi),
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


@dataclass(frozen=True)
class CmpS:
    """``left op right`` for a comparison ``op``: a boolean."""

    op: str
    left: "Scalar"
    right: "Scalar"

    def eval(self, env: Mapping[str, Any]) -> bool:
        return bool(_CMPS[self.op](self.left.eval(env), self.right.eval(env)))

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class FnS:
    """A math function of scalars: ``abs(x)``, ``max(a, b)``, ``clamp(x, lo, hi)``,
    ``where(cond, a, b)`` (which evaluates only the branch it picks)."""

    fn: str
    args: tuple["Scalar", ...]

    def eval(self, env: Mapping[str, Any]) -> Any:
        if self.fn == "where":
            cond, a, b = self.args
            return a.eval(env) if cond.eval(env) else b.eval(env)
        value = _FNS[self.fn](*(x.eval(env) for x in self.args))
        check_finite(value)
        return value

    def __str__(self) -> str:
        return f"{self.fn}({', '.join(str(a) for a in self.args)})"

    def guarded(self, cond: "Scalar") -> "Scalar | None":
        """For a branch the compiler wrapped so it is computed only when ``cond`` picks it
        (``where(cond, x, 0)`` or ``where(cond, 0, x)``): ``x``; else None."""
        if self.fn == "where" and self.args[0] == cond:
            _, a, b = self.args
            if b == Const(0):
                return a
            if a == Const(0):
                return b
        return None


Scalar = Union[Const, HP, Src, BinS, NegS, CmpS, FnS]


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


def compare(op: str, left: Scalar, right: Scalar) -> Scalar:
    """Build the comparison ``left op right``, folded to ``Const(bool)`` for constants."""
    if isinstance(left, Const) and isinstance(right, Const):
        return Const(bool(_CMPS[op](left.value, right.value)))
    return CmpS(op, left, right)


def call(fn: str, args: tuple[Scalar, ...]) -> Scalar:
    """Build the math function ``fn(args)``, folded when its arguments are constants (``where``
    also when only its condition is). Raises ValueError / OverflowError for constants out of
    the function's domain (``log(0)``, ``sqrt(-1)``, ``exp(1000)``)."""
    if fn == "where" and isinstance(args[0], Const):
        return args[1] if args[0].value else args[2]
    if all(isinstance(a, Const) for a in args):
        return Const(FnS(fn, args).eval({}))
    return FnS(fn, args)


def is_bool(x: Scalar) -> bool:
    """Whether a scalar expression is a boolean (a comparison, or ``true``/``false`` folded from one)."""
    return isinstance(x, CmpS) or (isinstance(x, Const) and isinstance(x.value, bool))


def children(x: Scalar) -> tuple[Scalar, ...]:
    """The operands of a scalar expression (none for a leaf)."""
    if isinstance(x, (BinS, CmpS)):
        return (x.left, x.right)
    if isinstance(x, NegS):
        return (x.operand,)
    if isinstance(x, FnS):
        return x.args
    return ()


def leaves(x: Scalar):
    """Yield the HP and Src leaves of a scalar expression."""
    stack = [x]
    while stack:
        n = stack.pop()
        if isinstance(n, (HP, Src)):
            yield n
        else:
            stack.extend(children(n))
