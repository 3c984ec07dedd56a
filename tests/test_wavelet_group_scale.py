"""The wrappers ``wavelet`` (GWT) and ``group_scale`` (SGG), as a user sees them.

* GWT: the notes' test vectors of the reference code (zqOuO/GWT with ptwt's Haar,
  Hugging Face epsilon 1e-6 reproduced exactly with ``adam(eps = 1e-6 / sqrt(1 - b2^step))``,
  and with torch's epsilon within its documented difference): level-2 coefficients, a
  level-1 single step, three steps with the limiter on and off, an odd length at level 2;
  the closed form of the first step at eps = 0; the Haar transform round-trips
  (hypothesis); the op follows the NumPy reference stepper ``ref_wavelet_sgg``; the state
  lives at the approximation's shape, which ``Program.state_numel`` and ``explain()`` report.
* SGG: the notes' scale table (fixed labels) through the op; the k-means has sorted
  centres and assigns every entry to its nearest centre (hypothesis); the op follows
  the reference stepper.
* Both: a checkpoint taken mid-run through ``torch.save``/``torch.load(weights_only=True)``
  continues bit for bit; an inner pipeline without what the wrapper reads is a GradError;
  the shipped pipelines train the digits task.

Gradients are set on ``p.grad`` and the update is read back as ``p_before - p_after``
(lr = 1, float64), as in ``op_table``.
"""

from __future__ import annotations

import io
import math
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import op_table as T
import ref_wavelet_sgg as R

import gradpipe
from gradpipe.compiler.explain import EXAMPLE_SHAPES
from gradpipe.compiler.ops.group_scale import GroupScale, kmeans_1d
from gradpipe.compiler.ops.wavelet import approx_length, haar_forward, haar_inverse

PIPELINES = pathlib.Path(__file__).resolve().parent.parent / "pipelines"
#: the reference's Hugging Face epsilon 1e-6, written in torch's placement for every step
HF_EPS = "1e-6 / (1 - 0.999 ** step) ** 0.5"


def _updates(pipeline, grads, **hyperparams):
    """Step a fresh optimizer (lr = 1, float64 parameters at zero) once per entry of ``grads``
    (lists of arrays, one per tensor); the updates u = p_before - p_after per step."""
    params = T.make_params([np.zeros(np.shape(g)) for g in grads[0]])
    opt = gradpipe.Optimizer(params, pipeline, lr=1.0, **hyperparams)
    return T.run_optimizer(opt, params, grads)


def _delta(pipeline, rows):
    """The notes' convention: Delta theta = -u, for a single 2-D tensor fed ``rows`` per step."""
    return [-us[0] for us in _updates(pipeline, [[np.array(r, dtype=np.float64)] for r in rows])]


# ==================================================================== GWT: the notes' vectors
G_SEQ = [[[3.0, 1, -2, 4]], [[1.0, 1, 4, 0]], [[-2.0, 6, 1, 1]]]
L1_STEP1 = [[-1.060648, 0.707099, 5.126410, -5.479955]]
L1_ON = [[[-0.130529, -0.130529, -1.067217, 0.796918]], [[0.914155, -1.147074, -0.113917, -0.113917]]]
L1_OFF = [[[-0.164786, -0.164786, -1.347310, 1.006070]], [[1.336212, -1.676668, -0.166511, -0.166511]]]
L2_ODD = [[0.624996, 0.124999, -0.374998, -0.874994, -3.874951]]


def test_gwt_level2_coefficients_of_the_notes():
    g = torch.tensor([[1.0, 2, 3, 4, 5, 6], [0.5, -1, 2, 0, -3, 1]], dtype=torch.float64)
    a, ds, lens = haar_forward(g, 2)
    np.testing.assert_allclose(a.numpy(), [[5.0, 5.5], [0.75, -1.0]], atol=1e-12)
    np.testing.assert_allclose(ds[0].numpy(), [[-2.0, 5.5], [-1.25, -1.0]], atol=1e-12)
    np.testing.assert_allclose(ds[1].numpy(), [[-0.707107, -0.707107, -0.707107], [1.060660, 1.414214, -2.828427]],
                               atol=1e-6)
    assert lens == [3, 6]  # 6 -> 3 (odd, padded) -> 2
    a5, ds5, _ = haar_forward(torch.tensor([[1.0, 2, 3, 4, 5]], dtype=torch.float64), 2)
    np.testing.assert_allclose(a5.numpy(), [[5.0, 2.5]], atol=1e-12)
    np.testing.assert_allclose(ds5[0].numpy(), [[-2.0, 2.5]], atol=1e-12)
    np.testing.assert_allclose(ds5[1].numpy(), [[-0.707107, -0.707107, 3.535534]], atol=1e-6)


@pytest.mark.parametrize("limiter", [1.01, 0.0], ids=["limiter_on", "limiter_off"])
def test_gwt_reproduces_the_reference_vectors_with_its_epsilon(limiter):
    # the reference's constant HF epsilon 1e-6 is adam(eps = 1e-6 / sqrt(1 - b2^t)) exactly
    pipe = f"grad | wavelet(levels=1, scale=0.25, limiter={limiter}) {{ adam(eps={HF_EPS}) }}"
    got = _delta(pipe, G_SEQ)
    want = [L1_STEP1] + (L1_ON if limiter else L1_OFF)
    for t, (g, w) in enumerate(zip(got, want), start=1):
        np.testing.assert_allclose(g, w, atol=2e-6, err_msg=f"step {t}")
    # and the same as the NumPy reference stepper in the reference's own (HF) form, to rounding
    ref = R.ref_wavelet_adam(1, 0.25, limiter, eps=1e-6, hf_eps=True)
    for t, (g, gs) in enumerate(zip(got, G_SEQ), start=1):
        np.testing.assert_allclose(g, -ref(t, [np.array(gs)], None)[0], rtol=1e-12, atol=1e-12)
    # torch's constant eps (1e-6 added to sqrt(v_hat)) differs from HF's by O(eps / sqrt(v_hat))
    plain = _delta(f"grad | wavelet(levels=1, scale=0.25, limiter={limiter}) {{ adam(eps=1e-6) }}", G_SEQ)
    for g, w in zip(plain, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_gwt_level2_odd_length_single_step():
    got = _delta(f"grad | wavelet(levels=2, scale=0.25, limiter=0) {{ adam(eps={HF_EPS}) }}", [[[1.0, 2, 3, 4, 5]]])
    np.testing.assert_allclose(got[0], L2_ODD, atol=2e-6)
    # the default limiter does nothing on the first step
    same = _delta(f"grad | wavelet(levels=2) {{ adam(eps={HF_EPS}) }}", [[[1.0, 2, 3, 4, 5]]])
    np.testing.assert_array_equal(same[0], got[0])


def test_gwt_first_step_closed_form_at_eps_zero():
    # t = 1, eps = 0: Adam gives sign(A); the details D / d = D * c / sqrt(v) = 10 D / |A|
    # (the global step size carries 1 / (1 - b1) = 10), so with one level each pair is
    # alpha / sqrt 2 * (sign A +- 10 D / |A|)
    g = np.array([[3.0, 1, -2, 4, 0.5, -1.5]])
    [[u]] = _updates("grad | wavelet(levels=1, scale=0.5) { adam(eps=0) }", [[g]])
    a = (g[:, 0::2] + g[:, 1::2]) / math.sqrt(2)
    d = (g[:, 0::2] - g[:, 1::2]) / math.sqrt(2)
    want = np.empty_like(g)
    want[:, 0::2] = 0.5 / math.sqrt(2) * (np.sign(a) + 10 * d / np.abs(a))
    want[:, 1::2] = 0.5 / math.sqrt(2) * (np.sign(a) - 10 * d / np.abs(a))
    np.testing.assert_allclose(u, want, rtol=1e-12)


def test_gwt_near_zero_approximation_divides_details_by_eps():
    # documented pathology (faithful to the reference): the pair (-2, 2) has A = 0, D = -2.83,
    # so its details are divided by ~eps: about 1.6e5 with the reference's eps 1e-6
    [[u]] = _updates(f"grad | wavelet(levels=1) {{ adam(eps={HF_EPS}) }}", [[np.array([[-2.0, 2.0]])]])
    assert 1e5 < np.abs(u).max() < 1e6


# ==================================================================== GWT: transform, reference, state
_rows = st.integers(1, 3)
_length = st.integers(1, 17)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), levels=st.integers(1, 5))
def test_haar_round_trip_energy_and_numpy_reference(data, levels):
    shape = (data.draw(_rows), data.draw(_length))
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)))
    a, ds, lens = haar_forward(torch.from_numpy(x), levels)
    assert a.shape[-1] == approx_length(shape[-1], levels)
    back = haar_inverse(a, ds, lens).numpy()
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-9)
    # orthonormal, and zero padding adds no energy
    energy = float(np.sum(a.numpy() ** 2) + sum(np.sum(d.numpy() ** 2) for d in ds))
    assert math.isclose(energy, float(np.sum(x ** 2)), rel_tol=1e-10, abs_tol=1e-9)
    ra, rds, rlens = R.haar_dec(x, levels)
    assert rlens == lens
    np.testing.assert_allclose(a.numpy(), ra, rtol=1e-12, atol=1e-9)
    for d, rd in zip(ds, rds):
        np.testing.assert_allclose(d.numpy(), rd, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("pipe, ref", [
    ("grad | wavelet { adam }", lambda: R.ref_wavelet_adam()),
    ("grad | wavelet(levels=1, scale=0.5, limiter=0) { adam(0.8, 0.9, 1e-6) }",
     lambda: R.ref_wavelet_adam(1, 0.5, 0.0, 0.8, 0.9, 1e-6)),
    ("grad | wavelet(levels=3, scale=1, limiter=1.05) { adam(0.8, 0.95, 1e-3) }",
     lambda: R.ref_wavelet_adam(3, 1.0, 1.05, 0.8, 0.95, 1e-3)),
], ids=["defaults", "level1_no_limiter", "level3"])
def test_gwt_follows_the_reference_stepper(pipe, ref):
    # matrices (wide, tall), a 3-D tensor (transformed along its last axis) and a vector (plain Adam)
    ups = _updates(pipe, T.MATRIX_GRADS)
    step = ref()
    for t, (us, gs) in enumerate(zip(ups, T.MATRIX_GRADS), start=1):
        for u, w in zip(us, step(t, gs, None)):
            np.testing.assert_allclose(u, w, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")


def test_gwt_vectors_bypass_and_rms_denominator():
    vec = [[g[3]] for g in T.MATRIX_GRADS]
    ups = _updates("grad | wavelet(levels=2, scale=0.25) { adam }", vec)
    plain = _updates("grad | adam", vec)
    for us, ps in zip(ups, plain):
        np.testing.assert_array_equal(us[0], ps[0])  # no transform, no limiter, no scale
    # rms: u = x / (sqrt(v) + eps), so the details are D / (sqrt(v) + eps) of the parent
    g = np.array([[3.0, 1, -2, 4, 0.5]])
    [[u]] = _updates("grad | wavelet(levels=2, scale=0.5, limiter=0) { rms(0.9, 1e-6) }", [[g]])
    a, ds, lens = R.haar_dec(g, 2)
    den = np.sqrt(0.1 * a * a) + 1e-6
    want = 0.5 * R.haar_rec(a / den, [ds[0] / den, ds[1] / np.repeat(den, 2, axis=-1)[..., :3]], lens)
    np.testing.assert_allclose(u, want, rtol=1e-12)


def test_adam_denominator_divides_the_first_moment():
    prog = gradpipe.compile("grad | adam(0.8, 0.9, 1e-3)")
    p = torch.zeros(5, dtype=torch.float64)
    opt = gradpipe.Optimizer([p], prog, lr=1.0)
    adam = gradpipe.compiler.ops.OPS["adam"]
    args = SimpleNamespace(b1=0.8, b2=0.9, eps=1e-3)
    for t, g in enumerate(T.GRADS, start=1):
        before = p.clone()
        p.grad = torch.tensor(g[1])
        opt.step()
        st_ = {"m": opt.state[p]["main/adam.m"], "v": opt.state[p]["main/adam.v"]}
        torch.testing.assert_close(before - p, st_["m"] / adam.denominator(st_, args, t), rtol=1e-12, atol=1e-14)
        c = adam.step_factor(args, t)
        torch.testing.assert_close(before - p, c * st_["m"] / (st_["v"].sqrt() + 1e-3 * math.sqrt(1 - 0.9 ** t)),
                                   rtol=1e-12, atol=1e-14)


def test_gwt_state_lives_at_the_approximation_shape():
    params = T.make_params(T.MATRIX_PARAMS0)
    opt = gradpipe.Optimizer(params, "grad | wavelet(levels=2) { adam }", lr=1.0)
    T.run_optimizer(opt, params, T.MATRIX_GRADS[:2])
    # last axis 4 -> 2 -> 1, 3 -> 2 -> 1, 2 -> 1 -> 1; the vector bypasses
    expected = {(3, 4): (3, 1), (6, 3): (6, 1), (2, 3, 2): (2, 3, 1), (5,): (5,)}
    for p in params:
        st_ = opt.state[p]
        assert tuple(st_["main/wavelet/adam.m"].shape) == expected[tuple(p.shape)]
        assert ("main/wavelet.s" in st_) == (p.dim() >= 2)
        numel = sum(v.numel() for k, v in st_.items() if k != "step")
        assert numel == opt.program.state_numel("main", tuple(p.shape))
    off = gradpipe.compile("grad | wavelet(limiter=0) { adam }")
    assert off.node_buffers("main/wavelet") == []
    assert off.state_numel("main", (6, 3)) == 2 * 6 * 1


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_gwt_state_numel_and_explain_report_the_saving(levels):
    prog = gradpipe.compile(f"grad | wavelet(levels={levels}) {{ adam }}")
    n = 4096
    # Adam's m, v at n x n / 2^L, plus the limiter's one number
    assert prog.state_numel("main", (n, n)) == 2 * n * (n >> levels) + 1
    assert prog.state_numel("main", (4096, 11008)) == 2 * 4096 * approx_length(11008, levels) + 1
    assert prog.state_numel("main", (n,)) == 2 * n  # a vector: plain Adam
    assert prog.state_numel("main", (10, 5)) == 2 * 10 * approx_length(5, levels) + 1  # odd: ceil per level
    text = prog.explain()
    for shape in EXAMPLE_SHAPES:
        per_param = 4 * prog.state_numel("main", shape) / math.prod(shape)
        assert f"state for a {'x'.join(map(str, shape))} " in text
        assert f"{per_param:.3g} bytes per parameter in fp32" in text
    assert f"state for a 4096x4096 matrix: {8 / 2 ** levels:.3g} bytes per parameter in fp32" in text


def test_gwt_without_a_denominator_is_a_grad_error():
    with pytest.raises(gradpipe.GradError, match="denominator") as info:
        gradpipe.compile("grad | wavelet { sign }")
    assert (info.value.line, info.value.column) == (1, 18)  # at the block, when the pipeline compiles


# ==================================================================== SGG
M_ABS = np.array([1e-3, 1.2e-3, 0.8e-3, 1e-2, 1.1e-2, 0.9e-2, 1e-1, 1.2e-1, 0.8e-1])
#: the notes' table: (d_mu, d_s) -> (mu, s) after the first re-grouping, labels [0,0,0,1,1,1,2,2,2]
SGG_TABLE = {
    (0.999, 0.999): ([0.999001, 0.999010, 0.999100], [0.999037, 0.999037, 0.999037]),
    (0.95, 0.9): ([0.950050, 0.950500, 0.955000], [0.903895, 0.903893, 0.903874]),
    (0.0, 0.0): ([0.001, 0.01, 0.1], [10.0, 3.7, 0.37]),
}


@pytest.mark.parametrize("decays", list(SGG_TABLE), ids=["class", "trainer", "no_ema"])
def test_sgg_scale_maths_matches_the_notes_table(decays):
    dm, ds = decays
    mu, s = SGG_TABLE[decays]
    labels = np.repeat([0, 1, 2], 3)
    # the reference's maths given the labels
    rmu, rs = R.sgg_rescale(M_ABS, labels, np.ones(3), np.ones(3), dm, ds, 0.1, 10.0)
    np.testing.assert_allclose(rmu, mu, rtol=1e-5)
    np.testing.assert_allclose(rs, s, rtol=1e-5)
    # the op: at t = 1 Adam (eps = 0) gives sign(g) = 1 and m = 0.1 g = |m|; the k-means finds
    # the three decades, so the update is s[label]
    g = M_ABS / 0.1
    pipe = f"grad | group_scale(k=3, interval=1, decay_means={dm}, decay_scale={ds}) {{ adam(eps=0) }}"
    params = T.make_params([np.zeros(9)])
    opt = gradpipe.Optimizer(params, pipe, lr=1.0)
    [[u]] = T.run_optimizer(opt, params, [[g]])
    st_ = opt.state[params[0]]
    np.testing.assert_array_equal(st_["main/group_scale.labels"].numpy(), labels)
    assert st_["main/group_scale.labels"].dtype == torch.int16
    np.testing.assert_allclose(st_["main/group_scale.means"].numpy(), mu, rtol=1e-5)
    np.testing.assert_allclose(st_["main/group_scale.scales"].numpy(), s, rtol=1e-5)
    np.testing.assert_allclose(u, np.repeat(s, 3), rtol=1e-5)


def test_sgg_recluster_with_given_labels_is_the_reference_maths():
    # the op's update of mu and s for the labels its k-means gives, against sgg_rescale
    rs = np.random.RandomState(3)
    x = np.abs(rs.randn(4, 7)) * np.array([1e-3, 1e-2, 1e-1, 1.0])[:, None]
    a = SimpleNamespace(decay_means=0.7, decay_scale=0.6, low=0.2, high=5.0)
    state = {"labels": torch.zeros(x.shape, dtype=torch.int16), "means": torch.tensor([1.0, 0.5, 2.0, 0.1]).double(),
             "scales": torch.tensor([1.0, 2.0, 0.5, 1.0]).double()}
    mu0, s0 = state["means"].numpy().copy(), state["scales"].numpy().copy()
    GroupScale._recluster(torch.from_numpy(x), state, a, 4)
    labels = state["labels"].numpy()
    _, want_labels = kmeans_1d(torch.from_numpy(x), 4)
    np.testing.assert_array_equal(labels, want_labels.numpy())
    mu, s = R.sgg_rescale(x, labels, mu0, s0, 0.7, 0.6, 0.2, 5.0)
    np.testing.assert_allclose(state["means"].numpy(), mu, rtol=1e-13)
    np.testing.assert_allclose(state["scales"].numpy(), s, rtol=1e-13)


_values = hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0, 10, allow_nan=False, width=64))


# derandomized: a search can build values that sit exactly half-way between two centres after
# one of the means rounds differently in torch (summing sorted values) and NumPy (the values in
# their order); the two then split that run of equal values differently, both correctly
@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(x=_values, k=st.integers(1, 5))
def test_kmeans_centres_sorted_and_labels_nearest(x, k):
    centres, labels = kmeans_1d(torch.from_numpy(x), k)
    c = centres.numpy()
    lab = labels.numpy()
    assert c.shape == (k,) and lab.shape == x.shape and labels.dtype == torch.int64
    assert np.all(np.diff(c) >= 0)
    assert lab.min() >= 0 and lab.max() < k
    # every entry is at its nearest centre (ties: either)
    dist = np.abs(x[:, None] - c[None, :])
    assert np.all(dist[np.arange(x.size), lab] <= dist.min(axis=1) + 1e-12)
    # the centres are the NumPy reference's (same start, same Lloyd iterations)
    rc, _ = R.kmeans_1d_np(x, k)
    np.testing.assert_allclose(c, rc, rtol=1e-12, atol=1e-12)


def test_kmeans_separates_decades_whatever_the_order():
    perm = np.random.RandomState(0).permutation(9)
    centres, labels = kmeans_1d(torch.from_numpy(M_ABS[perm]), 3)
    np.testing.assert_array_equal(labels.numpy(), np.repeat([0, 1, 2], 3)[perm])
    np.testing.assert_allclose(centres.numpy(), [1e-3, 1e-2, 1e-1], rtol=1e-12)


@pytest.mark.parametrize("pipe, ref", [
    ("grad | group_scale(k=2, interval=2, decay_means=0.5, decay_scale=0.3) { adam }",
     lambda: R.ref_group_scale_adam(2, 2, 0.5, 0.3)),
    ("grad | group_scale(k=3, interval=1, decay_means=0, decay_scale=0, low=0.5, high=2) { adam(0.8, 0.9, 1e-6) }",
     lambda: R.ref_group_scale_adam(3, 1, 0.0, 0.0, 0.5, 2.0, 0.8, 0.9, 1e-6)),
], ids=["k2_every2", "k3_no_ema_clipped"])
def test_sgg_follows_the_reference_stepper(pipe, ref):
    ups = _updates(pipe, T.MATRIX_GRADS)
    step = ref()
    for t, (us, gs) in enumerate(zip(ups, T.MATRIX_GRADS), start=1):
        for u, w in zip(us, step(t, gs, None)):
            np.testing.assert_allclose(u, w, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")


def test_sgg_state_and_missing_moment():
    params = T.make_params(T.MATRIX_PARAMS0)
    opt = gradpipe.Optimizer(params, "grad | group_scale(k=4, interval=2) { adam }", lr=1.0)
    T.run_optimizer(opt, params, T.MATRIX_GRADS[:2])
    for p in params:
        st_ = opt.state[p]
        assert tuple(st_["main/group_scale.labels"].shape) == tuple(p.shape)
        assert st_["main/group_scale.means"].shape == (4,) and st_["main/group_scale.scales"].shape == (4,)
        numel = sum(v.numel() for k, v in st_.items() if k != "step")
        assert numel == opt.program.state_numel("main", tuple(p.shape)) == 3 * p.numel() + 8
    with pytest.raises(gradpipe.GradError, match="first moment") as info:
        gradpipe.compile("grad | group_scale { sign }")
    assert (info.value.line, info.value.column) == (1, 22)


# ==================================================================== both: checkpoints, training
@pytest.mark.parametrize("pipe", [
    "grad | wavelet(levels=2, scale=0.25) { adam }",
    "grad | group_scale(k=3, interval=2, decay_means=0.5, decay_scale=0.5) { adam } | decay(0.01)",
], ids=["gwt", "sgg"])
def test_state_dict_round_trip_mid_run_continues_bitwise(pipe):
    grads = T.MATRIX_GRADS
    params = T.make_params(T.MATRIX_PARAMS0)
    opt = gradpipe.Optimizer(params, pipe, lr=0.5)
    T.run_optimizer(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twins = T.clone_params(params)
    resumed = gradpipe.Optimizer(twins, pipe, lr=0.5)
    resumed.load_state_dict(saved)
    first = T.run_optimizer_params(opt, params, grads[3:])
    second = T.run_optimizer_params(resumed, twins, grads[3:])
    for (_, a), (_, b) in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _src(name: str, **replace: str) -> str:
    text = (PIPELINES / f"{name}.grad").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("name, source", [
    ("gwt_adam", None),
    # a short interval, so the 150 steps re-group 15 times
    ("sgg_adamw", _src("sgg_adamw", **{"interval=500": "interval=10"})),
], ids=["gwt_adam", "sgg_adamw_interval10"])
def test_pipelines_train_digits(name, source):
    from gradpipe.tasks.digits import train
    pipe = name if source is None else gradpipe.compile(source)
    r = train(lambda m: gradpipe.Optimizer(m.named_parameters(), pipe, lr=1e-2), steps=150)
    assert r.final_loss < 0.5 * r.initial_loss, f"{name}: {r.initial_loss:.3f} -> {r.final_loss:.3f}"
