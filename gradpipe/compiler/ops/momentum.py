"""``momentum``: heavy-ball / Nesterov momentum, as torch.optim.SGD."""

from __future__ import annotations

from .base import Buffer, Param, TensorOp, add_s, axpy_, is_zero, on_first, register


@register
class Momentum(TensorOp):
    r"""Heavy-ball momentum with optional dampening and Nesterov's correction.

    .. math::
        b_1 = x_1,\qquad b_t = \beta b_{t-1} + (1-\text{dampening})\, x_t

        u_t = x_t + \beta b_t \ \text{(nesterov)} \quad\text{else}\quad u_t = b_t

    This is ``torch.optim.SGD``'s momentum exactly: the buffer takes the first
    input as it is (not decayed from zero, which differs when ``dampening > 0``),
    and with ``beta = 0`` (a constant, or the param group's value) the op is the
    identity and keeps no state. A ``beta`` computed from ``step`` that is 0 at
    some step still keeps and updates its buffer.

    Reference: B. T. Polyak (1964); I. Sutskever et al., "On the importance of
    initialization and momentum in deep learning", ICML 2013; ``torch.optim.SGD``.
    """

    name = "momentum"
    flat = True
    summary = "heavy-ball or Nesterov momentum (torch.optim.SGD semantics)"
    reference = "Polyak 1964; Sutskever et al. 2013; torch.optim.SGD"
    is_rule = True
    params = (
        Param("beta", default=0.9, low=0.0, high=1.0, doc="momentum coefficient"),
        Param("nesterov", kind="bool", default=False, doc="apply Nesterov's correction"),
        Param("dampening", default=0.0, low=0.0, high=1.0, doc="scales the new input by 1 - dampening"),
    )
    buffers = (Buffer("buf", "momentum buffer"),)

    def buffers_for(self, args):
        return () if args.get("beta") == 0 else self.buffers

    def identity(self, const_args):
        return const_args.get("beta") == 0

    def update(self, x, state, a, lane):
        if is_zero(a.beta):  # a group with momentum 0: no buffer, as torch's SGD
            return x
        # torch's first step copies the input; later ones decay and add (dampened)
        buf = on_first(lane.fresh, state["buf"], x, lambda b: axpy_(b.mul_(a.beta), x, 1 - a.dampening))
        if a.nesterov:
            return add_s(x, buf, a.beta)
        return buf
