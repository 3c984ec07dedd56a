"""``aegd``: AEGD, adaptive gradient descent with energy (Liu & Tian)."""

from __future__ import annotations

import math

import torch

from .base import Buffer, Param, REQUIRED, TensorOp, register


@register
class AEGD(TensorOp):
    r"""AEGD: gradient descent on :math:`\sqrt{f + c}` with an elementwise energy variable.

    .. math::
        v_t = \frac{x_t}{2\sqrt{f_t + c}},\qquad r_t = \frac{r_{t-1}}{1 + 2\eta\, v_t^2},\qquad
        u_t = 2\, r_t \odot v_t,\qquad r_0 = \sqrt{f_1 + c}

    :math:`f` is the loss (write ``aegd(loss, lr)``; the pipeline then needs
    ``opt.step(closure)`` with a closure that returns the loss), :math:`v` the
    gradient of :math:`\sqrt{f + c}`, and :math:`r` the energy, one per
    coordinate, set on the first step from that step's loss. :math:`r` never
    increases (the method's "energy stability"), so the effective step
    :math:`2\eta r` shrinks monotonically. It needs :math:`f + c > 0`: the op
    raises ``ValueError`` otherwise.

    The energy update uses the step size: the reference code divides by
    :math:`1 + 2\,\mathrm{lr}\,v^2` and then steps
    :math:`\theta \leftarrow \theta - 2\,\mathrm{lr}\, r \odot v`. An op cannot
    see the learning rate, so it takes :math:`\eta` as an argument: pass the
    group's ``lr`` (``aegd(loss, lr)``, also under a scheduler), and the
    runtime's :math:`\theta \leftarrow \theta - \mathrm{lr}\cdot u_t` is the
    paper's step. Any other :math:`\eta` decouples the energy decay from the
    step length. The code's coupled ``weight_decay`` adds
    :math:`\mathrm{wd}\cdot\theta` to :math:`v`, which is
    ``decay(2 * wd * (loss + c) ** 0.5)`` before the op; its AEGDW variant
    (:math:`\theta \leftarrow \theta(1 - \mathrm{lr}\cdot\mathrm{wd})` before the
    step) is ``| decay(wd)`` after the op.

    Reference: H. Liu, X. Tian, "AEGD: Adaptive Gradient Descent with
    Energy", arXiv:2010.05109 (2020); txping/AEGD ``aegd.py``.
    """

    name = "aegd"
    summary = "2 r v with v = x / (2 sqrt(f + c)), energy r /= 1 + 2 eta v^2 (needs the loss)"
    reference = "Liu & Tian 2020, arXiv:2010.05109; txping/AEGD aegd.py"
    is_rule = True
    params = (
        Param("f", default=REQUIRED, doc="the loss value: write loss"),
        Param("eta", default=REQUIRED, low=0.0, doc="the step size the energy update uses: write lr"),
        Param("c", default=1.0, doc="shift that makes f + c > 0"),
    )
    buffers = (Buffer("r", "energy"),)

    def update(self, x, state, a, lane):
        fc = float(a.f) + float(a.c)
        if not fc > 0:
            raise ValueError(f"aegd needs f + c > 0, got f={a.f!r} and c={a.c!r}: raise c so that loss + c > 0")
        sqrt_fc = math.sqrt(fc)
        v = x / (2 * sqrt_fc)
        r = state["r"]
        if lane.fresh:  # r_0 = sqrt(f_1 + c): set from the first step's loss
            r.fill_(sqrt_fc)
        r.div_(v.square().mul_(2 * a.eta).add_(1))
        return r.mul(v).mul_(2)
