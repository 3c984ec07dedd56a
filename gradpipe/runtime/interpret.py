"""The one interpreter of a route's IR, shared by the eager and the compiled backend.

A route runs over *lanes*: one tensor per lane for every node's value. In the eager
backend a lane is a parameter; in a fused segment of the compiled backend a lane is a
flat bucket of parameters (``torch.compile`` traces this same code). What differs
between the two is only where a node's arguments, state and parameters come from,
which a :class:`Lanes` object provides:

* arguments: the eager backend evaluates them per parameter group in Python numbers
  (:func:`eval_dynamic`), the compiled one hands them to its compiled function as 0-d
  tensors (so a changed hyperparameter does not recompile);
* state: created by the runtime from the op's declared buffers (``Op.init``) before the
  node first runs on a lane, never by the op; ``fresh`` tells the op it is that first step;
* parameters: each parameter, or the bucket's flat parameter buffer.

:func:`eval_node` evaluates one node; :func:`apply_update` applies the route's update
``p <- p - lr * u``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Sequence

import torch

from ..compiler.ir import Kind, Node
from ..compiler.ops import Args, InnerNode, NodeCtx
from ..compiler.ops.base import RuntimeFloat
from ..compiler.ops.lowrank import as_matrix
from ..compiler.prims import PORTS, is_matrix, is_reduction, is_shape
from ..compiler.program import inner_sizes_text, needs_matrix_text, not_square_text
from ..dsl.diagnostics import GradError

__all__ = ["Lanes", "eval_node", "arith", "eval_dynamic", "structural_args", "apply_update", "apply_param",
           "compute_dtype", "ARITH", "commit_cells"]


def _signal(*xs: Any) -> torch.Tensor | None:
    """The first signal among ``xs``: a tensor with dimensions (a parameter's values, or a flat
    bucket), else any tensor (a 0-d parameter in the eager backend, where scalars are numbers)."""
    tensors = [x for x in xs if isinstance(x, torch.Tensor)]
    return next((x for x in tensors if x.dim() > 0), tensors[0] if tensors else None)


def _tensors(*xs: Any) -> list[Any]:
    """The operands as tensors: a number (or a 0-d tensor on another device) becomes a 0-d
    tensor like the first signal among them, so ``torch.maximum`` and friends accept it."""
    like = _signal(*xs)
    assert like is not None, "an arithmetic node has a signal operand"
    out = []
    for x in xs:
        if not isinstance(x, torch.Tensor):
            x = torch.tensor(x, dtype=like.dtype, device=like.device)
        elif x is not like and x.dim() == 0 and (x.device != like.device or x.dtype != like.dtype):
            x = x.to(device=like.device, dtype=like.dtype)
        out.append(x)
    return out


def _maximum(a: Any, b: Any) -> torch.Tensor:
    """max(a, b) elementwise (NaN if either is NaN)."""
    return torch.maximum(*_tensors(a, b))


def _minimum(a: Any, b: Any) -> torch.Tensor:
    """min(a, b) elementwise (NaN if either is NaN)."""
    return torch.minimum(*_tensors(a, b))


def _clamp(x: Any, lo: Any, hi: Any) -> torch.Tensor:
    """clamp(x, lo, hi) = min(max(x, lo), hi) elementwise."""
    x, lo, hi = _tensors(x, lo, hi)
    return torch.minimum(torch.maximum(x, lo), hi)


def _where(cond: Any, a: Any, b: Any, like: Any = None) -> Any:
    """``a`` where ``cond`` holds, else ``b``. ``cond`` is a mask (a bool tensor, or a 0/1 float
    tensor where a fused segment stored it), a per-step boolean as a 0-d tensor (compiled
    backend), or a Python boolean or number. ``like``: when both branches are scalars, the
    signal the mask was computed from, whose dtype and device the result takes."""
    ref = _signal(a, b, like)
    if not isinstance(cond, torch.Tensor):
        out = a if cond else b
        if ref is None or out is ref or (isinstance(out, torch.Tensor) and out.dim() > 0):
            return out
        return torch.zeros_like(ref) + _tensors(out, ref)[0]  # a scalar branch, as a signal
    if cond.dtype != torch.bool:
        cond = cond != 0
    a, b, _ = _tensors(a, b, ref)  # a mask choosing between two numbers carries ``like``: ref is a tensor
    return torch.where(cond, a, b)


#: the primitives of ``arith`` nodes (see ``gradpipe.compiler.prims``), on tensors, with
#: numbers or 0-d tensors for the scalar operands
ARITH: dict[str, Callable[..., Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "**": lambda a, b: a ** b, "%": lambda a, b: torch.remainder(*_tensors(a, b)),
    "neg": lambda a: -a,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "abs": torch.abs, "sign": torch.sign, "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log,
    "max": _maximum, "min": _minimum, "clamp": _clamp, "where": _where,
}

_COMPUTE_DTYPE: dict[torch.dtype, torch.dtype] = {}


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """State and math run in fp32 for half-precision parameters, else in the parameter's dtype."""
    dt = _COMPUTE_DTYPE.get(p.dtype)
    if dt is None:  # called per parameter per step: remember the answer per dtype
        dt = _COMPUTE_DTYPE[p.dtype] = torch.promote_types(p.dtype, torch.float32)
    return dt


def _what(node: Node, k: str) -> str:
    return f"argument '{k}' of '{node.op}'" if node.kind is Kind.OP else f"'{node.op}'"


def eval_dynamic(node: Node, env: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The values of ``node``'s per-step arguments in one parameter group's environment
    (hyperparameters, ``lr``, ``step``, ``loss``). Values computed from ``step`` or ``loss``
    are :class:`RuntimeFloat`, so ops never take them for constants. An argument that cannot
    be computed in this step (``1 / (step - 1)`` at step 1, a negative number to a fractional
    power) is a GradError at the node. ``keys``: only these of ``node.dynamic``."""
    out: dict[str, Any] = {}
    for k in node.dynamic if keys is None else keys:
        try:
            v = node.args[k].eval(env)
        except (ZeroDivisionError, OverflowError, TypeError, ValueError) as e:
            raise GradError(f"{_what(node, k)} cannot be computed at step {env.get('step')}: {e}", node.span,
                            "make the expression defined at every step") from None
        if isinstance(v, complex):
            raise GradError(f"{_what(node, k)} is not a real number at step {env.get('step')} ({v:.6g})", node.span,
                            "make the expression real at every step: a fractional power of a number that can be "
                            "negative is complex") from None
        if k in node.per_step and isinstance(v, (int, float)):
            v = RuntimeFloat(v)  # a boolean computed per step is 1.0 or 0.0: one compiled graph for both
        out[k] = v
    return out


def structural_args(node: Node, dynamic: Mapping[str, Any]) -> dict[str, Any]:
    """What an op's state may depend on (``Op.buffers_for``): the node's constants and the
    group-level values among ``dynamic`` (never the ones that change with the step)."""
    out = dict(node.const)
    for k in node.dynamic:
        if k not in node.per_step and k in dynamic:
            out[k] = dynamic[k]
    return out


class Lanes(abc.ABC):
    """Where one route's lanes take arguments, state and parameters from (see the module docstring)."""

    #: per lane, the step number (from 1)
    steps: Sequence[Any]
    #: per lane, whether every loss the pipeline reads reaches it (None: a single loss)
    shared: Sequence[bool] | None = None

    @abc.abstractmethod
    def args(self, node: Node) -> list[Args]:
        """``node``'s evaluated arguments per lane."""

    @abc.abstractmethod
    def states(self, node: Node, xs: Sequence[torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], list[Any]]:
        """``node``'s state per lane, created (for inputs ``xs``) where it does not exist yet, and
        per lane whether it was created now (``fresh``)."""

    @abc.abstractmethod
    def params(self, node: Node) -> list[torch.Tensor | None]:
        """The parameters per lane in the compute dtype (None where ``node`` does not read them)."""

    def layout(self) -> list[torch.Tensor]:
        """Per lane, its parameter, of which shape values and ``broadcast`` read only the shape, dtype
        and device (lanes of one parameter each: shape values never run on flat buckets)."""
        raise NotImplementedError("shape values run per parameter")

    def node_state(self, node: Node) -> dict[str, Any]:
        """State the node shares over its lanes (an RNG)."""
        return {}

    def inner(self, node: Node, values: dict[str, list[torch.Tensor]]
              ) -> tuple[Callable[[list[torch.Tensor]], list[torch.Tensor]] | None, Callable[[], list[InnerNode]] | None]:
        """A block op's ``ctx.inner`` and ``ctx.inner_nodes`` (None for other nodes)."""
        return None, None


def _needs_matrix(node: Node, what: str, shape: Sequence[int]) -> GradError:
    return GradError(*_at(node, needs_matrix_text(what, shape)))


def _at(node: Node, text: tuple[str, str], shape: Sequence[int] | None = None) -> tuple[Any, ...]:
    """GradError's arguments for a shape problem found in a step: the message (naming the
    parameter's ``shape`` when given), the node's span, the hint."""
    message, hint = text
    return (message if shape is None else f"{message} (for a parameter of shape {tuple(shape)})", node.span, hint)


def _shape_value(node: Node, shape: Sequence[int]) -> int:
    if node.op == "numel":
        n = 1
        for d in shape:
            n *= d
        return n
    if node.op == "ndim":
        return len(shape)
    if len(shape) < 2:
        raise _needs_matrix(node, f"'{node.op}'", shape)
    return shape[-2] if node.op == "rows" else shape[-1]


#: the per-tensor (or per-row, per-column) reductions, ``keepdim`` along ``dim``
_REDUCE: dict[str, Callable[..., torch.Tensor]] = {
    "sum": lambda x, dim: x.sum(dim=dim, keepdim=True),
    "mean": lambda x, dim: x.mean(dim=dim, keepdim=True),
    "norm": lambda x, dim: torch.linalg.vector_norm(x, 2, dim=dim, keepdim=True),
    "rms": lambda x, dim: x.square().mean(dim=dim, keepdim=True).sqrt(),
    "amax": lambda x, dim: x.amax(dim=dim, keepdim=True),
    "amin": lambda x, dim: x.amin(dim=dim, keepdim=True),
    "dot": lambda x, dim, y: (x * y).sum(dim=dim, keepdim=True),
}


def _partial(op: str, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """One lane's part of a global reduction (a 0-d tensor), combined over lanes by :func:`_combine`."""
    if op == "dot":
        return (x * y).sum()
    if op in ("sum", "mean"):
        return x.sum()
    if op in ("norm", "rms"):
        return torch.linalg.vector_norm(x, 2)
    return x.amax() if op == "amax" else x.amin()


def _combine(op: str, parts: torch.Tensor, count: int) -> torch.Tensor:
    if op in ("sum", "dot"):
        return parts.sum()
    if op == "mean":
        return parts.sum() / count
    if op in ("norm", "rms"):  # the norm of the per-lane norms, as clip_grad_norm_
        n = torch.linalg.vector_norm(parts, 2)
        return n / (count ** 0.5) if op == "rms" else n
    return parts.amax() if op == "amax" else parts.amin()


def reduce(node: Node, values: Mapping[str, list[torch.Tensor]], args: Sequence[Args]) -> list[torch.Tensor]:
    """A reduction node over every lane: per tensor (a 0-d value), per row (``(..., R, 1)``), per column
    (``(..., 1, C)``, as ``torch.optim.Adafactor``'s factored moments), or over all lanes together
    (``global``: one 0-d value, the same for every lane, as if the lanes were one flat vector)."""
    xs = values[node.inputs["lhs"]]
    ys = values[node.inputs["rhs"]] if "rhs" in node.inputs else [None] * len(xs)
    if not xs:
        return []
    over = node.const["over"]
    if over == "global":
        parts = [_partial(node.op, x, y) for x, y in zip(xs, ys)]
        first = parts[0]
        total = _combine(node.op, torch.stack([t.to(first) for t in parts]), sum(x.numel() for x in xs))
        return [total if total.dtype == x.dtype and total.device == x.device else total.to(x) for x in xs]
    fn = _REDUCE[node.op]
    out = []
    for x, y in zip(xs, ys):
        if over == "tensor":
            dim: Any = tuple(range(x.dim()))
        else:
            if x.dim() < 2:
                raise _needs_matrix(node, f"a reduction over {over}", x.shape)
            dim = -1 if over == "rows" else -2
        r = fn(x, dim, y) if y is not None else fn(x, dim)
        out.append(r.reshape(()) if over == "tensor" else r)
    return out


def shaped(node: Node, values: Mapping[str, list[torch.Tensor]], lanes: "Lanes") -> list[torch.Tensor]:
    """A shape value (``numel``...: a 0-d tensor per parameter) or a ``broadcast`` (a per-tensor value
    expanded to its parameter's shape), lane by lane (one parameter each)."""
    if node.op == "broadcast":
        return [x.expand(p.shape).contiguous() if x.shape != p.shape else x
                for x, p in zip(values[node.inputs["lhs"]], lanes.layout())]
    return [torch.tensor(float(_shape_value(node, p.shape)), dtype=compute_dtype(p), device=p.device)
            for p in lanes.layout()]


def matrix_view(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x`` as a matrix: a value of the parameter's shape is its matrix view (a tensor of more than
    two dimensions as ``(shape[0], -1)``, as Muon's reference does with conv kernels); a matrix
    value (``G Gᵀ``) is itself."""
    return as_matrix(x) if x.shape == p.shape else x


def as_param_shape(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A matrix function's value: the parameter's shape when it is the parameter's matrix view
    (so it combines with the parameter's other values), else as it is (``G Gᵀ`` is m×m)."""
    if x.shape != p.shape and p.dim() > 2 and x.dim() == 2 and x.shape[0] == p.shape[0] and x.numel() == p.numel():
        return x.reshape(p.shape)
    return x


def _square(node: Node, a: torch.Tensor, p: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise GradError(*_at(node, not_square_text(node.op, a.shape), p.shape))


def _power(a: torch.Tensor, power: Any, eps: Any) -> torch.Tensor:
    """``(a + eps I) ** power`` for a symmetric ``a``: ``V diag(|λ + eps| ** power) Vᵀ``."""
    lam, v = torch.linalg.eigh(a)
    return (v * (lam + eps).abs().pow(power).unsqueeze(-2)) @ v.mT


def matrix(node: Node, values: Mapping[str, list[torch.Tensor]], lanes: "Lanes") -> list[torch.Tensor]:
    """A matrix function (``matmul``, ``transpose``, ``eigvecs``, ``qr``, ``matrix_power``) lane by
    lane (one parameter each), on the operands' matrix views."""
    out = []
    xs = values[node.inputs["lhs"]]
    ys = values[node.inputs["rhs"]] if "rhs" in node.inputs else [None] * len(xs)
    args = lanes.args(node) if node.op == "matrix_power" else [None] * len(xs)
    for x, y, p, arg in zip(xs, ys, lanes.layout(), args):
        if p.dim() < 2:
            raise _needs_matrix(node, f"'{node.op}'", p.shape)
        a = matrix_view(x, p) if node.op != "descending" else x
        if node.op == "transpose":
            r = a.transpose(-2, -1)
        elif node.op == "qr":
            r = torch.linalg.qr(a).Q
        elif node.op == "eigvecs":
            _square(node, a, p)
            r = torch.linalg.eigh(a).eigenvectors.flip(-1)
        elif node.op == "descending":
            v = x.reshape(-1)
            order = torch.argsort(v, descending=True)
            r = torch.zeros(v.numel(), v.numel(), dtype=x.dtype, device=x.device)
            r[order, torch.arange(v.numel(), device=x.device)] = 1
        elif node.op == "matrix_power":
            _square(node, a, p)
            r = _power(a, arg.power, arg.eps)
        else:
            b = matrix_view(y, p)
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise GradError(*_at(node, inner_sizes_text(a.shape, b.shape), p.shape))
            r = a @ b
        out.append(as_param_shape(r, p))
    return out


def arith(node: Node, values: Mapping[str, list[torch.Tensor]], args: Sequence[Args]) -> list[torch.Tensor]:
    """An arithmetic node over every lane: its primitive (``lhs op rhs``, ``-lhs``, ``abs(lhs)``,
    ``clamp(lhs, lo, hi)``, ``where(cond, lhs, rhs)``...) applied to its operands, each a signal
    (an input on the operand's port) or a scalar argument of that name."""
    ins = node.inputs
    fn = ARITH[node.op]
    ports = PORTS[node.op]
    out = []
    for i, a in enumerate(args):
        operands = [values[ins[p]][i] if p in ins else getattr(a, p, None) for p in ports]
        out.append(fn(*operands))
    return out


def eval_node(node: Node, values: dict[str, list[torch.Tensor]], lanes: Lanes) -> list[torch.Tensor]:
    """One node's value over every lane, from the values of the nodes before it."""
    if node.kind is Kind.ARITH:
        if is_reduction(node.op):
            return reduce(node, values, lanes.args(node))
        if is_shape(node.op) or node.op == "broadcast":
            return shaped(node, values, lanes)
        if is_matrix(node.op):
            return matrix(node, values, lanes)
        return arith(node, values, lanes.args(node))
    if node.kind is not Kind.OP:  # pragma: no cover - sources and block inputs are handed in
        raise RuntimeError(f"cannot evaluate node {node.name!r} of kind {node.kind.value!r}")
    op = node.impl
    blocks = {p.name for p in op.params if p.kind == "block"}
    inputs = {port: values[src] for port, src in node.inputs.items() if port not in blocks}
    if op.matrix:  # checked when the optimizer is built, except in a block's pipeline (a vector GaLore passes)
        for x in inputs["x"]:
            if x.dim() < 2:
                raise _needs_matrix(node, f"'{node.op}'", x.shape)
    states, fresh = lanes.states(node, inputs["x"])
    inner, inner_nodes = lanes.inner(node, values) if blocks else (None, None)
    ctx = NodeCtx(inputs=inputs, args=lanes.args(node), states=states, steps=list(lanes.steps),
                  params=lanes.params(node), fresh=fresh, node_state=lanes.node_state(node),
                  shared=list(lanes.shared) if lanes.shared is not None else None, inner=inner,
                  inner_nodes=inner_nodes)
    return op.apply(ctx)


def commit_cells(commits: Sequence[tuple[str, str]], values: Mapping[str, list[torch.Tensor]],
                 states: Sequence[dict[str, Any]], keep: str | None = None) -> list[torch.Tensor] | None:
    """Write each state cell's new value (``RouteIR.commits``: ``(cell, new value)`` pairs) into
    the cell's buffer in every lane's state dict, once the route has been evaluated. A cell's
    value in the step may be its buffer itself (the eager backend hands it out uncopied): a
    new value, or ``keep`` (the update), that is another cell's value is copied before any
    buffer is written. Returns ``keep``'s values, copied if they had to be (None without
    ``keep``)."""
    cells = {cell for cell, _ in commits}
    snap = {new: [v.clone() for v in values[new]] for _, new in commits if new in cells}
    kept = None
    if keep is not None:
        kept = [v.clone() for v in values[keep]] if keep in cells else values[keep]
    for cell, new in commits:
        key = cell + ".value"
        for st, v in zip(states, snap.get(new) or values[new]):
            buf = st.get(key)
            if buf is not None:
                buf.copy_(v)
    return kept


def apply_param(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p <- value`` in place, for a route that gives the parameter's new value (``param = EXPR``);
    ``value`` is in the compute dtype and rounded once to the parameter's, as :func:`apply_update`."""
    p.copy_(value)


def apply_update(p: torch.Tensor, u: torch.Tensor, lr: Any) -> None:
    """``p <- p - lr * u`` in place (``p`` a parameter or a flat buffer of parameters; ``u`` in
    the compute dtype, which for half-precision parameters is float32: the update is computed
    in float32 and rounded once)."""
    if p.dtype == u.dtype:
        if isinstance(lr, torch.Tensor):
            p.sub_(u * lr)
        else:
            p.add_(u, alpha=-lr)
    else:
        p.copy_(p.to(u.dtype) - u * lr if isinstance(lr, torch.Tensor) else p.to(u.dtype).add_(u, alpha=-lr))

