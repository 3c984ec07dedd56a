"""Lowering a route for the compiled backend: fused segments, eager nodes, and their cost.

:func:`plan_route` cuts a route, in evaluation order, into maximal runs of *flat* nodes
(elementwise ops, ``global`` reductions and arithmetic, which can run on the route's
tensors concatenated into flat buffers; a global reduction of a value the run computed
and reads again after it starts a new run) and single *eager* nodes (per-tensor reductions,
shape-dependent ops, random draws, combiners, block ops). The compiled backend
(``gradpipe/runtime/compiled.py``) fuses each run with ``torch.compile``; ``explain``
reports the plan and its memory traffic per parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from . import prims
from .ir import Kind, Node, RouteIR

if TYPE_CHECKING:
    from .program import Program

__all__ = ["Segment", "plan_route", "route_cost", "RouteCost", "is_flat"]


@dataclass
class Segment:
    """A run of flat nodes compiled as one function."""

    #: the nodes' names, in evaluation order
    nodes: list[str]
    #: the nodes themselves (the typed IR)
    members: tuple[Node, ...]
    #: the nodes outside the segment whose values it reads, in order of first use
    inputs: list[str]
    #: the segment's nodes whose values something after it reads
    outputs: list[str]
    #: whether some node of it reads the parameters
    reads_param: bool = False
    #: the node whose value is the route's update ``u``, when this segment computes it
    final: str | None = None
    #: state cells of the segment that take their new value at its end: ``(cell, new value)``,
    #: the new value a member or an input of the segment
    commits: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dynamic(self) -> list[tuple[str, ...]]:
        """Per node, the names of its non-constant scalar arguments (evaluated each step)."""
        return [n.dynamic for n in self.members]


def per_tensor_values(nodes: Sequence[Node]) -> set[str]:
    """The nodes (of ``nodes``, in evaluation order) whose value is one number per tensor, row or
    column rather than one per element: shape values, reductions over ``tensor``, ``rows`` or
    ``cols``, arithmetic on only such values, and state cells that start from one. They run tensor by tensor (on a few numbers per
    tensor); a fused segment that reads one expands it to its parameter's shape."""
    out: set[str] = set()
    for n in nodes:
        if n.kind is Kind.OP and n.op == "state" and n.inputs.get("x") in out:
            out.add(n.name)  # a state cell that starts from a per-tensor value
            continue
        if n.kind is not Kind.ARITH or n.op == "broadcast":
            continue
        if prims.per_tensor(n.op, n.const.get("over")) or (
                not prims.is_reduction(n.op) and n.inputs and all(src in out for src in n.inputs.values())):
            out.add(n.name)
    return out


def is_flat(prog: "Program", node: Node, per_tensor: set[str] | frozenset[str] = frozenset(),
            sharded: bool = False) -> bool:
    """Whether ``node`` can run on flat buffers (see ``Op.flat``). ``per_tensor``: the route's
    :func:`per_tensor_values`, which are not flat, and neither is a ``broadcast``. ``sharded``:
    the buffers hold each rank's shards of DTensor parameters (FSDP2), where no reduction is
    flat: a ``global`` one over them would miss the other ranks' shards (the compiled backend
    runs it on the DTensors, which reduce over the ranks, as it runs per-tensor ones)."""
    if node.kind is Kind.ARITH:
        if sharded and prims.is_reduction(node.op):
            return False
        return node.name not in per_tensor and node.op != "broadcast" and not prims.per_tensor(
            node.op, node.const.get("over"))
    if node.kind is not Kind.OP or node.name in per_tensor:
        return False
    op = node.impl
    if op.has_node_state or op.per_sample or any(p.kind in ("block", "signals") for p in op.params):
        return False
    const = prog.const_args(node.name, at_defaults=False)
    if sharded and op.reduction(const) is not None:
        return False
    return op.flat_ok(const)


def _global_reduction(n: Node) -> bool:
    """Whether ``n`` reduces over the whole route (a ``global`` op or a route-wide reduction)."""
    if n.is_op:
        return n.impl.reduction(n.args) == "global"
    return n.kind is Kind.ARITH and prims.is_reduction(n.op)


def _kept_across(prog: "Program", n: Node, src: str, run: list[Node], users: dict[str, set[str]]) -> bool:
    """Whether the run's value ``src``, reduced over the route by ``n``, must be kept until after
    the reduction: read again by ``n`` itself (an op such as ``clip_median`` reduces its input,
    then scales it) or by another node. A state buffer is kept anyway (it is written), and a
    value only the reduction reads is fused into its loop."""
    if not any(m.name == src for m in run) or prog.node_buffers(src):
        return False
    return n.is_op or len(users.get(src, ())) > 1


def plan_route(prog: "Program", order: Sequence[str] | None = None, label: str | None = None,
               ir: "RouteIR | None" = None, sharded: bool = False) -> list[tuple[str, Any]]:
    """The route as ``("eager", node name)`` and ``("segment", Segment)`` items in evaluation
    order.

    A global reduction of a value the current run computes and that is read again after it
    (:func:`_kept_across`; not a state buffer, which is written anyway) starts a new
    segment: the value crosses into a flat buffer the backend reuses every step. Left in one
    segment, Inductor realises it across the reduction in a buffer it allocates on every
    call, and at 10M parameters a fresh 40 MB block page-faults on first touch. Scalpel
    (``project_orthogonal(ema) | clip_median | scale(diffgrad)``), 10M parameters, one
    thread, interleaved in one process, 2026-12-06: 7.1x torch's fused Adam in one segment,
    4.6x cut before ``clip_median`` (5.5x when the EMA, a state buffer, was cut out too).

    The route is ``label``'s, or the one of the nodes in ``order``; ``ir``: plan this
    instead (the point of a ``grad_at``, see ``CompiledRoutes.point``); ``sharded``: for the
    local shards of DTensor parameters, where reductions are not flat (:func:`is_flat`)."""
    if label is None:
        label = prog.node(next(iter(order))).route  # type: ignore[arg-type]
    ir = prog.ir[label] if ir is None else ir
    users: dict[str, set[str]] = {}
    for n in ir.all_nodes():
        for src in n.inputs.values():
            users.setdefault(src, set()).add(n.name)
    items: list[tuple[str, Any]] = []
    run: list[Node] = []
    position = {n.name: i for i, n in enumerate(ir.nodes)}
    new_value = dict(ir.commits)
    per_tensor = per_tensor_values(ir.nodes)

    def close() -> None:
        if not run:
            return
        members = {n.name for n in run}
        inputs: list[str] = []
        for n in run:
            for src in n.inputs.values():
                if src not in members and src not in inputs:
                    inputs.append(src)
        # a cell commits at the segment's end when its new value is known there: computed in
        # it or before it (else after the route, see ``RouteIR.commits``)
        commits = [(n.name, new_value[n.name]) for n in run if n.name in new_value and
                   (new_value[n.name] in members or position[new_value[n.name]] < position[run[0].name])]
        for _, new in commits:
            if new not in members and new not in inputs:
                inputs.append(new)
        outputs = [n.name for n in run if (users.get(n.name, set()) - members) - {ir.output.name}
                   or n.name == ir.update or n.name in new_value.values() and
                   not any(new == n.name for _, new in commits)]
        reads = any(n.is_op and n.impl.reads_param for n in run)
        items.append(("segment", Segment([n.name for n in run], tuple(run), inputs, outputs, reads,
                                         commits=commits)))
        run.clear()

    for n in ir.nodes:
        if n.kind in (Kind.SOURCE, Kind.OUTPUT):
            continue  # sources are values handed in, not work
        if is_flat(prog, n, per_tensor, sharded):
            if run and _global_reduction(n) and any(_kept_across(prog, n, src, run, users) for src in n.inputs.values()):
                close()  # its input crosses the cut into a buffer reused every step (see the docstring)
            run.append(n)
        else:
            close()
            items.append(("eager", n.name))
    close()
    final = ir.update
    for kind, item in items:
        # the update may also feed nodes of its own segment (a state cell's new value, as in
        # Adadelta): they read it before the segment applies it
        if kind == "segment" and final in item.nodes and users.get(final, set()) - set(item.nodes) == {ir.output.name}:
            item.final = final
    return items


@dataclass(frozen=True)
class RouteCost:
    """The compiled backend's plan for one route and its memory traffic per parameter."""

    segments: int
    eager_nodes: list[str]
    kernels: int
    bytes_per_param: int
    #: what the non-finite check reads per parameter (each gradient once more), not in ``bytes_per_param``
    check_bytes_per_param: int = 0
    #: whether that check runs inside the fused kernel (:func:`fused_check`), not as a pass before it
    check_fused: bool = False


def gradient_reads(prog: "Program", label: str) -> int:
    """How many gradients a step hands the route: ``grad``, ``grad_at`` and each ``grads.<loss>``
    it reads (per-example ``samples`` not counted)."""
    return sum(1 for s in prog.ir[label].sources() if s.op in ("grad", "grad_at") or s.op.startswith("grads."))


def least_traffic(prog: "Program", label: str, shape: Sequence[int], itemsize: int = 4) -> float:
    """Bytes per parameter of ``shape`` that one step of the route must move at least, from its
    math alone (the roofline model of ``docs/benchmarks.md``, which ``gradpipe bench`` divides by
    the measured bandwidth): read each gradient the route reads (``grad``, ``grad_at``, each
    ``grads.<loss>``) and the parameter, write the parameter, and read and write every state
    element (``state_numel``, at the projected shape inside ``galore``-like blocks). Adam: 28.
    A lower bound: a global reduction needs a second pass, and matrix products and
    eigendecompositions are work this does not count."""
    n = max(1, math.prod(shape))
    return itemsize * (max(gradient_reads(prog, label), 1) + 2) + 2 * itemsize * prog.state_numel(label, tuple(shape)) / n


def fused_check(prog: "Program", label: str) -> bool:
    """Whether a planned step of the compiled backend runs the non-finite check inside the
    route's fused kernel: the kernel first reduces its gradient inputs to one flag,
    ``all(isfinite(g))`` (one pass; ``sum(0 * g)`` would be as exact, but Inductor folds ``0 * g``
    to 0), then writes the state and a parameter it updates in place only where
    the flag allows (``where(ok, new, old)``, which writes back the old bits). That takes the
    whole step being one compiled call over every gradient the check reads: the check is on and
    does not also check the update (``skip_nonfinite(updates=true)``), the program has one route,
    whose plan is a single fused segment, and it reads no ``grad_at``. Elsewhere the check is a
    reduction over the gathered gradient buffers before the kernels (``runtime/nonfinite.py``)."""
    if not prog.nonfinite.check or prog.nonfinite.updates or len(prog.routes) != 1 or label not in prog.ir \
            or prog.ir[label].grad_at is not None:
        return False
    plan = plan_route(prog, label=label)
    if len(plan) != 1 or plan[0][0] != "segment":
        return False
    srcs = [prog.node(s) for s in plan[0][1].inputs]
    return any(n.op == "grad" for n in srcs) and all(n.kind is Kind.SOURCE and n.op in ("grad", "param") for n in srcs)


def route_cost(prog: "Program", label: str, itemsize: int = 4) -> RouteCost:
    """Bytes read and written per parameter per step by the compiled backend (at the
    hyperparameters' defaults), as the sum over the plan: a fused segment reads each
    input once, reads and writes each state buffer once, and either writes its outputs
    or (the last one) reads and writes the parameter; an eager node reads its inputs and
    writes its result, and feeding a segment costs a gather (a copy). Every global
    reduction adds a pass (a kernel) over its input. A route that gives the parameter's new
    value (``param = EXPR``) writes the parameter without reading it for the update (a read
    for its math is an input of the segment like any other). Under ``skip_nonfinite(updates=true)``
    a fused segment writes its new state next to the old (no more bytes), a parameter it
    updates in place is copied first (read and written), an eager node's state is copied
    before the step (read and written), and an update not checked inside a kernel is read
    once more (``gradpipe/runtime/rollback.py``)."""
    plan = plan_route(prog, label=label)
    writes_param = prog.ir[label].writes_param
    undo = prog.nonfinite.check and prog.nonfinite.updates  # copies of what the step writes
    per_tensor = per_tensor_values(prog.ir[label].nodes)
    total = kernels = segments = 0
    eager: list[str] = []
    produced_eager: set[str] = set()
    fused_update = False
    for kind, item in plan:
        if kind == "eager":
            n = prog.node(item)
            eager.append(item)
            kernels += 1
            produced_eager.add(item)
            if item in per_tensor:  # a few numbers per tensor: a reduction reads its operands, nothing else counts
                total += sum(src not in per_tensor for src in n.inputs.values()) if prims.is_reduction(n.op) else 0
                continue
            total += len(n.inputs) + 1 + (4 if undo else 2) * len(prog.node_buffers(item))
            if n.is_op and n.impl.needs_param(prog.const_args(item)):
                total += 1
            continue
        segments += 1
        kernels += 1
        for src in item.inputs:
            total += 1 + (2 if src in produced_eager else 0)
        reads_param = False
        for n in item.members:
            total += 2 * len(prog.node_buffers(n.name))
            if n.is_op:
                reads_param |= n.impl.needs_param(prog.const_args(n.name))
                if n.impl.reduction(n.args) == "global":
                    kernels += 1
            elif prims.is_reduction(n.op):  # a reduction in a fused segment is over the route
                kernels += 1
        outs = [n for n in item.outputs if n != item.final]
        total += len(outs)
        if item.final is not None:
            # read and write the parameter (a read for the math is the same read); param = EXPR: write it
            total += (1 if writes_param else 2) + 2 * undo
            fused_update = True
        elif reads_param:
            total += 1
    if not fused_update:  # the optimizer applies p <- p - lr * u: read u and p, write p (p <- value: 2)
        total += (2 if writes_param else 3) + undo  # (and the check reads u)
    checked = 0
    if prog.nonfinite.check:  # each gradient the step hands the route, read once more
        checked = gradient_reads(prog, label)
    return RouteCost(segments, eager, kernels, total * itemsize, checked * itemsize, fused_check(prog, label))
