"""What an op is: its signature, its state, and its eager (reference) math.

An op module defines one subclass of :class:`Op` (or :class:`TensorOp` for
math that is independent per parameter tensor) and registers it with
:func:`register`. The compiler reads the signature (``params``) to resolve and
type-check calls; the runtime calls :meth:`Op.apply` over all the tensors a
route covers, so reductions with ``scope=global`` see every tensor at once.

Ops are functional on their inputs (they never write to an input tensor) and
update their own state buffers in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Literal

import torch

from ..ranges import RangeMixin

__all__ = ["Param", "Buffer", "Op", "TensorOp", "SeededOp", "MacroOp", "NodeCtx", "InnerNode", "find_inner", "REQUIRED", "register", "OPS",
           "get_op", "route_norms", "adam_moments", "global_dot", "sqrt_s", "is_zero", "axpy_", "add_s", "addcmul_s"]

REQUIRED: Any = object()

ParamKind = Literal["scalar", "int", "bool", "choice", "signal", "value", "any", "signals", "block"]


@dataclass(frozen=True)
class Param(RangeMixin):
    """One argument of an op.

    kinds: ``scalar`` (a number, hyperparameter or arithmetic on them),
    ``int`` (a compile-time integer), ``bool``, ``choice`` (one word of
    ``choices``, written bare or quoted), ``signal`` (a stream: a source, a
    sub-pipeline, or an op applied to the receiving op's input), ``value``
    (a signal or a scalar), ``any`` (``scale``'s argument: a scalar, a rule, or a signal),
    ``signals`` (only first: every positional argument is a signal, e.g. the task
    gradients of a combiner ``pcgrad(grads.a, grads.b)``; the call is then a signal
    itself, not a stage), ``block`` (an inner sub-pipeline, written as a
    ``{ ... }`` block after the call or as an op: ``galore(rank=8) { adam }``,
    ``error_feedback(compressor=topk(0.1))``; the op runs it with ``ctx.inner``).
    """

    name: str
    kind: ParamKind = "scalar"
    default: Any = REQUIRED
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True
    choices: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class Buffer:
    """A per-parameter state buffer with the parameter's shape (``numel`` elements)."""

    name: str
    doc: str = ""


@dataclass
class NodeCtx:
    """Everything one op node sees in one step, over the tensors of one route.

    inputs: port name -> one tensor per parameter (``x`` is the stream input).
    args: per parameter, the evaluated arguments (numbers, bools, words).
    states: per parameter, this node's buffers (``{"m": tensor, ...}``), empty on
        the first step: the op creates them.
    steps: per parameter, the step number (starts at 1).
    params: the parameters themselves (read-only, in the compute dtype).
    node_state: state shared by all parameters of the node (e.g. an RNG).
    """

    inputs: dict[str, list[torch.Tensor]]
    args: list[SimpleNamespace]
    states: list[dict[str, torch.Tensor]]
    steps: list[int]
    params: list[torch.Tensor]
    node_state: dict[str, Any] = field(default_factory=dict)
    #: per parameter, True when every loss the pipeline reads reaches it (always True
    #: for a single loss); combiners merge only shared tensors and sum the rest
    shared: list[bool] | None = None
    #: block ops: run the inner sub-pipeline on one tensor per parameter (once per step)
    inner: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    #: block ops: the op nodes of the inner sub-pipeline, in evaluation order, as
    #: :class:`InnerNode` (their op, arguments and state per parameter), for wrappers
    #: whose math reads the inner state (COAP reads Adam's ``m``, GWT its denominator)
    inner_nodes: Callable[[], list["InnerNode"]] | None = None

    @property
    def x(self) -> list[torch.Tensor]:
        return self.inputs["x"]

    @property
    def signals(self) -> list[list[torch.Tensor]]:
        """A combiner's inputs in argument order: ``signals[k][i]`` is task k's tensor of parameter i."""
        return [self.inputs["x"]] + [self.inputs[f"x{k}"] for k in range(1, len(self.inputs))
                                     if f"x{k}" in self.inputs]

    def is_shared(self, i: int) -> bool:
        return True if self.shared is None else self.shared[i]


@dataclass
class InnerNode:
    """One op node inside a block: ``states[i]`` is its buffer dict for parameter ``i``
    (created on the node's first run), ``args[i]`` its evaluated arguments."""

    name: str
    op: "Op"
    args: list[SimpleNamespace]
    states: list[dict[str, torch.Tensor]]

    def buffer(self, i: int, name: str) -> torch.Tensor | None:
        return self.states[i].get(name)


def find_inner(ctx: NodeCtx, buffer: str | None = None, method: str | None = None) -> InnerNode | None:
    """The first inner op node that keeps ``buffer`` (or has ``method``), or None."""
    for node in ctx.inner_nodes() if ctx.inner_nodes else []:
        if buffer is not None and buffer in node.op.buffer_names({}):
            return node
        if method is not None and hasattr(node.op, method):
            return node
    return None


class Op:
    """Base class of every op. Subclasses set the class attributes and ``apply``."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    buffers: ClassVar[tuple[Buffer, ...]] = ()
    #: usable as ``scale(<op>)``, the way optax's ``scale_by_*`` rules are
    is_rule: ClassVar[bool] = False
    #: two nodes with the same inputs and arguments may share one instance (CSE)
    mergeable: ClassVar[bool] = True
    #: keeps state shared by all parameters of the node (e.g. an RNG), saved in state_dict
    has_node_state: ClassVar[bool] = False
    #: reads the parameter values
    reads_param: ClassVar[bool] = False
    #: one-line summary, math and paper live in the class docstring
    summary: ClassVar[str] = ""
    #: the paper or library this op follows
    reference: ClassVar[str] = ""

    #: elementwise math, or reductions over the whole route, with no shape dependence or
    #: randomness (a per-tensor reduction, ``reduction() == "tensor"``, opts out): the compiled
    #: backend may run it on the route's tensors concatenated into flat buffers. Such an op
    #: must accept its non-constant arguments and the step as 0-d tensors (use ``sqrt_s``,
    #: ``axpy_``, ``add_s``, ``addcmul_s`` and ``is_zero`` instead of ``math.sqrt``,
    #: ``alpha=`` / ``value=`` and ``if a.x == 0``)
    flat: ClassVar[bool] = False
    #: per-example gradients (the ``samples`` source, ``(B, *shape)`` per parameter): ``"map"``
    #: ops take and give them (dp_clip), ``"reduce"`` ops take them and give one tensor
    #: per parameter (dp_noise); other ops cannot take them
    per_sample: ClassVar[str | None] = None
    #: a block op whose inner pipeline sees transformed tensors (another shape): the
    #: inner pipeline may not read the parameters
    projects_block: ClassVar[bool] = False

    def state_numel(self, shape: tuple[int, ...], const: dict[str, Any]) -> int:
        """Elements of per-parameter state a node keeps for a parameter of ``shape``."""
        return len(self.buffer_names(const)) * math.prod(shape)

    def check_block(self, inner: list["Op"]) -> tuple[str, str] | None:
        """Block ops: ``(message, hint)`` if the inner pipeline's ops (in order) cannot serve
        this op (e.g. GWT needs an op with a denominator); checked when the pipeline compiles."""
        return None

    def inner_shape(self, shape: tuple[int, ...], const: dict[str, Any]) -> tuple[int, ...]:
        """Block ops: the shape the inner pipeline sees for a parameter of ``shape``."""
        return shape

    def needs_param(self, args: dict[str, Any]) -> bool:
        """Whether this step's arguments make the op read the parameters (``decay(0)`` does not)."""
        return self.reads_param

    def flat_ok(self, const_args: dict[str, Any]) -> bool:
        """Whether a node with these compile-time arguments may run on flat buffers (see ``flat``):
        a ``flat`` op, unless these arguments make it reduce within each tensor (``scope=tensor``)."""
        return self.flat and self.reduction(const_args) != "tensor"

    def reduction(self, args: dict[str, Any]) -> str | None:
        """The reduction this node performs over its input, if any ("global"/"tensor")."""
        return None

    def identity(self, const_args: dict[str, Any]) -> bool:
        """True when these constant arguments make the op the identity (it is removed)."""
        return False

    def buffer_names(self, const_args: dict[str, Any]) -> list[str]:
        """The buffers a node with these (compile-time) arguments keeps per parameter."""
        return [b.name for b in self.buffers]

    def init_node_state(self, args: SimpleNamespace) -> dict[str, Any]:
        return {}

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        raise NotImplementedError

    # the node state (e.g. an RNG) goes into state_dict through these
    def node_state_dict(self, node_state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def load_node_state_dict(self, node_state: dict[str, Any], saved: dict[str, Any]) -> None:
        pass


class TensorOp(Op):
    """An op whose math is independent per parameter tensor: implement ``update``."""

    def update(self, x: torch.Tensor, state: dict[str, torch.Tensor], a: SimpleNamespace, step: int,
               inputs: dict[str, torch.Tensor], param: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(ctx.x):
            extra = {k: v[i] for k, v in ctx.inputs.items() if k != "x"}
            out.append(self.update(x, ctx.states[i], ctx.args[i], ctx.steps[i], extra, ctx.params[i]))
        return out


class SeededOp(Op):
    """An op that draws from one CPU generator per node, seeded by its ``seed``
    argument; the generator's state is saved in ``state_dict`` so a resumed run
    draws the same numbers. Such nodes are never merged by CSE."""

    mergeable = False
    has_node_state = True

    def init_node_state(self, args):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(args.seed))
        return {"generator": gen}

    def node_state_dict(self, node_state):
        return {"rng": node_state["generator"].get_state()}

    def load_node_state_dict(self, node_state, saved):
        node_state["generator"].set_state(saved["rng"].to(torch.uint8).cpu())

    @staticmethod
    def randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Standard normal samples of ``x``'s shape and dtype, drawn on the CPU, on ``x``'s device."""
        return torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)


class MacroOp(Op):
    """An op defined in the pipeline language itself: the compiler inlines
    ``definition`` (one ``def`` named like the op) at every call, so ``explain``
    and the state dict show the ops it expands to. ``params`` document and
    range-check the arguments at the user's call."""

    definition: ClassVar[str] = ""


OPS: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: add an op to the library under ``cls.name``."""
    if cls.name in OPS:
        raise ValueError(f"op {cls.name!r} is registered twice")
    OPS[cls.name] = cls()
    return cls


def get_op(name: str) -> Op | None:
    from . import _load_all  # noqa: F401  (registers the library on first use)
    return OPS.get(name)


def route_norms(xs: list[torch.Tensor], scope: str) -> list[torch.Tensor]:
    """The L2 norm each tensor sees: its own (``tensor``), or the norm over all of
    them, the norm of the per-tensor norms (``global``, as ``clip_grad_norm_``)."""
    norms = [torch.linalg.vector_norm(x, 2) for x in xs]
    if scope == "global" and norms:
        total = torch.linalg.vector_norm(torch.stack(norms), 2)
        return [total] * len(norms)
    return norms


def adam_moments(state: dict[str, torch.Tensor], x: torch.Tensor, b1: float, b2: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Update Adam's moments in ``state`` (created at zero) with the authors' arithmetic,
    ``m = b1 m + (1-b1) x`` and ``v = b2 v + (1-b2) x^2``; return ``(m, v)``."""
    if "m" not in state:
        state["m"] = torch.zeros_like(x)
        state["v"] = torch.zeros_like(x)
    m, v = state["m"], state["v"]
    axpy_(m.mul_(b1), x, 1 - b1)
    addcmul_s(v.mul_(b2), x, x, 1 - b2)
    return m, v


# Scalar arguments are Python numbers in the eager backend and 0-d tensors in the compiled
# one (so a changed hyperparameter or step does not recompile). These helpers keep the eager
# arithmetic exactly as before and work with tensors too.
def sqrt_s(v: Any) -> Any:
    """``math.sqrt`` for a number, ``.sqrt()`` for a 0-d tensor."""
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def is_zero(v: Any) -> bool:
    """True for a Python number equal to 0 (a tensor argument is never treated as a constant)."""
    return not isinstance(v, torch.Tensor) and v == 0


def axpy_(y: torch.Tensor, x: torch.Tensor, a: Any) -> torch.Tensor:
    """``y += a * x`` in place."""
    return y.add_(x * a) if isinstance(a, torch.Tensor) else y.add_(x, alpha=a)


def add_s(y: torch.Tensor, x: torch.Tensor, a: Any) -> torch.Tensor:
    """``y + a * x``."""
    return y + x * a if isinstance(a, torch.Tensor) else y.add(x, alpha=a)


def addcmul_s(y: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, a: Any) -> torch.Tensor:
    """``y += a * x1 * x2`` in place."""
    return y.add_(x1 * x2 * a) if isinstance(a, torch.Tensor) else y.addcmul_(x1, x2, value=a)


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """The inner product of two routes' worth of tensors, as if each list were one flat vector."""
    if not a:
        return torch.zeros(())
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()
