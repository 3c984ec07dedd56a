"""The argument binder: a call's arguments matched to a signature and checked.

:func:`bind` matches positional and keyword arguments (and a ``{ ... }`` block) to
parameter names, the one way every call is bound: op calls, combiners, macros and
``def`` pipelines. :class:`ArgChecker` turns an argument's compiled value into what
the IR stores for a parameter of a given kind (a scalar expression, a bool, a whole
number, a word), checking constant values against the parameter's valid range and
recording a :class:`RangeCheck` for values known only at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span, did_you_mean
from . import scalars as S
from .modules import HyperParam
from .ops import Op, Param
from .values import ScalarV, Stream, Value, Word, kind_name

__all__ = ["bind", "bind_op", "BoundCall", "ArgChecker", "RangeCheck", "RuleCheck", "reads_step"]


@dataclass(frozen=True)
class RangeCheck:
    """A hyperparameter-dependent argument whose valid range is checked on every group."""

    expr: S.Scalar
    param: Param
    op: str
    span: Span


@dataclass(frozen=True)
class RuleCheck:
    """An op's rule across several arguments (:meth:`Op.validate`) whose values depend on
    hyperparameters, ``step`` or ``loss``: checked like a :class:`RangeCheck`."""

    exprs: tuple[tuple[str, S.Scalar], ...]
    op: str
    span: Span

    def values(self, env: Mapping[str, Any]) -> dict[str, float]:
        return {k: e.eval(env) for k, e in self.exprs}


def reads_step(expr: S.Scalar) -> bool:
    """Whether a scalar expression reads ``step`` or ``loss`` (known only in a step)."""
    return any(isinstance(leaf, S.Src) and leaf.name in ("step", "loss") for leaf in S.leaves(expr))


def bind(what: str, names: Sequence[str], e: ast.Call) -> dict[str, ast.Expr]:
    """Match ``e``'s positional and keyword arguments to ``names``; a GradError for too many,
    unknown or repeated ones (``what`` names the callee in messages: ``op 'adam'``)."""
    bound: dict[str, ast.Expr] = {}
    if len(e.args) > len(names):
        extra = e.args[len(names)]
        raise GradError(f"{what} takes at most {len(names)} positional argument{'s' if len(names) != 1 else ''}, "
                        f"got {len(e.args)}", extra.span,
                        f"its arguments are ({', '.join(names)})" if names else "it takes no arguments")
    for n, a in zip(names, e.args):
        bound[n] = a
    for kw in e.kwargs:
        if kw.name not in names:
            raise GradError(f"{what} has no argument '{kw.name}'", kw.span,
                            did_you_mean(kw.name, names) or (f"its arguments are ({', '.join(names)})"
                                                              if names else "it takes no arguments"))
        if kw.name in bound:
            raise GradError(f"argument '{kw.name}' is given twice (by position and by name)", kw.span)
        bound[kw.name] = kw.value
    return bound


@dataclass(frozen=True)
class BoundCall:
    """An op call bound to its signature: ``args`` by parameter name (a ``{ ... }`` block under
    the op's first block parameter); ``signals`` the positional signals of a combiner."""

    op: Op
    call: ast.Call
    args: dict[str, ast.Expr]
    signals: tuple[ast.Expr, ...] = ()


def bind_op(op: Op, e: ast.Call) -> BoundCall:
    """Bind a call of ``op``: its block, a combiner's signals, then the other arguments."""
    params = op.params
    if params and params[0].kind == "signals":  # pcgrad(grads.a, grads.b, reduction=mean)
        if e.block is not None:
            raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
        if len(e.args) < 2:
            raise GradError(f"'{op.name}' combines two or more signals, got {len(e.args)}", e.span,
                            f"write {op.name}(grads.main, grads.aux) and call opt.step(losses={{...}})")
        rest = ast.Call(e.func, (), e.kwargs, None, span=e.span)
        return BoundCall(op, e, bind(f"op '{op.name}'", [p.name for p in params[1:]], rest), tuple(e.args))
    blocks = [p.name for p in params if p.kind == "block"]
    if e.block is not None and not blocks:
        raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
    names = [p.name for p in params]
    positional = [n for n in names if n not in blocks] if e.block is not None else names
    bound = bind(f"op '{op.name}'", positional,
                 ast.Call(e.func, e.args, tuple(k for k in e.kwargs if k.name not in blocks), e.block, span=e.span))
    for kw in e.kwargs:
        if kw.name in blocks:
            bound[kw.name] = kw.value
    if e.block is not None:
        if blocks[0] in bound:
            raise GradError(f"'{blocks[0]}' of '{op.name}' is given twice (as an argument and as a "
                            "{ ... } block)", e.block.span)
        bound[blocks[0]] = e.block
    return BoundCall(op, e, bound)


class ArgChecker:
    """Checks compiled argument values against op parameters; collects the range checks
    that can only run once hyperparameter values are known."""

    def __init__(self, hparams: dict[str, HyperParam]) -> None:
        self.hparams = hparams
        self.range_checks: list[RangeCheck] = []

    def default(self, op: Op, p: Param, e: ast.Call) -> Any:
        """What a parameter the call leaves out gets: its default, or a GradError if it has none."""
        from .ops.base import REQUIRED
        if p.default is REQUIRED:
            raise GradError(f"op '{op.name}' needs argument '{p.name}'", e.span, f"write {op.name}({p.name}=...)")
        return S.Const(p.default) if p.kind in ("scalar", "int") else p.default

    def choice(self, op: Op, p: Param, a: ast.Expr) -> str:
        if isinstance(a, ast.Name) and len(a.parts) == 1:
            word = a.parts[0]
        elif isinstance(a, ast.Str):
            word = a.value
        else:
            raise GradError(f"argument '{p.name}' of '{op.name}' must be one of: {', '.join(p.choices)}", a.span)
        if word not in p.choices:
            raise GradError(f"'{word}' is not a valid {p.name} for '{op.name}'", a.span,
                            did_you_mean(word, p.choices) or f"choose one of: {', '.join(p.choices)}")
        return word

    def boolean(self, op: Op, p: Param, v: Value, a: ast.Expr) -> Any:
        if isinstance(v, Word) and isinstance(v.value, bool):
            return v.value
        if isinstance(v, ScalarV) and isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "bool":
            return v.expr
        raise GradError(f"argument '{p.name}' of '{op.name}' must be true or false, got {kind_name(v)}", a.span)

    def whole(self, op: Op, p: Param, v: Value, a: ast.Expr) -> S.Const:
        sv = self.scalar(op, p, v, a)
        if not (isinstance(sv, S.Const) and float(sv.value).is_integer()):
            raise GradError(f"argument '{p.name}' of '{op.name}' must be a whole number known "
                            "when the pipeline compiles", a.span)
        return S.Const(int(sv.value))

    def scalar(self, op: Op, p: Param, v: Value, a: ast.Expr) -> S.Scalar:
        if not isinstance(v, ScalarV):
            hint = None
            if isinstance(v, Word) and isinstance(v.value, str):
                hint = "strings are only for words such as scope=\"global\"; write a number"
            elif isinstance(v, Stream):
                hint = ("an op's coefficients are numbers, the same for every element; write a "
                        "per-element coefficient as arithmetic on signals, e.g. "
                        "where(param > 0, 0.9, 0.99) * grad")
            raise GradError(f"argument '{p.name}' of '{op.name}' must be a number, got {kind_name(v)}", a.span, hint)
        expr = v.expr
        if S.is_bool(expr):
            raise GradError(f"argument '{p.name}' of '{op.name}' must be a number, got a boolean (a comparison)",
                            a.span, "a boolean chooses between two values: where(cond, a, b)")
        for leaf in S.leaves(expr):
            if isinstance(leaf, S.HP):
                hp = self.hparams[leaf.name]
                if hp.kind == "bool":
                    raise GradError(f"'{leaf.name}' is a boolean, but '{p.name}' of '{op.name}' needs a number", a.span)
                if hp.kind == "tuple" and leaf.index is None:
                    raise GradError(f"'{leaf.name}' is a tuple; pick an item", a.span, f"write {leaf.name}[0]")
        if isinstance(expr, S.Const):
            val = expr.value
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise GradError(f"argument '{p.name}' of '{op.name}' must be a number", a.span)
            if not p.in_range(val):
                raise GradError(f"{p.name}={val!r} is outside the valid range {p.range_text()} of '{op.name}'",
                                a.span, f"choose {p.name} in {p.range_text()}")
        elif p.has_range:
            self.range_checks.append(RangeCheck(expr, p, op.name, a.span))
        return expr

    def value(self, op: Op, p: Param, v: Value, a: ast.Expr) -> Any:
        """A non-signal argument of any kind, as the IR stores it."""
        if p.kind == "bool":
            return self.boolean(op, p, v, a)
        if p.kind == "int":
            return self.whole(op, p, v, a)
        return self.scalar(op, p, v, a)
