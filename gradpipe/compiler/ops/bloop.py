"""``bloop``: Bloop's multi-loss direction, sugar over ``project_orthogonal``."""

from __future__ import annotations

from .base import MacroOp, Param, register


@register
class Bloop(MacroOp):
    r"""Bloop: the auxiliary gradient projected away from the EMA of the main gradient.

    .. math::
        r_t = r_{t-1} + \rho\,(g^{\text{main}}_t - r_{t-1}),\qquad
        d_t = g^{\text{main}}_t + \lambda\,\Big(g^{\text{aux}}_t
              - \frac{\langle g^{\text{aux}}_t, r_t\rangle}{\langle r_t, r_t\rangle + \epsilon}\, r_t\Big)

    with global inner products and :math:`\epsilon = 10^{-7}`. The EMA is updated
    before the projection; :math:`r_0 = 0` (ml-bloop's ``init="zeros"``, the
    form its authors recommend), so on the first step :math:`r_1 = \rho g_1`,
    and no bias correction is needed because the projection does not depend on
    the scale of :math:`r`. The main term is the batch gradient, not the EMA.
    The result goes to an ordinary optimizer: ``bloop(grads.main, grads.aux) | adam``.

    ``bloop(main, aux, lam, rho)`` expands to
    ``main + lam * (aux | project_orthogonal(ema(main, beta = 1 - rho)))``, so
    ``explain`` and the state dict show its ``ema`` (the only state, one buffer).
    ml-bloop's optional ``rescale`` (which multiplies by ``1.0 / 1.0 + lbda``,
    i.e. :math:`1+\lambda`, where PCGrad's code divides by :math:`1+\lambda`) is
    left out: write ``scale(...)`` after it if wanted.

    Reference: P. Ablin, J. Liu, S. Kaur, M. Blondel et al., "Careful with that
    Scalpel: Improving Gradient Surgery with an EMA", ICML 2024; apple/ml-bloop
    ``bloop_direction`` (λ ``lbda`` = 0.1, ρ ``ema`` = 0.1 defaults).
    """

    name = "bloop"
    summary = "main + lam * (aux projected away from ema(main))"
    reference = "Ablin et al. 2024 (apple/ml-bloop)"
    params = (
        Param("main", kind="signal", doc="the main (training) loss gradient, e.g. grads.main"),
        Param("aux", kind="signal", doc="the auxiliary loss gradient, e.g. grads.aux"),
        Param("lam", default=0.1, low=0.0, doc="weight of the projected auxiliary gradient"),
        Param("rho", default=0.1, low=0.0, high=1.0, low_closed=False, doc="EMA weight on the new main gradient"),
    )
    definition = """
def bloop(main, aux, lam = 0.1, rho = 0.1) =
    main + lam * (aux | project_orthogonal(ema(main, beta = 1 - rho)))
"""
