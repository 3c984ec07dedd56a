"""The eval and train sequences: ``eval: param = EXPR`` and ``train: param = EXPR``.

A pipeline that gives the parameter's new value (``param = ...``) may keep two sequences
of points, as Schedule-Free keeps ``y`` (where gradients are taken, what the parameter
holds while training) and ``x`` (the average, what to evaluate). ``Optimizer.eval()``
writes the ``eval`` expression into every parameter of the param-form routes, and
``Optimizer.train()`` the ``train`` expression; neither is a step (no counter moves, no
cell changes). An expression reads only ``param`` (the parameter's current value), the
route's state cells (their stored value), hyperparameters, ``lr``, numbers, the ``let``
names of such things, arithmetic and the math functions.

:func:`compile_modes` checks the sequences against the compiled routes and returns a
:class:`ModeSeq` per mode; ``gradpipe.runtime.modes`` evaluates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span
from .modules import HyperParam, ModuleEnv

__all__ = ["ModeSeq", "compile_modes", "MATH"]

#: the math functions an eval or train sequence may call, with their numbers of arguments
MATH = {"abs": 1, "sign": 1, "sqrt": 1, "exp": 1, "log": 1, "max": 2, "min": 2, "clamp": 3, "where": 3}
_MAX_LET_DEPTH = 100


@dataclass(frozen=True)
class ModeSeq:
    """One sequence: ``mode`` (eval | train), its expression with every ``let`` it reads in
    ``lets``, the param-form routes it applies to, and, per route, the node of each state
    cell it reads (the cell's buffer is ``state[p][node + ".value"]``)."""

    mode: str
    expr: ast.Expr
    lets: Mapping[str, ast.Expr]
    routes: tuple[str, ...]
    cells: Mapping[str, Mapping[str, str]]  # route -> cell name -> node
    span: Span


def _hint(mode: str) -> str:
    return (f"an '{mode}:' sequence reads param, the file's state cells, hyperparameters, lr and numbers, "
            "with arithmetic and math functions (abs, sign, sqrt, exp, log, max, min, clamp, where)")


class _Checker:
    def __init__(self, env: ModuleEnv, hparams: Mapping[str, HyperParam], mode: str) -> None:
        self.env, self.hparams, self.mode = env, hparams, mode
        self.lets: dict[str, ast.Expr] = {}
        self.cells: dict[str, ast.State] = {}
        self.signal = False  # whether the expression reads param or a cell

    def fail(self, msg: str, span: Span) -> GradError:
        return GradError(msg, span, _hint(self.mode))

    def expr(self, e: ast.Expr, depth: int = 0, cond: bool = False) -> None:
        if depth > _MAX_LET_DEPTH:
            raise self.fail(f"the {self.mode} sequence's lets nest more than {_MAX_LET_DEPTH} deep", e.span)
        if isinstance(e, ast.Num):
            return
        if isinstance(e, ast.Neg):
            return self.expr(e.operand, depth)
        if isinstance(e, ast.BinOp):
            if e.op in ("<", "<=", ">", ">=", "==", "!=") and not cond:
                raise self.fail("a comparison is only a condition of where(...)", e.span)
            self.expr(e.left, depth)
            self.expr(e.right, depth)
            return
        if isinstance(e, ast.Index):
            base = e.base.dotted if isinstance(e.base, ast.Name) else None
            hp = self.hparams.get(base) if base is not None else None
            if hp is None or not isinstance(hp.default, tuple):
                raise self.fail("only a tuple hyperparameter can be indexed", e.span)
            if not 0 <= e.index < len(hp.default):
                raise self.fail(f"index {e.index} is out of range", e.span)
            return
        if isinstance(e, ast.Name):
            return self.name(e, depth)
        if isinstance(e, ast.Call):
            fn = e.func.dotted
            if fn not in MATH or e.block is not None or e.kwargs or self._shadowed(fn):
                raise self.fail(f"'{fn}(...)' cannot be used in an '{self.mode}:' sequence (no step runs there)",
                                e.span)
            if len(e.args) != MATH[fn]:
                raise self.fail(f"'{fn}' takes {MATH[fn]} argument{'s' if MATH[fn] > 1 else ''}", e.span)
            for i, a in enumerate(e.args):
                self.expr(a, depth, cond=fn == "where" and i == 0)
            return
        raise self.fail(f"this cannot be used in an '{self.mode}:' sequence", e.span)

    def _shadowed(self, fn: str) -> bool:
        return fn in self.env.lets or fn in self.env.defs or fn in self.env.states

    def name(self, e: ast.Name, depth: int) -> None:
        name = e.dotted
        if name == "param":
            self.signal = True
        elif name in self.env.states:
            self.cells[name] = self.env.states[name]
            self.signal = True
        elif name in self.env.lets:
            if name not in self.lets:
                self.lets[name] = self.env.lets[name].value
                self.expr(self.env.lets[name].value, depth + 1)
        elif name in self.hparams:
            if isinstance(self.hparams[name].default, tuple):
                raise self.fail(f"'{name}' is a tuple: index it, e.g. {name}[0]", e.span)
            if isinstance(self.hparams[name].default, bool):
                raise self.fail(f"'{name}' is a boolean, not a number", e.span)
        else:
            what = {"grad": "the gradient", "step": "the step counter", "loss": "the loss",
                    "samples": "per-example gradients"}.get(name.split(".")[0])
            raise self.fail(f"an '{self.mode}:' sequence cannot read '{name}'"
                            + (f" ({what}: eval() and train() are not steps)" if what else ""), e.span)


def compile_modes(env: ModuleEnv, hparams: Mapping[str, HyperParam], param_routes: Mapping[str, Any],
                  cell_node: Any) -> dict[str, ModeSeq]:
    """Check the file's ``eval:``/``train:`` statements; ``param_routes``: the labels of the
    routes that give the parameter's new value (with their IR); ``cell_node(state, label)``: the
    node of a cell in a route, or None when the route keeps no such cell."""
    modes = env.modes
    if not modes:
        return {}
    first = min(modes.values(), key=lambda m: (m.span.line, m.span.column))
    if len(modes) == 1:
        if first.mode == "eval":
            raise GradError("an 'eval:' sequence without a 'train:' sequence", first.span,
                            "add 'train: param = ...', the value Optimizer.train() gives back (undoing 'eval:')")
        raise GradError("a 'train:' sequence without an 'eval:' sequence", first.span,
                        "add 'eval: param = ...', the value Optimizer.eval() writes (the point to evaluate), "
                        "which 'train:' undoes")
    if not param_routes:
        raise GradError(f"{'an' if first.mode == 'eval' else 'a'} '{first.mode}:' sequence, but the pipeline "
                        "gives the update u, not the "
                        "parameter's new value", first.span,
                        "eval and train sequences switch parameters between sequences of points: write the "
                        "pipeline as 'param = ...' (or a route as 'route ...: param = ...')")
    out: dict[str, ModeSeq] = {}
    for mode, m in modes.items():
        c = _Checker(env, hparams, mode)
        c.expr(m.expr)
        if not c.signal:
            raise GradError(f"the '{mode}:' sequence reads neither param nor a state cell", m.expr.span,
                            "it gives each parameter's value in that mode, e.g. param + 0.5 * (z - param)")
        cells: dict[str, dict[str, str]] = {}
        for label in param_routes:
            cells[label] = {}
            for name, st in c.cells.items():
                node = cell_node(st, label)
                if node is None:
                    raise GradError(f"the '{mode}:' sequence reads state '{name}', which the step of route "
                                    f"'{label}' does not keep", m.expr.span,
                                    f"read '{name}' in that route's 'param = ...' pipeline, or drop it here")
                cells[label][name] = node
        out[mode] = ModeSeq(mode, m.expr, dict(c.lets), tuple(param_routes), cells, m.span)
    return out
