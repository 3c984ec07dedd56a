"""``add``: add a signal (or a number) to the stream."""

from __future__ import annotations

from .base import Param, TensorOp, register


@register
class Add(TensorOp):
    r"""``add(s)``: :math:`u = x + s`, where ``s`` is a signal (``add(wd * param)``,
    ``add(ema)``, ``add((grad | sign))``) or a number.

    Reference: optax ``add_decayed_weights`` is ``add(wd * param)``.
    """

    name = "add"
    flat = True
    summary = "x + s for a signal or number s"
    reference = "optax.add_decayed_weights (as add(wd * param))"
    params = (Param("s", kind="value", doc="the signal (or number) to add"),)

    def identity(self, const_args):
        return const_args.get("s") == 0

    def update(self, x, state, a, lane):
        return x + (lane.inputs["s"] if "s" in lane.inputs else a.s)
