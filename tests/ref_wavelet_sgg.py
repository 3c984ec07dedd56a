"""NumPy reference steppers for the wrappers ``wavelet`` (GWT) and ``group_scale`` (SGG).

Written from the equations (the op docstrings and the research notes on the
reference code: zqOuO/GWT ``waveadamw.py`` with ptwt's Haar ``wavedec``/``waverec``,
Westlake-AI/OpenToMe ``adamw_sgg.py`` "version 2"), never from the op modules.
Like the references of ``tests/op_table.py`` they are *steppers*:
``step(t, gs, ps) -> updates`` with ``t`` counting from 1, ``gs[i]`` the gradient
of tensor ``i`` and ``ps`` the parameters before the step (unused here); the
update ``u`` per tensor is what the pipeline must emit (``p <- p - lr * u``).
Both wrap Adam, the inner op the reference code fuses in. Each stepper exposes
its state as ``step.state`` for tests.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Stepper", "haar_dec", "haar_rec", "ref_wavelet_adam", "kmeans_1d_np", "sgg_rescale",
           "ref_group_scale_adam"]

Arrays = list  # list[np.ndarray], one per tensor
#: ``stepper(t, gs, ps) -> updates``; t counts from 1
Stepper = Callable[[int, Arrays, Arrays], Arrays]

_R2 = math.sqrt(2.0)


# ------------------------------------------------------------------------------ GWT
def haar_dec(x: np.ndarray, levels: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """pywt/ptwt ``wavedec(x, 'haar', level=L, mode='zero')`` along the last axis:
    ``(A_L, [D_L, ..., D_1], lengths)``. At each level an odd length gets one zero on
    the right; A = (x[2k] + x[2k+1]) / sqrt 2, D = (x[2k] - x[2k+1]) / sqrt 2."""
    a = np.asarray(x, dtype=np.float64)
    ds, lens = [], []
    for _ in range(levels):
        n = a.shape[-1]
        lens.append(n)
        if n % 2:
            a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,))], axis=-1)
        pairs = a.reshape(a.shape[:-1] + (a.shape[-1] // 2, 2))
        ds.append((pairs[..., 0] - pairs[..., 1]) / _R2)
        a = (pairs[..., 0] + pairs[..., 1]) / _R2
    return a, ds[::-1], lens[::-1]


def haar_rec(a: np.ndarray, ds: Sequence[np.ndarray], lens: Sequence[int]) -> np.ndarray:
    """``waverec`` of :func:`haar_dec`'s output, cropping each level to its length."""
    for d, n in zip(ds, lens):
        out = np.empty(a.shape[:-1] + (2 * a.shape[-1],))
        out[..., 0::2] = (a + d) / _R2
        out[..., 1::2] = (a - d) / _R2
        a = out[..., :n]
    return a


def ref_wavelet_adam(levels: int = 2, scale: float = 0.25, limiter: float = 1.01, b1: float = 0.9,
                     b2: float = 0.999, eps: float = 1e-8, hf_eps: bool = False) -> Stepper:
    """GWT with Adam (``wavelet(levels, scale, limiter) { adam(b1, b2, eps) }``), the
    reference's Hugging Face form: per tensor with >= 2 dims, A, D = haar_dec(G);
    m, v: Adam's moments of A; den = sqrt(v) + e; c = sqrt(1-b2^t) / (1-b1^t);
    N = m / den; limiter (gamma > 0): s = |N| at the first step, then
    lim = max(|N| / (s + 1e-8), gamma) / gamma, s = |N| / lim (Frobenius norms);
    u = c * scale * haar_rec(N / lim, D_l / (den[k // 2^(L-l)] * lim)). Tensors with
    fewer dims: Adam, c * m / (sqrt(v) + e), no transform, no scale.

    ``e`` is the Hugging Face epsilon: ``eps`` itself with ``hf_eps=True`` (the
    reference code; the op reproduces it with ``adam(eps = eps / sqrt(1 - b2^step))``),
    else ``eps * sqrt(1 - b2^t)``, which is torch's epsilon ``eps`` of the op's
    ``adam(eps=eps)`` written in the reference's form."""
    st: dict[str, Any] = {"m": {}, "v": {}, "s": {}}

    def step(t, gs, ps):
        e = eps if hf_eps else eps * math.sqrt(1 - b2 ** t)
        c = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        out = []
        for i, g in enumerate(gs):
            g = np.asarray(g, dtype=np.float64)
            transform = g.ndim >= 2
            a, ds, lens = haar_dec(g, levels) if transform else (g, [], [])
            if i not in st["m"]:
                st["m"][i], st["v"][i] = np.zeros_like(a), np.zeros_like(a)
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * a
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * a * a
            den = np.sqrt(st["v"][i]) + e
            n = st["m"][i] / den
            if not transform:
                out.append(c * n)
                continue
            lim = 1.0
            if limiter:
                norm = float(np.linalg.norm(n))
                if i in st["s"]:
                    lim = max(norm / (st["s"][i] + 1e-8), limiter) / limiter
                st["s"][i] = norm / lim
            details = []
            for j, d in enumerate(ds):  # j = 0 is D_L, whose parent is den itself
                parent = np.repeat(den, 2 ** j, axis=-1)[..., :d.shape[-1]]
                details.append(d / (parent * lim))
            out.append(c * scale * haar_rec(n / lim, details, lens))
        return out
    step.state = st
    return step


# ------------------------------------------------------------------------------ SGG
def kmeans_1d_np(x: np.ndarray, k: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means: quantile start c_j = sorted(x)[(2j+1) n // 2k], at most
    ``iters`` Lloyd iterations (nearest centre, ties to the lower one; mean of each
    cluster; an empty one stays), stopping when the assignment repeats; centres
    ascending; labels = nearest final centre. Returns (centres, labels)."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    xs = np.sort(flat)
    n = xs.size
    c = xs[[(2 * j + 1) * n // (2 * k) for j in range(k)]].copy()

    def assign(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
        mids = (centres[:-1] + centres[1:]) / 2
        return np.searchsorted(mids, values, side="left")  # mids[j-1] < x <= mids[j]

    prev = None
    for _ in range(iters):
        lab = assign(flat, c)
        if prev is not None and np.array_equal(lab, prev):
            break
        prev = lab
        new = c.copy()
        for j in range(k):
            if np.any(lab == j):
                new[j] = flat[lab == j].mean()
        c = np.sort(new)
    return c, assign(flat, c).reshape(np.shape(x))


def sgg_rescale(x: np.ndarray, labels: np.ndarray, means: np.ndarray, scales: np.ndarray, decay_means: float,
                decay_scale: float, low: float, high: float, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """One SGG re-grouping given the labels (AdamWSGG v2): center = mean(x);
    mu_c = d_mu mu_c + (1-d_mu) mean(x[labels == c]) (center if empty);
    s_c = clip(d_s s_c + (1-d_s) center / max(mu_c, eps), low, high). Returns new (mu, s)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    center = x.mean()
    means = np.array(means, dtype=np.float64)
    for c in range(len(means)):
        cur = x[labels == c].mean() if np.any(labels == c) else center
        means[c] = decay_means * means[c] + (1 - decay_means) * cur
    scales = np.clip(decay_scale * np.asarray(scales, dtype=np.float64)
                     + (1 - decay_scale) * center / np.maximum(means, eps), low, high)
    return means, scales


def ref_group_scale_adam(k: int = 3, interval: int = 500, decay_means: float = 0.999, decay_scale: float = 0.999,
                         low: float = 0.1, high: float = 10.0, b1: float = 0.9, b2: float = 0.999,
                         eps: float = 1e-8) -> Stepper:
    """SGG around torch's Adam (``group_scale(...) { adam(b1, b2, eps) }``): per tensor,
    u_in = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps); when t % interval == 0, labels =
    kmeans_1d_np(|m|, k) and (mu, s) = sgg_rescale(...) (mu, s start at 1, labels at 0);
    u = u_in * s[labels]."""
    st: dict[str, dict[int, np.ndarray]] = {"m": {}, "v": {}, "labels": {}, "means": {}, "scales": {}}

    def step(t, gs, ps):
        out = []
        for i, g in enumerate(gs):
            g = np.asarray(g, dtype=np.float64)
            if i not in st["m"]:
                st["m"][i], st["v"][i] = np.zeros_like(g), np.zeros_like(g)
                st["labels"][i] = np.zeros(g.shape, dtype=np.int64)
                st["means"][i], st["scales"][i] = np.ones(k), np.ones(k)
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
            u = (st["m"][i] / (1 - b1 ** t)) / (np.sqrt(st["v"][i] / (1 - b2 ** t)) + eps)
            if t % interval == 0 and g.size:
                x = np.abs(st["m"][i])
                _, st["labels"][i] = kmeans_1d_np(x, k)
                st["means"][i], st["scales"][i] = sgg_rescale(x, st["labels"][i], st["means"][i], st["scales"][i],
                                                              decay_means, decay_scale, low, high)
            out.append(u * st["scales"][i][st["labels"][i]])
        return out
    step.state = st
    return step
