"""``galore``: run an inner pipeline on a low-rank projection of each matrix gradient."""

from __future__ import annotations


import torch

from .base import REQUIRED, Buffer, NodeCtx, Op, Param, register
from .lowrank import as_matrix, from_low, low_shape, projector_shape, projects, right_side, to_low


def svd_projector(g: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's ``std`` projector from the SVD ``G = U S Vᵀ`` (in fp32): the top ``rank``
    right singular vectors ``Vh[:r]`` (r×n) when ``m >= n``, else the left ones ``U[:, :r]`` (m×r)."""
    m, n = g.shape
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    p = vh[:rank, :] if right_side(m, n) else u[:, :rank]
    return p.to(g.dtype).contiguous()


@register
class Galore(Op):
    r"""GaLore: gradient low-rank projection around an inner pipeline.

    For a matrix gradient :math:`G \in \mathbb R^{m\times n}` (a tensor with more
    than two dimensions is viewed as ``(shape[0], -1)``):

    .. math::
        R_t = \begin{cases} G_t Q_t^\top & m \ge n \\ P_t^\top G_t & m < n \end{cases}
        \qquad N_t = \mathrm{inner}(R_t) \qquad
        u_t = \alpha \begin{cases} N_t Q_t & m \ge n \\ P_t N_t & m < n \end{cases}

    :math:`Q_t = V_{:r}^\top` (top-r right singular vectors) or :math:`P_t = U_{:, :r}`
    (top-r left ones) of the SVD of :math:`G_t`, computed in fp32 when
    :math:`(t-1) \bmod T = 0` (GaLore counts the step before incrementing it, so
    the first SVD is at the first step) and kept in between. The inner
    pipeline's state (e.g. Adam's ``m``, ``v``) lives at the projected shape
    (m×r or r×n), which is the memory saving, and is not rotated when the
    projector changes (as in GaLore). Tensors with fewer than two dimensions
    bypass the projection and go through the inner pipeline at full size.

    Known differences: GaLore's AdamW is Hugging Face's (``eps`` added to
    :math:`\sqrt v` before bias correction) and applies decoupled weight decay
    after the step; ``galore(...) { adam } | decay(wd)`` uses torch's Adam
    epsilon and applies decay with the parameter before the step (both differ
    at second order only).

    Reference: J. Zhao, Z. Zhang, B. Chen et al., "GaLore: Memory-Efficient LLM
    Training by Gradient Low-Rank Projection", ICML 2024
    (jiaweizzhao/GaLore ``galore_projector.py``, ``adamw.py``; scale 0.25 in
    the training scripts, rank 128 to 512 for LLaMA).
    """

    name = "galore"
    summary = "inner pipeline on the rank-r SVD projection of each matrix, projected back times scale"
    reference = "Zhao et al. 2024 (jiaweizzhao/GaLore)"
    params = (
        Param("rank", kind="int", default=128, low=1, doc="rank r of the projection"),
        Param("gap", kind="int", default=200, low=1, doc="steps between SVDs (T)"),
        Param("scale", default=0.25, low=0.0, doc="alpha, multiplies the projected-back update"),
        Param("inner", kind="block", default=REQUIRED, doc="the pipeline run in the projected space"),
    )
    buffers = (Buffer("P", "the projector: r×n (right) or m×r (left), for tensors with two or more dimensions",
                      shape=lambda shape, a: projector_shape(shape, int(a.get("rank", 128)))),)
    projects_block = True

    def reduction(self, args):
        return "tensor"  # an SVD per matrix

    def inner_shape(self, shape: tuple[int, ...], const: dict) -> tuple[int, ...]:
        return low_shape(shape, int(const.get("rank", 128)))

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        lows = []
        for i, (x, st, a, t) in enumerate(zip(ctx.x, ctx.states, ctx.args, ctx.steps)):
            if not projects(x):
                lows.append(x)
                continue
            g = as_matrix(x)
            if ctx.is_fresh(i) or (t - 1) % a.gap == 0:
                st["P"].copy_(svd_projector(g, a.rank))
            lows.append(to_low(g, st["P"]))
        news = ctx.inner(lows)
        out = []
        for x, n, st, a in zip(ctx.x, news, ctx.states, ctx.args):
            if not projects(x):
                out.append(n)
                continue
            m, cols = as_matrix(x).shape
            out.append((a.scale * from_low(n, st["P"], m, cols)).reshape(x.shape))
        return out
