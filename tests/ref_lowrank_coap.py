"""NumPy references for ``coap`` (COAP) and ``woodbury_fisher`` (Natural GaLore).

Written from the equations (the research notes on bytedance/coap and on the
``natural_galore`` package), never from the op modules. Like the references of
``tests/op_table.py`` they are *steppers*: ``step(t, gs, ps) -> updates`` with
``t`` counting from 1, ``gs`` the gradients (one float64 array per tensor) and
``ps`` the parameters before the step; ``u`` is what the pipeline must emit
(``p <- p - lr * u``).

COAP is written the other way round from the op, as a cross-check of the
orientation rules: every matrix is turned "right" (``m >= n``) by transposing a
wide gradient, which is exact for the projection and for an elementwise inner
Adam, except for the cosine of the projection update, which the reference takes
over the rows of the *original* gradient: over the columns (``axis 0``) of the
transposed one. The gradient of the projection update is the closed form
derived below, not autograd. The range finder uses NumPy's QR and SVD; the
signs of its singular vectors are not part of the equations, so they are taken
from ``torch.linalg`` in the parameter dtype (the op's documented computation),
as ``op_table.svd_projector`` does for GaLore. The first test matrix is drawn
from torch's CPU generator, as the op documents.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["ref_coap", "ref_woodbury_fisher", "range_finder", "coap_refine", "coap_refine_loss_grad",
           "first_test_matrix", "ref_adam", "ref_sign", "ref_chain", "hf_eps", "Stepper"]

Arrays = list  # list[np.ndarray], one per tensor
#: ``stepper(t, grads, params) -> updates``; t counts from 1, params are the values before the step
Stepper = Callable[[int, Arrays, Arrays], Arrays]

_COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps


# ----------------------------------------------------------------------------- COAP
def first_test_matrix(n: int, rank: int, seed: int = 3407) -> np.ndarray:
    """The range finder's first Gaussian test matrix (n x r): fp32 draws of a fresh CPU
    generator seeded ``seed``, as float64."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, rank, generator=gen, dtype=torch.float32).double().numpy()


def range_finder(g: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Q R = G Omega (reduced); Q^T G = U S Vh; returns Vh (r x n), for G m x n with m >= n.
    Row signs follow ``torch.linalg`` on the same float64 inputs."""
    q, _ = np.linalg.qr(g @ omega, mode="reduced")
    vh = np.linalg.svd(q.T @ g, full_matrices=False)[2]
    tq, _ = torch.linalg.qr(torch.from_numpy(g @ omega), mode="reduced")
    tvh = torch.linalg.svd(tq.T @ torch.from_numpy(g), full_matrices=False)[2].numpy()
    signs = np.sign(np.sum(vh * tvh, axis=1, keepdims=True))
    signs[signs == 0] = 1.0
    return vh * signs


def coap_refine_loss_grad(p: np.ndarray, moment: np.ndarray | None, g: np.ndarray,
                          cos_axis: int = 1) -> tuple[float, np.ndarray]:
    """The projection-update loss and its gradient in P, right orientation (P r x n, M m x r,
    G m x n): L = mse(G P^T P, G) * (1 - mean cos(M P, G)), the cosine taken along ``cos_axis``
    (1: of each row, averaged over rows; 0: of each column). ``moment`` None: L = mse.

    With D = G P^T P - G: d mse / dP = 2/(mn) (P D^T G + P G^T D). With E = M P and
    c_i = <e_i, g_i> / (|e_i| |g_i|): dc_i/de_i = g_i/(|e_i||g_i|) - c_i e_i/|e_i|^2, so with H
    the mean of those (as a matrix like E), d mean cos / dP = M^T H. Norms below the cosine's
    eps are clamped to it (a clamped norm has no gradient)."""
    m, n = g.shape
    d = g @ p.T @ p - g
    mse = float(np.mean(d * d))
    gmse = 2.0 / (m * n) * (p @ d.T @ g + p @ g.T @ d)
    if moment is None:
        return mse, gmse
    e = moment @ p
    ne_raw = np.linalg.norm(e, axis=cos_axis, keepdims=True)
    ne = np.maximum(ne_raw, _COS_EPS)
    ng = np.maximum(np.linalg.norm(g, axis=cos_axis, keepdims=True), _COS_EPS)
    c = np.sum(e * g, axis=cos_axis, keepdims=True) / (ne * ng)
    count = e.shape[0] if cos_axis == 1 else e.shape[1]
    h = g / (ne * ng) - np.where(ne_raw > _COS_EPS, c / ne, 0.0) * e / ne
    h /= count
    mean_cos = float(np.mean(c))
    return mse * (1 - mean_cos), (1 - mean_cos) * gmse - mse * (moment.T @ h)


def coap_refine(p: np.ndarray, moment: np.ndarray | None, g: np.ndarray, cos_axis: int = 1,
                lr: float = 0.1, max_norm: float = 1.0) -> np.ndarray:
    """One SGD step of lr 0.1 on :func:`coap_refine_loss_grad`, the gradient scaled by
    min(1, max_norm / (|grad|_F + 1e-6)) (``clip_grad_norm_``); no re-orthonormalisation."""
    _, grad = coap_refine_loss_grad(p, moment, g, cos_axis)
    coef = min(1.0, max_norm / (float(np.linalg.norm(grad)) + 1e-6))
    return p - lr * (grad * coef)


def ref_coap(rank: int, interval: int = 32, reproject: int = 5, scale: float = 0.25, restore: bool = False,
             seed: int = 3407, b1: float = 0.9, b2: float = 0.999, eps: float | Callable[[int], float] = 1e-8,
             inner: Callable[[], Stepper] | None = None) -> Stepper:
    """COAP around an inner Adam (torch's eps placement: u = m_hat / (sqrt(v_hat) + eps); ``eps`` may
    be a function of t, e.g. ``lambda t: 1e-6 / sqrt(1 - b2**t)`` for the Hugging Face placement),
    or around ``inner`` (a stepper factory keeping no first moment: the cosine factor is dropped
    and ``restore`` carries nothing).

    Per matrix G (a tensor with >= 2 dims viewed as (shape[0], -1); m < n transposed to Gr = G^T,
    P r x m then): t = 1: P = range finder of Gr with :func:`first_test_matrix`; else when
    (t-1) % interval == 0: if (t-1) % (interval*reproject) == 0, P = range finder of Gr with
    Omega = P^T, else P = :func:`coap_refine` with M the inner first moment before this step
    (transposed like Gr) and the cosine along axis 1 (tall) or 0 (wide); ``restore``:
    M <- (M P_old) P_new^T, V <- ((sqrt(V) P_old) P_new^T)^2. R = Gr P^T is handed to the inner
    (transposed back for a wide G); u = scale * N P (transposed back). Vectors and matrices with
    min(m, n) <= rank bypass: inner at full size, no scale."""
    st: dict[str, Any] = {"P": {}, "m": None, "v": None}
    inner_step = inner() if inner is not None else None

    def eps_at(t: int) -> float:
        return eps(t) if callable(eps) else eps

    def adam(t: int, xs: Arrays) -> Arrays:
        if st["m"] is None:
            st["m"] = [np.zeros_like(x) for x in xs]
            st["v"] = [np.zeros_like(x) for x in xs]
        out = []
        for i, x in enumerate(xs):
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * x
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * x * x
            mhat = st["m"][i] / (1 - b1 ** t)
            vhat = st["v"][i] / (1 - b2 ** t)
            out.append(mhat / (np.sqrt(vhat) + eps_at(t)))
        return out

    def step(t, gs, ps):
        lows, plans = [], []
        for i, g in enumerate(gs):
            g = np.asarray(g, dtype=np.float64)
            if g.ndim < 2 or rank >= min(g.shape[0], g.size // g.shape[0]):
                lows.append(g)
                plans.append(None)
                continue
            mat = g.reshape(g.shape[0], -1)
            wide = mat.shape[0] < mat.shape[1]
            gr = mat.T if wide else mat
            p = st["P"].get(i)
            if p is None:
                p = range_finder(gr, first_test_matrix(gr.shape[1], rank, seed))
            elif (t - 1) % interval == 0:
                have_m = inner_step is None and st["m"] is not None
                mom = (st["m"][i].T if wide else st["m"][i]) if have_m else None
                if restore and have_m:
                    sec = st["v"][i].T if wide else st["v"][i]
                    full_m, full_s = mom @ p, np.sqrt(sec) @ p
                if (t - 1) % (interval * reproject) == 0:
                    p = range_finder(gr, p.T)
                else:
                    p = coap_refine(p, mom, gr, cos_axis=0 if wide else 1)
                if restore and have_m:
                    new_m, new_v = full_m @ p.T, (full_s @ p.T) ** 2
                    st["m"][i] = new_m.T if wide else new_m
                    st["v"][i] = new_v.T if wide else new_v
            st["P"][i] = p
            r = gr @ p.T
            lows.append(r.T if wide else r)
            plans.append((wide, g.shape))
        news = adam(t, lows) if inner_step is None else inner_step(t, lows, [None] * len(gs))
        out = []
        for i, (n, plan) in enumerate(zip(news, plans)):
            if plan is None:
                out.append(n)
                continue
            wide, shape = plan
            back = (n.T if wide else n) @ st["P"][i]
            out.append(scale * (back.T if wide else back).reshape(shape))
        return out

    step.state = st  # type: ignore[attr-defined]
    return step


# ----------------------------------------------------------------------------- Natural GaLore
def ref_woodbury_fisher(s: int = 20, lam: float = 1e-3) -> Stepper:
    """Natural GaLore's transform as the reference writes it, per tensor: v = g flattened; the
    history keeps the last s vectors, the current one included (FIFO); G = [history] (k x s');
    S = I + G^T G / lam; z = S^{-1} G^T v by Cholesky; u = v / lam - G z / lam^2, reshaped."""
    hist: dict[int, list[np.ndarray]] = {}

    def step(t, gs, ps):
        out = []
        for i, g in enumerate(gs):
            v = np.asarray(g, dtype=np.float64).reshape(-1)
            h = hist.setdefault(i, [])
            if len(h) == s:
                h.pop(0)
            h.append(v.copy())
            big = np.stack(h, axis=1)
            chol = np.linalg.cholesky(np.eye(big.shape[1]) + big.T @ big / lam)
            rhs = big.T @ v
            z = np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))
            out.append((v / lam - big @ z / lam ** 2).reshape(np.shape(g)))
        return out

    step.state = hist  # type: ignore[attr-defined]
    return step


def ref_chain(*factories: Callable[[], Stepper]) -> Stepper:
    """Steppers applied one after the other (``a | b``)."""
    steps = [f() for f in factories]

    def step(t, gs, ps):
        for s in steps:
            gs = s(t, gs, ps)
        return gs
    return step


def ref_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Stepper:
    """torch's Adam: u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"] = [np.zeros_like(np.asarray(g, dtype=np.float64)) for g in gs]
            st["v"] = [np.zeros_like(np.asarray(g, dtype=np.float64)) for g in gs]
        out = []
        for i, g in enumerate(gs):
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
            out.append((st["m"][i] / (1 - b1 ** t)) / (np.sqrt(st["v"][i] / (1 - b2 ** t)) + eps))
        return out
    return step


def ref_sign() -> Stepper:
    return lambda t, gs, ps: [np.sign(g) for g in gs]


def hf_eps(eps: float = 1e-6, b2: float = 0.999) -> Callable[[int], float]:
    """torch-placement eps equal to Hugging Face's ``sqrt(v) + eps`` before bias correction."""
    return lambda t: eps / math.sqrt(1 - b2 ** t)

