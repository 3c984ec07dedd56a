"""``gravity``: the Gravity optimizer's saturating velocity rule (Bahrami et al., 2021)."""

from __future__ import annotations

import torch

from .base import Buffer, NodeCtx, Param, SeededOp, register


@register
class Gravity(SeededOp):
    r"""Gravity: an average of a saturating transform of the input, from a random start.

    .. math::
        M_t = \max_j |x_{t,j}|,\qquad \zeta_t = \frac{x_t}{1 + (x_t M_t)^2}

        \hat\beta_t = \frac{\beta (t-1) + 1}{(t-1) + 2},\qquad
        V_t = \hat\beta_t V_{t-1} + (1-\hat\beta_t)\,\zeta_t,\qquad u_t = V_t

        V_0 \sim \mathcal N\!\left(0, (\alpha/\mathrm{lr})^2\right)

    The paper writes :math:`m = 1/\max|x|` and :math:`\zeta = x/(1 + (x/m)^2)`,
    the same thing; an all-zero input gives :math:`\zeta = 0` (the code's
    :math:`m = \infty`). :math:`M_t` is per tensor. The runtime's
    :math:`\theta \leftarrow \theta - \mathrm{lr}\cdot u` is the paper's
    :math:`\theta \leftarrow \theta - \mathrm{lr}\cdot V`.

    **Step counting.** :math:`\hat\beta` follows the authors' Keras code, whose
    counter (``iterations``) is 0 at the first step, so :math:`\hat\beta_1 = 1/2`
    and :math:`\hat\beta_t \to \beta`. With gradpipe's step :math:`t` (from 1)
    that is :math:`(\beta(t-1)+1)/(t+1)`. The authors' PyTorch port and
    kozistr's ``Gravity`` count from 1 instead (:math:`\hat\beta_1 = (\beta+1)/3`).
    :math:`t` is the parameter's own step counter.

    **The random start.** :math:`V_0` has standard deviation
    :math:`\alpha/\mathrm{lr}`, so it needs the learning rate; an op cannot see
    the param group, so the op takes it as the argument ``lr`` (default 0.1,
    the paper's learning rate). Write ``gravity(lr=lr)`` to use the group's
    learning rate at each parameter's first step, as the reference code does
    (a later change of ``lr``, e.g. by a scheduler, does not touch
    :math:`V`). :math:`V_0` is drawn once per tensor at its first step, in route
    order, from a CPU generator seeded with ``seed`` (in the compute dtype);
    the generator's state is saved in ``state_dict``, so a resumed run draws
    the same :math:`V_0` for tensors that start later.

    Reference: D. Bahrami et al., "Gravity Optimizer: a Kinematic Approach on
    Optimization in Deep Learning", arXiv:2101.09192 (2021);
    dariush-bahrami/gravity.optimizer ``implementations/gravity_optimizer_keras.py``.
    """

    name = "gravity"
    summary = "V = beta_hat V + (1 - beta_hat) x / (1 + (x max|x|)^2), V0 ~ N(0, (alpha/lr)^2), seeded"
    reference = "Bahrami et al. 2021, arXiv:2101.09192; dariush-bahrami/gravity.optimizer (Keras)"
    is_rule = True
    params = (
        Param("alpha", default=0.01, low=0.0, doc="scale of the random start: V0 has std alpha / lr"),
        Param("beta", default=0.9, low=0.0, high=1.0, high_closed=False, doc="limit of the averaging weight"),
        Param("seed", kind="int", default=0, low=0, doc="generator seed for V0"),
        Param("lr", default=0.1, low=0.0, low_closed=False,
              doc="the lr the V0 scale uses (alpha / lr); write lr=lr for the group's learning rate"),
    )
    buffers = (Buffer("v", "velocity V"),)

    def reduction(self, args):
        return "tensor"

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        gen = ctx.node_state["generator"]
        out = []
        for i, (x, state, a, t) in enumerate(zip(ctx.x, ctx.states, ctx.args, ctx.steps)):
            v = state["v"]
            if ctx.is_fresh(i):  # V_0 ~ N(0, (alpha / lr)^2), drawn on the node's first step
                v.copy_(self.randn_like(x, gen).mul_(a.alpha / a.lr))
            if x.numel():
                top = x.abs().max()
                zeta = x / (x * top).square_().add_(1)
                k = t - 1  # the Keras counter: 0 at the first step
                beta_hat = (a.beta * k + 1) / (k + 2)
                v.mul_(beta_hat).add_(zeta, alpha=1 - beta_hat)
            out.append(v)
        return out
