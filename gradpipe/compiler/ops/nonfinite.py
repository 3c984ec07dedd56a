"""``skip_nonfinite`` and ``allow_nonfinite``: what a step does with NaN or Inf gradients
(and, with ``skip_nonfinite(updates=true)``, with a NaN or Inf update).

These are *policy* ops. On the stream they are the identity; what they state is a rule for
the whole optimizer step, which the runtime applies before any op runs, and with
``updates=true`` also once the routes have computed their updates and before any is applied
(``gradpipe/runtime/nonfinite.py``, ``gradpipe/runtime/rollback.py``). A pipeline that names
neither behaves as ``skip_nonfinite(max_consecutive=10)``. The compiler works the policy out
when the file compiles (:func:`policy_of`, ``Program.nonfinite``), so ``gradpipe check``
reports a policy inside a block, a count that is not whole, an ``updates`` that is not
written ``true`` or ``false``, or two routes that disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ...dsl.diagnostics import GradError
from .base import CheckView, NodeCtx, Op, Param, register

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["DEFAULT_MAX_CONSECUTIVE", "POLICY_OPS", "NonFinitePolicy", "policy_of", "SkipNonfinite",
           "AllowNonfinite"]

#: the policy of a pipeline that names neither op: skip, and stop after this many skips in a row
DEFAULT_MAX_CONSECUTIVE = 10

#: the names of the policy ops
POLICY_OPS = ("skip_nonfinite", "allow_nonfinite")


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a step with a non-finite gradient does: with ``check`` false, nothing (as torch);
    else it is skipped, and more than ``max_consecutive`` in a row raise. With ``updates``, a
    step whose update (the routes' output, or a parameter's new value) is not finite is skipped
    the same way. ``node`` is the graph node that states it (None for the default)."""

    check: bool = True
    max_consecutive: float = DEFAULT_MAX_CONSECUTIVE
    node: str | None = None
    updates: bool = False


def _policy(node: "Node") -> NonFinitePolicy:
    """The policy one policy node states; a GradError at the node for a policy that cannot be."""
    if node.block is not None:
        raise GradError(f"'{node.op}' is a policy of the whole step; it cannot sit inside a {{ ... }} block",
                        node.span, f"write it in the main chain: grad | {node.op} | ...")
    if node.op == "allow_nonfinite":
        return NonFinitePolicy(False, math.inf, node.name)
    value = node.const.get("max_consecutive")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isinf(value) or float(value).is_integer()):
        raise GradError("max_consecutive of 'skip_nonfinite' must be a whole number or inf, known when the "
                        "pipeline compiles", node.span, "write skip_nonfinite(max_consecutive=10)")
    updates = node.const.get("updates")
    if not isinstance(updates, bool):  # a hyperparameter: the binder has already refused anything else
        raise GradError("updates of 'skip_nonfinite' must be written true or false, known when the pipeline "
                        "compiles", node.span, "write skip_nonfinite(updates=true)")
    return NonFinitePolicy(True, float(value), node.name, updates)


def policy_of(nodes: Iterable["Node"]) -> NonFinitePolicy:
    """The policy of a program with these nodes: from its ``skip_nonfinite`` / ``allow_nonfinite``
    nodes (all of them must state the same policy), or the default
    ``skip_nonfinite(max_consecutive=10)``. A GradError for a policy that cannot be."""
    found = sorted((n for n in nodes if n.is_op and n.op in POLICY_OPS),
                   key=lambda n: (n.span.line, n.span.column, n.name))
    if not found:
        return NonFinitePolicy()
    first = _policy(found[0])
    for node in found[1:]:
        pol = _policy(node)
        if (pol.check, pol.max_consecutive, pol.updates) != (first.check, first.max_consecutive, first.updates):
            raise GradError("two different non-finite policies: a policy op covers the whole step, so every "
                            "route must state the same one", node.span,
                            f"keep one policy, e.g. the one of {found[0].name}")
    return first


class _Policy(Op):
    """A pass-through stage: the stream is unchanged; the op only marks the pipeline's policy."""

    flat = True

    def check(self, node: "Node", view: CheckView) -> None:
        _policy(node)  # the compiler checks that every route states the same one (policy_of)

    def apply(self, ctx: NodeCtx) -> list:
        return list(ctx.x)


@register
class SkipNonfinite(_Policy):
    r"""Skip optimizer steps whose gradients are not finite; the default policy.

    .. math::
        u = x

    On the stream the op is the identity. It states a policy for the whole step: before
    any op of any route runs, the optimizer checks every gradient the pipeline reads
    (``grad``, ``grads.<loss>``, ``samples``, and the ``loss`` when the pipeline reads it)
    for NaN and Inf, with one reduction per flat gradient buffer. If one is not finite the
    step is skipped: the parameters, every state buffer, the step counter and the ops'
    random generators stay as they were, bit for bit, and the next finite step proceeds as
    if the skipped batch had never been seen. The optimizer counts skipped steps
    (``nonfinite_steps``, ``consecutive_nonfinite``, ``last_step_skipped``, kept in
    ``state_dict``), and more than ``max_consecutive`` skipped steps in a row raise
    ``gradpipe.NonFiniteError``, which names the parameters with non-finite gradients.
    ``max_consecutive=inf`` never raises; ``max_consecutive=0`` raises on the first
    non-finite step (still without touching the parameters).

    ``updates=true`` also skips a step whose *update* is not finite: a NaN or Inf that the
    pipeline's own arithmetic makes from finite gradients (``grad / norm(grad, over=tensor)``
    of a zero gradient, a hyperparameter that divides by zero). The ops write their state as
    they run, so such a step keeps what it may write: the compiled backend writes the new
    state into a second set of flat buffers and keeps the old, the eager backend copies the
    state first; the ops' node state (random generators) and a parameter the compiled kernel
    updates in place are copied. The update of every route (the new value of a
    ``param = ...`` route) is checked, on the compiled backend inside the fused kernel that
    computes it, before any other parameter is written. A non-finite one undoes the step bit
    for bit; it is counted as a skipped step, and ``NonFiniteError`` past the limit says the
    update was not finite and names its parameters. The check reads the update, not the
    state: a moment that overflows to Inf while the update stays finite (``m / sqrt(inf)``
    is 0) is not caught. It is off by default: it costs 1.1x to 1.8x per step
    (``docs/reliability.md``), and ``adam`` must stay within torch's fused Adam.

    The policy covers every route, wherever in the file the op is written; by convention
    it heads the chain: ``grad | skip_nonfinite(3) | adam``. A pipeline that names no
    policy op behaves as ``skip_nonfinite(max_consecutive=10)``.

    Reference: optax ``apply_if_finite`` (skip the update and keep the inner state, count
    consecutive failures); ``torch.amp.GradScaler`` (skip ``optimizer.step()`` when an
    unscaled gradient holds an Inf or a NaN). The check itself: ``torch.aminmax`` per
    gradient on the CPU, GradScaler's ``torch._amp_foreach_non_finite_check_and_unscale_``
    on a GPU (``gradpipe/runtime/nonfinite.py``); inside the fused kernel, as
    ``all(isfinite(g))`` before gated writes, where a planned step of the compiled backend is
    one kernel (``gradpipe/compiler/lowering.py``, ``fused_check``).
    """

    name = "skip_nonfinite"
    summary = "identity; policy: a step with NaN/Inf gradients changes nothing, too many in a row raise"
    reference = "optax apply_if_finite; torch.amp.GradScaler"
    params = (Param("max_consecutive", default=DEFAULT_MAX_CONSECUTIVE, low=0.0, high=math.inf,
                    doc="skipped steps allowed in a row before NonFiniteError; a whole number or inf, "
                        "known at compile time"),
              Param("updates", kind="bool", default=False,
                    doc="also skip (and undo) a step whose update is NaN or Inf; written true or false"))


@register
class AllowNonfinite(_Policy):
    r"""No finiteness check: NaN and Inf gradients go into the pipeline, as in ``torch.optim``.

    .. math::
        u = x

    On the stream the op is the identity. It turns off the check that
    ``skip_nonfinite`` (the default policy) makes before every step, and with it the
    reduction over the gradients and the host synchronisation that reads its result: a
    NaN or Inf gradient then reaches the state and the parameters, as it does with
    ``torch.optim.Adam``. For benchmarks against torch, or loops that already check (a
    ``torch.amp.GradScaler`` skips the step itself before the optimizer sees an Inf).
    Like ``skip_nonfinite`` it covers every route, wherever it is written.

    Reference: ``torch.optim`` (no check).
    """

    name = "allow_nonfinite"
    summary = "identity; policy: no finiteness check (NaN/Inf reach state and parameters, as in torch.optim)"
    reference = "torch.optim"
