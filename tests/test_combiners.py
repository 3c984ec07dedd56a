"""Multi-loss combiners (``pcgrad``, ``bloop``) and block ops (``galore``), as a user sees them.

The op table (``op_table.py``, run by ``test_ops.py``) checks each op's equations
on fixed inputs. Here are the properties a user would recognise:

* PCGrad with two tasks: the combined step conflicts with neither task, and it is
  the sum of the two projections, each orthogonal to the other task's gradient
  (hypothesis over random gradient pairs); ``mean`` halves shared tensors only; the
  task order is seeded and matters only from three tasks on.
* Bloop: the auxiliary part of the step is orthogonal to the EMA of the main
  gradient (hypothesis), and an auxiliary gradient along the main one is dropped.
* GaLore: the state lives at the projected shapes, which ``Program.state_numel`` and
  ``explain()`` report; the update has rank <= r; the projector is recomputed every
  ``gap`` steps; at full rank with a linear inner op it is that op times ``scale``.
* Mistakes are GradErrors at the right place, and ``format_source`` round-trips the
  block syntax.

Gradients are fed exactly through linear losses (``op_table.linear_losses``):
``loss_k = sum_i <p_i, G_k[i]>`` has gradient ``G_k``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import op_table as T

import gradpipe
from gradpipe.compiler.explain import EXAMPLE_SHAPES

_finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)
_grads = st.tuples(*(hnp.arrays(np.float64, s, elements=_finite) for s in T.SHAPES)).map(list)


def _dot(xs, ys) -> float:
    return sum(float(np.sum(x * y)) for x, y in zip(xs, ys))


def _norm(xs) -> float:
    return math.sqrt(_dot(xs, xs))


def _run(pipeline, steps, params0=None, **hyperparams):
    """Step a fresh optimizer (lr = 1, float64 parameters at zero unless given) once per entry of
    ``steps`` (lists or per-task dicts of gradients); the updates per step and the optimizer."""
    shapes = [np.shape(g) for g in (steps[0] if isinstance(steps[0], list) else next(iter(steps[0].values())))
              if g is not None]
    params0 = [np.zeros(s) for s in shapes] if params0 is None else params0
    params = T.make_params(params0, requires_grad=isinstance(steps[0], dict))
    opt = gradpipe.Optimizer(params, pipeline, backend="eager", **{"lr": 1.0, **hyperparams})
    return T.run_optimizer(opt, params, steps), opt, params


# ==================================================================== pcgrad
_PCGRAD_SUM = gradpipe.compile("pcgrad(grads.a, grads.b)")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_grads, b=_grads)
def test_pcgrad_two_tasks_step_conflicts_with_neither_task(a, b):
    na, nb = _norm(a), _norm(b)
    assume(na > 1e-3 and nb > 1e-3)
    [u], _, _ = _run(_PCGRAD_SUM, [{"a": a, "b": b}])
    ab = _dot(a, b)
    tol = 1e-9 * na * nb
    if ab < -tol:
        # each task gradient loses its component along the other one ...
        pa = [x - ab / nb ** 2 * y for x, y in zip(a, b)]
        pb = [y - ab / na ** 2 * x for x, y in zip(a, b)]
        assert abs(_dot(pa, b)) <= tol and abs(_dot(pb, a)) <= tol
        # ... so the two projected gradients do not conflict with each other either
        assert _dot(pa, pb) >= -tol
        for x, y, z in zip(u, pa, pb):
            np.testing.assert_allclose(x, y + z, rtol=1e-9, atol=1e-9 * (na + nb))
    elif ab > tol:
        # no conflict: plain sum
        for x, y, z in zip(u, a, b):
            np.testing.assert_allclose(x, y + z, rtol=1e-12, atol=1e-12 * (na + nb))
    # the combined step is a descent direction for both losses (to first order)
    nu = _norm(u)
    assert _dot(u, a) >= -1e-9 * nu * na
    assert _dot(u, b) >= -1e-9 * nu * nb


def test_pcgrad_fixed_inputs_project_on_conflicting_steps_only():
    steps = [{k: s[k] for k in "ab"} for s in T.TASK_GRADS]
    ups, _, _ = _run("pcgrad(grads.a, grads.b)", steps)
    for t, (us, s) in enumerate(zip(ups, steps), start=1):
        plain = [x + y for x, y in zip(s["a"], s["b"])]
        same = all(np.allclose(x, y, rtol=1e-13, atol=1e-13) for x, y in zip(us, plain))
        assert same == (t not in T.CONFLICT_STEPS), f"step {t}"
        assert _dot(us, s["a"]) >= 0 and _dot(us, s["b"]) >= 0


def test_pcgrad_mean_halves_shared_tensors_and_sums_unshared_ones():
    two = [{k: s[k] for k in "ab"} for s in T.TASK_GRADS]
    total, _, _ = _run("pcgrad(grads.a, grads.b)", two)
    mean, _, _ = _run("pcgrad(grads.a, grads.b, reduction=mean)", two)
    for ts, ms in zip(total, mean):
        for x, y in zip(ts, ms):
            np.testing.assert_array_equal(y, x / 2)
    # loss c does not reach the vector (a task head): it is not shared and keeps the sum
    three = T.TASK_GRADS_HEAD
    total, _, _ = _run("pcgrad(grads.a, grads.b, grads.c)", three)
    mean, _, _ = _run("pcgrad(grads.a, grads.b, grads.c, reduction=mean)", three)
    for ts, ms in zip(total, mean):
        np.testing.assert_allclose(ms[0], ts[0] / 3, rtol=1e-14, atol=1e-15)
        np.testing.assert_array_equal(ms[1], ts[1])


def test_pcgrad_task_order_is_seeded_and_matters_from_three_tasks():
    def run(src, tasks):
        return _run(src, [{k: s[k] for k in tasks} for s in T.TASK_GRADS])[0]

    def same(x, y):
        return all(np.array_equal(u, v) for us, vs in zip(x, y) for u, v in zip(us, vs))

    three = [run(f"pcgrad(grads.a, grads.b, grads.c, seed={s})", "abc") for s in range(6)]
    assert same(three[0], run("pcgrad(grads.a, grads.b, grads.c)", "abc"))  # the default seed is 0
    assert same(three[3], run("pcgrad(grads.a, grads.b, grads.c, seed=3)", "abc"))  # reproducible
    assert any(not same(three[0], other) for other in three[1:]), "the seed never changed the order"
    # with two tasks, projecting on oneself never applies, so the order cannot matter
    two = [run(f"pcgrad(grads.a, grads.b, seed={s})", "ab") for s in range(4)]
    for other in two[1:]:
        for us, vs in zip(two[0], other):
            for u, v in zip(us, vs):
                np.testing.assert_allclose(u, v, rtol=1e-14, atol=1e-15)


def test_pcgrad_on_a_model_with_two_heads_follows_the_reference():
    # shared trunk, one head per loss: autograd finds no path from one loss to the other's head,
    # so those tensors are not shared (summed with reduction=mean), as in the reference
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3).double()
    head_a, head_b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 1).double()
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = gradpipe.Optimizer(params, "pcgrad(grads.main, grads.aux, reduction=mean, seed=1)", lr=1.0)
    ref = T.ref_pcgrad("mean", 1)
    x = torch.randn(8, 4, dtype=torch.float64)
    ya, yb = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    for t in range(1, 4):
        def losses():
            h = torch.tanh(trunk(x))
            return {"main": ((head_a(h) - ya) ** 2).mean(), "aux": ((head_b(h) + yb) ** 2).mean()}
        tasks = {}
        for name, loss in losses().items():
            gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
            tasks[name] = [None if g is None else g.numpy().copy() for g in gs]
        assert [g is None for g in tasks["main"]] == [False, False, False, False, True, True]
        expected = ref(t, tasks, None)
        before = [p.detach().clone() for p in params]
        opt.step(losses=losses())
        for p, b, e in zip(params, before, expected):
            np.testing.assert_allclose((b - p.detach()).numpy(), e, rtol=1e-10, atol=1e-12)


def test_parameter_that_no_loss_reaches_is_left_alone():
    # like a parameter whose .grad is None: not updated, no state
    params = T.make_params([*T.PARAMS0, np.ones(2)], requires_grad=True)
    opt = gradpipe.Optimizer(params, "pcgrad(grads.a, grads.b) | adam", lr=0.1)
    step = T.TASK_GRADS[0]
    opt.step(losses=T.linear_losses(params, {k: [*step[k], None] for k in "ab"}))
    assert torch.equal(params[2].detach(), torch.ones(2, dtype=torch.float64))
    assert "step" not in opt.state[params[2]]
    assert float(opt.state[params[0]]["step"]) == 1 and float(opt.state[params[1]]["step"]) == 1


def test_multi_loss_pipeline_needs_its_losses():
    params = T.make_params(requires_grad=True)
    opt = gradpipe.Optimizer(params, "pcgrad(grads.a, grads.b) | adam", lr=0.1)
    for p, g in zip(params, T.GRADS[0]):
        p.grad = torch.tensor(g)
    with pytest.raises(ValueError, match=r"grads\.a, grads\.b.*losses"):
        opt.step()
    with pytest.raises(ValueError, match=r"grads\.b"):
        opt.step(losses={"a": T.linear_losses(params, {"a": T.GRADS[0]})["a"]})
    assert all(p not in opt.state or "step" not in opt.state[p] for p in params)


# ==================================================================== bloop
_BLOOP = gradpipe.compile("bloop(grads.main, grads.aux, lam=0.5, rho=0.3)")
_EMA = "main/bloop/project_orthogonal/ema.m"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(_grads, _grads), min_size=1, max_size=3))
def test_bloop_aux_component_is_orthogonal_to_ema_of_main(steps):
    params = T.make_params([np.zeros(s) for s in T.SHAPES], requires_grad=True)
    opt = gradpipe.Optimizer(params, _BLOOP, lr=1.0)
    r = [np.zeros(s) for s in T.SHAPES]
    for main, aux in steps:
        [u] = T.run_optimizer(opt, params, [{"main": main, "aux": aux}])
        r = [0.7 * x + 0.3 * g for x, g in zip(r, main)]
        # the EMA of the main gradient is the op's only state
        for p, x in zip(params, r):
            np.testing.assert_allclose(opt.state[p][_EMA].numpy(), x, rtol=1e-12, atol=1e-12)
        rr = _dot(r, r)
        assume(rr > 1e-2)
        pi = [(x - g) / 0.5 for x, g in zip(u, main)]  # u = main + lam * pi
        scale = (_norm(aux) + _norm(main) + sum(float(np.max(np.abs(p.detach().numpy()))) for p in params) + 1)
        # pi = aux - c r: orthogonal to r up to the eps in <r, r> + eps
        bound = abs(_dot(aux, r)) * 1e-7 / (rr + 1e-7) + 1e-12 * scale * math.sqrt(rr)
        assert abs(_dot(pi, r)) <= bound
        c = _dot(aux, r) / (rr + 1e-7)
        for x, a, y in zip(pi, aux, r):
            np.testing.assert_allclose(x, a - c * y, rtol=1e-9, atol=1e-11 * scale)


def test_bloop_drops_an_aux_gradient_along_the_main_one():
    main = T.GRADS[0]
    # step 1: r = rho main, so an aux gradient c main is removed up to the eps in <r, r> + eps:
    # pi = c main eps / (rho^2 |main|^2 + eps)
    rr = 0.1 ** 2 * _dot(main, main)
    for c in (-3.0, 0.5):
        [u], _, _ = _run("bloop(grads.main, grads.aux, lam=1)", [{"main": main, "aux": [c * g for g in main]}])
        for x, g in zip(u, main):
            np.testing.assert_allclose(x, g * (1 + c * 1e-7 / (rr + 1e-7)), rtol=1e-12, atol=1e-14)
            assert np.all(np.abs(x - g) <= 2e-5 * np.abs(g))
    # an aux gradient orthogonal to main passes unchanged, weighted by lam
    aux = [np.zeros_like(main[0]), np.zeros_like(main[1])]
    aux[0][0, 0], aux[0][0, 1] = main[0][0, 1], -main[0][0, 0]
    assert abs(_dot(aux, main)) < 1e-15
    [u], _, _ = _run("bloop(grads.main, grads.aux, lam=0.25)", [{"main": main, "aux": aux}])
    for x, g, a in zip(u, main, aux):
        np.testing.assert_allclose(x, g + 0.25 * a, rtol=1e-13, atol=1e-15)
    # lam = 0 is the main gradient alone
    ups, _, _ = _run("bloop(grads.main, grads.aux, lam=0)",
                     [{"main": s["a"], "aux": s["b"]} for s in T.TASK_GRADS])
    for us, s in zip(ups, T.TASK_GRADS):
        for x, g in zip(us, s["a"]):
            np.testing.assert_allclose(x, g, rtol=1e-14, atol=1e-15)


def test_bloop_expands_to_its_definition():
    a = gradpipe.compile("bloop(grads.m, grads.x, lam=0.2, rho=0.25)")
    b = gradpipe.compile("grads.m + 0.2 * (grads.x | project_orthogonal(ema(grads.m, beta=0.75)))")
    assert a.state_buffers() == ["main/bloop/project_orthogonal/ema.m"]
    assert a.losses == b.losses == {"m", "x"}
    steps = [{"m": s["a"], "x": s["c"]} for s in T.TASK_GRADS]
    ua, _, _ = _run(a, steps, T.PARAMS0)
    ub, _, _ = _run(b, steps, T.PARAMS0)
    for xs, ys in zip(ua, ub):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)


# ==================================================================== galore
_GALORE = "grad | galore(rank=2, gap=3, scale=0.25) { adam }"


def test_galore_state_lives_at_the_projected_shapes():
    ups, opt, params = _run(_GALORE, T.MATRIX_GRADS[:2], T.MATRIX_PARAMS0)
    # (3, 4): m < n, left projector P (m x r), moments r x n; (6, 3): m >= n, right projector
    # Q (r x n), moments m x r; (2, 3, 2) is viewed as 2 x 6 and r = min(2, 2, 6); vectors bypass
    expected = {(3, 4): ((3, 2), (2, 4)), (6, 3): ((2, 3), (6, 2)), (2, 3, 2): ((2, 2), (2, 6)), (5,): (None, (5,))}
    for p in params:
        proj, low = expected[tuple(p.shape)]
        st_ = opt.state[p]
        if proj is None:
            assert "main/galore.P" not in st_
        else:
            assert tuple(st_["main/galore.P"].shape) == proj
        assert tuple(st_["main/galore/adam.m"].shape) == low
        assert tuple(st_["main/galore/adam.v"].shape) == low
        numel = sum(v.numel() for k, v in st_.items() if k != "step")
        assert numel == opt.program.state_numel("main", tuple(p.shape))


@pytest.mark.parametrize("rank", [2, 128])
def test_galore_state_numel_and_explain_report_the_saving(rank):
    prog = gradpipe.compile(f"grad | galore(rank={rank}) {{ adam }}")
    adam = gradpipe.compile("grad | adam")
    n = 4096
    # projector r x n plus Adam's m, v at r x n (m = n: the right projector)
    assert prog.state_numel("main", (n, n)) == 3 * rank * n
    assert adam.state_numel("main", (n, n)) == 2 * n * n
    # 4096 x 11008 (m < n): P is m x r, the moments r x n
    assert prog.state_numel("main", (4096, 11008)) == 4096 * rank + 2 * rank * 11008
    # a vector is not projected: Adam's two buffers at full size
    assert prog.state_numel("main", (n,)) == 2 * n
    text = prog.explain()
    for shape in EXAMPLE_SHAPES:
        per_param = 4 * prog.state_numel("main", shape) / math.prod(shape)
        assert f"state for a {'x'.join(map(str, shape))} " in text
        assert f"{per_param:.3g} bytes per parameter in fp32" in text
    assert f"state for a 4096x4096 matrix: {4 * 3 * rank / n:.3g} bytes per parameter in fp32" in text
    assert "state: 8 bytes per parameter in fp32" in adam.explain()


def test_galore_update_has_at_most_rank_r_and_projector_changes_every_gap_steps():
    rank = 2
    params = T.make_params(T.MATRIX_PARAMS0)
    opt = gradpipe.Optimizer(params, _GALORE, lr=1.0)
    projectors = []
    for t, gs in enumerate(T.MATRIX_GRADS, start=1):
        [us] = T.run_optimizer(opt, params, [gs])
        projectors.append({i: opt.state[p]["main/galore.P"].clone() for i, p in enumerate(params) if p.dim() >= 2})
        for u, g in zip(us, gs):
            if g.ndim >= 2:
                mat = u.reshape(u.shape[0], -1)
                assert np.linalg.matrix_rank(mat, tol=1e-10 * max(1.0, np.abs(mat).max())) <= rank
    # recomputed at steps 1 and 4 ((t - 1) % 3 == 0), kept in between
    for i in projectors[0]:
        assert torch.equal(projectors[0][i], projectors[1][i]) and torch.equal(projectors[1][i], projectors[2][i])
        assert torch.equal(projectors[3][i], projectors[4][i])
    assert any(not torch.allclose(projectors[2][i].abs(), projectors[3][i].abs()) for i in projectors[0])
    # the projector has orthonormal columns (left, P is m x r) or rows (right, Q is r x n)
    for i, q in projectors[0].items():
        q = q.numpy()
        m, n = params[i].shape[0], math.prod(params[i].shape[1:])
        gram = q.T @ q if m < n else q @ q.T
        np.testing.assert_allclose(gram, np.eye(min(rank, m, n)), atol=1e-6)


def test_galore_full_rank_with_a_linear_inner_op_is_that_op_times_scale():
    # with r >= min(m, n) the projector is square and orthogonal: P P^T = I, so a linear inner op
    # commutes with the projection (the projector is kept for 1000 steps)
    full, _, _ = _run("grad | galore(rank=8, gap=1000, scale=0.5) { momentum(0.9) }", T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    plain, _, _ = _run("grad | momentum(0.9)", T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    for t, (fs, ps) in enumerate(zip(full, plain), start=1):
        for f, p, shape in zip(fs, ps, T.MATRIX_SHAPES):
            # matrices: scale * momentum; the vector bypasses the projection and the scale
            want = 0.5 * p if len(shape) >= 2 else p
            np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6, err_msg=f"step {t} shape {shape}")
    # and an identity block (scale(1) is removed) with scale 1 gives back the gradient
    ident, _, _ = _run("grad | galore(rank=8, gap=1, scale=1) { scale(1) }", T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    for us, gs in zip(ident, T.MATRIX_GRADS):
        for u, g in zip(us, gs):
            np.testing.assert_allclose(u, g, rtol=1e-5, atol=1e-6)


def test_galore_rank_one_sign_is_the_top_singular_direction_times_signs():
    # rank 1, left (m < n): P = u1, P^T G = s1 v1^T, u = u1 sign(v1)^T; right (m >= n): Q = v1^T,
    # G Q^T = s1 u1, u = sign(u1) v1^T -- the same whatever sign the SVD gives u1 and v1.
    # The vector bypasses the projection: sign at full size, no scale.
    ups, _, _ = _run("grad | galore(rank=1, gap=1, scale=0.5) { sign }", T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    for t, (us, gs) in enumerate(zip(ups, T.MATRIX_GRADS), start=1):
        for u, g in zip(us, gs):
            if g.ndim < 2:
                np.testing.assert_array_equal(u, np.sign(g))
                continue
            mat = g.reshape(g.shape[0], -1)
            left, _, right = np.linalg.svd(mat)
            u1, v1 = left[:, 0], right[0]
            want = np.outer(u1, np.sign(v1)) if mat.shape[0] < mat.shape[1] else np.outer(np.sign(u1), v1)
            np.testing.assert_allclose(u.reshape(mat.shape), 0.5 * want, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {t} shape {g.shape}")


def test_galore_block_inside_routes_and_multi_loss_pipelines():
    # a galore block on the matrices only, plain adam on the rest, after a combiner
    src = ("route ndim >= 2: pcgrad(grads.a, grads.b) | galore(rank=1) { adam }\n"
           "route default: pcgrad(grads.a, grads.b) | adam\n")
    prog = gradpipe.compile(src)
    params = T.make_params(requires_grad=True)
    opt = gradpipe.Optimizer(params, prog, lr=1e-2)
    steps = [{k: s[k] for k in "ab"} for s in T.TASK_GRADS[:2]]
    T.run_optimizer(opt, params, steps)
    mat, vec = opt.route_of(params[0]), opt.route_of(params[1])
    assert mat != vec
    assert set(opt.state[params[0]]) == {"step", f"{mat}/galore.P", f"{mat}/galore/adam.m", f"{mat}/galore/adam.v"}
    assert tuple(opt.state[params[0]][f"{mat}/galore/adam.m"].shape) == (1, 4)
    assert set(opt.state[params[1]]) == {"step", f"{vec}/adam.m", f"{vec}/adam.v"}


# ==================================================================== errors
_ERRORS = [
    # a combiner is the head of a pipeline, never a stage
    ("grad | pcgrad(grads.a, grads.b)", 1, 8, "'pcgrad' combines the signals it is given; it cannot be a stage"),
    ("grad | bloop(grads.a, grads.b)", 1, 8, "'bloop' combines the signals it is given; it cannot be a stage"),
    # it combines two or more signals, and only signals
    ("pcgrad(grads.a) | adam", 1, 1, "'pcgrad' combines two or more signals, got 1"),
    ("pcgrad(grads.a, 3) | adam", 1, 17, "argument 2 of 'pcgrad' must be a signal, got a number"),
    ("pcgrad(grads.a, grads.b, reduction=max) | adam", 1, 36, "'max' is not a valid reduction for 'pcgrad'"),
    ("bloop(grads.a) | adam", 1, 1, "op 'bloop' needs argument 'aux'"),
    ("bloop(grads.a, grads.b, rho=0) | adam", 1, 29, "rho=0 is outside the valid range (0, 1] of 'bloop'"),
    # a block op needs its block; other ops take none
    ("grad | galore(rank=2)", 1, 8, "op 'galore' needs argument 'inner'"),
    ("grad | adam { sign }", 1, 15, "op 'adam' takes no { ... } block"),
    ("pcgrad(grads.a, grads.b) { adam } | adam", 1, 28, "op 'pcgrad' takes no { ... } block"),
    ("bloop(grads.a, grads.b) { adam }", 1, 27, "op 'bloop' takes no { ... } block"),
    ("grad | galore(rank=0) { adam }", 1, 20, "rank=0 is outside the valid range [1, inf] of 'galore'"),
    # a block runs on the values its op hands it: no sources, nothing from outside
    ("grad | galore(rank=2) { param | sign }", 1, 25, "'inner' of 'galore' must be a pipeline of ops"),
    ("grad | galore(rank=2) { grad | sign }", 1, 25, "'inner' of 'galore' must be a pipeline of ops"),
    ("grad | galore(rank=2) { add(param) }", 1, 29,
     "the { ... } pipeline of 'galore' cannot read 'param'"),
    ("grad | galore(rank=2) { galore(rank=1) { scale(param) } }", 1, 48, "cannot read 'param'"),
    ("hparam wd = 0.1\n\ngrad | galore(rank=2) {\n  project_orthogonal(param) | adam\n}", 4, 22, "cannot read 'param'"),
    # a block without its op
    ("galore(rank=2) | adam", 1, 1, "a pipeline must start from a signal such as 'grad'"),
]


@pytest.mark.parametrize("source,line,column,message", _ERRORS, ids=[e[0].splitlines()[-1][:40] for e in _ERRORS])
def test_combiner_and_block_mistakes_are_located_grad_errors(source, line, column, message):
    with pytest.raises(gradpipe.GradError) as info:
        gradpipe.compile(source)
    e = info.value
    assert message in e.message, e.message
    assert (e.line, e.column) == (line, column), str(e)
    # the rendered text quotes the line and puts a caret under the column
    raw = source.splitlines()[line - 1]
    text = str(e)
    assert text.startswith(f"<string>:{line}:{column}: error: ")
    quoted, caret = text.splitlines()[1:3]
    assert quoted.endswith(raw)
    assert caret.index("^") == quoted.index(raw) + column - 1


def test_block_given_both_ways_is_an_error_naming_inner():
    with pytest.raises(gradpipe.GradError) as info:
        gradpipe.compile("grad | galore(rank=2, inner=adam) { sign }")
    assert (info.value.line, info.value.column) == (1, 37)
    assert "'inner'" in info.value.message


@pytest.mark.parametrize("inner", ["agc", "decay(0.1)", "trust_ratio"])
def test_param_reading_op_inside_projecting_block_is_a_grad_error(inner):
    with pytest.raises(gradpipe.GradError, match="param"):
        gradpipe.compile(f"grad | galore(rank=2) {{ {inner} }}")


def test_outer_source_read_inside_block_points_inside_the_block():
    with pytest.raises(gradpipe.GradError) as info:
        gradpipe.compile("grad | galore(rank=2) { add(grad) }")
    assert (info.value.line, info.value.column) == (1, 29)


# ==================================================================== formatting
_FORMATTED = [
    "grad | galore(rank=2, gap=3, scale=0.25) { adam }\n",
    "grad | galore(rank=2) { clip_norm(1) | adam }\n",
    "grad | galore(rank=2) { galore(rank=1) { sign } }\n",
    "grad | galore(rank=4, inner=momentum(0.9))\n",
    "grad | error_feedback(0.1) { topk(0.01) }\n",
    "pcgrad(grads.a, grads.b, reduction=mean) | galore(rank=2) { adam }\n",
    "bloop(grads.main, grads.aux, lam=0.2) | adam\n",
    "let g = pcgrad(grads.a, grads.b, grads.c, seed=3)\ng | adam\n",
    "route ndim >= 2: grad | galore(rank=2) { adam }\nroute default: grad | adam\n",
]
_MESSY = [
    ("grad|galore( rank = 2 ,gap=3){clip_norm( 1 )|adam}", "grad | galore(rank=2, gap=3) { clip_norm(1) | adam }\n"),
    ("grad | galore(rank=2) {\n    adam\n}\n", "grad | galore(rank=2) { adam }\n"),
    ("pcgrad( grads.a,grads.b ,reduction = mean)|adam", "pcgrad(grads.a, grads.b, reduction=mean) | adam\n"),
]


@pytest.mark.parametrize("source", _FORMATTED)
def test_format_source_keeps_block_and_combiner_syntax(source):
    assert gradpipe.format_source(source) == source
    assert gradpipe.compile(source).hash == gradpipe.compile(gradpipe.format_source(source)).hash


@pytest.mark.parametrize("source,formatted", _MESSY)
def test_format_source_normalises_and_round_trips(source, formatted):
    out = gradpipe.format_source(source)
    assert out == formatted
    assert gradpipe.format_source(out) == out
    a, b = gradpipe.compile(source), gradpipe.compile(out)
    assert a.state_schema() == b.state_schema()
    assert sorted(a.graph.nodes) == sorted(b.graph.nodes)


def test_block_and_inner_argument_build_the_same_graph():
    a = gradpipe.compile("grad | galore(rank=2) { adam }")
    b = gradpipe.compile("grad | galore(rank=2, inner=adam)")
    assert sorted(a.graph.nodes) == sorted(b.graph.nodes)
    assert a.state_schema() == b.state_schema()
    ua, _, _ = _run(a, T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    ub, _, _ = _run(b, T.MATRIX_GRADS, T.MATRIX_PARAMS0)
    for xs, ys in zip(ua, ub):
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)
