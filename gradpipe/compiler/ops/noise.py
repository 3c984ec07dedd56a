"""``noise``: annealed Gaussian gradient noise (Neelakantan et al., 2015)."""

from __future__ import annotations

import math

import torch

from .base import NodeCtx, Op, Param, register


@register
class Noise(Op):
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
    mergeable = False
    has_node_state = True
    params = (
        Param("eta", default=0.01, low=0.0, doc="initial variance"),
        Param("gamma", default=0.55, low=0.0, doc="annealing exponent"),
        Param("seed", kind="int", default=0, low=0, doc="generator seed"),
    )

    def init_node_state(self, args):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(args.seed))
        return {"generator": gen}

    def node_state_dict(self, node_state):
        return {"rng": node_state["generator"].get_state()}

    def load_node_state_dict(self, node_state, saved):
        node_state["generator"].set_state(saved["rng"].to(torch.uint8).cpu())

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        gen = ctx.node_state["generator"]
        out = []
        for x, a, t in zip(ctx.x, ctx.args, ctx.steps):
            std = math.sqrt(a.eta / t ** a.gamma)
            z = torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
            out.append(x + std * z)
        return out
