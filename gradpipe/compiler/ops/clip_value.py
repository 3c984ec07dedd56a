"""``clip_value``: clamp every coordinate to [-max, max]."""

from __future__ import annotations

import torch

from .base import Param, TensorOp, register


@register
class ClipValue(TensorOp):
    r"""Value clipping, :math:`u = \operatorname{clamp}(x, -\text{max}, \text{max})`,
    as ``torch.nn.utils.clip_grad_value_``.
    """

    name = "clip_value"
    flat = True
    summary = "clamp(x, -max, max)"
    reference = "torch.nn.utils.clip_grad_value_"
    params = (Param("max", default=1.0, low=0.0, doc="largest allowed magnitude"),)

    def update(self, x, state, a, lane):
        return torch.clamp(x, -a.max, a.max)
