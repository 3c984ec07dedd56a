"""The abstract syntax tree of a `.grad` file.

Nodes are frozen dataclasses. Every node has a ``span`` that is excluded from
equality, so two parses of differently laid-out text compare equal when they
mean the same thing (the formatter's round-trip property relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .diagnostics import Span

__all__ = [
    "Expr", "Num", "Bool", "Str", "Name", "Call", "Kwarg", "BinOp", "Neg", "Chain",
    "Index", "Tuple", "Selector", "Glob", "Regex", "ShapePred", "SelAnd", "SelOr",
    "SelNot", "Default", "Stmt", "Import", "HParam", "Let", "Def", "DefParam", "Route",
    "Body", "Mode", "Module", "walk",
]

_NOSPAN = Span()


def _span() -> Span:
    return field(default=_NOSPAN, compare=False, repr=False)


# --------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num:
    """A number literal; ``value`` is an int when written without '.' or 'e'."""

    value: int | float
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    """A possibly dotted name: ``grad``, ``b1``, ``grads.main``, ``lib.helper``."""

    parts: tuple[str, ...]
    span: Span = _span()

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """``func(args..., k=v...)``, optionally with an inner block ``{ pipeline }``."""

    func: Name
    args: tuple["Expr", ...] = ()
    kwargs: tuple[Kwarg, ...] = ()
    block: "Expr | None" = None
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    """``left op right``: arithmetic (``+ - * / % **``) or a comparison (``< <= > >= == !=``)."""

    op: str
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Chain:
    """``a | b | c``: at least two stages."""

    stages: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Index:
    """``betas[0]``."""

    base: "Expr"
    index: int
    span: Span = _span()


@dataclass(frozen=True)
class Tuple:
    """``(0.9, 0.999)``: only as a hyperparameter default."""

    items: tuple["Expr", ...]
    span: Span = _span()


Expr = Union[Num, Bool, Str, Name, Call, BinOp, Neg, Chain, Index, Tuple]


# ----------------------------------------------------------------------- selectors
@dataclass(frozen=True)
class Glob:
    """``"*.bias"``: fnmatch on the parameter's name."""

    pattern: str
    span: Span = _span()


@dataclass(frozen=True)
class Regex:
    """``/\\.bias$/``: ``re.search`` on the parameter's name."""

    pattern: str
    span: Span = _span()


@dataclass(frozen=True)
class ShapePred:
    """``ndim >= 2``, ``numel < 1000``."""

    attr: str  # ndim | numel
    op: str  # == != < <= > >=
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class SelAnd:
    left: "Selector"
    right: "Selector"
    span: Span = _span()


@dataclass(frozen=True)
class SelOr:
    left: "Selector"
    right: "Selector"
    span: Span = _span()


@dataclass(frozen=True)
class SelNot:
    operand: "Selector"
    span: Span = _span()


@dataclass(frozen=True)
class Default:
    """Matches every parameter that no other route matches."""

    span: Span = _span()


Selector = Union[Glob, Regex, ShapePred, SelAnd, SelOr, SelNot, Default]


# ---------------------------------------------------------------------- statements
@dataclass(frozen=True)
class Import:
    """``import "lib/common.grad"`` or ``import "lib/common.grad" as lib``."""

    path: str
    alias: str | None = None
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class HParam:
    """``hparam b1 = 0.9 in [0, 1)``: a tunable hyperparameter with its valid range."""

    name: str
    default: Expr
    low: Expr | None = None
    high: Expr | None = None
    low_closed: bool = True
    high_closed: bool = True
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class State:
    """``state vmax = 0 then max(vmax, v)``: a state cell, kept per parameter across steps.

    ``init`` is its value before the first step (a number, or a signal evaluated in the
    first step); ``update`` its value after each step, in which the cell's name means its
    value before the step."""

    name: str
    init: Expr
    update: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class DefParam:
    name: str
    default: Expr | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Def:
    """``def name(p, q=1) = pipeline``: a parameterised pipeline."""

    name: str
    params: tuple[DefParam, ...]
    body: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Route:
    """``route ndim >= 2: grad | adam``: the pipeline for the matching parameters;
    ``route ndim >= 2: param = ...`` (``param``) gives their new value instead."""

    selector: Selector
    body: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)
    #: the body is the parameter's new value (``param = EXPR``), not the update ``u``
    param: bool = False


@dataclass(frozen=True)
class Body:
    """The pipeline for every parameter (a file has a Body or Routes, not both):
    the update ``u``, or with ``param`` (``param = EXPR``) the parameter's new value."""

    expr: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)
    param: bool = False


@dataclass(frozen=True)
class Mode:
    """``eval: param = EXPR`` / ``train: param = EXPR``: the value ``Optimizer.eval()`` /
    ``Optimizer.train()`` write into each parameter of a param-form route."""

    mode: str  # eval | train
    expr: Expr
    span: Span = _span()
    comments: tuple[str, ...] = field(default=(), compare=False)


Stmt = Union[Import, HParam, Let, State, Def, Route, Body, Mode]


@dataclass(frozen=True)
class Module:
    stmts: tuple[Stmt, ...]
    path: str = field(default="<string>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    trailing_comments: tuple[str, ...] = field(default=(), compare=False)


def walk(node: object):
    """Yield ``node`` and every AST node below it (iteratively: no recursion limit)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        children: list[object] = []
        for name in getattr(n, "__dataclass_fields__", {}):
            if name in ("span", "comments", "source", "path", "trailing_comments"):
                continue
            v = getattr(n, name)
            if isinstance(v, tuple):
                children.extend(x for x in v if hasattr(x, "__dataclass_fields__"))
            elif hasattr(v, "__dataclass_fields__"):
                children.append(v)
        stack.extend(reversed(children))
