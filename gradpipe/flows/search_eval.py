"""How a search scores one candidate: a short learning-rate sweep, recorded in one MLflow run.

A candidate's **score** is the task's headline metric after ``steps`` steps,
best over ``n`` learning rates log-spaced around the program's own ``lr``
default (:func:`sweep_lrs`: ``lr * spread ** linspace(-1/2, 1/2, n)``, so
``n=3, spread=10`` tries ``lr/√10, lr, lr·√10``), signed so that higher is
better (``-val_loss`` for a task whose metric is a loss). A learning rate whose
run diverges, or that lies outside the program's declared range for ``lr``,
scores ``-inf``; a candidate whose every learning rate does is ``-inf``, which
the evolution never picks as a parent. Searching the step size separately
from the update rule follows Chen et al. 2023 ("Symbolic Discovery of
Optimization Algorithms", section 2: each program is evaluated after its
learning rate is tuned), so that a mutant is not discarded for a badly scaled
default.

The record (child run of the search's parent run) is written as the sweep
goes: after each learning rate, ``sweep/lr``, ``sweep/score`` and
``sweep/<metric>`` at step ``i`` (the learning rate's position) and that
run's loss curve as ``train/loss_lr<i>``; at the end ``score`` and
``best_lr``. An evaluation that runs again (Dask re-running the task of a
worker that died, Prefect retrying a transient error, a resumed search)
reads the learning rates already logged and trains only the others, and one
that already logged ``score`` trains nothing: no learning rate is recorded
twice. Failed values are logged as NaN (MLflow stores ``-inf`` as
``-1.8e308``) and read back as ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from prefect import task

from . import tracking
from .train import _retry_transient, is_transient

__all__ = ["EvalJob", "EvalResult", "sweep_lrs", "signed", "evaluate", "evaluate_task", "read_score",
           "SCORE_METRIC"]

#: The child run's metric that marks an evaluation complete (written last).
SCORE_METRIC = "score"


@dataclass(frozen=True)
class EvalJob:
    """One candidate on one task: everything that decides its score (small, picklable for Dask).

    Attributes:
        source: the program's ``.grad`` text.
        key: the candidate's key (``gradpipe.search.Candidate.key``).
        task / task_options / steps: what it trains on, and for how long.
        lrs: the learning rates of the sweep (see :func:`sweep_lrs`).
        seed: the task's seed (data split, initial weights, batch order).
        backend / threads: as :class:`gradpipe.flows.spec.RunSpec`.
    """

    source: str
    key: str
    task: str
    steps: int
    lrs: tuple[float, ...]
    task_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    backend: str = "eager"
    threads: int = 1


@dataclass
class EvalResult:
    """A candidate's score (``-inf`` if every learning rate failed) and the sweep behind it."""

    key: str
    run_id: str
    score: float
    best_lr: float | None
    trials: list[float]
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return math.isfinite(self.score)


def sweep_lrs(default: float, n: int, spread: float) -> tuple[float, ...]:
    """``n`` learning rates log-spaced around ``default``, the largest ``spread`` times the smallest.

    >>> sweep_lrs(1e-3, 3, 100.0)
    (0.0001, 0.001, 0.01)
    """
    if n < 1:
        raise ValueError(f"a sweep needs at least one learning rate, got {n}")
    if n == 1:
        return (float(default),)
    return tuple(float(f"{default * spread ** (i / (n - 1) - 0.5):.6g}") for i in range(n))


def signed(value: float, higher_is_better: bool) -> float:
    """A metric as a score where higher is better; NaN and inf become ``-inf``."""
    if not math.isfinite(value):
        return -math.inf
    return value if higher_is_better else -value


def _read(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) or value <= -1e308 else float(value)


def read_score(metrics: Mapping[str, float]) -> float | None:
    """The score a child run recorded (None if its evaluation did not finish)."""
    return _read(metrics[SCORE_METRIC]) if SCORE_METRIC in metrics else None


def _logged_trials(client: Any, run_id: str) -> dict[int, tuple[float, float]]:
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "sweep/lr")}
    return {m.step: (lrs.get(m.step, math.nan), _read(m.value))
            for m in client.get_metric_history(run_id, "sweep/score")}


def _result(job: EvalJob, run_id: str, trials: Mapping[int, tuple[float, float]], reason: str | None) -> EvalResult:
    scores = [trials[i][1] for i in sorted(trials)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else None
    score = scores[best] if best is not None else -math.inf
    return EvalResult(key=job.key, run_id=run_id, score=score,
                      best_lr=trials[best][0] if best is not None and math.isfinite(score) else None,
                      trials=scores, reason=None if math.isfinite(score) else reason or "every learning rate failed")


def _trial(job: EvalJob, program: Any, the_task: Any, lr: float) -> tuple[float, dict[str, float], list[float],
                                                                          str | None]:
    """Train at one learning rate: (score, final metrics, losses, why it failed or None)."""
    import gradpipe
    from ..dsl.diagnostics import GradError
    from ..runtime.nonfinite import NonFiniteError
    from ..tasks import Diverged, run_task
    losses: list[float] = []
    try:
        program.check_hyperparams({"lr": lr}, "the learning-rate sweep")
        result = run_task(the_task, lambda m: gradpipe.Optimizer(m.named_parameters(), program, backend=job.backend,
                                                                 lr=lr),
                          steps=job.steps, seed=job.seed, on_step=lambda rec: losses.append(rec.loss))
    except (Diverged, NonFiniteError, GradError) as e:
        return -math.inf, {}, losses, str(e).splitlines()[0]
    except Exception as e:  # a program that cannot run (an lr too large for float32, a shape it cannot take)
        if is_transient(e):
            raise
        return -math.inf, {}, losses, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    value = result.metrics.get(the_task.metric, math.nan)
    return signed(value, the_task.higher_is_better), dict(result.metrics), losses, None


def evaluate(job: EvalJob, uri: str, run_id: str) -> EvalResult:
    """Run ``job``'s sweep and record it in the (existing) MLflow run ``run_id``; see the module docstring.

    Returns the :class:`EvalResult`. A diverged learning rate is an answer (``-inf``),
    not an error; anything else (the store, the network, a worker going away)
    propagates with the run marked FAILED, for Prefect to retry.
    """
    import gradpipe
    import torch
    from ..tasks import get_task

    client = tracking.open_client(uri)
    run = client.get_run(run_id)
    done = _logged_trials(client, run_id)
    if SCORE_METRIC in run.data.metrics:  # evaluated before: read it back, train nothing
        result = _result(job, run_id, done, run.data.tags.get(tracking.FAILURE_TAG))
        if run.info.status == "RUNNING":  # killed after its score was logged, before the run was ended
            client.set_terminated(run_id, "FINISHED" if result.ok else "FAILED")
        return result
    log = tracking.RunLogger(uri, run_id)
    log.start()
    reasons: list[str] = []
    try:
        if done:  # an earlier attempt stopped mid-sweep: its learning rates are kept, its failure is history
            log.tags({"gradpipe.search.resumed_after_lrs": str(len(done))})
        if tracking.FAILURE_TAG in run.data.tags:
            client.delete_tag(run_id, tracking.FAILURE_TAG)
        torch.set_num_threads(job.threads)
        program = gradpipe.compile(job.source)
        if not done:
            log.text(job.source, "pipeline/pipeline.grad")
            log.text(program.canonical, "pipeline/canonical.grad")
        the_task = get_task(job.task, **dict(job.task_options))
        trials = dict(done)
        for i, lr in enumerate(job.lrs):
            if i in trials:
                continue
            score, finals, losses, reason = _trial(job, program, the_task, lr)
            if reason:
                reasons.append(f"lr={lr:g}: {reason}")
            for step, loss in enumerate(losses, 1):
                log.metric(f"train/loss_lr{i}", loss, step)
            log.metrics({"sweep/lr": lr, "sweep/score": score if math.isfinite(score) else math.nan,
                         **{f"sweep/{k}": v for k, v in finals.items()}}, i)
            log.flush()  # a learning rate is logged whole before the next starts
            trials[i] = (lr, score)
        out = _result(job, run_id, trials, "; ".join(reasons)[:2000] or None)
        log.metrics({SCORE_METRIC: out.score if out.ok else math.nan,
                     **({"best_lr": out.best_lr} if out.best_lr is not None else {})}, 0)
        log.finish("FINISHED" if out.ok else "FAILED", out.reason)
        return out
    except BaseException as e:
        log.finish("FAILED" if isinstance(e, Exception) else "KILLED", f"{type(e).__name__}: {e}"[:2000])
        raise


#: Prefect task: :func:`evaluate`, retried (twice, 2 s apart) on transient errors only.
evaluate_task = task(evaluate, name="search-eval", retries=2, retry_delay_seconds=2,
                     retry_condition_fn=_retry_transient, task_run_name="search {job.key}", persist_result=False)
