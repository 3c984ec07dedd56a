"""``rms``: RMSprop's scale rule, as torch.optim.RMSprop."""

from __future__ import annotations

import torch

from .base import Buffer, Denominator, Param, TensorOp, addcmul_s, register


@register
class Rms(TensorOp, Denominator):
    r"""Divide by a running root mean square of the input (Tieleman & Hinton, 2012).

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) x_t^2,\qquad u_t = \frac{x_t}{\sqrt{v_t} + \epsilon}

    With ``centered=true`` the running mean :math:`\bar g_t = \alpha \bar g_{t-1} + (1-\alpha) x_t`
    is subtracted: :math:`u_t = x_t / (\sqrt{v_t - \bar g_t^2} + \epsilon)`.
    ``v`` starts at zero and there is no bias correction, as in ``torch.optim.RMSprop``.

    Reference: T. Tieleman, G. Hinton, Lecture 6.5 - RMSProp, COURSERA 2012;
    A. Graves, "Generating Sequences With Recurrent Neural Networks", 2013 (centered);
    ``torch.optim.RMSprop``.
    """

    name = "rms"
    flat = True
    summary = "RMSprop scaling x / (sqrt(v) + eps) (torch.optim.RMSprop semantics)"
    reference = "Tieleman & Hinton 2012; torch.optim.RMSprop"
    is_rule = True
    params = (
        Param("alpha", default=0.99, low=0.0, high=1.0, doc="decay of the squared average"),
        Param("eps", default=1e-8, low=0.0, doc="added to the root mean square"),
        Param("centered", kind="bool", default=False, doc="subtract the squared running mean"),
    )
    buffers = (Buffer("v", "running average of x^2"), Buffer("g_avg", "running mean of x (centered only)"))

    def buffers_for(self, args):
        return self.buffers[:1] if args.get("centered") is False else self.buffers

    def update(self, x, state, a, lane):
        v = state["v"]
        addcmul_s(v.mul_(a.alpha), x, x, 1 - a.alpha)
        if a.centered:
            g_avg = state["g_avg"]
            g_avg.lerp_(x, 1 - a.alpha)
            avg = v.addcmul(g_avg, g_avg, value=-1).sqrt_()
        else:
            avg = v.sqrt()
        avg.add_(a.eps)
        return x / avg

    def denominator(self, state: dict[str, torch.Tensor], args, step: int) -> torch.Tensor:
        r"""The divisor :math:`d_t` of the input, :math:`u_t = x_t / d_t`:
        :math:`d_t = \sqrt{v_t} + \epsilon` (centered: :math:`\sqrt{v_t - \bar g_t^2} + \epsilon`),
        for wrappers that scale other coefficients the way RMSprop scales its input
        (``wavelet``). Read after this step's update."""
        v = state["v"]
        if args.centered:
            g_avg = state["g_avg"]
            return v.addcmul(g_avg, g_avg, value=-1).sqrt_().add_(args.eps)
        return v.sqrt().add_(args.eps)
