"""``decay``: weight decay, ``add(wd * param)``."""

from __future__ import annotations

from .base import Param, TensorOp, add_s, is_zero, register


@register
class Decay(TensorOp):
    r"""Weight decay: :math:`u = x + \mathrm{wd}\,\theta`.

    Placed before a scale rule it is L2 regularisation (``torch.optim.Adam``'s
    ``weight_decay``); placed after, it is decoupled weight decay
    (``torch.optim.AdamW``; Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019), since the runtime applies ``θ ← θ - lr·u``.
    ``decay(0)`` is removed by constant folding.
    """

    name = "decay"
    flat = True
    summary = "x + wd * param (L2 before a rule, decoupled after)"
    reference = "Loshchilov & Hutter 2019; torch.optim.AdamW"
    reads_param = True
    params = (Param("wd", default=0.0, low=0.0, doc="decay coefficient"),)

    def identity(self, const_args):
        return const_args.get("wd") == 0

    def needs_param(self, args):
        return not is_zero(args.get("wd", 0.0))

    def update(self, x, state, a, lane):
        if is_zero(a.wd):
            return x
        return add_s(x, lane.param, a.wd)
