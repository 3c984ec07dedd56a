"""``grams``: Grams' scale rule, the sign of the input times Adam's momentum magnitude."""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, adam_moments, register, sqrt_s


@register
class Grams(TensorOp):
    r"""Grams: the direction of the current input, the magnitude of Adam's step.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) x_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) x_t^2

        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
              \operatorname{sign}(x_t) \odot \frac{|m_t|}{\sqrt{v_t} + \epsilon}

    :math:`m` and :math:`v` are Adam's moments and start at zero; the update
    takes its sign from the input and its magnitude from the momentum, so it
    never points against the current gradient. :math:`\operatorname{sign}(0) = 0`:
    a coordinate whose input is exactly zero gets no update, whatever its
    momentum. The epsilon placement (:math:`\sqrt{v} + \epsilon`, bias
    corrections folded into the step size) and the default ``eps=1e-6`` follow
    the official code. That code computes the direction with ``grad.sign_()``,
    overwriting ``p.grad`` in place; this op leaves its input untouched.

    Grams' decoupled weight decay :math:`\theta \leftarrow \theta - \mathrm{lr}\cdot\mathrm{wd}\cdot\theta`
    (applied before the step in the official code) is ``| decay(wd)`` after
    the rule: since :math:`u_t` does not depend on :math:`\theta`, both give
    :math:`\theta - \mathrm{lr}(u_t + \mathrm{wd}\,\theta)`. The built-in
    ``grams`` pipeline is ``grad | grams(...) | decay(weight_decay)``.
    Usable as ``| grams`` or ``| scale(grams)``.

    Reference: Y. Cao, X. Li, Z. Song, "Grams: Gradient Descent with Adaptive
    Momentum Scaling", arXiv:2412.17107 (2024; ICLR 2025 SCOPE workshop);
    Gunale0926/Grams ``grams/src/grams.py``.
    """

    name = "grams"
    summary = "sign(x) * |m| / (sqrt(v) + eps), Adam moments, bias-corrected step size"
    reference = "Cao, Li & Song 2024, arXiv:2412.17107; Gunale0926/Grams"
    is_rule = True
    flat = True
    params = (
        Param("b1", default=0.9, low=0.0, high=1.0, high_closed=False, doc="first-moment decay"),
        Param("b2", default=0.999, low=0.0, high=1.0, high_closed=False, doc="second-moment decay"),
        Param("eps", default=1e-6, low=0.0, doc="added to sqrt(v)"),
    )
    buffers = (Buffer("m", "first moment"), Buffer("v", "second moment"))

    def update(self, x, state, a, lane):
        m, v = adam_moments(state, x, a.b1, a.b2)
        step_size = sqrt_s(1 - a.b2 ** lane.step) / (1 - a.b1 ** lane.step)
        return torch.sign(x).mul_(m.abs()).div_(v.sqrt().add_(a.eps)).mul_(step_size)
