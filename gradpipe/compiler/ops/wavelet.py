"""``wavelet``: GWT, an inner pipeline on the Haar approximation coefficients of each matrix gradient."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .base import REQUIRED, Args, Buffer, Denominator, InnerNode, NodeCtx, Op, Param, find_inner, register

__all__ = ["haar_forward", "haar_inverse", "approx_length", "Wavelet"]

_SQRT2 = math.sqrt(2.0)
#: floor of the previous norm in the norm-growth limiter (the reference's constant)
_LIMITER_FLOOR = 1e-8


def approx_length(n: int, levels: int) -> int:
    """Length of the approximation after ``levels`` Haar levels of a length-``n`` axis:
    every level pads an odd length by one zero, so :math:`n_{\\ell+1} = \\lceil n_\\ell / 2 \\rceil`."""
    for _ in range(levels):
        n = (n + 1) // 2
    return n


def haar_forward(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    r"""Orthonormal Haar decomposition along the last axis (PyWavelets' convention, ``mode='zero'``).

    Each level pads an odd length on the right with one zero, then

    .. math:: A[k] = \frac{a[2k] + a[2k+1]}{\sqrt 2},\qquad D[k] = \frac{a[2k] - a[2k+1]}{\sqrt 2}

    Returns ``(A_L, [D_L, ..., D_1], lengths)``: the coarsest approximation, the details
    coarsest first (``ptwt.wavedec``'s order) and, per detail, the length of the signal it
    reconstructs (what :func:`haar_inverse` crops the padding back to).
    """
    details, lengths, a = [], [], x
    for _ in range(levels):
        n = a.shape[-1]
        lengths.append(n)
        if n % 2:
            a = F.pad(a, (0, 1))
        even, odd = a[..., 0::2], a[..., 1::2]
        details.append((even - odd) / _SQRT2)
        a = (even + odd) / _SQRT2
    return a, details[::-1], lengths[::-1]


def haar_inverse(a: torch.Tensor, details: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    r"""The inverse of :func:`haar_forward`: per level (coarsest first)
    :math:`a[2k] = (A[k] + D[k])/\sqrt 2`, :math:`a[2k+1] = (A[k] - D[k])/\sqrt 2`, cropped to the
    level's length (which drops the zero padding)."""
    for d, n in zip(details, lengths):
        a = torch.stack(((a + d) / _SQRT2, (a - d) / _SQRT2), dim=-1).flatten(-2)[..., :n]
    return a


def _transforms(x: torch.Tensor) -> bool:
    """Tensors with fewer than two dimensions bypass the transform (GWT transforms only matrices)."""
    return x.dim() >= 2 and x.numel() > 0


def _denominator_node(ctx: NodeCtx) -> InnerNode:
    node = find_inner(ctx, kind=Denominator)
    if node is None:  # pragma: no cover - check_block refuses such a pipeline when it compiles
        raise RuntimeError("wavelet: no inner op has a denominator")
    return node


def _check_denominator(inner: list[Op]) -> tuple[str, str] | None:
    if any(isinstance(o, Denominator) for o in inner):
        return None
    names = ", ".join(o.name for o in inner) or "no op"
    return (f"'wavelet' scales the detail coefficients by its inner pipeline's denominator, but the inner "
            f"pipeline ({names}) has no op with one",
            "put an Adam-like op inside: wavelet(levels=2) { adam }  (adam and rms have a denominator)")


@register
class Wavelet(Op):
    r"""GWT: the inner pipeline runs on the Haar approximation of each matrix gradient.

    For a gradient :math:`G` with two or more dimensions, along its last axis
    (each row of an ``nn.Linear`` weight ``[out, in]``), ``levels`` = :math:`L`
    levels of the orthonormal Haar transform (``haar_forward``; an odd
    length is padded with one zero at each level) give the approximation
    :math:`A_L` and the details :math:`D_L, \dots, D_1`. The inner pipeline
    (Adam, with its state at :math:`A_L`'s shape: :math:`2^{-L}` of the
    parameter, which is the memory saving) gives :math:`N = \mathrm{inner}(A_L)`
    and its denominator :math:`d` (:math:`N = m/d` for Adam,
    ``Adam.denominator``). The details are not averaged: the *current*
    :math:`D_\ell` is divided by the denominator of its parent coefficient
    (nearest-parent upsampling, :math:`k \mapsto \lfloor k / 2^{L-\ell} \rfloor`):

    .. math::
        \tilde D_\ell[k] = \frac{D_\ell[k]}{\lambda_t\, d[\lfloor k/2^{L-\ell}\rfloor]},\qquad
        u_t = \alpha\, \mathrm{IDWT}\big(N/\lambda_t,\ \tilde D_L, \dots, \tilde D_1\big)

    cropped to :math:`G`'s length. :math:`\lambda_t` is Fira's norm-growth
    limiter with :math:`\gamma` = ``limiter`` (``0`` turns it off), on the
    Frobenius norm of :math:`q_t = N_t / c_t` per tensor, where :math:`c_t` is
    the inner op's ``step_factor`` (Adam's
    :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`; 1 for an op without one), so that
    :math:`q_t = m_t/(\sqrt{v_t}+\epsilon')` is the quantity the reference watches:

    .. math::
        \lambda_1 = 1,\ s_1 = \lVert q_1\rVert;\qquad
        \lambda_t = \max\!\Big(\frac{\lVert q_t\rVert}{s_{t-1} + 10^{-8}}, \gamma\Big)\Big/\gamma,\quad
        s_t = \lVert q_t\rVert / \lambda_t

    The same :math:`\lambda_t` divides the inner output and the details. ``s``
    (one number per matrix) is this op's only state. Tensors with fewer than two
    dimensions bypass the transform, the limiter and the scale: the inner
    pipeline runs on them at full size (the reference gives them plain AdamW).
    The inner pipeline must hold an op with a ``denominator`` (``adam``,
    ``rms``); the first such op scales the details, and ops after it act on
    :math:`N` only. Without one the pipeline does not compile.

    Correspondence with the reference (zqOuO/GWT ``waveadamw.py``, Hugging Face
    AdamW style): there, ``p -= step_size * scale * IDWT(N, D / (sqrt(v) + eps))``
    with ``N = m / (sqrt(v) + eps)`` and ``step_size = lr sqrt(1-b2^t)/(1-b1^t)``.
    Since ``step_size / (sqrt(v) + eps_hf) = 1 / d`` with
    ``d = (1-b1^t)(sqrt(v)/sqrt(1-b2^t) + eps)`` and ``eps_hf = eps sqrt(1-b2^t)``,
    ``wavelet { adam(eps=e) }`` is the reference with an epsilon that grows from
    ``e sqrt(1-b2)`` to ``e``; ``adam(eps = e / (1 - b2 ** step) ** 0.5)``
    reproduces the reference's constant ``e`` exactly. Note that the details
    carry the global step size, so at :math:`t=1` they are
    :math:`1/(1-\beta_1) = 10` times :math:`D/\sqrt{\hat v}`.

    Pathology (faithful to the reference): where a coarsest coefficient stays
    ~0 while its details do not (e.g. the pair (-2, 2) at one level: A = 0,
    D = -2.83), the details are divided by ~eps and the update is huge
    (~1e5 with eps 1e-6). A larger ``eps`` bounds it.

    Differences: the transform runs along the last axis of the tensor as it is
    (a conv kernel ``(out, in, kh, kw)`` along ``kw``; the reference transforms
    only ``nn.Linear`` weights of attention and MLP modules); only the Haar
    wavelet with zero padding is implemented (the reference's defaults,
    ``--wave_type haar --boundary zero``); decoupled weight decay goes after the
    op (``| decay(wd)``), with the parameter before the step.

    Reference: Z. Wen, P. Luo, J. Wang, X. Deng et al., "Breaking Memory Limits: Gradient
    Wavelet Transform Enhances LLMs Training", arXiv:2501.07237, 2025 (later
    "Wavelet Meets Adam"); code zqOuO/GWT (level 2, scale 0.25, lr 1e-2 for
    LLaMA pretraining). The limiter is Fira's (X. Chen et al., "Fira: Can We
    Achieve Full-rank Training of LLMs Under Low-rank Constraint?", 2024).
    """

    name = "wavelet"
    summary = "GWT: inner pipeline on the level-L Haar approximation of each matrix, details scaled by its denominator"
    reference = "Wen et al. 2025 (zqOuO/GWT)"
    params = (
        Param("levels", kind="int", default=2, low=1, high=30, doc="Haar levels L along the last axis"),
        Param("scale", default=0.25, low=0.0, doc="alpha, multiplies the reconstructed update"),
        Param("limiter", default=1.01, low=0.0, doc="norm-growth limit gamma per step (0: off)"),
        Param("inner", kind="block", default=REQUIRED, doc="the pipeline run on the approximation coefficients"),
    )
    buffers = (Buffer("s", "the limiter's previous norm (one number per matrix)",
                      shape=lambda shape, a: () if len(shape) >= 2 and math.prod(shape) > 0 else None),)
    projects_block = True

    def buffers_for(self, args: Mapping[str, Any]) -> tuple[Buffer, ...]:
        return () if args.get("limiter", 1.01) == 0 else self.buffers

    def inner_shape(self, shape: tuple[int, ...], const: dict[str, Any]) -> tuple[int, ...]:
        if len(shape) < 2 or math.prod(shape) == 0:
            return tuple(shape)
        return tuple(shape[:-1]) + (approx_length(shape[-1], int(const.get("levels", 2))),)

    def check_block(self, inner):
        return _check_denominator(inner)

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        _denominator_node(ctx)  # fail on the first step, not only once a matrix shows up
        approx, plans = [], []
        for x, a in zip(ctx.x, ctx.args):
            if not _transforms(x):
                approx.append(x)
                plans.append(None)
                continue
            coarse, details, lengths = haar_forward(x, int(a.levels))
            approx.append(coarse)
            plans.append((details, lengths))
        news = ctx.inner(approx)
        den = _denominator_node(ctx)  # after the run: its state exists and holds this step
        out = []
        for i, (n, plan, st, a, t) in enumerate(zip(news, plans, ctx.states, ctx.args, ctx.steps)):
            if plan is None:
                out.append(n)
                continue
            details, lengths = plan
            d = den.op.denominator(den.states[i], den.args[i], t)
            lim = self._limit(n, st, a, den, i, t, ctx.is_fresh(i))
            if lim is not None:
                n = n / lim
                d = d * lim
            scaled = [dj / d.repeat_interleave(2 ** j, dim=-1)[..., :dj.shape[-1]] for j, dj in enumerate(details)]
            out.append(a.scale * haar_inverse(n, scaled, lengths))
        return out

    @staticmethod
    def _limit(n: torch.Tensor, st: dict[str, torch.Tensor], a: Args, den: InnerNode, i: int,
               t: int, fresh: bool) -> torch.Tensor | None:
        """Fira's norm-growth limiter: the divisor lambda_t (None on the first step or when off)."""
        gamma = float(a.limiter)
        if gamma == 0:
            return None
        factor = den.op.step_factor(den.args[i], t)
        norm = torch.linalg.vector_norm(n) / factor
        if fresh:
            st["s"].copy_(norm)
            return None
        lim = torch.clamp(norm / (st["s"] + _LIMITER_FLOOR), min=gamma) / gamma
        st["s"].copy_(norm / lim)
        return lim
