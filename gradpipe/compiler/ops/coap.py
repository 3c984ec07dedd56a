"""``coap``: correlation-aware low-rank projection around an inner pipeline (COAP)."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .base import REQUIRED, Args, Buffer, InnerNode, NodeCtx, Op, Param, find_inner, register
from .lowrank import as_matrix, from_low, low_shape, projector_shape, projects, right_side, to_low

__all__ = ["Coap", "range_finder", "coap_projector", "refine_projector"]

#: the reference's hard-coded SGD step of the projection update: learning rate and gradient-norm clip
_REFINE_LR = 0.1
_REFINE_MAX_NORM = 1.0


def range_finder(a: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    r"""One pass of the randomized range finder (no oversampling, no power iteration):
    :math:`QR = A\Omega`, :math:`Q^\top A = U S V^\top`; returns :math:`V^\top` (r×n) for
    ``a`` m×n and ``omega`` n×r. Rows are orthonormal; when ``r`` is at least the rank of
    ``a`` they span its row space exactly."""
    q, _ = torch.linalg.qr(a @ omega, mode="reduced")
    return torch.linalg.svd(q.t() @ a, full_matrices=False)[2].contiguous()


def coap_projector(g: torch.Tensor, rank: int, seed: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """COAP's projector of the matrix ``g`` (m×n), in ``g``'s dtype: ``P`` (r×n, the range finder
    on ``g``) when ``m >= n``, else ``A`` (m×r, the range finder on ``gᵀ``, transposed).

    ``previous`` None: the test matrix is Gaussian, drawn in fp32 from a CPU generator seeded
    ``seed`` (a fresh generator per call, as the reference's ``manual_seed(3407)``; the global RNG
    is untouched) and moved to ``g``'s device. Otherwise the recompute is warm-started: the test
    matrix is the previous projector (``Pᵀ`` or ``A``), one subspace iteration."""
    m, n = g.shape
    right = right_side(m, n)
    a = g if right else g.t()
    if previous is None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        omega = torch.randn(a.shape[1], rank, generator=gen, dtype=torch.float32).to(dtype=g.dtype, device=g.device)
    else:
        omega = previous.t() if right else previous
    p = range_finder(a, omega)
    return p if right else p.t().contiguous()


def refine_projector(p: torch.Tensor, g: torch.Tensor, moment: torch.Tensor | None) -> torch.Tensor:
    r"""COAP's inter-recompute projection update: one clipped SGD step (lr 0.1, gradient norm
    clipped to 1 as ``clip_grad_norm_``, no re-orthonormalisation) on

    .. math::
        \mathcal L(P) = \mathrm{mse}(G P^\top P, G)\,\bigl(1 - \overline{\cos}(M P, G)\bigr)
        \quad(m \ge n),\qquad
        \mathcal L(A) = \mathrm{mse}(A A^\top G, G)\,\bigl(1 - \overline{\cos}(A M, G)\bigr)
        \quad(m < n)

    with ``mse`` the mean over the m·n entries and :math:`\overline{\cos}` the cosine
    similarity of each row of the m×n matrices, averaged over the m rows. ``moment`` is the
    inner pipeline's projected first moment ``M`` (m×r or r×n); None drops the cosine factor.
    The gradient is taken with autograd, through both factors of P."""
    m, n = g.shape
    right = right_side(m, n)
    g = g.detach()
    moment = moment.detach() if moment is not None else None
    q = p.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        recon = g @ q.t() @ q if right else q @ q.t() @ g
        loss = F.mse_loss(recon, g)
        if moment is not None:
            e = moment @ q if right else q @ moment
            loss = loss * (1 - F.cosine_similarity(e, g, dim=1).mean())
        (grad,) = torch.autograd.grad(loss, q)
    coef = torch.clamp(_REFINE_MAX_NORM / (torch.linalg.vector_norm(grad) + 1e-6), max=1.0)
    return (p - _REFINE_LR * (grad * coef)).detach()


def _bypass(x: torch.Tensor, rank: int) -> bool:
    """Vectors, and matrices whose smaller side is at most the rank, skip the projection."""
    if not projects(x):
        return True
    g = as_matrix(x)
    return rank >= min(g.shape)


def _projector_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    return None if _shape_bypass(tuple(shape), rank) else projector_shape(shape, rank)


def _shape_bypass(shape: tuple[int, ...], rank: int) -> bool:
    if len(shape) < 2:
        return True
    n = 1
    for d in shape[1:]:
        n *= d
    return rank >= min(shape[0], n)


@register
class Coap(Op):
    r"""COAP: correlation-aware gradient projection around an inner pipeline (usually ``adam``).

    For a matrix gradient :math:`G_t \in \mathbb R^{m\times n}` (a tensor with more than two
    dimensions is viewed as ``(shape[0], -1)``), with :math:`m \ge n` ("right"; the ``m < n``
    case is the mirror image with :math:`A_t` m×r, :math:`R_t = A_t^\top G_t`,
    :math:`u_t = \alpha A_t N_t`):

    .. math::
        R_t = G_t P_t^\top,\qquad N_t = \mathrm{inner}(R_t),\qquad u_t = \alpha\, N_t P_t

    :math:`P_t` (r×n) changes on the reference's schedule, in which ``k = t - 1`` is the step
    counted before its increment:

    - :math:`t = 1`: :math:`P_1` is the randomized range finder of :math:`G_1` with a Gaussian
      test matrix :math:`\Omega` (n×r): :math:`QR = G_1\Omega`,
      :math:`P_1 = V^\top` of :math:`Q^\top G_1 = U S V^\top`.
    - :math:`k \bmod (T K) = 0` (T = ``interval``, K = ``reproject``): recompute,
      warm-started: the range finder with :math:`\Omega = P_{t-1}^\top` (one subspace
      iteration, not a new random draw).
    - else :math:`k \bmod T = 0`: one SGD step on the correlation-aware loss
      :math:`\mathrm{mse}(G P^\top P, G)\,(1 - \overline{\cos}(M_{t-1} P, G))` with lr 0.1 and
      gradient norm clipped to 1, P not re-orthonormalised (``refine_projector``);
      :math:`M_{t-1}` is the inner pipeline's stored first moment before this step's update.
    - otherwise :math:`P_t = P_{t-1}`.

    With ``restore=true``, at every projector change the inner first and second moments are
    carried to the new subspace: :math:`M \leftarrow (M P_{old}) P_{new}^\top`,
    :math:`V \leftarrow ((\sqrt V P_{old}) P_{new}^\top)^{\odot 2}`; otherwise they are kept
    as they are (not rotated).

    The inner state is read from the first inner op that keeps a buffer ``m`` (``adam``'s first
    moment; ``restore`` rewrites that op's ``m`` and, if it has one, its ``v``). If no inner op
    keeps ``m`` (``coap { sign }``), the projection update uses the mse term alone (the cosine
    factor is dropped, i.e. taken as 1) and ``restore`` has nothing to carry; this is not an
    error. Vectors, and matrices whose smaller side is at most ``rank``, are not projected: they
    go through the inner pipeline at full size, without the scale (the reference sends them to
    plain AdamW).

    Defaults: ``interval=32, reproject=5`` (``CoapAdamW``'s and the README's), ``scale=0.25``
    (the LLaMA scripts; the class default is 1), ``restore=false`` (the README: "empirically we
    set False for LLAMA"), ``seed=3407`` (the reference's fixed seed), ``rank=128``.

    Known differences from the reference: the test matrix comes from a CPU generator (the
    reference draws on the gradient's device, so its CUDA numbers differ from its CPU ones;
    this is its CPU behaviour everywhere); the projection maths runs in the compute dtype (fp32
    for fp32/bf16/fp16 parameters, as the reference's fp32, but P is kept in fp32 where the
    reference casts it back to bf16); 4-D convolutions are flattened instead of Tucker-projected.
    The reference's AdamW is Hugging Face's (``eps`` added to :math:`\sqrt v` before bias
    correction) with decoupled decay after the step; ``coap { adam } | decay(wd)`` uses torch's
    epsilon (``adam(eps = e / (1 - b2 ** step) ** 0.5)`` reproduces the HF placement) and decays
    with the parameter before the step (both differ at second order only).

    Reference: J. Xiao, S. Sang, T. Zhi, J. Liu, Q. Yan, Y. Zhang, L. Luo, B. Yuan, "COAP:
    Memory-Efficient Training with Correlation-Aware Gradient Projection", CVPR 2025
    (arXiv:2412.00071); bytedance/coap
    (``coap_torch/projection/coap_matrix.py``, ``optimizer/adamw.py``, ``utils/orthogonal.py``).
    """

    name = "coap"
    summary = ("inner pipeline on a rank-r projection refreshed by a correlation-aware SGD step, "
               "projected back times scale")
    reference = "Xiao et al. 2025 (COAP, bytedance/coap)"
    params = (
        Param("rank", kind="int", default=128, low=1, doc="rank r of the projection"),
        Param("interval", kind="int", default=32, low=1, doc="steps between projection updates (T)"),
        Param("reproject", kind="int", default=5, low=1, doc="every K-th update is a full recompute (K)"),
        Param("scale", default=0.25, low=0.0, doc="alpha, multiplies the projected-back update"),
        Param("restore", kind="bool", default=False, doc="carry the inner m and v to each new subspace"),
        Param("seed", kind="int", default=3407, low=0, doc="seed of the range finder's first test matrix"),
        Param("inner", kind="block", default=REQUIRED, doc="the pipeline run in the projected space"),
    )
    buffers = (Buffer("P", "the projector: r×n (m >= n) or m×r (m < n), for projected matrices",
                      shape=lambda shape, a: _projector_shape(shape, int(a.get("rank", 128)))),)
    projects_block = True

    def inner_shape(self, shape: tuple[int, ...], const: dict) -> tuple[int, ...]:
        rank = int(const.get("rank", 128))
        return tuple(shape) if _shape_bypass(tuple(shape), rank) else low_shape(shape, rank)

    def reduction(self, args: dict) -> str:
        return "tensor"  # the projector is fitted to each matrix as a whole

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        node = None
        lows = []
        for i, (x, st, a, t) in enumerate(zip(ctx.x, ctx.states, ctx.args, ctx.steps)):
            if _bypass(x, a.rank):
                lows.append(x)
                continue
            g = as_matrix(x)
            if ctx.is_fresh(i):
                st["P"].copy_(coap_projector(g, a.rank, a.seed))
            elif (t - 1) % a.interval == 0:
                if node is None:
                    node = find_inner(ctx, buffer="m") or False
                st["P"].copy_(self._change(g, st["P"], node, i, t, a))
            lows.append(to_low(g, st["P"]))
        news = ctx.inner(lows)
        out = []
        for x, n, st, a in zip(ctx.x, news, ctx.states, ctx.args):
            if _bypass(x, a.rank):
                out.append(n)
                continue
            m, cols = as_matrix(x).shape
            out.append((a.scale * from_low(n, st["P"], m, cols)).reshape(x.shape))
        return out

    @staticmethod
    def _change(g: torch.Tensor, p: torch.Tensor, node: InnerNode | bool, i: int, t: int,
                a: Args) -> torch.Tensor:
        """The new projector at an update step, carrying the inner moments when ``restore``."""
        m, n = g.shape
        moment = second = None
        if node:
            moment = node.buffer(i, "m")
            second = node.buffer(i, "v")
            want = (m, p.shape[0]) if right_side(m, n) else (p.shape[1], n)
            moment = moment if moment is not None and tuple(moment.shape) == want else None
            second = second if second is not None and tuple(second.shape) == want else None
        full_m = full_s = None
        if a.restore:
            full_m = from_low(moment, p, m, n) if moment is not None else None
            full_s = from_low(second.sqrt(), p, m, n) if second is not None and moment is not None else None
        if (t - 1) % (a.interval * a.reproject) == 0:
            new = coap_projector(g, a.rank, a.seed, previous=p)
        else:
            new = refine_projector(p, g, moment)
        if full_m is not None:
            moment.copy_(to_low(full_m, new))
        if full_s is not None:
            second.copy_(to_low(full_s, new).square_())
        return new
