"""The compiled pipeline: :class:`Program`, :func:`compile` and :func:`load`."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span, did_you_mean
from . import prims
from . import scalars as S
from .binder import RangeCheck, RuleCheck, reads_step
from .build import Builder, RouteInfo, selector_label
from .ir import Kind, Node, RouteIR, freeze, freeze_node
from .modules import HyperParam, ModuleEnv, all_hparams, load_module_tree
from .modes import ModeSeq, compile_modes
from .ops import OPS
from .ops.nonfinite import NonFinitePolicy, policy_of
from .passes import check_ops, check_per_sample, cse, eliminate_dead
from .symbols import Scope

__all__ = ["Program", "Library", "compile", "load", "check_file", "check_env", "check_library_env", "builtin_dir",
           "builtin_names"]

_LR = HyperParam("lr", 1e-3, 0.0, math.inf, True, False, Span(), declared=False)


def builtin_dir() -> pathlib.Path:
    """The folder of the pipelines that ship with gradpipe (``pipelines/`` in the repository)."""
    return (pathlib.Path(__file__).resolve().parent.parent / "_pipelines").resolve()


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.grad"))


@dataclass
class Program:
    """A checked, optimised pipeline.

    Attributes:
        graph: the optimised graph, a ``networkx.MultiDiGraph``, as ``gradpipe graph``
            draws it. Node attributes: ``kind`` (source | op | arith | block_in | output,
            :class:`~gradpipe.compiler.ir.Kind`), ``op``, ``args``, ``span``, ``route``,
            ``block``; edge attribute ``port`` (``x`` is the stream input).
        ir: per route label, the typed, frozen IR the backends run
            (:class:`~gradpipe.compiler.ir.RouteIR`).
        hyperparams: declared hyperparameters (plus ``lr``), by name.
        routes: the routes in source order; a file without ``route`` has one, ``main``.
        nonfinite: what a step with a non-finite gradient does (the ``skip_nonfinite`` /
            ``allow_nonfinite`` policy, worked out when the file compiles).
    """

    graph: nx.MultiDiGraph
    hyperparams: dict[str, HyperParam]
    routes: list[RouteInfo]
    path: str
    source: str
    canonical: str
    hash: str
    range_checks: list[RangeCheck] = field(default_factory=list)
    rule_checks: list[RuleCheck] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    merged: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    losses: frozenset[str] = frozenset()
    reads: frozenset[str] = frozenset()
    ir: dict[str, RouteIR] = field(default_factory=dict, repr=False)
    nonfinite: NonFinitePolicy = field(default_factory=NonFinitePolicy)
    #: the ``eval:`` and ``train:`` sequences (:class:`~gradpipe.compiler.modes.ModeSeq`), by mode
    modes: dict[str, ModeSeq] = field(default_factory=dict)
    _orders: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _nodes: dict[str, Node] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for r in self.ir.values():
            self._nodes.update(r.by_name)

    # ------------------------------------------------------------------ basics
    @property
    def name(self) -> str:
        return pathlib.Path(self.path).stem if not self.path.startswith("<") else self.path

    def defaults(self) -> dict[str, Any]:
        return {n: hp.default for n, hp in self.hyperparams.items()}

    @functools.cached_property
    def structure_hash(self) -> str:
        """A hash of what the program computes, after the passes: equal for two files that
        compile to the same graph up to names (an unused ``let``, a renamed one, another
        layout), unlike :attr:`hash`, which hashes the text (:mod:`~gradpipe.compiler.structure`)."""
        from .structure import structure_hash
        return structure_hash(self.graph, self.hyperparams, self.modes)

    def check_hyperparams(self, values: Mapping[str, Any], origin: str = "Optimizer(...)") -> dict[str, Any]:
        """Validate hyperparameter values (names and declared ranges) and every range
        an op puts on an argument computed from them; return them normalised."""
        out = {}
        for k, v in values.items():
            hp = self.hyperparams.get(k)
            if hp is None:
                raise GradError(f"unknown hyperparameter '{k}' (set in {origin})", self.file_span(),
                                did_you_mean(k, self.hyperparams) or
                                f"this pipeline declares: {', '.join(self.hyperparams)}")
            out[k] = hp.check(v, origin)
        return out

    def check_group(self, group: Mapping[str, Any], origin: str) -> None:
        """Check a param group's values against every op's valid ranges and rules across
        arguments (those reading ``step`` or ``loss`` are checked in each step instead)."""
        env = {k: group[k] for k in self.hyperparams if k in group}
        for rc in self.range_checks:
            if reads_step(rc.expr):
                continue  # checked with the real values in every step (check_step_ranges)
            try:
                val = rc.expr.eval(env)
            except (ZeroDivisionError, OverflowError, ValueError):
                raise GradError(f"argument '{rc.param.name}' of '{rc.op}' cannot be computed from {origin}",
                                rc.span, "a division or '%' by zero, a log or square root of a number out of "
                                "its domain, or an overflow: choose hyperparameters that keep it a finite number"
                                ) from None
            if not rc.param.in_range(val):
                raise GradError(f"{rc.param.name}={val!r} (from {origin}) is outside the valid range "
                                f"{rc.param.range_text()} of '{rc.op}'", rc.span,
                                f"choose hyperparameters that give {rc.param.name} in {rc.param.range_text()}")
        for rule in self.rule_checks:
            if not any(reads_step(e) for _, e in rule.exprs):
                _check_rule(rule, env, f"from {origin}")

    def check_step_ranges(self, env: Mapping[str, Any]) -> None:
        """Check the valid ranges and rules of arguments that depend on ``step`` or ``loss`` in this step."""
        for rc in self.range_checks:
            if not reads_step(rc.expr):
                continue
            try:
                val = rc.expr.eval(env)
            except (ZeroDivisionError, OverflowError, ValueError):
                val = math.nan
            if not rc.param.in_range(val):
                raise GradError(f"{rc.param.name}={val!r} at step {env.get('step')} is outside the valid range "
                                f"{rc.param.range_text()} of '{rc.op}'", rc.span,
                                f"write the argument so that it stays in {rc.param.range_text()} at every step")
        for rule in self.rule_checks:
            if any(reads_step(e) for _, e in rule.exprs):
                _check_rule(rule, env, f"at step {env.get('step')}")

    def file_span(self) -> Span:
        """A span at the start of the pipeline's file (for problems of the whole file)."""
        return Span(1, 1, 1, 2, self.path, self.source)

    # ------------------------------------------------------------------ structure
    def node(self, name: str) -> Node:
        """A node of the typed IR by name."""
        return self._nodes[name]

    def find_node(self, name: str) -> Node | None:
        """A node of the typed IR by name, or None if the program has no such node."""
        return self._nodes.get(name)

    def nodes(self) -> list[Node]:
        """Every node of the typed IR (all routes, blocks included)."""
        return list(self._nodes.values())

    def route_nodes(self, label: str) -> list[str]:
        """The names of one route's nodes (blocks included) in evaluation (topological) order."""
        order = self._orders.get(label)
        if order is None:
            order = self._orders[label] = list(self.ir[label].by_name)
        return order

    def block_order(self, node: str) -> list[str]:
        """The nodes of ``node``'s inner block (not of blocks nested in it) in evaluation order."""
        return [n.name for n in self.ir[self._nodes[node].route].blocks.get(node, ())]

    def inputs(self, node: str) -> dict[str, str]:
        return dict(self._nodes[node].inputs)

    def node_buffers(self, node: str, at_defaults: bool = True) -> list[str]:
        """The per-parameter buffers of a node.

        ``at_defaults=True`` evaluates hyperparameter arguments at their declared
        defaults (``momentum(momentum)`` keeps no buffer when the default momentum
        is 0); ``False`` uses only the constants of the source, giving every
        buffer the node may keep (the checkpoint schema)."""
        n = self._nodes[node]
        if n.kind is not Kind.OP:
            return []
        return n.impl.buffer_names(self.const_args(node, at_defaults))

    def const_args(self, node: str, at_defaults: bool = True) -> dict[str, Any]:
        """A node's structural arguments: its compile-time constants and, if ``at_defaults``, the
        ones that depend only on hyperparameters, evaluated at their defaults (what a param
        group with the default values gives). Arguments that read ``step`` or ``loss`` are left
        out: they are never structural."""
        n = self._nodes[node]
        const = dict(n.const)
        if at_defaults:
            env = self.defaults()
            for k in n.dynamic:
                if k in n.per_step:
                    continue
                try:
                    const[k] = n.args[k].eval(env)
                except (ValueError, ZeroDivisionError, OverflowError, KeyError, TypeError):
                    pass
        return const

    def state_numel(self, route: str, shape: Sequence[int]) -> int:
        """Elements of optimizer state one parameter of ``shape`` keeps on ``route``
        (block ops such as ``galore`` keep their inner pipeline's state at the projected shape)."""
        return sum(op.state_numel(shp, const) for _, op, const, shp in self.state_layout(route, shape))

    def state_layout(self, route: str, shape: Sequence[int]) -> list[tuple[str, Any, dict[str, Any], tuple[int, ...]]]:
        """``(node, op, structural args, input shape)`` of every op node of ``route`` for a
        parameter of ``shape``, blocks included (their inner ops see the block's inner shape)."""
        ir = self.ir[route]
        out: list[tuple[str, Any, dict[str, Any], tuple[int, ...]]] = []

        def visit(nodes: Sequence[Node], shp: tuple[int, ...]) -> None:
            for n in nodes:
                if n.kind is not Kind.OP:
                    continue
                op, const = n.impl, self.const_args(n.name)
                # a state cell has its initial value's shape: one number per row of a matrix when
                # it starts from a reduction over rows (Adafactor)
                x = n.inputs.get("x")
                out.append((n.name, op, const, value_shape(ir, x, shp) if n.op == "state" and x else shp))
                if n.name in ir.blocks:
                    visit(ir.blocks[n.name], tuple(op.inner_shape(shp, const)))
        visit(ir.nodes, tuple(shape))
        return out

    def has_projections(self, route: str) -> bool:
        """True when the route holds a block op whose inner pipeline runs at another shape."""
        return any(n.is_op and n.impl.projects_block for n in self.ir[route].all_nodes())

    def state_buffers(self) -> list[str]:
        """Every per-parameter state buffer, as ``node.buffer``."""
        return [f"{n}.{b}" for n in self.graph.nodes for b in self.node_buffers(n)]

    def state_bytes_per_param(self, route: str | None = None, itemsize: int = 4) -> int:
        nodes = self.route_nodes(route) if route else list(self.graph.nodes)
        return sum(len(self.node_buffers(n)) for n in nodes) * itemsize

    def state_schema(self) -> list[str]:
        """What a checkpoint of this pipeline holds: ``route node op buffers`` lines.

        Two pipelines with the same schema can exchange ``state_dict`` s (a changed
        comment, default or range does not matter; a changed op or buffer does)."""
        out = []
        for name in sorted(self._nodes):
            n = self._nodes[name]
            if not n.is_op:
                continue
            bufs = self.node_buffers(name, at_defaults=False)
            if bufs or n.impl.has_node_state:
                out.append(f"{name} {n.op} {','.join(bufs)}")
        return out

    def reductions(self) -> list[tuple[str, str]]:
        out = []
        for name in self.graph.nodes:
            n = self._nodes[name]
            if n.is_op:
                r = n.impl.reduction(n.args)
                if r:
                    out.append((name, r))
            elif n.kind is Kind.ARITH and prims.is_reduction(n.op):
                out.append((name, n.const["over"]))
        return out

    # ------------------------------------------------------------------ routing
    def assign_routes(self, params: Sequence[tuple[str | None, Any]]) -> list[str]:
        """Route label for each ``(name, tensor)``; GradError for overlaps or uncovered names."""
        if len(self.routes) == 1 and isinstance(self.routes[0].selector, ast.Default):
            return [self.routes[0].label] * len(params)
        default = next((r for r in self.routes if isinstance(r.selector, ast.Default)), None)
        explicit = [r for r in self.routes if not isinstance(r.selector, ast.Default)]
        labels: list[str] = []
        uncovered: list[str] = []
        overlaps: list[tuple[str, list[RouteInfo]]] = []
        for name, t in params:
            hits = [r for r in explicit if _matches(r.selector, name, t, self)]
            if len(hits) > 1:
                overlaps.append((name or "?", hits))
                labels.append(hits[0].label)
            elif hits:
                labels.append(hits[0].label)
            elif default is not None:
                labels.append(default.label)
            else:
                uncovered.append(name or "?")
                labels.append("")
        if overlaps:
            name, hits = overlaps[0]
            names = _listing([o[0] for o in overlaps])
            lines = " and ".join(str(h.span.line) for h in hits)
            raise GradError(f"{len(overlaps)} parameter(s) match more than one route: {names} "
                            f"(e.g. '{name}' matches the routes on lines {lines})", hits[1].span,
                            "make the selectors disjoint, e.g. add 'and not ...' to one of them")
        if uncovered:
            raise GradError(f"{len(uncovered)} parameter(s) match no route: {_listing(uncovered)}",
                            explicit[0].span if explicit else self.file_span(),
                            "add 'route default: ...' or a selector that covers them")
        return labels

    def check_shapes(self, params: Sequence[tuple[str | None, Any]], labels: Sequence[str]) -> None:
        """Check, for each parameter, that the shapes of its route's values fit (matrix functions
        on parameters of two or more dimensions, ``matmul`` of matching inner sizes, arithmetic on
        values that broadcast): a GradError at the first node that does not fit, naming the
        parameters, when an optimizer is built rather than at its first step."""
        bad: dict[str, tuple[ShapeMismatch, list[str]]] = {}
        seen: set[tuple[str, tuple[int, ...]]] = set()
        for (name, t), label in zip(params, labels):
            ir = self.ir.get(label)
            if ir is None or not any(_is_matrix_node(n) for n in ir.nodes):
                continue
            key = (label, tuple(t.shape))
            if key in seen:
                if key in bad:
                    bad[key][1].append(name or "?")
                continue
            seen.add(key)
            try:
                for n in ir.nodes:
                    value_shape(ir, n.name, key[1], check=True)
            except ShapeMismatch as err:
                bad[key] = (err, [name or "?"])
        if bad:
            err, names = next(iter(bad.values()))
            everyone = [n for e, ns in bad.values() if e.node is err.node and e.message == err.message for n in ns]
            raise GradError(f"{err.message}: parameter(s) {_listing(everyone)}", err.node.span, err.hint)

    # ------------------------------------------------------------------ reports
    def explain(self) -> str:
        from .explain import explain
        return explain(self)

    def to_dot(self) -> str:
        from .draw import to_dot
        return to_dot(self)

    def draw(self, path: str | pathlib.Path) -> pathlib.Path:
        from .draw import draw
        return draw(self, path)


@dataclass
class Library:
    """A checked library file: definitions (``hparam``, ``let``, ``def``, ``import``) and no
    pipeline, meant to be imported by pipeline files. :func:`check_file` gives one;
    :func:`load` refuses such a file, since there is no optimizer to build from it.

    Attributes:
        hyperparams: the hyperparameters it declares or imports, by name (``lr`` only if declared).
        lets, defs: the names of its own ``let`` and ``def`` definitions, in source order.
        imports: the paths its ``import`` lines name, as written.
    """

    path: str
    source: str
    hyperparams: dict[str, HyperParam]
    lets: list[str]
    defs: list[str]
    imports: list[str]

    @property
    def name(self) -> str:
        return pathlib.Path(self.path).stem if not self.path.startswith("<") else self.path


def _is_matrix_node(n: Node) -> bool:
    """Whether ``n`` acts on the parameter's matrix view (a matrix function, or an op such as
    ``newton_schulz``): it needs parameters of two or more dimensions."""
    return (n.kind is Kind.ARITH and prims.is_matrix(n.op)) or (n.kind is Kind.OP and n.impl.matrix)


def _max_ndim(sel: ast.Selector) -> int | None:
    """The most dimensions a parameter the selector matches can have, where the selector bounds
    it (``ndim == 1``, ``ndim < 2 and "*.bias"``), else None."""
    if isinstance(sel, ast.ShapePred) and sel.attr == "ndim":
        return {"==": sel.value, "<": sel.value - 1, "<=": sel.value}.get(sel.op)
    if isinstance(sel, ast.SelNot) and isinstance(sel.operand, ast.ShapePred) and sel.operand.attr == "ndim":
        flipped = {">": "<=", ">=": "<"}.get(sel.operand.op)
        return _max_ndim(ast.ShapePred("ndim", flipped, sel.operand.value)) if flipped else None
    if isinstance(sel, ast.SelAnd):
        bounds = [b for b in (_max_ndim(sel.left), _max_ndim(sel.right)) if b is not None]
        return min(bounds) if bounds else None
    if isinstance(sel, ast.SelOr):
        a, b = _max_ndim(sel.left), _max_ndim(sel.right)
        return None if a is None or b is None else max(a, b)
    return None


def _check_matrix_routes(routes: Sequence[RouteInfo], ir: Mapping[str, RouteIR]) -> None:
    """A matrix function or op on a route whose selector admits only parameters of fewer than two
    dimensions (``route ndim == 1: ...``) is refused when the pipeline compiles."""
    for r in routes:
        bound = _max_ndim(r.selector)
        if bound is None or bound >= 2:
            continue
        n = next((n for n in ir[r.label].all_nodes() if _is_matrix_node(n)), None)
        if n is not None:
            raise GradError(f"'{n.op}' needs parameters of 2 or more dimensions, but this route takes only "
                            f"parameters of at most {bound}", n.span,
                            "route matrices to it, e.g. 'route ndim >= 2: ...', and give the rest another pipeline")


class ShapeMismatch(Exception):
    """A node whose operands' shapes do not fit for a parameter of some shape (a matrix function
    on a vector, ``matmul`` of matrices whose inner sizes differ, arithmetic on a matrix and a value
    of another shape): :meth:`Program.check_shapes` reports it as a GradError naming the parameters."""

    def __init__(self, node: Node, message: str, hint: str) -> None:
        super().__init__(message)
        self.node, self.message, self.hint = node, message, hint


def needs_matrix_text(what: str, shape: Sequence[int]) -> tuple[str, str]:
    """The message and hint for ``what`` (a matrix function, a reduction over rows) given a
    parameter of fewer than two dimensions: when the optimizer is built, or in a step."""
    return (f"{what} needs a parameter of 2 or more dimensions, but this one has shape {tuple(shape)}",
            "route matrices to it, e.g. 'route ndim >= 2: ...' with another route for the rest")


def not_square_text(op: str, shape: Sequence[int]) -> tuple[str, str]:
    """The message and hint for ``eigvecs`` or ``matrix_power`` given a matrix that is not square."""
    return (f"'{op}' needs a square matrix, but this one is {tuple(shape)}",
            "give it a symmetric matrix such as matmul(g, transpose(g)) (G Gᵀ) or a cell of one")


def inner_sizes_text(a: Sequence[int], b: Sequence[int]) -> tuple[str, str]:
    """The message and hint for ``matmul`` of matrices whose inner sizes differ."""
    return (f"'matmul' of a {tuple(a)} and a {tuple(b)} matrix: the inner sizes differ",
            "the columns of the first must match the rows of the second: G Gᵀ is matmul(g, transpose(g)), "
            "Gᵀ G is matmul(transpose(g), g)")


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape ``shapes`` broadcast to (numpy's rule), or None when they do not broadcast."""
    n = max(len(s) for s in shapes)
    padded = [(1,) * (n - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        big = {d for d in dims if d != 1}
        if len(big) > 1:
            return None
        out.append(big.pop() if big else 1)
    return tuple(out)


def matrix_shape(shp: tuple[int, ...], param: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a value's matrix view: a value of the parameter's shape with more than two
    dimensions is ``(shape[0], -1)``; a matrix is itself."""
    if shp == param and len(shp) > 2:
        return (shp[0], math.prod(shp[1:]))
    return shp


def value_shape(ir: RouteIR, node: str, shape: tuple[int, ...], check: bool = False) -> tuple[int, ...]:
    """The shape of ``node``'s value for a parameter of ``shape``: the parameter's, except for
    per-tensor values (a reduction over ``tensor`` is 0-d, over ``rows`` ``(..., R, 1)``, over
    ``cols`` ``(..., 1, C)`` of its operand; a shape value is 0-d; a matrix function's value is
    a matrix, the parameter's shape when it is the parameter's matrix view; arithmetic broadcasts;
    a state cell has its initial value's shape). ``check``: raise :class:`ShapeMismatch` where
    shapes do not fit (checked when an optimizer is built, for each parameter shape)."""
    memo: dict[str, tuple[int, ...]] = {}
    shape = tuple(shape)

    def mismatch(n: Node, text: tuple[str, str]) -> tuple[int, ...]:
        """Shapes that do not fit: an error when checking, else the parameter's shape."""
        if check:
            raise ShapeMismatch(n, *text)
        return shape

    def of(name: str) -> tuple[int, ...]:
        if name in memo:
            return memo[name]
        n = ir.by_name[name]
        out = shape
        if n.kind is Kind.ARITH and prims.is_shape(n.op):
            out = ()
        elif n.kind is Kind.ARITH and prims.is_reduction(n.op):
            over = n.const.get("over")
            x = of(n.inputs["lhs"])
            if over == "rows" and len(x) >= 2:
                out = x[:-1] + (1,)
            elif over == "cols" and len(x) >= 2:
                out = x[:-2] + (1, x[-1])
            elif over in ("tensor", "global"):
                out = () if over == "tensor" else shape
        elif n.kind is Kind.ARITH and prims.is_matrix(n.op):
            out = _matrix_value(n, [of(n.inputs[p]) for p in prims.PORTS[n.op] if p in n.inputs])
        elif n.kind is Kind.ARITH and n.op == "broadcast":
            x = of(n.inputs["lhs"])
            if _broadcast([x, shape]) != shape:
                mismatch(n, (f"a value of shape {x} is used where a value of the parameter's shape {shape} is "
                             "needed", "an op, the update and a cell of the parameter's shape take values of the "
                             "parameter's shape; a matrix such as G Gᵀ is m×m"))
        elif n.kind is Kind.ARITH and n.inputs:
            shapes = [of(src) for port, src in n.inputs.items() if port != "like"]
            b = _broadcast(shapes) if shapes else out
            out = b if b is not None else mismatch(n, (
                f"'{prims.NODE_NAMES.get(n.op, n.op)}' of values of shapes {' and '.join(str(s) for s in shapes)}, "
                "which do not broadcast", "elementwise arithmetic needs values of one shape (or numbers per tensor, "
                "row or column): check the matrix functions' shapes"))
        elif n.kind is Kind.OP and n.op == "state" and "x" in n.inputs:
            out = of(n.inputs["x"])
        elif n.kind is Kind.OP and n.impl.matrix and len(shape) < 2:
            mismatch(n, needs_matrix_text(f"'{n.op}'", shape))
        memo[name] = out
        return out

    def _matrix_value(n: Node, operands: list[tuple[int, ...]]) -> tuple[int, ...]:
        if len(shape) < 2:
            return mismatch(n, needs_matrix_text(f"'{n.op}'", shape))
        if n.op == "descending":
            k = math.prod(operands[0])
            return (k, k)
        views = [matrix_shape(o, shape) for o in operands]
        if any(len(v) != 2 for v in views):
            bad = next(v for v in views if len(v) != 2)
            return mismatch(n, (f"'{n.op}' needs a matrix, but this value has shape {bad}",
                                "matrix functions take values of the parameter's shape or matrices made by them"))
        if n.op == "transpose":
            out = (views[0][1], views[0][0])
        elif n.op == "qr":
            out = (views[0][0], min(views[0]))
        elif n.op in ("eigvecs", "matrix_power"):
            out = views[0]
            if out[0] != out[1]:
                return mismatch(n, not_square_text(n.op, out))
        else:
            a, b = views
            if a[1] != b[0]:
                return mismatch(n, inner_sizes_text(a, b))
            out = (a[0], b[1])
        return shape if len(shape) > 2 and out == matrix_shape(shape, shape) else out

    return of(node)


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _matches(sel: ast.Selector, name: str | None, t: Any, prog: Program) -> bool:
    if isinstance(sel, ast.Glob) or isinstance(sel, ast.Regex):
        if name is None:
            raise GradError("this route selects parameters by name, but the parameters have no names",
                            sel.span, "pass model.named_parameters() instead of model.parameters()")
        if isinstance(sel, ast.Glob):
            return fnmatch.fnmatchcase(name, sel.pattern)
        return re.search(sel.pattern, name) is not None
    if isinstance(sel, ast.ShapePred):
        v = t.ndim if sel.attr == "ndim" else t.numel()
        return {"==": v == sel.value, "!=": v != sel.value, "<": v < sel.value, "<=": v <= sel.value,
                ">": v > sel.value, ">=": v >= sel.value}[sel.op]
    if isinstance(sel, ast.SelAnd):
        return _matches(sel.left, name, t, prog) and _matches(sel.right, name, t, prog)
    if isinstance(sel, ast.SelOr):
        return _matches(sel.left, name, t, prog) or _matches(sel.right, name, t, prog)
    if isinstance(sel, ast.SelNot):
        return not _matches(sel.operand, name, t, prog)
    return False


def _check_selector(sel: ast.Selector) -> None:
    for n in ast.walk(sel):
        if isinstance(n, ast.Regex):
            try:
                re.compile(n.pattern)
            except re.error as e:
                raise GradError(f"invalid regular expression: {e.msg}", n.span,
                                "the pattern between the slashes is a Python regular expression") from None
        elif isinstance(n, ast.Default) and n is not sel:
            raise GradError("'default' cannot be combined with other selectors", n.span,
                            "write 'route default: ...' on its own")


def _without_comments(module: ast.Module) -> ast.Module:
    import dataclasses
    stmts = tuple(dataclasses.replace(st, comments=()) for st in module.stmts)
    return dataclasses.replace(module, stmts=stmts, trailing_comments=())


def _canonical_and_hash(env: ModuleEnv) -> tuple[str, str]:
    """The canonical text of the file, and a hash of what it means: the canonical
    form without comments, of the file and of everything it imports."""
    from ..dsl.formatter import format_module
    canonical = format_module(env.module)
    h = hashlib.sha256(format_module(_without_comments(env.module)).encode())
    seen: set[int] = set()

    def visit(e: ModuleEnv) -> None:
        for sub in list(e.aliases.values()) + list(e.imported.values()):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            h.update(b"\0import\0" + format_module(_without_comments(sub.module)).encode())
            visit(sub)
    visit(env)
    return canonical, h.hexdigest()[:16]


def _check_definitions(env: ModuleEnv, hparams: dict[str, HyperParam], used: set[int]) -> list[GradError]:
    """Type-check the lets, state cells, and the defs whose parameters all have defaults, that the
    pipeline does not reach, so ``gradpipe check`` reports mistakes in them too.

    Each is expanded at most once in a successful check: the definitions are visited last
    first (a definition usually builds on those above it), and every let, and every def
    without parameters, that a successful check reaches counts as checked. Re-expanding
    every let on its own would cost time quadratic in the length of a chain of lets built
    from each other."""
    from .values import Fragment
    errors: list[GradError] = []
    scratch = Builder(env, hparams)
    scratch.emit.route = "check"
    checked = set(used)
    todo: list[tuple[ast.Let | ast.State | ast.Def, ast.Expr]] = [(let, let.value) for let in env.lets.values()]
    todo += [(st, ast.Name((st.name,), span=st.span)) for st in env.states.values()]
    todo += [(d, ast.Call(ast.Name((d.name,), span=d.span), span=d.span)) for d in env.defs.values()
             if not any(p.default is None for p in d.params)]
    #: what a use checks completely: a let, or a def without parameters (a def with some is
    #: checked again with its defaults, which a use may not have tried)
    same_everywhere = {id(let) for let in env.lets.values()} | {id(d) for d in env.defs.values() if not d.params}
    same_everywhere |= {id(st) for st in env.states.values()}
    todo.sort(key=lambda t: (t[0].span.line, t[0].span.column), reverse=True)
    defaults = {k: hp.default for k, hp in hparams.items()}
    seen: set[str] = set()
    for stmt, expr in todo:
        if id(stmt) in checked:
            continue
        scratch.used.clear()
        try:
            v = scratch.expr(expr, Scope(env), "check" if isinstance(stmt, ast.Def) else f"check/{stmt.name}")
            if isinstance(v, Fragment):
                v.apply(scratch.source("grad", stmt.span).node, "check")
            scratch.finish_cells()
            # the rules across arguments, as compile_env checks those of the pipeline
            g = scratch.graph
            new = [n for n in g.nodes if n not in seen and g.nodes[n]["kind"] == Kind.OP.value]
            seen.update(g.nodes)
            for rule in rule_checks(freeze_node(g, n) for n in new):
                _check_rule(rule, defaults, "from the hyperparameters' defaults")
        except GradError as e:
            errors.append(e)
            checked.add(id(stmt))
            if scratch.over_budget is not None:
                break  # every later check would stop at the same budget
        else:
            checked |= scratch.used & same_everywhere
    return errors


def _program_hparams(env: ModuleEnv) -> dict[str, HyperParam]:
    """The hyperparameters a program of this file has: its own and its imports', plus ``lr``."""
    hparams = dict(all_hparams(env))
    if "lr" not in hparams:
        import dataclasses
        hparams = {"lr": dataclasses.replace(_LR, span=Span(1, 1, 1, 2, env.path, env.module.source)), **hparams}
    return hparams


def _is_library(env: ModuleEnv) -> bool:
    """A file with statements (definitions, imports) but neither a pipeline nor routes."""
    return env.body is None and not env.routes and bool(env.module.stmts)


def compile_env(env: ModuleEnv) -> Program:
    hparams = _program_hparams(env)
    if env.body is None and not env.routes:
        if not env.module.stmts:
            raise GradError("the file is empty", Span(1, 1, 1, 2, env.path, env.module.source),
                            "write a pipeline, e.g. 'grad | adam'")
        raise GradError("the file defines no pipeline", Span(1, 1, 1, 2, env.path, env.module.source),
                        "add a line such as 'grad | adam' (or 'route ...' lines); a file of only "
                        "definitions is a library, meant for 'import' from a pipeline file "
                        "('gradpipe check' checks it as one)")
    b = Builder(env, hparams)
    routes: list[RouteInfo] = []
    errors: list[GradError] = []
    if env.body is not None:
        try:
            routes.append(b.build_route("main", ast.Default(span=env.body.span), env.body.expr, env.body.span,
                                        env.body.param))
        except GradError as e:
            errors.append(e)
    seen_labels: dict[str, Span] = {}
    for r in env.routes:
        try:
            _check_selector(r.selector)
            label = selector_label(r.selector)
            if label in seen_labels:
                raise GradError(f"the same selector as the route on line {seen_labels[label].line}", r.span,
                                "merge the two routes")
            seen_labels[label] = r.span
            routes.append(b.build_route(label, r.selector, r.body, r.span, r.param))
        except GradError as e:
            errors.append(e)
    if b.over_budget is None:  # a blown budget is reported once; the checks would only blow it again
        errors.extend(_check_definitions(env, hparams, b.used))
    if errors:
        raise GradError.combine(errors)
    prog_defaults = {n: hp.default for n, hp in hparams.items()}
    b.cell_keeps()
    g = b.graph
    merged = cse(g)
    removed = eliminate_dead(g)
    check_per_sample(g)
    check_ops(g)  # every op's own rules: what building the optimizer would otherwise refuse
    position = {n: i for i, n in enumerate(nx.lexicographical_topological_sort(g))}
    ir = {r.label: freeze(g, r.label, r.output, position) for r in routes}
    _check_matrix_routes(routes, ir)
    modes = compile_modes(env, hparams, {k: r for k, r in ir.items() if r.writes_param},
                          _cell_finder(b, merged, ir))
    nonfinite = policy_of(n for r in ir.values() for n in r.all_nodes())
    rules = rule_checks(n for r in ir.values() for n in r.all_nodes())
    canonical, digest = _canonical_and_hash(env)
    prog = Program(graph=g, hyperparams=hparams, routes=routes, path=env.path, source=env.module.source,
                   canonical=canonical, hash=digest, range_checks=b.range_checks, rule_checks=rules, folded=[str(f) for f in b.folded],
                   merged=merged, removed=removed, losses=frozenset(b.losses), reads=frozenset(b.reads),
                   ir=ir, nonfinite=nonfinite, modes=modes)
    prog.check_group(prog_defaults, "the hyperparameters' defaults")
    return prog


def _cell_finder(b: Builder, merged: list[tuple[str, str]], ir: dict[str, RouteIR]):
    """``find(state, label)``: the node of a state cell that route ``label`` keeps (after common
    subexpressions were merged), or None (for the eval and train sequences)."""
    kept = dict(merged)

    def find(st: ast.State, label: str) -> str | None:
        node = b.cell_read(st, label)
        while node in kept:
            node = kept[node]
        if node is None or not any(cell == node for cell, _ in ir[label].commits):
            return None
        return node
    return find


def check_library_env(env: ModuleEnv) -> Library:
    """Check a library file (see :class:`Library`): every ``let``, and every ``def`` whose
    parameters all have defaults, is compiled as far as it can be without a pipeline around it
    (what :func:`compile_env` does for the definitions a pipeline does not use). Raise one
    GradError with every problem."""
    if not _is_library(env):
        raise ValueError(f"{env.path} is not a library file")
    hparams = _program_hparams(env)
    errors = _check_definitions(env, hparams, set())
    if errors:
        raise GradError.combine(errors)
    return Library(path=env.path, source=env.module.source,
                   hyperparams={n: hp for n, hp in hparams.items() if hp.declared},
                   lets=list(env.lets), defs=list(env.defs),
                   imports=[st.path for st in env.module.stmts if isinstance(st, ast.Import)])


def check_env(env: ModuleEnv) -> Program | Library:
    """:func:`compile_env`, except that a library file (definitions, no pipeline) is checked
    as one (:func:`check_library_env`) instead of refused."""
    return check_library_env(env) if _is_library(env) else compile_env(env)


def _check_rule(rule: RuleCheck, env: Mapping[str, Any], origin: str) -> None:
    try:
        values = rule.values(env)
    except (ZeroDivisionError, OverflowError, ValueError):
        raise GradError(f"the arguments of '{rule.op}' cannot be computed {origin}", rule.span) from None
    broken = OPS[rule.op].validate(values)
    if broken is not None:
        msg, hint = broken
        raise GradError(f"{msg} ({origin})", rule.span, hint)


def rule_checks(nodes: Iterable[Node]) -> list[RuleCheck]:
    """The rules across arguments (:meth:`Op.validate`) of these nodes: checked here when every
    argument they read is a constant, returned to be checked per param group or step otherwise."""
    out: list[RuleCheck] = []
    seen: set[str] = set()
    for n in nodes:
        if n.kind is not Kind.OP or n.name in seen or not n.impl.validates:
            continue
        seen.add(n.name)
        op = n.impl
        if all(k in n.const for k in op.validates):
            broken = op.validate({k: n.const[k] for k in op.validates})
            if broken is not None:
                raise GradError(broken[0], n.span, broken[1])
        else:
            out.append(RuleCheck(tuple((k, n.args[k]) for k in op.validates), op.name, n.span))
    return out


def _compile_guarded(source: str, path: str, library_ok: bool = False) -> Any:
    """Compile (with ``library_ok``, check a library file as one: :func:`check_env`), turning a
    RecursionError into a GradError at 1:1.

    The compiler bounds every recursion it knows of (the parser's depth and nesting limits,
    ``MAX_EXPANDED_DEPTH`` and the let/def/apply limits in ``build.py``); this is the last line
    of defence, so that no input ever ends in anything but a positioned GradError."""
    try:
        env = load_module_tree(source, path)
        return check_env(env) if library_ok else compile_env(env)
    except RecursionError:
        raise GradError("the pipeline is nested too deeply to compile (it reached Python's recursion limit)",
                        Span(1, 1, 1, 2, path, source),
                        "flatten it: fewer levels of brackets, arithmetic, and lets or defs built from "
                        "each other") from None


def compile(source: str, path: str = "<string>") -> Program:  # noqa: A001 - public name fixed by the design
    """Compile pipeline source text to a :class:`Program` (imports resolve from the cwd)."""
    return _compile_guarded(source, path)


def _read(path_or_name: str | pathlib.Path) -> tuple[str, str]:
    """``(source, path)`` of a `.grad` file, or of a built-in pipeline by name."""
    from ..dsl.parser import read_source
    name = str(path_or_name)
    p = pathlib.Path(path_or_name)
    try:
        is_file = p.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        is_file = False
    looks_like_path = p.suffix == ".grad" or "/" in name or "\\" in name
    builtin = builtin_dir() / f"{name}.grad"
    if not is_file and not looks_like_path and builtin.exists():
        return read_source(builtin), str(builtin)
    if is_file or looks_like_path or p.exists():
        return read_source(p), name
    raise GradError(f"no pipeline file or built-in pipeline named '{name}'", Span(1, 1, 1, 2, name, None),
                    did_you_mean(name, builtin_names()) or f"built-in pipelines: {', '.join(builtin_names())}")


def load(path_or_name: str | pathlib.Path) -> Program:
    """Load a `.grad` file, or a built-in pipeline by name (``"adam"``).

    A library file (definitions, no pipeline) is refused: import it from a pipeline file,
    or check it with :func:`check_file`."""
    return _compile_guarded(*_read(path_or_name))


def check_file(path_or_name: str | pathlib.Path) -> Program | Library:
    """Check a `.grad` file, or a built-in pipeline by name, as ``gradpipe check`` does: a
    pipeline file is compiled (:func:`load`); a library file (``hparam``, ``let``, ``def`` and
    ``import`` lines, no pipeline) has every definition checked and gives a :class:`Library`.
    An empty file is an error. Every problem is raised as one GradError."""
    return _compile_guarded(*_read(path_or_name), library_ok=True)
