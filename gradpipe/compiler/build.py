"""Lower a module tree to the IR graph: the expression compiler.

Every expression compiles to a :class:`~gradpipe.compiler.values.Value`: a scalar, a
word, a signal (a node of the graph) or an open pipeline (a fragment, which becomes
nodes when applied to an input). Names resolve through the symbol table
(:mod:`.symbols`), calls bind through the binder (:mod:`.binder`), and nodes are
added by the emitter (:mod:`.emit`), whole, named after where they sit in the source
(``main/project_orthogonal/ema``); ``def`` pipelines are inlined under their own name
(``main/core/adam``); scalar arithmetic is folded as it is built.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

import networkx as nx

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span, did_you_mean
from . import scalars as S
from . import prims
from .binder import ArgChecker, BoundCall, RangeCheck, bind, bind_op, reads_step
from .emit import Emitter
from .ir import POINT_PORT
from .modules import HyperParam, ModuleEnv
from .ops import OPS, MacroOp, Op, Param, op_impl
from .symbols import (DefSym, HParamSym, InfSym, LetSym, Local, LossSym, MathSym, OpSym, ScalarSym, Scope,
                      ShapeSym, SourceSym, StateSym, callable_names, resolve, visible_names)
from .values import Fragment, ScalarV, Stream, Value, Word, kind_name

__all__ = ["Builder", "RouteInfo", "RangeCheck", "MAX_EXPANDED_DEPTH", "NODE_BUDGET", "NODE_BUDGET_PER_AST_NODE",
           "node_budget", "selector_label"]

_MAX_INLINE_DEPTH = 32
#: primitives defined for some scalar values only: with a hyperparameter in them, checked per param group
_DOMAIN_LIMITED = frozenset({"%", "sqrt", "log", "exp"})
_DOMAIN_HINTS = {"%": "'%' is the remainder of whole numbers by a whole number other than 0, e.g. step % 10",
                 "sqrt": "sqrt needs a number >= 0", "log": "log needs a number > 0",
                 "exp": "exp(x) is larger than the largest float (about 1.8e308) for x > 709"}
#: the hint for the divisor of a signal's remainder (torch.remainder: any number but 0)
_SIGNAL_MOD_HINT = "the remainder of a signal needs a divisor other than 0, e.g. grad % 0.5"
#: the argument names of the math functions, for messages
_ARG_NAMES = {"abs": ("x",), "sign": ("x",), "sqrt": ("x",), "exp": ("x",), "log": ("x",),
              "max": ("a", "b"), "min": ("a", "b"), "clamp": ("x", "lo", "hi"), "where": ("cond", "a", "b"),
              "matmul": ("a", "b"), "transpose": ("x",), "eigvecs": ("a",), "qr": ("a",), "descending": ("v",),
              "matrix_power": ("a", "p", "eps"), "%": ("a", "b")}
_MAX_APPLY_DEPTH = 100

#: How deeply expressions may nest once the lets and defs they name are expanded into them
#: (``let v1 = ---v0``, ``let v2 = ---v1``... add up). A single expression is already bounded
#: by the parser (``gradpipe.dsl.parser.MAX_DEPTH``, 200); this bounds the sum, so the
#: builder's recursion ends in a GradError rather than a RecursionError. Also the depth of a
#: scalar argument built from lets of lets. Read on every use: a module constant.
MAX_EXPANDED_DEPTH = 300

#: What one program may expand to: at most ``NODE_BUDGET + NODE_BUDGET_PER_AST_NODE * n`` op and
#: arithmetic applications, ``def`` expansions and scalar-expression terms, where ``n`` counts
#: the syntax-tree nodes of the file and of everything it imports. A ``let`` or ``def`` is copied
#: at every use, so definitions that each use the one before twice (``let v2 = v1 | v1``) double
#: at every line; the budget turns that into a GradError instead of a compile that never ends.
#: It counts work before common-subexpression elimination: ``v1 + v1`` costs twice even though
#: CSE later keeps one copy. Real pipelines build a few nodes per syntax-tree node.
NODE_BUDGET = 10_000
NODE_BUDGET_PER_AST_NODE = 50


def node_budget(env: ModuleEnv) -> int:
    """The expansion budget of the program rooted at ``env`` (see :data:`NODE_BUDGET`)."""
    seen: set[int] = set()
    todo = [env]
    n = 0
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        n += sum(1 for _ in ast.walk(m.module))
        todo.extend(m.aliases.values())
        todo.extend(m.imported.values())
    return NODE_BUDGET + NODE_BUDGET_PER_AST_NODE * n


def _budget_hint() -> str:
    return ("every use of a let or def is a copy, so definitions that use the one before twice double "
            f"at every line; the budget is {NODE_BUDGET:,} + {NODE_BUDGET_PER_AST_NODE} per syntax-tree "
            "node of the program (gradpipe.compiler.build.NODE_BUDGET): use each definition once per level")


class _Folded:
    """One entry of the folding log, formatted only when read (``str``): formatting every
    folded sub-expression as it is built would cost time quadratic in an expression's depth."""

    __slots__ = ("e", "result", "what")

    def __init__(self, e: ast.Expr, result: object, what: str = "fold") -> None:
        self.e, self.result, self.what = e, result, what

    def __str__(self) -> str:
        where = f"({self.e.span.line}:{self.e.span.column})"
        if self.what == "identity":
            return f"{_text(self.e)} is the identity; removed {where}"
        return f"{_text(self.e)} -> {self.result} {where}"


class _Label:
    """A fragment's source text for messages, formatted only if a message needs it."""

    __slots__ = ("e", "_s")

    def __init__(self, e: ast.Expr) -> None:
        self.e, self._s = e, None

    def __str__(self) -> str:
        if self._s is None:
            self._s = _text(self.e)
        return self._s

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass(frozen=True)
class RouteInfo:
    """One route: a label (from its selector), the selector, and its output node."""

    label: str
    selector: ast.Selector
    output: str
    span: Span


@dataclass
class _Cell:
    """A state cell of the route being built: its node (whose value is the cell before the
    step), the node of its new value once built, and whether its update is being built."""

    read: str
    new: str | None = None
    busy: bool = False
    #: the file and statement it comes from
    source: tuple[ModuleEnv, ast.State] | None = None


class Builder:
    """Compiles the expressions of one program into the graph of its :class:`Emitter`."""

    def __init__(self, root: ModuleEnv, hparams: dict[str, HyperParam], budget: int | None = None) -> None:
        self.root = root
        self.hparams = hparams
        self.emit = Emitter(node_budget(root) if budget is None else budget, _budget_hint())
        self.check = ArgChecker(hparams)
        #: the folding log; entries format themselves when read (``str(entry)``)
        self.folded: list[_Folded] = []
        self._let_memo: dict[tuple[int, str], Value] = {}
        #: let -> the cells its value reads, each with the guards inside the let (replayed
        #: under the guards of every later use: a let is built once but read in each branch)
        self._let_cells: dict[tuple[int, str], list[tuple[str, tuple[tuple[S.Scalar, bool], ...]]]] = {}
        #: the lets being built (their key, and the depth of the guards when they started)
        self._let_frames: list[tuple[tuple[int, str], int]] = []
        #: (id of the state statement, route) -> its cell in that route
        self._cells: dict[tuple[int, str], _Cell] = {}
        #: the cells whose update is still to be built (read only through ``previous`` so far)
        self._pending_cells: list[tuple[int, str]] = []
        #: route -> (cell node, node of its new value) for every cell of the route
        self.commits: dict[str, list[tuple[str, str]]] = {}
        #: the conditions of the ``where`` branches being built (a scalar condition, and
        #: whether the branch is the one it picks), innermost last
        self._guards: list[tuple[S.Scalar, bool]] = []
        #: the cell whose update is being built (uses of other cells there are its dependencies)
        self._cell_ctx: str | None = None
        #: cell -> when it is read: a set of conjunctions of guards (the empty one: always)
        self._cell_uses: dict[str, set[tuple[tuple[S.Scalar, bool], ...]]] = {}
        #: cell -> (a cell its update or initial value reads, under which guards there)
        self._cell_deps: dict[str, set[tuple[str, tuple[tuple[S.Scalar, bool], ...]]]] = {}
        self._let_busy: set[int] = set()
        self._depth = 0
        self._expr_depth = 0
        #: id(scalar expr) -> (expr, terms, depth) of the scalar expressions built here
        self._scalar_shapes: dict[int, tuple[S.Scalar, int, int]] = {}
        #: the op of the block being built, for messages about what it may read
        self._block_op: str | None = None
        #: ids of the let and def statements the pipeline reached
        self.used: set[int] = set()
        #: nodes whose value is one number per tensor, row or column (reductions, shape values, arithmetic
        #: on them): ops and the update take them expanded to the parameter's shape (a ``broadcast`` node)
        self._reduced: set[str] = set()
        #: those of them that are one number for the whole route (reductions over ``global``, and
        #: arithmetic on those only), which the eager backend keeps 0-d
        self._global: set[str] = set()
        #: nodes whose value is a matrix of its own (a matrix function's, arithmetic on such values and
        #: per-tensor ones, a cell that starts from one): reduced as they are, never expanded
        self._matrix: set[str] = set()
        #: while a branch of a ``where`` with a scalar condition is built: the domain checks it
        #: asks for, (op, [(argument name, probe)], span, hint, guards), held until it is known
        #: whether the branch is a scalar (evaluated only when the condition picks it) or not
        self._pending: list[tuple[str, list[tuple[str, S.Scalar]], Span, str, tuple]] | None = None

    # ------------------------------------------------------------------ what the build produced
    @property
    def graph(self):
        return self.emit.graph

    @property
    def range_checks(self) -> list[RangeCheck]:
        return self.check.range_checks

    @property
    def losses(self) -> set[str]:
        return self.emit.losses

    @property
    def reads(self) -> set[str]:
        return self.emit.reads

    @property
    def over_budget(self) -> GradError | None:
        return self.emit.over_budget

    @property
    def budget(self) -> int:
        return self.emit.budget

    # ------------------------------------------------------------------ limits
    @contextlib.contextmanager
    def _nesting(self, span: Span):
        """Bound how deeply pipelines nest when applied (lets of lets of ... lets)."""
        if self._depth >= _MAX_APPLY_DEPTH:
            raise GradError(f"the pipeline nests more than {_MAX_APPLY_DEPTH} levels deep here", span,
                            "flatten it: fewer lets or defs that wrap one another")
        self._depth += 1
        self.emit.applying.append(span)
        try:
            yield
        finally:
            self._depth -= 1
            self.emit.applying.pop()

    def _scalar_shape(self, x: S.Scalar) -> tuple[int, int]:
        """(terms, depth) of a scalar expression as a tree, in time linear in its distinct nodes."""
        memo = self._scalar_shapes
        todo: list[tuple[S.Scalar, bool]] = [(x, False)]
        while todo:
            y, ready = todo.pop()
            if id(y) in memo:
                continue
            kids = S.children(y)
            if not ready and any(id(k) not in memo for k in kids):
                todo.append((y, True))
                todo.extend((k, False) for k in kids)
                continue
            shapes = [memo[id(k)] for k in kids]
            memo[id(y)] = (y, 1 + sum(sh[1] for sh in shapes), 1 + max((sh[2] for sh in shapes), default=0))
        return memo[id(x)][1], memo[id(x)][2]

    # ------------------------------------------------------------------ entry points
    def build_route(self, label: str, selector: ast.Selector, body: ast.Expr, span: Span,
                    param: bool = False) -> RouteInfo:
        """One route; ``param``: its body is the parameter's new value (``param = EXPR``), not ``u``."""
        self.emit.route = label
        v = self.expr(body, Scope(self.root), label)
        self.finish_cells()
        if isinstance(v, Fragment):
            raise GradError("a pipeline must start from a signal such as 'grad'", body.span,
                            f"write 'grad | {_text(body)}'")
        if not isinstance(v, Stream):
            raise GradError(f"a pipeline must produce a signal, but this is {kind_name(v)}", body.span,
                            "start it with 'grad', e.g. 'grad | adam'")
        self._refuse_mask(v.node, body.span, "the new parameter" if param else "the update")
        out = self._full(v.node, body.span, label)
        return RouteInfo(label, selector, self.emit.output(label, out, span, self.commits.get(label, ()), param),
                         span)

    def source(self, name: str, span: Span) -> Stream:
        """A source as a signal of the route being built (``grad``, ``param``, ``grads.main``)."""
        return Stream(self.emit.source(name, span), span)

    # ------------------------------------------------------------------ expressions
    def expr(self, e: ast.Expr, sc: Scope, prefix: str) -> Value:
        """Compile one expression. The recursion is bounded by :data:`MAX_EXPANDED_DEPTH`, counted
        across the lets and defs that expand into each other."""
        if self._expr_depth >= MAX_EXPANDED_DEPTH:
            raise GradError(f"the expression nests more than {MAX_EXPANDED_DEPTH} levels deep once the lets and "
                            "defs it uses are expanded", e.span,
                            f"the limit is {MAX_EXPANDED_DEPTH} levels (gradpipe.compiler.build.MAX_EXPANDED_DEPTH): "
                            "compute it in fewer steps, or give a long chain of definitions fewer levels each")
        self._expr_depth += 1
        try:  # the dispatch is inline: one Python frame per level of the expression
            if isinstance(e, ast.Num):
                try:
                    S.check_finite(e.value)
                except OverflowError:
                    raise GradError("the number is too large", e.span) from None
                return ScalarV(S.Const(e.value), e.span)
            if isinstance(e, (ast.Bool, ast.Str)):
                return Word(e.value, e.span)
            if isinstance(e, ast.Name):
                return self.name(e, sc, prefix)
            if isinstance(e, ast.Call):
                return self.call(e, sc, prefix)
            if isinstance(e, ast.Chain):
                return self.chain(e, sc, prefix)
            if isinstance(e, (ast.BinOp, ast.Neg)):
                return self.arith(e, sc, prefix)
            if isinstance(e, ast.Index):
                return self.index(e, sc)
            if isinstance(e, ast.Tuple):
                raise GradError("a tuple can only be a hyperparameter's default", e.span,
                                "declare it: hparam betas = (0.9, 0.999)")
            raise GradError("unsupported expression", getattr(e, "span", Span()))  # pragma: no cover
        finally:
            self._expr_depth -= 1

    def chain(self, e: ast.Chain, sc: Scope, prefix: str) -> Value:
        head = self.expr(e.stages[0], sc, prefix)
        if isinstance(head, Fragment):
            stages = [head] + [self._stage(s, sc, prefix) for s in e.stages[1:]]

            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    cur = inp
                    for st in stages:
                        cur = st.apply(cur, pfx)
                    return cur
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        if not isinstance(head, Stream):
            raise GradError(f"a pipeline must start from a signal, but this is {kind_name(head)}",
                            e.stages[0].span, "start it with 'grad', e.g. 'grad | adam'")
        cur = head.node
        for s in e.stages[1:]:
            cur = self._stage(s, sc, prefix).apply(cur, prefix)
        return Stream(cur, e.span)

    def _stage(self, s: ast.Expr, sc: Scope, prefix: str) -> Fragment:
        v = self.expr(s, sc, prefix)
        if isinstance(v, Fragment):
            return v
        if isinstance(v, Stream) and isinstance(s, (ast.Call, ast.Name)):
            fn = (s.func if isinstance(s, ast.Call) else s).parts[-1]
            if fn in OPS and OPS[fn].params and OPS[fn].params[0].kind in ("signals", "signal"):
                raise GradError(f"'{fn}' combines the signals it is given; it cannot be a stage", s.span,
                                f"start the pipeline with it: {_text(s)} | adam")
        if isinstance(v, Stream):
            raise GradError("a signal cannot be a pipeline stage", s.span,
                            f"to add it write 'add({_text(s)})'; to multiply by it, 'scale({_text(s)})'")
        if isinstance(v, ScalarV) and S.is_bool(v.expr):
            raise GradError("a boolean (a comparison) cannot be a pipeline stage", s.span,
                            f"choose with it: where({_text(s)}, a, b)")
        if isinstance(v, ScalarV):
            raise GradError("a number cannot be a pipeline stage", s.span, f"to multiply write 'scale({_text(s)})'")
        raise GradError(f"{kind_name(v)} cannot be a pipeline stage", s.span)

    def index(self, e: ast.Index, sc: Scope) -> Value:
        if isinstance(e.base, ast.Name) and len(e.base.parts) == 1:
            hp = self._lookup_hparam(e.base.parts[0], sc)
            if hp is not None:
                if hp.kind != "tuple":
                    raise GradError(f"'{hp.name}' is not a tuple; it cannot be indexed", e.span)
                if e.index >= len(hp.default):
                    raise GradError(f"index {e.index} is out of range: '{hp.name}' has {len(hp.default)} items",
                                    e.span, f"use an index from 0 to {len(hp.default) - 1}")
                return ScalarV(S.HP(hp.name, e.index), e.span)
        raise GradError("only a tuple hyperparameter can be indexed", e.span,
                        "declare one: hparam betas = (0.9, 0.999), then write betas[0]")

    def arith(self, e: ast.BinOp | ast.Neg, sc: Scope, prefix: str) -> Value:
        """``a op b`` (arithmetic, ``%`` or a comparison) or ``-a``."""
        op = "neg" if isinstance(e, ast.Neg) else e.op
        operands = [e.operand] if isinstance(e, ast.Neg) else [e.left, e.right]
        return self._prim(op, e, operands, sc, prefix)

    def _prim(self, op: str, e: ast.Expr, operands: list[ast.Expr], sc: Scope, prefix: str,
              head: Value | None = None) -> Value:
        """The primitive ``op`` (see :mod:`.prims`) on ``operands``, after ``head`` when given
        (a math function used as a stage: the stream is its first argument). Every operand a
        scalar: a scalar expression, folded when constant; else a signal (an arithmetic node),
        or an open pipeline when an operand is one."""
        n_folded = len(self.folded)
        vals: list[Value] = [] if head is None else [head]
        for o in operands:  # a loop, not a comprehension: one Python frame fewer per level
            cond = self._scalar_cond(vals[0]) if op == "where" and len(vals) in (1, 2) else None
            if cond is not None:  # a branch of a scalar choice: computed only when the choice picks it
                vals.append(self._guarded(o, sc, prefix, cond, len(vals) == 1))
            else:
                vals.append(self.expr(o, sc, prefix))
        spans = ([] if head is None else [head.span]) + [o.span for o in operands]
        ports = prims.PORTS[op]
        vals = [self._operand(op, port, v, span) for port, v, span in zip(ports, vals, spans)]
        if prims.is_matrix(op):
            self._matrix_operands(op, vals, spans, e.span)
        if all(isinstance(v, ScalarV) for v in vals):
            return self._scalar_prim(e, op, operands, vals, n_folded)
        if op == "%" and isinstance(vals[1], ScalarV):
            self._check_signal_divisor(vals[1].expr, spans[1])
        if op == "**" and not isinstance(vals[1], ScalarV):
            raise GradError("the exponent must be a number", spans[1],
                            "raise a signal to a number (grad ** 2); for a signal exponent write exp(y * log(x))")
        if any(isinstance(v, Fragment) for v in vals):
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    concrete = [Stream(v.apply(inp, pfx), v.span) if isinstance(v, Fragment) else v for v in vals]
                    return self._arith_node(op, pfx, e.span, concrete, spans)
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        return Stream(self._arith_node(op, prefix, e.span, vals, spans), e.span)

    def _matrix_operands(self, op: str, vals: list[Value], spans: list[Span], span: Span) -> None:
        """A matrix function takes matrices (signals: a number has no matrix view) and, for
        ``matrix_power``, numbers; outside blocks."""
        matrices = prims.MATRIX_OPERANDS.get(op, prims.PORTS[op])
        for port, v, where in zip(prims.PORTS[op], vals, spans):
            if port not in matrices:
                if not isinstance(v, ScalarV):
                    raise GradError(f"'{op}' takes a number here, but this is {kind_name(v)}", where,
                                    f"write {op}({', '.join(_ARG_NAMES[op])}) with numbers for "
                                    f"{', '.join(_ARG_NAMES[op][1:])}")
                continue
            if isinstance(v, ScalarV):
                raise GradError(f"'{op}' needs matrices (signals), but this is a number", where,
                                f"multiply by a number with '*'; {op}({', '.join(_ARG_NAMES[op])}) takes signals "
                                "such as grad, param or a state cell")
        self._no_per_tensor_in_block(f"the matrix function '{op}'", span)

    def _operand(self, op: str, port: str, v: Value, span: Span) -> Value:
        """Check a scalar or word operand of primitive ``op`` on ``port``: a number, or, for the
        condition of ``where``, a boolean (``true`` becomes a constant). Signals are checked when
        their node is built (:meth:`_arith_node`)."""
        if isinstance(v, Word):
            if port == "cond" and isinstance(v.value, bool):
                return ScalarV(S.Const(v.value), v.span)
            raise GradError(f"arithmetic needs numbers or signals, but this is {kind_name(v)}", span,
                            "a boolean chooses between two values: where(cond, a, b)"
                            if isinstance(v.value, bool) else None)
        if not isinstance(v, ScalarV):
            return v
        if isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "tuple" and v.expr.index is None:
            raise GradError(f"'{v.expr.name}' is a tuple; pick an item", span, f"write {v.expr.name}[0]")
        is_bool = S.is_bool(v.expr) or (isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "bool")
        if port == "cond" and not is_bool:
            raise GradError("the condition of 'where' must be a comparison or a boolean, but this is a number",
                            span, "compare it: where(x > 0, a, b)")
        if port != "cond" and is_bool:
            if isinstance(v.expr, S.HP):
                raise GradError(f"'{v.expr.name}' is a boolean; arithmetic needs numbers", span,
                                f"choose with it: where({v.expr.name}, a, b)")
            raise GradError(f"{_op_text(op)} needs a number, but this is a boolean (a comparison)", span,
                            f"choose with it: where({_text_at(span)}, a, b)")
        return v

    def _scalar_prim(self, e: ast.Expr, op: str, operands: list[ast.Expr], vals: list[Value],
                     n_folded: int) -> ScalarV:
        exprs = [v.expr for v in vals]  # type: ignore[union-attr]
        if op == "%":  # a constant side must be whole (the divisor not 0) even when the other is not constant
            for k, x in enumerate(exprs):
                if isinstance(x, S.Const):
                    try:
                        S.int_mod(x.value, 1) if k == 0 else S.int_mod(0, x.value)
                    except (ValueError, ZeroDivisionError) as err:
                        raise GradError(str(err), vals[k].span, _DOMAIN_HINTS["%"]) from None
        try:
            if op == "neg":
                r = S.neg(exprs[0])
            elif op in prims.COMPARISONS:
                r = S.compare(op, exprs[0], exprs[1])
            elif op in prims.BINARY:
                r = S.binop(op, exprs[0], exprs[1])
            else:
                r = S.call(op, tuple(exprs))
        except ZeroDivisionError:
            if op == "%":
                raise GradError("'%' by zero", e.span, _DOMAIN_HINTS["%"]) from None
            raise GradError("division by zero", e.span) from None
        except ValueError as err:
            if op in _DOMAIN_HINTS:
                raise GradError(str(err), e.span, _DOMAIN_HINTS[op]) from None
            raise GradError("the result is not a finite real number", e.span) from None
        except OverflowError:
            raise GradError("the result is not a finite real number", e.span, _DOMAIN_HINTS.get(op)) from None
        if isinstance(r, S.Const) and not (op == "neg" and isinstance(e.operand, ast.Num)):  # type: ignore[union-attr]
            # the folds of the operands themselves are part of this one: log only the largest
            operand_ids = {id(o) for o in operands}
            self.folded[n_folded:] = [f for f in self.folded[n_folded:] if id(f.e) not in operand_ids]
            self.folded.append(_Folded(e, r))
        elif not isinstance(r, S.Const):
            terms, depth = self._scalar_shape(r)
            if depth > MAX_EXPANDED_DEPTH:
                raise GradError(f"the expression nests more than {MAX_EXPANDED_DEPTH} levels deep once the "
                                "lets it uses are expanded", e.span,
                                f"the limit is {MAX_EXPANDED_DEPTH} levels "
                                "(gradpipe.compiler.build.MAX_EXPANDED_DEPTH): compute it in fewer steps")
            if terms > self.budget:
                raise GradError(f"the expression expands to more than {self.budget:,} terms", e.span,
                                "every use of a let is a copy, so lets that use the one before twice double "
                                "at every line; the budget is gradpipe.compiler.build.NODE_BUDGET")
            if op in _DOMAIN_LIMITED:
                self._check_domain(op, exprs, e.span)
        return ScalarV(r, e.span)

    @staticmethod
    def _hp_only(x: S.Scalar) -> bool:
        """Whether ``x`` is known once the hyperparameters are (not a constant, not per step)."""
        return not isinstance(x, S.Const) and not reads_step(x) and any(isinstance(v, S.HP) for v in S.leaves(x))

    def _check_domain(self, op: str, exprs: list[S.Scalar], span: Span) -> None:
        """``%``, ``sqrt``, ``log`` and ``exp`` of operands known once hyperparameters are: whole
        numbers (a divisor not 0) for ``%``, ``x >= 0`` for ``sqrt``, ``x > 0`` for ``log``, a
        finite result for ``exp``. Checked at the hyperparameters' defaults, and for every param
        group (a range check); an operand that reads ``step`` or ``loss`` is checked in every
        step (``interpret.eval_dynamic``). See :meth:`_check_probes` for ``where`` guards."""
        names = _ARG_NAMES[op]
        probes: list[tuple[str, S.Scalar]] = []
        for k, x in enumerate(exprs if op == "%" else exprs[:1]):
            if not self._hp_only(x):
                continue
            if op == "%":  # one side alone: a % 1 checks a, 0 % b checks b
                probes.append((names[k], S.BinS("%", x, S.Const(1)) if k == 0 else S.BinS("%", S.Const(0), x)))
            else:
                probes.append((names[k], S.FnS(op, (x,))))
        if probes:
            self._check_probes(op, probes, span, _DOMAIN_HINTS[op], ())

    def _check_signal_divisor(self, x: S.Scalar, span: Span) -> None:
        """The scalar divisor of a signal's remainder (``grad % k``): not 0. A constant is
        checked here, a hyperparameter at its default and for every param group."""
        if isinstance(x, S.Const):
            if x.value == 0:
                raise GradError("'%' by zero", span, _SIGNAL_MOD_HINT)
        elif self._hp_only(x):
            self._check_probes("%", [("b", S.BinS("/", S.Const(1), x))], span, _SIGNAL_MOD_HINT, ())

    def _check_probes(self, op: str, probes: list[tuple[str, S.Scalar]], span: Span, hint: str,
                      guards: tuple[tuple[S.Scalar, bool], ...]) -> None:
        """Check each ``(argument name, probe)`` at the hyperparameters' defaults (the probe
        raises where the argument is out of the domain) and record it as a range check for every
        param group. ``guards``: the conditions of the ``where`` s (and which branch) that the
        checked value sits in, as a scalar: it is computed only where they hold, so the probe is
        checked only there. A guard that reads ``step`` or ``loss`` leaves the check to the step
        in which it holds (``interpret.eval_dynamic``). While a ``where`` branch is being built
        (``self._pending``), the check waits for it."""
        if self._pending is not None:
            self._pending.append((op, probes, span, hint, guards))
            return
        if any(reads_step(c) for c, _ in guards):
            return
        defaults = {name: hp.default for name, hp in self.hparams.items()}
        try:
            active = all(bool(c.eval(defaults)) == taken for c, taken in guards)
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            active = False  # the condition itself fails: that is reported where it is computed
        for name, probe in probes:
            if active:
                try:
                    probe.eval(defaults)
                except (ValueError, ZeroDivisionError, OverflowError) as err:
                    what = ("'%' by zero" if op == "%" and isinstance(err, ZeroDivisionError) else
                            "exp overflows (the result is larger than the largest float)"
                            if op == "exp" and isinstance(err, OverflowError) else str(err))
                    raise GradError(f"{what} with the hyperparameters' defaults", span, hint) from None
            expr = probe
            for c, taken in reversed(guards):  # where the guards fail, a value in every domain
                expr = S.FnS("where", (c, expr, S.Const(0)) if taken else (c, S.Const(0), expr))
            self.check.range_checks.append(RangeCheck(expr, Param(name), op, span))

    def _scalar_cond(self, v: Value) -> S.Scalar | None:
        """``v`` as the condition of a scalar choice (a comparison or boolean of scalars), else None."""
        if isinstance(v, Word) and isinstance(v.value, bool):
            return S.Const(v.value)
        if isinstance(v, ScalarV) and (S.is_bool(v.expr) or (
                isinstance(v.expr, S.HP) and v.expr.index is None and v.expr.name in self.hparams
                and self.hparams[v.expr.name].kind == "bool")):
            return v.expr
        return None

    def _guarded(self, o: ast.Expr, sc: Scope, prefix: str, cond: S.Scalar, taken: bool) -> Value:
        """A branch of ``where`` whose condition ``cond`` is a scalar (``taken``: the branch picked
        when it holds). A scalar branch is computed only when picked, so the domain checks asked
        for while building it are guarded by ``cond``; a signal's are not (its nodes run in
        every step)."""
        outer, self._pending = self._pending, []
        self._guards.append((cond, taken))
        try:
            v = self.expr(o, sc, prefix)
        finally:
            pending, self._pending = self._pending, outer
            self._guards.pop()
        for op, probes, span, hint, guards in pending:
            self._check_probes(op, probes, span, hint, ((cond, taken),) + guards if isinstance(v, ScalarV) else guards)
        return v

    def _arith_node(self, op: str, prefix: str, span: Span, vals: list[Value],
                    spans: list[Span] | None = None) -> str:
        """The arithmetic node of primitive ``op`` on ``vals`` (signals as input edges, scalars
        as arguments, on the ports of ``prims.PORTS``). A mask (a comparison of signals) is
        accepted only as the condition of ``where``; a signal there must be one. ``spans``:
        where each operand was written (for messages)."""
        args: dict[str, Any] = {}
        inputs: list[tuple[str, str]] = []
        spans = spans or [v.span for v in vals]
        for port, v, where in zip(prims.PORTS[op], vals, spans):
            if isinstance(v, Stream):
                mask = self._is_mask(v.node)
                if port == "cond" and not mask:
                    if v.node in self._reduced:  # a reduction or shape value used as a boolean
                        raise GradError("the condition of 'where' must be a comparison (a mask), but this is a "
                                        "number per tensor (a reduction or a shape value)", where,
                                        f"compare it: where({_text_at(where, 'x')} > 0, a, b)")
                    raise GradError("the condition of 'where' must be a comparison (a mask), but this is a signal "
                                    "of numbers", where, "compare it: where(grad > 0, a, b)")
                if port != "cond" and mask:
                    self._refuse_mask(v.node, where, _op_text(op))
                inputs.append((v.node, port))
            else:
                args[port] = v.expr  # type: ignore[union-attr]
        if op == "where" and "cond" in args:
            # a scalar condition: a scalar branch is computed only in the steps that pick it
            cond = args["cond"]
            for port in ("lhs", "rhs"):
                if port in args and not isinstance(args[port], S.Const):
                    pick = (cond, args[port], S.Const(0)) if port == "lhs" else (cond, S.Const(0), args[port])
                    args[port] = S.call("where", pick)
        if op == "where" and any(p == "cond" for _, p in inputs) and "lhs" in args and "rhs" in args:
            # a mask choosing between two numbers: the result takes the dtype of the mask's signal
            cond = next(src for src, p in inputs if p == "cond")
            inputs.append((next(u for u, _ in self.graph.in_edges(cond)), "like"))
        node = self.emit.arith(op, prefix, span, args, inputs)
        if prims.is_matrix(op) or all(src in self._reduced for src, _ in inputs):
            self._reduced.add(node)  # arithmetic on per-tensor values only: a per-tensor value
            if prims.is_matrix(op) or any(src in self._matrix for src, _ in inputs):
                self._matrix.add(node)
        if inputs and all(src in self._global for src, port in inputs if port != "like"):
            self._global.add(node)  # arithmetic on route-wide values only: one number for the route
        return node

    def _is_mask(self, node: str) -> bool:
        """Whether a node's value is a mask (true or false per element): a comparison."""
        d = self.graph.nodes[node]
        return d["kind"] == "arith" and prims.is_mask_op(d["op"])

    def _refuse_mask(self, node: str, span: Span, what: str) -> None:
        """A GradError if ``node`` is a mask: ``what`` (e.g. "'adam'") needs numbers."""
        if self._is_mask(node):
            raise GradError(f"{what} needs numbers, but this is a mask (a comparison: true or false per element)",
                            span, f"choose with it: where({_text_at(self.graph.nodes[node]['span'])}, a, b)")

    # ------------------------------------------------------------------ names
    def _lookup_hparam(self, name: str, sc: Scope) -> HyperParam | None:
        if name in sc.locals:
            return None
        if name in sc.env.hparams or (name == "lr" and name in self.hparams):
            return self.hparams.get(name)
        return None

    def _resolve(self, e: ast.Name, sc: Scope):
        return resolve(e.parts, sc, self.hparams, e.span)

    def name(self, e: ast.Name, sc: Scope, prefix: str) -> Value:
        sym = self._resolve(e, sc)
        if isinstance(sym, Local):
            return sym.value
        if isinstance(sym, LetSym):
            return self._let(sym.env, sym.let, prefix)
        if isinstance(sym, StateSym):
            cell = self._cell(sym.env, sym.state, e.span)
            if cell.busy:
                raise GradError(f"the new value of state '{sym.state.name}' depends on itself", e.span,
                                f"in its update ('then ...'), '{sym.state.name}' is its value before the step; "
                                f"elsewhere write previous({sym.state.name}) for that value")
            return Stream(cell.new, e.span)  # type: ignore[arg-type]
        if isinstance(sym, DefSym):
            return self._def_call(sym.env, sym.definition, ast.Call(e, span=e.span), sc)
        if isinstance(sym, HParamSym):
            return ScalarV(S.HP(sym.hp.name), e.span)
        if isinstance(sym, (SourceSym, LossSym)):
            what = sym.name if isinstance(sym, SourceSym) else f"grads.{sym.loss}"
            self._no_source_in_block(what, e.span)
            return self.source(what, e.span)
        if isinstance(sym, ScalarSym):
            self.emit.reads.add(sym.name)
            return ScalarV(S.Src(sym.name), e.span)
        if isinstance(sym, InfSym):
            return ScalarV(S.Const(math.inf), e.span)
        if isinstance(sym, MathSym):
            if sym.name == "previous":
                return self._previous_call(ast.Call(e, span=e.span), sc, prefix)
            if sym.name == "grad_at":
                return self._grad_at_call(ast.Call(e, span=e.span), sc, prefix)
            return self._math_call(sym.name, ast.Call(e, span=e.span), sc, prefix)
        if isinstance(sym, ShapeSym):
            return self._shape_value(sym.name, e.span)
        if isinstance(sym, OpSym):
            op = sym.op
            if isinstance(op, MacroOp) or (op.params and op.params[0].kind == "signals"):
                return self._op_call(op, ast.Call(e, span=e.span), sc, prefix)
            return self._op_fragment(op, ast.Call(e, span=e.span), sc)
        parts = e.parts
        while len(parts) > 1 and parts[0] in sc.env.aliases and parts[0] not in sc.locals:  # lib.name
            sc, parts = Scope(sc.env.aliases[parts[0]], {}, sc.depth, sc.defs), parts[1:]
        raise GradError(f"unknown name '{parts[0]}'", e.span, did_you_mean(parts[0], visible_names(sc, self.hparams))
                        or f"'{parts[0]}' is not an op, a math function, a source (grad, param), a scalar (lr, step, "
                        "loss), a hyperparameter or a let/def; 'gradpipe ops' lists the ops")

    def _let(self, env: ModuleEnv, let: ast.Let, prefix: str) -> Value:
        self.used.add(id(let))
        key = (id(let), self.emit.route)
        if key in self._let_memo:
            for read, inner in self._let_cells.get(key, ()):
                self._use_cell(read, inner)
            return self._let_memo[key]
        if id(let) in self._let_busy:
            raise GradError(f"'{let.name}' is defined in terms of itself", let.span,
                            "a let binding cannot refer to itself, directly or through others")
        if len(self._let_busy) >= _MAX_INLINE_DEPTH:
            raise GradError(f"'{let.name}' is defined through more than {_MAX_INLINE_DEPTH} nested let bindings",
                            let.span, "flatten the chain of lets: write the pipeline in fewer, longer bindings")
        self._let_busy.add(id(let))
        self._let_cells[key] = []
        self._let_frames.append((key, len(self._guards)))
        try:
            v = self.expr(let.value, Scope(env), f"{self.emit.route}/{let.name}")
        finally:
            self._let_busy.discard(id(let))
            self._let_frames.pop()
        self._let_memo[key] = v
        return v

    # ------------------------------------------------------------------ state cells
    def _cell(self, env: ModuleEnv, st: ast.State, span: Span, update: bool = True) -> _Cell:
        """The route's cell of ``state`` statement ``st``: its node (the value before the step),
        made on first use, and, unless only that value is wanted (``update=False``:
        ``previous(c)``), its update, in which the cell's name is that node. An update not
        built by a use is built when the route is done (:meth:`finish_cells`)."""
        self.used.add(id(st))
        key = (id(st), self.emit.route)
        cell = self._cells.get(key)
        if cell is None:
            prefix = f"{self.emit.route}/{st.name}"
            init = self.expr(st.init, Scope(env), prefix)
            read = self._cell_node(prefix, init, st.init, st.span, f"state '{st.name}'")
            cell = self._cells[key] = _Cell(read, source=(env, st))
            self._pending_cells.append(key)
        self._use_cell(cell.read)
        if update and cell.new is None and not cell.busy:
            self._build_update(key)
        return cell

    def _build_update(self, key: tuple[int, str]) -> None:
        cell = self._cells[key]
        env, st = cell.source  # type: ignore[misc]
        outer = self._cell_ctx, self._guards, self._let_frames
        self._cell_ctx, self._guards, self._let_frames = cell.read, [], []
        cell.busy = True
        try:
            upd = self.expr(st.update, Scope(env, {st.name: Stream(cell.read, st.span)}),
                            f"{self.emit.route}/{st.name}")
            cell.new = self._commit(cell.read, upd, st.update, f"state '{st.name}'")
        except GradError:
            del self._cells[key]
            raise
        finally:
            cell.busy = False
            self._cell_ctx, self._guards, self._let_frames = outer

    def cell_read(self, st: ast.State, route: str) -> str | None:
        """The node of ``st``'s cell in ``route`` (its value before the step), if the route has one."""
        cell = self._cells.get((id(st), route))
        return cell.read if cell is not None else None

    def finish_cells(self) -> None:
        """Build the updates of the cells that were only read through ``previous(c)``."""
        while self._pending_cells:
            key = self._pending_cells.pop()
            cell = self._cells.get(key)
            if cell is not None and cell.new is None and not cell.busy:
                self._build_update(key)

    def _use_cell(self, read: str, inner: tuple[tuple[S.Scalar, bool], ...] = ()) -> None:
        """Record that ``read`` is read here: under the ``where`` branches being built, or, in
        another cell's update, whenever that cell is kept (see :meth:`cell_keeps`). ``inner``:
        more guards, those inside a ``let`` read again here (its reads are replayed at each use)."""
        guards = tuple(self._guards) + tuple(inner)
        for key, depth in self._let_frames:  # the lets being built read it too, wherever they are used
            self._let_cells[key].append((read, guards[depth:]))
        terms = tuple(g for g in guards if not reads_step(g[0]))  # a per-step choice keeps it
        if self._cell_ctx is not None and self._cell_ctx != read:
            self._cell_deps.setdefault(self._cell_ctx, set()).add((read, terms))
        elif self._cell_ctx is None:
            self._cell_uses.setdefault(read, set()).add(terms)

    def cell_keeps(self) -> None:
        """Give each cell its ``keep`` argument: when some reader needs it. A cell read only in
        the branch of ``where(amsgrad, ..., ...)`` that a false ``amsgrad`` does not pick keeps no
        buffer in the param groups where it is false (the compiled backend specialises on it,
        as on ``momentum(0)``); a cell read by another cell's update is kept with that cell."""
        uses = {c: {_conj(x) for x in t} for c, t in self._cell_uses.items()}
        changed = True
        while changed:
            changed = False
            for a, deps in self._cell_deps.items():
                for b, local in deps:
                    # a conjunction holds each guard once, so a loop of cells ends
                    new = {_conj(t + local) for t in uses.get(a, ())} - uses.setdefault(b, set())
                    if new:
                        uses[b] |= new
                        changed = True
        g = self.emit.graph
        for cell, terms in uses.items():
            if cell in g:
                g.nodes[cell]["args"]["keep"] = _any_of(terms)

    def _cell_node(self, prefix: str, init: Value, init_e: ast.Expr, span: Span, what: str,
                   shape: str | None = None) -> str:
        """A cell's node: its value before the step, ``init`` (a number or a signal) at first. The
        cell has its initial value's shape: a signal's (a per-tensor value, such as a reduction
        over ``rows``, makes a per-tensor cell: Adafactor's factored moments), else ``shape``'s
        (a node), else the parameter's."""
        if self._block_op is not None:
            raise GradError(f"{what} cannot be kept inside the {{ ... }} pipeline of '{self._block_op}'", span,
                            "declare the cell outside the block, at the top of the file")
        if isinstance(init, Stream):
            self._refuse_mask(init.node, init_e.span, f"the initial value of {what}")
            args: dict[str, Any] = {"init": None}
            x = init.node
            if x in self._global:  # one number for the route: a cell of the parameter's shape
                x = self.emit.arith("broadcast", prefix, init_e.span, {}, [(x, "lhs")])
        elif isinstance(init, ScalarV) and not S.is_bool(init.expr):
            args = {"init": init.expr}
            x = shape if shape is not None else self.source("grad", span).node  # only for its shape
        else:
            raise GradError(f"the initial value of {what} must be a number or a signal, not {kind_name(init)}",
                            init_e.span, "write e.g. 0, a hyperparameter, or a signal such as param or grad")
        self.emit.spend(span)
        read = self.emit.op(self.emit.fresh(prefix), "state", args, span, [(x, "x")])
        if x in self._matrix:
            self._matrix.add(read)
        if x in self._reduced:
            self._reduced.add(read)  # a few numbers per tensor, like the value it starts from
        return read

    def _commit(self, read: str, upd: Value, upd_e: ast.Expr, what: str) -> str:
        """Register ``upd`` as the new value of the cell ``read``; return the node holding it."""
        if isinstance(upd, ScalarV) and not S.is_bool(upd.expr):  # a number: as a signal of the cell's shape
            node = self._arith_node("where", f"{read}", upd_e.span,
                                    [ScalarV(S.Const(True), upd_e.span), upd, Stream(read, upd_e.span)])
        elif isinstance(upd, Stream):
            self._refuse_mask(upd.node, upd_e.span, f"the new value of {what}")
            node = upd.node
        else:
            hint = (f"apply it to a signal: (grad | {upd.label})" if isinstance(upd, Fragment)
                    else "write a number or a signal, e.g. max(vmax, v)")
            raise GradError(f"the new value of {what} must be a number or a signal, not {kind_name(upd)}",
                            upd_e.span, hint)
        self.commits.setdefault(self.emit.route, []).append((read, node))
        return node

    def _previous_call(self, e: ast.Call, sc: Scope, prefix: str) -> Value:
        """``previous(x)``, ``previous(x, init)``: the value ``x`` had in the previous step (``init``,
        0 by default, in the first); ``previous(c)`` of a state cell ``c``: its value before the
        step. As a stage, ``x | previous`` is ``previous(x)``."""
        if e.block is not None:
            raise GradError("'previous' takes no { ... } block", e.block.span, "write previous(x) or previous(x, init)")
        init_e: ast.Expr | None = None
        for kw in e.kwargs:
            if kw.name != "init" or init_e is not None or len(e.args) > 1:
                raise GradError(f"'previous' has no argument '{kw.name}'" if kw.name != "init"
                                else "'init' is given twice", kw.span, "write previous(x) or previous(x, init)")
            init_e = kw.value
        args = list(e.args)
        if len(args) == 2:
            init_e = args.pop()
        if len(args) > 1:
            raise GradError(f"'previous' takes 1 or 2 arguments, got {len(e.args)}", e.span,
                            "write previous(x) or previous(x, init)")
        self.emit.spend(e.span)
        if not args:
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    return self._previous(Stream(inp, e.span), e, init_e, sc, pfx).node
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        x_e = args[0]
        if isinstance(x_e, ast.Name) and len(x_e.parts) == 1:
            sym = self._resolve(x_e, sc)
            if isinstance(sym, StateSym):
                if init_e is not None:
                    raise GradError(f"state '{sym.state.name}' starts at its own initial value", init_e.span,
                                    f"write previous({sym.state.name})")
                return Stream(self._cell(sym.env, sym.state, x_e.span, update=False).read, e.span)
        x = self.expr(x_e, sc, prefix)
        if isinstance(x, Fragment):
            raise GradError(f"'previous' needs a signal, but this is {kind_name(x)}", x_e.span,
                            f"apply it to one: previous((grad | {x.label}))")
        return self._previous(x, e, init_e, sc, prefix)

    def _previous(self, x: Value, e: ast.Call, init_e: ast.Expr | None, sc: Scope, prefix: str) -> Stream:
        init = self.expr(init_e, sc, prefix) if init_e is not None else ScalarV(S.Const(0), e.span)
        read = self._cell_node(f"{prefix}/previous", init, init_e if init_e is not None else e, e.span,
                               "'previous'", shape=x.node if isinstance(x, Stream) else None)
        self._use_cell(read)
        self._commit(read, x, e.args[0] if e.args else e, "'previous'")
        return Stream(read, e.span)

    # ------------------------------------------------------------------ the gradient at another point
    def _grad_at_call(self, e: ast.Call, sc: Scope, prefix: str) -> Value:
        """``grad_at(point)``: the gradient of the loss with every parameter of the route set to
        ``point`` (a signal of the parameter's shape), which the runtime computes with a second
        call of the step's closure (SAM). As a stage, ``x | grad_at`` is ``grad_at(x)``."""
        usage = "write grad_at(point), e.g. grad_at(param + rho * grad / norm(grad, over=global))"
        if e.block is not None:
            raise GradError("'grad_at' takes no { ... } block", e.block.span, usage)
        if e.kwargs or len(e.args) > 1:
            where = e.kwargs[0].span if e.kwargs else e.args[1].span
            raise GradError("'grad_at' takes one argument, the point", where, usage)
        self._no_source_in_block("grad_at", e.span)
        self.emit.spend(e.span)
        if not e.args:
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    return self._grad_at(Stream(inp, e.span), e, pfx).node
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        x = self.expr(e.args[0], sc, prefix)
        if not isinstance(x, Stream):
            hint = (f"apply it to a signal: grad_at(param + (grad | {x.label}))" if isinstance(x, Fragment)
                    else usage)
            raise GradError(f"'grad_at' needs a point, a signal of the parameter's shape, but this is {kind_name(x)}",
                            e.args[0].span, hint)
        return self._grad_at(x, e, prefix)

    def _grad_at(self, x: Stream, e: ast.Call, prefix: str) -> Stream:
        self._refuse_mask(x.node, x.span, "'grad_at'")
        point = self._full(x.node, x.span, prefix)
        node = f"{self.emit.route}/grad_at"
        if node in self.graph:
            first = next(u for u, _, d in self.graph.in_edges(node, data=True) if d["port"] == POINT_PORT)
            if first != point:
                raise GradError("a route takes the gradient at one point only, and this is a second point "
                                f"(the first is on line {self.graph.nodes[node]['span'].line})", e.span,
                                "name the gradient once and use the name: let g = grad_at(param + e)")
            return Stream(node, e.span)
        for n in sorted(nx.ancestors(self.graph, point) | {point}):
            d = self.graph.nodes[n]
            if d["kind"] == "source" and d["op"] not in ("grad", "param"):
                raise GradError(f"the point of 'grad_at' cannot read '{d['op']}'", d["span"],
                                "compute it from grad, param, hyperparameters, arithmetic and reductions")
            if d["kind"] == "op":
                op = op_impl(d["op"])
                if op.buffers or op.has_node_state or op.per_sample or any(p.kind == "block" for p in op.params):
                    what = "a state cell" if d["op"] == "state" else f"'{d['op']}'"
                    raise GradError(f"the point of 'grad_at' is computed from values without state, but {what} keeps "
                                    "state", d["span"], "compute the point from grad, param, hyperparameters, "
                                    "arithmetic and reductions (SAM: param + rho * grad / norm(grad, over=global)); "
                                    "ops with state go after grad_at")
        return Stream(self.emit.grad_at(point, e.span), e.span)

    # ------------------------------------------------------------------ calls
    def call(self, e: ast.Call, sc: Scope, prefix: str) -> Value:
        parts = e.func.parts
        if len(parts) == 1 and parts[0] in sc.locals:
            raise GradError(f"'{parts[0]}' is a parameter of this pipeline, not an op; it cannot be called",
                            e.func.span)
        sym = resolve(parts, sc, self.hparams, e.func.span, calls=True)
        if isinstance(sym, DefSym):
            return self._def_call(sym.env, sym.definition, e, sc)
        if isinstance(sym, MathSym):
            if sym.name == "previous":
                return self._previous_call(e, sc, prefix)
            if sym.name == "grad_at":
                return self._grad_at_call(e, sc, prefix)
            return self._math_call(sym.name, e, sc, prefix)
        if isinstance(sym, OpSym) and sym.op.name in prims.REDUCTIONS and _has_over(e):
            return self._reduce_call(sym.op.name, e, sc, prefix)  # rms(x, over=tensor): the reduction, not the op
        if isinstance(sym, OpSym) and sym.op.name in prims.FUNCTIONS and len(e.args) == 1 \
                and not e.kwargs and e.block is None:
            signal = self._signal_arg(e.args[0], sc, prefix)
            if signal is not None:  # sign(grad), sign(adam): the function; sign(1) goes on to the op
                return self._prim(sym.op.name, e, [], sc, prefix, head=signal)
        if isinstance(sym, OpSym):
            return self._op_call(sym.op, e, sc, prefix)
        fname = parts[-1]
        what = {HParamSym: "a hyperparameter", LetSym: "a let binding", StateSym: "a state cell", SourceSym: "a built-in signal",
                LossSym: "a built-in signal", ScalarSym: "a built-in signal", InfSym: "a built-in signal"}
        if isinstance(sym, ShapeSym):
            raise GradError(f"'{fname}' is a shape value, not an op; it cannot be called", e.func.span,
                            f"it is one number per parameter tensor: use it in arithmetic, e.g. grad / {fname}")
        if sym is not None:
            raise GradError(f"'{fname}' is {what[type(sym)]}, not an op; it cannot be called", e.func.span,
                            f"only ops, math functions and defs are called; use '{fname}' as a value, "
                            f"e.g. grad * {fname}")
        env = sc.env
        for p in parts[:-1]:  # the module the name would be in
            env = env.aliases[p]
        raise GradError(f"unknown op '{fname}'", e.func.span, did_you_mean(fname, callable_names(env))
                        or "run 'gradpipe ops' for the list of ops")

    def _signal_arg(self, a: ast.Expr, sc: Scope, prefix: str) -> Stream | Fragment | None:
        """``a`` compiled, when it is a signal or an open pipeline (a stage such as ``adam``);
        else None, and nothing of it kept (it is compiled again where it belongs; only a
        signal adds nodes as it is compiled)."""
        n_folded = len(self.folded)
        v = self.expr(a, sc, prefix)
        if isinstance(v, (Stream, Fragment)):
            return v
        del self.folded[n_folded:]
        return None

    def _math_call(self, fn: str, e: ast.Call, sc: Scope, prefix: str) -> Value:
        """A math function: ``max(a, b)`` with all its arguments, or, one short, a stage whose
        input is the first argument (``x | max(b)`` is ``max(x, b)``; a bare ``abs`` is ``abs(x)``).
        A reduction (``mean``; ``max`` and ``min`` with ``over=``) goes to :meth:`_reduce_call`."""
        if fn in prims.REDUCTIONS and (fn not in prims.FUNCTIONS or _has_over(e)):
            return self._reduce_call(fn, e, sc, prefix)
        arity = prims.FUNCTIONS[fn]
        signature = f"{fn}({', '.join(_ARG_NAMES[fn])})"
        if e.block is not None:
            raise GradError(f"'{fn}' takes no {{ ... }} block", e.block.span, f"it is a math function: {signature}")
        if e.kwargs:
            raise GradError(f"'{fn}' takes its arguments by position", e.kwargs[0].span, f"write {signature}")
        if len(e.args) not in (arity, arity - 1):
            raise GradError(f"'{fn}' takes {arity} argument{'s' if arity > 1 else ''}, got {len(e.args)}", e.span,
                            f"write {signature}" + (f", or as a stage x | {fn}({', '.join(_ARG_NAMES[fn][1:])})"
                                                    if arity > 1 else f", or as a stage x | {fn}"))
        self.emit.spend(e.span)
        if len(e.args) == arity:
            return self._prim(fn, e, list(e.args), sc, prefix)

        def apply(inp: str, pfx: str) -> str:
            with self._nesting(e.span):
                out = self._prim(fn, e, list(e.args), sc, pfx, head=Stream(inp, e.span))
                if isinstance(out, Fragment):
                    return out.apply(inp, pfx)
                return out.node  # type: ignore[union-attr]
        return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ reductions and shape values
    def _reduce_call(self, fn: str, e: ast.Call, sc: Scope, prefix: str) -> Value:
        """A reduction ``fn(x, over=S)`` (``dot(a, b, over=S)``), or, one operand short, a stage
        whose input is the first operand (``x | mean(over=tensor)``). The value is one number per
        tensor, row or column, or over the route (``global``): see :mod:`.prims`."""
        arity = prims.REDUCTIONS[fn]
        operands = "a, b" if arity == 2 else "x"
        signature = f"{fn}({operands}, over=tensor)"
        if e.block is not None:
            raise GradError(f"'{fn}' takes no {{ ... }} block", e.block.span, f"it is a reduction: {signature}")
        over_kw = next((k for k in e.kwargs if k.name == "over"), None)
        for k in e.kwargs:
            if k.name != "over":
                raise GradError(f"'{fn}' takes no argument '{k.name}'", k.span,
                                f"a reduction takes its operand{'s' if arity > 1 else ''} and a scope: {signature}")
        args_text = ", ".join(_text(a) for a in e.args) if len(e.args) == arity else operands
        if over_kw is None:
            raise GradError(f"'{fn}' needs a scope: over=tensor, global, rows or cols", e.span,
                            f"write {fn}({args_text}, over=tensor) (one value per parameter tensor), or over=global "
                            "(one over every tensor of the route)")
        over = over_kw.value
        scope = over.parts[0] if isinstance(over, ast.Name) and len(over.parts) == 1 else \
            over.value if isinstance(over, ast.Str) else None
        if scope not in prims.SCOPES:
            shown = _text(over)
            raise GradError(f"unknown scope {shown if isinstance(over, ast.Str) else repr(shown)} for '{fn}'",
                            over.span, (did_you_mean(str(scope), prims.SCOPES) if scope else None)
                            or "over= is one of tensor (per parameter tensor), global (over the route), rows (per "
                            "row), cols (per column)")
        if len(e.args) not in ((arity, arity - 1) if arity == 1 else (arity,)):
            raise GradError(f"'{fn}' takes {arity} operand{'s' if arity > 1 else ''}, got {len(e.args)}", e.span,
                            f"write {fn}({operands}, over={scope})" + (
                                f", or as a stage: x | {fn}(over={scope})" if arity == 1 else
                                f": the sum of a * b; for the sum of squares write norm(a, over={scope}) ** 2"))
        self.emit.spend(e.span)
        if len(e.args) == arity:
            return self._reduce(fn, scope, e, [self.expr(a, sc, prefix) for a in e.args],
                                [a.span for a in e.args], prefix)

        def apply(inp: str, pfx: str) -> str:
            with self._nesting(e.span):
                out = self._reduce(fn, scope, e, [Stream(inp, e.span)], [e.span], pfx)
                return out.apply(inp, pfx) if isinstance(out, Fragment) else out.node  # type: ignore[union-attr]
        return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]

    def _reduce(self, fn: str, scope: str, e: ast.Expr, vals: list[Value], spans: list[Span], prefix: str) -> Value:
        """The reduction node of ``fn`` over ``scope`` on its operands (signals; an open pipeline is
        applied to the stage input, as in arithmetic)."""
        for v, where in zip(vals, spans):
            if isinstance(v, ScalarV) or (isinstance(v, Word) and isinstance(v.value, bool)):
                what = "a boolean" if not isinstance(v, ScalarV) or S.is_bool(v.expr) else "a number"
                raise GradError(f"'{fn}' has nothing to reduce: this is {what}, not a signal", where,
                                f"reduce a signal, e.g. {fn}(grad{', param' if fn == 'dot' else ''}, over={scope}); "
                                "a number is the same for every element")
            if not isinstance(v, (Stream, Fragment)):
                raise GradError(f"'{fn}' reduces a signal, but this is {kind_name(v)}", where,
                                f"e.g. {fn}(grad{', param' if fn == 'dot' else ''}, over={scope})")
        if any(isinstance(v, Fragment) for v in vals):
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    concrete = [Stream(v.apply(inp, pfx), v.span) if isinstance(v, Fragment) else v for v in vals]
                    return self._reduce_node(fn, scope, e.span, concrete, spans, pfx)  # type: ignore[arg-type]
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        return Stream(self._reduce_node(fn, scope, e.span, vals, spans, prefix), e.span)  # type: ignore[arg-type]

    def _reduce_node(self, fn: str, scope: str, span: Span, vals: list[Stream], spans: list[Span],
                     prefix: str) -> str:
        self._no_per_tensor_in_block(f"the reduction '{fn}'", span)
        inputs = []
        for port, v, where in zip(("lhs", "rhs"), vals, spans):
            if self._is_mask(v.node):
                raise GradError(f"'{fn}' needs numbers, but this is a mask (a comparison: true or false per "
                                "element)", where, f"reduce numbers chosen with it: {fn}(where("
                                f"{_text_at(self.graph.nodes[v.node]['span'])}, 1, 0), over={scope}) counts where it "
                                "holds" if fn == "sum" else
                                f"reduce numbers chosen with it: where({_text_at(self.graph.nodes[v.node]['span'])}"
                                ", 1, 0)")
            if v.node in self._matrix:
                if scope == "global":
                    raise GradError(f"'{fn}' over=global of a matrix value (a matrix function's)", where,
                                    f"reduce it per tensor: {fn}(..., over=tensor)")
                inputs.append((v.node, port))  # a matrix is reduced as it is: G Gᵀ over its m×m elements
                continue
            # a per-tensor operand counts once per element it stands for (as if expanded), in every scope
            inputs.append((self._full(v.node, where, prefix), port))
        node = self.emit.arith(prims.REDUCE_IDS[fn], prefix, span, {"over": scope}, inputs)
        self._reduced.add(node)
        if scope == "global":
            self._global.add(node)
        return node

    def _shape_value(self, name: str, span: Span) -> Stream:
        """A shape value (``numel``, ``rows``, ``cols``, ``ndim``): one number per parameter tensor."""
        self._no_per_tensor_in_block(f"the shape value '{name}'", span)
        node = self.emit.arith(name, f"{self.emit.route}", span, {}, [])
        self._reduced.add(node)
        return Stream(node, span)

    def _full(self, node: str, span: Span, prefix: str) -> str:
        """``node`` as a signal of the parameter's shape: a per-tensor value (a reduction's, a shape
        value, arithmetic on them) is expanded by a ``broadcast`` node; any other signal is itself."""
        if node not in self._reduced:
            return node
        return self.emit.arith("broadcast", prefix, span, {}, [(node, "lhs")])

    def _op_call(self, op: Op, e: ast.Call, sc: Scope, prefix: str) -> Value:
        if isinstance(op, MacroOp):
            return self._macro_call(op, e, sc, prefix)
        if op.params and op.params[0].kind == "signals":
            return self._combiner(bind_op(op, e), sc, prefix)
        if e.args and op.params and op.params[0].kind not in ("signal", "value", "any"):
            # ema(grads.main): a signal as the first argument is the op's input
            n_folded = len(self.folded)
            first = self.expr(e.args[0], sc, prefix)
            del self.folded[n_folded:]  # the argument is compiled again below if it is not the input
            if isinstance(first, Stream):
                rest = ast.Call(e.func, e.args[1:], e.kwargs, e.block, span=e.span)
                return Stream(self._op_fragment(op, rest, sc).apply(first.node, prefix), e.span)
        return self._op_fragment(op, e, sc)

    def _def_call(self, env: ModuleEnv, d: ast.Def, e: ast.Call, sc: Scope,
                  pre: dict[str, Value] | None = None) -> Value:
        self.used.add(id(d))
        key = f"{env.path}:{d.name}"
        if key in sc.defs:
            chain = " -> ".join(k.rsplit(":", 1)[1] for k in sc.defs[sc.defs.index(key):]) + f" -> {d.name}"
            raise GradError(f"pipeline '{d.name}' is recursive ({chain})", e.span,
                            "a def cannot call itself, directly or through others")
        if sc.depth >= _MAX_INLINE_DEPTH:
            raise GradError(f"pipeline '{d.name}' expands more than {_MAX_INLINE_DEPTH} levels of definitions deep",
                            e.span, "a def cannot call itself, directly or through others; deeper nesting than "
                            f"{_MAX_INLINE_DEPTH} is refused")
        if e.block is not None:
            raise GradError(f"pipeline '{d.name}' takes no {{ ... }} block", e.block.span)
        bound = bind(f"pipeline '{d.name}'", [p.name for p in d.params], e)
        self.emit.spend(e.span)
        call_prefix = f"{self.emit.route}/{d.name}"
        local: dict[str, Value] = {}
        for p in d.params:
            if pre is not None and p.name in pre:
                local[p.name] = pre[p.name]
            elif p.name in bound:
                local[p.name] = self.expr(bound[p.name], sc, call_prefix)
            elif p.default is not None:
                local[p.name] = self.expr(p.default, Scope(env, {}, sc.depth + 1, sc.defs + (key,)), call_prefix)
            else:
                raise GradError(f"pipeline '{d.name}' needs argument '{p.name}'", e.span,
                                f"write {d.name}({', '.join(q.name + '=...' for q in d.params if q.default is None)})")
        inner = Scope(env, local, sc.depth + 1, sc.defs + (key,))
        body = self.expr(d.body, inner, f"{self.emit.route}/{d.name}")
        if isinstance(body, Fragment):
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    return body.apply(inp, self.emit.fresh(f"{pfx}/{d.name}"))
            return Fragment(apply, e.span, d.name)
        return body

    def _op_fragment(self, op: Op, e: ast.Call, sc: Scope) -> Fragment:
        bound = bind_op(op, e)

        def apply(inp: str, pfx: str) -> str:
            with self._nesting(e.span):
                return self._apply_op(bound, sc, inp, pfx)
        return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]

    def _apply_op(self, b: BoundCall, sc: Scope, inp: str, pfx: str) -> str:
        """The node of op call ``b`` on input ``inp``: arguments checked, signal arguments applied
        to the same input, ``{ ... }`` blocks built; or what :meth:`Op.rewrite` makes of it."""
        op, e = b.op, b.call
        self._refuse_mask(inp, e.span, f"'{op.name}'")
        inp = self._full(inp, e.span, pfx)
        self.emit.spend(e.span)
        node = self.emit.fresh(f"{pfx}/{op.name}")
        args: dict[str, Any] = {}
        inputs: list[tuple[str, str]] = [(inp, "x")]
        blocks: list[tuple[str, ast.Expr]] = []
        given: dict[str, Value] = {}  # the ``any`` arguments, for the rewrite
        for p in op.params:
            if p.name not in b.args:
                args[p.name] = self.check.default(op, p, e)
                continue
            a = b.args[p.name]
            if p.kind == "choice":
                args[p.name] = self.check.choice(op, p, a)
                continue
            if p.kind == "block":
                blocks.append((p.name, a))
                continue
            v = self.expr(a, sc, node)
            if p.kind == "any" and isinstance(v, (Fragment, Stream)):
                given[p.name] = v
            elif p.kind == "value" and isinstance(v, ScalarV):
                args[p.name] = self.check.scalar(op, p, v, a)
            elif p.kind in ("signal", "value"):
                if isinstance(v, Fragment):
                    v = Stream(v.apply(inp, node), v.span)
                if not isinstance(v, Stream):
                    raise GradError(f"argument '{p.name}' of '{op.name}' must be a signal, got {kind_name(v)}",
                                    a.span, "pass a source (param, grads.main), an op (ema) or a pipeline (grad | sign)")
                self._refuse_mask(v.node, a.span, f"argument '{p.name}' of '{op.name}'")
                inputs.append((self._full(v.node, a.span, node), p.name))
            else:
                args[p.name] = self.check.value(op, p, v, a)
        if given:
            rw = op.rewrite({k: "rule" if isinstance(v, Fragment) else "signal" for k, v in given.items()})
            if rw is None:
                name, v = next(iter(given.items()))
                raise GradError(f"argument '{name}' of '{op.name}' must be a number, got {kind_name(v)}",
                                b.args[name].span)
            v = given[rw.arg]
            if rw.kind == "apply":
                return v.apply(inp, pfx) if isinstance(v, Fragment) else v.node  # type: ignore[union-attr]
            return self._arith_node(rw.op, pfx, e.span, [Stream(inp, e.span), v])
        const = {k: (v.value if isinstance(v, S.Const) else v) for k, v in args.items()
                 if isinstance(v, (S.Const, str, bool))}
        if op.identity(const):
            self.folded.append(_Folded(e, None, "identity"))
            return inp
        built = [(pname, self._build_block(op, node, pname, a, sc)) for pname, a in blocks]
        self.emit.op(node, op.name, args, e.span, inputs)
        for pname, out in built:
            self.emit.connect(out, node, pname)
        return node

    def _no_per_tensor_in_block(self, what: str, span: Span) -> None:
        if self._block_op is not None:
            raise GradError(f"{what} cannot be used in the {{ ... }} pipeline of '{self._block_op}'", span,
                            f"'{self._block_op}' runs its inner pipeline on values it computes itself, of another "
                            "shape than the parameter; use reductions and shape values outside the block")

    def _no_source_in_block(self, name: str, span: Span) -> None:
        if self._block_op is not None:
            owner = self._block_op
            raise GradError(f"the {{ ... }} pipeline of '{owner}' cannot read '{name}'", span,
                            f"'{owner}' feeds its inner pipeline values it computes itself (e.g. projected "
                            "gradients); use only ops on that input")

    def _build_block(self, op: Op, node: str, pname: str, a: ast.Expr, sc: Scope) -> str:
        """Build a block op's inner sub-pipeline: it reads ``<node>/<pname>`` (the values the op
        hands it); return its output, which feeds the op's ``pname`` port. Its nodes carry
        ``block=node``. On an error nothing of it stays in the graph."""
        body = self.expr(a, sc, node)
        if not isinstance(body, Fragment):
            raise GradError(f"'{pname}' of '{op.name}' must be a pipeline of ops such as 'adam' or "
                            f"'clip_norm(1) | adam', got {kind_name(body)}", a.span,
                            "the op feeds it its own values; do not start it with a source such as 'grad'")
        emit = self.emit
        outer_block, outer_op = emit.block, self._block_op
        emit.block, self._block_op = node, op.name
        try:
            entry = emit.block_in(node, pname, a.span)
            out = body.apply(entry, node)
            self._check_block(op, node, entry, a)
        except GradError:
            emit.graph.remove_nodes_from(emit.block_members(node))
            raise
        finally:
            emit.block, self._block_op = outer_block, outer_op
        return out

    def _check_block(self, op: Op, node: str, entry: str, a: ast.Expr) -> None:
        g = self.emit.graph
        inner = self.emit.block_members(node)
        for n in inner:
            d = g.nodes[n]
            if op.projects_block and d.get("kind") == "op" and OPS[d["op"]].reads_param:
                raise GradError(f"'{d['op']}' reads the parameters, but the {{ ... }} pipeline of '{op.name}' "
                                "runs on projected values of another shape", d["span"],
                                f"move it outside the block: grad | {op.name}(...) {{ ... }} | {d['op']}")
            for src, _, _ in g.in_edges(n, data=True):
                if src not in inner and src != entry:
                    d = g.nodes[src]
                    raise GradError(f"the {{ ... }} pipeline of '{op.name}' reads '{d['op']}', which lives "
                                    "outside it", d["span"] if d.get("span") else a.span,
                                    f"'{op.name}' runs its inner pipeline on values it computes itself "
                                    "(e.g. projected gradients); use only ops on that input")
        direct = [OPS[g.nodes[n]["op"]] for n in g.nodes
                  if n in inner and g.nodes[n].get("block") == node and g.nodes[n]["kind"] == "op"]
        problem = op.check_block(direct)
        if problem is not None:
            raise GradError(problem[0], a.span, problem[1])

    # ------------------------------------------------------------------ combiners and macros
    def _combiner(self, b: BoundCall, sc: Scope, prefix: str) -> Stream:
        """``pcgrad(grads.a, grads.b, ...)``: every positional argument is a signal; the call
        is a signal (the head of a pipeline), not a stage."""
        op, e = b.op, b.call
        self.emit.spend(e.span)
        node = self.emit.fresh(f"{prefix}/{op.name}")
        inputs: list[tuple[str, str]] = []
        for k, a in enumerate(b.signals):
            v = self.expr(a, sc, node)
            if not isinstance(v, Stream):
                raise GradError(f"argument {k + 1} of '{op.name}' must be a signal, got {kind_name(v)}",
                                a.span, "pass the task gradients: grads.<loss name>, or a parenthesised "
                                "pipeline such as (grads.aux | clip_norm(1))")
            self._refuse_mask(v.node, a.span, f"argument {k + 1} of '{op.name}'")
            inputs.append((self._full(v.node, a.span, node), "x" if k == 0 else f"x{k}"))
        args: dict[str, Any] = {}
        for p in op.params[1:]:
            if p.name not in b.args:
                args[p.name] = self.check.default(op, p, e)
            elif p.kind == "choice":
                args[p.name] = self.check.choice(op, p, b.args[p.name])
            else:
                a = b.args[p.name]
                args[p.name] = self.check.value(op, p, self.expr(a, sc, node), a)
        args[op.params[0].name] = len(b.signals)  # how many signals: buffer names may depend on it
        self.emit.op(node, op.name, args, e.span, inputs)
        return Stream(node, e.span)

    def _macro_call(self, op: MacroOp, e: ast.Call, sc: Scope, prefix: str) -> Value:
        """Inline a macro op's definition; its scalar arguments are range-checked at the user's call."""
        if e.block is not None:
            raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
        bound = bind(f"op '{op.name}'", [p.name for p in op.params], e)
        from .ops.base import REQUIRED
        pre: dict[str, Value] = {}
        for p in op.params:
            if p.name not in bound:
                if p.default is REQUIRED:
                    raise GradError(f"op '{op.name}' needs argument '{p.name}'", e.span,
                                    f"write {op.name}({', '.join(q.name + '=...' for q in op.params if q.default is REQUIRED)})")
                continue
            a = bound[p.name]
            v = self.expr(a, sc, prefix)
            if p.kind == "signal" and not isinstance(v, Stream):
                raise GradError(f"argument '{p.name}' of '{op.name}' must be a signal, got {kind_name(v)}", a.span,
                                "pass a source such as grads.main, or a parenthesised pipeline (grads.aux | sign)")
            if p.kind in ("scalar", "int"):
                self.check.scalar(op, p, v, a)
            pre[p.name] = v
        env = _macro_env(op)
        n_folded = len(self.folded)
        out = self._def_call(env, env.defs[op.name], ast.Call(e.func, span=e.span), sc, pre)
        del self.folded[n_folded:]  # folds inside the definition are not the user's
        return out


_MACRO_ENVS: dict[str, ModuleEnv] = {}


def _macro_env(op: MacroOp) -> ModuleEnv:
    """The module holding a macro op's definition, parsed once."""
    env = _MACRO_ENVS.get(op.name)
    if env is None:
        from .modules import load_module_tree
        env = _MACRO_ENVS[op.name] = load_module_tree(op.definition, f"<gradpipe:{op.name}>")
    return env


def _conj(term: tuple[tuple[S.Scalar, bool], ...]) -> tuple[tuple[S.Scalar, bool], ...]:
    """A conjunction of guards in a canonical form: each guard once, in a fixed order."""
    return tuple(sorted(set(term), key=repr))


def _any_of(terms: set[tuple[tuple[S.Scalar, bool], ...]]) -> S.Scalar:
    """``t1 or t2 or ...`` for conjunctions ``t`` of ``(condition, holds)`` pairs, as a scalar
    boolean (``true`` when a conjunction is empty)."""
    terms = _merged(terms)
    if not terms or () in terms:
        return S.Const(True)
    out: S.Scalar = S.Const(False)
    for term in sorted(terms, key=repr):
        conj: S.Scalar = S.Const(True)
        for cond, holds in term:
            c = cond if holds else S.call("where", (cond, S.Const(False), S.Const(True)))
            conj = S.call("where", (c, conj, S.Const(False)))
        out = S.call("where", (conj, S.Const(True), out))
    return out


def _merged(terms: set[tuple[tuple[S.Scalar, bool], ...]]) -> set[tuple[tuple[S.Scalar, bool], ...]]:
    """``terms`` with ``(a and c) or (a and not c)`` merged into ``a`` (a let built under one
    branch of ``where(c, ...)`` and used in the other too), and repeated guards dropped."""
    out = {tuple(dict.fromkeys(t)) for t in terms}
    changed = True
    while changed:
        changed = False
        for t in sorted(out, key=repr):
            for i, (cond, holds) in enumerate(t):
                rest = t[:i] + t[i + 1:]
                other = rest[:i] + ((cond, not holds),) + rest[i:]
                if other in out:
                    out -= {t, other}
                    out.add(rest)
                    changed = True
                    break
            if changed:
                break
    return out


def _op_text(op: str) -> str:
    """How messages name a primitive: ``'+'``, ``'-'`` for negation, ``'max'``."""
    return "'-'" if op == "neg" else f"'{op}'"


def _has_over(e: ast.Call) -> bool:
    """Whether a call names a reduction's scope (``mean(x, over=tensor)``)."""
    return any(k.name == "over" for k in e.kwargs)


def _text_at(span: Span, default: str = "cond") -> str:
    """The source text under a one-line span (for a hint), or ``default``."""
    line = span.source_line()
    if line is None or span.end_line != span.line or span.end_column <= span.column:
        return default
    return line[span.column - 1:span.end_column - 1]


def _text(e: ast.Expr) -> str:
    from ..dsl.formatter import format_expr
    try:
        return format_expr(e)
    except Exception:  # pragma: no cover - formatting is only for messages
        return "..."


def selector_label(sel: ast.Selector) -> str:
    """A stable label for a route, derived from its selector's canonical text."""
    if isinstance(sel, ast.Default):
        return "default"
    from ..dsl.formatter import format_selector
    return re.sub(r"\s+", "", format_selector(sel))
