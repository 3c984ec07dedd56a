"""When a route needs a node's value: the branches of ``where`` on a per-step condition.

``where(step % k == 1, matrix_power(left, -0.25, eps), inverse)`` needs the matrix power
only in the steps whose condition holds. :func:`branch_guards` works out, for each node that
runs tensor by tensor (a matrix function, a per-tensor reduction, arithmetic on their values:
``lowering.per_tensor_values``), the scalar conditions under which some reader takes it: a
set of conjunctions of ``(condition, taken)`` pairs, each condition a scalar expression of
hyperparameters and ``step``. The backends skip such a node in a step where no conjunction
holds for any of its parameters (:func:`needed`), so a preconditioner refreshed every ``k``
steps costs its eigendecomposition once per ``k`` steps. A node is always computed when a
reader outside that set reads it (a fused segment reads every input), when an op, the
update, a cell's new value or a block reads it, or when its conditions grow past
:data:`MAX_TERMS` conjunctions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .ir import Kind, Node, RouteIR, is_scalar

__all__ = ["Guard", "branch_guards", "route_guards", "needed", "MAX_TERMS"]

#: a node's guard: the conjunctions of ``(condition, taken)`` of which one must hold
Guard = frozenset[tuple[tuple[Any, bool], ...]]
#: more conjunctions than this and the node is computed in every step
MAX_TERMS = 16


def branch_guards(ir: RouteIR, per_tensor: set[str] | frozenset[str]) -> dict[str, Guard]:
    """For each node of ``ir`` that may be skipped in some steps, its guard (nodes computed in
    every step are not in the result). ``per_tensor``: the route's per-tensor nodes."""
    users: dict[str, list[tuple[Node, str]]] = {}
    for n in ir.all_nodes():
        for port, src in n.inputs.items():
            users.setdefault(src, []).append((n, port))
    always = {ir.update} | {new for _, new in ir.commits}
    guards: dict[str, Guard] = {}
    for n in reversed(ir.nodes):
        if n.kind is not Kind.ARITH or n.name not in per_tensor or n.name in always:
            continue
        terms: set[tuple[tuple[Any, bool], ...]] = set()
        for u, port in users.get(n.name, ()):
            if u.block is not None or u.kind is not Kind.ARITH or u.name not in per_tensor:
                break  # an op, the output, a block or a fused segment reads it: every step
            base = guards.get(u.name)
            conj: set[tuple[tuple[Any, bool], ...]] = set(base) if base is not None else {()}
            cond = u.args.get("cond")
            if u.op == "where" and is_scalar(cond) and port in ("lhs", "rhs") and \
                    u.inputs.get("lhs") != u.inputs.get("rhs"):
                conj = {c + ((cond, port == "lhs"),) for c in conj}
            if () in conj:
                break
            terms |= conj
            if len(terms) > MAX_TERMS:
                break
        else:
            if terms:
                guards[n.name] = frozenset(terms)
    return guards


def needed(guard: Guard, envs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some parameter (one environment per parameter: hyperparameters, ``lr``,
    ``step``) takes a branch that reads the node this step. A condition that cannot be
    computed counts as taken (the node is computed, and the reader reports the problem)."""
    seen: set[int] = set()
    for env in envs:
        if id(env) in seen:
            continue
        seen.add(id(env))
        for conj in guard:
            try:
                if all(bool(cond.eval(env)) == taken for cond, taken in conj):
                    return True
            except (ZeroDivisionError, OverflowError, TypeError, ValueError, KeyError):
                return True
    return False


def route_guards(prog: Any, ir: RouteIR) -> dict[str, Guard]:
    """:func:`branch_guards` of a program's route, worked out once per program and route."""
    cache = prog.__dict__.setdefault("_branch_guards", {})
    key = (ir.label, ir.update)  # a route, or the part of it that computes a grad_at point
    out = cache.get(key)
    if out is None:
        from .lowering import per_tensor_values
        out = cache[key] = branch_guards(ir, per_tensor_values(ir.nodes))
    return out
