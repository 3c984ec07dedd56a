"""What an op is: its signature, its state, its checks, and its eager (reference) math.

An op module defines one subclass of :class:`Op` (or :class:`TensorOp` for math
that is independent per parameter tensor) and registers it with :func:`register`.
Like an optax transform, an op is an ``init`` plus an ``update``:

* its **state** is declared once, as :class:`Buffer` s (name, shape relative to the
  op's input, dtype, initial value); the runtime creates it with :meth:`Op.init`
  before the op first runs on a parameter, so ``update`` never creates state. A
  value that depends on the data (a momentum buffer that starts as the first
  input) is written by ``update`` on the node's first step, which the runtime
  signals with ``fresh``;
* its **signature** (``params``) is what the compiler binds and type-checks calls
  against, and :meth:`Op.check` is where an op states the rules on its use that the
  signature cannot (checked when the pipeline compiles, so ``gradpipe check``
  reports them);
* its **math** is :meth:`Op.apply` over all the tensors a route covers (so a
  ``global`` reduction sees every tensor at once), or :meth:`TensorOp.update` per
  tensor.

Ops are functional on their inputs (they never write to an input tensor) and
update their own state buffers in place. Optional capabilities are base classes
(:class:`Denominator`), not attributes looked up by name.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import torch

from ..ranges import RangeMixin

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Param", "Buffer", "Args", "Lane", "Op", "TensorOp", "SeededOp", "MacroOp", "Denominator", "NodeCtx",
           "InnerNode", "CheckView", "Rewrite", "find_inner", "REQUIRED", "register", "OPS", "route_norms",
           "adam_moments", "sqrt_s", "is_zero", "axpy_", "add_s", "addcmul_s", "on_first", "RuntimeFloat",
           "Fresh", "INTERNAL_OPS", "internal", "op_impl"]

REQUIRED: Any = object()

ParamKind = Literal["scalar", "int", "bool", "choice", "signal", "value", "any", "signals", "block"]


@dataclass(frozen=True)
class Param(RangeMixin):
    """One argument of an op.

    kinds: ``scalar`` (a number, hyperparameter or arithmetic on them),
    ``int`` (a compile-time integer), ``bool``, ``choice`` (one word of
    ``choices``, written bare or quoted), ``signal`` (a stream: a source, a
    sub-pipeline, or an op applied to the receiving op's input), ``value``
    (a signal or a scalar), ``any`` (a scalar, a rule, or a signal: the op's
    :meth:`Op.rewrite` says what a rule or a signal means),
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


#: ``Buffer.shape``: the buffer's shape for an op input of ``shape`` and these structural
#: arguments, or None when a parameter of that shape keeps no such buffer
ShapeRule = Callable[[tuple[int, ...], Mapping[str, Any]], "tuple[int, ...] | None"]


@dataclass(frozen=True)
class Buffer:
    """One piece of per-parameter state, declared once by its op.

    ``shape``: None for the shape of the op's input (the parameter's, or the projected
    shape inside a block), else a rule ``(input shape, args) -> shape or None``
    (None: no such buffer for that shape, e.g. GaLore's projector for a vector).
    ``dtype``: None for the compute dtype (fp32 for half-precision parameters),
    else a ``torch.dtype``. ``init``: the value every element starts at.
    """

    name: str
    doc: str = ""
    shape: ShapeRule | None = None
    dtype: torch.dtype | None = None
    init: float = 0.0

    def shape_for(self, shape: tuple[int, ...], args: Mapping[str, Any]) -> tuple[int, ...] | None:
        return tuple(shape) if self.shape is None else self.shape(tuple(shape), args)


class Args:
    """A node's evaluated arguments for one parameter (or one flat bucket): ``a.beta``.

    Compile-time constants are plain values; the others are numbers in the eager
    backend and 0-d tensors in the compiled one (:func:`is_zero`, :func:`sqrt_s`...
    work with both)."""

    def __init__(self, values: Mapping[str, Any] | None = None, **kw: Any) -> None:
        if values:
            self.__dict__.update(values)
        if kw:
            self.__dict__.update(kw)

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return "Args(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


class RuntimeFloat(float):
    """A number computed in this step from ``step`` or ``loss``. The eager backend hands such
    arguments to ops as this type so that :func:`is_zero` never mistakes a value that is zero
    at one step for a constant zero (the math must not change when it crosses zero)."""

    __slots__ = ()


#: ``fresh``: True on the first step a node runs on a parameter (its state was just created
#: by the runtime), False after; in the compiled backend a 0-d bool tensor (one compiled
#: function serves both cases) or, for a flat bucket of parameters at different points, a
#: bool tensor of the bucket's size
Fresh = Any


@dataclass
class Lane:
    """What one parameter's call of :meth:`TensorOp.update` sees besides its input, state and
    arguments: the step number (from 1), whether this is the node's first step on the
    parameter (``fresh``), the node's other inputs by port, and the parameter itself
    (read-only, in the compute dtype; None when the op does not read it)."""

    step: Any
    fresh: Fresh
    inputs: Mapping[str, torch.Tensor]
    param: torch.Tensor | None


@dataclass
class NodeCtx:
    """Everything one op node sees in one step, over the tensors of one route.

    inputs: port name -> one tensor per parameter (``x`` is the stream input).
    args: per parameter, the evaluated arguments (numbers, bools, words).
    states: per parameter, this node's buffers (``{"m": tensor, ...}``), created by
        the runtime from :meth:`Op.init` before the node's first step.
    steps: per parameter, the step number (starts at 1).
    params: the parameters themselves (read-only, in the compute dtype).
    fresh: per parameter, whether the node's state was created for this step (see :data:`Fresh`).
    node_state: state shared by all parameters of the node (e.g. an RNG).
    """

    inputs: dict[str, list[torch.Tensor]]
    args: list[Args]
    states: list[dict[str, torch.Tensor]]
    steps: list[Any]
    params: list[torch.Tensor]
    fresh: list[Fresh] = field(default_factory=list)
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

    def is_fresh(self, i: int) -> Fresh:
        return self.fresh[i] if self.fresh else False


@dataclass
class InnerNode:
    """One op node inside a block: ``states[i]`` is its buffer dict for parameter ``i``
    (created before the node's first run), ``args[i]`` its evaluated arguments."""

    name: str
    op: "Op"
    args: list[Args]
    states: list[dict[str, torch.Tensor]]

    def buffer(self, i: int, name: str) -> torch.Tensor | None:
        return self.states[i].get(name)


def find_inner(ctx: NodeCtx, buffer: str | None = None, kind: type | None = None) -> InnerNode | None:
    """The first inner op node that declares ``buffer`` (or is an instance of ``kind``), or None."""
    for node in ctx.inner_nodes() if ctx.inner_nodes else []:
        if buffer is not None and node.op.declares(buffer):
            return node
        if kind is not None and isinstance(node.op, kind):
            return node
    return None


class CheckView(abc.ABC):
    """What :meth:`Op.check` and :meth:`Op.infer_args` see of the compiled program."""

    @abc.abstractmethod
    def nodes(self) -> Iterable["Node"]:
        """Every node of the program (all routes, blocks included)."""

    @abc.abstractmethod
    def input(self, node: "Node", port: str = "x") -> "Node | None":
        """The node feeding ``node``'s ``port``."""


@dataclass(frozen=True)
class Rewrite:
    """What :meth:`Op.rewrite` turns a call into. ``apply``: the call is the given argument
    (an op or pipeline) applied to the call's input, under the call's name; ``arith``: the
    call is ``input <op> argument`` (the argument a signal)."""

    kind: Literal["apply", "arith"]
    arg: str
    op: str = "*"


class Op:
    """Base class of every op. Subclasses set the class attributes and ``apply``."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    #: the state the op keeps per parameter, declared once (see :meth:`buffers_for`)
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
    #: must accept its non-constant arguments, the step and ``fresh`` as 0-d tensors (use
    #: ``sqrt_s``, ``axpy_``, ``add_s``, ``addcmul_s``, ``is_zero`` and ``on_first`` instead of
    #: ``math.sqrt``, ``alpha=`` / ``value=``, ``if a.x == 0`` and ``if fresh``), and its buffers
    #: must have the input's shape
    flat: ClassVar[bool] = False
    #: the op acts on each parameter's matrix view, so it needs parameters of two or more
    #: dimensions: a route whose selector admits only fewer is refused when the pipeline
    #: compiles, other parameters of fewer when the optimizer is built
    matrix: ClassVar[bool] = False
    #: per-example gradients (the ``samples`` source, ``(B, *shape)`` per parameter): ``"map"``
    #: ops take and give them (dp_clip), ``"reduce"`` ops take them and give one tensor
    #: per parameter (dp_noise); other ops cannot take them
    per_sample: ClassVar[str | None] = None
    #: a block op whose inner pipeline sees transformed tensors (another shape): the
    #: inner pipeline may not read the parameters
    projects_block: ClassVar[bool] = False

    # ------------------------------------------------------------------ state
    def buffers_for(self, args: Mapping[str, Any]) -> tuple[Buffer, ...]:
        """The buffers a node with these structural arguments keeps per parameter: the
        compile-time constants and the param group's hyperparameters (never values that
        change with the step). An argument missing from ``args`` is unknown: keep the
        buffers it could need. ``momentum(0)`` keeps none, as torch's SGD."""
        return self.buffers

    def declares(self, buffer: str) -> bool:
        """Whether the op declares a buffer of this name (for some arguments)."""
        return any(b.name == buffer for b in self.buffers)

    def init(self, shape: Sequence[int], args: Mapping[str, Any], dtype: torch.dtype,
             device: torch.device | str) -> dict[str, torch.Tensor]:
        """The state of a node for one parameter whose op input has ``shape``, as declared."""
        out = {}
        for b in self.buffers_for(args):
            s = b.shape_for(tuple(shape), args)
            if s is not None:
                out[b.name] = torch.full(s, b.init, dtype=b.dtype or dtype, device=device)
        return out

    def state_numel(self, shape: tuple[int, ...], const: Mapping[str, Any]) -> int:
        """Elements of per-parameter state a node keeps for an input of ``shape`` (from the buffers)."""
        total = 0
        for b in self.buffers_for(const):
            s = b.shape_for(tuple(shape), const)
            if s is not None:
                total += math.prod(s)
        return total

    def buffer_names(self, const_args: Mapping[str, Any]) -> list[str]:
        """The names of :meth:`buffers_for`."""
        return [b.name for b in self.buffers_for(const_args)]

    def init_node_state(self, args: Args) -> dict[str, Any]:
        """State shared by every parameter of the node (``has_node_state`` ops), from the
        compile-time arguments."""
        return {}

    # the node state (e.g. an RNG) goes into state_dict through these
    def node_state_dict(self, node_state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def load_node_state_dict(self, node_state: dict[str, Any], saved: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ compile-time hooks
    #: the scalar arguments :meth:`validate` reads (empty: the op has no rule across arguments)
    validates: ClassVar[tuple[str, ...]] = ()

    def validate(self, args: Mapping[str, float]) -> tuple[str, str] | None:
        """A rule across the scalar arguments named in ``validates`` (``low <= high``):
        ``(message, hint)`` when these values break it, else None. Checked when the pipeline
        compiles (constants and the hyperparameters' defaults), for every param group, and in
        every step for arguments computed from ``step`` or ``loss``; ``update`` can rely on it."""
        return None

    def check(self, node: "Node", view: CheckView) -> None:
        """Rules on this op's use that the signature does not state; raise a positioned
        ``GradError``. Called for every node of the op once the pipeline is built and
        optimised, so ``gradpipe check`` reports what building the optimizer would."""

    def infer_args(self, node: "Node", view: CheckView) -> Mapping[str, Any] | None:
        """Arguments the op takes from its context (``dp_noise``'s sensitivity from the
        ``dp_clip`` before it): the node's new arguments, or None to keep them."""
        return None

    def check_block(self, inner: list["Op"]) -> tuple[str, str] | None:
        """Block ops: ``(message, hint)`` if the inner pipeline's ops (in order) cannot serve
        this op (e.g. GWT needs an op with a denominator); checked when the pipeline compiles."""
        return None

    def rewrite(self, kinds: Mapping[str, str]) -> Rewrite | None:
        """For ``any`` arguments: given what each argument is (``kinds[name]`` is ``"rule"``,
        ``"signal"`` or ``"scalar"``), what the call becomes, or None for an ordinary node."""
        return None

    def inner_shape(self, shape: tuple[int, ...], const: Mapping[str, Any]) -> tuple[int, ...]:
        """Block ops: the shape the inner pipeline sees for a parameter of ``shape``."""
        return shape

    def identity(self, const_args: Mapping[str, Any]) -> bool:
        """True when these constant arguments make the op the identity (it is removed)."""
        return False

    # ------------------------------------------------------------------ run-time facts
    def needs_param(self, args: Mapping[str, Any]) -> bool:
        """Whether this step's arguments make the op read the parameters (``decay(0)`` does not)."""
        return self.reads_param

    def flat_ok(self, const_args: Mapping[str, Any]) -> bool:
        """Whether a node with these compile-time arguments may run on flat buffers (see ``flat``):
        a ``flat`` op, unless these arguments make it reduce within each tensor (``scope=tensor``)."""
        return self.flat and self.reduction(const_args) != "tensor"

    def reduction(self, args: Mapping[str, Any]) -> str | None:
        """The reduction this node performs over its input, if any ("global"/"tensor")."""
        return None

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        raise NotImplementedError


class TensorOp(Op):
    """An op whose math is independent per parameter tensor: implement ``update``."""

    def update(self, x: torch.Tensor, state: dict[str, torch.Tensor], a: Args, lane: Lane) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        out = []
        others = [k for k in ctx.inputs if k != "x"]
        for i, x in enumerate(ctx.x):
            lane = Lane(ctx.steps[i], ctx.is_fresh(i), {k: ctx.inputs[k][i] for k in others},
                        ctx.params[i] if ctx.params else None)
            out.append(self.update(x, ctx.states[i], ctx.args[i], lane))
        return out


class Denominator(abc.ABC):
    """A capability: the op's update is its input (or first moment) divided by a tensor it
    can report, which wrappers that scale other coefficients the same way read (``wavelet``)."""

    @abc.abstractmethod
    def denominator(self, state: dict[str, torch.Tensor], args: Args, step: Any) -> torch.Tensor:
        """The divisor of this step's update, read after the step's update."""

    def step_factor(self, args: Args, step: Any) -> Any:
        """A time-dependent factor of the update that wrappers watching its growth divide out (1: none)."""
        return 1.0


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
        """Standard normal samples of ``x``'s shape and dtype, drawn on the CPU, on ``x``'s device.
        For a DTensor (FSDP2's ``fully_shard``) every rank draws the whole tensor from its copy of
        the generator (all alike) and keeps its shard: the samples an unsharded run draws."""
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu")
        mesh = getattr(x, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(z.to(x.to_local().device), mesh, x.placements, src_data_rank=None)
        return z.to(x.device)


class MacroOp(Op):
    """An op defined in the pipeline language itself: the compiler inlines
    ``definition`` (one ``def`` named like the op) at every call, so ``explain``
    and the state dict show the ops it expands to. ``params`` document and
    range-check the arguments at the user's call."""

    definition: ClassVar[str] = ""


#: the op library, by name: every module of this package registers its op on import
#: (``plugins.load_builtin_ops``, called by ``gradpipe/compiler/ops/__init__.py``, imports
#: them all), and plug-ins add theirs
#: with :func:`gradpipe.register_op` or the ``gradpipe.ops`` entry point group
OPS: dict[str, Op] = {}


#: ops the compiler makes for constructs of the language (a ``state`` cell), never called by
#: name from a `.grad` file: not in :data:`OPS`, so not listed, documented or tested as ops
INTERNAL_OPS: dict[str, Op] = {}


def internal(cls: type[Op]) -> type[Op]:
    """Class decorator: an op the compiler makes itself (see :data:`INTERNAL_OPS`)."""
    INTERNAL_OPS[cls.name] = cls()
    return cls


def op_impl(name: str) -> Op:
    """The implementation of the op a node names: one of the library or an internal one."""
    op = OPS.get(name)
    return op if op is not None else INTERNAL_OPS[name]


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: add an op to the library under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"op class {cls.__name__} needs a name that is an identifier, got {name!r}")
    if name in OPS:
        if type(OPS[name]) is cls:
            return cls  # the same class registered again (a module imported twice)
        raise ValueError(f"op {name!r} is registered twice ({type(OPS[name]).__module__} and {cls.__module__})")
    if cls.flat and any(b.shape is not None for b in cls.buffers):
        raise ValueError(f"op {name!r} is flat, so its buffers must have the input's shape")
    OPS[name] = cls()
    return cls


def route_norms(xs: list[torch.Tensor], scope: str) -> list[torch.Tensor]:
    """The L2 norm each tensor sees: its own (``tensor``), or the norm over all of
    them, the norm of the per-tensor norms (``global``, as ``clip_grad_norm_``)."""
    norms = [torch.linalg.vector_norm(x, 2) for x in xs]
    if scope == "global" and norms:
        total = torch.linalg.vector_norm(torch.stack(norms), 2)
        return [total] * len(norms)
    return norms


def adam_moments(state: dict[str, torch.Tensor], x: torch.Tensor, b1: Any, b2: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Update Adam's moments ``m`` and ``v`` in ``state`` with the authors' arithmetic,
    ``m = b1 m + (1-b1) x`` and ``v = b2 v + (1-b2) x^2``; return ``(m, v)``."""
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
    """True for an argument that is a constant zero: a compile-time 0 or a hyperparameter
    that is 0 in this param group. Values computed from ``step`` or ``loss`` (tensors, or
    :class:`RuntimeFloat`) are never constant, even when they are 0 at this step."""
    return not isinstance(v, (torch.Tensor, RuntimeFloat)) and v == 0


def axpy_(y: torch.Tensor, x: torch.Tensor, a: Any) -> torch.Tensor:
    """``y += a * x`` in place."""
    return y.add_(x * a) if isinstance(a, torch.Tensor) else y.add_(x, alpha=a)


def add_s(y: torch.Tensor, x: torch.Tensor, a: Any) -> torch.Tensor:
    """``y + a * x``."""
    return y + x * a if isinstance(a, torch.Tensor) else y.add(x, alpha=a)


def addcmul_s(y: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, a: Any) -> torch.Tensor:
    """``y += a * x1 * x2`` in place."""
    return y.add_(x1 * x2 * a) if isinstance(a, torch.Tensor) else y.addcmul_(x1, x2, value=a)


def on_first(fresh: Fresh, buf: torch.Tensor, first: torch.Tensor,
             later: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Write ``buf`` in place: ``first`` on the node's first step, ``later(buf)`` (which updates
    ``buf`` in place and returns it) after; return ``buf``. With a tensor ``fresh`` (the compiled
    backend) both are computed and selected, so one compiled function serves every step."""
    if fresh is True:
        return buf.copy_(first)
    if fresh is False:
        return later(buf)
    return buf.copy_(torch.where(fresh, first, later(buf.clone())))
