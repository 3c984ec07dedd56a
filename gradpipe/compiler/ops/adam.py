"""``adam``: Adam's scale rule, with torch.optim.Adam's epsilon placement."""

from __future__ import annotations

import torch

from .base import Buffer, Denominator, Param, TensorOp, addcmul_s, register, sqrt_s


@register
class Adam(TensorOp, Denominator):
    r"""Scale by Adam's bias-corrected moments (Kingma & Ba, 2015).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) x_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) x_t^2

        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    ``eps`` is added after the bias correction of :math:`\sqrt{v}`, exactly as
    ``torch.optim.Adam`` does (the paper adds it to :math:`\sqrt{\hat v}`, which
    is the same thing). ``m`` and ``v`` start at zero. Usable as ``| adam`` or
    ``| scale(adam)``.

    Reference: D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization",
    ICLR 2015; ``torch.optim.Adam`` (``_single_tensor_adam``).
    """

    name = "adam"
    summary = "Adam's bias-corrected moment scaling (torch epsilon placement)"
    reference = "Kingma & Ba 2015; torch.optim.Adam"
    is_rule = True
    flat = True
    params = (
        Param("b1", default=0.9, low=0.0, high=1.0, high_closed=False, doc="first-moment decay"),
        Param("b2", default=0.999, low=0.0, high=1.0, high_closed=False, doc="second-moment decay"),
        Param("eps", default=1e-8, low=0.0, doc="added to the bias-corrected sqrt(v)"),
    )
    buffers = (Buffer("m", "first moment"), Buffer("v", "second moment"))

    def update(self, x, state, a, lane):
        m, v = state["m"], state["v"]
        m.lerp_(x, 1 - a.b1)
        addcmul_s(v.mul_(a.b2), x, x, 1 - a.b2)
        bc1 = 1 - a.b1 ** lane.step
        bc2_sqrt = sqrt_s(1 - a.b2 ** lane.step)
        denom = (v.sqrt() / bc2_sqrt).add_(a.eps)
        return (m / bc1).div_(denom)

    def denominator(self, state: dict[str, torch.Tensor], args, step: int) -> torch.Tensor:
        r"""The divisor :math:`d_t` of the first moment, :math:`u_t = m_t / d_t`, for wrappers
        that scale other coefficients the way Adam scales its input (``wavelet``):

        .. math:: d_t = (1-\beta_1^t)\,\big(\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon\big)

        Equivalently :math:`d_t = (\sqrt{v_t} + \epsilon\sqrt{1-\beta_2^t}) / c_t` with the
        step factor :math:`c_t` of :meth:`step_factor`, so :math:`1/d_t` is Hugging Face's
        ``step_size / (sqrt(v) + eps_hf)`` (lr = 1) with ``eps_hf = eps * sqrt(1 - b2^t)``.
        Read after this step's update."""
        bc1 = 1 - args.b1 ** step
        bc2_sqrt = sqrt_s(1 - args.b2 ** step)
        return (state["v"].sqrt() / bc2_sqrt).add_(args.eps).mul_(bc1)

    def step_factor(self, args, step: int) -> float:
        r"""The time-dependent factor :math:`c_t = \sqrt{1-\beta_2^t}/(1-\beta_1^t)` of the
        update: :math:`u_t = c_t\, m_t / (\sqrt{v_t} + \epsilon\sqrt{1-\beta_2^t})`. Wrappers
        that watch the growth of ``m / (sqrt(v) + eps)`` (GWT's norm-growth limiter) divide it out."""
        return sqrt_s(1 - args.b2 ** step) / (1 - args.b1 ** step)
