"""``sign``: the elementwise sign (signSGD)."""

from __future__ import annotations

import torch

from .base import TensorOp, register


@register
class Sign(TensorOp):
    r"""Elementwise sign, :math:`u = \operatorname{sign}(x)` with :math:`\operatorname{sign}(0) = 0`.

    Reference: J. Bernstein et al., "signSGD: Compressed Optimisation for
    Non-Convex Problems", ICML 2018.
    """

    name = "sign"
    flat = True
    summary = "elementwise sign (signSGD)"
    reference = "Bernstein et al. 2018"
    is_rule = True

    def update(self, x, state, a, lane):
        return torch.sign(x)
