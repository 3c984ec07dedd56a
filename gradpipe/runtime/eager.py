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
from ..compiler.program import Program
from ..dsl.diagnostics import GradError, Span

__all__ = ["RouteBatch", "run_route", "eval_args"]


class RouteBatch:
    """The tensors of one route in one step.

    params: the parameters (any float dtype); grads: their gradients (or
    ``grads.<loss>`` for multi-loss pipelines); envs: per parameter, the
    hyperparameter values of its group plus ``lr``, ``step`` and ``loss``;
    states: per parameter, its optimizer state dict (buffers are stored under
    ``node.buffer``).
    """

    def __init__(self, params: Sequence[torch.Tensor], grads: Mapping[str, Sequence[torch.Tensor]],
                 envs: Sequence[Mapping[str, Any]], states: Sequence[dict[str, Any]]) -> None:
        self.params = list(params)
        self.grads = grads
        self.envs = list(envs)
        self.states = list(states)


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """State and math run in fp32 for half-precision parameters, else in the parameter's dtype."""
    return torch.promote_types(p.dtype, torch.float32)


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
    g = prog.graph
    order = order if order is not None else prog.route_nodes(label)
    values: dict[str, list[torch.Tensor]] = {}
    cparams = [p.detach().to(compute_dtype(p)) for p in batch.params]
    steps = [int(e["step"]) for e in batch.envs]
    for node in order:
        d = g.nodes[node]
        kind = d["kind"]
        ins = prog.inputs(node)
        if kind == "source":
            src = d["op"]
            if src == "param":
                values[node] = cparams
            else:
                key = "grad" if src == "grad" else src
                values[node] = [t.to(compute_dtype(p)) for t, p in zip(batch.grads[key], batch.params)]
        elif kind == "op":
            op = OPS[d["op"]]
            args = _node_args(d, batch.envs)
            if node not in node_states:
                node_states[node] = op.init_node_state(const_args(d["args"]))
            ctx = NodeCtx(inputs={port: values[src] for port, src in ins.items()}, args=args,
                          states=[_NodeStateView(st, node + ".") for st in batch.states],
                          steps=steps, params=cparams, node_state=node_states[node])
            values[node] = op.apply(ctx)
        elif kind == "arith":
            values[node] = _arith(d, ins, values, batch.envs)
        elif kind == "output":
            return values[ins["x"]]
    raise RuntimeError(f"route {label!r} has no output")  # pragma: no cover


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
