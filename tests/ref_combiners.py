"""NumPy reference steppers for the multi-task combiners ``gcond`` and ``samgs``.

Written from the equations (the op docstrings and the research notes on the
reference code: AlevLab-dev/GCond ``grad_conductor.py``, ThomBors/samgs
``methods/weight_methods.py``), never from the op modules. Like the references
of ``tests/op_table.py`` they are *steppers*: ``step(t, gs, ps) -> updates``
with ``t`` counting from 1, the parameters ``ps`` before the step, and, for a
combiner, ``gs[k][i]`` the gradient of task ``k`` for tensor ``i`` (a task that
does not reach a tensor gives zeros there). The update ``u`` per tensor is what
the pipeline must emit (``p <- p - lr * u``).

Both work the way the reference code does: every task's gradient is flattened
into one vector (GCond: all tensors; SAM-GS: the shared tensors, as a D x K
matrix), the algorithm runs on the vectors in float64, and the result is cut
back into tensors. Each stepper exposes its state as ``step.state`` (e.g.
``step.state["history"]``) for tests.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ref_gcond", "ref_samgs", "Stepper"]

Arrays = list  # list[np.ndarray], one per tensor
#: ``stepper(t, gs, ps) -> updates``; ``gs[k][i]``: task k's gradient of tensor i
Stepper = Callable[[int, Sequence[Arrays], Arrays], Arrays]


def _flatten(tensors: Sequence[np.ndarray]) -> np.ndarray:
    if not tensors:
        return np.zeros(0)
    return np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in tensors])


def _split(flat: np.ndarray, like: Sequence[np.ndarray]) -> Arrays:
    out, at = [], 0
    for x in like:
        size = int(np.asarray(x).size)
        out.append(flat[at:at + size].reshape(np.shape(x)).copy())
        at += size
    return out


# ----------------------------------------------------------------------------- GCond
def ref_gcond(beta: float = 0.85, t_crit: float = -0.8, t_main: float = -0.5, t_weak: float = 0.0,
              w_stability: float = 0.8, w_strength: float = 0.2, remap_power: float = 2.0,
              norm_ema_beta: float = 0.95, dominance_window: int = 3, max_iters: int = 0,
              norm_cap: float = math.inf, eps: float = 1e-8) -> Stepper:
    """GCond, smooth logic, one accumulation step, non-stochastic (the per-task inputs are
    the accumulators).

    Per step: norm EMAs (start 1.0) on the raw norms, optional norm cap, then up to
    ``max_iters`` (0: 2K) resolutions of the most conflicting pair (smallest cosine
    below ``t_weak``; squared norm below eps: skipped), each with winner/loser from
    the arbitrator (dominance: a task that won the last W resolutions loses; else
    0.8 max(0, cos(g, prev)) + 0.2 strength, ties to the earlier task), angle remap,
    s_w = sin(a), s_l = sin(min(a, pi/2)), simultaneous update; then the sum,
    m = beta m + (1-beta) sum, u = m / (1-beta^t); prev = projected per-task vectors.
    """
    st: dict[str, Any] = {}

    def alpha_of(c: float) -> float:
        c = min(1.0, max(-1.0, c))
        if c >= t_main:
            frac = min(1.0, max(0.0, (c - t_main) / (t_weak - t_main + eps)))
            return math.pi / 2 * (1 - frac)
        if c > t_crit:
            frac = (c - t_main) / (t_crit - t_main + eps)
            return math.pi / 2 + math.pi / 2 * frac ** remap_power
        return math.pi

    def arbitrate(i: int, j: int, g: list[np.ndarray]) -> int:
        hist, w = st["history"], dominance_window
        full = w > 0 and len(hist) == w
        i_dom = full and all(h == i for h in hist)
        j_dom = full and all(h == j for h in hist)
        if i_dom and not j_dom:
            return j
        if j_dom and not i_dom:
            return i
        scores = []
        norms = [math.sqrt(float(np.dot(g[k], g[k]))) for k in (i, j)]
        scaled = [norms[0] / (st["ema"][i] + eps), norms[1] / (st["ema"][j] + eps)]
        for pos, k in enumerate((i, j)):
            prev = st["prev"][k]
            stability = float(np.dot(g[k], prev)) / (norms[pos] * math.sqrt(float(np.dot(prev, prev))) + eps)
            strength = scaled[pos] / (scaled[0] + scaled[1] + eps)
            scores.append(w_stability * max(0.0, stability) + w_strength * strength)
        return j if scores[1] > scores[0] else i

    def step(t: int, gs: Sequence[Arrays], ps: Arrays) -> Arrays:
        k_tasks = len(gs)
        g = [_flatten(task) for task in gs]
        if not st:
            st.update(ema=[1.0] * k_tasks, history=[], prev=[np.zeros_like(g[0]) for _ in range(k_tasks)],
                      m=np.zeros_like(g[0]), t=0, log=[])
        for k in range(k_tasks):
            st["ema"][k] = max(norm_ema_beta * st["ema"][k] + (1 - norm_ema_beta) * float(np.linalg.norm(g[k])), eps)
        if math.isfinite(norm_cap):
            for k in range(k_tasks):
                nk = float(np.linalg.norm(g[k]))
                if nk > norm_cap:
                    g[k] = g[k] * (norm_cap / (nk + eps))
        for _ in range(max_iters or 2 * k_tasks):
            best, pair = t_weak, None
            for i in range(k_tasks):
                for j in range(i + 1, k_tasks):
                    sq_i, sq_j = float(np.dot(g[i], g[i])), float(np.dot(g[j], g[j]))
                    if sq_i < eps or sq_j < eps:
                        continue
                    cos = float(np.dot(g[i], g[j])) / (math.sqrt(sq_i * sq_j) + eps)
                    if cos < best:
                        best, pair = cos, (i, j)
            if pair is None:
                break
            i, j = pair
            d = float(np.dot(g[i], g[j]))
            win = arbitrate(i, j, g)
            lose = j if win == i else i
            if dominance_window > 0:
                st["history"] = (st["history"] + [win])[-dominance_window:]
            a = alpha_of(best)
            s_w, s_l = math.sin(a), math.sin(min(a, math.pi / 2))
            gw, gl = g[win], g[lose]
            new_w = gw - s_w * d / (float(np.dot(gl, gl)) + eps) * gl
            new_l = gl - s_l * d / (float(np.dot(gw, gw)) + eps) * gw
            g[win], g[lose] = new_w, new_l
            st["log"].append((t, pair, best, win))
        total = g[0].copy()
        for k in range(1, k_tasks):
            total = total + g[k]
        st["t"] += 1
        st["m"] = beta * st["m"] + (1 - beta) * total
        st["prev"] = [x.copy() for x in g]
        return _split(st["m"] / (1 - beta ** st["t"]), gs[0])

    step.state = st  # type: ignore[attr-defined]
    return step


# ---------------------------------------------------------------------------- SAM-GS
def ref_samgs(b1: float = 0.9, b2: float = 0.99, gamma: float = 0.1,
              shared: Sequence[bool] | None = None) -> Stepper:
    """SAM-GS (class ``SAMGS``) on the shared tensors (``shared[i]``; all when None), the
    plain sum of the task gradients on the others.

    W = D x K (task gradients as columns), n = column norms, GMS_ij = 2 n_i n_j / (n_i^2 + n_j^2),
    s = mean over i<j; m = b1 m + (1-b1) W; v = b2 v + (1-b2)(1-s)^2 + 1e-8;
    mhat = m/(1-b1^t), vhat = v/(1-b2^t); s < gamma: g = sum_k W_k / n_k * mean(n),
    else g = sum_k W_k |mhat_k| / sqrt(vhat); u = K g. (0/0 -> 0 for a zero column,
    GMS = 1 for two zero columns, as the op documents.)
    """
    st: dict[str, Any] = {}

    def step(t: int, gs: Sequence[Arrays], ps: Arrays) -> Arrays:
        k_tasks, n = len(gs), len(gs[0])
        mask = [True] * n if shared is None else list(shared)
        idx = [i for i in range(n) if mask[i]]
        out: Arrays = [None] * n
        for i in range(n):
            if not mask[i]:  # a task head: the plain sum
                total = np.array(gs[0][i], dtype=np.float64)
                for k in range(1, k_tasks):
                    total = total + gs[k][i]
                out[i] = total
        if not idx:
            return out
        w = np.stack([_flatten([gs[k][i] for i in idx]) for k in range(k_tasks)], axis=1)  # D x K
        if not st:
            st.update(m=np.zeros_like(w), v=0.0, t=0, branch=[])
        mg = np.linalg.norm(w, axis=0)
        sims = []
        for i in range(k_tasks):
            for j in range(i + 1, k_tasks):
                den = mg[i] ** 2 + mg[j] ** 2
                sims.append(2 * mg[i] * mg[j] / den if den > 0 else 1.0)
        sbar = float(np.mean(sims))
        st["t"] += 1
        st["m"] = b1 * st["m"] + (1 - b1) * w
        st["v"] = b2 * st["v"] + (1 - b2) * (1 - sbar) ** 2 + 1e-8
        mhat = st["m"] / (1 - b1 ** st["t"])
        vhat = st["v"] / (1 - b2 ** st["t"])
        if sbar < gamma:
            st["branch"].append("equalise")
            unit = np.where(mg > 0, w / np.where(mg > 0, mg, 1.0), 0.0)
            g = (unit * mg.mean()).sum(axis=1)
        else:
            st["branch"].append("modulate")
            g = (w * np.abs(mhat) / math.sqrt(vhat)).sum(axis=1)
        parts = _split(g * k_tasks, [gs[0][i] for i in idx])
        for i, part in zip(idx, parts):
            out[i] = part
        return out

    step.state = st  # type: ignore[attr-defined]
    return step
