"""The eager interpreter: the reference semantics of a Program.

One route is evaluated node by node, in the order of its IR, over the tensors it
covers: a lane per parameter (:class:`ParamLanes`), each op running its per-tensor
torch math through the shared interpreter (:func:`~gradpipe.runtime.interpret.eval_node`).
The compiled backend runs the same interpreter over flat buckets and must match what
this computes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor  # FSDP2's parameters
except ImportError:  # a torch built without torch.distributed
    DTensor = ()  # type: ignore[assignment,misc]  # isinstance(x, ()) is False

from ..compiler.guards import needed, route_guards
from ..compiler.ir import Kind, Node, RouteIR
from ..compiler.ops import Args, InnerNode
from ..compiler.program import Program
from ..dsl.diagnostics import GradError
from .interpret import Lanes, commit_cells, compute_dtype, eval_dynamic, eval_node, structural_args

__all__ = ["RouteBatch", "ParamLanes", "run_route", "eval_point", "evaluate", "compute_dtype", "NodeStateView",
           "init_node_states"]


class RouteBatch:
    """The tensors of one route in one step.

    params: the parameters (any float dtype); grads: their gradients (or
    ``grads.<loss>`` for multi-loss pipelines); shared: per parameter, whether every
    loss reaches it (None for a single loss); envs: per parameter, the
    hyperparameter values of its group plus ``lr``, ``step`` and ``loss``;
    states: per parameter, its optimizer state dict (buffers are stored under
    ``node.buffer``).
    """

    #: the compiled backend's batch of DTensor parameters' local shards (FSDP2): per parameter, the
    #: DTensor whose shard ``params`` holds (None for a plain tensor); None when none is a DTensor
    sharded: list[Any] | None = None

    def __init__(self, params: Sequence[torch.Tensor], grads: Mapping[str, Sequence[torch.Tensor]],
                 envs: Sequence[Mapping[str, Any]], states: Sequence[dict[str, Any]],
                 shared: Sequence[bool] | None = None) -> None:
        self.params = list(params)
        self.grads = grads
        self.envs = list(envs)
        self.states = list(states)
        self.shared = list(shared) if shared is not None else None


class NodeStateView(dict):
    """A per-parameter view of one node's buffers inside the parameter's state dict
    (``state[p]["main/adam.m"]`` is ``view["m"]``); what an op is handed as its state."""

    def __init__(self, store: dict[str, Any], prefix: str) -> None:
        super().__init__({k[len(prefix):]: v for k, v in store.items() if k.startswith(prefix)
                          and "." not in k[len(prefix):]})
        self._store, self._prefix = store, prefix

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._store[self._prefix + key] = value


def init_node_states(node: Node, views: Sequence[dict[str, torch.Tensor]], xs: Sequence[torch.Tensor],
                     structural: Sequence[Mapping[str, Any]], params: Sequence[torch.Tensor]) -> list[bool]:
    """Create, in each view, the buffers ``node``'s op declares for these arguments that are not
    there yet (``Op.init``, for the op's input ``xs[i]``); per view, whether the node's state was
    created now (its first step on that parameter)."""
    op = node.impl
    fresh = []
    for view, x, args, p in zip(views, xs, structural, params):
        wanted = [b.name for b in op.buffers_for(args)]
        missing = [b for b in wanted if b not in view]
        if missing:
            made = op.init(tuple(x.shape), args, compute_dtype(p), x.device)
            if isinstance(x, DTensor):  # FSDP2: the state sharded as the parameter
                made = _sharded_like(node, made, x, args, compute_dtype(p))
            for k in missing:
                if k in made:
                    view[k] = made[k]
        fresh.append(bool(missing) and len(missing) == len(wanted))
    return fresh


def _sharded_like(node: Node, made: dict[str, torch.Tensor], x: torch.Tensor, args: Mapping[str, Any],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``made`` as DTensors on ``x``'s mesh: a buffer of ``x``'s shape sharded as ``x`` (each rank
    creates its own shard, as torch.optim's ``zeros_like(p)`` does), any other (a projection, a
    scalar) replicated whole on every rank."""
    from torch.distributed.tensor import Replicate
    local = x.to_local()
    mine = node.impl.init(tuple(local.shape), args, dtype, local.device)
    out = {}
    for k, t in made.items():
        if tuple(t.shape) == tuple(x.shape) and k in mine:
            out[k] = DTensor.from_local(mine[k], x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                        stride=x.stride())
        else:
            out[k] = DTensor.from_local(t.to(local.device), x.device_mesh, [Replicate()] * x.device_mesh.ndim,
                                        run_check=False)
    return out


class ParamLanes(Lanes):
    """One lane per parameter of a route, for one step: arguments evaluated per parameter group
    (once per distinct group and step), state in the optimizer's per-parameter dicts."""

    def __init__(self, prog: Program, ir: RouteIR, batch: RouteBatch,
                 node_states: dict[str, dict[str, Any]]) -> None:
        self.prog, self.ir, self.batch, self.node_states = prog, ir, batch, node_states
        self.steps = [int(e["step"]) for e in batch.envs]
        self.shared = batch.shared
        self._cparams: list[torch.Tensor] | None = None
        self._args: dict[str, list[Args]] = {}
        self._dynamic: dict[str, list[dict[str, Any]]] = {}

    @property
    def cparams(self) -> list[torch.Tensor]:
        """The parameters, detached, in the compute dtype (made when a node first needs them)."""
        if self._cparams is None:
            self._cparams = [p.detach().to(compute_dtype(p)) for p in self.batch.params]
        return self._cparams

    def dynamic(self, node: Node) -> list[dict[str, Any]]:
        """``node``'s per-step argument values per parameter (computed once per distinct group and step)."""
        out = self._dynamic.get(node.name)
        if out is None:
            cache: dict[int, dict[str, Any]] = {}
            out = []
            for env in self.batch.envs:
                v = cache.get(id(env))
                if v is None:
                    v = cache[id(env)] = eval_dynamic(node, env)
                out.append(v)
            self._dynamic[node.name] = out
        return out

    def args(self, node: Node) -> list[Args]:
        out = self._args.get(node.name)
        if out is None:
            by_id: dict[int, Args] = {}
            out = []
            for dyn in self.dynamic(node):
                a = by_id.get(id(dyn))
                if a is None:
                    a = by_id[id(dyn)] = Args(node.const, **dyn)
                out.append(a)
            self._args[node.name] = out
        return out

    def states(self, node: Node, xs: Sequence[torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], list[Any]]:
        views = [NodeStateView(st, node.name + ".") for st in self.batch.states]
        structural = [structural_args(node, d) for d in self.dynamic(node)]
        fresh = init_node_states(node, views, xs, structural, self.batch.params)
        return views, fresh

    def params(self, node: Node) -> list[torch.Tensor | None]:
        return self.cparams if node.is_op and node.impl.reads_param else [None] * len(self.batch.params)

    def layout(self) -> list[torch.Tensor]:
        return self.batch.params

    def node_state(self, node: Node) -> dict[str, Any]:
        ns = self.node_states.get(node.name)
        if ns is None:
            ns = self.node_states[node.name] = node.impl.init_node_state(Args(node.const))
        return ns

    def inner(self, node: Node, values: dict[str, list[torch.Tensor]]):
        port = next(p.name for p in node.impl.params if p.kind == "block")

        def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            return self.run_block(node, port, xs, values)

        def nodes() -> list[InnerNode]:
            return [InnerNode(n.name, n.impl, self.args(n), [NodeStateView(st, n.name + ".") for st in self.batch.states])
                    for n in self.ir.blocks.get(node.name, ()) if n.is_op]
        return run, nodes

    def run_block(self, node: Node, port: str, xs: list[torch.Tensor],
                  outer: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """Run the sub-pipeline of ``node``'s ``port`` block on ``xs`` (one tensor per parameter)."""
        values = dict(outer)
        for n in self.ir.blocks.get(node.name, ()):
            if n.kind is Kind.BLOCK_IN:
                values[n.name] = list(xs)
            else:
                values[n.name] = eval_node(n, values, self)
        return values[node.inputs[port]]

    def source(self, node: Node) -> list[torch.Tensor]:
        """A source's value per parameter, in the compute dtype."""
        if node.op == "param":
            return self.cparams
        return [t.to(compute_dtype(p)) for t, p in zip(self.batch.grads[node.op], self.batch.params)]


def release_plan(prog: Program, ir: RouteIR) -> list[tuple[str, ...]]:
    """Per top-level node of ``ir`` (in order), the values nothing after it reads: dropped once it
    has run, so a step holds only the values still to be read (not every intermediate of the
    route at once). The update and the cells' new values are kept to the end."""
    cache = prog.__dict__.setdefault("_release_plans", {})  # per program, by route (or a grad_at point's part)
    plan = cache.get((ir.label, ir.update))
    if plan is not None:
        return plan
    keep = {ir.update} | {new for _, new in ir.commits}
    top = {n.name for n in ir.nodes}
    last: dict[str, int] = {}

    def reads(node: Node) -> list[str]:
        out = list(node.inputs.values())
        for inner in ir.blocks.get(node.name, ()):  # a block's pipeline reads outer values too
            out += reads(inner)
        return out
    for i, n in enumerate(ir.nodes):
        for src in reads(n):
            last[src] = i
    drops: list[list[str]] = [[] for _ in ir.nodes]
    for name, i in last.items():
        if name in top and name not in keep:
            drops[i].append(name)
    plan = cache[(ir.label, ir.update)] = [tuple(d) for d in drops]
    return plan


def evaluate(node: Node, values: dict[str, list[torch.Tensor]], lanes: "ParamLanes") -> list[torch.Tensor]:
    """One node's values; what DTensor parameters (FSDP2) cannot run is a GradError naming the op."""
    try:
        return lanes.source(node) if node.kind is Kind.SOURCE else eval_node(node, values, lanes)
    except RuntimeError as e:
        if not any(isinstance(p, DTensor) for p in lanes.batch.params):
            raise
        raise GradError(f"'{node.op}' does not run on DTensor parameters (FSDP2's fully_shard): "
                        f"{str(e).splitlines()[0]}", node.span,
                        "route these parameters to a pipeline without this op, or train this model under "
                        "DDP (which keeps whole parameters)") from e


def run_route(prog: Program, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]],
              order: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Evaluate one route; return the update ``u`` per parameter (in the compute dtype)."""
    ir = prog.ir[label]
    lanes = ParamLanes(prog, ir, batch, node_states)
    values: dict[str, list[torch.Tensor]] = {}
    guards = route_guards(prog, ir)
    for node, drop in zip(ir.nodes, release_plan(prog, ir)):
        if node.kind is Kind.OUTPUT:
            break
        guard = guards.get(node.name)
        if guard is not None and not needed(guard, batch.envs):  # only a branch not taken reads it
            values[node.name] = [None] * len(batch.params)  # type: ignore[list-item]
        else:
            values[node.name] = evaluate(node, values, lanes)
        for name in drop:
            del values[name]
    if ir.commits:  # state cells take their new values
        return commit_cells(ir.commits, values, batch.states, keep=ir.update)  # type: ignore[return-value]
    return values[ir.update]



def eval_point(prog: Program, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]]
               ) -> list[torch.Tensor]:
    """The point of the route's ``grad_at`` per parameter (in the compute dtype): its nodes
    (``RouteIR.point_nodes``, stateless), evaluated op by op before the route runs (the compiled
    backend fuses them instead: ``CompiledRoutes.point``)."""
    ir = prog.ir[label]
    lanes = ParamLanes(prog, ir, batch, node_states)
    values: dict[str, list[torch.Tensor]] = {}
    for node in ir.point_nodes:
        values[node.name] = evaluate(node, values, lanes)
    return values[ir.point]  # type: ignore[index]
