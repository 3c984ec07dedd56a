"""``project_orthogonal``: remove the component of the stream along a reference signal."""

from __future__ import annotations

import math

import torch

from .base import NodeCtx, Op, Param, register


@register
class ProjectOrthogonal(Op):
    r"""Project the stream onto the orthogonal complement of a reference :math:`r`.

    .. math::
        c = \min\!\left(\frac{\langle a, r\rangle}{\langle r, r\rangle + \epsilon},\ c_{\max}\right),
        \qquad u = a - c\, r

    The inner products run over every tensor of the route (``scope=global``,
    as Bloop's ``tree_dot``) or per tensor. :math:`c_{\max} = \infty` (the
    default) is Bloop's projection; ``max_coef=0`` removes only a conflicting
    component (PCGrad-style). If :math:`r = 0` then :math:`c = 0` and the
    stream passes unchanged.

    The reference is a signal: ``ema`` (the EMA of this op's own input, weight
    0.1 on the new value: the user's ``project_orthogonal(ema)``), ``param``
    (OrthoGrad's direction), ``grads.<name>`` (ODICE) or ``ema(grads.main)``
    (Bloop's auxiliary-loss form). Property: :math:`\langle u, r\rangle \approx 0`.

    Reference: P. Ablin, J. Liu, S. Kaur et al., "Careful with that Scalpel:
    Improving Gradient Surgery with an EMA", ICML 2024 (apple/ml-bloop
    ``bloop_direction``); L. Mao et al., ODICE, ICLR 2024.
    """

    name = "project_orthogonal"
    flat = True
    summary = "a - <a,r>/(<r,r>+eps) r against a reference signal r"
    reference = "Ablin et al. 2024 (Bloop); Mao et al. 2024 (ODICE)"
    params = (
        Param("ref", kind="signal", doc="the reference r"),
        Param("scope", kind="choice", default="global", choices=("global", "tensor"),
              doc="inner products over all tensors of the route, or per tensor"),
        Param("eps", default=1e-7, low=0.0, doc="added to <r, r>"),
        Param("max_coef", default=math.inf, doc="upper bound on the projection coefficient c"),
    )

    def reduction(self, args):
        return args.get("scope", "global")


    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        xs, rs = ctx.x, ctx.inputs["ref"]
        if not xs:
            return []
        ar = [torch.sum(x * r) for x, r in zip(xs, rs)]
        rr = [torch.sum(r * r) for r in rs]
        if ctx.args[0].scope == "global":
            ar = [torch.stack(ar).sum()] * len(xs)
            rr = [torch.stack(rr).sum()] * len(xs)
        out = []
        for x, r, num, den, a in zip(xs, rs, ar, rr, ctx.args):
            c = num / (den + a.eps)
            if isinstance(a.max_coef, torch.Tensor) or a.max_coef != math.inf:
                c = torch.clamp(c, max=a.max_coef)
            out.append(x - c * r)
        return out
