"""``clip_norm``: rescale so the L2 norm is at most ``max`` (torch.nn.utils.clip_grad_norm_)."""

from __future__ import annotations

import torch

from .base import NodeCtx, Op, Param, register, route_norms


@register
class ClipNorm(Op):
    r"""Norm clipping with ``torch.nn.utils.clip_grad_norm_`` semantics.

    .. math::
        n = \lVert x \rVert_2,\qquad u = x \cdot \min\!\left(1, \frac{\text{max}}{n + 10^{-6}}\right)

    With ``scope=global`` (the default) :math:`n` is the norm over every tensor
    the route covers (the norm of the per-tensor norms); with ``scope=tensor``
    each tensor is clipped by its own norm.

    Reference: R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training
    recurrent neural networks", ICML 2013; ``torch.nn.utils.clip_grad_norm_``.
    """

    name = "clip_norm"
    flat = True
    summary = "x * min(1, max / (||x|| + 1e-6)), global or per tensor"
    reference = "Pascanu et al. 2013; torch.nn.utils.clip_grad_norm_"
    params = (
        Param("max", default=1.0, low=0.0, doc="largest allowed norm"),
        Param("scope", kind="choice", default="global", choices=("global", "tensor"),
              doc="norm over all tensors of the route, or per tensor"),
    )

    def reduction(self, args):
        return args.get("scope", "global")


    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        xs = ctx.x
        if not xs:
            return []
        totals = route_norms(xs, ctx.args[0].scope)
        out = []
        for x, n, a in zip(xs, totals, ctx.args):
            coef = torch.clamp(a.max / (n + 1e-6), max=1.0)
            out.append(x * coef)
        return out
