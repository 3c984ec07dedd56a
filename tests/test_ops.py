"""The op library against hand-written references (``op_table.py``), plus op-specific properties.

Generic tests run over every row of the table: the equations, a state_dict
round trip in the middle of the sequence, and that no op writes into its input
gradient. Specific tests cover what a table row cannot: diffGrad's friction
with a reused gradient buffer, clip_median's relation to plain clipping,
project_orthogonal's orthogonality (hypothesis), the noise generator, and a
few identities.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


import op_table as T  # noqa: E402

import gradpipe  # noqa: E402
from gradpipe.compiler.ops import OPS  # noqa: E402
from gradpipe.compiler.ops.base import MacroOp  # noqa: E402
from gradpipe.runtime import optimizer as optimizer_module  # noqa: E402

TOL = dict(rtol=1e-12, atol=1e-12)


def assert_updates(actual, expected, tol=TOL, what=""):
    assert len(actual) == len(expected)
    for t, (us, es) in enumerate(zip(actual, expected), start=1):
        assert len(us) == len(es)
        for i, (u, e) in enumerate(zip(us, es)):
            assert u.shape == e.shape, f"{what} step {t} tensor {i}: shape {u.shape} != {e.shape}"
            np.testing.assert_allclose(u, e, err_msg=f"{what} step {t} tensor {i}", **tol)


def case_tol(case):
    rtol, atol = case.tol
    return dict(rtol=rtol, atol=atol)


def grads_np(seq):
    return [[np.array(g) for g in gs] for gs in seq]


# ------------------------------------------------------------------------ the table itself
def test_table_covers_every_op():
    covered = {c.op for c in T.CASES}
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops without a row in tests/op_table.py: {missing}"
    unknown = sorted(covered - set(OPS))
    assert not unknown, f"rows for ops that are not registered: {unknown}"


def test_table_ids_unique_and_cases_use_their_op():
    assert len(set(T.case_ids())) == len(T.CASES)
    for c in T.CASES:
        prog = gradpipe.compile(c.pipeline)
        ops = {d["op"] for _, d in prog.graph.nodes(data=True) if d["kind"] == "op"}
        if isinstance(OPS[c.op], MacroOp):
            # a macro is inlined: its call is in the text and its nodes live under its name
            assert re.search(rf"\b{c.op}\s*\(", c.pipeline), c.id
            assert any(n.split("/")[1] == c.op for n in prog.graph.nodes if n.count("/") >= 2), c.id
            continue
        # scale(<signal>) is rewritten to an elementwise product: no scale node, but the text uses it
        assert c.op in ops or c.pipeline.split("|")[-1].strip().startswith(c.op + "("), f"{c.id}: pipeline {c.pipeline!r} has no '{c.op}' node (has {sorted(ops)})"


def test_multi_loss_rows_read_exactly_their_tasks():
    for c in T.CASES:
        prog = gradpipe.compile(c.pipeline)
        assert prog.losses == set(c.tasks), f"{c.id}: reads {sorted(prog.losses)}, row says {c.tasks}"
        assert len(set(c.tasks)) == len(c.tasks)


def test_fixed_inputs_cross_clipping_thresholds():
    # the gradients are meant to be clipped on some steps and not on others
    norms = [math.sqrt(sum(float(np.sum(g * g)) for g in gs)) for gs in T.GRADS]
    assert min(norms) < 1.0 < 2.0 < max(norms)
    assert [g.shape for g in T.GRADS[0]] == [tuple(s) for s in T.SHAPES]


def test_task_inputs_conflict_on_some_steps_and_agree_on_others():
    assert len(T.TASK_GRADS) == T.STEPS
    for t, step in enumerate(T.TASK_GRADS, start=1):
        assert list(step) == list(T.TASKS)
        assert all([g.shape for g in gs] == [tuple(s) for s in T.SHAPES] for gs in step.values())
        ab = sum(float(np.sum(x * y)) for x, y in zip(step["a"], step["b"]))
        if t in T.CONFLICT_STEPS:
            assert ab < 0, f"step {t}: a and b should conflict"
        else:
            assert ab > 0, f"step {t}: a and b should agree"
    assert set(T.CONFLICT_STEPS) not in (set(), set(range(1, T.STEPS + 1)))
    # c conflicts with a or b on some step, so PCGrad with three tasks has an order to follow
    dots = [sum(float(np.sum(x * y)) for x, y in zip(s["c"], s[o])) for s in T.TASK_GRADS for o in "ab"]
    assert min(dots) < 0 < max(dots)
    # the "head" inputs: c does not reach the vector, everything else is the same
    for full, head in zip(T.TASK_GRADS, T.TASK_GRADS_HEAD):
        assert head["c"][1] is None and head["c"][0] is full["c"][0]
        assert head["a"] is full["a"] and head["b"] is full["b"]


def test_sample_inputs_cross_both_clipping_norms_every_step():
    # per step, the examples' norms (over every tensor) lie on both sides of the dp_clip norms 0.5 and 1
    assert len(T.SAMPLE_GRADS) == T.STEPS
    for step in T.SAMPLE_GRADS:
        assert isinstance(step, T.Samples)
        assert [g.shape for g in step] == [(T.SAMPLE_B, *s) for s in T.SHAPES]
        norms = np.sqrt(sum(np.sum(g.reshape(T.SAMPLE_B, -1) ** 2, axis=1) for g in step))
        for clip in (0.5, 1.0):
            assert np.any(norms < clip) and np.any(norms > clip), norms


def test_project_out_bases_are_orthonormal_and_skip_the_vector():
    for shape, m in zip(T.MATRIX_SHAPES, T.PROJECT_OUT_BASES):
        if len(shape) < 2:
            assert m is None
            continue
        assert m.shape[0] == math.prod(shape[1:])
        np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-14)
    # relax=1 frees a one-column basis entirely and keeps part of the others
    assert sorted(m.shape[1] for m in T.PROJECT_OUT_BASES if m is not None) == [1, 2, 3]


def test_matrix_inputs_cover_both_projection_sides_and_a_vector():
    shapes = [tuple(s) for s in T.MATRIX_SHAPES]
    mats = [(s[0], math.prod(s[1:])) for s in shapes if len(s) >= 2]
    assert any(m < n for m, n in mats) and any(m >= n for m, n in mats)
    assert any(len(s) > 2 for s in shapes) and any(len(s) == 1 for s in shapes)
    assert [g.shape for g in T.MATRIX_GRADS[0]] == shapes


@pytest.mark.parametrize("case", [c for c in T.CASES if c.tasks], ids=[c.id for c in T.CASES if c.tasks])
def test_linear_losses_feed_the_given_task_gradients_exactly(case, monkeypatch):
    # the runtime receives exactly the table's gradients: one per loss, zeros where a loss does not
    # reach a tensor, ``grad`` their sum; a tensor is shared when every loss reaches it
    seen = []
    real = optimizer_module.run_route

    def spy(prog, label, batch, *args, **kwargs):
        seen.append(({k: [g.clone() for g in v] for k, v in batch.grads.items()}, list(batch.shared)))
        return real(prog, label, batch, *args, **kwargs)

    monkeypatch.setattr(optimizer_module, "run_route", spy)
    T.run_case(case)
    assert len(seen) == T.STEPS
    for (grads, shared), step in zip(seen, T.case_grads(case)):
        assert set(grads) == {"grad"} | {f"grads.{k}" for k in case.tasks}
        for k, gs in step.items():
            for got, want in zip(grads[f"grads.{k}"], gs):
                assert torch.equal(got, torch.zeros_like(got) if want is None else torch.tensor(want))
        assert shared == [all(step[k][i] is not None for k in case.tasks) for i in range(len(shared))]
        for i, total in enumerate(grads["grad"]):
            np.testing.assert_allclose(total.numpy(), sum(g[i] for g in step.values() if g[i] is not None),
                                       rtol=1e-15, atol=1e-15)


# ------------------------------------------------------------------------ generic tests over the table
@pytest.mark.parametrize("case", T.CASES, ids=T.case_ids())
def test_equations(case):
    actual = T.run_case(case)
    expected = T.reference_updates(case)
    assert_updates(actual, expected, tol=case_tol(case), what=case.pipeline)


@pytest.mark.parametrize("case", T.CASES, ids=T.case_ids())
def test_state_dict_round_trip_mid_sequence(case):
    split = 2
    grads = T.case_grads(case)
    params = T.make_params(T.case_params0(case), requires_grad=bool(case.tasks))
    opt = T.make_case_optimizer(case, params)
    first = T.run_optimizer(opt, params, grads[:split])
    saved = T.deepcopy_state(opt.state_dict())

    clones = T.clone_params(params)
    # no setup hook: what it provides (project_out's basis) is optimizer state, so it must come
    # back from the state dict alone
    fresh = T.make_case_optimizer(case, clones, setup=False)
    fresh.load_state_dict(saved)
    resumed = T.run_optimizer(fresh, clones, grads[split:])
    continued = T.run_optimizer(opt, params, grads[split:])

    for t, (a, b) in enumerate(zip(resumed, continued), start=split + 1):
        for i, (x, y) in enumerate(zip(a, b)):
            assert np.array_equal(x, y), f"{case.id}: step {t} tensor {i} differs after load_state_dict"
    for p, q in zip(params, clones):
        assert torch.equal(p, q)
    assert_updates(first + resumed, T.reference_updates(case), tol=case_tol(case), what=case.pipeline)


@pytest.mark.parametrize("case", T.CASES, ids=T.case_ids())
def test_input_gradient_not_modified(case, monkeypatch):
    # every gradient tensor the runtime hands the pipeline (p.grad, or grads.<loss> and their sum
    # ``grad`` for multi-loss rows, or ``samples`` and their mean ``grad`` for per-example rows) is
    # unchanged after the step; p.grad is not replaced either (nor filled by the other two ways)
    checked = []
    real = optimizer_module.run_route

    def spy(prog, label, batch, *args, **kwargs):
        kept = {k: [g.clone() for g in v] for k, v in batch.grads.items()}
        out = real(prog, label, batch, *args, **kwargs)
        for k, gs in batch.grads.items():
            for i, (g, c) in enumerate(zip(gs, kept[k])):
                assert torch.equal(g, c), f"{case.id}: the pipeline wrote into {k} of tensor {i}"
        checked.append(sorted(batch.grads))
        return out

    monkeypatch.setattr(optimizer_module, "run_route", spy)
    params = T.make_params(T.case_params0(case), requires_grad=bool(case.tasks))
    opt = T.make_case_optimizer(case, params)
    per_example = False
    for gs in T.case_grads(case):
        if case.tasks:
            opt.step(losses=T.linear_losses(params, gs))
            assert all(p.grad is None for p in params), f"{case.id}: step(losses=...) filled p.grad"
            continue
        if isinstance(gs, T.Samples):
            per_example = True
            samples = {p: torch.tensor(g) for p, g in zip(params, gs)}
            kept = {p: g.clone() for p, g in samples.items()}
            opt.step(samples=samples)
            for i, p in enumerate(params):
                assert torch.equal(samples[p], kept[p]), f"{case.id}: the op wrote into the samples of tensor {i}"
            assert all(p.grad is None for p in params), f"{case.id}: step(samples=...) filled p.grad"
            continue
        grads = [torch.tensor(g) for g in gs]
        for p, g in zip(params, grads):
            p.grad = g
        kept = [g.clone() for g in grads]
        opt.step()
        for p, g, k in zip(params, grads, kept):
            assert p.grad is g, f"{case.id}: p.grad was replaced"
            assert torch.equal(g, k), f"{case.id}: the op wrote into the input gradient"
    assert len(checked) == T.STEPS * len(opt.program.routes)  # a run per route and step
    expected_keys = sorted({"grad"} | {f"grads.{k}" for k in case.tasks} | ({"samples"} if per_example else set()))
    assert all(keys == expected_keys for keys in checked), checked


@pytest.mark.parametrize("case", T.CASES, ids=T.case_ids())
def test_state_buffers_are_named_after_nodes(case):
    params = T.make_params(T.case_params0(case), requires_grad=bool(case.tasks))
    opt = T.make_case_optimizer(case, params)
    # state the row's setup hook gave (project_out's basis from opt.set_basis) is the user's, not a
    # buffer the op creates: it is named <node>.<declared buffer>, and stepping keeps it as it was
    given = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    for keys in given.values():
        for key in keys:
            node, _, buf = key.rpartition(".")
            assert node in opt.program.graph, f"{case.id}: {key} is not named after a node"
            assert buf in {b.name for b in OPS[opt.program.graph.nodes[node]["op"]].buffers}, (case.id, key)
    T.run_optimizer(opt, params, T.case_grads(case)[:2])
    expected = set(opt.program.state_buffers()) | {"step"}
    seen = set()
    for p in params:
        for k, v in given.get(p, {}).items():
            assert torch.equal(opt.state[p][k], v), f"{case.id}: {k} changed"
        keys = set(opt.state[p]) - set(given.get(p, {}))
        seen |= keys
        assert keys <= expected, f"{case.id}: unknown state {sorted(keys - expected)}"
        assert float(opt.state[p]["step"]) == 2
        # every buffer a parameter keeps is counted by Program.state_numel (block ops such as
        # galore keep less, e.g. no projector for a vector, and their inner state at another shape)
        numel = sum(v.numel() for k, v in opt.state[p].items() if k in keys - {"step"})
        assert numel == opt.program.state_numel(opt.route_of(p), tuple(p.shape)), f"{case.id}: {p.shape}"
        if not opt.program.has_projections(opt.route_of(p)):
            assert keys == expected, case.id
    assert seen == expected, case.id


# ------------------------------------------------------------------------ diffgrad
def _friction_from_state(u, m, v, t, b1, b2, eps):
    """Solve u = sqrt(1-b2^t)/(1-b1^t) * xi * m / (sqrt(v) + eps) for xi."""
    step_size = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return u * (np.sqrt(v) + eps) / (step_size * m)


@pytest.mark.parametrize("in_place", [False, True], ids=["assign", "copy_"])
def test_diffgrad_friction_varies_when_grad_buffer_is_reused(in_place):
    b1, b2, eps = 0.8, 0.9, 1e-6
    params = T.make_params()
    opt = gradpipe.Optimizer(params, f"grad | diffgrad({b1}, {b2}, {eps})", backend="eager", lr=1.0)
    prev = [np.zeros(s) for s in T.SHAPES]
    bufs = None
    for t, gs in enumerate(T.GRADS, start=1):
        [us] = T.run_optimizer(opt, params, [gs], in_place=in_place)
        if in_place:
            if bufs is None:
                bufs = [p.grad for p in params]
            assert all(p.grad is b for p, b in zip(params, bufs)), "the test must reuse the buffer"
        for i, p in enumerate(params):
            st = opt.state[p]
            m, v = st["main/diffgrad.m"].numpy(), st["main/diffgrad.v"].numpy()
            xi = _friction_from_state(us[i], m, v, t, b1, b2, eps)
            np.testing.assert_allclose(xi, 1 / (1 + np.exp(-np.abs(prev[i] - gs[i]))), rtol=1e-9)
            if t > 1:
                assert np.all(np.abs(xi - 0.5) > 1e-6), "friction collapsed to 0.5: g_prev aliases the gradient"
            # the stored previous input is a copy of this step's gradient
            np.testing.assert_array_equal(st["main/diffgrad.prev"].numpy(), gs[i])
            assert st["main/diffgrad.prev"].data_ptr() != p.grad.data_ptr()
        prev = [g.copy() for g in gs]
    case = next(c for c in T.CASES if c.id == "diffgrad")
    # both ways of feeding the gradient follow the reference
    params2 = T.make_params()
    opt2 = gradpipe.Optimizer(params2, case.pipeline, backend="eager", lr=1.0)
    assert_updates(T.run_optimizer(opt2, params2, T.GRADS, in_place=in_place), T.reference_updates(case))


def test_diffgrad_step_between_half_and_full_adam_step():
    # With eps = 0 the two eps placements agree, so diffgrad / adam is exactly the friction.
    b1, b2 = 0.8, 0.9
    ud = T.run_case(T.CASES[0], pipeline=f"grad | diffgrad({b1}, {b2}, 0)")
    ua = T.run_case(T.CASES[0], pipeline=f"grad | adam({b1}, {b2}, 0)")
    prev = [np.zeros(s) for s in T.SHAPES]
    for t, (ds, as_, gs) in enumerate(zip(ud, ua, T.GRADS), start=1):
        for d, a, g, pv in zip(ds, as_, gs, prev):
            ratio = d / a
            assert np.all(ratio >= 0.5) and np.all(ratio < 1.0), f"step {t}"
            assert np.all(np.abs(d) <= np.abs(a)) and np.all(np.abs(d) >= 0.5 * np.abs(a) * (1 - 1e-12))
            np.testing.assert_allclose(ratio, 1 / (1 + np.exp(-np.abs(pv - g))), rtol=1e-12)
        prev = gs


def test_diffgrad_friction_factor_in_range_with_default_eps():
    # With eps > 0 the eps placements differ, so compare the friction factor itself.
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = T.make_params()
    opt = gradpipe.Optimizer(params, "grad | scale(diffgrad)", backend="eager", lr=1.0)
    for t, gs in enumerate(T.GRADS, start=1):
        [us] = T.run_optimizer(opt, params, [gs])
        for i, p in enumerate(params):
            st = opt.state[p]
            xi = _friction_from_state(us[i], st["main/diffgrad.m"].numpy(), st["main/diffgrad.v"].numpy(),
                                      t, b1, b2, eps)
            assert np.all(xi >= 0.5 - 1e-12) and np.all(xi < 1.0), f"step {t}"


# ------------------------------------------------------------------------ clip_median
@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_clip_median_reset_coord_is_clip_value(tau):
    a = T.run_pipeline_params(f"grad | clip_median({tau}, geometry=coord, reset=true)")
    b = T.run_pipeline_params(f"grad | clip_value({tau})")
    for (_, pa), (_, pb) in zip(a, b):
        for x, y in zip(pa, pb):
            assert torch.equal(x, y)
    T.assert_exact_updates(a, [[np.clip(g, -tau, tau) for g in gs] for gs in T.GRADS])


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("tau", [0.5, 2.0, 100.0])
def test_clip_median_reset_l2_is_clip_norm(scope, tau):
    a = T.run_case(T.CASES[0], pipeline=f"grad | clip_median({tau}, scope={scope}, reset=true)")
    b = T.run_case(T.CASES[0], pipeline=f"grad | clip_norm({tau}, scope={scope})")
    for us, vs in zip(a, b):
        for u, v in zip(us, vs):
            np.testing.assert_allclose(u, v, rtol=1e-6 / min(tau, 1.0), atol=0)


def test_clip_median_reset_keeps_no_state():
    prog = gradpipe.compile("grad | clip_median(1.0, reset=true)")
    assert prog.state_buffers() == []
    params = T.make_params()
    opt = gradpipe.Optimizer(params, prog, backend="eager", lr=1.0)
    T.run_optimizer(opt, params, T.GRADS[:2])
    assert set(opt.state[params[0]]) == {"step"}


def test_clip_median_global_and_tensor_scope_differ_as_expected():
    g_case = next(c for c in T.CASES if c.id == "clip_median_l2_global")
    t_case = next(c for c in T.CASES if c.id == "clip_median_l2_tensor")
    tau = 0.8
    glob = T.run_case(g_case, pipeline=f"grad | clip_median({tau})")
    tens = T.run_case(t_case, pipeline=f"grad | clip_median({tau}, scope=tensor)")
    ref = lambda scope: T.OpCase(scope, "clip_median", "", lambda: T.ref_clip_median(tau, "l2", scope))  # noqa: E731
    assert_updates(glob, T.reference_updates(ref("global")))
    assert_updates(tens, T.reference_updates(ref("tensor")))
    assert any(not np.allclose(a, b) for us, vs in zip(glob, tens) for a, b in zip(us, vs))

    # tensor scope: a tensor's update does not depend on the other tensor; global scope: it does
    other = [[g[0], 10 * g[1]] for g in T.GRADS]
    tens2 = T.run_case(t_case, grads=other, pipeline=f"grad | clip_median({tau}, scope=tensor)")
    glob2 = T.run_case(g_case, grads=other, pipeline=f"grad | clip_median({tau})")
    for t in range(T.STEPS):
        assert np.array_equal(tens[t][0], tens2[t][0])
        assert not np.allclose(glob[t][0], glob2[t][0])

    # on a one-tensor route the two scopes agree
    one = [[g[0]] for g in T.GRADS]
    p1 = T.make_params([T.PARAMS0[0]])
    a = T.run_case(g_case, grads=one, params=p1, pipeline=f"grad | clip_median({tau})")
    p2 = T.make_params([T.PARAMS0[0]])
    b = T.run_case(t_case, grads=one, params=p2, pipeline=f"grad | clip_median({tau}, scope=tensor)")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x[0], y[0], rtol=1e-14, atol=1e-15)


def test_clip_median_zero_residual_is_zero_step():
    # the same gradient forever: once m reaches it, the residual is 0 and clip(0) = 0 (no NaN)
    g = [np.full(s, 0.1) for s in T.SHAPES]
    ups = T.run_case(T.CASES[0], grads=[g] * 3, pipeline="grad | clip_median(10.0)")
    for us in ups:
        for u, gi in zip(us, g):
            assert np.all(np.isfinite(u))
            np.testing.assert_allclose(u, gi, rtol=1e-15)
    zero = [np.zeros(s) for s in T.SHAPES]
    ups = T.run_case(T.CASES[0], grads=[zero] * 2, pipeline="grad | clip_median(1.0)")
    assert all(np.all(u == 0) for us in ups for u in us)


# ------------------------------------------------------------------------ project_orthogonal
_PO_GLOBAL = gradpipe.compile("grad | project_orthogonal(param, eps=0)")
_PO_TENSOR = gradpipe.compile("grad | project_orthogonal(param, scope=tensor, eps=0)")
_PO_PCGRAD = gradpipe.compile("grad | project_orthogonal(param, max_coef=0)")

_finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)
_pair = st.tuples(*(hnp.arrays(np.float64, s, elements=_finite) for s in T.SHAPES))


def _project_once(prog, a, r, exact=None):
    """One step with grad = a and param = r: with lr = 1 the update is the projection of a against r.
    ``exact``: assert bit-exactly that the update is this."""
    steps = T.run_pipeline_params(prog, [list(a)], list(r))
    if exact is not None:
        T.assert_exact_updates(steps, [list(exact)])
    return [(b - x).numpy() for b, x in zip(*steps[0])]


def _dot(xs, ys):
    return sum(float(np.sum(x * y)) for x, y in zip(xs, ys))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_pair, r=_pair)
def test_project_orthogonal_global_is_orthogonal_to_reference(a, r):
    rn = math.sqrt(_dot(r, r))
    assume(rn > 1e-3)
    u = _project_once(_PO_GLOBAL, a, r)
    an = math.sqrt(_dot(a, a))
    # global scope: the inner product summed over both tensors vanishes
    assert abs(_dot(u, r)) <= 1e-9 * (an * rn + 1e-300) + 1e-12
    # and u is a - c r for one scalar c
    np.testing.assert_allclose(np.concatenate([x.ravel() for x in u]),
                               np.concatenate([x.ravel() for x in T.project(list(a), list(r), eps=0.0)]),
                               rtol=1e-9, atol=1e-9 * max(an, 1.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_pair, r=_pair)
def test_project_orthogonal_tensor_scope_is_orthogonal_per_tensor(a, r):
    assume(all(float(np.sum(x * x)) > 1e-6 for x in r))
    u = _project_once(_PO_TENSOR, a, r)
    for ui, ai, ri in zip(u, a, r):
        assert abs(float(np.sum(ui * ri))) <= 1e-9 * (np.linalg.norm(ai) * np.linalg.norm(ri)) + 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_pair, r=_pair)
def test_project_orthogonal_max_coef_zero_leaves_non_conflicting_input(a, r):
    if _dot(a, r) < 0:
        r = tuple(-x for x in r)
    _project_once(_PO_PCGRAD, a, r, exact=a)
    # a conflicting input is projected (inner product -> 0)
    rr = _dot(r, r)
    assume(_dot(a, r) > 1e-3 and rr > 1e-2)
    neg = tuple(-x for x in r)
    u = _project_once(_PO_PCGRAD, a, neg)
    assert abs(_dot(u, neg)) <= 1e-6 * math.sqrt(_dot(a, a) * rr) + _dot(a, r) * 1e-7 / rr + 1e-9


def test_project_orthogonal_zero_reference_passes_input():
    zero = [np.zeros(s) for s in T.SHAPES]
    _project_once(gradpipe.compile("grad | project_orthogonal(param)"), T.GRADS[0], zero, exact=T.GRADS[0])


# ------------------------------------------------------------------------ noise
def _noise_updates(pipeline, grads, shapes=T.SHAPES):
    params = T.make_params([np.zeros(s) for s in shapes])
    opt = gradpipe.Optimizer(params, pipeline, backend="eager", lr=1.0)
    return T.run_optimizer(opt, params, grads)


def test_noise_is_seeded():
    zero = [[np.zeros(s) for s in T.SHAPES]] * 3
    a = _noise_updates("grad | noise(1.0, 0.55, seed=3)", zero)
    b = _noise_updates("grad | noise(1.0, 0.55, seed=3)", zero)
    c = _noise_updates("grad | noise(1.0, 0.55, seed=4)", zero)
    for xs, ys, zs in zip(a, b, c):
        for x, y, z in zip(xs, ys, zs):
            assert np.array_equal(x, y)
            assert not np.allclose(x, z)
    # fresh draws every step
    assert not np.allclose(a[0][0], a[1][0])


def test_noise_default_seed_is_reproducible():
    zero = [[np.zeros(s) for s in T.SHAPES]] * 2
    a = _noise_updates("grad | noise", zero)
    b = _noise_updates("grad | noise", zero)
    assert all(np.array_equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_noise_two_tensors_get_different_draws():
    shapes = ((50,), (50,))
    zero = [[np.zeros(s) for s in shapes]] * 2
    ups = _noise_updates("grad | noise(1.0, 0.0, seed=0)", zero, shapes)
    for us in ups:
        assert not np.allclose(us[0], us[1])
        assert np.all(us[0] != 0) and np.all(us[1] != 0)


def test_noise_variance_decays_as_eta_over_t_to_the_gamma():
    eta, gamma, n = 0.5, 0.55, 100_000
    steps = 8
    zero = [[np.zeros(n)]] * steps
    ups = _noise_updates(f"grad | noise({eta}, {gamma}, seed=11)", zero, ((n,),))
    for t, [u] in enumerate(ups, start=1):
        expected = eta / t ** gamma
        # the sample variance of n normal draws has relative sd sqrt(2/n) ~ 0.45%: allow 3%
        assert abs(np.var(u) / expected - 1) < 0.03, f"step {t}: var {np.var(u)} vs {expected}"
        assert abs(np.mean(u)) < 5 * math.sqrt(expected / n)
    # and it really decays: the last variance is the first times steps^-gamma
    assert np.var(ups[-1][0]) < np.var(ups[0][0]) * steps ** -gamma * 1.05


def test_noise_is_never_merged_by_cse():
    prog = gradpipe.compile("let g = grad | clip_norm(1)\ng | add((g | noise)) | add((g | noise))")
    noise_nodes = [n for n, d in prog.graph.nodes(data=True) if d.get("op") == "noise"]
    assert len(noise_nodes) == 2
    assert prog.merged == []


# ------------------------------------------------------------------------ small identities
def test_momentum_beta_zero_is_identity():
    prog = gradpipe.compile("grad | momentum(0)")
    assert [d["kind"] for _, d in prog.graph.nodes(data=True)] == ["source", "output"]
    assert prog.state_buffers() == []
    T.assert_exact_updates(T.run_pipeline_params(prog), T.GRADS)


def test_momentum_beta_zero_from_hyperparameter_is_identity():
    # beta from a hyperparameter is not folded; the op itself is the identity at runtime
    params = T.make_params()
    opt = gradpipe.Optimizer(params, "sgd", backend="eager", lr=1.0, momentum=0)
    T.assert_exact_updates(T.run_optimizer_params(opt, params, T.GRADS[:3]), T.GRADS[:3])
    assert set(opt.state[params[0]]) == {"step"}
    # and a nonzero group value turns the momentum on, with no recompile
    params = T.make_params()
    opt = gradpipe.Optimizer(params, "sgd", backend="eager", lr=1.0, momentum=0.5)
    assert_updates(T.run_optimizer(opt, params, T.GRADS), T.reference_updates(
        T.OpCase("m", "momentum", "", lambda: T.ref_momentum(0.5))))


def test_scale_two_doubles():
    T.assert_exact_updates(T.run_pipeline_params("grad | scale(2)"), [[2 * g for g in gs] for gs in T.GRADS])


def test_sign_of_zero_is_zero():
    g = [np.array([[0.0, -2.0, 3.0, 0.0]] * 3), np.array([0.0, 1e-300, -1e-300, 5.0, 0.0])]
    T.assert_exact_updates(T.run_pipeline_params("grad | sign", [g]), [[np.sign(x) for x in g]])


def test_add_zero_is_removed():
    prog = gradpipe.compile("grad | add(0) | add(0.0)")
    assert prog.inputs("main/out") == {"x": "main/grad"}
    T.assert_exact_updates(T.run_pipeline_params(prog), T.GRADS)


def test_float32_params_keep_float32_state():
    params = [torch.tensor(np.array(v), dtype=torch.float32) for v in T.PARAMS0]
    opt = gradpipe.Optimizer(params, "grad | adam(0.8, 0.9, 1e-6)", backend="eager", lr=1.0)
    for p, g in zip(params, T.GRADS[0]):
        p.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    assert opt.state[params[0]]["main/adam.m"].dtype == torch.float32


def test_bf16_params_keep_fp32_state():
    params = [torch.tensor(np.array(v), dtype=torch.bfloat16) for v in T.PARAMS0]
    opt = gradpipe.Optimizer(params, "grad | adam(0.8, 0.9, 1e-6)", backend="eager", lr=1.0)
    for p, g in zip(params, T.GRADS[0]):
        p.grad = torch.tensor(g, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[params[0]]["main/adam.m"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
