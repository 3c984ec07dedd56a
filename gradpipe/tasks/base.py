"""The task interface: what a training task provides, and :func:`run_task`, which trains it.

A :class:`Task` is a small, seeded training problem: it builds a model for a
seed, yields exactly ``steps`` minibatches for a seed, turns a minibatch into
one or more named scalar losses and evaluates a model on held-out data.
:func:`run_task` trains a task with any ``torch.optim.Optimizer`` (a
:class:`gradpipe.Optimizer` is stepped the way its pipeline needs: with
per-example gradients, a loss closure or named losses) and reports every step
and evaluation through callbacks.

A user task is a subclass of :class:`Task`::

    class MyTask(Task):
        name = "mytask"
        metric = "val_loss"
        higher_is_better = False
        default_steps = 300
        loss_names = ("loss",)

        def make_model(self, seed): ...
        def batches(self, seed, steps): ...
        def losses(self, model, batch): return {"loss": F.mse_loss(model(batch[0]), batch[1])}
        def evaluate(self, model): return {"val_loss": ...}

Randomness: :func:`run_task` itself never reads or changes the process-wide
torch RNG. It calls :meth:`Task.make_model` under :func:`torch.random.fork_rng`
(and one lock, so threads building models do not interleave their seeding),
so a task may seed the global RNG there; everything else a task draws (batch
order, noise, dropout masks) should come from explicit
:class:`torch.Generator` objects seeded from ``seed``, or the runs are neither
reproducible nor independent of each other.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "Checkpoint",
    "StepRecord",
    "EvalRecord",
    "Diverged",
    "TaskResult",
    "Task",
    "TaskError",
    "run_task",
    "check_task",
    "tag_seed",
    "model_seed",
]


class TaskError(ValueError):
    """A task cannot be found, built or run as asked: an unknown name, a bad
    ``"module:factory"`` spec, an unknown option, or a task that breaks the
    :class:`Task` contract. The message is one line that says what to change."""


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of :func:`run_task`.

    Attributes:
        step: 1-based index of the optimizer step.
        loss: training loss of this step's minibatch, before the update; for a
            multi-loss task the sum of the named losses as stepped.
        losses: the named losses (``{"main": .., "aux": ..}``); a single-loss
            task has ``{"loss": loss}``.
        grad_norm: ``||g||_2`` over all parameters of the gradient ``g`` the
            optimizer was given: ``.grad`` after ``backward()``; for named
            losses, the gradient of their sum; for per-example gradients
            (``samples``), their mean over the batch.
        update_norm: ``||theta_after - theta_before||_2`` over all parameters.
        seconds: wall time of ``zero_grad`` + forward + backward (or the
            per-example gradients) + ``step``; the bookkeeping for the two norms
            is not included.
    """

    step: int
    loss: float
    losses: Mapping[str, float]
    grad_norm: float
    update_norm: float
    seconds: float


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of the model on the task's validation data.

    Attributes:
        step: the number of optimizer steps taken before the evaluation.
        metrics: the task's validation metrics, e.g. ``{"val_loss": .., "val_accuracy": ..}``.
    """

    step: int
    metrics: Mapping[str, float]


class Diverged(RuntimeError):
    """Raised by :func:`run_task` when a training loss is NaN or infinite.

    The step with that loss is not taken. Attributes: ``step`` (1-based),
    ``loss`` (the non-finite value), ``losses`` (the training losses of every
    step up to and including this one).
    """

    def __init__(self, step: int, loss: float, losses: Sequence[float] = ()) -> None:
        super().__init__(f"loss became {loss} at step {step}")
        self.step = int(step)
        self.loss = float(loss)
        self.losses = list(losses)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Dask workers)
        return (type(self), (self.step, self.loss, self.losses))


@dataclass
class Checkpoint:
    """Everything a run needs to go on after ``step`` steps as if it had never stopped.

    The batches are not saved: a task's batches are a function of its seed, so a
    resumed run skips the first ``step`` of them. Only tensors, dicts, lists and
    numbers: loadable with ``torch.load(weights_only=True)``.

    Attributes:
        step: optimizer steps taken.
        model: ``model.state_dict()``.
        optimizer: ``opt.state_dict()`` (a gradpipe optimizer's includes its RNG state).
    """

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model, "optimizer": self.optimizer}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Checkpoint":
        return cls(step=int(d["step"]), model=dict(d["model"]), optimizer=dict(d["optimizer"]))


@dataclass
class TaskResult:
    """What one :func:`run_task` run measured.

    Attributes:
        task: the task's :attr:`Task.name`.
        steps: the number of optimizer steps taken.
        losses: the training loss of every step (as :attr:`StepRecord.loss`).
        final_loss: mean of the last 10 training losses (fewer if fewer steps).
        metrics: the final evaluation (after the last step).
        seconds: wall time of the whole run: building the model and the
            optimizer, training and every evaluation.
        named_losses: per loss name, the value at every step (for a
            single-loss task, ``{"loss": losses}``).
        evals: every evaluation, in order; the last one is ``metrics``.
    """

    task: str
    steps: int
    losses: list[float] = field(repr=False)
    final_loss: float
    metrics: dict[str, float]
    seconds: float
    named_losses: dict[str, list[float]] = field(default_factory=dict, repr=False)
    evals: list[EvalRecord] = field(default_factory=list, repr=False)


class Task(abc.ABC):
    """A seeded training problem that :func:`run_task` can train with any optimizer.

    Class attributes (set them in a subclass):
        name: the task's name (``"digits"``, ``"charlm"``, or the user's).
        metric: the headline validation metric, a key of :meth:`evaluate`'s result.
        higher_is_better: whether a larger ``metric`` is better (accuracy) or worse (loss).
        default_steps: how many steps :func:`run_task` takes when not told.
        loss_names: the keys of :meth:`losses`' result: ``("loss",)`` for one
            loss, or e.g. ``("main", "aux")`` for a multi-loss task whose
            pipelines read ``grads.main`` and ``grads.aux``.

    Options of a task are the keyword arguments of its constructor; they are
    what ``get_task(spec, **options)`` passes and what :meth:`options` reports.
    """

    name: str
    metric: str = "val_loss"
    higher_is_better: bool = False
    default_steps: int = 200
    loss_names: tuple[str, ...] = ("loss",)

    @abc.abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model, the same for the same ``seed``."""

    @abc.abstractmethod
    def batches(self, seed: int, steps: int) -> Iterator[Any]:
        """Exactly ``steps`` training minibatches, the same sequence for the same ``seed``."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """The scalar training losses of ``model`` on ``batch``, keyed by :attr:`loss_names`;
        the optimizer minimises their sum."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of ``model`` (which :func:`run_task` puts in ``eval()`` mode and
        calls under ``torch.no_grad()``); the result includes :attr:`metric`."""

    def sample_grads(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-example gradients of the summed loss for pipelines that read ``samples``
        (DP-SGD): ``{parameter name: (B, *param.shape)}``, e.g. from
        :func:`gradpipe.per_sample_grads`. The default raises :class:`TaskError`."""
        raise TaskError(f"task {self.name!r} does not provide per-example gradients "
                        "(a pipeline that reads 'samples' needs Task.sample_grads)")

    def options(self) -> dict[str, Any]:
        """The task's option values (its constructor's keyword arguments), for logging;
        the default is ``{}``."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


#: The attribute :func:`tag_seed` sets on a model.
_SEED_ATTR = "_gradpipe_seed"


def tag_seed(model: nn.Module, seed: int) -> nn.Module:
    """``model``, marked with the run seed it was built for (``make_model(seed)``), so that
    :meth:`Task.evaluate`, which gets only the model, can score it on that seed's data."""
    setattr(model, _SEED_ATTR, int(seed))
    return model


def model_seed(model: nn.Module) -> int:
    """The seed :func:`tag_seed` marked ``model`` with; 0 for a model that was not marked."""
    return int(getattr(model, _SEED_ATTR, 0))


def check_task(task: Any) -> Task:
    """``task`` if it is a :class:`Task` whose class attributes are well formed, else :class:`TaskError`."""
    if not isinstance(task, Task):
        raise TaskError(f"expected a gradpipe.tasks.Task, got {type(task).__name__}")
    cls = type(task).__name__
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TaskError(f"task class {cls} must set a non-empty string 'name'")
    if not isinstance(getattr(task, "metric", None), str) or not task.metric:
        raise TaskError(f"task {name!r} must set a non-empty string 'metric'")
    if not isinstance(getattr(task, "higher_is_better", None), bool):
        raise TaskError(f"task {name!r} must set 'higher_is_better' to True or False")
    steps = getattr(task, "default_steps", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TaskError(f"task {name!r} must set 'default_steps' to a positive int, got {steps!r}")
    names = getattr(task, "loss_names", None)
    if (not isinstance(names, tuple) or not names or len(set(names)) != len(names)
            or not all(isinstance(n, str) and n.isidentifier() for n in names)):
        raise TaskError(f"task {name!r} must set 'loss_names' to a tuple of distinct identifiers, got {names!r}")
    return task


# run_task builds models under fork_rng + this lock: a task may seed the global RNG in
# make_model without other threads drawing from (or reseeding) it halfway through.
_MODEL_LOCK = threading.Lock()


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]


def _global_norm(tensors: Iterable[torch.Tensor | None]) -> float:
    """``sqrt(sum_i ||t_i||^2)`` over the tensors that are not None, accumulated in float64."""
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors if t is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _sum(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``l_1 + l_2 + ...`` in order, without the ``0 +`` that :func:`sum` starts from."""
    it = iter(losses.values())
    total = next(it)
    for v in it:
        total = total + v
    return total


def _check_losses(task: Task, losses: Any) -> dict[str, torch.Tensor]:
    if not isinstance(losses, Mapping) or set(losses) != set(task.loss_names):
        got = sorted(losses) if isinstance(losses, Mapping) else type(losses).__name__
        raise TaskError(f"task {task.name!r}: losses() must return a dict with keys "
                        f"{list(task.loss_names)}, got {got}")
    out = {}
    for n in task.loss_names:
        v = losses[n]
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise TaskError(f"task {task.name!r}: loss {n!r} must be a scalar tensor")
        out[n] = v.reshape(())
    return out


def _evaluate(task: Task, model: nn.Module, step: int, opt: Any = None) -> EvalRecord:
    # an optimizer with an eval sequence (Schedule-Free) puts the point to evaluate into the
    # parameters with opt.eval(), and the point to step from back with opt.train()
    switch = bool(getattr(opt, "has_eval", False))
    model.eval()
    if switch:
        opt.eval()
    try:
        with torch.no_grad():
            raw = task.evaluate(model)
    finally:
        if switch:
            opt.train()
        model.train()
    if not isinstance(raw, Mapping) or task.metric not in raw:
        raise TaskError(f"task {task.name!r}: evaluate() must return a dict that includes its metric "
                        f"{task.metric!r}")
    return EvalRecord(step=step, metrics={str(k): float(v) for k, v in raw.items()})


def run_task(task: Task, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *,
             steps: int | None = None, seed: int = 0, eval_every: int | None = None,
             on_step: Callable[[StepRecord], None] | None = None,
             on_eval: Callable[[EvalRecord], None] | None = None,
             resume: Checkpoint | None = None, checkpoint_every: int = 0,
             on_checkpoint: Callable[[Checkpoint], None] | None = None) -> TaskResult:
    """Train ``task`` for ``steps`` steps with the optimizer ``make_optimizer(model)`` builds.

    The model is ``task.make_model(seed)`` (in training mode) and the data
    ``task.batches(seed, steps)``, so every optimizer sees the same initial
    weights and the same minibatches. Each step is ``opt.zero_grad()``, the
    forward pass ``L = sum_k task.losses(model, batch)[k]``, and then, by what
    the optimizer's pipeline reads (``opt.program.reads`` / ``.losses`` of a
    :class:`gradpipe.Optimizer`; any other optimizer takes the last branch):

    * ``samples`` (per-example gradients, DP-SGD):
      ``opt.step(samples=task.sample_grads(model, batch))`` (with a closure
      returning ``L`` as well if the pipeline also reads ``loss``);
    * named losses (``grads.main``, ...): ``opt.step(losses=task.losses(...))``;
      every name the pipeline reads must be one of ``task.loss_names``;
    * ``loss`` (e.g. AEGD): ``L.backward(); opt.step(lambda: L)``;
    * otherwise ``L.backward(); opt.step()`` (``torch.optim.LBFGS``, and a
      pipeline that takes the gradient at another point, ``grad_at`` as SAM
      does, whose ``opt.needs_closure`` is true, get a closure that recomputes
      ``L`` and its gradient on the same batch, as they require).

    A step whose loss is NaN or infinite is not taken: :class:`Diverged` is
    raised. The model is evaluated (``model.eval()``, ``torch.no_grad()``,
    then back to ``train()``; ``opt.eval()`` and ``opt.train()`` around it too
    where the optimizer has an eval sequence, ``opt.has_eval``: Schedule-Free)
    after every ``eval_every`` steps and after the last step.

    ``grad_norm`` of a named-loss step is computed from one extra
    ``torch.autograd.grad`` of the summed loss (retaining the graph) before
    ``opt.step(losses=...)``; the optimizer then differentiates each loss
    itself. That backward pass is not counted in :attr:`StepRecord.seconds`.

    Runs are deterministic on CPU for a given seed and number of torch
    threads, and the process-wide torch RNG is neither read nor changed by
    ``run_task`` (see the module docstring for what tasks must do).

    Args:
        task: the task to train.
        make_optimizer: called once with the fresh model; returns the optimizer
            (e.g. ``lambda m: gradpipe.Optimizer(m.named_parameters(), "adam", lr=3e-3)``).
        steps: number of optimizer steps, at least 1; ``None`` means
            ``task.default_steps``.
        seed: seed of the model, the data and the batch order.
        eval_every: evaluate after every this many steps; ``None`` means
            ``max(1, steps // 10)``; ``0`` evaluates only after the last step.
        on_step: called with a :class:`StepRecord` after every step.
        on_eval: called with an :class:`EvalRecord` after every evaluation.
        resume: go on from this :class:`Checkpoint` (same task, seed and
            optimizer): the model and optimizer states are loaded, the first
            ``resume.step`` batches are skipped, and steps, evaluations and
            checkpoints continue from ``resume.step + 1``. The parameters at
            the end are bitwise those of a run that never stopped.
        checkpoint_every: call ``on_checkpoint`` with a :class:`Checkpoint`
            after every this many steps (0: never) and after the last step.
        on_checkpoint: receives the checkpoints (copies; safe to keep).

    Returns:
        A :class:`TaskResult`.

    Raises:
        Diverged: a training loss was NaN or infinite.
        TaskError: the task broke its contract (wrong loss names, too few
            batches, no per-example gradients for a ``samples`` pipeline, ...).
    """
    check_task(task)
    n_steps = task.default_steps if steps is None else steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    every = max(1, n_steps // 10) if eval_every is None else eval_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"eval_every must be an int >= 0, got {eval_every!r}")
    seed = int(seed)

    start = time.perf_counter()
    with _MODEL_LOCK, torch.random.fork_rng(devices=[]):
        model = task.make_model(seed)
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: make_model() must return an nn.Module, "
                        f"got {type(model).__name__}")
    model.train()
    opt = make_optimizer(model)
    first = 1
    if resume is not None:
        if not 0 <= resume.step <= n_steps:
            raise ValueError(f"cannot resume at step {resume.step} of a {n_steps}-step run")
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        first = resume.step + 1
    params = _params(opt)

    def save_checkpoint(step: int) -> None:
        import copy
        on_checkpoint(Checkpoint(step=step, model=copy.deepcopy(model.state_dict()),
                                 optimizer=copy.deepcopy(opt.state_dict())))

    program = getattr(opt, "program", None)
    reads = frozenset(getattr(program, "reads", ()) or ())
    named = frozenset(getattr(program, "losses", ()) or ())
    if named - set(task.loss_names):
        raise TaskError(f"the pipeline reads {', '.join('grads.' + n for n in sorted(named))} but task "
                        f"{task.name!r} has the losses {', '.join(task.loss_names)}")
    per_example = "samples" in reads
    reads_loss = "loss" in reads
    # LBFGS re-evaluates the loss; a pipeline that reads grad_at (SAM) calls the closure twice
    needs_closure = isinstance(opt, torch.optim.LBFGS) or bool(getattr(opt, "needs_closure", False))

    losses_hist: list[float] = []
    named_hist: dict[str, list[float]] = {n: [] for n in task.loss_names}
    evals: list[EvalRecord] = []

    def record_eval(step: int) -> None:
        rec = _evaluate(task, model, step, opt)
        evals.append(rec)
        if on_eval is not None:
            on_eval(rec)

    it = iter(task.batches(seed, n_steps))
    for step in range(1, n_steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            raise TaskError(f"task {task.name!r}: batches(seed, {n_steps}) gave only {step - 1} batches") from None
        if step < first:  # resuming: these batches were trained on before the checkpoint
            continue

        t0 = time.perf_counter()
        opt.zero_grad()
        if per_example:
            with torch.no_grad():
                losses = _check_losses(task, task.losses(model, batch))
        else:
            losses = _check_losses(task, task.losses(model, batch))
        total = _sum(losses)
        loss_value = float(total.detach())
        values = {n: float(v.detach()) for n, v in losses.items()}
        losses_hist.append(loss_value)
        for n, v in values.items():
            named_hist[n].append(v)
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value, losses_hist)

        sample_grads = None
        if per_example:
            sample_grads = task.sample_grads(model, batch)
        elif not named:
            total.backward()
        t1 = time.perf_counter()

        # bookkeeping, not timed: the gradient the optimizer sees and the parameters before
        if per_example:
            grad_norm = _global_norm(g.mean(0) for g in sample_grads.values())
        elif named:
            grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            grad_norm = _global_norm(grads)
            del grads
        else:
            grad_norm = _global_norm(p.grad for p in params)
        before = [p.detach().clone() for p in params]

        t2 = time.perf_counter()
        if per_example:
            opt.step(_returning(total) if reads_loss else None, samples=sample_grads)
        elif named:
            opt.step(losses=losses)
        elif reads_loss:
            opt.step(_returning(total))
        elif needs_closure:
            opt.step(_lbfgs_closure(task, model, opt, batch))
        else:
            opt.step()
        t3 = time.perf_counter()

        with torch.no_grad():
            update_norm = _global_norm(p.detach() - b for p, b in zip(params, before))
        del before, total, losses, sample_grads
        if on_step is not None:
            on_step(StepRecord(step=step, loss=loss_value, losses=values, grad_norm=grad_norm,
                               update_norm=update_norm, seconds=(t1 - t0) + (t3 - t2)))
        if every and step % every == 0:
            record_eval(step)
        if on_checkpoint is not None and (step == n_steps or (checkpoint_every and step % checkpoint_every == 0)):
            save_checkpoint(step)
    if not evals or evals[-1].step != n_steps:
        record_eval(n_steps)

    tail = losses_hist[-10:]  # empty when resuming a run whose last checkpoint is its last step
    return TaskResult(task=task.name, steps=n_steps, losses=losses_hist,
                      final_loss=math.fsum(tail) / len(tail) if tail else math.nan, metrics=dict(evals[-1].metrics),
                      seconds=time.perf_counter() - start, named_losses=named_hist, evals=evals)


def _returning(loss: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A closure that returns the already computed ``loss`` (for pipelines that read ``loss``)."""
    return lambda: loss


def _lbfgs_closure(task: Task, model: nn.Module, opt: torch.optim.Optimizer,
                   batch: Any) -> Callable[[], torch.Tensor]:
    """The closure ``torch.optim.LBFGS`` (and a ``grad_at`` pipeline) re-evaluates: zero the
    gradients, recompute the summed loss on the same batch and backpropagate it."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = _sum(_check_losses(task, task.losses(model, batch)))
        total.backward()
        return total
    return closure
