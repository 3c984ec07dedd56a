"""The seed-paper ops beyond their table rows: grams, gravity, normalize, centralize, agc,
trust_ratio, classp and aegd.

The table (``op_table.py``) checks each op's equations, state_dict round trip and
that the input is never written to. Here: what a row cannot show. Grams' zero
update for a zero input and the built-in ``grams`` pipeline against a NumPy
transcription of the official Grams step (weight decay included); Gravity's
seeded random start (reproducible, saved with the checkpoint, scaled by the
group's ``lr``); hand-computed values for the clipping and trust-ratio ops;
CLASSP's masks in both threshold modes; AEGD's energy with a real loss closure;
and that the ``grams`` and ``diffgrad`` built-ins train the digits task.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


import op_table as T  # noqa: E402

import gradpipe  # noqa: E402


def _updates(steps):
    """``p_before - p_after`` per step, as NumPy arrays."""
    return [[(b - a).numpy() for b, a in zip(before, after)] for before, after in steps]


def _close(u, e, rtol=1e-12, atol=1e-15):
    np.testing.assert_allclose(np.asarray(u), np.asarray(e, dtype=np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ grams
def test_grams_zero_input_gives_zero_update_whatever_the_momentum():
    g1 = [np.full(s, 0.7) for s in T.SHAPES]
    g2 = [np.array([[0.0, -1.0, 2.0, 0.0]] * 3), np.array([0.0, 0.5, 0.0, -0.5, 0.0])]
    [(_, _), (before, after)] = T.run_pipeline_params("grad | grams", [g1, g2])
    for b, a, g in zip(before, after, g2):
        u = (b - a).numpy()
        assert np.all(u[g == 0] == 0), "sign(0) = 0: no update where the input is zero"
        assert np.all(np.sign(u[g != 0]) == np.sign(g[g != 0])), "the update takes the input's sign"


def _official_grams(params0, grads, lr, betas, eps, wd):
    """A NumPy transcription of Gunale0926/Grams ``Grams.step`` (float64): the parameters after each step."""
    b1, b2 = betas
    ps = [np.array(p, dtype=np.float64) for p in params0]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    out = []
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            ps[i] = ps[i] * (1 - lr * wd)                       # p.data.mul_(1 - lr * weight_decay)
            ms[i] = ms[i] * b1 + (1 - b1) * g                   # exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            vs[i] = vs[i] * b2 + (1 - b2) * g * g               # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, ...)
            step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            denom = np.sqrt(vs[i]) + eps                        # exp_avg_sq.sqrt().add_(eps)
            ps[i] = ps[i] - step_size * (np.sign(g) * np.abs(ms[i])) / denom  # p.addcdiv_(..., value=-step_size)
        out.append([p.copy() for p in ps])
    return out


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_grams_builtin_matches_the_official_step(wd):
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-6
    grads = T.GRADS + [[np.where(np.abs(g) < 0.5, 0.0, g) for g in gs] for gs in T.GRADS]  # with exact zeros
    steps = T.run_pipeline_params("grams", grads, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    expected = _official_grams(T.PARAMS0, grads, lr, betas, eps, wd)
    for t, ((_, after), exp) in enumerate(zip(steps, expected), start=1):
        for a, e in zip(after, exp):
            np.testing.assert_allclose(a.numpy(), e, rtol=1e-13, atol=1e-15, err_msg=f"step {t}")


def test_grams_builtin_hyperparameters_and_scale_form():
    prog = gradpipe.load("grams")
    assert prog.defaults() == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0}
    ops = [d["op"] for _, d in prog.graph.nodes(data=True) if d["kind"] == "op"]
    assert ops == ["grams", "decay"]
    a = T.run_pipeline_params("grad | grams")
    b = T.run_pipeline_params("grad | scale(grams)")
    assert all(torch.equal(x, y) for (_, pa), (_, pb) in zip(a, b) for x, y in zip(pa, pb))
    assert gradpipe.compile("grad | scale(grams)").state_buffers() == ["main/grams.m", "main/grams.v"]


# ------------------------------------------------------------------------ gravity
def _zero_grads(shapes, steps):
    return [[np.zeros(s) for s in shapes] for _ in range(steps)]


def test_gravity_is_seeded_and_starts_from_n_0_alpha_over_lr():
    shapes = ((100, 100), (50,))
    zero = _zero_grads(shapes, 1)
    params0 = [np.zeros(s) for s in shapes]
    a = _updates(T.run_pipeline_params("grad | gravity(0.02, seed=3, lr=0.5)", zero, params0))
    b = _updates(T.run_pipeline_params("grad | gravity(0.02, seed=3, lr=0.5)", zero, params0))
    c = _updates(T.run_pipeline_params("grad | gravity(0.02, seed=4, lr=0.5)", zero, params0))
    for x, y, z in zip(a[0], b[0], c[0]):
        assert np.array_equal(x, y)
        assert not np.allclose(x, z)
    # a zero input gives zeta = 0 (no NaN from m = 1/max|x| = inf); beta_hat_1 = 1/2, so u_1 = V_0 / 2
    v0 = 2 * a[0][0]
    assert np.all(np.isfinite(v0))
    assert abs(np.std(v0) / (0.02 / 0.5) - 1) < 0.03 and abs(np.mean(v0)) < 0.04 * 5 / 100
    assert not np.allclose(a[0][0][:50, 0], a[0][1]), "each tensor gets its own draw"


def test_gravity_beta_hat_starts_at_one_half_keras_counter():
    # alpha = 0: V_0 = 0, so u_1 = (1 - 1/2) zeta_1 and u_2 = beta_hat_2 u_1 + (1 - beta_hat_2) zeta_2
    beta = 0.9
    g = [np.array([[1.0, -2.0, 0.5, 0.0]] * 3), np.array([0.0, 0.1, -0.1, 4.0, 1.0])]
    ups = _updates(T.run_pipeline_params(f"grad | gravity(0, {beta})", [g, g]))
    zeta = [x / (1 + (x * np.max(np.abs(x))) ** 2) for x in g]
    for u, z in zip(ups[0], zeta):
        _close(u, 0.5 * z)
    bh2 = (beta * 1 + 1) / (1 + 2)  # the Keras counter is 1 at the second step
    for u2, u1, z in zip(ups[1], ups[0], zeta):
        _close(u2, bh2 * u1 + (1 - bh2) * z)
    # kozistr / the authors' PyTorch port would give (beta + 1)/3 at the first step
    assert not np.allclose(ups[0][0], (1 - (beta + 1) / 3) * zeta[0])


def test_gravity_lr_argument_reads_the_group_learning_rate():
    prog = gradpipe.compile("grad | gravity(0.01, lr=lr)")
    p1, p2 = torch.zeros(100, 100, dtype=torch.float64), torch.zeros(100, 100, dtype=torch.float64)
    opt = gradpipe.Optimizer([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.01}], prog)
    for p in (p1, p2):
        p.grad = torch.zeros_like(p)
    opt.step()
    v1, v2 = opt.state[p1]["main/gravity.v"], opt.state[p2]["main/gravity.v"]
    # V_1 = V_0 / 2 with std alpha / lr: 0.01 / 1 and 0.01 / 0.01
    assert abs(float(v1.std()) / 0.005 - 1) < 0.03
    assert abs(float(v2.std()) / 0.5 - 1) < 0.03


def test_gravity_generator_state_is_saved_for_tensors_that_start_later():
    pipeline = "grad | gravity(0.05, 0.8, seed=9, lr=0.5)"

    def make():
        ps = T.make_params()
        return ps, gradpipe.Optimizer(ps, pipeline, backend="eager", lr=1.0)

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = None if g is None else torch.tensor(g)
        before = [p.detach().clone() for p in ps]
        opt.step()
        return [(b - p.detach()).numpy() for b, p in zip(before, ps)]

    ps, opt = make()
    for gs in T.GRADS[:2]:  # only the first tensor has a gradient: the second draws nothing yet
        step(opt, ps, [gs[0], None])
    saved = T.deepcopy_state(opt.state_dict())
    assert "main/gravity" in saved["gradpipe"]["node_state"]

    ps2, fresh = make()
    for p, q in zip(ps2, ps):
        p.data.copy_(q.data)
    fresh.load_state_dict(saved)
    for gs in T.GRADS[2:]:
        a = step(opt, ps, gs)
        b = step(fresh, ps2, gs)
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    assert torch.equal(opt.state[ps[1]]["main/gravity.v"], fresh.state[ps2[1]]["main/gravity.v"])


def test_gravity_is_never_merged_by_cse():
    prog = gradpipe.compile("let g = grad | clip_norm(1)\ng | add((g | gravity)) | add((g | gravity))")
    nodes = [n for n, d in prog.graph.nodes(data=True) if d.get("op") == "gravity"]
    assert len(nodes) == 2
    assert prog.merged == []


# ------------------------------------------------------------------------ normalize
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_normalize_gives_unit_norm_and_keeps_zero(scope):
    ups = _updates(T.run_pipeline_params(f"grad | normalize(0, scope={scope})", T.GRADS[:3],
                                         [np.zeros(s) for s in T.SHAPES]))
    for us in ups:
        if scope == "global":
            assert abs(sum(float(np.sum(u * u)) for u in us) - 1) < 1e-12
        else:
            assert all(abs(float(np.sum(u * u)) - 1) < 1e-12 for u in us)
    zero = [np.zeros(s) for s in T.SHAPES]
    T.assert_exact_updates(T.run_pipeline_params(f"grad | normalize(0, scope={scope})", [zero]), [zero])


# ------------------------------------------------------------------------ centralize
def test_centralize_subtracts_the_mean_over_all_dims_but_the_first():
    rs = np.random.RandomState(0)
    shapes = ((4, 3, 2), (2, 3, 2, 2), (6,))
    g = [rs.randn(*s) for s in shapes]
    steps = T.run_pipeline_params("grad | centralize", [g], [np.zeros(s) for s in shapes])
    [us] = _updates(steps)
    for u, x in zip(us[:2], g[:2]):
        axes = tuple(range(1, x.ndim))
        assert np.allclose(u.mean(axis=axes), 0, atol=1e-15)
        _close(u, x - x.mean(axis=axes, keepdims=True))
    T.assert_exact_updates(steps[:1], [[us[0], us[1], g[2]]])  # the vector passes through bit-exactly


# ------------------------------------------------------------------------ agc
def test_agc_hand_values():
    params0 = [np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]), np.array([3.0, 4.0])]
    g = [np.array([[6.0, 8.0], [1.0, 0.0], [0.0, 0.0]]), np.array([0.3, 0.4])]
    [us] = _updates(T.run_pipeline_params("grad | agc(0.1, 1e-3)", [g], params0))
    # row 0: max = 0.1 * 5 = 0.5, ||g|| = 10 -> scaled by 0.05; row 1: max = 0.1 * max(0, 1e-3) = 1e-4,
    # ||g|| = 1 -> scaled by 1e-4; row 2: zero gradient stays zero; vector: ||g|| = 0.5 = max -> unchanged
    _close(us[0], [[0.3, 0.4], [1e-4, 0.0], [0.0, 0.0]])
    _close(us[1], [0.3, 0.4])
    [us] = _updates(T.run_pipeline_params("grad | agc(0.01)", [g], params0))
    _close(us[1], [0.03, 0.04])  # whole-vector norm: 0.5 > 0.01 * 5


# ------------------------------------------------------------------------ trust_ratio
def test_trust_ratio_hand_values():
    params0 = [np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([3.0, 4.0, 0.0])]
    g = [np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([0.6, 0.8, 0.0])]
    [us] = _updates(T.run_pipeline_params("grad | trust_ratio", [g], params0))
    _close(us[0], g[0])  # ||theta|| = ||g|| = 5
    _close(us[1], [3.0, 4.0, 0.0])  # 5 / 1
    [us] = _updates(T.run_pipeline_params("grad | trust_ratio(eps=1)", [g], params0))
    _close(us[1], [1.5, 2.0, 0.0])  # 5 / (1 + 1)
    # a zero parameter or a zero input: ratio 1
    zero_p = [np.zeros((2, 2)), np.zeros(3)]
    T.assert_exact_updates(T.run_pipeline_params("grad | trust_ratio", [g], zero_p), [g])
    zero_g = [np.zeros((2, 2)), np.zeros(3)]
    T.assert_exact_updates(T.run_pipeline_params("grad | trust_ratio", [zero_g], params0), [zero_g])


# ------------------------------------------------------------------------ classp
def test_classp_elementwise_mask_and_accumulator():
    threshold, eps = 0.25, 1e-5
    g = [np.array([[1.0, -0.4, 0.6, 0.0]] * 3), np.array([2.0, 0.5, -0.5, 0.1, -3.0])]
    params = T.make_params()
    opt = gradpipe.Optimizer(params, f"grad | classp({threshold}, {eps})", backend="eager", lr=1.0)
    s = [np.zeros(x.shape) for x in g]
    for _ in range(3):
        [us] = T.run_optimizer(opt, params, [g])
        for i, (u, x) in enumerate(zip(us, g)):
            mask = x * x > threshold
            s[i] = s[i] + np.where(mask, np.abs(x), 0.0)
            assert np.all(u[~mask] == 0), "below the threshold: no update"
            _close(u[mask], (x / (s[i] + eps))[mask])
            # the accumulator grows only where the update went through
            np.testing.assert_array_equal(opt.state[params[i]]["main/classp.s"].numpy(), s[i])


def test_classp_tensor_mode_reproduces_the_reference_code_test():
    small = [np.full(s, 1e-3) for s in T.SHAPES]  # every x^2 is far below 0.5
    [us] = _updates(T.run_pipeline_params("grad | classp", [small]))
    assert all(np.all(u == 0) for u in us), "elementwise: nothing passes"
    [us] = _updates(T.run_pipeline_params("grad | classp(threshold_mode=tensor)", [small]))
    for u, x in zip(us, small):  # (grad**2).any() is True and True > 0.5: updated in full
        _close(u, x / (np.abs(x) + 1e-5))
    big = [np.full(s, 100.0) for s in T.SHAPES]
    T.assert_exact_updates(T.run_pipeline_params("grad | classp(1, threshold_mode=tensor)", [big]),
                           [[np.zeros(s) for s in T.SHAPES]])  # True > 1 is False: never updates
    zero = [np.zeros(s) for s in T.SHAPES]
    T.assert_exact_updates(T.run_pipeline_params("grad | classp(0, threshold_mode=tensor)", [zero]), [zero])


# ------------------------------------------------------------------------ aegd
def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64) + 0.1
    model = torch.nn.Linear(5, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=gen, dtype=torch.float64))
        model.bias.zero_()
    return model, x, y


def test_aegd_energy_never_increases_and_the_step_is_2_lr_r_v():
    lr, c = 0.1, 1.0
    model, x, y = _regression()
    opt = gradpipe.Optimizer(model.parameters(), "grad | aegd(loss, lr)", lr=lr)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        return loss

    params = list(model.parameters())
    prev_r = None
    losses = []
    for t in range(30):
        before = [p.detach().clone() for p in params]
        loss = float(opt.step(closure).detach())
        losses.append(loss)
        rs = [opt.state[p]["main/aegd.r"].clone() for p in params]
        if prev_r is None:  # r_1 = r_0 / (1 + 2 lr v^2) <= r_0 = sqrt(f_1 + c)
            assert all(bool((r <= math.sqrt(loss + c)).all()) for r in rs)
        else:
            assert all(bool((r <= r0).all()) for r, r0 in zip(rs, prev_r)), f"energy increased at step {t + 1}"
        for p, b, r in zip(params, before, rs):
            v = p.grad / (2 * math.sqrt(loss + c))
            torch.testing.assert_close(b - p.detach(), lr * 2 * r * v, rtol=1e-10, atol=1e-14)
        prev_r = rs
    assert losses[-1] < 0.1 * losses[0]


def test_aegd_needs_f_plus_c_positive_and_a_loss():
    model, x, y = _regression()

    def closure():
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        return loss

    opt = gradpipe.Optimizer(model.parameters(), "grad | aegd(loss, lr, c=-1e6)", lr=0.1)
    with pytest.raises(ValueError, match="f \\+ c > 0"):
        opt.step(closure)
    opt = gradpipe.Optimizer(model.parameters(), "grad | aegd(loss, lr)", lr=0.1)
    closure()
    with pytest.raises(ValueError, match="loss"):
        opt.step()
    with pytest.raises(gradpipe.GradError, match="needs argument 'f'"):
        gradpipe.compile("grad | aegd")


# ------------------------------------------------------------------------ the built-ins train
@pytest.mark.parametrize("name", ["grams", "diffgrad"])
def test_builtin_pipeline_trains_digits(name):
    from gradpipe.tasks.digits import train

    # lr 1e-2: at the pipelines' default 1e-3, 100 steps halve neither loss reliably
    result = train(lambda m: gradpipe.Optimizer(m.named_parameters(), name, lr=1e-2), steps=100)
    assert math.isfinite(result.final_loss)
    assert result.final_loss < 0.5 * result.initial_loss
