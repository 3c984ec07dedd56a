"""``Optimizer.eval()`` and ``Optimizer.train()``: the pipeline's ``eval:`` and ``train:`` sequences.

Each writes its expression (:class:`~gradpipe.compiler.modes.ModeSeq`) into every parameter
of the param-form routes that has the state the expression reads (a parameter that has not
been stepped yet keeps its value, as schedulefree's ``eval()`` leaves a parameter without
``z``). Every new value is computed before any parameter is written, so an error leaves every
parameter as it was. The math runs in the parameter's compute dtype (float32 for half
precision) and is rounded once, as a step's. It is not a step: no counter moves, no state
changes. Both backends run it here, eagerly: it happens once per switch, not per step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..compiler.modes import ModeSeq
from ..dsl import ast
from .interpret import compute_dtype

__all__ = ["mode_values"]

_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
          "**": lambda a, b: a ** b, "%": lambda a, b: a % b,
          "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
          "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _t(x: Any, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype, device=like.device)


def _math(fn: str, args: list[Any], like: torch.Tensor) -> Any:
    if not any(isinstance(a, torch.Tensor) for a in args):  # numbers: Python's float math
        if fn == "where":
            return args[1] if args[0] else args[2]
        if fn == "sign":
            return float((args[0] > 0) - (args[0] < 0))
        if fn == "clamp":
            return min(max(args[0], args[1]), args[2])
        return {"abs": abs, "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "max": max, "min": min}[fn](*args)
    if fn == "where":
        return torch.where(_t(args[0], like).bool(), _t(args[1], like), _t(args[2], like))
    if fn in ("max", "min", "clamp"):
        x = _t(args[0], like)
        if fn == "clamp":
            return torch.minimum(torch.maximum(x, _t(args[1], like)), _t(args[2], like))
        return (torch.maximum if fn == "max" else torch.minimum)(x, _t(args[1], like))
    return getattr(torch, fn)(_t(args[0], like))


def _value(e: ast.Expr, seq: ModeSeq, env: Mapping[str, Any], like: torch.Tensor) -> Any:
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Neg):
        return -_value(e.operand, seq, env, like)
    if isinstance(e, ast.BinOp):
        return _ARITH[e.op](_value(e.left, seq, env, like), _value(e.right, seq, env, like))
    if isinstance(e, ast.Index):
        return env[e.base.dotted][e.index]  # type: ignore[union-attr]
    if isinstance(e, ast.Call):
        return _math(e.func.dotted, [_value(a, seq, env, like) for a in e.args], like)
    name = e.dotted  # type: ignore[union-attr]
    if name in seq.lets:
        return _value(seq.lets[name], seq, env, like)
    v = env[name]
    return v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 and name not in ("param",) else v


def mode_values(seq: ModeSeq, items: list[tuple[torch.Tensor, Mapping[str, Any], str, Mapping[str, Any]]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The new value of each parameter under ``seq``: ``items`` are ``(p, group, route, state)``;
    returns ``(p, value)`` for each parameter that has the cells ``seq`` reads, nothing written."""
    out = []
    for p, group, route, state in items:
        cells = seq.cells.get(route)
        if cells is None:  # a route that gives the update u: its parameters stay
            continue
        keys = {name: node + ".value" for name, node in cells.items()}
        if any(k not in state for k in keys.values()) or (not keys and "step" not in state):
            continue  # not stepped yet: nothing to switch
        if p.is_complex():  # stepped as its real and imaginary parts, so its state has their shape
            p = torch.view_as_real(p)
        dt = compute_dtype(p)
        x = p.detach().to(dt)
        env: dict[str, Any] = dict(group)
        env.update({name: state[k].to(dt) for name, k in keys.items()})
        env["param"] = x
        v = _value(seq.expr, seq, env, x)
        out.append((p, _t(v, x).expand_as(x)))
    return out
