"""Tests for the task interface (:mod:`gradpipe.tasks.base`): ``run_task`` with torch and
gradpipe optimizers, its records and callbacks, divergence, determinism and the global RNG."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import gradpipe
from gradpipe.tasks import (
    DigitsMultitaskTask,
    DigitsTask,
    Diverged,
    EvalRecord,
    StepRecord,
    TaskError,
    TaskResult,
    run_task,
    train,
    train_multitask,
)
from gradpipe.tasks.digits import load_digits_split

from example_tasks import LinearRegressionTask


def torch_adam(lr: float = 1e-2):
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


def pipe(source: str, **hp: Any):
    return lambda model: gradpipe.Optimizer(model.named_parameters(), source, backend="eager", **hp)


# ------------------------------------------------------------------ same numbers as the old entry points

def test_digits_task_is_bitwise_digits_train() -> None:
    for seed in (0, 3):
        result = run_task(DigitsTask(), torch_adam(), steps=40, seed=seed)
        reference = train(torch_adam(), steps=40, seed=seed)
        assert result.losses == reference.losses  # bitwise: same model, batches and step
        assert result.metrics["val_loss"] == reference.val_loss
        assert result.metrics["val_accuracy"] == reference.val_accuracy
        assert result.final_loss == reference.final_loss
    small = run_task(DigitsTask(batch_size=32), torch_adam(), steps=10, seed=1)
    assert small.losses == train(torch_adam(), steps=10, seed=1, batch_size=32).losses


@pytest.mark.parametrize("source, hp", [("adam", {"lr": 1e-2}), ("aegd", {"lr": 0.1}),
                                        ("dp_sgd", {"lr": 0.5})])
def test_gradpipe_optimizers_step_like_digits_train(source: str, hp: dict[str, float]) -> None:
    """adam (reads grad), aegd (reads loss: closure), dp_sgd (reads samples) match ``digits.train``."""
    steps = 12 if source == "dp_sgd" else 25
    result = run_task(DigitsTask(), pipe(source, **hp), steps=steps, seed=2)
    reference = train(pipe(source, **hp), steps=steps, seed=2)
    assert result.losses == reference.losses
    assert result.metrics["val_accuracy"] == reference.val_accuracy
    assert result.losses[-1] < result.losses[0]


def test_multitask_named_losses_match_train_multitask() -> None:
    for make in (pipe("pcgrad_adam", lr=1e-2), torch_adam()):
        result = run_task(DigitsMultitaskTask(), make, steps=25, seed=1)
        reference = train_multitask(make, steps=25, seed=1)
        assert result.named_losses["main"] == reference.losses
        assert result.named_losses["aux"] == reference.aux_losses
        assert result.metrics["val_accuracy"] == reference.val_accuracy
        assert result.metrics["val_aux_accuracy"] == reference.val_aux_accuracy
        # the step's loss is the sum of the named losses as stepped (aux_weight 1)
        assert all(math.isclose(t, m + a, rel_tol=1e-6)
                   for t, m, a in zip(result.losses, reference.losses, reference.aux_losses))
    weighted = run_task(DigitsMultitaskTask(aux_weight=0.5), torch_adam(), steps=5, seed=1)
    reference = train_multitask(torch_adam(), steps=5, seed=1, aux_weight=0.5)
    assert weighted.named_losses["main"] == reference.losses
    assert all(math.isclose(a, 0.5 * r, rel_tol=1e-6) for a, r in zip(weighted.named_losses["aux"],
                                                                       reference.aux_losses))


def test_dp_sgd_on_the_multitask_task_uses_summed_per_example_grads() -> None:
    result = run_task(DigitsMultitaskTask(), pipe("dp_sgd", lr=0.5), steps=4, seed=0)
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)


# ------------------------------------------------------------------ records and callbacks

def _first_batch_grad_norm(task: DigitsTask, seed: int) -> float:
    model = task.make_model(seed)
    batch = next(iter(task.batches(seed, 1)))
    loss = sum(task.losses(model, batch).values())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def test_step_records() -> None:
    records: list[StepRecord] = []
    lr = 0.05
    result = run_task(DigitsTask(), lambda m: torch.optim.SGD(m.parameters(), lr=lr), steps=15, seed=4,
                      on_step=records.append)
    assert isinstance(result, TaskResult) and result.task == "digits" and result.steps == 15
    assert [r.step for r in records] == list(range(1, 16))
    assert [r.loss for r in records] == result.losses
    assert all(r.losses == {"loss": r.loss} for r in records)
    assert result.named_losses == {"loss": result.losses}
    assert result.final_loss == pytest.approx(sum(result.losses[-10:]) / 10)
    assert all(r.seconds >= 0.0 for r in records) and result.seconds >= 0.0
    assert records[0].grad_norm == pytest.approx(_first_batch_grad_norm(DigitsTask(), 4), rel=1e-5)
    for r in records:  # plain SGD moves the parameters by lr * g
        assert r.update_norm == pytest.approx(lr * r.grad_norm, rel=1e-4)
    with pytest.raises(Exception):
        records[0].loss = 0.0  # type: ignore[misc]  # frozen


def test_grad_and_update_norms_for_named_losses_and_samples() -> None:
    named: list[StepRecord] = []
    run_task(DigitsMultitaskTask(), pipe("grads.main + grads.aux", lr=0.1), steps=5, seed=0, on_step=named.append)
    for r in named:
        assert set(r.losses) == {"main", "aux"}
        assert r.loss == pytest.approx(r.losses["main"] + r.losses["aux"], rel=1e-6)
        assert r.update_norm == pytest.approx(0.1 * r.grad_norm, rel=1e-4)
    task = DigitsMultitaskTask()
    assert named[0].grad_norm == pytest.approx(_first_batch_grad_norm(task, 0), rel=1e-5)

    samples: list[StepRecord] = []  # clipping that never clips and no noise: plain SGD on the mean gradient
    run_task(DigitsTask(), pipe("samples | dp_clip(1e9) | dp_noise(0)", lr=0.1), steps=4, seed=0,
             on_step=samples.append)
    assert samples[0].grad_norm == pytest.approx(_first_batch_grad_norm(DigitsTask(), 0), rel=1e-4)
    for r in samples:
        assert r.update_norm == pytest.approx(0.1 * r.grad_norm, rel=1e-4)


class _WatchedDigits(DigitsTask):
    """Records the mode and grad mode ``evaluate`` runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def evaluate(self, model):
        self.seen.append((model.training, torch.is_grad_enabled()))
        return super().evaluate(model)

    def losses(self, model, batch):
        assert model.training
        return super().losses(model, batch)


def test_evaluation_schedule_and_callbacks() -> None:
    task = _WatchedDigits()
    evals: list[EvalRecord] = []
    result = run_task(task, torch_adam(), steps=20, seed=0, eval_every=7, on_eval=evals.append)
    assert [e.step for e in evals] == [7, 14, 20]
    assert result.evals == evals and result.metrics == evals[-1].metrics
    assert set(result.metrics) == {"val_loss", "val_accuracy"}
    assert task.seen == [(False, False)] * 3

    default: list[EvalRecord] = []
    run_task(DigitsTask(), torch_adam(), steps=30, on_eval=default.append)
    assert [e.step for e in default] == list(range(3, 31, 3))  # every max(1, steps // 10)
    only_end = run_task(DigitsTask(), torch_adam(), steps=6, eval_every=0)
    assert [e.step for e in only_end.evals] == [6]
    every = run_task(LinearRegressionTask(), torch_adam(), steps=3, eval_every=1)
    assert [e.step for e in every.evals] == [1, 2, 3]
    assert every.steps == 3
    assert run_task(LinearRegressionTask(), torch_adam()).steps == LinearRegressionTask.default_steps


def test_bad_arguments() -> None:
    for kw in ({"steps": 0}, {"steps": 2.5}, {"eval_every": -1}):
        with pytest.raises(ValueError):
            run_task(LinearRegressionTask(), torch_adam(), **kw)


# ------------------------------------------------------------------ divergence

def test_diverged_on_a_huge_learning_rate() -> None:
    seen: list[StepRecord] = []
    with pytest.raises(Diverged) as info:
        run_task(LinearRegressionTask(), lambda m: torch.optim.SGD(m.parameters(), lr=10.0), steps=200,
                 on_step=seen.append)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert not math.isfinite(err.loss) and 1 < err.step <= 200
    assert str(err) == f"loss became {err.loss} at step {err.step}"
    assert len(err.losses) == err.step and err.losses[-1] == err.loss  # inf here
    assert len(seen) == err.step - 1  # the step with the non-finite loss is not taken
    import pickle
    again = pickle.loads(pickle.dumps(err))
    assert (again.step, str(again)) == (err.step, str(err))


class _NaNAtThree(LinearRegressionTask):
    def losses(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        out = super().losses(model, batch)
        return {"loss": out["loss"] * float("nan")} if self.calls == 3 else out


def test_diverged_on_nan_is_raised_before_the_step() -> None:
    with pytest.raises(Diverged, match=r"^loss became nan at step 3$") as info:
        run_task(_NaNAtThree(), torch_adam(), steps=10)
    assert info.value.step == 3 and math.isnan(info.value.loss)


# ------------------------------------------------------------------ determinism and the global RNG

def test_same_seed_same_run_different_seed_different_run() -> None:
    def go(seed: int) -> tuple[TaskResult, list[StepRecord]]:
        recs: list[StepRecord] = []
        return run_task(DigitsTask(), pipe("adam", lr=1e-2), steps=15, seed=seed, on_step=recs.append), recs

    (a, ra), (b, rb), (c, _) = go(5), go(5), go(6)
    assert a.losses == b.losses and a.metrics == b.metrics
    assert [(r.grad_norm, r.update_norm) for r in ra] == [(r.grad_norm, r.update_norm) for r in rb]
    assert a.losses != c.losses


class _SeedsGlobally(LinearRegressionTask):
    """A careless task that seeds the global RNG in ``make_model``."""

    def make_model(self, seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(self.dim, 1)


def test_global_rng_untouched() -> None:
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    run_task(DigitsTask(), pipe("dp_sgd", lr=0.5), steps=3, seed=0)
    run_task(DigitsMultitaskTask(), torch_adam(), steps=3, seed=0)
    a = run_task(_SeedsGlobally(), torch_adam(), steps=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = run_task(_SeedsGlobally(), torch_adam(), steps=3, seed=0)
    assert a.losses == b.losses


# ------------------------------------------------------------------ other optimizers and contract errors

def test_lbfgs_gets_a_closure() -> None:
    result = run_task(LinearRegressionTask(), lambda m: torch.optim.LBFGS(m.parameters(), max_iter=4), steps=5)
    assert result.final_loss < result.losses[0] and result.metrics["val_loss"] < 0.1


def test_pipeline_reading_losses_the_task_lacks() -> None:
    with pytest.raises(TaskError, match=r"grads\.aux, grads\.main.*'digits' has the losses loss"):
        run_task(DigitsTask(), pipe("pcgrad_adam"), steps=2)


def test_samples_pipeline_needs_sample_grads() -> None:
    with pytest.raises(TaskError, match="per-example gradients"):
        run_task(LinearRegressionTask(), pipe("dp_sgd"), steps=2)


class _WrongKeys(LinearRegressionTask):
    def losses(self, model, batch):
        return {"mse": super().losses(model, batch)["loss"]}


class _FewBatches(LinearRegressionTask):
    def batches(self, seed, steps):
        return iter(list(super().batches(seed, steps))[:2])


class _NoMetric(LinearRegressionTask):
    def evaluate(self, model):
        return {"other": 1.0}


class _NotAModel(LinearRegressionTask):
    def make_model(self, seed):
        return "model"


class _BadLossNames(LinearRegressionTask):
    loss_names = ("a", "a")


@pytest.mark.parametrize("task, message", [
    (_WrongKeys(), r"losses\(\) must return a dict with keys \['loss'\], got \['mse'\]"),
    (_FewBatches(), r"gave only 2 batches"),
    (_NoMetric(), r"must return a dict that includes its metric 'val_loss'"),
    (_NotAModel(), r"make_model\(\) must return an nn.Module"),
    (_BadLossNames(), r"loss_names"),
])
def test_task_contract_errors(task, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        run_task(task, torch_adam(), steps=4)


def test_evaluate_uses_the_seed_of_the_model() -> None:
    task = DigitsTask()
    model = task.make_model(7)
    data = load_digits_split(7)
    with torch.no_grad():
        expected = float(F.cross_entropy(model(data.x_val), data.y_val))
    assert task.evaluate(model)["val_loss"] == expected
    assert repr(task) == "DigitsTask(batch_size=128, hidden=64, holdout='val', reserve=())"
