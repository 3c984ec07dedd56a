"""``woodbury_fisher``: Natural GaLore's natural-gradient transform with an empirical Fisher of the
last ``s`` gradients, inverted through the Woodbury identity."""

from __future__ import annotations

import math

import torch

from .base import Buffer, Param, TensorOp, register

__all__ = ["WoodburyFisher", "woodbury_solve"]


def woodbury_solve(history: torch.Tensor, index: torch.Tensor, lam: float) -> torch.Tensor:
    r""":math:`(H^\top H + \lambda I)^{-1} h_j` for the rows :math:`h_i` of ``history`` (s×k) and
    ``j = index`` (a 0-d integer tensor), in ``history``'s dtype, without a k×k matrix.

    Since :math:`h_j = H^\top e_j` and :math:`(H^\top H + \lambda I) H^\top = H^\top (H H^\top +
    \lambda I)`, the result is :math:`H^\top y` with :math:`(H H^\top + \lambda I)\, y = e_j`, an
    s×s system solved by Cholesky. Rows of zeros (an unfilled history) contribute nothing to
    :math:`H^\top H`. The diagonal loading is raised to at least
    :math:`s\,\varepsilon \max_i \lVert h_i\rVert^2` (ε the dtype's machine epsilon, below the
    rounding error of the Gram matrix) so the factorisation exists in floating point."""
    s = history.shape[0]
    gram = history @ history.t()
    floor = s * torch.finfo(history.dtype).eps * torch.diagonal(gram).max()
    load = torch.clamp(floor, min=lam)
    gram.diagonal().add_(load)
    chol, _ = torch.linalg.cholesky_ex(gram)
    e = torch.zeros(s, 1, dtype=history.dtype, device=history.device)
    e.index_fill_(0, index.reshape(1).to(history.device), 1.0)
    y = torch.cholesky_solve(e, chol)
    return (history.t() @ y).reshape(-1)


@register
class WoodburyFisher(TensorOp):
    r"""Natural GaLore's natural gradient: the input preconditioned by the damped empirical Fisher
    of its last ``s`` values.

    With :math:`g_t` the flattened input (k entries) and
    :math:`G_t = [g_{t-s'+1}, \dots, g_t]` (k×s', :math:`s' = \min(t, s)`, the current input
    included, the oldest dropped first),

    .. math::
        u_t = (G_t G_t^\top + \lambda I)^{-1} g_t
            = \frac{g_t}{\lambda} - \frac{G_t z_t}{\lambda^2},\qquad
        \Bigl(I + \frac{G_t^\top G_t}{\lambda}\Bigr) z_t = G_t^\top g_t

    (the Woodbury identity, an s'×s' system; the reference solves it by Cholesky). At
    :math:`t = 1`, :math:`u_1 = g_1 / (\lambda + \lVert g_1\rVert^2)`; directions outside the
    history are scaled by :math:`1/\lambda`, so an ``adam`` after it normalises the magnitude.

    The same vector is computed here in the algebraically equal push-through form
    :math:`u_t = G_t y_t`, :math:`(G_t^\top G_t + \lambda I)\, y_t = e_{s'}` (``woodbury_solve``),
    which avoids the reference's cancellation of two :math:`O(1/\lambda)` terms: in fp32 with
    λ = 1e-3 the reference's form loses every digit for gradients of norm 1 and k ~ 1000, the
    push-through form keeps about six. The diagonal loading is raised to
    :math:`s\,\varepsilon\max_i\lVert g_i\rVert^2` when λ is below it, so the Cholesky
    factorisation cannot fail on a rank-deficient history.

    State: ``history``, the last ``s`` inputs as rows (s×k, zeros until filled: unfilled rows do
    not change the result), and ``count``, the number of inputs seen (the next row written is
    ``count mod s``). The history is not cleared when an enclosing ``galore`` recomputes its
    projector, as in the reference (gradients of different subspaces are mixed). Memory: s
    times the input's size, which is why it is meant inside ``galore { woodbury_fisher | adam }``.

    Defaults ``s = 20`` (``natural_history``) and ``lam = 1e-3`` (hard-coded
    ``lambda_damping``) are the reference's. The reference projects two-sided (Tucker,
    :math:`U_r^\top G V_r`, an r×r core, for matrices too); ``galore { woodbury_fisher | adam }``
    projects one-sided (m×r or r×n), so the history holds larger vectors than the reference's.

    Reference: A. Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
    Fine-tuning", 2024 (arXiv:2410.16029); package ``natural_galore``
    (``GaLoreProjectorTensor._natural_gradient_transform``, ``SubSpaceAdamW``).
    """

    name = "woodbury_fisher"
    summary = "natural gradient (G Gᵀ + λI)⁻¹ g with G the last s inputs, by Woodbury and Cholesky"
    reference = "Das 2024 (Natural GaLore)"
    params = (
        Param("s", kind="int", default=20, low=1, doc="number of past inputs kept (the current one included)"),
        Param("lam", default=1e-3, low=0.0, low_closed=False, doc="damping lambda of the empirical Fisher"),
    )
    buffers = (Buffer("history", "the last s inputs as rows (s × numel)",
                      shape=lambda shape, a: (int(a.get("s", 20)), math.prod(shape))),
               Buffer("count", "number of inputs seen (one element)", shape=lambda shape, a: (), dtype=torch.int64))

    def reduction(self, args: dict) -> str:
        return "tensor"  # every entry of a tensor enters the Gram matrix of its history

    def update(self, x, state, a, lane):
        v = x.reshape(1, -1)
        history, count = state["history"], state["count"]
        index = torch.remainder(count, history.shape[0]).reshape(1)
        history.index_copy_(0, index.to(history.device), v)
        count.add_(1)
        return woodbury_solve(history, index, float(a.lam)).reshape(x.shape)
