"""``normalize``: divide by the L2 norm (normalized gradient descent)."""

from __future__ import annotations

import torch

from .base import NodeCtx, Op, Param, register, route_norms


@register
class Normalize(Op):
    r"""Scale the input to (nearly) unit L2 norm.

    .. math::
        n = \lVert x \rVert_2,\qquad u = \frac{x}{n + \epsilon}

    With ``scope=tensor`` (the default) each tensor is divided by its own
    norm, the block-normalized gradient of Yu et al. (one block per parameter
    tensor); with ``scope=global`` :math:`n` is the norm over every tensor the
    route covers (the norm of the per-tensor norms), normalized gradient
    descent on the whole parameter vector. An all-zero input stays zero, also
    with ``eps=0`` (where :math:`0/0` would give NaN). The step length is then
    ``lr`` (times :math:`n/(n+\epsilon)`), whatever the gradient's scale.

    Reference: E. Hazan, K. Y. Levy, S. Shalev-Shwartz, "Beyond Convexity:
    Stochastic Quasi-Convex Optimization", NeurIPS 2015 (normalized gradient
    descent); A. W. Yu et al., "Block-Normalized Gradient Method: An Empirical
    Study for Training Deep Neural Network", arXiv:1707.04822 (2017).
    """

    name = "normalize"
    flat = True
    summary = "x / (||x|| + eps), per tensor or global"
    reference = "Hazan et al. 2015; Yu et al. 2017, arXiv:1707.04822"
    params = (
        Param("eps", default=1e-8, low=0.0, doc="added to the norm"),
        Param("scope", kind="choice", default="tensor", choices=("tensor", "global"),
              doc="norm per tensor, or over all tensors of the route"),
    )

    def reduction(self, args):
        return args.get("scope", "tensor")


    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        xs = ctx.x
        if not xs:
            return []
        norms = route_norms(xs, ctx.args[0].scope)
        out = []
        for x, n, a in zip(xs, norms, ctx.args):
            denom = n + a.eps
            # denom == 0 only when x == 0 and eps == 0: divide by 1 so zero stays zero
            out.append(x / torch.where(denom > 0, denom, torch.ones_like(denom)))
        return out
