"""The multi-task combiners ``gcond`` (GCond) and ``samgs`` (SAM-GS).

Driven through the real API: ``gradpipe.Optimizer(params, "gcond(grads.a, grads.b)",
lr=1.0)`` on float64 parameters, stepped with ``opt.step(losses={...})`` where each
loss is linear, ``loss_k = sum_i (p_i * G_k,i).sum()``, so ``grads.k`` is exactly
``G_k``. The update is read back as ``p_before - p_after``. Expected values are the
worked examples of the research notes (fp64 re-implementation of the reference
code) and the NumPy steppers of ``ref_combiners.py``.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import pytest
import torch

import ref_combiners as R

import gradpipe
from gradpipe import GradError
from gradpipe.tasks import train_multitask

SHAPES = ((3, 4), (5,))
TOL = dict(rtol=1e-10, atol=1e-12)
NAMES = "abcdef"

Step = Sequence[Sequence[Any]]  # [task][tensor] -> array, or None where the task does not reach the tensor


# ------------------------------------------------------------------------ helpers
def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    # zeros: the first update reads back exactly (0 - u = -u); the ops do not read the parameters
    return [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]


def step_once(opt: gradpipe.Optimizer, params: list[torch.Tensor], gs: Step) -> list[np.ndarray]:
    """One ``step(losses=...)`` with linear losses; the update ``p_before - p_after``."""
    losses = {}
    for name, task in zip(NAMES, gs):
        terms = [(p * torch.as_tensor(np.asarray(g, dtype=np.float64))).sum()
                 for p, g in zip(params, task) if g is not None]
        losses[name] = torch.stack(terms).sum()
    before = [p.detach().clone() for p in params]
    opt.step(losses=losses)
    return [(b - p.detach()).numpy() for b, p in zip(before, params)]


def run(pipeline: str, steps: Sequence[Step], shapes=None, **hp: Any) -> tuple[list[list[np.ndarray]], Any]:
    shapes = shapes or tuple(np.shape(g) for g in next(g for g in steps[0]))
    params = make_params(shapes)
    opt = gradpipe.Optimizer(params, pipeline, lr=1.0, **hp)
    return [step_once(opt, params, gs) for gs in steps], opt


def run_2d(pipeline: str, pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, Any]:
    """Two tasks on one 2-vector; the updates as an array (steps x 2)."""
    outs, opt = run(pipeline, [[[np.array(a, float)], [np.array(b, float)]] for a, b in pairs], shapes=[(2,)])
    return np.array([u[0] for u in outs]), opt


def reference(stepper, steps: Sequence[Step]) -> list[list[np.ndarray]]:
    out = []
    for t, gs in enumerate(steps, start=1):
        filled = [[np.zeros(SHAPES[i]) if g is None else np.asarray(g, float) for i, g in enumerate(task)]
                  for task in gs]
        out.append(stepper(t, filled, None))
    return out


def assert_close(actual, expected, tol=TOL):
    assert len(actual) == len(expected)
    for t, (us, es) in enumerate(zip(actual, expected), start=1):
        for i, (u, e) in enumerate(zip(us, es)):
            np.testing.assert_allclose(u, e, err_msg=f"step {t} tensor {i}", **tol)


def node_state(opt: gradpipe.Optimizer) -> dict[str, Any]:
    (saved,) = opt.state_dict()["gradpipe"]["node_state"].values()
    return saved


def random_steps(k: int, steps: int, seed: int, heads: bool = False) -> list[Step]:
    """Task gradients along a shared random direction with random signs and scales plus
    noise, so conflicts fall in every zone; with ``heads`` the last tensor is reached by
    the last task only."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(steps):
        base = [rs.randn(*s) for s in SHAPES]
        coefs = rs.uniform(-1.5, 1.5, size=k)
        coefs[0] = 1.0
        scales = rs.uniform(0.3, 3.0, size=k)
        step = [[scales[j] * (coefs[j] * b + rs.uniform(0.1, 1.0) * rs.randn(*b.shape)) for b in base]
                for j in range(k)]
        if heads:
            for j in range(k - 1):
                step[j][-1] = None
        out.append(step)
    return out


def zones_hit(stepper) -> set[str]:
    return {"critical" if c <= -0.8 else "main" if c < -0.5 else "weak" for (_, _, c, _) in stepper.state["log"]}


# ----------------------------------------------------------------------- GCond: worked examples
G1 = [([2.0, 0.0], [-0.6, 0.8]), ([1.0, 0.5], [-0.8, 0.9])]


def test_gcond_g1_two_steps_moderate_then_weak():
    out, opt = run_2d("gcond(grads.a, grads.b)", G1)
    np.testing.assert_allclose(out[0], [1.2909384, 1.7454154], atol=1e-7)
    np.testing.assert_allclose(out[1], [0.7354798, 1.6994597], atol=1e-7)
    saved = node_state(opt)
    assert saved["history"] == [0, 0]  # a won both (score, then stability)
    assert saved["t"] == 2
    np.testing.assert_allclose(saved["ema"], [1.0534017, 1.0102080], atol=1e-7)
    # prev buffers hold the post-projection task gradients of step 2
    (p,) = opt.param_groups[0]["params"]
    st = opt.state[p]
    np.testing.assert_allclose(st["main/gcond.prev0"].numpy(), [0.8592447, 0.6583498], atol=1e-7)
    np.testing.assert_allclose(st["main/gcond.prev1"].numpy(), [-0.5959048, 1.0020476], atol=1e-7)
    ref = R.ref_gcond()
    assert_close([[u] for u in out], reference(ref, [[[np.array(a)], [np.array(b)]] for a, b in G1]))


def test_gcond_g4_dominant_task_loses_the_next_conflict():
    out, opt = run_2d("gcond(grads.a, grads.b)", [G1[0]] * 4)
    for t in range(3):  # constant input: the debiased EMA is the projected sum
        np.testing.assert_allclose(out[t], [1.2909384, 1.7454154], atol=1e-7)
    np.testing.assert_allclose(out[3], [1.2846453, 1.7499922], atol=1e-7)
    assert node_state(opt)["history"] == [0, 0, 1]  # a won 3 in a row, so b won the 4th
    (p,) = opt.param_groups[0]["params"]
    st = opt.state[p]
    np.testing.assert_allclose(st["main/gcond.prev0"].numpy(), [1.28, 0.96], atol=1e-7)
    np.testing.assert_allclose(st["main/gcond.prev1"].numpy(), [-0.0091153, 0.8], atol=1e-7)


def test_gcond_dominance_window_zero_keeps_no_history_and_a_keeps_winning():
    out, opt = run_2d("gcond(grads.a, grads.b, dominance_window=0)", [G1[0]] * 4)
    assert node_state(opt)["history"] == []
    np.testing.assert_allclose(out[3], [1.2909384, 1.7454154], atol=1e-7)


def test_gcond_g3_critical_is_pcgrad_on_the_loser():
    pair = [([2.0, 0.0], [-0.9, 0.2])]
    out1, opt1 = run_2d("gcond(grads.a, grads.b, max_iters=1)", pair)
    np.testing.assert_allclose(out1[0], [2.0, 0.2], atol=1e-7)
    assert node_state(opt1)["history"] == [0]
    out, opt = run_2d("gcond(grads.a, grads.b)", pair)  # near-no-op iterations after the eps residual
    np.testing.assert_allclose(out[0], [2.0, 0.2], atol=1e-7)
    ref = R.ref_gcond()
    reference(ref, [[[np.array(a)], [np.array(b)]] for a, b in pair])
    assert node_state(opt)["history"] == ref.state["history"]
    assert len(ref.state["log"]) == 4  # the loop ran to 2K


# ----------------------------------------------------------------------- GCond: identities
def test_gcond_no_conflict_with_beta_zero_is_the_plain_sum():
    rs = np.random.RandomState(0)
    base = [rs.randn(*s) for s in SHAPES]
    steps = [[[b * (1 + k) + 0.1 * rs.randn(*b.shape) for b in base] for k in range(3)] for _ in range(3)]
    out, opt = run("gcond(grads.a, grads.b, grads.c, beta=0)", steps)
    for us, gs in zip(out, steps):
        for i, u in enumerate(us):
            np.testing.assert_allclose(u, gs[0][i] + gs[1][i] + gs[2][i], rtol=1e-14, atol=1e-14)
    assert node_state(opt)["history"] == []


def test_gcond_no_conflict_output_is_the_debiased_ema_of_the_sums():
    rs = np.random.RandomState(1)
    base = [rs.randn(*s) for s in SHAPES]
    steps = [[[b * rs.uniform(0.5, 2) for b in base] for _ in range(2)] for _ in range(4)]
    out, _ = run("gcond(grads.a, grads.b, beta=0.7)", steps)
    m = [np.zeros(s) for s in SHAPES]
    for t, (us, gs) in enumerate(zip(out, steps), start=1):
        for i in range(len(SHAPES)):
            m[i] = 0.7 * m[i] + 0.3 * (gs[0][i] + gs[1][i])
            np.testing.assert_allclose(us[i], m[i] / (1 - 0.7 ** t), rtol=1e-12)


def test_gcond_critical_zone_formula_and_loser_orthogonal_to_winner():
    rs = np.random.RandomState(2)
    ga = [rs.randn(*s) for s in SHAPES]
    gb = [-0.5 * x + 0.05 * rs.randn(*x.shape) for x in ga]  # cos ~ -0.99, a larger: a wins
    flat_a, flat_b = np.concatenate([x.ravel() for x in ga]), np.concatenate([x.ravel() for x in gb])
    d = flat_a @ flat_b
    assert d / np.linalg.norm(flat_a) / np.linalg.norm(flat_b) < -0.8
    out, _ = run("gcond(grads.a, grads.b, max_iters=1, beta=0)", [[ga, gb]])
    loser = [u - a for u, a in zip(out[0], ga)]  # sin(pi) ~ 1e-16: the winner is unchanged
    expected = [b - d / (flat_a @ flat_a + 1e-8) * a for a, b in zip(ga, gb)]
    for got, want in zip(loser, expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    flat_loser = np.concatenate([x.ravel() for x in loser])
    assert abs(flat_loser @ flat_a) < 1e-6 * np.linalg.norm(flat_a) * np.linalg.norm(flat_loser)


def test_gcond_moderate_conflict_is_resolved_in_one_iteration():
    # after one main-zone resolution <g_w', g_l'> = -s_w d (1 - c^2) > 0: the loop stops
    _, opt = run_2d("gcond(grads.a, grads.b)", [([1.0, 0.0], [-0.6, 0.6])])  # c = -0.707
    assert node_state(opt)["history"] == [0]


def test_gcond_weak_zone_is_a_symmetric_projection():
    c = -0.3
    a, b = np.array([1.0, 0.0]), np.array([c, math.sqrt(1 - c * c)])
    out, _ = run_2d("gcond(grads.a, grads.b, beta=0)", [(a, b)])
    d = a @ b
    cos = d / (math.sqrt((a @ a) * (b @ b)) + 1e-8)
    s = math.sin(math.pi / 2 * (1 - (cos + 0.5) / (0.5 + 1e-8)))
    expected = (a - s * d / (b @ b + 1e-8) * b) + (b - s * d / (a @ a + 1e-8) * a)
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)


def test_gcond_norm_cap_scales_tasks_after_the_ema():
    pairs = [([6.0, 0.0], [-0.6, 0.8]), ([1.0, 0.5], [-8.0, 9.0])]
    out, opt = run_2d("gcond(grads.a, grads.b, norm_cap=2)", pairs)
    capped = [([6.0 * 2 / (6 + 1e-8), 0.0], [-0.6, 0.8])]
    cap_only, _ = run_2d("gcond(grads.a, grads.b)", capped)
    np.testing.assert_allclose(out[0], cap_only[0], rtol=1e-12)
    # the EMAs saw the raw norms (6 and sqrt(145)), not the capped ones
    np.testing.assert_allclose(node_state(opt)["ema"],
                               [0.95 * (0.95 + 0.05 * 6) + 0.05 * math.sqrt(1.25),
                                0.95 * 1.0 + 0.05 * math.sqrt(145)], rtol=1e-12)
    ref = R.ref_gcond(norm_cap=2.0)
    assert_close([[u] for u in out], reference(ref, [[[np.array(a)], [np.array(b)]] for a, b in pairs]))


def test_gcond_tiny_task_gradient_takes_no_part():
    # ||g_b||^2 < eps: no pair is formed, the output is the sum
    out, opt = run_2d("gcond(grads.a, grads.b, beta=0)", [([1.0, 0.0], [-5e-5, 0.0])])
    np.testing.assert_array_equal(out[0], [1.0 - 5e-5, 0.0])
    assert node_state(opt)["history"] == []


@pytest.mark.parametrize("k,seed,kw", [
    (2, 0, {}), (2, 1, {}), (3, 0, {}), (3, 4, {}),
    (3, 1, dict(beta=0.9, max_iters=3, dominance_window=0)),
    (3, 5, dict(t_crit=-0.9, t_main=-0.3, t_weak=0.1, remap_power=1.5, w_stability=0.5, w_strength=0.5,
                norm_ema_beta=0.8, dominance_window=2, norm_cap=3.0)),
])
def test_gcond_matches_reference_on_random_steps(k, seed, kw):
    steps = random_steps(k, 8, seed)
    args = "".join(f", {n}={v}" for n, v in kw.items())
    out, _ = run(f"gcond({', '.join('grads.' + NAMES[j] for j in range(k))}{args})", steps)
    ref = R.ref_gcond(**kw)
    assert_close(out, reference(ref, steps), dict(rtol=1e-9, atol=1e-11))
    assert zones_hit(ref) >= {"main", "weak"}


def test_gcond_tensor_one_loss_does_not_reach_takes_part_in_the_global_vectors():
    steps = random_steps(2, 6, 2, heads=True)
    out, _ = run("gcond(grads.a, grads.b)", steps, shapes=SHAPES)
    assert_close(out, reference(R.ref_gcond(), steps), dict(rtol=1e-9, atol=1e-11))
    # the head gradient changes the shared tensor's update (it enters the inner products)
    other = [[task[:-1] + ([None] if task[-1] is None else [task[-1] * 3.0]) for task in gs] for gs in steps]
    out2, _ = run("gcond(grads.a, grads.b)", other, shapes=SHAPES)
    assert not np.allclose(out[0][0], out2[0][0])


# ----------------------------------------------------------------------- SAM-GS: worked examples
S12 = [([3.0, 0.0], [0.0, 1.0]), ([2.0, 1.0], [-1.0, 1.0])]


def test_samgs_s1_default_gamma_modulates():
    out, opt = run_2d("samgs(grads.a, grads.b)", S12)
    np.testing.assert_allclose(out[0], [44.9998594, 4.9999844], atol=1e-6)
    np.testing.assert_allclose(out[1], [30.4578487, 10.5152097], atol=1e-6)
    saved = node_state(opt)
    assert saved["t"] == 2
    assert isinstance(saved["v"], torch.Tensor)
    sbar = 2 * math.sqrt(5) * math.sqrt(2) / 7
    np.testing.assert_allclose(float(saved["v"]), 0.99 * (0.01 * 0.16 + 1e-8) + 0.01 * (1 - sbar) ** 2 + 1e-8,
                               rtol=1e-14)
    clipped, _ = run_2d("samgs(grads.a, grads.b) | clip_norm(1.0)", S12)
    np.testing.assert_allclose(clipped[0], [0.9938837, 0.1104315], atol=1e-7)
    np.testing.assert_allclose(clipped[1], [0.9452533, 0.3263374], atol=1e-7)


def test_samgs_s2_gamma_07_equalises_then_modulates():
    out, _ = run_2d("samgs(grads.a, grads.b, gamma=0.7)", S12)
    np.testing.assert_allclose(out[0], [4.0, 4.0], rtol=1e-12)
    np.testing.assert_allclose(out[1], [30.4578487, 10.5152097], atol=1e-6)
    ref = R.ref_samgs(gamma=0.7)
    assert_close([[u] for u in out], reference(ref, [[[np.array(a)], [np.array(b)]] for a, b in S12]))
    assert ref.state["branch"] == ["equalise", "modulate"]


def test_samgs_s3_equal_norms_give_the_factor_1000():
    out, opt = run_2d("samgs(grads.a, grads.b)", [([1.0, 0.0], [0.0, 1.0])] * 3)
    for u in out:
        np.testing.assert_allclose(u, [2000.0, 2000.0], rtol=1e-9)
    np.testing.assert_allclose(float(node_state(opt)["v"]), 1e-8 * (1 - 0.99 ** 3) / 0.01, rtol=1e-9)


# ----------------------------------------------------------------------- SAM-GS: identities
def test_samgs_equal_norms_vhat_is_1e_minus_6_at_every_step():
    rs = np.random.RandomState(3)
    steps = []
    for _ in range(4):
        g = [rs.randn(*s) for s in SHAPES], [rs.randn(*s) for s in SHAPES]
        na, nb = (math.sqrt(sum(float((x * x).sum()) for x in task)) for task in g)
        steps.append([g[0], [x * na / nb for x in g[1]]])
    out, _ = run("samgs(grads.a, grads.b)", steps)
    m = [[np.zeros(s) for s in SHAPES] for _ in range(2)]
    for t, (us, gs) in enumerate(zip(out, steps), start=1):
        for k in range(2):
            for i in range(len(SHAPES)):
                m[k][i] = 0.9 * m[k][i] + 0.1 * gs[k][i]
        for i, u in enumerate(us):
            want = 2 * 1000.0 * sum(gs[k][i] * np.abs(m[k][i] / (1 - 0.9 ** t)) for k in range(2))
            np.testing.assert_allclose(u, want, rtol=1e-7)


def test_samgs_equalise_branch_is_k_times_mean_norm_times_sum_of_unit_vectors_and_scale_invariant():
    steps = random_steps(3, 1, 7)
    out, _ = run("samgs(grads.a, grads.b, grads.c, gamma=1.0)", steps)
    flat = [np.concatenate([x.ravel() for x in task]) for task in steps[0]]
    norms = [np.linalg.norm(f) for f in flat]
    want = 3 * np.mean(norms) * sum(f / n for f, n in zip(flat, norms))
    np.testing.assert_allclose(np.concatenate([u.ravel() for u in out[0]]), want, rtol=1e-12)
    scaled, _ = run("samgs(grads.a, grads.b, grads.c, gamma=1.0)", [[[x * 5 for x in task] for task in steps[0]]])
    for u, v in zip(out[0], scaled[0]):
        np.testing.assert_allclose(v, 5 * u, rtol=1e-12)


def test_samgs_modulate_branch_grows_with_the_square_of_the_scale():
    steps = random_steps(2, 1, 8)
    out, _ = run("samgs(grads.a, grads.b, gamma=0)", steps)
    scaled, _ = run("samgs(grads.a, grads.b, gamma=0)", [[[x * 3 for x in task] for task in steps[0]]])
    for u, v in zip(out[0], scaled[0]):
        np.testing.assert_allclose(v, 9 * u, rtol=1e-12)


@pytest.mark.parametrize("k,seed,kw", [(2, 0, {}), (3, 1, {}), (2, 2, dict(gamma=0.7)),
                                       (3, 3, dict(b1=0.5, b2=0.9, gamma=0.95))])
def test_samgs_matches_reference_on_random_steps(k, seed, kw):
    steps = random_steps(k, 8, seed)
    args = "".join(f", {n}={v}" for n, v in kw.items())
    out, _ = run(f"samgs({', '.join('grads.' + NAMES[j] for j in range(k))}{args})", steps)
    ref = R.ref_samgs(**kw)
    assert_close(out, reference(ref, steps), dict(rtol=1e-10, atol=1e-12))


def test_samgs_tensor_one_loss_does_not_reach_gets_the_plain_sum():
    steps = random_steps(2, 5, 4, heads=True)  # the (5,) tensor is reached by task b only
    out, opt = run("samgs(grads.a, grads.b)", steps, shapes=SHAPES)
    assert_close(out, reference(R.ref_samgs(shared=[True, False]), steps))
    for us, gs in zip(out, steps):
        np.testing.assert_allclose(us[1], gs[1][1], rtol=1e-14, atol=1e-15)
    # the head gradient does not enter the norms: the shared update is unchanged
    other = [[task[:-1] + ([None] if task[-1] is None else [task[-1] * 7.0]) for task in gs] for gs in steps]
    out2, _ = run("samgs(grads.a, grads.b)", other, shapes=SHAPES)
    for a, b in zip(out, out2):
        np.testing.assert_array_equal(a[0], b[0])
    head = opt.param_groups[0]["params"][1]
    assert set(opt.state[head]) == {"main/samgs.m0", "main/samgs.m1", "step"}
    assert not opt.state[head]["main/samgs.m1"].any()  # task heads keep no momentum


def test_samgs_zero_task_gradient_gives_no_nan():
    out, _ = run_2d("samgs(grads.a, grads.b)", [([1.0, 2.0], [0.0, 0.0])])
    np.testing.assert_allclose(out[0], [1.0, 2.0], rtol=1e-12)  # 2 * mean norm * unit(a)
    out, _ = run_2d("samgs(grads.a, grads.b)", [([0.0, 0.0], [0.0, 0.0])])
    np.testing.assert_array_equal(out[0], [0.0, 0.0])


# ----------------------------------------------------------------------- both: state, errors, training
@pytest.mark.parametrize("pipeline,k,heads", [
    ("gcond(grads.a, grads.b, grads.c)", 3, False),
    ("gcond(grads.a, grads.b, dominance_window=2)", 2, True),
    ("samgs(grads.a, grads.b, grads.c)", 3, False),
    ("samgs(grads.a, grads.b, gamma=0.7) | clip_norm(1.0)", 2, True),
])
def test_state_dict_round_trip_through_torch_save_mid_sequence(pipeline, k, heads):
    steps = random_steps(k, 7, 11, heads=heads)
    split = 3
    params = make_params()
    opt = gradpipe.Optimizer(params, pipeline, lr=1.0)
    for gs in steps[:split]:
        step_once(opt, params, gs)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    clones = [p.detach().clone().requires_grad_() for p in params]
    fresh = gradpipe.Optimizer(clones, pipeline, lr=1.0)
    fresh.load_state_dict(saved)
    cold_params = [p.detach().clone().requires_grad_() for p in params]
    cold = gradpipe.Optimizer(cold_params, pipeline, lr=1.0)  # no state: must differ
    differs = False
    for gs in steps[split:]:
        a = step_once(fresh, clones, gs)
        b = step_once(opt, params, gs)
        c = step_once(cold, cold_params, gs)
        for x, y, z in zip(a, b, c):
            assert np.array_equal(x, y)
            differs |= not np.array_equal(x, z)
    assert differs
    for p, q in zip(params, clones):
        assert torch.equal(p, q)
    assert fresh.state_dict()["gradpipe"]["node_state"].keys() == opt.state_dict()["gradpipe"]["node_state"].keys()


@pytest.mark.parametrize("op", ["gcond", "samgs"])
def test_one_signal_is_an_error(op):
    with pytest.raises(GradError, match="two or more signals"):
        gradpipe.compile(f"{op}(grads.a)")


@pytest.mark.parametrize("op,bufs", [("gcond", ["prev0", "prev1", "prev2", "m"]), ("samgs", ["m0", "m1", "m2"])])
def test_buffers_are_named_per_task(op, bufs):
    prog = gradpipe.compile(f"{op}(grads.x, grads.y, grads.z)")
    assert prog.state_schema() == [f"main/{op} {op} {','.join(bufs)}"]
    assert prog.losses == {"x", "y", "z"}


def test_gcond_rejects_thresholds_out_of_order():
    with pytest.raises(ValueError, match="t_crit <= t_main <= t_weak"):
        run_2d("gcond(grads.a, grads.b, t_crit=-0.2, t_main=-0.5)", [G1[0]])


def test_inputs_are_not_modified():
    for pipeline in ("gcond(grads.a, grads.b)", "samgs(grads.a, grads.b)"):
        params = make_params()
        opt = gradpipe.Optimizer(params, pipeline, lr=1.0)
        ga = [torch.tensor(g) for g in random_steps(2, 1, 5)[0][0]]
        gb = [-2 * g for g in ga]
        kept = [g.clone() for g in ga + gb]
        opt.step(losses={"a": sum((p * g).sum() for p, g in zip(params, ga)),
                         "b": sum((p * g).sum() for p, g in zip(params, gb))})
        assert all(torch.equal(g, k) for g, k in zip(ga + gb, kept))


def test_float32_and_bf16_params_keep_fp32_state():
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.zeros(4, dtype=dtype, requires_grad=True)
        for pipeline, buf in (("gcond(grads.a, grads.b)", "main/gcond.prev1"), ("samgs(grads.a, grads.b)",
                                                                                 "main/samgs.m0")):
            opt = gradpipe.Optimizer([p], pipeline, lr=0.1)
            ga, gb = torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([-1.0, 0.5, 1.0, 0.0])
            opt.step(losses={"a": (p * ga.to(dtype)).sum(), "b": (p * gb.to(dtype)).sum()})
            assert opt.state[p][buf].dtype == torch.float32
            assert p.dtype == dtype and torch.isfinite(p.float()).all()


@pytest.mark.parametrize("source", [
    "gcond(grads.main, grads.aux) | adam(0, 0.95)",
    "samgs(grads.main, grads.aux) | clip_norm(1.0) | adam",
])
def test_trains_the_digits_multitask_task(source):
    r = train_multitask(lambda model: gradpipe.Optimizer(model.named_parameters(), source, lr=1e-2), steps=100)
    assert all(math.isfinite(v) for v in r.losses + r.aux_losses)
    assert r.final_loss < 0.2 * r.initial_loss
    assert r.final_aux_loss < 0.5 * r.initial_aux_loss
    assert r.val_accuracy > 0.8 and r.val_aux_accuracy > 0.8
