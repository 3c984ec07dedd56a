"""``agc``: unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets)."""

from __future__ import annotations

import torch

from .base import Param, TensorOp, register


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (rows of dim 0) for ndim > 1, of the whole tensor otherwise."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, 2)
    return torch.linalg.vector_norm(x, 2, dim=tuple(range(1, x.dim())), keepdim=True)


@register
class AGC(TensorOp):
    r"""Adaptive gradient clipping: clip each unit's input relative to its weight norm.

    .. math::
        M_i = \text{clip}\cdot\max(\lVert W_i \rVert_2, \epsilon),\qquad
        u_i = x_i \cdot \min\!\left(1, \frac{M_i}{\lVert x_i \rVert_2}\right)

    A unit :math:`i` is a row along dimension 0 (an output unit: a row of a
    ``Linear`` weight, an output channel of a convolution) for tensors with two
    or more dimensions, and the whole tensor for vectors and scalars.
    :math:`W` is the parameter before the step. A unit with
    :math:`\lVert x_i \rVert = 0` passes through (no division by zero). The
    NFNet code writes the same rule as ``where(norm < M, x, x * M / max(norm, 1e-6))``;
    since :math:`M \ge \text{clip}\cdot\epsilon`, that only differs from this op
    when ``clip * eps < 1e-6``.

    The NFNet code (JAX, ``HWIO`` kernels) reduces over every axis but the
    last, the output axis; torch puts the output first, so this op reduces
    over every axis but dim 0, as timm's ``adaptive_clip_grad`` does. The
    paper does not clip the final classifier layer; leave it out with a route.

    Reference: A. Brock, S. De, S. L. Smith, K. Simonyan, "High-Performance
    Large-Scale Image Recognition Without Normalization", ICML 2021
    (arXiv:2102.06171); deepmind-research ``nfnets/agc_optax.py``; timm
    ``adaptive_clip_grad``.
    """

    name = "agc"
    summary = "unit-wise clip: ||x_i|| <= clip * max(||W_i||, eps)"
    reference = "Brock et al. 2021, arXiv:2102.06171; timm adaptive_clip_grad"
    reads_param = True
    params = (
        Param("clip", default=0.01, low=0.0, doc="largest allowed ratio ||x_i|| / ||W_i||"),
        Param("eps", default=1e-3, low=0.0, doc="floor on the weight norm"),
    )

    def reduction(self, args):
        return "tensor"

    def update(self, x, state, a, lane):
        max_norm = _unitwise_norm(lane.param).clamp(min=a.eps).mul_(a.clip)
        norm = _unitwise_norm(x)
        tiny = torch.finfo(norm.dtype).tiny
        coef = torch.where(norm > max_norm, max_norm / norm.clamp(min=tiny), torch.ones_like(norm))
        return x * coef
