"""One table of ops that drives the generic op tests (``test_ops.py``).

Each :class:`OpCase` is a pipeline snippet that uses one op of
``gradpipe.compiler.ops.OPS`` and a hand-written NumPy reference of the op's
equations (from the op's docstring and the paper it cites; never the
op's own code). The reference is a *stepper*: called once per step with the
step number, the gradients and the parameters before the step, it returns the
update ``u`` the pipeline must emit, so the runtime's ``p <- p - lr * u`` with
``lr = 1`` gives ``p_before - p_after == u``.

Every op must have at least one case (``test_table_covers_every_op``), so a
new op without a row fails the suite. Several cases may cover one op
(different scopes, geometries, options). Adding a row is one line plus a
``ref_<op>`` factory; block ops take the inner pipeline's reference as a
factory (``ref_galore(2, 3, 0.25, lambda: ref_adam(...))``) and pipelines of
several stages chain references with :func:`ref_chain`.

Inputs (:data:`INPUTS`, picked by ``OpCase.inputs``):

* ``default``: two float64 tensors of different shapes, so a ``global``
  reduction (over every tensor of the route) differs from a ``tensor`` one;
  the gradients change scale from step to step, so clipping thresholds are
  crossed in both directions.
* ``tasks`` (the default of multi-loss rows, those with ``OpCase.tasks``):
  per step, one gradient per loss ``a``, ``b``, ``c`` on the same tensors; a
  and b conflict on :data:`CONFLICT_STEPS` and agree on the others. The
  runtime gets them through ``Optimizer.step(losses=...)`` with linear losses
  (:func:`linear_losses`), whose autograd gradients are exactly these; the
  stepper gets ``{task: [array | None per tensor]}`` in the row's task order.
* ``tasks_head``: the same, but loss ``c`` does not reach the vector (like a
  task head), which makes that tensor not shared (``ctx.shared``).
* ``matrices``: a wide and a tall matrix, a 3-D kernel and a vector, for the
  low-rank wrappers (both projection sides, the bypass of vectors).
* ``samples``: per-example gradients for the DP ops, per step a :class:`Samples`
  (per tensor a ``(B, *shape)`` array, :data:`SAMPLE_B` examples). The runtime
  gets them through ``Optimizer.step(samples={param: tensor})`` (``p.grad``
  stays unset); the stepper gets the list of ``(B, *shape)`` arrays. The
  examples' norms (over both tensors) straddle both clipping norms the rows use.

Rows may also give a ``setup(optimizer, params)`` hook (``OpCase.setup``), run on
every optimizer the generic tests build before its first step, for state the
user provides rather than the op creates (``project_out``'s basis, set with
``opt.set_basis``). Such state lives in ``opt.state`` and ``state_dict``, so an
optimizer that loads a state dict gets it from there, not from the hook.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch


import gradpipe
from ref_combiners import ref_gcond, ref_samgs
from ref_wavelet_sgg import ref_group_scale_adam, ref_wavelet_adam
import ref_lowrank_coap as RC

__all__ = ["OpCase", "CASES", "SHAPES", "STEPS", "GRADS", "PARAMS0", "TASKS", "TASK_GRADS", "TASK_GRADS_HEAD",
           "CONFLICT_STEPS", "MATRIX_SHAPES", "MATRIX_GRADS", "MATRIX_PARAMS0", "SAMPLE_B", "SAMPLE_NORMS",
           "SAMPLE_GRADS", "Samples", "PROJECT_OUT_BASES", "INPUTS", "Inputs", "Stepper",
           "make_params", "clone_params", "run_case", "run_optimizer", "run_optimizer_params", "assert_exact_updates",
           "reference_updates", "case_ids", "case_grads", "case_params0", "linear_losses", "make_case_optimizer"]

Arrays = list  # list[np.ndarray], one per tensor
#: one step of a multi-loss row: task name -> one gradient per tensor, None where the loss does not reach it
TaskGrads = dict
#: ``stepper(t, grads, params) -> updates``; t counts from 1, params are the values before the step.
#: ``grads`` is a list of arrays (one per tensor) for single-loss rows, a :data:`TaskGrads` for multi-loss ones.
Stepper = Callable[[int, Any, Arrays], Arrays]

SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (5,))
STEPS = 5
_SCALES = (1.0, 0.3, 2.0, 0.1, 1.0)


def _fixed_inputs() -> tuple[list[Arrays], Arrays]:
    rs = np.random.RandomState(1234)
    grads = []
    for s in _SCALES:
        # the second tensor is a bit larger so per-tensor and global norms rank differently per step
        grads.append([rs.randn(*SHAPES[0]) * s, rs.randn(*SHAPES[1]) * s * 1.5])
    params0 = [rs.randn(*shape) for shape in SHAPES]
    return grads, params0


#: GRADS[t-1][i]: the gradient of tensor i at step t
GRADS, PARAMS0 = _fixed_inputs()

#: the loss names of the multi-loss inputs
TASKS: tuple[str, ...] = ("a", "b", "c")
#: steps (from 1) on which tasks a and b conflict (negative global inner product); they agree on the others
CONFLICT_STEPS: tuple[int, ...] = (1, 3, 5)


def _task_inputs() -> list[TaskGrads]:
    """Three tasks' gradients per step on the :data:`SHAPES` tensors. ``b`` is ``-/+0.8 a`` plus
    noise, so a and b conflict exactly on :data:`CONFLICT_STEPS`; ``c`` is independent (it
    conflicts with a or b on some steps, which makes PCGrad's order matter for three tasks)."""
    rs = np.random.RandomState(4321)
    out = []
    for t, s in enumerate(_SCALES, start=1):
        a = [rs.randn(*shape) * s for shape in SHAPES]
        sign = -1.0 if t in CONFLICT_STEPS else 1.0
        b = [sign * 0.8 * x + 0.5 * s * rs.randn(*x.shape) for x in a]
        c = [rs.randn(*shape) * s * 1.2 for shape in SHAPES]
        out.append({"a": a, "b": b, "c": c})
    return out


#: TASK_GRADS[t-1][task][i]: the gradient of loss ``task`` for tensor i at step t (every loss reaches every tensor)
TASK_GRADS: list[TaskGrads] = _task_inputs()
#: the same, except that loss ``c`` does not reach tensor 1 (a head of the other tasks): that tensor is not shared
TASK_GRADS_HEAD: list[TaskGrads] = [{**step, "c": [step["c"][0], None]} for step in TASK_GRADS]

#: tensors for the low-rank wrappers: a wide matrix (left projector), a tall one (right projector),
#: a 3-D kernel viewed as 2x6, and a vector that bypasses the projection
MATRIX_SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (6, 3), (2, 3, 2), (5,))


def _matrix_inputs() -> tuple[list[Arrays], Arrays]:
    rs = np.random.RandomState(99)
    grads = [[rs.randn(*shape) * s for shape in MATRIX_SHAPES] for s in _SCALES]
    return grads, [rs.randn(*shape) for shape in MATRIX_SHAPES]


MATRIX_GRADS, MATRIX_PARAMS0 = _matrix_inputs()


class Samples(list):
    """One step of per-example gradients: per tensor a ``(B, *shape)`` array. A list subclass,
    so the runners can tell it from a step of ordinary gradients."""


#: examples per step of the per-example inputs
SAMPLE_B = 4
#: the per-example norms (over every tensor) the examples are drawn around, times a factor in
#: [0.8, 1.2]: every step has examples below and above both clipping norms the rows use (0.5, 1.0)
SAMPLE_NORMS: tuple[float, ...] = (0.2, 0.7, 1.4, 3.0)


def _sample_inputs() -> list[Samples]:
    """Per step, :data:`SAMPLE_B` per-example gradients on the :data:`SHAPES` tensors; example b's
    global norm is a shuffled :data:`SAMPLE_NORMS` entry times a factor in [0.8, 1.2]."""
    rs = np.random.RandomState(2024)
    out = []
    for _ in range(STEPS):
        raw = [rs.randn(SAMPLE_B, *shape) for shape in SHAPES]
        norms = np.sqrt(sum(np.sum(x.reshape(SAMPLE_B, -1) ** 2, axis=1) for x in raw))
        target = rs.permutation(SAMPLE_NORMS) * rs.uniform(0.8, 1.2, SAMPLE_B)
        factor = target / norms
        out.append(Samples(x * factor.reshape((-1,) + (1,) * (x.ndim - 1)) for x in raw))
    return out


#: SAMPLE_GRADS[t-1][i][b]: example b's gradient of tensor i at step t
SAMPLE_GRADS: list[Samples] = _sample_inputs()


def _orthonormal(rs: np.random.RandomState, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rs.randn(n, k))
    return q


def _project_out_bases() -> list[np.ndarray | None]:
    """Fixed orthonormal input-space bases (``in x k``) for the :data:`MATRIX_SHAPES` tensors:
    k = 2 of 4 for the wide matrix, 1 of 3 for the tall one (``relax=1`` frees it entirely), 3 of 6
    for the kernel viewed as 2 x 6; none for the vector."""
    rs = np.random.RandomState(7)
    ks = (2, 1, 3, None)
    out: list[np.ndarray | None] = []
    for shape, k in zip(MATRIX_SHAPES, ks):
        out.append(None if k is None else _orthonormal(rs, math.prod(shape[1:]), k))
    return out


#: PROJECT_OUT_BASES[i]: the basis ``opt.set_basis`` gives MATRIX_SHAPES[i] in the project_out rows
PROJECT_OUT_BASES: list[np.ndarray | None] = _project_out_bases()


#: tolerance of rows that take an SVD: the op computes it in fp32 (its documented precision), so the
#: projector differs from the reference's by ~1e-7 and Adam's state carries that across projector changes
SVD_TOL: tuple[float, float] = (1e-5, 1e-6)


@dataclass(frozen=True)
class Inputs:
    """A fixed input set: per step either a list of gradients (one per tensor) or a
    :data:`TaskGrads`; and the parameters before the first step."""

    grads: Sequence[Any]
    params0: Arrays


INPUTS: dict[str, Inputs] = {
    "default": Inputs(GRADS, PARAMS0),
    "tasks": Inputs(TASK_GRADS, PARAMS0),
    "tasks_head": Inputs(TASK_GRADS_HEAD, PARAMS0),
    "matrices": Inputs(MATRIX_GRADS, MATRIX_PARAMS0),
    "samples": Inputs(SAMPLE_GRADS, PARAMS0),
}


# ------------------------------------------------------------------------ NumPy helpers
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _global_norm(xs: Arrays) -> float:
    return math.sqrt(sum(float(np.sum(x * x)) for x in xs))


def _zeros(gs: Arrays) -> Arrays:
    return [np.zeros_like(g) for g in gs]


# ------------------------------------------------------------------------ references
# Each factory returns a fresh stepper with its own state (closures over lists).

def ref_adam(b1: float, b2: float, eps: float) -> Stepper:
    """m = b1 m + (1-b1) x; v = b2 v + (1-b2) x^2; u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"], st["v"] = _zeros(gs), _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
            mhat = st["m"][i] / (1 - b1 ** t)
            vhat = st["v"][i] / (1 - b2 ** t)
            out.append(mhat / (np.sqrt(vhat) + eps))
        return out
    return step


def ref_diffgrad(b1: float, b2: float, eps: float) -> Stepper:
    """diffGrad_v2: Adam moments, friction xi = sigmoid(|g_prev - g|) (g_prev starts at 0, is a copy),
    u = sqrt(1-b2^t)/(1-b1^t) * xi * m / (sqrt(v) + eps)."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"], st["v"], st["prev"] = _zeros(gs), _zeros(gs), _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
            xi = _sigmoid(np.abs(st["prev"][i] - g))
            st["prev"][i] = g.copy()
            step_size = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            out.append(step_size * xi * st["m"][i] / (np.sqrt(st["v"][i]) + eps))
        return out
    return step


def ref_ema(beta: float, debias: bool = False) -> Stepper:
    """m = beta m + (1-beta) x (m_0 = 0); u = m, or m / (1-beta^t) with debias."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"] = _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            st["m"][i] = beta * st["m"][i] + (1 - beta) * g
            out.append(st["m"][i] / (1 - beta ** t) if debias else st["m"][i].copy())
        return out
    return step


def ref_momentum(beta: float, nesterov: bool = False, dampening: float = 0.0) -> Stepper:
    """torch.optim.SGD: b_1 = x_1, b_t = beta b + (1-dampening) x; u = x + beta b (nesterov) else b."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        out = []
        for i, g in enumerate(gs):
            if "b" not in st:
                st["b"] = [None] * len(gs)
            if st["b"][i] is None:
                st["b"][i] = g.copy()
            else:
                st["b"][i] = beta * st["b"][i] + (1 - dampening) * g
            out.append(g + beta * st["b"][i] if nesterov else st["b"][i].copy())
        return out
    return step


def ref_rms(alpha: float, eps: float, centered: bool = False) -> Stepper:
    """v = alpha v + (1-alpha) x^2; u = x / (sqrt(v) + eps); centered: subtract gbar^2 under the root,
    gbar = alpha gbar + (1-alpha) x."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["v"], st["gbar"] = _zeros(gs), _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            st["v"][i] = alpha * st["v"][i] + (1 - alpha) * g * g
            if centered:
                st["gbar"][i] = alpha * st["gbar"][i] + (1 - alpha) * g
                denom = np.sqrt(st["v"][i] - st["gbar"][i] ** 2) + eps
            else:
                denom = np.sqrt(st["v"][i]) + eps
            out.append(g / denom)
        return out
    return step


def ref_lion(b1: float, b2: float) -> Stepper:
    """u = sign(b1 m + (1-b1) x), then m = b2 m + (1-b2) x."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"] = _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            out.append(np.sign(b1 * st["m"][i] + (1 - b1) * g))
            st["m"][i] = b2 * st["m"][i] + (1 - b2) * g
        return out
    return step


def ref_sign() -> Stepper:
    return lambda t, gs, ps: [np.sign(g) for g in gs]


def ref_scale(c: float) -> Stepper:
    return lambda t, gs, ps: [c * g for g in gs]


def ref_scale_by_param() -> Stepper:
    """scale(param): elementwise product with the parameter (read before the update)."""
    return lambda t, gs, ps: [g * p for g, p in zip(gs, ps)]


def ref_decay(wd: float) -> Stepper:
    """u = x + wd * theta."""
    return lambda t, gs, ps: [g + wd * p for g, p in zip(gs, ps)]


def ref_add_ema(beta: float) -> Stepper:
    """add(ema(beta)): u = x + ema(x)."""
    ema = ref_ema(beta)

    def step(t, gs, ps):
        return [g + m for g, m in zip(gs, ema(t, gs, ps))]
    return step


def ref_add_scaled_param(c: float) -> Stepper:
    """add(c * param): u = x + c theta."""
    return lambda t, gs, ps: [g + c * p for g, p in zip(gs, ps)]


def ref_add_number(c: float) -> Stepper:
    """add(c) with a number: u = x + c."""
    return lambda t, gs, ps: [g + c for g in gs]


def ref_clip_value(c: float) -> Stepper:
    return lambda t, gs, ps: [np.clip(g, -c, c) for g in gs]


def ref_clip_norm(c: float, scope: str = "global") -> Stepper:
    """n = ||x|| (global: over both tensors); u = x * min(1, c / (n + 1e-6))."""
    def step(t, gs, ps):
        if scope == "global":
            norms = [_global_norm(gs)] * len(gs)
        else:
            norms = [_global_norm([g]) for g in gs]
        return [g * min(1.0, c / (n + 1e-6)) for g, n in zip(gs, norms)]
    return step


def ref_clip_median(tau: float, geometry: str = "l2", scope: str = "global", reset: bool = False) -> Stepper:
    """m_t = m_{t-1} + clip_tau(x_t - m_{t-1}); u = m_t. l2: r * min(1, tau/||r||) with clip(0) = 0,
    the norm global or per tensor; coord: clamp(r, -tau, tau). reset: m_{t-1} := 0 every step."""
    st: dict[str, Arrays] = {}

    def clip(rs: Arrays) -> Arrays:
        if geometry == "coord":
            return [np.clip(r, -tau, tau) for r in rs]
        norms = [_global_norm(rs)] * len(rs) if scope == "global" else [_global_norm([r]) for r in rs]
        return [r * (min(1.0, tau / n) if n > 0 else 0.0) for r, n in zip(rs, norms)]

    def step(t, gs, ps):
        if reset or not st:
            st["m"] = _zeros(gs)
        rs = [g - m for g, m in zip(gs, st["m"])]
        st["m"] = [m + s for m, s in zip(st["m"], clip(rs))]
        return [m.copy() for m in st["m"]]
    return step


def project(a: Arrays, r: Arrays, scope: str = "global", eps: float = 1e-7,
            max_coef: float = math.inf) -> Arrays:
    """c = min(<a,r>/(<r,r>+eps), max_coef) (sums over every tensor with scope=global); u = a - c r."""
    if scope == "global":
        ar = sum(float(np.sum(x * y)) for x, y in zip(a, r))
        rr = sum(float(np.sum(y * y)) for y in r)
        coefs = [min(ar / (rr + eps), max_coef)] * len(a)
    else:
        coefs = [min(float(np.sum(x * y)) / (float(np.sum(y * y)) + eps), max_coef) for x, y in zip(a, r)]
    return [x - c * y for x, y, c in zip(a, r, coefs)]


def ref_project_ema(beta: float, scope: str = "global", eps: float = 1e-7) -> Stepper:
    """project_orthogonal(ema(beta)): r = EMA of the op's input, updated *before* the projection."""
    ema = ref_ema(beta)

    def step(t, gs, ps):
        return project(gs, ema(t, gs, ps), scope, eps)
    return step


def ref_project_param(max_coef: float, scope: str = "global", eps: float = 1e-7) -> Stepper:
    """project_orthogonal(param, max_coef=...): the reference is theta before the update."""
    return lambda t, gs, ps: project(gs, ps, scope, eps, max_coef)


def ref_noise(eta: float, gamma: float, seed: int) -> Stepper:
    """u = x + sqrt(eta / t^gamma) z, z ~ N(0, 1) fresh per tensor and step, drawn in route order from
    one generator seeded with ``seed`` (the documented contract: a torch CPU generator, draws in the
    compute dtype, float64 here)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def step(t, gs, ps):
        std = math.sqrt(eta / t ** gamma)
        out = []
        for g in gs:
            z = torch.randn(g.shape, generator=gen, dtype=torch.float64).numpy()
            out.append(g + std * z)
        return out
    return step


def ref_grams(b1: float, b2: float, eps: float) -> Stepper:
    """Official Grams step: Adam m, v (zero init); u = sqrt(1-b2^t)/(1-b1^t) * sign(x) * |m| / (sqrt(v) + eps)."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["m"], st["v"] = _zeros(gs), _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
            step_size = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            out.append(step_size * np.sign(g) * np.abs(st["m"][i]) / (np.sqrt(st["v"][i]) + eps))
        return out
    return step


def ref_gravity(alpha: float, beta: float, seed: int, lr0: float) -> Stepper:
    """Gravity (Keras code): V_0 = (alpha/lr0) z, z ~ N(0, 1) drawn at the first step, one tensor after
    the other in route order from a torch CPU generator seeded with ``seed`` (float64 here);
    m = 1/max|x|, zeta = x / (1 + (x/m)^2), beta_hat = (beta k + 1)/(k + 2) with k = t - 1 (the Keras
    counter starts at 0), V = beta_hat V + (1 - beta_hat) zeta, u = V."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["V"] = [(alpha / lr0) * torch.randn(g.shape, generator=gen, dtype=torch.float64).numpy()
                       for g in gs]
        k = t - 1
        beta_hat = (beta * k + 1) / (k + 2)
        out = []
        for i, g in enumerate(gs):
            m = 1.0 / np.max(np.abs(g))
            zeta = g / (1 + (g / m) ** 2)
            st["V"][i] = beta_hat * st["V"][i] + (1 - beta_hat) * zeta
            out.append(st["V"][i].copy())
        return out
    return step


def ref_normalize(eps: float, scope: str = "tensor") -> Stepper:
    """u = x / (||x|| + eps), the norm per tensor or over both tensors (global)."""
    def step(t, gs, ps):
        norms = [_global_norm(gs)] * len(gs) if scope == "global" else [_global_norm([g]) for g in gs]
        return [g / (n + eps) for g, n in zip(gs, norms)]
    return step


def ref_centralize() -> Stepper:
    """ndim > 1: x minus its mean over every axis but 0; vectors pass through."""
    def step(t, gs, ps):
        return [g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True) if g.ndim > 1 else g.copy() for g in gs]
    return step


def _unit_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row along axis 0 (ndim > 1, kept as a broadcastable array), else of the whole array."""
    if x.ndim <= 1:
        return np.array(math.sqrt(float(np.sum(x * x))))
    return np.sqrt(np.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def ref_agc(clip: float, eps: float) -> Stepper:
    """max_i = clip * max(||W_i||, eps); x_i * min(1, max_i / ||x_i||) (1 when ||x_i|| = 0); W before the step."""
    def step(t, gs, ps):
        out = []
        for g, p in zip(gs, ps):
            max_norm = clip * np.maximum(_unit_norms(p), eps)
            gn = _unit_norms(g)
            coef = np.where(gn > 0, np.minimum(1.0, max_norm / np.where(gn > 0, gn, 1.0)), 1.0)
            out.append(g * coef)
        return out
    return step


def ref_trust_ratio(eps: float) -> Stepper:
    """u = x ||theta|| / (||x|| + eps) per tensor when both norms are > 0, else x."""
    def step(t, gs, ps):
        out = []
        for g, p in zip(gs, ps):
            pn, gn = _global_norm([p]), _global_norm([g])
            out.append(g * (pn / (gn + eps)) if pn > 0 and gn > 0 else g.copy())
        return out
    return step


def ref_newton_schulz(steps: int, a: float, b: float, c: float, eps: float) -> Stepper:
    """Muon's orthogonalisation in float64: each matrix (a tensor of more dimensions as
    (shape[0], -1)) made wide, X = G / max(||G||_F, eps), then X <- a X + (b A + c A^2) X with
    A = X X^T, ``steps`` times; vectors pass (their route in the row's pipeline)."""
    def step(t, gs, ps):
        out = []
        for g in gs:
            if g.ndim < 2:
                out.append(g.copy())
                continue
            m = g.reshape(g.shape[0], -1)
            x = m.T if m.shape[0] > m.shape[1] else m
            x = x / max(np.linalg.norm(x), eps)
            for _ in range(steps):
                A = x @ x.T
                x = a * x + (b * A + c * A @ A) @ x
            out.append((x.T if m.shape[0] > m.shape[1] else x).reshape(g.shape))
        return out
    return step


def ref_classp(threshold: float, eps: float, power: float, mode: str = "elementwise") -> Stepper:
    """CLASSP: mask = x^2 > threshold (elementwise), or float(any(x != 0)) > threshold for the whole
    tensor (the reference code's ``(grad**2).any() > threshold``); S += |x|^p where the mask holds;
    u = x / (S + eps)^(1/p) there, 0 elsewhere."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["S"] = _zeros(gs)
        out = []
        for i, g in enumerate(gs):
            if mode == "tensor":
                mask = np.full(g.shape, float(np.any(g ** 2 != 0)) > threshold)
            else:
                mask = g ** 2 > threshold
            st["S"][i] = st["S"][i] + np.where(mask, np.abs(g) ** power, 0.0)
            out.append(np.where(mask, g / (st["S"][i] + eps) ** (1.0 / power), 0.0))
        return out
    return step


def ref_aegd(f: float, eta: float, c: float = 1.0) -> Stepper:
    """AEGD (txping/AEGD aegd.py): v = x / (2 sqrt(f + c)); r_0 = sqrt(f + c) (first step);
    r = r / (1 + 2 eta v^2); u = 2 r v."""
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        sq = math.sqrt(f + c)
        if not st:
            st["r"] = [np.full(g.shape, sq) for g in gs]
        out = []
        for i, g in enumerate(gs):
            v = g / (2 * sq)
            st["r"][i] = st["r"][i] / (1 + 2 * eta * v * v)
            out.append(2 * st["r"][i] * v)
        return out
    return step


def ref_chain(*stages: Callable[[], Stepper]) -> Stepper:
    """``first | second | ...``: each stepper gets the previous one's output (and the parameters)."""
    steppers = [f() for f in stages]

    def step(t, gs, ps):
        for st in steppers:
            gs = st(t, gs, ps)
        return gs
    return step


def ref_topk(k: float) -> Stepper:
    """Per tensor of d entries: keep the max(1, ceil(k d)) entries of largest |x|, zero the rest."""
    def step(t, gs, ps):
        out = []
        for g in gs:
            flat = g.ravel()
            keep = min(flat.size, max(1, math.ceil(k * flat.size)))
            idx = np.argsort(-np.abs(flat), kind="stable")[:keep]
            u = np.zeros_like(flat)
            u[idx] = flat[idx]
            out.append(u.reshape(g.shape))
        return out
    return step


def ref_error_feedback(eta: float, compressor: Callable[[], Stepper]) -> Stepper:
    """EControl (Gao, Islamov & Stich 2024), one worker: Delta = C(eta e + g - h); e += g - h - Delta;
    h += Delta; u = h (e_0 = h_0 = 0). The compressor C is a stepper run on every tensor at once."""
    comp = compressor()
    st: dict[str, Arrays] = {}

    def step(t, gs, ps):
        if not st:
            st["e"], st["h"] = _zeros(gs), _zeros(gs)
        bases = [g - h for g, h in zip(gs, st["h"])]
        deltas = comp(t, [b + eta * e for b, e in zip(bases, st["e"])], ps)
        st["e"] = [e + b - d for e, b, d in zip(st["e"], bases, deltas)]
        st["h"] = [h + d for h, d in zip(st["h"], deltas)]
        return [h.copy() for h in st["h"]]
    return step


# ---------------------------------------------------------------- multi-loss references
def _task_vectors(tasks: TaskGrads) -> tuple[list[Arrays], list[bool]]:
    """The tasks' gradients in argument order with zeros where a loss does not reach a tensor,
    and per tensor whether every loss reaches it (is shared)."""
    lists = list(tasks.values())
    n = len(lists[0])
    shapes = [next(g[i] for g in lists if g[i] is not None).shape for i in range(n)]
    grads = [[np.zeros(shapes[i]) if g[i] is None else g[i] for i in range(n)] for g in lists]
    shared = [all(g[i] is not None for g in lists) for i in range(n)]
    return grads, shared


def _dot(a: Arrays, b: Arrays) -> float:
    return sum(float(np.sum(x * y)) for x, y in zip(a, b))


def ref_pcgrad(reduction: str = "sum", seed: int = 0) -> Stepper:
    """PCGrad (Yu et al. 2020): for each task i in argument order, for j in a random order of the K
    tasks: if <g_i^PC, g_j> < 0, g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j, against the *original* g_j,
    inner products over every tensor (an unreached tensor counts as zeros). d = sum_i g_i^PC; with
    ``mean`` the shared tensors are divided by K, unshared ones keep the sum. The order is the op's
    documented draw: per task, ``torch.randperm(K)`` from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def step(t, tasks, ps):
        grads, shared = _task_vectors(tasks)
        k = len(grads)
        projected = []
        for i in range(k):
            gi = [x.copy() for x in grads[i]]
            for j in torch.randperm(k, generator=gen).tolist():
                d = _dot(gi, grads[j])
                if d < 0:
                    coef = d / _dot(grads[j], grads[j])
                    gi = [x - coef * y for x, y in zip(gi, grads[j])]
            projected.append(gi)
        out = []
        for idx, sh in enumerate(shared):
            total = sum(p[idx] for p in projected)
            out.append(total / k if reduction == "mean" and sh else total)
        return out
    return step


def ref_bloop(lam: float = 0.1, rho: float = 0.1, eps: float = 1e-7) -> Stepper:
    """Bloop (Ablin et al. 2024): r_t = r_{t-1} + rho (g_main - r_{t-1}) (r_0 = 0, updated first);
    d = g_main + lam (g_aux - <g_aux, r>/(<r, r> + eps) r), global inner products. The first task
    of the row is ``main``, the second ``aux``."""
    st: dict[str, Arrays] = {}

    def step(t, tasks, ps):
        (main, aux), _ = _task_vectors(tasks)
        if not st:
            st["r"] = _zeros(main)
        st["r"] = [r + rho * (g - r) for r, g in zip(st["r"], main)]
        return [g + lam * a for g, a in zip(main, project(aux, st["r"], "global", eps))]
    return step


# ---------------------------------------------------------------- low-rank references
def svd_projector(g: np.ndarray, rank: int) -> np.ndarray:
    """GaLore's projector from the NumPy SVD G = U S Vh of the fp32-rounded matrix: Vh[:r] (r x n)
    if m >= n, else U[:, :r] (m x r). The sign of each singular vector is not part of the
    equations (LAPACK builds choose differently), so, as the noise rows take their draws from
    torch's generator, the signs are taken from ``torch.linalg.svd`` in fp32, the op's documented
    computation; the vectors themselves are NumPy's."""
    m, n = g.shape
    g32 = g.astype(np.float32).astype(np.float64)
    u, _, vh = np.linalg.svd(g32, full_matrices=False)
    tu, _, tvh = torch.linalg.svd(torch.from_numpy(g).float(), full_matrices=False)
    if m >= n:
        p = vh[:rank]
        p = p * np.sign(np.sum(p * tvh[:rank].double().numpy(), axis=1, keepdims=True))
    else:
        p = u[:, :rank]
        p = p * np.sign(np.sum(p * tu[:, :rank].double().numpy(), axis=0, keepdims=True))
    return p


def ref_galore(rank: int, gap: int, scale: float, inner: Callable[[], Stepper]) -> Stepper:
    """GaLore (Zhao et al. 2024): a tensor with >= 2 dims is viewed as G (m x n) = (shape[0], -1);
    its projector (:func:`svd_projector`) is recomputed when (t - 1) % gap == 0 and kept in between;
    R = G Q^T (m >= n) or P^T G (m < n); N = inner(R) (the inner stepper runs on every tensor at
    once, its state at the projected shapes, not rotated when the projector changes);
    u = scale * N Q or scale * P N, reshaped. Vectors go through ``inner`` at full size and bypass
    the projection (and the scale, as in GaLore, where only projected weights are rescaled)."""
    inner_step = inner()
    st: dict[int, np.ndarray] = {}

    def step(t, gs, ps):
        lows = []
        for i, g in enumerate(gs):
            if g.ndim < 2:
                lows.append(g)
                continue
            mat = g.reshape(g.shape[0], -1)
            if (t - 1) % gap == 0:
                st[i] = svd_projector(mat, rank)
            lows.append(mat @ st[i].T if mat.shape[0] >= mat.shape[1] else st[i].T @ mat)
        news = inner_step(t, lows, [None] * len(gs))  # the inner pipeline may not read the parameters
        out = []
        for i, (g, n) in enumerate(zip(gs, news)):
            if g.ndim < 2:
                out.append(n)
                continue
            m, cols = g.shape[0], g.size // g.shape[0]
            back = n @ st[i] if m >= cols else st[i] @ n
            out.append(scale * back.reshape(g.shape))
        return out
    return step


# ---------------------------------------------------------------- GCond and SAM-GS (ref_combiners.py)
def ref_task_combiner(make: Callable[[list[bool]], Any]) -> Stepper:
    """Adapt a stepper of ``ref_combiners`` (``gs[k][i]``, zeros where a loss does not reach a
    tensor) to the table's :data:`TaskGrads`. ``make(shared)`` builds it at the first step, with
    per tensor whether every loss reaches it (fixed over the steps of one input set)."""
    st: dict[str, Any] = {}

    def step(t, tasks, ps):
        grads, shared = _task_vectors(tasks)
        if not st:
            st["ref"], st["shared"] = make(shared), shared
        assert shared == st["shared"], "the shared tensors changed between steps"
        return st["ref"](t, grads, ps)
    return step


def ref_gcond_table(**kw: Any) -> Stepper:
    """GCond (Limarenko & Shumilov 2025), ``ref_combiners.ref_gcond``: every tensor, shared or not,
    is part of the flattened task vectors (zeros where a loss does not reach it)."""
    return ref_task_combiner(lambda shared: ref_gcond(**kw))


def ref_samgs_table(**kw: Any) -> Stepper:
    """SAM-GS (Borsani et al. 2025), ``ref_combiners.ref_samgs`` on the shared tensors, the plain
    sum of the task gradients on the others."""
    return ref_task_combiner(lambda shared: ref_samgs(shared=shared, **kw))


# ---------------------------------------------------------------- DP-SGD (per-example inputs)
def ref_dp_clip(clip: float) -> Stepper:
    """DP-SGD clipping (Abadi et al. 2016, Algorithm 1): example b's gradient, its norm over
    every tensor, g_b / max(1, ||g_b|| / C). Input and output per tensor ``(B, *shape)``."""
    def step(t, gs, ps):
        b = gs[0].shape[0]
        norms = np.sqrt(sum(np.sum(x.reshape(b, -1) ** 2, axis=1) for x in gs))
        factor = 1.0 / np.maximum(1.0, norms / clip)
        return [x * factor.reshape((-1,) + (1,) * (x.ndim - 1)) for x in gs]
    return step


def ref_dp_noise(sigma: float, sensitivity: float, seed: int) -> Stepper:
    """DP-SGD aggregation: u = (sum_b g_b + sigma Delta z) / B, z ~ N(0, I) drawn per tensor in
    route order from one torch CPU generator seeded with ``seed`` (float64 here), no draw when
    sigma = 0. Delta is the ``dp_clip`` norm before it, or the ``sensitivity`` argument."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def step(t, gs, ps):
        out = []
        for x in gs:
            total = x.sum(axis=0)
            if sigma > 0:
                z = torch.randn(total.shape, generator=gen, dtype=torch.float64).numpy()
                total = total + sigma * sensitivity * z
            out.append(total / x.shape[0])
        return out
    return step


# ---------------------------------------------------------------- project_out (user-given bases)
def ref_project_out(bases: Sequence[np.ndarray | None], relax: int = 0) -> Stepper:
    """GPM (Saha et al. 2021) / ROGO's relaxation (Yang et al. 2023): G viewed as
    (shape[0], -1), M_r the first k - relax columns of the tensor's basis M (in x k);
    u = G - G M_r M_r^T. No basis, k - relax <= 0 or a vector: u = G."""
    def step(t, gs, ps):
        out = []
        for g, m in zip(gs, bases):
            keep = 0 if m is None else m.shape[1] - relax
            if g.ndim < 2 or keep <= 0:
                out.append(g.copy())
                continue
            mat, mr = g.reshape(g.shape[0], -1), m[:, :keep]
            out.append((mat - (mat @ mr) @ mr.T).reshape(g.shape))
        return out
    return step


def set_project_out_bases(opt: Any, params: Sequence[torch.Tensor]) -> None:
    """``OpCase.setup`` of the project_out rows: ``opt.set_basis`` with :data:`PROJECT_OUT_BASES`."""
    for p, m in zip(params, PROJECT_OUT_BASES):
        if m is not None:
            opt.set_basis(p, torch.tensor(m))


# ------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class OpCase:
    """One row: ``op`` is the registered op it covers, ``pipeline`` the source text,
    ``reference`` a factory of fresh steppers."""

    id: str
    op: str
    pipeline: str
    reference: Callable[[], Stepper]
    hyperparams: dict[str, Any] = field(default_factory=dict)
    #: multi-loss rows: the loss names the pipeline reads (``grads.a``...), in the order the
    #: reference gets them; the runtime is stepped with ``step(losses=...)`` on linear losses
    tasks: tuple[str, ...] = ()
    #: the fixed input set (a key of :data:`INPUTS`); by default "tasks" for multi-loss rows
    inputs: str = ""
    #: (rtol, atol) of the comparison with the reference (looser for ops that compute in fp32)
    tol: tuple[float, float] = (1e-12, 1e-12)
    #: ``setup(optimizer, params)``, run on every optimizer the runners build before its first
    #: step: state the user provides (``opt.set_basis``); an optimizer that loads a state dict
    #: needs no setup, the state dict carries that state
    setup: Callable[[Any, list[torch.Tensor]], None] | None = None

    @property
    def input_set(self) -> Inputs:
        return INPUTS[self.inputs or ("tasks" if self.tasks else "default")]


CASES: tuple[OpCase, ...] = (
    OpCase("adam", "adam", "grad | adam(0.8, 0.9, 1e-6)", lambda: ref_adam(0.8, 0.9, 1e-6)),
    OpCase("scale_adam", "adam", "grad | scale(adam(b1=0.7, eps=1e-3))", lambda: ref_adam(0.7, 0.999, 1e-3)),
    OpCase("add_ema", "add", "grad | add(ema(0.5))", lambda: ref_add_ema(0.5)),
    OpCase("add_param", "add", "grad | add(0.25 * param)", lambda: ref_add_scaled_param(0.25)),
    OpCase("add_number", "add", "grad | add(-0.5)", lambda: ref_add_number(-0.5)),
    OpCase("clip_median_l2_global", "clip_median", "grad | clip_median(1.0)",
           lambda: ref_clip_median(1.0, "l2", "global")),
    OpCase("clip_median_l2_tensor", "clip_median", "grad | clip_median(0.8, scope=tensor)",
           lambda: ref_clip_median(0.8, "l2", "tensor")),
    OpCase("clip_median_coord", "clip_median", "grad | clip_median(0.3, geometry=coord)",
           lambda: ref_clip_median(0.3, "coord")),
    OpCase("clip_median_reset", "clip_median", "grad | clip_median(1.5, reset=true)",
           lambda: ref_clip_median(1.5, "l2", "global", reset=True)),
    OpCase("clip_norm_global", "clip_norm", "grad | clip_norm(2.0)", lambda: ref_clip_norm(2.0, "global")),
    OpCase("clip_norm_tensor", "clip_norm", "grad | clip_norm(1.5, scope=tensor)",
           lambda: ref_clip_norm(1.5, "tensor")),
    OpCase("clip_value", "clip_value", "grad | clip_value(0.5)", lambda: ref_clip_value(0.5)),
    OpCase("decay", "decay", "grad | decay(0.1)", lambda: ref_decay(0.1)),
    OpCase("diffgrad", "diffgrad", "grad | diffgrad(0.8, 0.9, 1e-6)", lambda: ref_diffgrad(0.8, 0.9, 1e-6)),
    OpCase("scale_diffgrad", "diffgrad", "grad | scale(diffgrad)", lambda: ref_diffgrad(0.9, 0.999, 1e-8)),
    OpCase("ema", "ema", "grad | ema(0.8)", lambda: ref_ema(0.8)),
    OpCase("ema_debias", "ema", "grad | ema(0.7, debias=true)", lambda: ref_ema(0.7, debias=True)),
    OpCase("lion", "lion", "grad | lion(0.8, 0.95)", lambda: ref_lion(0.8, 0.95)),
    OpCase("momentum", "momentum", "grad | momentum(0.8)", lambda: ref_momentum(0.8)),
    OpCase("momentum_nesterov", "momentum", "grad | momentum(0.9, nesterov=true, dampening=0.2)",
           lambda: ref_momentum(0.9, nesterov=True, dampening=0.2)),
    OpCase("noise", "noise", "grad | noise(0.3, 0.55, seed=7)", lambda: ref_noise(0.3, 0.55, 7)),
    OpCase("project_orthogonal_ema", "project_orthogonal", "grad | project_orthogonal(ema(0.5))",
           lambda: ref_project_ema(0.5, "global")),
    OpCase("project_orthogonal_ema_tensor", "project_orthogonal", "grad | project_orthogonal(ema, scope=tensor)",
           lambda: ref_project_ema(0.9, "tensor")),
    OpCase("project_orthogonal_param_pcgrad", "project_orthogonal",
           "grad | project_orthogonal(param, max_coef=0, eps=1e-3)", lambda: ref_project_param(0.0, "global", 1e-3)),
    OpCase("rms", "rms", "grad | rms(0.9, 1e-6)", lambda: ref_rms(0.9, 1e-6)),
    OpCase("rms_centered", "rms", "grad | rms(0.8, 1e-4, centered=true)", lambda: ref_rms(0.8, 1e-4, True)),
    OpCase("scale", "scale", "grad | scale(2.5)", lambda: ref_scale(2.5)),
    OpCase("scale_param", "scale", "grad | scale(param)", lambda: ref_scale_by_param()),
    OpCase("sign", "sign", "grad | sign", lambda: ref_sign()),
    OpCase("grams", "grams", "grad | grams(0.8, 0.9, 1e-6)", lambda: ref_grams(0.8, 0.9, 1e-6)),
    OpCase("scale_grams", "grams", "grad | scale(grams)", lambda: ref_grams(0.9, 0.999, 1e-6)),
    OpCase("gravity", "gravity", "grad | gravity(0.05, 0.8, seed=3, lr=0.5)",
           lambda: ref_gravity(0.05, 0.8, 3, 0.5)),
    OpCase("gravity_defaults", "gravity", "grad | gravity", lambda: ref_gravity(0.01, 0.9, 0, 0.1)),
    OpCase("gravity_lr_source", "gravity", "grad | gravity(0.2, 0.5, seed=5, lr=lr)",
           lambda: ref_gravity(0.2, 0.5, 5, 1.0)),
    OpCase("normalize_tensor", "normalize", "grad | normalize(1e-3)", lambda: ref_normalize(1e-3, "tensor")),
    OpCase("normalize_global", "normalize", "grad | normalize(scope=global)", lambda: ref_normalize(1e-8, "global")),
    OpCase("centralize", "centralize", "grad | centralize", lambda: ref_centralize()),
    OpCase("agc", "agc", "grad | agc(0.5)", lambda: ref_agc(0.5, 1e-3)),
    OpCase("agc_eps_floor", "agc", "grad | agc(0.2, eps=5.0)", lambda: ref_agc(0.2, 5.0)),
    OpCase("trust_ratio", "trust_ratio", "grad | trust_ratio", lambda: ref_trust_ratio(0.0)),
    OpCase("trust_ratio_eps", "trust_ratio", "grad | trust_ratio(0.5)", lambda: ref_trust_ratio(0.5)),
    OpCase("newton_schulz", "newton_schulz",
           "route ndim >= 2: grad | newton_schulz(precision=input)\nroute default: grad",
           lambda: ref_newton_schulz(5, 3.4445, -4.775, 2.0315, 1e-7), inputs="matrices", tol=(1e-10, 1e-12)),
    OpCase("newton_schulz_one_by_one", "newton_schulz",
           "route ndim >= 2: grad | newton_schulz(3, 2.0, -1.5, 0.5, eps=0.1, precision=input, batch=none)\n"
           "route default: grad", lambda: ref_newton_schulz(3, 2.0, -1.5, 0.5, 0.1), inputs="matrices",
           tol=(1e-10, 1e-12)),
    OpCase("classp", "classp", "grad | classp", lambda: ref_classp(0.5, 1e-5, 1.0)),
    OpCase("classp_power", "classp", "grad | classp(0.3, 1e-3, 2)", lambda: ref_classp(0.3, 1e-3, 2.0)),
    OpCase("classp_tensor", "classp", "grad | classp(power=1.5, threshold_mode=tensor)",
           lambda: ref_classp(0.5, 1e-5, 1.5, "tensor")),
    OpCase("classp_tensor_never", "classp", "grad | classp(1.0, threshold_mode=tensor)",
           lambda: ref_classp(1.0, 1e-5, 1.0, "tensor")),
    OpCase("aegd", "aegd", "grad | aegd(2.0, 0.5)", lambda: ref_aegd(2.0, 0.5)),
    OpCase("aegd_c", "aegd", "grad | aegd(0.25, 0.1, c=0.5)", lambda: ref_aegd(0.25, 0.1, 0.5)),
    OpCase("topk", "topk", "grad | topk(0.25)", lambda: ref_topk(0.25)),
    OpCase("topk_at_least_one", "topk", "grad | topk(0.01)", lambda: ref_topk(0.01)),
    OpCase("error_feedback_sign", "error_feedback", "grad | error_feedback(0.1) { sign }",
           lambda: ref_error_feedback(0.1, ref_sign)),
    OpCase("error_feedback_topk", "error_feedback", "grad | error_feedback(1.0, compressor=topk(0.25))",
           lambda: ref_error_feedback(1.0, lambda: ref_topk(0.25))),
    OpCase("error_feedback_ef21", "error_feedback", "grad | error_feedback(0) { topk(0.5) | scale(2) }",
           lambda: ref_error_feedback(0.0, lambda: ref_chain(lambda: ref_topk(0.5), lambda: ref_scale(2.0)))),
    # ---- multi-loss combiners (stepped with step(losses=...) on linear losses)
    OpCase("pcgrad", "pcgrad", "pcgrad(grads.a, grads.b)", lambda: ref_pcgrad("sum", 0), tasks=("a", "b")),
    OpCase("pcgrad_mean", "pcgrad", "pcgrad(grads.a, grads.b, reduction=mean)", lambda: ref_pcgrad("mean", 0),
           tasks=("a", "b")),
    OpCase("pcgrad_three_seeded", "pcgrad", "pcgrad(grads.a, grads.b, grads.c, seed=5)",
           lambda: ref_pcgrad("sum", 5), tasks=("a", "b", "c")),
    OpCase("pcgrad_mean_unshared", "pcgrad", "pcgrad(grads.c, grads.a, grads.b, reduction=mean, seed=2)",
           lambda: ref_pcgrad("mean", 2), tasks=("c", "a", "b"), inputs="tasks_head"),
    OpCase("pcgrad_adam", "pcgrad", "pcgrad(grads.b, grads.a) | adam(0.8, 0.9, 1e-6)",
           lambda: ref_chain(lambda: ref_pcgrad("sum", 0), lambda: ref_adam(0.8, 0.9, 1e-6)), tasks=("b", "a")),
    OpCase("bloop", "bloop", "bloop(grads.a, grads.b)", lambda: ref_bloop(), tasks=("a", "b")),
    OpCase("bloop_custom", "bloop", "bloop(grads.b, grads.a, lam=0.5, rho=0.3)", lambda: ref_bloop(0.5, 0.3),
           tasks=("b", "a")),
    OpCase("bloop_keywords_unshared", "bloop", "bloop(aux=grads.c, main=grads.a, rho=0.6) | momentum(0.5)",
           lambda: ref_chain(lambda: ref_bloop(0.1, 0.6), lambda: ref_momentum(0.5)), tasks=("a", "c"),
           inputs="tasks_head"),
    OpCase("gcond", "gcond", "gcond(grads.a, grads.b)", lambda: ref_gcond_table(), tasks=("a", "b")),
    OpCase("gcond_three_custom", "gcond", "gcond(grads.a, grads.b, grads.c, beta=0.5, dominance_window=0, max_iters=1)",
           lambda: ref_gcond_table(beta=0.5, dominance_window=0, max_iters=1), tasks=("a", "b", "c")),
    OpCase("gcond_three_unshared", "gcond", "gcond(grads.c, grads.a, grads.b, dominance_window=1, t_weak=0.1)",
           lambda: ref_gcond_table(dominance_window=1, t_weak=0.1), tasks=("c", "a", "b"), inputs="tasks_head"),
    # samgs: the mean similarity of a and b is > 0.99 on every step (modulate); with c it is 0.91-0.999,
    # so gamma=0.95 takes the equalise branch on some steps and modulate on the others
    OpCase("samgs", "samgs", "samgs(grads.a, grads.b)", lambda: ref_samgs_table(), tasks=("a", "b")),
    OpCase("samgs_gamma", "samgs", "samgs(grads.b, grads.a, gamma=0.7)", lambda: ref_samgs_table(gamma=0.7),
           tasks=("b", "a")),
    OpCase("samgs_three_both_branches", "samgs", "samgs(grads.a, grads.b, grads.c, b1=0.8, b2=0.9, gamma=0.95)",
           lambda: ref_samgs_table(b1=0.8, b2=0.9, gamma=0.95), tasks=("a", "b", "c")),
    OpCase("samgs_unshared", "samgs", "samgs(grads.c, grads.a, grads.b, gamma=0.95)",
           lambda: ref_samgs_table(gamma=0.95), tasks=("c", "a", "b"), inputs="tasks_head"),
    # ---- DP-SGD on per-example gradients (stepped with step(samples=...))
    OpCase("dp_clip_mean", "dp_clip", "samples | dp_clip(1.0) | dp_noise(0.0)",
           lambda: ref_chain(lambda: ref_dp_clip(1.0), lambda: ref_dp_noise(0.0, 1.0, 0)), inputs="samples"),
    OpCase("dp_clip_noise", "dp_clip", "samples | dp_clip(0.5) | dp_noise(1.0, seed=3)",
           lambda: ref_chain(lambda: ref_dp_clip(0.5), lambda: ref_dp_noise(1.0, 0.5, 3)), inputs="samples"),
    OpCase("dp_noise_sensitivity", "dp_noise", "samples | dp_noise(0.5, sensitivity=2.0, seed=1)",
           lambda: ref_dp_noise(0.5, 2.0, 1), inputs="samples"),
    OpCase("dp_noise_adam", "dp_noise", "samples | dp_clip(0.5) | dp_noise(0.3, seed=2) | adam(0.8, 0.9, 1e-6)",
           lambda: ref_chain(lambda: ref_dp_clip(0.5), lambda: ref_dp_noise(0.3, 0.5, 2),
                             lambda: ref_adam(0.8, 0.9, 1e-6)), inputs="samples"),
    # ---- project_out: the bases are the user's (opt.set_basis, via the row's setup hook)
    OpCase("project_out", "project_out", "grad | project_out", lambda: ref_project_out(PROJECT_OUT_BASES),
           inputs="matrices", setup=set_project_out_bases),
    OpCase("project_out_relax", "project_out", "grad | project_out(relax=1)",
           lambda: ref_project_out(PROJECT_OUT_BASES, relax=1), inputs="matrices", setup=set_project_out_bases),
    # ---- block ops (an inner pipeline in { ... })
    OpCase("galore_adam", "galore", "grad | galore(rank=2, gap=3, scale=0.25) { adam }",
           lambda: ref_galore(2, 3, 0.25, lambda: ref_adam(0.9, 0.999, 1e-8)), inputs="matrices", tol=SVD_TOL),
    OpCase("galore_sign", "galore", "grad | galore(rank=2, gap=2, scale=1) { sign }",
           lambda: ref_galore(2, 2, 1.0, ref_sign), inputs="matrices", tol=SVD_TOL),
    OpCase("galore_momentum", "galore", "grad | galore(rank=1, gap=3) { momentum(0.9) }",
           lambda: ref_galore(1, 3, 0.25, lambda: ref_momentum(0.9)), inputs="matrices", tol=SVD_TOL),
    OpCase("galore_clip_adam", "galore", "grad | galore(rank=2, gap=1, scale=0.5) { clip_norm(1.0) | adam(0.8, 0.9) }",
           lambda: ref_galore(2, 1, 0.5, lambda: ref_chain(lambda: ref_clip_norm(1.0, "global"),
                                                           lambda: ref_adam(0.8, 0.9, 1e-8))),
           inputs="matrices", tol=SVD_TOL),
    OpCase("galore_inner_argument", "galore", "grad | galore(rank=2, inner=ema(0.5))",
           lambda: ref_galore(2, 200, 0.25, lambda: ref_ema(0.5)), inputs="matrices", tol=SVD_TOL),
    OpCase("coap_adam", "coap", "grad | coap(rank=2, interval=2, reproject=2) { adam }",
           lambda: RC.ref_coap(2, 2, 2), inputs="matrices"),
    OpCase("coap_restore", "coap", "grad | coap(rank=1, interval=1, reproject=3, restore=true, scale=1) { adam(0.8, 0.9) }",
           lambda: RC.ref_coap(1, 1, 3, 1.0, True, b1=0.8, b2=0.9), inputs="matrices"),
    OpCase("woodbury_fisher", "woodbury_fisher", "grad | woodbury_fisher(3, 0.1)",
           lambda: RC.ref_woodbury_fisher(3, 0.1), inputs="matrices"),
    OpCase("wavelet_adam", "wavelet", "grad | wavelet(levels=2, scale=0.25) { adam }",
           lambda: ref_wavelet_adam(2, 0.25, 1.01), inputs="matrices"),
    OpCase("wavelet_level1_no_limiter", "wavelet", "grad | wavelet(levels=1, scale=1, limiter=0) { adam(0.8, 0.9, 1e-6) }",
           lambda: ref_wavelet_adam(1, 1.0, 0.0, 0.8, 0.9, 1e-6), inputs="matrices"),
    OpCase("group_scale_adam", "group_scale", "grad | group_scale(k=2, interval=2, decay_means=0.5, decay_scale=0.5) { adam }",
           lambda: ref_group_scale_adam(2, 2, 0.5, 0.5), inputs="matrices"),
    OpCase("group_scale_defaults", "group_scale", "grad | group_scale { adam(0.8, 0.9) }",
           lambda: ref_group_scale_adam(b1=0.8, b2=0.9), inputs="matrices"),
    # policy ops: the identity on the stream (what they do to a non-finite step: test_nonfinite.py)
    OpCase("skip_nonfinite", "skip_nonfinite", "grad | skip_nonfinite(3) | adam(0.8, 0.9, 1e-6)",
           lambda: ref_adam(0.8, 0.9, 1e-6)),
    OpCase("allow_nonfinite", "allow_nonfinite", "grad | allow_nonfinite | momentum(0.8)", lambda: ref_momentum(0.8)),
)


def case_ids() -> list[str]:
    return [c.id for c in CASES]


# ------------------------------------------------------------------------ driving the optimizer
def make_params(values: Sequence[np.ndarray] | None = None, requires_grad: bool = False) -> list[torch.Tensor]:
    """Fresh float64 leaf tensors (PARAMS0 unless given); multi-loss steps need ``requires_grad``."""
    values = PARAMS0 if values is None else values
    return [torch.tensor(np.array(v), dtype=torch.float64, requires_grad=requires_grad) for v in values]


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Independent copies of leaf parameters (same values, same ``requires_grad``)."""
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def case_grads(case: OpCase) -> Sequence[Any]:
    """The fixed gradients of a row, per step: a list per tensor, or for a multi-loss row a
    :data:`TaskGrads` holding the row's tasks in its order."""
    grads = case.input_set.grads
    if not case.tasks:
        return grads
    return [{name: step[name] for name in case.tasks} for step in grads]


def case_params0(case: OpCase) -> Arrays:
    return case.input_set.params0


def linear_losses(params: Sequence[torch.Tensor], tasks: TaskGrads) -> dict[str, torch.Tensor]:
    """loss_k = sum_i <p_i, G_k[i]> over the tensors loss k reaches (G not None): its gradient
    is exactly G_k there, and autograd finds no path to the others."""
    out = {}
    for name, gs in tasks.items():
        terms = [(p * torch.as_tensor(np.array(g), dtype=p.dtype)).sum() for p, g in zip(params, gs) if g is not None]
        assert terms, f"loss {name!r} reaches no tensor"
        out[name] = torch.stack(terms).sum()
    return out


def run_optimizer_params(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[Arrays], *,
                         in_place: bool = False) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Step ``opt`` once per entry of ``grads``, setting ``p.grad`` by hand; return the parameters
    ``(before, after)`` of each step. ``in_place`` writes into the existing ``p.grad`` buffers with
    ``copy_`` instead of assigning new tensors. A step given as a :data:`TaskGrads` calls
    ``opt.step(losses=...)`` with :func:`linear_losses` instead (the parameters must require grad),
    one given as :class:`Samples` ``opt.step(samples={param: (B, *shape) tensor})``."""
    out = []
    for gs in grads:
        if isinstance(gs, Samples):  # per-example gradients: step(samples=...), p.grad untouched
            samples = {p: torch.as_tensor(np.array(g), dtype=p.dtype) for p, g in zip(params, gs)}
            before = [p.detach().clone() for p in params]
            opt.step(samples=samples)
            out.append((before, [p.detach().clone() for p in params]))
            continue
        if isinstance(gs, Mapping):  # a multi-loss step: one linear loss per task
            losses = linear_losses(params, gs)
            before = [p.detach().clone() for p in params]
            opt.step(losses=losses)
            out.append((before, [p.detach().clone() for p in params]))
            continue
        for p, g in zip(params, gs):
            gt = torch.as_tensor(np.array(g), dtype=p.dtype)
            if in_place and p.grad is not None:
                p.grad.copy_(gt)
            else:
                p.grad = gt.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        out.append((before, [p.detach().clone() for p in params]))
    return out


def run_optimizer(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[Arrays], *,
                  in_place: bool = False) -> list[Arrays]:
    """Like :func:`run_optimizer_params`, but return ``p_before - p_after`` per step (the update u,
    up to one rounding of p)."""
    return [[(b - a).numpy() for b, a in zip(before, after)]
            for before, after in run_optimizer_params(opt, params, grads, in_place=in_place)]


def assert_exact_updates(steps: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
                         expected: Sequence[Arrays]) -> None:
    """Bit-exact: ``p_after == p_before - u`` for the expected ``u`` (what ``p.add_(u, alpha=-1)`` gives)."""
    assert len(steps) == len(expected)
    for t, ((before, after), us) in enumerate(zip(steps, expected), start=1):
        for i, (b, a, u) in enumerate(zip(before, after, us)):
            want = b - torch.as_tensor(np.array(u), dtype=b.dtype)
            assert torch.equal(a, want), f"step {t} tensor {i}: max diff {float((a - want).abs().max())}"


def make_case_optimizer(case: OpCase, params: Sequence[torch.Tensor], pipeline: Any = None, *,
                        setup: bool = True, backend: str = "eager") -> gradpipe.Optimizer:
    """The row's optimizer (eager unless told, lr = 1) on ``params``, with the row's ``setup`` hook
    run unless ``setup=False`` (an optimizer about to load a state dict, which carries that state)."""
    opt = gradpipe.Optimizer(params, pipeline if pipeline is not None else case.pipeline, backend=backend,
                             **{"lr": 1.0, **case.hyperparams})
    if setup and case.setup is not None:
        case.setup(opt, list(params))
    return opt


def run_case(case: OpCase, grads: Sequence[Any] | None = None, *, pipeline: Any = None,
             params: list[torch.Tensor] | None = None, backend: str = "eager", **kw: Any) -> list[Arrays]:
    """Run one case through ``gradpipe.Optimizer(backend=backend, lr=1)``; the updates per step
    (on the row's fixed inputs unless ``grads`` are given)."""
    grads = case_grads(case) if grads is None else grads
    params = make_params(case_params0(case), requires_grad=bool(case.tasks)) if params is None else params
    opt = make_case_optimizer(case, params, pipeline, backend=backend)
    return run_optimizer(opt, params, grads, **kw)


def run_pipeline_params(pipeline: Any, grads: Sequence[Arrays] = GRADS, params0: Sequence[np.ndarray] = PARAMS0,
                        **hyperparams: Any):
    """Run a pipeline (lr=1) on fresh float64 params; the ``(before, after)`` parameters of each step."""
    params = make_params(params0)
    opt = gradpipe.Optimizer(params, pipeline, backend="eager", **{"lr": 1.0, **hyperparams})
    return run_optimizer_params(opt, params, grads)


def _copy_step(gs: Any) -> Any:
    if isinstance(gs, Samples):
        return [np.array(g) for g in gs]
    if isinstance(gs, Mapping):
        return {k: [None if g is None else np.array(g) for g in v] for k, v in gs.items()}
    return [np.array(g) for g in gs]


def reference_updates(case: OpCase, grads: Sequence[Any] | None = None,
                      params0: Sequence[np.ndarray] | None = None) -> list[Arrays]:
    """The reference's updates, tracking the parameters as ``p <- p - u`` (on the row's fixed
    inputs unless given)."""
    grads = case_grads(case) if grads is None else grads
    params0 = case_params0(case) if params0 is None else params0
    ref = case.reference()
    ps = [np.array(p, dtype=np.float64) for p in params0]
    out = []
    for t, gs in enumerate(grads, start=1):
        us = ref(t, _copy_step(gs), [p.copy() for p in ps])
        out.append(us)
        ps = [p - u for p, u in zip(ps, us)]
    return out


def deepcopy_state(sd: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(sd)
