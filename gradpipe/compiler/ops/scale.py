"""``scale``: multiply by a number, or apply a scale rule."""

from __future__ import annotations

from .base import Param, TensorOp, register


@register
class Scale(TensorOp):
    r"""``scale(c)`` multiplies the stream by a scalar: :math:`u = c\,x`.

    ``scale(rule)`` with an op (``scale(adam)``, ``scale(diffgrad)``) applies
    that rule to the stream, like optax's ``scale_by_*`` transforms; it is
    exactly ``| rule`` and shares its state names. ``scale(signal)`` with a
    stream (``scale(param)``, ``scale((grad | sign))``) multiplies elementwise.
    The compiler rewrites the last two forms; this op is the scalar case.
    ``scale(1)`` is removed by constant folding.
    """

    name = "scale"
    flat = True
    summary = "multiply by a scalar; scale(rule) applies a scale rule"
    reference = "optax.scale / scale_by_*"
    params = (Param("x", kind="any", doc="a number, a rule (op), or a signal"),)

    def identity(self, const_args):
        return const_args.get("x") == 1

    def update(self, x, state, a, step, inputs, param):
        return x * a.x
