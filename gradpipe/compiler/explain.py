"""``gradpipe explain``: what a compiled pipeline does, node by node, and what it costs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import prims
from . import scalars as S
from .ir import Kind
from .lowering import plan_route, route_cost

if TYPE_CHECKING:
    from .program import Program


#: shapes for which ``explain`` reports the state of pipelines that project (``galore``):
#: a LLaMA-7B attention matrix, an MLP matrix, and a bias vector
EXAMPLE_SHAPES: tuple[tuple[int, ...], ...] = ((4096, 4096), (4096, 11008), (4096,))


def _arg_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _bool_text(x) -> str:
    """A boolean built of ``where`` (as the compiler writes and/or/not) in words."""
    if isinstance(x, S.FnS) and x.fn == "where":
        c, a, b = x.args
        t, f = S.Const(True), S.Const(False)
        if a == t and b == f:
            return _bool_text(c)
        if a == f and b == t:
            return f"not {_bool_text(c)}"
        if b == f:
            return _bool_text(c) if a == t else f"({_bool_text(c)} and {_bool_text(a)})"
        if a == t:
            return f"({_bool_text(c)} or {_bool_text(b)})"
    return "true" if x == S.Const(True) else "false" if x == S.Const(False) else str(x)


def describe_node(prog: "Program", node: str) -> str:
    n = prog.node(node)
    ins = n.inputs
    if n.kind is Kind.SOURCE:
        return f"source {n.op}"
    if n.kind is Kind.BLOCK_IN:
        return f"input of the {{ ... }} block of {n.block}"
    if n.kind is Kind.OUTPUT:
        if n.args.get("param"):
            return f"new parameter = {ins.get('x')}   (p <- value)"
        return f"update u = {ins.get('x')}   (p <- p - lr * u)"
    if n.kind is Kind.ARITH:
        args = dict(n.args)
        cond = args.get("cond") if n.op == "where" else None
        for port in ("lhs", "rhs"):  # a scalar branch wrapped to be computed only when picked
            inner = args[port].guarded(cond) if cond is not None and isinstance(args.get(port), S.FnS) else None
            if inner is not None:
                args[port] = inner
        return prims.text(n.op, [ins.get(p) or _arg_text(args.get(p)) for p in prims.PORTS[n.op]])
    if n.op == "state":  # a state cell: its first value, then where its new value comes from
        new = dict(prog.ir[n.route].commits).get(node, "?") if n.route in prog.ir else "?"
        first = ins.get("x") if n.args.get("init") is None else _arg_text(n.args["init"])
        keep = n.args.get("keep", True)
        when = "" if keep is True else f"  (kept where {_bool_text(keep)})"
        return f"state cell: {first} at first, then {new}{when}"
    args = ", ".join(f"{k}={_arg_text(v)}" for k, v in n.args.items())
    signals = ", ".join(f"{p}<-{src}" for p, src in ins.items() if p != "x")
    text = f"{n.op}({args})  <- {ins.get('x')}"
    if signals:
        text += f"  [{signals}]"
    return text


def explain(prog: "Program") -> str:
    lines: list[str] = []
    lines.append(f"pipeline {prog.path}  (hash {prog.hash})")
    lines.append("")
    lines.append("hyperparameters:")
    for hp in prog.hyperparams.values():
        rng = f" in {hp.range_text()}" if hp.has_range else ""
        note = "" if hp.declared else "  (implicit)"
        lines.append(f"  {hp.name} = {_arg_text(hp.default)}{rng}{note}")
    for r in prog.routes:
        lines.append("")
        sel = "all parameters" if r.label == "main" else f"route {r.label}"
        lines.append(f"{sel}:")
        width = max(len(n) for n in prog.route_nodes(r.label))
        # buffers the size of the parameter, or state of another size (projections, per-cluster values)?
        projected = _projected(prog, r.label)
        for n in prog.route_nodes(r.label):
            bufs = prog.node_buffers(n)
            state = ""
            if bufs:
                state = f"   state: {', '.join(bufs)}"
                if not projected:
                    state += f" ({4 * len(bufs)} B/param)"
            lines.append(f"  {n.ljust(width)}  {describe_node(prog, n)}{state}")
        if projected:
            for shape in EXAMPLE_SHAPES:
                nbytes = 4 * prog.state_numel(r.label, shape) / math.prod(shape)
                what = "x".join(map(str, shape))
                lines.append(f"  state for a {what} {'matrix' if len(shape) == 2 else 'vector'}: "
                             f"{nbytes:.3g} bytes per parameter in fp32")
        else:
            nbytes = prog.state_bytes_per_param(r.label)
            lines.append(f"  state: {nbytes} bytes per parameter in fp32 "
                         f"({nbytes // 4} buffer{'s' if nbytes != 4 else ''} of the parameter's size)")
    lines.append("")
    lines.append("compiled backend (the default; per route):")
    for r in prog.routes:
        cost = route_cost(prog, r.label)
        eager = f"; op by op: {', '.join(n.rsplit('/', 1)[-1] for n in cost.eager_nodes)}" if cost.eager_nodes else ""
        lines.append(f"  {r.label}: {cost.segments} fused segment{'s' if cost.segments != 1 else ''}{eager}; "
                     f"about {cost.kernels} kernel{'s' if cost.kernels != 1 else ''}; "
                     f"{cost.bytes_per_param} bytes read and written per fp32 parameter per step "
                     + ("(with the copies skip_nonfinite(updates=true) keeps; " if prog.nonfinite.updates else "(")
                     + "torch's fused Adam: 28)")
        lines.append(_roofline_line(prog, r.label, cost))
        if cost.check_bytes_per_param:
            lines.append(f"  {r.label}: + {cost.check_bytes_per_param} bytes per fp32 parameter for the non-finite "
                         "check (each gradient read once more), "
                         + ("inside the fused kernel" if cost.check_fused else "a reduction before the kernels"))
        if prog.ir[r.label].grad_at is not None:
            plan = plan_route(prog, label=r.label, ir=prog.ir[r.label].point_ir())
            segs = sum(kind == "segment" for kind, _ in plan)
            alone = [item.rsplit("/", 1)[-1] for kind, item in plan if kind == "eager"]
            lines.append(f"  {r.label}: first, the point of grad_at: {segs} fused segment{'s' if segs != 1 else ''}"
                         + (f"; op by op: {', '.join(alone)}" if alone else "")
                         + "; then the closure's second call, and the above")
    lines.append("")
    red = prog.reductions()
    lines.append("reductions:" + ("" if red else " none (every op is elementwise per tensor)"))
    for n, scope in red:
        what = {"global": "over every tensor of its route", "rows": "along each row (the last dim) of each tensor",
                "cols": "along each column (dim -2) of each tensor"}.get(scope, "within each tensor")
        node = prog.node(n)
        if node.kind is Kind.ARITH:
            lines.append(f"  {n}: {describe_node(prog, n)} reduces {what}")
        else:
            lines.append(f"  {n}: {node.op} reduces {what} (scope={scope})")
    lines.append("")
    lines.append("optimisations:")
    if not (prog.merged or prog.folded or prog.removed):
        lines.append("  none applied")
    for removed, kept in prog.merged:
        stateful = bool(prog.node_buffers(kept))
        lines.append(f"  CSE: {removed} merged into {kept}" + (" (one state buffer instead of two)" if stateful else ""))
    for f in prog.folded:
        lines.append(f"  folded: {f}")
    for n in prog.removed:
        lines.append(f"  dead: {n} removed (nothing reads it)")
    uses = sorted(prog.reads | {f"grads.{l}" for l in prog.losses})
    lines.append("")
    lines.append(f"reads: {', '.join(uses)}")
    return "\n".join(lines) + "\n"


def _projected(prog: "Program", label: str) -> bool:
    """Whether the route keeps state of another size than its parameter's for some example shape
    (projections, per-row values): then its state and traffic are given per example shape."""
    nbuf = prog.state_bytes_per_param(label) // 4
    return any(prog.state_numel(label, shape) != nbuf * math.prod(shape) for shape in EXAMPLE_SHAPES)


def _roofline_line(prog: "Program", label: str, cost: "RouteCost") -> str:
    """The route's roofline (``lowering.least_traffic``): the least bytes per parameter its math
    must move, and what that does not count."""
    from .lowering import least_traffic
    if _projected(prog, label):
        least = ", ".join(f"{least_traffic(prog, label, s):.3g}" + (" bytes per fp32 parameter" if i == 0 else "")
                          + f" for a {'x'.join(map(str, s))} matrix"
                          for i, s in enumerate(s for s in EXAMPLE_SHAPES if len(s) == 2))  # projected state
    else:
        least = f"{least_traffic(prog, label, EXAMPLE_SHAPES[0]):.3g} bytes per fp32 parameter"
    passes = sum(1 for n, scope in prog.reductions() if scope == "global" and n.startswith(f"{label}/"))
    missing = ([f"the extra passes of {passes} global reduction{'s' if passes != 1 else ''}"] if passes else []) + \
        ([f"the work of {', '.join(n.rsplit('/', 1)[-1] for n in cost.eager_nodes)}"] if cost.eager_nodes else [])
    return (f"  {label}: roofline, the least traffic of its math: {least}"
            + (f" (not counted: {'; '.join(missing)})" if missing else ""))
