"""The typed IR that backends consume: frozen nodes, one list per route.

The compiler builds and optimises the pipeline as a ``networkx`` graph
(:attr:`Program.graph`, what ``gradpipe graph`` draws and the passes rewrite).
When the passes are done, :func:`freeze` turns each route into a
:class:`RouteIR`: its nodes in evaluation order as :class:`Node` values, each
with a :class:`Kind`, its op, its bound arguments split into compile-time
constants and per-step expressions, its inputs by port, its stable name and its
source span. The eager interpreter, the compiled backend, ``explain`` and state
migration read only this; no module outside the compiler reads the graph's
attribute dicts.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..dsl.diagnostics import Span
from . import scalars as S

if TYPE_CHECKING:
    import networkx as nx

    from .ops.base import Op

__all__ = ["Kind", "Node", "RouteIR", "freeze", "COMMIT_PORT", "POINT_PORT", "is_scalar", "SCALAR_TYPES", "STEP_SOURCES"]


class Kind(str, enum.Enum):
    """What a node is. The values are the ``kind`` attributes of :attr:`Program.graph`."""

    #: a value handed to the route: ``grad``, ``param``, ``samples``, ``grads.<loss>``, and
    #: ``grad_at`` (the gradient at the point on its ``point`` port, see :data:`POINT_PORT`)
    SOURCE = "source"
    #: an op of the library (``adam``, ``clip_norm``...): ``op`` names it in ``OPS``
    OP = "op"
    #: an elementwise primitive on signals and scalars (``+ - * / % **``, ``neg``, comparisons,
    #: math functions: ``gradpipe.compiler.prims``)
    ARITH = "arith"
    #: the input of a block op's ``{ ... }`` pipeline: the values the block op hands it
    BLOCK_IN = "block_in"
    #: the route's update ``u`` (the runtime applies ``p <- p - lr * u``), or, when its
    #: ``args["param"]`` is True (``param = EXPR``), the parameter's new value (``p <- value``)
    OUTPUT = "output"


#: the prefix of an output's ports that carry the new value of a state cell: ``cell:<cell node>``
COMMIT_PORT = "cell:"

#: the port of a ``grad_at`` source that carries its point: the runtime evaluates the point's
#: nodes (:attr:`RouteIR.point_nodes`) before the route, and hands the gradient there in
POINT_PORT = "point"

#: the scalar expression types an argument may hold (evaluated per parameter group and step)
SCALAR_TYPES = (S.Const, S.HP, S.Src, S.BinS, S.NegS, S.CmpS, S.FnS)
#: scalar sources whose value changes every step: arguments reading them are never constants
STEP_SOURCES = frozenset({"step", "loss"})


def is_scalar(v: Any) -> bool:
    """Whether an argument is a scalar expression (as opposed to a word, a bool or a count)."""
    return isinstance(v, SCALAR_TYPES)


@dataclass(frozen=True, eq=False)
class Node:
    """One node of a route, immutable.

    ``args`` holds the bound arguments as the compiler built them (``S.Const``,
    ``S.HP``, arithmetic on them, words, bools); ``const`` the ones known when the
    pipeline compiles, as plain values; ``dynamic`` the names of the others, whose
    expressions are evaluated per parameter group and step; ``per_step`` those of
    ``dynamic`` that read ``step`` or ``loss`` (never treated as constants, not even
    when they evaluate to zero). ``inputs`` maps a port (``x`` is the stream input)
    to the node feeding it. ``block`` is the block op whose inner pipeline holds the
    node (None at the top level of a route).
    """

    name: str
    kind: Kind
    op: str
    args: Mapping[str, Any]
    inputs: Mapping[str, str]
    span: Span
    route: str
    block: str | None = None
    const: Mapping[str, Any] = field(default_factory=dict)
    dynamic: tuple[str, ...] = ()
    per_step: frozenset[str] = frozenset()

    @property
    def impl(self) -> "Op":
        """The op's implementation (``OPS[op]``, or an internal op such as a state cell); only
        for :attr:`Kind.OP` nodes."""
        from .ops import op_impl
        return op_impl(self.op)

    @property
    def is_op(self) -> bool:
        return self.kind is Kind.OP

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.kind.value}, {self.op!r})"


def _split_args(args: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], frozenset[str]]:
    const: dict[str, Any] = {}
    dynamic: list[str] = []
    per_step: set[str] = set()
    for k, v in args.items():
        if isinstance(v, S.Const):
            const[k] = v.value
        elif is_scalar(v):
            dynamic.append(k)
            if any(isinstance(leaf, S.Src) and leaf.name in STEP_SOURCES for leaf in S.leaves(v)):
                per_step.add(k)
        else:
            const[k] = v
    return const, tuple(dynamic), frozenset(per_step)


@dataclass(frozen=True)
class RouteIR:
    """One route as the backends run it.

    ``nodes``: the route's top-level nodes in evaluation order, the output last;
    ``blocks``: for each block op, the nodes of its ``{ ... }`` pipeline in
    evaluation order (its ``block_in`` node first; nested blocks have their own
    entry); ``update``: the node whose value is ``u``; ``commits``: for each state cell
    (a node of op ``state``), the node whose value becomes the cell's once the route has
    been evaluated, as ``(cell, new value)`` pairs; ``writes_param``: ``update`` is the
    parameter's new value (``param = EXPR``: the runtime writes ``p <- value``), not ``u``. A route that reads ``grad_at(point)`` has
    ``grad_at``, the name of that source node, ``point``, the node of the point, and
    ``point_nodes``, the nodes that compute it in evaluation order (stateless: the compiler
    refuses state there), which the runtime evaluates before the closure's second call; they
    are not in ``nodes`` unless the route's update reads them too.
    """

    label: str
    nodes: tuple[Node, ...]
    blocks: Mapping[str, tuple[Node, ...]]
    output: Node
    update: str
    by_name: Mapping[str, Node]
    commits: tuple[tuple[str, str], ...] = ()
    writes_param: bool = False
    grad_at: str | None = None
    point: str | None = None
    point_nodes: tuple[Node, ...] = ()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def node(self, name: str) -> Node:
        return self.by_name[name]

    def all_nodes(self) -> Iterator[Node]:
        """Every node of the route, blocks included, each once."""
        yield from self.nodes
        for inner in self.blocks.values():
            yield from inner

    def sources(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind is Kind.SOURCE)

    def point_ir(self) -> "RouteIR":
        """The point of the route's ``grad_at`` as a route of its own, whose update is the point:
        what the compiled backend plans and fuses before the closure's second call."""
        return dataclasses.replace(self, nodes=self.point_nodes, blocks=MappingProxyType({}), update=self.point,
                                   commits=(), grad_at=None, point=None, point_nodes=())


def freeze_node(g: "nx.MultiDiGraph", name: str) -> Node:
    d = g.nodes[name]
    inputs = {e["port"]: u for u, _, e in g.in_edges(name, data=True)}
    const, dynamic, per_step = _split_args(d["args"])
    return Node(name=name, kind=Kind(d["kind"]), op=d["op"], args=MappingProxyType(dict(d["args"])),
                inputs=MappingProxyType(inputs), span=d["span"], route=d["route"], block=d.get("block"),
                const=MappingProxyType(const), dynamic=dynamic, per_step=per_step)


def freeze(g: "nx.MultiDiGraph", label: str, output: str, position: Mapping[str, int] | None = None) -> RouteIR:
    """The route whose output node is ``output`` as a :class:`RouteIR`. ``position``: each
    node's index in ``nx.lexicographical_topological_sort(g)`` (computed once for a program of
    many routes; computed here when not given)."""
    import networkx as nx
    if position is None:
        position = {n: i for i, n in enumerate(nx.lexicographical_topological_sort(g))}
    keep = nx.ancestors(g, output) | {output}
    grad_at = next((n for n in keep if g.nodes[n]["kind"] == Kind.SOURCE.value and g.nodes[n]["op"] == "grad_at"),
                   None)
    point, first = None, []
    if grad_at is not None:  # the point's nodes run before the route (two phases, see RouteIR)
        point = next(u for u, _, e in g.in_edges(grad_at, data=True) if e["port"] == POINT_PORT)
        first = sorted(nx.ancestors(g, point) | {point}, key=position.__getitem__)
        keep = _ancestors_but_points(g, output)
    order = sorted(keep, key=position.__getitem__)
    frozen = {n: freeze_node(g, n) for n in sorted(keep | set(first), key=position.__getitem__)}
    top = tuple(frozen[n] for n in order if frozen[n].block is None)
    blocks: dict[str, list[Node]] = {}
    for n in order:
        b = frozen[n].block
        if b is not None:
            blocks.setdefault(b, []).append(frozen[n])
    out = frozen[output]
    commits = tuple((port[len(COMMIT_PORT):], src) for port, src in out.inputs.items() if port.startswith(COMMIT_PORT))
    return RouteIR(label=label, nodes=top, blocks=MappingProxyType({k: tuple(v) for k, v in blocks.items()}),
                   output=out, update=out.inputs["x"], by_name=MappingProxyType(frozen), commits=commits,
                   writes_param=bool(out.args.get("param")), grad_at=grad_at, point=point, point_nodes=tuple(frozen[n] for n in first))


def _ancestors_but_points(g: "nx.MultiDiGraph", output: str) -> set[str]:
    """``output`` and what it depends on, not following a ``grad_at`` source to its point."""
    seen = {output}
    todo = [output]
    while todo:
        n = todo.pop()
        for u, _, e in g.in_edges(n, data=True):
            if e["port"] != POINT_PORT and u not in seen:
                seen.add(u)
                todo.append(u)
    return seen
