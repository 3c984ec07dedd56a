"""``ema``: exponential moving average of the stream."""

from __future__ import annotations

from .base import Buffer, Param, TensorOp, axpy_, register


@register
class Ema(TensorOp):
    r"""Exponential moving average over steps.

    .. math::
        m_t = \beta m_{t-1} + (1-\beta) x_t,\qquad u_t = m_t
        \quad(\text{or } m_t / (1-\beta^t) \text{ with } \texttt{debias=true})

    ``m`` starts at zero. With the default ``beta=0.9`` the new value has
    weight 0.1, as the EMA reference of Bloop (``project_orthogonal(ema)``).

    Reference: optax ``ema``; P. Ablin et al., "Careful with that Scalpel:
    Improving Gradient Surgery with an EMA", ICML 2024.
    """

    name = "ema"
    summary = "exponential moving average over steps"
    reference = "optax.ema; Ablin et al. 2024 (Bloop)"
    params = (
        Param("beta", default=0.9, low=0.0, high=1.0, high_closed=False, doc="decay (1 - weight of the new value)"),
        Param("debias", kind="bool", default=False, doc="divide by 1 - beta^t"),
    )
    buffers = (Buffer("m", "the average"),)
    flat = True

    def update(self, x, state, a, lane):
        m = state["m"]
        axpy_(m.mul_(a.beta), x, 1 - a.beta)
        if a.debias:
            return m / (1 - a.beta ** lane.step)
        return m
