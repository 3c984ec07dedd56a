"""Lowering a route for the compiled backend: fused segments, eager nodes, and their cost.

:func:`plan_route` cuts a route, in evaluation order, into maximal runs of *flat* nodes
(elementwise ops, ``global`` reductions and arithmetic, which can run on the route's
tensors concatenated into flat buffers) and single *eager* nodes (per-tensor reductions,
shape-dependent ops, random draws, combiners, block ops). The compiled backend
(``gradpipe/runtime/compiled.py``) fuses each run with ``torch.compile``; ``explain``
reports the plan and its memory traffic per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from . import scalars as S
from .ops import OPS

if TYPE_CHECKING:
    from .program import Program

__all__ = ["Segment", "plan_route", "route_cost", "RouteCost"]

_SCALARS = (S.Const, S.HP, S.Src, S.BinS, S.NegS)


@dataclass
class Segment:
    """A run of flat nodes compiled as one function."""

    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    #: per node: the names of its non-constant scalar arguments (evaluated each step)
    dynamic: list[list[str]] = field(default_factory=list)
    reads_param: bool = False
    #: the node whose value is the route's update ``u``, when this segment computes it
    final: str | None = None


def _is_flat(prog: Program, node: str) -> bool:
    d = prog.graph.nodes[node]
    if d["kind"] == "arith":
        return True
    if d["kind"] != "op":
        return False
    op = OPS[d["op"]]
    if op.has_node_state or op.per_sample or any(p.kind in ("block", "signals") for p in op.params):
        return False
    return op.flat_ok(prog._const_args(node, at_defaults=False))


def plan_route(prog: Program, order: Sequence[str]) -> list[tuple[str, Any]]:
    """The route as ``("eager", node)`` and ``("segment", _Segment)`` items in evaluation order."""
    g = prog.graph
    nodes = [n for n in order if g.nodes[n].get("block") is None and g.nodes[n]["kind"] not in ("output",)]
    items: list[tuple[str, Any]] = []
    run: list[str] = []

    def close() -> None:
        if not run:
            return
        members = set(run)
        inputs: list[str] = []
        for n in run:
            for src in prog.inputs(n).values():
                if src not in members and src not in inputs:
                    inputs.append(src)
        outputs = [n for n in run if any(dst not in members for dst in g.successors(n))]
        dynamic = [[k for k, v in g.nodes[n]["args"].items() if isinstance(v, _SCALARS) and not isinstance(v, S.Const)]
                   for n in run]
        reads = any(g.nodes[n]["kind"] == "op" and OPS[g.nodes[n]["op"]].reads_param for n in run)
        items.append(("segment", Segment(list(run), inputs, outputs, dynamic, reads)))
        run.clear()

    for n in nodes:
        if g.nodes[n]["kind"] == "source":
            continue  # sources are values handed in, not work
        if _is_flat(prog, n):
            run.append(n)
        else:
            close()
            items.append(("eager", n))
    close()
    out = next(n for n in order if g.nodes[n]["kind"] == "output")
    final = prog.inputs(out)["x"]
    for kind, item in items:
        if kind == "segment" and final in item.nodes and set(g.successors(final)) == {out}:
            item.final = final
    return items




@dataclass(frozen=True)
class RouteCost:
    """The compiled backend's plan for one route and its memory traffic per parameter."""

    segments: int
    eager_nodes: list[str]
    kernels: int
    bytes_per_param: int


def route_cost(prog: "Program", label: str, itemsize: int = 4) -> RouteCost:
    """Bytes read and written per parameter per step by the compiled backend (at the
    hyperparameters' defaults), as the sum over the plan: a fused segment reads each
    input once, reads and writes each state buffer once, and either writes its outputs
    or (the last one) reads and writes the parameter; an eager node reads its inputs and
    writes its result, and feeding a segment costs a gather (a copy). Every global
    reduction adds a pass (a kernel) over its input."""
    plan = plan_route(prog, prog.route_nodes(label))
    g = prog.graph
    total = kernels = segments = 0
    eager: list[str] = []
    produced_eager: set[str] = set()
    fused_update = False
    for kind, item in plan:
        if kind == "eager":
            d = g.nodes[item]
            eager.append(item)
            ins = [s for p, s in prog.inputs(item).items()]
            total += len(ins) + 1 + 2 * len(prog.node_buffers(item))
            if d["kind"] == "op" and OPS[d["op"]].needs_param(prog._const_args(item)):
                total += 1
            produced_eager.add(item)
            kernels += 1
            continue
        segments += 1
        kernels += 1
        for src in item.inputs:
            total += 1 + (2 if src in produced_eager else 0)
        reads_param = False
        for n in item.nodes:
            d = g.nodes[n]
            total += 2 * len(prog.node_buffers(n))
            if d["kind"] == "op":
                op = OPS[d["op"]]
                reads_param |= op.needs_param(prog._const_args(n))
                if op.reduction(d["args"]) == "global":
                    kernels += 1
        outs = [n for n in item.outputs if n != item.final]
        total += len(outs)
        if item.final is not None:
            total += 2  # read and write the parameter (a read for the math is the same read)
            fused_update = True
        elif reads_param:
            total += 1
    if not fused_update:
        total += 3  # the optimizer applies p <- p - lr * u: read u and p, write p
    return RouteCost(segments, eager, kernels, total * itemsize)
