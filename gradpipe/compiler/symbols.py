"""Name resolution: the one symbol table of the language.

A name in a `.grad` file means, in this order (the first that applies wins):

1. ``grads.<loss>``: the gradient of a named loss;
2. ``alias.name``: a name of the file imported ``as alias``;
3. a parameter of the ``def`` being expanded;
4. a ``let``, ``state`` or ``def`` of the file, then one brought in by ``import "x.grad"``;
5. a hyperparameter declared in the file (``lr`` also when only implied);
6. a built-in signal (``grad``, ``param``, ``samples``), scalar (``lr``, ``step``,
   ``loss``) or ``inf``;
7. a hyperparameter declared in an imported file;
8. a shape value (``numel``, ``rows``, ``cols``, ``ndim``: :data:`gradpipe.compiler.prims.SHAPES`);
9. a math function (``abs``, ``max``, ``where``...; :data:`gradpipe.compiler.prims.FUNCTIONS`),
   a reduction (``sum``, ``mean``...; :data:`gradpipe.compiler.prims.REDUCTIONS`) or an op of
   the library (``sign`` is both: the op, and the function when called with a signal,
   ``sign(grad)``; ``rms`` is the op, and the reduction when called with ``over=``).

Math functions are named like ops: a ``let`` or ``def`` of the same name shadows them.

A call (``name(...)``) goes through the same chain but stops only at what can be
called, a ``def`` or an op (``calls=True``): a hyperparameter named like an op, as
torch's SGD names its ``momentum``, does not hide the op from ``momentum(momentum)``.
A name no callable answers to is reported as what the chain finds for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span, did_you_mean
from .modules import RESERVED, HyperParam, ModuleEnv
from .ops import OPS, Op
from .prims import FUNCTIONS, REDUCTIONS, SHAPES
from .scalars import SCALAR_SOURCES
from .values import Value

__all__ = ["Scope", "Local", "LetSym", "StateSym", "DefSym", "HParamSym", "SourceSym", "ScalarSym", "InfSym",
           "OpSym", "MathSym", "ShapeSym", "LossSym", "Symbol", "CELL_FUNCTIONS", "POINT_FUNCTIONS", "resolve", "visible_names",
           "callable_names", "STREAM_SOURCES"]

#: built-in functions that keep state: ``previous(x)`` (a state cell, see ``Builder._previous_call``)
CELL_FUNCTIONS = ("previous",)

#: built-in functions that evaluate the loss again: ``grad_at(point)``, the gradient at another
#: point (SAM; see ``Builder._grad_at_call``)
POINT_FUNCTIONS = ("grad_at",)

#: the signals every pipeline can start from
STREAM_SOURCES = ("grad", "param", "samples")


@dataclass
class Scope:
    """Where a name is looked up: a file, the parameters of the ``def`` being expanded, how
    deeply definitions are nested, and which ones (outermost first)."""

    env: ModuleEnv
    locals: dict[str, Value] = field(default_factory=dict)
    depth: int = 0
    defs: tuple[str, ...] = ()  # "path:name" of the defs being expanded


@dataclass(frozen=True)
class Local:
    name: str
    value: Value


@dataclass(frozen=True)
class LetSym:
    env: ModuleEnv
    let: ast.Let


@dataclass(frozen=True)
class StateSym:
    env: ModuleEnv
    state: ast.State


@dataclass(frozen=True)
class DefSym:
    env: ModuleEnv
    definition: ast.Def


@dataclass(frozen=True)
class HParamSym:
    hp: HyperParam


@dataclass(frozen=True)
class SourceSym:
    name: str  # grad, param, samples


@dataclass(frozen=True)
class LossSym:
    loss: str  # grads.<loss>


@dataclass(frozen=True)
class ScalarSym:
    name: str  # lr, step, loss


@dataclass(frozen=True)
class InfSym:
    pass


@dataclass(frozen=True)
class OpSym:
    op: Op


@dataclass(frozen=True)
class MathSym:
    name: str  # abs, max, where... (gradpipe.compiler.prims.FUNCTIONS)


@dataclass(frozen=True)
class ShapeSym:
    name: str  # numel, rows, cols, ndim (gradpipe.compiler.prims.SHAPES)


Symbol = Union[Local, LetSym, StateSym, DefSym, HParamSym, SourceSym, LossSym, ScalarSym, InfSym, OpSym, MathSym,
               ShapeSym]


def resolve(parts: tuple[str, ...], sc: Scope, hparams: dict[str, HyperParam], span: Span,
            calls: bool = False) -> Symbol | None:
    """What the (dotted) name means in ``sc``; None when it names nothing. ``hparams`` are the
    program's hyperparameters (the file's and its imports'). With ``calls``, the first ``def``
    or op of the chain, else what the chain finds. GradError for a dotted name that cannot
    name anything (an unknown module, ``grads`` without a loss)."""
    if calls:
        found = _resolve(parts, sc, hparams, span, callables_only=True)
        return found if found is not None else _resolve(parts, sc, hparams, span)
    return _resolve(parts, sc, hparams, span)


def _resolve(parts: tuple[str, ...], sc: Scope, hparams: dict[str, HyperParam], span: Span,
             callables_only: bool = False) -> Symbol | None:
    first = parts[0]
    if len(parts) >= 2:
        if first == "grads" and len(parts) == 2:
            return LossSym(parts[1])
        if first in sc.env.aliases and first not in sc.locals:
            return _resolve(parts[1:], Scope(sc.env.aliases[first], {}, sc.depth, sc.defs), hparams, span,
                            callables_only)
        if first == "grads":
            raise GradError("write grads.<loss name>, e.g. grads.main", span)
        raise GradError(f"unknown module '{first}'", span,
                        did_you_mean(first, sc.env.aliases) or f'import a file under that name: import "{first}.grad" as {first}')
    env = sc.env
    if callables_only:
        if first in env.defs:
            return DefSym(env, env.defs[first])
        if first in env.imported and first in env.imported[first].defs:
            return DefSym(env.imported[first], env.imported[first].defs[first])
        return _builtin(first)
    if first in sc.locals:
        return Local(first, sc.locals[first])
    if first in env.lets:
        return LetSym(env, env.lets[first])
    if first in env.states:
        return StateSym(env, env.states[first])
    if first in env.defs:
        return DefSym(env, env.defs[first])
    if first in env.imported:
        return _resolve(parts, Scope(env.imported[first], {}, sc.depth, sc.defs), hparams, span)
    if first in env.hparams or (first == "lr" and first in hparams):
        return HParamSym(hparams[first])
    if first in STREAM_SOURCES:
        return SourceSym(first)
    if first == "grads":
        raise GradError("'grads' needs a loss name", span, "write grads.<loss name>, e.g. grads.main")
    if first in SCALAR_SOURCES:
        return ScalarSym(first)
    if first == "inf":
        return InfSym()
    if first in hparams:  # declared in an imported file: usable by name everywhere
        return HParamSym(hparams[first])
    if first in SHAPES:
        return ShapeSym(first)
    return _builtin(first)


def _builtin(name: str) -> OpSym | MathSym | None:
    """The op, math function or reduction ``name`` (the op for ``sign`` and ``rms``, which are
    both), or None."""
    if name in OPS:
        return OpSym(OPS[name])
    if name in FUNCTIONS or name in REDUCTIONS or name in CELL_FUNCTIONS or name in POINT_FUNCTIONS:
        return MathSym(name)
    return None


def visible_names(sc: Scope, hparams: dict[str, HyperParam]) -> list[str]:
    """Every name a bare name could have meant here (for a did-you-mean)."""
    env = sc.env
    names = list(sc.locals) + list(env.lets) + list(env.states) + list(env.defs) + list(env.imported)
    names += list(env.hparams) + list(hparams) + list(OPS) + list(FUNCTIONS) + list(REDUCTIONS) + list(SHAPES)
    names += list(CELL_FUNCTIONS) + list(POINT_FUNCTIONS) + list(RESERVED) + [f"{a}." for a in env.aliases]
    return names


def callable_names(env: ModuleEnv) -> list[str]:
    """Every name a call could have meant here: ops and pipelines (defs)."""
    return list(OPS) + list(FUNCTIONS) + list(REDUCTIONS) + list(CELL_FUNCTIONS) + list(POINT_FUNCTIONS) + list(env.defs) + \
        [n for n, m in env.imported.items() if n in m.defs]
