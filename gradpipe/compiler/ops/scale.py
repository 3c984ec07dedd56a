"""``scale``: multiply by a number, or apply a scale rule."""

from __future__ import annotations

from .base import Param, Rewrite, TensorOp, register


@register
class Scale(TensorOp):
    r"""``scale(c)`` multiplies the stream by a scalar: :math:`u = c\,x`.

    ``scale(rule)`` with an op (``scale(adam)``, ``scale(diffgrad)``) applies
    that rule to the stream, like optax's ``scale_by_*`` transforms; it is
    exactly ``| rule`` and shares its state names. ``scale(signal)`` with a
    stream (``scale(param)``, ``scale((grad | sign))``) multiplies elementwise.
    The compiler turns the last two forms into the rule itself and into
    arithmetic (the op's ``rewrite`` hook); a node of this op is the scalar case.
    ``scale(1)`` is removed by constant folding.
    """

    name = "scale"
    flat = True
    summary = "multiply by a scalar; scale(rule) applies a scale rule"
    reference = "optax.scale / scale_by_*"
    params = (Param("x", kind="any", doc="a number, a rule (op), or a signal"),)

    def rewrite(self, kinds):
        if kinds.get("x") == "rule":
            return Rewrite("apply", "x")  # scale(adam) is | adam, under the stage's name
        if kinds.get("x") == "signal":
            return Rewrite("arith", "x", "*")  # scale(param) multiplies elementwise
        return None

    def identity(self, const_args):
        return const_args.get("x") == 1

    def update(self, x, state, a, lane):
        return x * a.x
