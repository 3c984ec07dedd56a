"""``noise``: annealed Gaussian gradient noise (Neelakantan et al., 2015)."""

from __future__ import annotations

import math

import torch

from .base import NodeCtx, Param, SeededOp, register


@register
class Noise(SeededOp):
    r"""Add annealed Gaussian noise.

    .. math::
        u_t = x_t + \mathcal N(0, \sigma_t^2),\qquad \sigma_t^2 = \frac{\eta}{t^{\gamma}}

    with :math:`t` counting steps from 1 (the paper writes :math:`(1+t)^\gamma`
    with :math:`t` from 0; optax's ``add_noise`` is the same). Samples are fresh
    for every tensor and step, drawn in route order from a generator seeded
    with ``seed``; the generator's state is saved in ``state_dict`` so a
    resumed run draws the same noise.

    Reference: A. Neelakantan et al., "Adding Gradient Noise Improves Learning
    for Very Deep Networks", arXiv:1511.06807 (2015); optax ``add_noise``.
    """

    name = "noise"
    summary = "x + N(0, eta / t^gamma), seeded"
    reference = "Neelakantan et al. 2015; optax.add_noise"
    params = (
        Param("eta", default=0.01, low=0.0, doc="initial variance"),
        Param("gamma", default=0.55, low=0.0, doc="annealing exponent"),
        Param("seed", kind="int", default=0, low=0, doc="generator seed"),
    )

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        gen = ctx.node_state["generator"]
        out = []
        for x, a, t in zip(ctx.x, ctx.args, ctx.steps):
            std = math.sqrt(a.eta / t ** a.gamma)
            z = self.randn_like(x, gen)
            out.append(x + std * z)
        return out
