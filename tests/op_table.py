"""One table of ops that drives the generic op tests (``test_ops.py``).

Each :class:`OpCase` is a pipeline snippet that uses one op of
``gradpipe.compiler.ops.OPS`` and a hand-written NumPy reference of the op's
equations (from the op's docstring and ``reference/seed-ops.md``; never the
op's own code). The reference is a *stepper*: called once per step with the
step number, the gradients and the parameters before the step, it returns the
update ``u`` the pipeline must emit, so the runtime's ``p <- p - lr * u`` with
``lr = 1`` gives ``p_before - p_after == u``.

Every op must have at least one case (``test_table_covers_every_op``), so a
new op without a row fails the suite. Several cases may cover one op
(different scopes, geometries, options).

The fixed inputs are two float64 tensors of different shapes, so a ``global``
reduction (over every tensor of the route) differs from a ``tensor`` one; the
gradients change scale from step to step, so clipping thresholds are crossed
in both directions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch


import gradpipe

__all__ = ["OpCase", "CASES", "SHAPES", "STEPS", "GRADS", "PARAMS0", "Stepper", "make_params", "run_case",
           "run_optimizer", "run_optimizer_params", "assert_exact_updates", "reference_updates", "case_ids"]

Arrays = list  # list[np.ndarray], one per tensor
#: ``stepper(t, grads, params) -> updates``; t counts from 1, params are the values before the step
Stepper = Callable[[int, Arrays, Arrays], Arrays]

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
    OpCase("classp", "classp", "grad | classp", lambda: ref_classp(0.5, 1e-5, 1.0)),
    OpCase("classp_power", "classp", "grad | classp(0.3, 1e-3, 2)", lambda: ref_classp(0.3, 1e-3, 2.0)),
    OpCase("classp_tensor", "classp", "grad | classp(power=1.5, threshold_mode=tensor)",
           lambda: ref_classp(0.5, 1e-5, 1.5, "tensor")),
    OpCase("classp_tensor_never", "classp", "grad | classp(1.0, threshold_mode=tensor)",
           lambda: ref_classp(1.0, 1e-5, 1.0, "tensor")),
    OpCase("aegd", "aegd", "grad | aegd(2.0, 0.5)", lambda: ref_aegd(2.0, 0.5)),
    OpCase("aegd_c", "aegd", "grad | aegd(0.25, 0.1, c=0.5)", lambda: ref_aegd(0.25, 0.1, 0.5)),
)


def case_ids() -> list[str]:
    return [c.id for c in CASES]


# ------------------------------------------------------------------------ driving the optimizer
def make_params(values: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
    """Fresh float64 leaf tensors (PARAMS0 unless given)."""
    values = PARAMS0 if values is None else values
    return [torch.tensor(np.array(v), dtype=torch.float64) for v in values]


def run_optimizer_params(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[Arrays], *,
                         in_place: bool = False) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Step ``opt`` once per entry of ``grads``, setting ``p.grad`` by hand; return the parameters
    ``(before, after)`` of each step. ``in_place`` writes into the existing ``p.grad`` buffers with
    ``copy_`` instead of assigning new tensors."""
    out = []
    for gs in grads:
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


def run_case(case: OpCase, grads: Sequence[Arrays] = GRADS, *, pipeline: Any = None,
             params: list[torch.Tensor] | None = None, **kw: Any) -> list[Arrays]:
    """Run one case through ``gradpipe.Optimizer(backend='eager', lr=1)``; the updates per step."""
    params = make_params() if params is None else params
    opt = gradpipe.Optimizer(params, pipeline if pipeline is not None else case.pipeline, backend="eager",
                             **{"lr": 1.0, **case.hyperparams})
    return run_optimizer(opt, params, grads, **kw)


def run_pipeline_params(pipeline: Any, grads: Sequence[Arrays] = GRADS, params0: Sequence[np.ndarray] = PARAMS0,
                        **hyperparams: Any):
    """Run a pipeline (lr=1) on fresh float64 params; the ``(before, after)`` parameters of each step."""
    params = make_params(params0)
    opt = gradpipe.Optimizer(params, pipeline, backend="eager", **{"lr": 1.0, **hyperparams})
    return run_optimizer_params(opt, params, grads)


def reference_updates(case: OpCase, grads: Sequence[Arrays] = GRADS,
                      params0: Sequence[np.ndarray] = PARAMS0) -> list[Arrays]:
    """The reference's updates, tracking the parameters as ``p <- p - u``."""
    ref = case.reference()
    ps = [np.array(p, dtype=np.float64) for p in params0]
    out = []
    for t, gs in enumerate(grads, start=1):
        us = ref(t, [np.array(g) for g in gs], [p.copy() for p in ps])
        out.append(us)
        ps = [p - u for p, u in zip(ps, us)]
    return out


def deepcopy_state(sd: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(sd)
