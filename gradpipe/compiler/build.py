"""Lower a module tree to the IR graph: name resolution, type checks, inlining.

Every op call becomes a node named after where it sits in the source
(``main/project_orthogonal/ema``); ``def`` pipelines are inlined under their
own name (``main/core/adam``); scalar arithmetic is folded as it is built.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span, did_you_mean
from . import scalars as S
from .modules import RESERVED, HyperParam, ModuleEnv
from .ops import OPS, Op, Param
from .ops.base import MacroOp
from .values import Fragment, ScalarV, Stream, Value, Word, kind_name

__all__ = ["Builder", "RouteInfo", "RangeCheck", "MAX_EXPANDED_DEPTH", "NODE_BUDGET", "NODE_BUDGET_PER_AST_NODE",
           "node_budget"]

_MAX_INLINE_DEPTH = 32
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
_STREAM_SOURCES = ("grad", "param", "samples")


@dataclass(frozen=True)
class RouteInfo:
    """One route: a label (from its selector), the selector, and its output node."""

    label: str
    selector: ast.Selector
    output: str
    span: Span


@dataclass(frozen=True)
class RangeCheck:
    """A hyperparameter-dependent argument whose valid range is checked on every group."""

    expr: S.Scalar
    param: Param
    op: str
    span: Span


@dataclass
class _Scope:
    env: ModuleEnv
    locals: dict[str, Value] = field(default_factory=dict)
    depth: int = 0
    defs: tuple[str, ...] = ()  # the defs being expanded, outermost first


class Builder:
    def __init__(self, root: ModuleEnv, hparams: dict[str, HyperParam], budget: int | None = None) -> None:
        self.root = root
        self.hparams = hparams
        self.graph = nx.MultiDiGraph()
        self.route = "main"
        self.range_checks: list[RangeCheck] = []
        #: the folding log; entries format themselves when read (``str(entry)``)
        self.folded: list[_Folded] = []
        self.losses: set[str] = set()
        self.reads: set[str] = set()
        self._let_memo: dict[tuple[int, str], Value] = {}
        self._let_busy: set[int] = set()
        self._suffix: dict[str, int] = {}
        self._depth = 0
        self._expr_depth = 0
        #: the spans of the fragments being applied, outermost first (where a blown budget is reported)
        self._applying: list[Span] = []
        self.budget = node_budget(root) if budget is None else budget
        self.spent = 0
        #: the error that ended the build when the budget ran out (raised again on every later use)
        self.over_budget: GradError | None = None
        #: id(scalar expr) -> (expr, terms, depth) of the scalar expressions built here
        self._scalar_shapes: dict[int, tuple[S.Scalar, int, int]] = {}
        #: the block op whose inner sub-pipeline is being built (nodes get ``block=<it>``)
        self._block: str | None = None
        #: ids of the let and def statements the pipeline reached
        self.used: set[int] = set()

    @contextlib.contextmanager
    def _nesting(self, span: Span):
        """Bound how deeply pipelines nest when applied (lets of lets of ... lets)."""
        if self._depth >= _MAX_APPLY_DEPTH:
            raise GradError(f"the pipeline nests more than {_MAX_APPLY_DEPTH} levels deep here", span,
                            "flatten it: fewer lets or defs that wrap one another")
        self._depth += 1
        self._applying.append(span)
        try:
            yield
        finally:
            self._depth -= 1
            self._applying.pop()

    def _spend(self, span: Span, units: int = 1) -> None:
        """Charge ``units`` to the expansion budget; a GradError once it is spent, at the
        outermost definition being expanded (the one that blew it), else at ``span``."""
        if self.over_budget is not None:
            raise self.over_budget
        self.spent += units
        if self.spent > self.budget:
            where = self._applying[0] if self._applying else span
            self.over_budget = GradError(
                f"the pipeline expands to more than {self.budget:,} nodes", where,
                "every use of a let or def is a copy, so definitions that use the one before twice double "
                f"at every line; the budget is {NODE_BUDGET:,} + {NODE_BUDGET_PER_AST_NODE} per syntax-tree "
                "node of the program (gradpipe.compiler.build.NODE_BUDGET): use each definition once per level")
            raise self.over_budget

    def _scalar_shape(self, x: S.Scalar) -> tuple[int, int]:
        """(terms, depth) of a scalar expression as a tree, in time linear in its distinct nodes."""
        memo = self._scalar_shapes
        todo: list[tuple[S.Scalar, bool]] = [(x, False)]
        while todo:
            y, ready = todo.pop()
            if id(y) in memo:
                continue
            kids = (y.left, y.right) if isinstance(y, S.BinS) else (y.operand,) if isinstance(y, S.NegS) else ()
            if not ready and any(id(k) not in memo for k in kids):
                todo.append((y, True))
                todo.extend((k, False) for k in kids)
                continue
            shapes = [memo[id(k)] for k in kids]
            memo[id(y)] = (y, 1 + sum(sh[1] for sh in shapes), 1 + max((sh[2] for sh in shapes), default=0))
        return memo[id(x)][1], memo[id(x)][2]

    # ------------------------------------------------------------------ graph helpers
    def _fresh(self, base: str) -> str:
        """``base``, or ``base#2``, ``base#3``... if taken (a counter per base keeps this O(1))."""
        if base not in self.graph:
            return base
        k = self._suffix.get(base, 1) + 1
        while f"{base}#{k}" in self.graph:
            k += 1
        self._suffix[base] = k
        return f"{base}#{k}"

    def _source(self, name: str, span: Span) -> Stream:
        node = f"{self.route}/{name}"
        if node not in self.graph:
            self.graph.add_node(node, kind="source", op=name, args={}, span=span, route=self.route)
        if not name.startswith("grads."):
            self.reads.add(name)
        return Stream(node, span)

    def _arith(self, op: str, prefix: str, span: Span, lhs: Value, rhs: Value | None) -> str:
        self._spend(span)
        names = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "neg": "neg"}
        node = self._fresh(f"{prefix}/{names[op]}")
        args: dict[str, Any] = {}
        self.graph.add_node(node, kind="arith", op=op, args=args, span=span, route=self.route, block=self._block)
        for port, v in (("lhs", lhs), ("rhs", rhs)):
            if v is None:
                continue
            if isinstance(v, Stream):
                self.graph.add_edge(v.node, node, port=port)
            else:
                args[port] = v.expr  # ScalarV
        return node

    # ------------------------------------------------------------------ entry points
    def build_route(self, label: str, selector: ast.Selector, body: ast.Expr, span: Span) -> RouteInfo:
        self.route = label
        v = self.expr(body, _Scope(self.root), label)
        if isinstance(v, Fragment):
            raise GradError("a pipeline must start from a signal such as 'grad'", body.span,
                            f"write 'grad | {_text(body)}'")
        if not isinstance(v, Stream):
            raise GradError(f"a pipeline must produce a signal, but this is {kind_name(v)}", body.span,
                            "start it with 'grad', e.g. 'grad | adam'")
        out = f"{label}/out"
        self.graph.add_node(out, kind="output", op="out", args={}, span=span, route=label)
        self.graph.add_edge(v.node, out, port="x")
        return RouteInfo(label, selector, out, span)

    # ------------------------------------------------------------------ expressions
    def expr(self, e: ast.Expr, sc: _Scope, prefix: str) -> Value:
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
            if isinstance(e, ast.Bool):
                return Word(e.value, e.span)
            if isinstance(e, ast.Str):
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

    def chain(self, e: ast.Chain, sc: _Scope, prefix: str) -> Value:
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

    def _stage(self, s: ast.Expr, sc: _Scope, prefix: str) -> Fragment:
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
        if isinstance(v, ScalarV):
            raise GradError("a number cannot be a pipeline stage", s.span, f"to multiply write 'scale({_text(s)})'")
        raise GradError(f"{kind_name(v)} cannot be a pipeline stage", s.span)

    def index(self, e: ast.Index, sc: _Scope) -> Value:
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

    def arith(self, e: ast.BinOp | ast.Neg, sc: _Scope, prefix: str) -> Value:
        op = "neg" if isinstance(e, ast.Neg) else e.op
        operands = [e.operand] if isinstance(e, ast.Neg) else [e.left, e.right]
        n_folded = len(self.folded)
        vals: list[Value] = []
        for o in operands:  # a loop, not a comprehension: one Python frame fewer per level
            vals.append(self.expr(o, sc, prefix))
        for o, v in zip(operands, vals):
            if isinstance(v, Word):
                raise GradError(f"arithmetic needs numbers or signals, but this is {kind_name(v)}", o.span)
            if isinstance(v, ScalarV) and isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "tuple" \
                    and v.expr.index is None:
                raise GradError(f"'{v.expr.name}' is a tuple; pick an item", o.span, f"write {v.expr.name}[0]")
            if isinstance(v, ScalarV) and isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "bool":
                raise GradError(f"'{v.expr.name}' is a boolean; arithmetic needs numbers", o.span)
        if all(isinstance(v, ScalarV) for v in vals):
            try:
                if op == "neg":
                    r = S.neg(vals[0].expr)
                else:
                    r = S.binop(op, vals[0].expr, vals[1].expr)
            except ZeroDivisionError:
                raise GradError("division by zero", e.span) from None
            except (OverflowError, ValueError):
                raise GradError("the result is not a finite real number", e.span) from None
            if isinstance(r, S.Const) and not (op == "neg" and isinstance(e.operand, ast.Num)):
                # the folds of the operands themselves are part of this one: log only the largest
                operand_ids = {id(o) for o in operands}
                kept = [f for f in self.folded[n_folded:] if id(f.e) not in operand_ids]
                self.folded[n_folded:] = kept
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
            return ScalarV(r, e.span)
        if op == "**" and not isinstance(vals[1], ScalarV):
            raise GradError("the exponent must be a number", operands[1].span)
        if any(isinstance(v, Fragment) for v in vals):
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    concrete = [Stream(v.apply(inp, pfx), v.span) if isinstance(v, Fragment) else v for v in vals]
                    return self._arith(op, pfx, e.span, concrete[0], concrete[1] if len(concrete) > 1 else None)
            return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]
        return Stream(self._arith(op, prefix, e.span, vals[0], vals[1] if len(vals) > 1 else None), e.span)

    # ------------------------------------------------------------------ names
    def _lookup_hparam(self, name: str, sc: _Scope) -> HyperParam | None:
        if name in sc.locals:
            return None
        if name in sc.env.hparams or (name == "lr" and name in self.hparams):
            return self.hparams.get(name)
        return None

    def _visible_names(self, sc: _Scope) -> list[str]:
        env = sc.env
        names = list(sc.locals) + list(env.lets) + list(env.defs) + list(env.imported) + list(env.hparams)
        names += list(self.hparams) + list(OPS) + list(RESERVED) + [f"{a}." for a in env.aliases]
        return names

    def name(self, e: ast.Name, sc: _Scope, prefix: str) -> Value:
        parts = e.parts
        first = parts[0]
        if len(parts) == 2 and first == "grads":
            self._no_source_in_block(".".join(parts), e.span)
            self.losses.add(parts[1])
            return self._source(f"grads.{parts[1]}", e.span)
        if len(parts) >= 2:
            if first in sc.env.aliases and first not in sc.locals:
                sub = sc.env.aliases[first]
                return self.name(ast.Name(parts[1:], e.span), _Scope(sub, {}, sc.depth, sc.defs), prefix)
            if first == "grads":
                raise GradError("write grads.<loss name>, e.g. grads.main", e.span)
            raise GradError(f"unknown module '{first}'", e.span,
                            did_you_mean(first, sc.env.aliases) or f'import a file under that name: import "{first}.grad" as {first}')
        if first in sc.locals:
            return sc.locals[first]
        if first in sc.env.lets:
            return self._let(sc.env, sc.env.lets[first], prefix)
        if first in sc.env.defs:
            return self._def_call(sc.env, sc.env.defs[first], ast.Call(e, span=e.span), sc)
        if first in sc.env.imported:
            return self.name(e, _Scope(sc.env.imported[first], {}, sc.depth, sc.defs), prefix)
        if first in sc.env.hparams or (first in self.hparams and first in ("lr",)):
            return ScalarV(S.HP(first), e.span)
        if first in _STREAM_SOURCES:
            self._no_source_in_block(first, e.span)
            return self._source(first, e.span)
        if first == "grads":
            raise GradError("'grads' needs a loss name", e.span, "write grads.<loss name>, e.g. grads.main")
        if first in S.SCALAR_SOURCES:
            self.reads.add(first)
            return ScalarV(S.Src(first), e.span)
        if first == "inf":
            return ScalarV(S.Const(math.inf), e.span)
        if first in self.hparams:  # declared in an imported file: usable by name everywhere
            return ScalarV(S.HP(first), e.span)
        if first in OPS:
            op = OPS[first]
            if isinstance(op, MacroOp) or (op.params and op.params[0].kind == "signals"):
                return self.call(ast.Call(e, span=e.span), sc, prefix)
            return self._op_fragment(op, ast.Call(e, span=e.span), sc)
        raise GradError(f"unknown name '{first}'", e.span, did_you_mean(first, self._visible_names(sc)))

    def _let(self, env: ModuleEnv, let: ast.Let, prefix: str) -> Value:
        self.used.add(id(let))
        key = (id(let), self.route)
        if key in self._let_memo:
            return self._let_memo[key]
        if id(let) in self._let_busy:
            raise GradError(f"'{let.name}' is defined in terms of itself", let.span,
                            "a let binding cannot refer to itself, directly or through others")
        if len(self._let_busy) >= _MAX_INLINE_DEPTH:
            raise GradError(f"'{let.name}' is defined through more than {_MAX_INLINE_DEPTH} nested let bindings",
                            let.span, "flatten the chain of lets: write the pipeline in fewer, longer bindings")
        self._let_busy.add(id(let))
        try:
            v = self.expr(let.value, _Scope(env), f"{self.route}/{let.name}")
        finally:
            self._let_busy.discard(id(let))
        self._let_memo[key] = v
        return v

    # ------------------------------------------------------------------ calls
    def call(self, e: ast.Call, sc: _Scope, prefix: str) -> Value:
        name = e.func
        if len(name.parts) == 1 and name.parts[0] in sc.locals:
            raise GradError(f"'{name.parts[0]}' is a parameter of this pipeline, not an op; it cannot be called",
                            name.span)
        env = sc.env
        parts = name.parts
        while len(parts) > 1 and parts[0] in env.aliases:
            env, parts = env.aliases[parts[0]], parts[1:]
        if len(parts) > 1:
            raise GradError(f"unknown module '{parts[0]}'", name.span, did_you_mean(parts[0], env.aliases))
        fname = parts[0]
        if fname in env.defs:
            return self._def_call(env, env.defs[fname], e, sc)
        if fname in env.imported and fname in env.imported[fname].defs:
            sub = env.imported[fname]
            return self._def_call(sub, sub.defs[fname], e, sc)
        if fname in OPS:
            op = OPS[fname]
            if isinstance(op, MacroOp):
                return self._macro_call(op, e, sc, prefix)
            if op.params and op.params[0].kind == "signals":
                return self._combiner(op, e, sc, prefix)
            if e.args and op.params and op.params[0].kind not in ("signal", "value", "any"):
                # ema(grads.main): a signal as the first argument is the op's input
                n_folded = len(self.folded)
                first = self.expr(e.args[0], sc, prefix)
                del self.folded[n_folded:]  # the argument is compiled again below if it is not the input
                if isinstance(first, Stream):
                    rest = ast.Call(e.func, e.args[1:], e.kwargs, e.block, span=e.span)
                    return Stream(self._op_fragment(op, rest, sc).apply(first.node, prefix), e.span)
            return self._op_fragment(op, e, sc)
        what = None
        if fname in env.hparams or fname in self.hparams:
            what = "a hyperparameter"
        elif fname in env.lets or fname in env.imported:
            what = "a let binding"
        elif fname in RESERVED:
            what = "a built-in signal"
        if what:
            raise GradError(f"'{fname}' is {what}, not an op; it cannot be called", name.span)
        callables = list(OPS) + list(env.defs) + [n for n, m in env.imported.items() if n in m.defs]
        raise GradError(f"unknown op '{fname}'", name.span, did_you_mean(fname, callables)
                        or "run 'gradpipe ops' for the list of ops")

    def _bind(self, what: str, names: list[str], e: ast.Call) -> dict[str, ast.Expr]:
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

    def _def_call(self, env: ModuleEnv, d: ast.Def, e: ast.Call, sc: _Scope,
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
        bound = self._bind(f"pipeline '{d.name}'", [p.name for p in d.params], e)
        self._spend(e.span)
        call_prefix = self._fresh_prefix(d.name)
        local: dict[str, Value] = {}
        for p in d.params:
            if pre is not None and p.name in pre:
                local[p.name] = pre[p.name]
            elif p.name in bound:
                local[p.name] = self.expr(bound[p.name], sc, call_prefix)
            elif p.default is not None:
                local[p.name] = self.expr(p.default, _Scope(env, {}, sc.depth + 1, sc.defs + (key,)), call_prefix)
            else:
                raise GradError(f"pipeline '{d.name}' needs argument '{p.name}'", e.span,
                                f"write {d.name}({', '.join(q.name + '=...' for q in d.params if q.default is None)})")
        inner = _Scope(env, local, sc.depth + 1, sc.defs + (key,))
        body = self.expr(d.body, inner, f"{self.route}/{d.name}")
        if isinstance(body, Fragment):
            def apply(inp: str, pfx: str) -> str:
                with self._nesting(e.span):
                    return body.apply(inp, self._fresh(f"{pfx}/{d.name}"))
            return Fragment(apply, e.span, d.name)
        return body

    def _fresh_prefix(self, name: str) -> str:
        return f"{self.route}/{name}"

    def _op_fragment(self, op: Op, e: ast.Call, sc: _Scope) -> Fragment:
        names = [p.name for p in op.params]
        block_params = [p.name for p in op.params if p.kind == "block"]
        if e.block is not None and not block_params:
            raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
        positional = [n for n in names if n not in block_params] if e.block is not None else names
        bound = self._bind(f"op '{op.name}'", positional,
                          ast.Call(e.func, e.args, tuple(k for k in e.kwargs if k.name not in block_params),
                                   e.block, span=e.span))
        for kw in e.kwargs:
            if kw.name in block_params:
                bound[kw.name] = kw.value
        if e.block is not None:
            if block_params[0] in bound:
                raise GradError(f"'{block_params[0]}' of '{op.name}' is given twice (as an argument and as a "
                                "{ ... } block)", e.block.span)
            bound[block_params[0]] = e.block

        def apply(inp: str, pfx: str) -> str:
            with self._nesting(e.span):
                return self._apply_op(op, bound, e, sc, inp, pfx)
        return Fragment(apply, e.span, _Label(e))  # type: ignore[arg-type]

    def _apply_op(self, op: Op, bound: dict[str, ast.Expr], e: ast.Call, sc: _Scope, inp: str, pfx: str) -> str:
        self._spend(e.span)
        node = self._fresh(f"{pfx}/{op.name}")
        self.graph.add_node(node, kind="pending")  # reserve the name while arguments build
        args: dict[str, Any] = {}
        edges: list[tuple[str, str]] = [(inp, "x")]
        block_nodes: list[tuple[str, ast.Expr]] = []
        for p in op.params:
            if p.name not in bound:
                if p.default is _required():
                    self.graph.remove_node(node)
                    raise GradError(f"op '{op.name}' needs argument '{p.name}'", e.span,
                                    f"write {op.name}({p.name}=...)")
                if p.kind in ("scalar", "int"):
                    args[p.name] = S.Const(p.default)
                else:
                    args[p.name] = p.default
                continue
            a = bound[p.name]
            if p.kind == "choice":
                args[p.name] = self._choice(op, p, a)
                continue
            if p.kind == "block":
                block_nodes.append((p.name, a))
                continue
            v = self.expr(a, sc, node)
            if p.kind == "value" and isinstance(v, ScalarV):
                args[p.name] = self._scalar_arg(op, p, v, a)
            elif p.kind in ("signal", "value"):
                if isinstance(v, Fragment):
                    v = Stream(v.apply(inp, node), v.span)
                if not isinstance(v, Stream):
                    self.graph.remove_node(node)
                    raise GradError(f"argument '{p.name}' of '{op.name}' must be a signal, got {kind_name(v)}",
                                    a.span, "pass a source (param, grads.main), an op (ema) or a pipeline (grad | sign)")
                edges.append((v.node, p.name))
            elif p.kind == "any":
                if isinstance(v, Fragment):  # scale(rule): the rule itself, under the stage's name
                    self.graph.remove_node(node)
                    return v.apply(inp, pfx)
                if isinstance(v, Stream):
                    self.graph.remove_node(node)
                    return self._arith("*", pfx, e.span, Stream(inp, e.span), v)
                args[p.name] = self._scalar_arg(op, p, v, a)
            elif p.kind == "bool":
                args[p.name] = self._bool_arg(op, p, v, a)
            elif p.kind == "int":
                args[p.name] = self._int_arg(op, p, v, a)
            else:
                args[p.name] = self._scalar_arg(op, p, v, a)
        const = {k: (v.value if isinstance(v, S.Const) else v) for k, v in args.items()
                 if isinstance(v, (S.Const, str, bool))}
        if op.identity(const):
            self.graph.remove_node(node)
            self.folded.append(_Folded(e, None, "identity"))
            return inp
        self.graph.add_node(node, kind="op", op=op.name, args=args, span=e.span, route=self.route, block=self._block)
        for src, port in edges:
            self.graph.add_edge(src, node, port=port)
        for pname, a in block_nodes:
            self._build_block(op, node, pname, a, sc)
        return node

    def _no_source_in_block(self, name: str, span: Span) -> None:
        if self._block is not None:
            owner = self.graph.nodes[self._block]
            raise GradError(f"the {{ ... }} pipeline of '{owner['op']}' cannot read '{name}'", span,
                            f"'{owner['op']}' feeds its inner pipeline values it computes itself (e.g. projected "
                            "gradients); use only ops on that input")

    def _build_block(self, op: Op, node: str, pname: str, a: ast.Expr, sc: _Scope) -> None:
        """Build a block op's inner sub-pipeline: it reads ``<node>/<pname>`` (the values the op
        hands it) and its output feeds the op's ``pname`` port. Its nodes carry ``block=node``."""
        body = self.expr(a, sc, node)
        if not isinstance(body, Fragment):
            raise GradError(f"'{pname}' of '{op.name}' must be a pipeline of ops such as 'adam' or "
                            f"'clip_norm(1) | adam', got {kind_name(body)}", a.span,
                            "the op feeds it its own values; do not start it with a source such as 'grad'")
        entry = f"{node}/{pname}"
        outer, self._block = self._block, node
        try:
            self.graph.add_node(entry, kind="block_in", op=pname, args={}, span=a.span, route=self.route,
                                block=node)
            out = body.apply(entry, node)
        finally:
            self._block = outer
        inner = self._block_members(node)
        for n in inner:
            d = self.graph.nodes[n]
            if op.projects_block and d.get("kind") == "op" and OPS[d["op"]].reads_param:
                raise GradError(f"'{d['op']}' reads the parameters, but the {{ ... }} pipeline of '{op.name}' "
                                "runs on projected values of another shape", d["span"],
                                f"move it outside the block: grad | {op.name}(...) {{ ... }} | {d['op']}")
            for src, _, _ in self.graph.in_edges(n, data=True):
                if src not in inner and src != entry:
                    d = self.graph.nodes[src]
                    raise GradError(f"the {{ ... }} pipeline of '{op.name}' reads '{d['op']}', which lives "
                                    "outside it", d["span"] if d.get("span") else a.span,
                                    f"'{op.name}' runs its inner pipeline on values it computes itself "
                                    "(e.g. projected gradients); use only ops on that input")
        direct = [OPS[self.graph.nodes[n]["op"]] for n in self.graph.nodes
                  if n in inner and self.graph.nodes[n].get("block") == node and self.graph.nodes[n]["kind"] == "op"]
        problem = op.check_block(direct)
        if problem is not None:
            raise GradError(problem[0], a.span, problem[1])
        self.graph.add_edge(out, node, port=pname)

    def _block_members(self, node: str) -> set[str]:
        """Every node built inside ``node``'s block, nested blocks included."""
        members = {n for n, d in self.graph.nodes(data=True) if d.get("block") == node}
        todo = list(members)
        while todo:
            m = todo.pop()
            for n, d in self.graph.nodes(data=True):
                if d.get("block") == m and n not in members:
                    members.add(n)
                    todo.append(n)
        return members

    # ------------------------------------------------------------------ combiners and macros
    def _combiner(self, op: Op, e: ast.Call, sc: _Scope, prefix: str) -> Stream:
        """``pcgrad(grads.a, grads.b, ...)``: every positional argument is a signal; the call
        is a signal (the head of a pipeline), not a stage."""
        if e.block is not None:
            raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
        if len(e.args) < 2:
            raise GradError(f"'{op.name}' combines two or more signals, got {len(e.args)}", e.span,
                            f"write {op.name}(grads.main, grads.aux) and call opt.step(losses={{...}})")
        self._spend(e.span)
        node = self._fresh(f"{prefix}/{op.name}")
        self.graph.add_node(node, kind="pending")
        edges: list[tuple[str, str]] = []
        try:
            for k, a in enumerate(e.args):
                v = self.expr(a, sc, node)
                if not isinstance(v, Stream):
                    raise GradError(f"argument {k + 1} of '{op.name}' must be a signal, got {kind_name(v)}",
                                    a.span, "pass the task gradients: grads.<loss name>, or a parenthesised "
                                    "pipeline such as (grads.aux | clip_norm(1))")
                edges.append((v.node, "x" if k == 0 else f"x{k}"))
            rest = ast.Call(e.func, (), e.kwargs, None, span=e.span)
            bound = self._bind(f"op '{op.name}'", [p.name for p in op.params[1:]], rest)
            args = self._op_args(op, op.params[1:], bound, e, sc, node)
            args[op.params[0].name] = len(e.args)  # how many signals: buffer names may depend on it
        except GradError:
            self.graph.remove_node(node)
            raise
        self.graph.add_node(node, kind="op", op=op.name, args=args, span=e.span, route=self.route, block=self._block)
        for src, port in edges:
            self.graph.add_edge(src, node, port=port)
        return Stream(node, e.span)

    def _op_args(self, op: Op, params: tuple[Param, ...], bound: dict[str, ast.Expr], e: ast.Call, sc: _Scope,
                 node: str) -> dict[str, Any]:
        """Defaults and checked values of an op's non-signal arguments."""
        args: dict[str, Any] = {}
        for p in params:
            if p.name not in bound:
                if p.default is _required():
                    raise GradError(f"op '{op.name}' needs argument '{p.name}'", e.span,
                                    f"write {op.name}({p.name}=...)")
                args[p.name] = S.Const(p.default) if p.kind in ("scalar", "int") else p.default
                continue
            a = bound[p.name]
            if p.kind == "choice":
                args[p.name] = self._choice(op, p, a)
                continue
            v = self.expr(a, sc, node)
            if p.kind == "bool":
                args[p.name] = self._bool_arg(op, p, v, a)
            elif p.kind == "int":
                args[p.name] = self._int_arg(op, p, v, a)
            elif p.kind in ("scalar", "value", "any"):
                args[p.name] = self._scalar_arg(op, p, v, a)
            else:  # pragma: no cover - op definitions are checked by the op tests
                raise GradError(f"'{p.name}' of '{op.name}' cannot be given here", a.span)
        return args

    def _macro_call(self, op: MacroOp, e: ast.Call, sc: _Scope, prefix: str) -> Value:
        """Inline a macro op's definition; its scalar arguments are range-checked at the user's call."""
        if e.block is not None:
            raise GradError(f"op '{op.name}' takes no {{ ... }} block", e.block.span)
        bound = self._bind(f"op '{op.name}'", [p.name for p in op.params], e)
        pre: dict[str, Value] = {}
        for p in op.params:
            if p.name not in bound:
                if p.default is _required():
                    raise GradError(f"op '{op.name}' needs argument '{p.name}'", e.span,
                                    f"write {op.name}({', '.join(q.name + '=...' for q in op.params if q.default is _required())})")
                continue
            a = bound[p.name]
            v = self.expr(a, sc, prefix)
            if p.kind == "signal" and not isinstance(v, Stream):
                raise GradError(f"argument '{p.name}' of '{op.name}' must be a signal, got {kind_name(v)}", a.span,
                                "pass a source such as grads.main, or a parenthesised pipeline (grads.aux | sign)")
            if p.kind in ("scalar", "int"):
                self._scalar_arg(op, p, v, a)
            pre[p.name] = v
        env = _macro_env(op)
        n_folded = len(self.folded)
        out = self._def_call(env, env.defs[op.name], ast.Call(e.func, span=e.span), sc, pre)
        del self.folded[n_folded:]  # folds inside the definition are not the user's
        return out

    def _choice(self, op: Op, p: Param, a: ast.Expr) -> str:
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

    def _bool_arg(self, op: Op, p: Param, v: Value, a: ast.Expr) -> Any:
        if isinstance(v, Word) and isinstance(v.value, bool):
            return v.value
        if isinstance(v, ScalarV) and isinstance(v.expr, S.HP) and self.hparams[v.expr.name].kind == "bool":
            return v.expr
        raise GradError(f"argument '{p.name}' of '{op.name}' must be true or false, got {kind_name(v)}", a.span)

    def _int_arg(self, op: Op, p: Param, v: Value, a: ast.Expr) -> S.Const:
        sv = self._scalar_arg(op, p, v, a)
        if not (isinstance(sv, S.Const) and float(sv.value).is_integer()):
            raise GradError(f"argument '{p.name}' of '{op.name}' must be a whole number known "
                            "when the pipeline compiles", a.span)
        return S.Const(int(sv.value))

    def _scalar_arg(self, op: Op, p: Param, v: Value, a: ast.Expr) -> S.Scalar:
        if not isinstance(v, ScalarV):
            hint = None
            if isinstance(v, Word) and isinstance(v.value, str):
                hint = "strings are only for words such as scope=\"global\"; write a number"
            raise GradError(f"argument '{p.name}' of '{op.name}' must be a number, got {kind_name(v)}", a.span, hint)
        expr = v.expr
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


_MACRO_ENVS: dict[str, ModuleEnv] = {}


def _macro_env(op: MacroOp) -> ModuleEnv:
    """The module holding a macro op's definition, parsed once."""
    env = _MACRO_ENVS.get(op.name)
    if env is None:
        from .modules import load_module_tree
        env = _MACRO_ENVS[op.name] = load_module_tree(op.definition, f"<gradpipe:{op.name}>")
    return env


def _required():
    from .ops.base import REQUIRED
    return REQUIRED


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
