"""``dp_clip`` and ``dp_noise``: DP-SGD on per-sample gradients (the ``samples`` source)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...dsl.diagnostics import GradError
from .. import scalars as S
from .base import CheckView, NodeCtx, Op, Param, SeededOp, register

if TYPE_CHECKING:
    from ..ir import Node


@register
class DPClip(Op):
    r"""Clip each example's gradient to L2 norm at most :math:`C` (DP-SGD).

    The input is the ``samples`` stream: per parameter a tensor of shape
    ``(B, *param.shape)``, one gradient per example. The norm of example
    :math:`b` runs over every tensor of the route (the whole per-example
    gradient, as DP-SGD requires):

    .. math::
        \bar g_b = g_b \,/\, \max\!\left(1, \frac{\lVert g_b\rVert_2}{C}\right)

    The output is still per-example; ``dp_noise`` sums it, adds noise and
    averages. Put the whole model on one route: clipping per route would bound
    each route's share, not the whole gradient.

    Reference: M. Abadi, A. Chu, I. Goodfellow et al., "Deep Learning with
    Differential Privacy", CCS 2016 (Algorithm 1); optax
    ``contrib.differentially_private_aggregate``.
    """

    name = "dp_clip"
    summary = "clip every example's gradient (global over the route) to norm C"
    reference = "Abadi et al. 2016 (DP-SGD)"
    per_sample = "map"
    params = (Param("clip", default=1.0, low=0.0, low_closed=False, doc="the clipping norm C"),)

    def reduction(self, args):
        return "global"

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        xs = ctx.x
        if not xs:
            return []
        sq = torch.stack([x.reshape(x.shape[0], -1).pow(2).sum(1) for x in xs]).sum(0)  # (B,)
        factor = 1.0 / torch.clamp(sq.sqrt() / ctx.args[0].clip, min=1.0)
        return [x * factor.view((-1,) + (1,) * (x.dim() - 1)) for x in xs]


@register
class DPNoise(SeededOp):
    r"""Sum per-example gradients, add Gaussian noise calibrated to their sensitivity, average.

    .. math::
        u = \frac{1}{B}\left(\sum_{b=1}^{B} \bar g_b + \mathcal N(0, \sigma^2 \Delta^2 I)\right)

    :math:`\Delta` is the L2 sensitivity of one example's contribution: after
    ``dp_clip(C)`` it is :math:`C` (taken automatically when ``sensitivity`` is
    left at 0); without clipping ("DP-SGD without clipping", Lipschitz
    networks) it is the bound :math:`\Delta` on every per-example gradient
    norm that the network's Lipschitz constants give, and must be written:
    ``samples | dp_noise(sigma = 1.0, sensitivity = 2.5)``. :math:`\sigma` is the
    noise multiplier (the privacy accounting, e.g. with a moments accountant,
    is outside the optimizer). Noise is drawn from the node's seeded
    generator, saved in ``state_dict``.

    Reference: Abadi et al., CCS 2016; L. Béthune, T. Massena, T. Boissin et
    al., "DP-SGD Without Clipping: The Lipschitz Neural Network Way", ICLR 2024.
    """

    name = "dp_noise"
    summary = "(sum of per-example gradients + N(0, sigma^2 Delta^2)) / B"
    reference = "Abadi et al. 2016; Bethune et al. 2024"
    per_sample = "reduce"
    params = (
        Param("sigma", default=1.0, low=0.0, doc="noise multiplier"),
        Param("sensitivity", default=0.0, low=0.0,
              doc="L2 sensitivity Delta of one example; 0 = the clip norm of the dp_clip before it"),
        Param("seed", kind="int", default=0, low=0, doc="generator seed"),
    )

    def infer_args(self, node: "Node", view: CheckView) -> Mapping[str, Any] | None:
        """A sensitivity left at 0 (with noise to add) is the clip norm of the ``dp_clip`` feeding
        this node; without one it must be given."""
        sens, sigma = node.args.get("sensitivity"), node.args.get("sigma")
        if not (isinstance(sens, S.Const) and sens.value == 0) or (isinstance(sigma, S.Const) and sigma.value == 0):
            return None
        src = view.input(node)
        if src is not None and src.is_op and src.op == "dp_clip":
            return {**node.args, "sensitivity": src.args["clip"]}
        raise GradError("dp_noise needs the sensitivity of one example's gradient", node.span,
                        "clip first (samples | dp_clip(1.0) | dp_noise(1.0)) or give the "
                        "Lipschitz bound: dp_noise(1.0, sensitivity = ...)")

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        gen = ctx.node_state["generator"]
        out = []
        for x, a in zip(ctx.x, ctx.args):
            if a.sigma > 0 and a.sensitivity <= 0:
                raise ValueError(f"dp_noise: sigma={a.sigma} with sensitivity={a.sensitivity} adds no noise; "
                                 "give the sensitivity (the clip norm, or the Lipschitz bound) a positive value")
            b = x.shape[0]
            total = x.sum(0)
            if a.sigma > 0:
                total = total + (a.sigma * a.sensitivity) * self.randn_like(total, gen)
            out.append(total / b)
        return out
