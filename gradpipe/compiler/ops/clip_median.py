"""``clip_median``: online estimate of the median gradient by clipped updates."""

from __future__ import annotations

import torch

from .base import Buffer, NodeCtx, Op, Param, register, route_norms


@register
class ClipMedian(Op):
    r"""Track the median of the stream over steps with clipped residual updates.

    .. math::
        r_t = x_t - m_{t-1},\qquad m_t = m_{t-1} + \operatorname{clip}_\tau(r_t),\qquad u_t = m_t

    ``geometry=l2``: :math:`\operatorname{clip}_\tau(r) = r \min(1, \tau / \lVert r \rVert_2)`, one
    stochastic proximal-point step on :math:`\mathbb E\lVert m - x\rVert_2` (the geometric
    median), with the norm over every tensor of the route (``scope=global``, the
    paper's :math:`x \in \mathbb R^d`) or per tensor. ``geometry=coord``:
    :math:`\operatorname{clip}_\tau(r) = \operatorname{clamp}(r, -\tau, \tau)`, the coordinate-wise
    median. :math:`m_0 = 0`; :math:`\operatorname{clip}_\tau(0) = 0`.

    With no memory (``reset=true``: :math:`m_{t-1} := 0` every step) this is plain
    clipping, the paper's point: ``l2`` is norm clipping (``clip_norm``, up to
    torch's ``1e-6`` in the denominator) and ``coord`` is ``clip_value``.

    ``tau`` has the units of the gradient. Its default, 1.0, is the customary
    ``clip_grad_norm_`` threshold, so swapping ``clip_norm`` for ``clip_median``
    keeps the scale; tune it like a clipping threshold.

    Only the abstract was available: whether the paper adds a step size to the
    update is unverified (see ``docs/ops.md``).

    Reference: F. Schaipp, G. Garrigos, U. Simsekli, R. Gower, "SGD with
    Clipping is Secretly Estimating the Median Gradient", arXiv:2402.12828
    (2024; TMLR 2025 as "Tracking the Median of Gradients with a Stochastic
    Proximal Point Method").
    """

    name = "clip_median"
    flat = True
    summary = "m <- m + clip_tau(x - m), output m (online median)"
    reference = "Schaipp et al. 2024, arXiv:2402.12828"
    params = (
        Param("tau", default=1.0, low=0.0, doc="clipping radius of the residual"),
        Param("geometry", kind="choice", default="l2", choices=("l2", "coord"),
              doc="l2: geometric median (norm clip); coord: coordinate-wise median (value clip)"),
        Param("scope", kind="choice", default="global", choices=("global", "tensor"),
              doc="norm over all tensors of the route, or per tensor (l2 only)"),
        Param("reset", kind="bool", default=False, doc="forget m every step (plain clipping)"),
    )
    buffers = (Buffer("m", "median estimate"),)

    def reduction(self, args):
        return args.get("scope", "global") if args.get("geometry", "l2") == "l2" else None

    def buffers_for(self, args):
        return () if args.get("reset") is True else self.buffers


    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        xs = ctx.x
        if not xs:
            return []
        a0 = ctx.args[0]
        ms = []
        for x, st, a in zip(xs, ctx.states, ctx.args):
            if a.reset:
                ms.append(torch.zeros_like(x))
            else:
                ms.append(st["m"])
        rs = [x - m for x, m in zip(xs, ms)]
        if a0.geometry == "coord":
            steps = [torch.clamp(r, -a.tau, a.tau) for r, a in zip(rs, ctx.args)]
        else:
            norms = route_norms(rs, a0.scope)
            steps = []
            for r, n, a in zip(rs, norms, ctx.args):
                # min(1, tau / n), with clip(0) = 0: a zero residual gives a zero step anyway
                coef = torch.where(n > a.tau, a.tau / torch.clamp(n, min=torch.finfo(n.dtype).tiny), 1.0)
                steps.append(r * coef)
        out = []
        for m, s, a, st in zip(ms, steps, ctx.args, ctx.states):
            if a.reset:
                out.append(s)
            else:
                m.add_(s)
                out.append(m)
        return out
