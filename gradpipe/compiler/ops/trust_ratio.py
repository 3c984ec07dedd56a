"""``trust_ratio``: the LARS/LAMB layer-wise trust ratio ||param|| / ||x||."""

from __future__ import annotations

import torch

from .base import Param, TensorOp, register


@register
class TrustRatio(TensorOp):
    r"""Rescale each tensor to the norm of its parameter (LARS, LAMB).

    .. math::
        r = \frac{\lVert \theta \rVert_2}{\lVert x \rVert_2 + \epsilon},\qquad
        u = \begin{cases} r\,x & \lVert \theta \rVert > 0 \text{ and } \lVert x \rVert > 0 \\
                          x & \text{otherwise} \end{cases}

    :math:`\theta` is the parameter before the step; norms are per tensor. With
    ``eps=0`` (the default) the update has the parameter's norm, so the step
    is ``lr`` times :math:`\lVert\theta\rVert` in every layer. LAMB is
    ``grad | adam | decay(wd) | trust_ratio`` (the ratio of the Adam step
    including the decay term); LARS is ``grad | decay(wd) | trust_ratio | momentum``
    with the trust coefficient :math:`\eta` in ``lr``. The placement of ``eps``
    (added to the update's norm, ratio 1 when either norm is zero) follows
    optax's ``scale_by_trust_ratio``.

    The papers differ in details this op leaves to the pipeline: LARS writes
    :math:`\eta\lVert w\rVert/(\lVert\nabla L\rVert + \beta\lVert w\rVert)`
    with the weight decay :math:`\beta` inside the denominator; LAMB scales by
    :math:`\phi(\lVert w\rVert)/\lVert r + \lambda w\rVert` with a scaling
    function :math:`\phi`, which most implementations (optax among them) take
    to be the identity, as here.

    Reference: Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888 (2017) (LARS); Y. You et al.,
    "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    ICLR 2020 (arXiv:1904.00962, 2019) (LAMB); optax ``scale_by_trust_ratio``.
    """

    name = "trust_ratio"
    summary = "x * ||param|| / (||x|| + eps) per tensor (1 when a norm is zero)"
    reference = "You et al. 2019, arXiv:1904.00962 (LAMB); You et al. 2017 (LARS); optax.scale_by_trust_ratio"
    reads_param = True
    params = (Param("eps", default=0.0, low=0.0, doc="added to the norm of x"),)

    def reduction(self, args):
        return "tensor"

    def update(self, x, state, a, lane):
        pn = torch.linalg.vector_norm(lane.param, 2)
        xn = torch.linalg.vector_norm(x, 2)
        ratio = torch.where((pn > 0) & (xn > 0), pn / (xn + a.eps), torch.ones_like(pn))
        return x * ratio
