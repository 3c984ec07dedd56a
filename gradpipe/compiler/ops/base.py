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
from typing import Any, ClassVar, Literal

import torch

from ..ranges import RangeMixin

__all__ = ["Param", "Buffer", "Op", "TensorOp", "SeededOp", "NodeCtx", "REQUIRED", "register", "OPS", "get_op",
           "route_norms", "adam_moments"]

REQUIRED: Any = object()

ParamKind = Literal["scalar", "int", "bool", "choice", "signal", "value", "any"]


@dataclass(frozen=True)
class Param(RangeMixin):
    """One argument of an op.

    kinds: ``scalar`` (a number, hyperparameter or arithmetic on them),
    ``int`` (a compile-time integer), ``bool``, ``choice`` (one word of
    ``choices``, written bare or quoted), ``signal`` (a stream: a source, a
    sub-pipeline, or an op applied to the receiving op's input), ``value``
    (a signal or a scalar), ``any`` (``scale``'s argument: a scalar, a rule, or a signal).
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

    @property
    def x(self) -> list[torch.Tensor]:
        return self.inputs["x"]


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
    m.mul_(b1).add_(x, alpha=1 - b1)
    v.mul_(b2).addcmul_(x, x, value=1 - b2)
    return m, v
