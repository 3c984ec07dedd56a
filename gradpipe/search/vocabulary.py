"""What a mutation may write: the stages (ops of the op table and elementwise primitives),
their arguments with each op's declared kinds and ranges, the signals a signal argument
may take, and how a new number is drawn inside a range.

The vocabulary is read from the op table (:data:`gradpipe.compiler.ops.OPS`, plug-ins
included), so a new op joins the search without a list to edit. An op is a stage of the
vocabulary when it transforms the stream on its own: not a combiner of several gradients
(``signals``), not a block wrapper, not a per-example op, not a matrix op (those need a
matrix route), not a non-finite policy, and ``grad | <op>`` compiles with its defaults (or
with a signal for a required signal argument). This is the search space of Chen et al.
2023 ("Symbolic Discovery of Optimization Algorithms"), built from gradpipe's ops instead
of raw tensor functions, so every candidate is a checked program.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from ..compiler.ops import OPS
from ..compiler.ops.base import REQUIRED, Param
from ..compiler.ops.nonfinite import _Policy as PolicyOp
from ..compiler.ranges import RangeMixin
from ..dsl import ast
from ..dsl.diagnostics import GradError
from ..dsl.parser import parse

__all__ = ["ArgSpec", "StageSpec", "stages", "stage", "SIGNALS", "UNARY_PRIMITIVES", "signal_expr",
           "draw_number", "draw_value", "number_expr", "literal_value", "bounds_of"]

ArgKind = Literal["scalar", "int", "bool", "choice", "signal"]

#: elementwise math functions that are stages on their own (``grad | abs``)
UNARY_PRIMITIVES: tuple[str, ...] = ("abs", "sqrt")

#: what a signal argument (``project_orthogonal``'s ``ref``, ``add``'s ``s``, ``scale``'s
#: ``x``) and a mixed-in term may be: sources, and ops applied to the receiving op's input
SIGNALS: tuple[str, ...] = ("grad", "param", "ema", "ema(0.99)", "sign", "(grad | sign)", "(grad | ema(0.99))")

#: op arguments a mutation never changes: seeds of random ops (a different seed is not a
#: different optimizer)
_FIXED_ARGS = frozenset({"seed"})


@dataclass(frozen=True)
class ArgSpec(RangeMixin):
    """One argument of a stage (or a hyperparameter) as the search sees it: its kind,
    default, valid range (``low``/``high`` and their closedness, as
    :class:`~gradpipe.compiler.ranges.RangeMixin`), the words of a choice, and whether a
    signal argument takes a number too (``add``'s ``s``, ``scale``'s ``x``)."""

    name: str
    kind: ArgKind
    default: Any
    bounds: tuple[float, float, bool, bool] = (-math.inf, math.inf, True, True)
    choices: tuple[str, ...] = ()
    numbers: bool = False

    @property
    def low(self) -> float:  # type: ignore[override]
        return self.bounds[0]

    @property
    def high(self) -> float:  # type: ignore[override]
        return self.bounds[1]

    @property
    def low_closed(self) -> bool:  # type: ignore[override]
        return self.bounds[2]

    @property
    def high_closed(self) -> bool:  # type: ignore[override]
        return self.bounds[3]


@dataclass(frozen=True)
class StageSpec:
    """A stage the search can insert: an op (``kind="op"``) or a primitive (``"prim"``).
    ``params`` are all its arguments in order (positional binding follows it), ``mutable``
    the names of those a mutation may set, ``required`` the signal argument it must be
    given (``project_orthogonal``'s ``ref``), if any."""

    name: str
    kind: Literal["op", "prim"]
    params: tuple[ArgSpec, ...] = ()
    required: str | None = None

    @property
    def mutable(self) -> tuple[ArgSpec, ...]:
        return tuple(p for p in self.params if p.kind != "signal" and p.name not in _FIXED_ARGS)

    def param(self, name: str) -> ArgSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _arg_spec(p: Param) -> ArgSpec | None:
    kind = {"scalar": "scalar", "int": "int", "bool": "bool", "choice": "choice",
            "signal": "signal", "value": "signal", "any": "signal"}.get(p.kind)
    if kind is None:
        return None
    default = None if p.default is REQUIRED else p.default
    return ArgSpec(p.name, kind, default, bounds_of(p), p.choices, numbers=p.kind in ("value", "any"))  # type: ignore[arg-type]


def _op_spec(name: str) -> StageSpec | None:
    op = OPS[name]
    if op.matrix or op.per_sample or isinstance(op, PolicyOp):
        return None
    specs = []
    required = None
    for p in op.params:
        spec = _arg_spec(p)
        if spec is None:  # a block or several signals: not a stage on its own
            return None
        if p.default is REQUIRED:
            if spec.kind != "signal" or required is not None:
                return None  # a required number (aegd's f): no default to start from
            required = p.name
        specs.append(spec)
    return StageSpec(name, "op", tuple(specs), required)


def bounds_of(r: RangeMixin) -> tuple[float, float, bool, bool]:
    """The range of an op's argument or a hyperparameter, as :attr:`ArgSpec.bounds`."""
    return (r.low, r.high, r.low_closed, r.high_closed)


def signal_expr(text: str) -> ast.Expr:
    """A signal of :data:`SIGNALS` (or any expression) as an AST node."""
    return _expr(text)


@functools.lru_cache(maxsize=None)
def _expr(text: str) -> ast.Expr:
    stmt = parse(f"let _x = {text}\ngrad").stmts[0]
    assert isinstance(stmt, ast.Let)
    return stmt.value


def _compiles(text: str) -> bool:
    from ..compiler.program import compile as compile_grad
    try:
        compile_grad(text)
    except GradError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _stages(op_names: tuple[str, ...]) -> tuple[StageSpec, ...]:
    out = []
    for name in op_names:
        spec = _op_spec(name)
        if spec is not None and _compiles(f"grad | {_call_text(spec)}"):
            out.append(spec)
    out += [StageSpec(f, "prim") for f in UNARY_PRIMITIVES]
    return tuple(out)


def _call_text(spec: StageSpec) -> str:
    return f"{spec.name}({spec.required}=ema)" if spec.required else spec.name


def stages() -> tuple[StageSpec, ...]:
    """The stage vocabulary, sorted by name (ops first, then the primitives); computed once
    per set of registered ops."""
    return _stages(tuple(sorted(OPS)))


def stage(name: str) -> StageSpec | None:
    """The vocabulary's stage of this name, or None."""
    return next((s for s in stages() if s.name == name), None)


# ----------------------------------------------------------------------- numbers
def _round(x: float) -> float:
    """Two significant digits (``0.0031``), so programs stay readable."""
    return float(f"{x:.2g}")


def draw_number(spec: ArgSpec, current: float | None, rng: random.Random) -> float | int | None:
    """A new value for a scalar or int argument near ``current`` (its default if None),
    inside the argument's range, different from ``current``; None if none was found.

    Positive values move by a log-uniform factor in [1/3, 3]; a value in (0.5, 1) of a
    range that stops at 1 (a decay rate, ``beta``) moves its distance to 1 that way instead;
    zero moves to one of 1e-4 .. 0.1; an int doubles, halves or moves by one."""
    base = current if current is not None else spec.default
    if base is None or isinstance(base, bool):
        base = 0.0
    for _ in range(8):
        if spec.kind == "int":
            b = int(base)
            new: float = rng.choice([b * 2, b // 2, b + 1, b - 1])
            new = int(new)
        elif base == 0:
            new = rng.choice([1e-4, 1e-3, 1e-2, 0.1])
        else:
            factor = math.exp(rng.uniform(-math.log(3), math.log(3)))
            if 0.5 < base < 1 and spec.high <= 1:
                new = float(f"{1 - _round((1 - base) * factor):.6g}")
            else:
                new = _round(base * factor)
        if new != base and spec.in_range(new) and math.isfinite(new):
            return new
    return None


def draw_value(spec: ArgSpec, current: Any, rng: random.Random) -> Any:
    """A new value for a mutable argument of any kind (None if none was found)."""
    if spec.kind == "bool":
        return not bool(current if current is not None else spec.default)
    if spec.kind == "choice":
        others = [c for c in spec.choices if c != (current if current is not None else spec.default)]
        return rng.choice(others) if others else None
    cur = current if isinstance(current, (int, float)) and not isinstance(current, bool) else None
    return draw_number(spec, cur, rng)


def number_expr(v: float | int) -> ast.Expr:
    """A number as the AST the parser makes of it (a negative one as ``Neg``)."""
    return ast.Neg(ast.Num(-v)) if v < 0 else ast.Num(v)


def literal_value(e: ast.Expr | None) -> Any:
    """The value of a literal argument (a number, a bool, a word), else None."""
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Neg) and isinstance(e.operand, ast.Num):
        return -e.operand.value
    if isinstance(e, ast.Bool):
        return e.value
    if isinstance(e, ast.Str):
        return e.value
    if isinstance(e, ast.Name) and len(e.parts) == 1:
        return e.parts[0]
    return None
