"""``lion``: the Lion update direction (Chen et al., 2023)."""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, axpy_, register


@register
class Lion(TensorOp):
    r"""EvoLved Sign Momentum.

    .. math::
        u_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) x_t),\qquad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) x_t

    ``m`` starts at zero. Decoupled weight decay is a separate ``decay`` stage
    after ``lion`` (the paper's ``θ ← θ - lr(u + λθ)``).

    Reference: X. Chen et al., "Symbolic Discovery of Optimization Algorithms",
    NeurIPS 2023 (arXiv:2302.06675), Algorithm 2; google/automl ``lion_pytorch.py``.
    """

    name = "lion"
    flat = True
    summary = "sign of an interpolated momentum (Lion)"
    reference = "Chen et al. 2023, arXiv:2302.06675"
    is_rule = True
    params = (
        Param("b1", default=0.9, low=0.0, high=1.0, doc="interpolation for the update"),
        Param("b2", default=0.99, low=0.0, high=1.0, doc="momentum decay"),
    )
    buffers = (Buffer("m", "momentum"),)

    def update(self, x, state, a, lane):
        m = state["m"]
        u = torch.sign(m * a.b1 + x * (1 - a.b1))
        axpy_(m.mul_(a.b2), x, 1 - a.b2)
        return u
