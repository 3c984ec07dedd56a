"""The eager interpreter: the reference semantics of a Program.

One route is evaluated node by node in topological order over the tensors it
covers, each op running its per-tensor torch math (:meth:`Op.apply`). Compiled
backends must match what this computes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch

from ..compiler import scalars as S
from ..compiler.ops import OPS, NodeCtx
from ..compiler.ops.base import InnerNode
from ..compiler.program import Program
from ..dsl.diagnostics import GradError, Span

__all__ = ["RouteBatch", "run_route", "eval_args"]


class RouteBatch:
    """The tensors of one route in one step.

    params: the parameters (any float dtype); grads: their gradients (or
    ``grads.<loss>`` for multi-loss pipelines); shared: per parameter, whether every
    loss reaches it (None for a single loss); envs: per parameter, the
    hyperparameter values of its group plus ``lr``, ``step`` and ``loss``;
    states: per parameter, its optimizer state dict (buffers are stored under
    ``node.buffer``).
    """

    def __init__(self, params: Sequence[torch.Tensor], grads: Mapping[str, Sequence[torch.Tensor]],
                 envs: Sequence[Mapping[str, Any]], states: Sequence[dict[str, Any]],
                 shared: Sequence[bool] | None = None) -> None:
        self.params = list(params)
        self.grads = grads
        self.envs = list(envs)
        self.states = list(states)
        self.shared = list(shared) if shared is not None else None


_COMPUTE_DTYPE: dict[torch.dtype, torch.dtype] = {}


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """State and math run in fp32 for half-precision parameters, else in the parameter's dtype."""
    dt = _COMPUTE_DTYPE.get(p.dtype)
    if dt is None:  # called per parameter per step: remember the answer per dtype
        dt = _COMPUTE_DTYPE[p.dtype] = torch.promote_types(p.dtype, torch.float32)
    return dt


_SCALAR_TYPES = (S.Const, S.HP, S.Src, S.BinS, S.NegS)


def eval_args(args: Mapping[str, Any], env: Mapping[str, Any], span: Any = None, op: str = "") -> SimpleNamespace:
    """Evaluate a node's arguments in one parameter's environment.

    An argument that cannot be computed in this step (``1 / (step - 1)`` at step
    1) is a GradError at the node's location.
    """
    out = {}
    for k, v in args.items():
        if isinstance(v, _SCALAR_TYPES):
            try:
                out[k] = v.eval(env)
            except (ZeroDivisionError, OverflowError, TypeError) as e:
                raise GradError(f"argument '{k}' of '{op}' cannot be computed at step {env.get('step')}: {e}",
                                span or Span(), "make the expression defined at every step") from None
        else:
            out[k] = v
    return SimpleNamespace(**out)


def const_args(args: Mapping[str, Any]) -> SimpleNamespace:
    """The arguments known when the pipeline compiles (enough to create node state)."""
    return SimpleNamespace(**{k: (v.value if isinstance(v, S.Const) else v) for k, v in args.items()
                              if not isinstance(v, _SCALAR_TYPES) or isinstance(v, S.Const)})


class _NodeStateView(dict):
    """A per-parameter view of one node's buffers inside the parameter's state dict."""

    def __init__(self, store: dict[str, Any], prefix: str) -> None:
        super().__init__({k[len(prefix):]: v for k, v in store.items() if k.startswith(prefix)
                          and "." not in k[len(prefix):]})
        self._store, self._prefix = store, prefix

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._store[self._prefix + key] = value


def run_route(prog: Program, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]],
              order: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Evaluate one route; return the update ``u`` per parameter (in the compute dtype)."""
    order = order if order is not None else prog.route_nodes(label)
    ev = _Evaluator(prog, batch, node_states)
    values: dict[str, list[torch.Tensor]] = {}
    for node in order:
        d = prog.graph.nodes[node]
        if d.get("block") is not None:
            continue  # evaluated by its block op, on the values that op hands it
        if d["kind"] == "output":
            return values[prog.inputs(node)["x"]]
        ev.eval(node, values)
    raise RuntimeError(f"route {label!r} has no output")  # pragma: no cover


class _Evaluator:
    """Evaluates nodes of one route in one step (shared by the route and by the blocks in it)."""

    def __init__(self, prog: Program, batch: RouteBatch, node_states: dict[str, dict[str, Any]]) -> None:
        self.prog, self.batch, self.node_states = prog, batch, node_states
        self._cparams: list[torch.Tensor] | None = None
        self.steps = [int(e["step"]) for e in batch.envs]

    @property
    def cparams(self) -> list[torch.Tensor]:
        """The parameters, detached, in the compute dtype (made when a node first needs them)."""
        if self._cparams is None:
            self._cparams = [p.detach().to(compute_dtype(p)) for p in self.batch.params]
        return self._cparams

    def eval(self, node: str, values: dict[str, list[torch.Tensor]]) -> None:
        prog, batch = self.prog, self.batch
        d = prog.graph.nodes[node]
        kind = d["kind"]
        ins = prog.inputs(node)
        if kind == "source":
            src = d["op"]
            if src == "param":
                values[node] = self.cparams
            else:
                values[node] = [t.to(compute_dtype(p)) for t, p in zip(batch.grads[src], batch.params)]
        elif kind == "op":
            op = OPS[d["op"]]
            args = _node_args(d, batch.envs)
            if node not in self.node_states:
                self.node_states[node] = op.init_node_state(const_args(d["args"]))
            blocks = [p.name for p in op.params if p.kind == "block"]
            inner, inner_nodes = self._block_hooks(node, blocks, values) if blocks else (None, None)
            ctx = NodeCtx(inputs={port: values[src] for port, src in ins.items() if port not in blocks}, args=args,
                          states=[_NodeStateView(st, node + ".") for st in batch.states],
                          steps=self.steps, params=self.cparams, node_state=self.node_states[node],
                          shared=batch.shared, inner=inner, inner_nodes=inner_nodes)
            values[node] = op.apply(ctx)
        elif kind == "arith":
            values[node] = _arith(d, ins, values, batch.envs)
        else:  # pragma: no cover - block inputs are set by run_block, outputs read by run_route
            raise RuntimeError(f"cannot evaluate node {node!r} of kind {kind!r}")

    def _block_hooks(self, node: str, blocks: list[str], values: dict[str, list[torch.Tensor]]):
        """``ctx.inner`` and ``ctx.inner_nodes`` for a block op (the first block argument runs)."""
        def inner(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            return self.run_block(node, blocks[0], xs, values)

        def inner_nodes() -> list[InnerNode]:
            return self.inner_nodes(node)
        return inner, inner_nodes

    def inner_nodes(self, node: str) -> list[InnerNode]:
        """The op nodes of ``node``'s block with their arguments and per-parameter state."""
        out = []
        for n in self.prog.block_order(node):
            d = self.prog.graph.nodes[n]
            if d["kind"] == "op":
                out.append(InnerNode(n, OPS[d["op"]], _node_args(d, self.batch.envs),
                                     [_NodeStateView(st, n + ".") for st in self.batch.states]))
        return out

    def run_block(self, node: str, port: str, xs: list[torch.Tensor],
                  outer: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """Run the sub-pipeline of ``node``'s ``port`` block on ``xs`` (one tensor per parameter)."""
        values = dict(outer)
        entry = f"{node}/{port}"
        values[entry] = list(xs)
        for n in self.prog.block_order(node):
            if n != entry:
                self.eval(n, values)
        return values[self.prog.inputs(node)[port]]


def _node_args(d: Mapping[str, Any], envs: Sequence[Mapping[str, Any]]) -> list[SimpleNamespace]:
    """Arguments per parameter, evaluated once per distinct environment (param group and step)."""
    cache: dict[int, SimpleNamespace] = {}
    out = []
    for env in envs:
        a = cache.get(id(env))
        if a is None:
            a = cache[id(env)] = eval_args(d["args"], env, d["span"], d["op"])
        out.append(a)
    return out


def _arith(d: Mapping[str, Any], ins: Mapping[str, str], values: Mapping[str, list[torch.Tensor]],
           envs: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    op = d["op"]
    out = []
    for i, env in enumerate(envs):
        def side(port: str):
            if port in ins:
                return values[ins[port]][i]
            try:
                return d["args"][port].eval(env)
            except (ZeroDivisionError, OverflowError) as e:
                raise GradError(f"'{d['op']}' cannot be computed at step {env.get('step')}: {e}", d["span"],
                                "make the expression defined at every step") from None
        lhs = side("lhs")
        if op == "neg":
            out.append(-lhs)
            continue
        rhs = side("rhs")
        if op == "+":
            out.append(lhs + rhs)
        elif op == "-":
            out.append(lhs - rhs)
        elif op == "*":
            out.append(lhs * rhs)
        elif op == "/":
            out.append(lhs / rhs)
        else:
            out.append(lhs ** rhs)
    return out
