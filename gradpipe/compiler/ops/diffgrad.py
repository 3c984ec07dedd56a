"""``diffgrad``: Adam scaled by diffGrad's friction (the fixed ``diffGrad_v2``)."""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, adam_moments, register, sqrt_s


@register
class DiffGrad(TensorOp):
    r"""diffGrad: Adam's step times a friction coefficient from the change in the input.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) x_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) x_t^2

        \xi_t = \sigma(|x_{t-1} - x_t|),\qquad x_{t-1} \leftarrow \text{copy of } x_t

        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\; \xi_t \odot \frac{m_t}{\sqrt{v_t} + \epsilon}

    :math:`m, v` and the previous input start at zero, so :math:`\xi_1 = \sigma(|x_1|)`.
    Friction multiplies the first moment *after* its update; it lies in
    :math:`[0.5, 1)`, so a diffGrad step is between half and all of Adam's.
    The epsilon placement (:math:`\sqrt{v} + \epsilon`, bias correction folded
    into the step size) follows the authors' code.

    The previous input is stored as a *copy*. The original ``diffGrad.py``
    kept a reference to ``p.grad``, which an in-place ``zero_grad`` overwrote,
    so :math:`\xi \equiv 0.5` from step 2 on; ``diffGrad_v2.py`` fixed this
    with ``grad.clone()``, and so does this op. Under ``scale(diffgrad)`` the
    input is the stream entering the op (e.g. the output of ``clip_median``).

    Reference: S. R. Dubey et al., "diffGrad: An Optimization Method for
    Convolutional Neural Networks", IEEE TNNLS 2019 (arXiv:1909.11015);
    shivram1987/diffGrad ``diffGrad_v2.py``.
    """

    name = "diffgrad"
    summary = "Adam moments times friction sigmoid(|x_prev - x|) (diffGrad_v2)"
    reference = "Dubey et al. 2019, arXiv:1909.11015; shivram1987/diffGrad diffGrad_v2.py"
    is_rule = True
    flat = True
    params = (
        Param("b1", default=0.9, low=0.0, high=1.0, high_closed=False, doc="first-moment decay"),
        Param("b2", default=0.999, low=0.0, high=1.0, high_closed=False, doc="second-moment decay"),
        Param("eps", default=1e-8, low=0.0, doc="added to sqrt(v)"),
    )
    buffers = (Buffer("m", "first moment"), Buffer("v", "second moment"),
               Buffer("prev", "copy of the previous input"))

    def update(self, x, state, a, lane):
        m, v = adam_moments(state, x, a.b1, a.b2)
        prev = state["prev"]
        friction = torch.sigmoid((prev - x).abs_())
        prev.copy_(x)
        step_size = sqrt_s(1 - a.b2 ** lane.step) / (1 - a.b1 ** lane.step)
        return (m * friction).div_(v.sqrt().add_(a.eps)).mul_(step_size)
