"""Tests for the tasks that separate optimizers (issue 16 item 4) and the ``holdout`` option.

A table of the new tasks (:data:`NEW`) drives the generic tests: registry
listing, determinism, representative pipelines through :func:`run_task`, and
Adam against a deliberately bad learning rate. Then the ``holdout`` option on
every built-in task, and checks of each synthetic task's known difficulty.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import gradpipe
from gradpipe.tasks import (
    CharLMTask,
    DigitsCNNTask,
    NoisyQuadraticTask,
    QuadraticTask,
    RosenbrockTask,
    TaskError,
    TinyLMTask,
    available_tasks,
    get_task,
    run_task,
    task_options,
)
from gradpipe.tasks import charlm as charlm_module
from gradpipe.tasks import digits as digits_module
from gradpipe.tasks.charlm import load_corpus, tune_mask, windows
from gradpipe.tasks.digits import _split_indices, _tune_indices, load_digits_holdout, load_digits_split
from gradpipe.tasks.synthetic import SplitPoint, nqm_sgd_expected_loss, quadratic_problem, rosenbrock, split_shapes


def pipe(source: str, **hp: Any):
    return lambda model: gradpipe.Optimizer(model.named_parameters(), source, backend="eager", **hp)


# name, class, options that keep a test run small, Adam's good lr, steps for the Adam-vs-bad-lr check
NEW = [
    ("digits-cnn", DigitsCNNTask, {"batch_size": 64}, 1e-2, 30),
    ("tinylm", TinyLMTask, {"batch_size": 8, "eval_windows": 32}, 3e-3, 15),
    ("quadratic", QuadraticTask, {"dim": 20, "condition": 100}, 1e-1, 100),
    ("rosenbrock", RosenbrockTask, {"dim": 6}, 2e-2, 100),
    ("noisy-quadratic", NoisyQuadraticTask, {"dim": 20}, 5e-2, 100),
]
NAMES = [row[0] for row in NEW]
ALL_BUILTINS = ["digits", "digits-multitask", "charlm", *NAMES]
DETERMINISTIC = {"quadratic", "rosenbrock"}  # no examples: no per-example gradients


def small(name: str, **options: Any):
    row = next(r for r in NEW if r[0] == name)
    return get_task(name, **{**row[2], **options})


def better(task, a: dict[str, float], b: dict[str, float]) -> bool:
    return a[task.metric] > b[task.metric] if task.higher_is_better else a[task.metric] < b[task.metric]


# ------------------------------------------------------------------ generic, driven by the table

@pytest.mark.parametrize("name, cls, options, lr, steps", NEW, ids=NAMES)
def test_registered_with_options(name: str, cls: type, options: dict, lr: float, steps: int) -> None:
    assert name in available_tasks()
    task = get_task(name, **options)
    assert type(task) is cls and task.name == name
    opts = task_options(name)
    assert opts["holdout"] == "val"
    assert task.options()["holdout"] == "val" and set(task.options()) == set(opts)
    model = task.make_model(0)
    assert task.metric in task.evaluate(model)
    # every task has a matrix, so matrix pipelines have something to act on
    assert any(p.ndim == 2 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_numbers_different_seed_different(name: str) -> None:
    task = small(name)
    rng = torch.get_rng_state()
    m1, m2, m3 = (list(task.make_model(s).parameters()) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(m1, m2)) and not all(torch.equal(p, q) for p, q in zip(m1, m3))
    a, b, c = (run_task(task, pipe("adam", lr=1e-2), steps=4, seed=s, eval_every=2) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.losses == b.losses and [e.metrics for e in a.evals] == [e.metrics for e in b.evals]
    assert a.losses != c.losses and a.metrics != c.metrics


@pytest.mark.parametrize("source, hp", [("adam", {"lr": 1e-3}), ("sgd", {"lr": 1e-3}), ("muon_adamw", {"lr": 1e-3}),
                                        ("sam_sgd", {"lr": 1e-3}), ("dp_sgd", {"lr": 1e-3, "sigma": 0.5})],
                         ids=["adam", "sgd", "muon_adamw", "sam_sgd", "dp_sgd"])
@pytest.mark.parametrize("name", NAMES)
def test_representative_pipelines(name: str, source: str, hp: dict) -> None:
    task = small(name)
    if source == "dp_sgd" and name in DETERMINISTIC:
        with pytest.raises(TaskError, match=rf"task '{name}' is a deterministic objective.*noisy-quadratic"):
            run_task(task, pipe(source, **hp), steps=2)
        return
    result = run_task(task, pipe(source, **hp), steps=2)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert math.isfinite(result.metrics[task.metric])


@pytest.mark.parametrize("name, cls, options, lr, steps", NEW, ids=NAMES)
def test_adam_beats_a_bad_learning_rate(name: str, cls: type, options: dict, lr: float, steps: int) -> None:
    task = get_task(name, **options)
    good = run_task(task, pipe("adam", lr=lr), steps=steps, eval_every=0)
    bad = run_task(task, pipe("adam", lr=1e-6), steps=steps, eval_every=0)
    assert better(task, good.metrics, bad.metrics)
    assert good.final_loss < bad.final_loss


@pytest.mark.parametrize("name", ["digits-cnn", "tinylm", "noisy-quadratic"])
def test_per_example_gradients_average_to_the_gradient(name: str) -> None:
    task = small(name)
    model = task.make_model(0)
    batch = next(iter(task.batches(0, 1)))
    per = task.sample_grads(model, batch)
    loss = task.losses(model, batch)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        assert per[n].shape[1:] == p.shape
        torch.testing.assert_close(per[n].mean(0), g, rtol=1e-4, atol=1e-6)


def test_tinylm_attention_is_causal() -> None:
    model = TinyLMTask().make_model(0)
    x = torch.randint(0, load_corpus().vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % load_corpus().vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)  # no position sees a later one
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_model_shapes_and_option_errors() -> None:
    cnn = DigitsCNNTask().make_model(0)
    assert [tuple(p.shape) for p in cnn.parameters()] == [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 512), (10,)]
    assert cnn(torch.zeros(3, 64)).shape == (3, 10)
    lm = TinyLMTask().make_model(0)
    assert lm(torch.zeros(2, 32, dtype=torch.int64)).shape == (2, 32, load_corpus().vocab_size)
    assert 100_000 < sum(p.numel() for p in lm.parameters()) < 130_000
    for dim, shapes in [(4, ((1, 2), (1,), (1,))), (20, ((2, 4), (11,), (1,))), (100, ((5, 10), (49,), (1,)))]:
        assert split_shapes(dim) == shapes
    x = torch.arange(20.0)
    point = SplitPoint(x)
    assert torch.equal(point.flat(), x) and torch.equal(point.split(x)["matrix"], point.matrix)
    for spec, options, message in [
        ("tinylm", {"heads": 3}, "heads must divide d_model 64, got 3"),
        ("quadratic", {"dim": 3}, "dim must be at least 4"),
        ("quadratic", {"condition": 0.5}, "condition must be finite and at least 1.0"),
        ("noisy-quadratic", {"batch_size": 0}, "batch_size must be at least 1"),
        ("digits-cnn", {"channels": "wide"}, "channels must be an integer"),
    ]:
        with pytest.raises(TaskError, match=message):
            get_task(spec, **options)


# ------------------------------------------------------------------ the holdout option

@pytest.mark.parametrize("name", ALL_BUILTINS)
def test_holdout_bad_value_is_a_one_line_task_error(name: str) -> None:
    for bad in ("test", "", None, 1):
        with pytest.raises(TaskError) as info:
            get_task(name, holdout=bad)
        message = str(info.value)
        assert "\n" not in message and "'val'" in message and "'tune'" in message and f"task {name!r}" in message
    assert get_task(name, holdout="tune").holdout == "tune"


@pytest.mark.parametrize("name", ALL_BUILTINS)
def test_holdout_tune_reports_the_same_metric_names(name: str) -> None:
    val = small(name) if name in NAMES else get_task(name)
    tune = small(name, holdout="tune") if name in NAMES else get_task(name, holdout="tune")
    model = val.make_model(3)
    m_val, m_tune = val.evaluate(model), tune.evaluate(model)
    assert set(m_val) == set(m_tune)
    if name in ("quadratic", "rosenbrock", "noisy-quadratic"):
        assert m_val == m_tune  # no data: the same objective
    else:
        assert m_val != m_tune  # another part of the data


def test_digits_tune_split_is_a_seeded_fifth_of_the_training_split() -> None:
    for seed in (0, 5):
        train_idx, val_idx = _split_indices(seed, 0.2)
        fit, tune = _tune_indices(seed)
        assert len(fit) == 1149 and len(tune) == 288
        assert set(fit).isdisjoint(tune) and set(fit) | set(tune) == set(range(len(train_idx)))
        d = load_digits_holdout(seed, "tune")
        full = load_digits_split(seed)
        assert torch.equal(d.x_train, full.x_train[torch.tensor(fit)])
        assert torch.equal(d.y_val, full.y_train[torch.tensor(tune)])
        assert torch.bincount(d.y_val, minlength=10).min() >= 25  # stratified
    assert list(_tune_indices(0)[1]) != list(_tune_indices(5)[1])
    val, before = load_digits_holdout(0, "val"), load_digits_split(0)
    assert all(torch.equal(getattr(val, f), getattr(before, f)) for f in ("x_train", "y_train", "x_val", "y_val"))


def _dataset_indices(x: torch.Tensor) -> set[int]:
    """The dataset indices of the images ``x`` (the 1797 digits images are distinct rows)."""
    raw, _ = digits_module._raw_digits()
    where = {row.tobytes(): i for i, row in enumerate(raw.astype("float32"))}
    return {where[row.tobytes()] for row in x.numpy()}


@pytest.mark.parametrize("name", ["digits", "digits-multitask", "digits-cnn"])
def test_digits_tune_with_reserve_never_reads_the_reporting_seeds_validation_images(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split is re-drawn per seed: without ``reserve`` a tuning seed trains and chooses on images
    that seeds 0, 1 and 2 validate on; with ``reserve=(0, 1, 2)`` on none of them."""
    reserved = set().union(*(set(_split_indices(s, 0.2)[1].tolist()) for s in (0, 1, 2)))
    seen: list[Any] = []
    real = digits_module.load_digits_holdout

    def spy(*args: Any, **kwargs: Any):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr("gradpipe.tasks.digits_task.load_digits_holdout", spy)
    for reserve, overlaps in (((), True), ((0, 1, 2), False)):
        seen.clear()
        task = get_task(name, holdout="tune", reserve=reserve, batch_size=64)
        task.batches(10000, 1)
        task.evaluate(task.make_model(10000))
        (train, _), (_, val) = [(_dataset_indices(d.x_train), _dataset_indices(d.x_val)) for d in seen]
        assert train.isdisjoint(val) and len(train) + len(val) == (1437 if not reserve else 732)
        assert (not train.isdisjoint(reserved)) is overlaps and (not val.isdisjoint(reserved)) is overlaps
    # the seeded, stratified fifth of what is left
    train_idx, _ = _split_indices(10000, 0.2)
    fit, tune = _tune_indices(10000, (0, 1, 2))
    assert len(fit) == 585 and len(tune) == 147
    assert reserved.isdisjoint(train_idx[fit]) and reserved.isdisjoint(train_idx[tune])
    assert torch.bincount(torch.tensor(digits_module._raw_digits()[1][train_idx[tune]]), minlength=10).min() >= 12


@pytest.mark.parametrize("name", ["digits", "digits-multitask", "digits-cnn"])
def test_digits_reserve_is_checked_in_one_line(name: str) -> None:
    assert get_task(name, holdout="tune", reserve=[2, "0", 2]).options()["reserve"] == (0, 2)
    assert get_task(name, holdout="tune", reserve="0,1").reserve == (0, 1)
    assert get_task(name).reserve == ()
    for options, needle in (({"holdout": "tune", "reserve": 1}, "must be seeds"),
                            ({"holdout": "tune", "reserve": (0, -1)}, "must be seeds"),
                            ({"holdout": "tune", "reserve": (0.5,)}, "must be seeds"),
                            ({"reserve": (0,)}, "needs holdout='tune'")):
        with pytest.raises(TaskError, match=needle) as info:
            get_task(name, **options)
        assert "\n" not in str(info.value) and f"task {name!r}" in str(info.value)
    task = get_task(name, holdout="tune", reserve=tuple(range(40)), batch_size=1)
    with pytest.raises(TaskError, match=r"too few to hold out a stratified fifth$"):
        task.batches(10000, 1)


@pytest.mark.parametrize("name", ["digits", "digits-multitask", "digits-cnn"])
def test_digits_tune_never_reads_the_validation_split(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_val(*args: Any, **kwargs: Any):
        raise AssertionError("the validation split was read")

    monkeypatch.setattr(digits_module, "load_digits_split", no_val)
    task = get_task(name, holdout="tune", batch_size=64)
    result = run_task(task, pipe("adam", lr=1e-2), steps=3, eval_every=0)
    assert task.metric in result.metrics
    with pytest.raises(AssertionError, match="validation split was read"):
        run_task(get_task(name, batch_size=64), pipe("adam", lr=1e-2), steps=3, eval_every=0)


@pytest.mark.parametrize("cls", [CharLMTask, TinyLMTask])
def test_text_tune_never_reads_the_validation_text(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus()
    # validation ids of -1: an embedding lookup of any of them raises
    poisoned = type(corpus)(chars=corpus.chars, train=corpus.train, val=torch.full_like(corpus.val, -1),
                            modules=corpus.modules)
    monkeypatch.setattr(charlm_module, "load_corpus", lambda: poisoned)
    tune = cls(batch_size=8, eval_windows=32, holdout="tune")
    result = run_task(tune, pipe("adam", lr=1e-3), steps=2, eval_every=0)
    assert math.isfinite(result.metrics["val_loss"])
    with pytest.raises(IndexError):
        run_task(cls(batch_size=8, eval_windows=32), pipe("adam", lr=1e-3), steps=2, eval_every=0)


@pytest.mark.parametrize("cls", [CharLMTask, TinyLMTask])
def test_text_tune_trains_and_evaluates_on_disjoint_text(cls: type) -> None:
    task = cls(batch_size=64, context=16, eval_windows=4096, holdout="tune")
    seen: list[torch.Tensor] = []
    pair = task.pair
    task.pair = lambda ids, positions: (seen.append(positions), pair(ids, positions))[1]  # type: ignore[method-assign]
    train = load_corpus().train
    for seed in (0, 1):
        held = tune_mask(train.numel(), seed)
        assert abs(float(held.double().mean()) - 0.2) < 0.01
        # every training window (its context and targets) lies in the kept text, every scored one in the held-out
        seen.clear()
        x, y = next(iter(task.batches(seed, 1)))
        assert torch.equal(x, pair(train, seen[0])[0]) and torch.equal(y, pair(train, seen[0])[1])
        list(task.batches(seed, 30))
        assert not bool(held[_covered(seen, 16)].any())
        seen.clear()
        task.eval_set(seed)
        assert len(seen[0]) == 4096 and bool(held[_covered(seen, 16)].all())
    assert not torch.equal(tune_mask(train.numel(), 0), tune_mask(train.numel(), 1))


def _covered(ends: list[torch.Tensor], context: int) -> torch.Tensor:
    """The text positions under the windows that end at ``ends``: ``p - context .. p``."""
    p = torch.cat(ends)
    return (p.unsqueeze(1) + torch.arange(-context, 1)).flatten()


def test_charlm_val_is_unchanged() -> None:
    """holdout='val' draws the same batches and scores the same windows as before the option existed."""
    task = CharLMTask(holdout="val")
    corpus = load_corpus()
    gen = torch.Generator().manual_seed(0xE7A1_5EED)
    pos = torch.randperm(corpus.val.numel() - 32, generator=gen)[:2048].sort().values + 32
    x, y = task.eval_set(seed=7)
    assert torch.equal(x, windows(corpus.val, pos, 32)[0]) and torch.equal(y, corpus.val[pos])
    gen = torch.Generator().manual_seed(3 + 0xC4A2_1B7E)
    first = windows(corpus.train, torch.randint(32, corpus.train.numel(), (64,), generator=gen), 32)
    got = next(iter(task.batches(3, 1)))
    assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])


# ------------------------------------------------------------------ known difficulty

def test_quadratic_gradient_descent_converges_at_the_rate_the_condition_number_predicts() -> None:
    """GD with step 1/L = 1: f(x_t) = 1/2 sum_i lambda_i (1 - lambda_i)^(2t) c_i^2 with c = Q^T (x_0 - x*),
    bounded by (1 - 1/kappa)^(2t) f(x_0), and once the slowest mode dominates f shrinks by (1 - 1/kappa)^2
    a step. (Step counts keep f far above float32's floor.)"""
    for dim, kappa, steps in [(5, 10.0, 60), (20, 100.0, 200)]:
        task = QuadraticTask(dim=dim, condition=kappa)
        eig, q, xstar = quadratic_problem(dim, kappa, 0)
        assert float(eig.min()) == pytest.approx(1 / kappa) and float(eig.max()) == pytest.approx(1.0)
        torch.testing.assert_close(eig.log().diff(), torch.full((dim - 1,), math.log(kappa) / (dim - 1),
                                                                 dtype=torch.float64))  # log-spaced
        assert float(torch.linalg.cond((q * eig) @ q.T)) == pytest.approx(kappa, rel=1e-6)
        losses = run_task(task, pipe("sgd", lr=1.0), steps=steps, eval_every=0).losses
        c = q.T @ (task.initial_point(0).double() - xstar)
        t = torch.arange(steps, dtype=torch.float64)
        predicted = 0.5 * (eig * (1 - eig) ** (2 * t.unsqueeze(1)) * c ** 2).sum(1)
        torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), predicted, rtol=1e-3, atol=0.0)
        bound = (1 - 1 / kappa) ** (2 * t) * losses[0]
        assert all(f <= b * (1 + 1e-4) for f, b in zip(losses, bound.tolist()))
        assert losses[-1] / losses[-2] == pytest.approx((1 - 1 / kappa) ** 2, rel=1e-3 if kappa == 10 else 2e-2)


def test_rosenbrock_minimum_and_known_values() -> None:
    assert float(rosenbrock(torch.tensor([-1.2, 1.0]))) == pytest.approx(24.2)
    assert float(rosenbrock(torch.tensor([-1.2, 1.0, -1.2, 1.0]))) == pytest.approx(532.4)
    task = RosenbrockTask(dim=6)
    model = task.make_model(0)
    x0 = model.flat().detach()
    assert torch.allclose(x0, torch.tensor([-1.2, 1.0] * 3), atol=0.5)  # the classic start, perturbed
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    assert task.evaluate(model) == {"suboptimality": 0.0, "distance": 0.0}
    loss = task.losses(model, ())["loss"]
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(loss, list(model.parameters())))


def test_noisy_quadratic_noise_has_covariance_h_over_b() -> None:
    task = NoisyQuadraticTask(dim=8, batch_size=20_000)
    model = task.make_model(0)
    per = task.sample_grads(model, next(iter(task.batches(0, 1))))
    flat = torch.cat([per[n].reshape(20_000, -1) for n in ("matrix", "vector", "scalar")], dim=1)
    cov = torch.cov(flat.T.double())
    torch.testing.assert_close(cov, torch.diag(task.curvature.double()), atol=0.03, rtol=0.0)
    mean = flat.double().mean(0)
    torch.testing.assert_close(mean, (task.curvature * model.flat()).double().detach(), atol=0.03, rtol=0.0)


def test_noisy_quadratic_expected_loss_formula_matches_monte_carlo() -> None:
    """SGD on the NQM: the mean over 64 seeds of the final noise-free loss agrees with
    nqm_sgd_expected_loss (averaged over the same seeds' starting points) to 4 standard errors,
    and the noise matters: the noise-free prediction is far outside that band."""
    task = NoisyQuadraticTask(dim=8, batch_size=2)
    lr, steps, seeds = 0.8, 30, range(64)
    finals, predicted, noiseless = [], [], []
    for seed in seeds:
        r = run_task(task, lambda m: torch.optim.SGD(m.parameters(), lr=lr), steps=steps, seed=seed, eval_every=0)
        finals.append(r.metrics["suboptimality"])
        x0 = task.initial_point(seed)
        predicted.append(nqm_sgd_expected_loss(task.curvature, x0, lr, 2, steps))
        noiseless.append(nqm_sgd_expected_loss(task.curvature, x0, lr, 10**12, steps))
    f = torch.tensor(finals, dtype=torch.float64)
    se = float(f.std() / math.sqrt(len(finals)))
    mean, expected = float(f.mean()), sum(predicted) / len(predicted)
    assert abs(mean - expected) < 4 * se
    assert abs(mean - sum(noiseless) / len(noiseless)) > 8 * se
