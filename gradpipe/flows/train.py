"""One training run as a Prefect task and flow, recorded in one MLflow run.

:func:`execute_run` is the whole run as plain Python: load the pipeline and
the task, train with :func:`gradpipe.tasks.run_task`, log to an existing
MLflow run. :data:`train_task` wraps it as a Prefect task with retries for
transient failures (a lost connection to the tracking server, a worker
restarted); :func:`train_flow` is the one-run flow behind ``gradpipe train``.

What a run records (``docs/orchestration.md`` has the full list):

- params: ``pipeline``, ``pipeline_hash``, ``task``, ``seed``, ``steps``,
  ``backend`` and every hyperparameter (tuples as ``betas.0``, ``betas.1``);
- tags: ``gradpipe.version``, ``gradpipe.backend``, ``gradpipe.pipeline``,
  ``gradpipe.git_commit`` (when the pipeline lives in a git repository),
  ``prefect.flow_run_id``/``prefect.task_run_id``;
- metrics per step, sent in batches: ``train/loss`` (and ``train/loss_<name>``
  for each named loss), ``opt/grad_norm``, ``opt/update_norm``,
  ``time/step_ms``; ``eval/<metric>`` at each evaluation; ``final/*`` once;
- artifacts: the ``.grad`` source, its canonical form, the graph picture,
  the ``explain`` report and ``plots/loss.png``.

A run whose loss becomes NaN or infinite, whose optimizer skipped more
non-finite gradient steps in a row than its policy allows, or whose pipeline
or task is wrong, ends FAILED with the reason in the ``gradpipe.failure`` tag and keeps
what it logged. Such failures are returned, not raised: they are answers,
and retrying cannot change them. Anything else is raised for Prefect to
retry; a retry reopens the same MLflow run and, training being
deterministic, skips the steps the earlier attempt already logged, so no
step is recorded twice.
"""

from __future__ import annotations

import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prefect import flow, task

from . import tracking
from .spec import RunSpec, hyperparam_params, pipeline_label

__all__ = ["RunOutcome", "execute_run", "resume_run", "load_checkpoint", "ResumeError", "train_task", "train_flow",
           "run_params", "run_tags", "load_pipeline", "TRANSIENT", "CHECKPOINT_ARTIFACT", "SPEC_ARTIFACT"]

#: Exceptions worth a retry: the network, the file system, a worker that went away.
TRANSIENT: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)


@dataclass
class RunOutcome:
    """What a run returns to the flow that started it (small and picklable, for Dask).

    Attributes:
        spec: the run.
        run_id: its MLflow run.
        status: ``"FINISHED"`` or ``"FAILED"``.
        reason: why it failed (one line), else None.
        losses: training loss per step (up to the failure for a failed run).
        metrics: the final evaluation (``val_accuracy``, ``val_loss``, ...).
        final_loss: mean of the last 10 losses (NaN if none).
        seconds: wall time of the training loop.
        metric: the task's headline metric name; ``higher_is_better`` its direction.
    """

    spec: RunSpec
    run_id: str
    status: str
    reason: str | None = None
    losses: list[float] = field(default_factory=list, repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    final_loss: float = math.nan
    seconds: float = 0.0
    metric: str = "val_loss"
    higher_is_better: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    @property
    def score(self) -> float:
        """The headline validation metric (NaN for a failed run)."""
        return self.metrics.get(self.metric, math.nan) if self.ok else math.nan


def load_pipeline(ref: str):
    """The compiled :class:`~gradpipe.Program` for a name or path (a GradError if it is wrong)."""
    import gradpipe
    return gradpipe.load(ref)


def run_params(spec: RunSpec, program: Any, steps: int) -> dict[str, str]:
    """The MLflow params of a run: identity, then every hyperparameter value it trains with."""
    values = dict(program.defaults())
    values.update(spec.hyperparams)
    params = {"pipeline": pipeline_label(spec.pipeline), "pipeline_hash": program.hash, "task": spec.task,
              "seed": str(spec.seed), "steps": str(steps), "backend": spec.backend, "torch_threads": str(spec.threads)}
    params.update(hyperparam_params(values))
    params.update({f"task.{k}": str(v) for k, v in spec.task_options.items()})
    return params


def run_tags(spec: RunSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The MLflow tags of a run."""
    import gradpipe
    tags = {"gradpipe.version": gradpipe.__version__, "gradpipe.backend": spec.backend,
            "gradpipe.pipeline": pipeline_label(spec.pipeline), "gradpipe.run_key": spec.key,
            "gradpipe.task": spec.task}
    where = pathlib.Path(spec.pipeline)
    commit = tracking.git_commit(where.parent if where.suffix == ".grad" else pathlib.Path.cwd())
    if commit:
        tags["gradpipe.git_commit"] = commit
    tags.update(_prefect_ids())
    tags.update(extra or {})
    return tags


def _prefect_ids() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run, task_run
        out = {"prefect.flow_run_id": flow_run.id, "prefect.task_run_id": task_run.id}
    except Exception:  # pragma: no cover - outside Prefect, or an older runtime
        return {}
    return {k: str(v) for k, v in out.items() if v}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    is_grad_error = type(exc).__name__ == "GradError"
    reason = first if is_grad_error and first else (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    return reason[:2000]


def _is_user_error(exc: BaseException) -> bool:
    from ..dsl.diagnostics import GradError
    from ..tasks import TaskError
    return isinstance(exc, (GradError, TaskError))


def _logged_upto(uri: str, run_id: str) -> int:
    """The last step an earlier attempt of this run logged (0 for a fresh run)."""
    from mlflow import MlflowClient
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    return max((m.step for m in history), default=0)


def _logged_losses(uri: str, run_id: str) -> list[float]:
    from mlflow import MlflowClient
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def finished_outcome(spec: RunSpec, uri: str, run_id: str) -> RunOutcome | None:
    """The outcome of a run that already FINISHED, read back from MLflow (None if it did not).

    Dask re-runs a finished task whose result lived on a worker that died; the
    run it recorded is complete, so it is read, not trained again."""
    from mlflow import MlflowClient
    from ..tasks import get_task
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    if run.info.status != "FINISHED":
        return None
    task_ = get_task(spec.task, **dict(spec.task_options))
    finals = {k.removeprefix("final/"): v for k, v in run.data.metrics.items() if k.startswith("final/")}
    losses = _logged_losses(uri, run_id)
    return RunOutcome(spec=spec, run_id=run_id, status="FINISHED", losses=losses,
                      metrics={k: v for k, v in finals.items() if k not in ("loss", "seconds")},
                      final_loss=finals.get("loss", math.nan), seconds=finals.get("seconds", 0.0),
                      metric=task_.metric, higher_is_better=task_.higher_is_better)


def _clear_failure(uri: str, run_id: str) -> None:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    if tracking.FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, tracking.FAILURE_TAG)


#: Where a run keeps its latest checkpoint (overwritten as the run goes on) and its spec.
CHECKPOINT_ARTIFACT = "checkpoints/latest.pt"
SPEC_ARTIFACT = "run_spec.json"
#: The tag that names the step of the run's latest checkpoint (written after the file).
CHECKPOINT_TAG = "gradpipe.checkpoint_step"


class ResumeError(ValueError):
    """A run that cannot be resumed (finished, no spec, its pipeline changed), in one line."""


def _save_checkpoint(uri: str, run_id: str, ckpt: Any) -> None:
    """Log ``ckpt`` as ``checkpoints/latest.pt``, then move the run's checkpoint tag to its step:
    a process killed between the two leaves the previous tag, which names a complete file.
    The caller flushes the metrics first, so every step up to a checkpoint is logged: a run
    resumed from it re-trains, and logs, exactly the steps after it."""
    import tempfile

    import torch
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "latest.pt"
        torch.save(ckpt.to_dict(), path)
        client.log_artifact(run_id, str(path), "checkpoints")
    client.set_tag(run_id, CHECKPOINT_TAG, str(ckpt.step))


def load_checkpoint(uri: str, run_id: str) -> Any:
    """The run's latest checkpoint (a :class:`gradpipe.tasks.Checkpoint`), or None if it has none.

    Loaded with ``torch.load(weights_only=True)``: a checkpoint holds tensors and
    plain containers only, never pickled code."""
    import tempfile

    import torch
    from mlflow import MlflowClient
    from ..tasks import Checkpoint
    client = MlflowClient(tracking_uri=uri)
    if CHECKPOINT_TAG not in client.get_run(run_id).data.tags:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp)
        return Checkpoint.from_dict(torch.load(local, weights_only=True))


def execute_run(spec: RunSpec, uri: str, run_id: str, *,
                on_step: Callable[[int, int], None] | None = None, checkpoint_every: int = 0,
                resume: Any = None) -> RunOutcome:
    """Train ``spec`` and record it in the MLflow run ``run_id`` of the store at ``uri``.

    The run must exist (see :func:`gradpipe.flows.tracking.create_child_run`);
    this sets it RUNNING, logs params, tags, metrics and artifacts, and ends it
    FINISHED or FAILED. ``on_step(step, steps)`` reports progress.

    With ``checkpoint_every=K`` the model and optimizer states are logged as
    the artifact ``checkpoints/latest.pt`` every K steps and at the end (the
    final parameters); ``resume`` (a :class:`gradpipe.tasks.Checkpoint`) goes
    on from one (see :func:`resume_run`).

    Returns:
        The :class:`RunOutcome`. A diverged run or a user error (a GradError,
        an unknown task) is a FAILED outcome; other exceptions propagate, with
        the run marked FAILED, so that the caller may retry.
    """
    import gradpipe
    from ..runtime.nonfinite import NonFiniteError
    from ..tasks import Diverged, get_task, run_task
    from .figures import loss_curves

    log = tracking.RunLogger(uri, run_id)
    log.start()
    outcome = RunOutcome(spec=spec, run_id=run_id, status="FAILED")
    curve: list[tuple[int, float]] = []
    try:
        skip = _logged_upto(uri, run_id)
        if skip:  # a retry: the earlier attempt's failure is history, its steps are kept
            log.tags({"gradpipe.resumed_after_step": str(skip)})
            _clear_failure(uri, run_id)
        program = load_pipeline(spec.pipeline)
        the_task = get_task(spec.task, **dict(spec.task_options))
        steps = spec.steps or the_task.default_steps
        outcome.metric, outcome.higher_is_better = the_task.metric, the_task.higher_is_better
        program.check_hyperparams(spec.hyperparams, "the run's hyperparameters")
        if not skip and resume is None:
            log.params(run_params(spec, program, steps))
            log.tags(run_tags(spec))
            log.dict(spec.to_json(), SPEC_ARTIFACT)
            for name, text in tracking.pipeline_artifacts(program, program.source).items():
                log.text(text, f"pipeline/{name}")
        if resume is not None:
            log.tags({"gradpipe.resumed_from_step": str(resume.step)})
            _clear_failure(uri, run_id)
        if checkpoint_every:
            log.tags({"gradpipe.checkpoint_every": str(checkpoint_every)})

        import torch
        torch.set_num_threads(spec.threads)  # process-wide: every run of a comparison asks the same

        made: list[Any] = []

        def make_optimizer(model):
            made.append(gradpipe.Optimizer(model.named_parameters(), program, backend=spec.backend,
                                           **dict(spec.hyperparams)))
            return made[-1]

        def step_hook(rec) -> None:
            curve.append((rec.step, rec.loss))
            if on_step is not None:
                on_step(rec.step, steps)
            if rec.step <= skip:
                return
            values = {"train/loss": rec.loss, "opt/grad_norm": rec.grad_norm,
                      "opt/update_norm": rec.update_norm, "time/step_ms": rec.seconds * 1e3,
                      # steps skipped for a NaN/Inf gradient so far (the pipeline's non-finite policy)
                      "opt/nonfinite_steps": float(made[-1].nonfinite_steps)}
            if len(rec.losses) > 1:
                values.update({f"train/loss_{k}": v for k, v in rec.losses.items()})
            log.metrics(values, rec.step)

        def eval_hook(rec) -> None:
            if rec.step > skip:
                log.metrics({f"eval/{k}": v for k, v in rec.metrics.items()}, rec.step)

        start = time.perf_counter()
        try:
            result = run_task(the_task, make_optimizer, steps=steps, seed=spec.seed, eval_every=spec.eval_every,
                              on_step=step_hook, on_eval=eval_hook, resume=resume,
                              checkpoint_every=checkpoint_every,
                              on_checkpoint=(lambda c: (log.flush(), _save_checkpoint(uri, run_id, c)))
                              if checkpoint_every else None)
        finally:
            outcome.seconds = time.perf_counter() - start
            outcome.losses = [v for _, v in curve]
            if curve:
                log.figure(loss_curves({spec.label: curve}, f"{spec.run_name} on {spec.task}"), "plots/loss.png")
        outcome.metrics = dict(result.metrics)
        outcome.final_loss = result.final_loss
        if resume is not None or skip:  # this attempt trained only the tail: the run's whole curve is in MLflow
            log.flush()
            outcome.losses = _logged_losses(uri, run_id)
            tail = outcome.losses[-10:]
            outcome.final_loss = math.fsum(tail) / len(tail) if tail else math.nan
        log.metrics({"final/loss": result.final_loss, "final/seconds": outcome.seconds,
                     **{f"final/{k}": v for k, v in result.metrics.items()}}, steps)
        outcome.status = "FINISHED"
        log.finish("FINISHED")
        return outcome
    except (Diverged, NonFiniteError) as e:  # answers about the pipeline, not accidents: no retry
        outcome.reason = str(e).splitlines()[0]
        log.finish("FAILED", outcome.reason)
        return outcome
    except Exception as e:
        outcome.reason = _one_line(e)
        log.finish("FAILED", outcome.reason)
        if _is_user_error(e):
            return outcome
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit from a SIGTERM handler
        log.finish("KILLED", "interrupted")
        raise


def resume_run(uri: str, run_id: str, *, on_step: Callable[[int, int], None] | None = None,
               checkpoint_every: int = 0) -> RunOutcome:
    """Go on with an interrupted run (killed, crashed, failed on a transient error) in place.

    The run's ``run_spec.json`` says what it trains; its latest checkpoint (if
    any) where to start; steps already logged are not logged again. The
    parameters at the end are bitwise those of a run that never stopped
    (``tests/test_flows.py`` kills one with SIGKILL to check).

    Raises:
        ResumeError: the run finished, has no spec (not a gradpipe run), or
            its pipeline file changed since it started (the hash differs).
    """
    import json
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ResumeError(f"no run {run_id} in {uri}") from None
    if run.info.status == "FINISHED":
        raise ResumeError(f"run {run_id} already finished; nothing to resume")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = RunSpec.from_json(json.loads(pathlib.Path(
                client.download_artifacts(run_id, SPEC_ARTIFACT, tmp)).read_text()))
    except (MlflowException, OSError, ValueError, KeyError):
        raise ResumeError(f"run {run_id} has no {SPEC_ARTIFACT}: it was not started by gradpipe train/compare") from None
    program = load_pipeline(spec.pipeline)
    logged = run.data.params.get("pipeline_hash")
    if logged and logged != program.hash:
        raise ResumeError(f"the pipeline {spec.pipeline} changed since run {run_id} started "
                          f"(hash {program.hash}, the run has {logged}); resuming would mix two optimizers")
    ckpt = load_checkpoint(uri, run_id)
    every = checkpoint_every or int(run.data.tags.get("gradpipe.checkpoint_every", "0") or 0)
    return execute_run(spec, uri, run_id, on_step=on_step, checkpoint_every=every, resume=ckpt)


#: MLflow error codes a second attempt can get past (a server restarting, a busy store).
TRANSIENT_MLFLOW_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED",
                                    "DEADLINE_EXCEEDED", "ABORTED"})


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can fix ``exc``: the network or file system (:data:`TRANSIENT`), an
    MLflow server that is restarting or overloaded, or a SQLite store that is locked."""
    if isinstance(exc, TRANSIENT):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_MLFLOW_CODES or "database is locked" in str(exc)
    return "database is locked" in str(exc)


def _retry_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: only errors a second attempt can fix (:func:`is_transient`)."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001
        return is_transient(e)
    return False


def run_attempt(spec: RunSpec, uri: str, run_id: str, checkpoint_every: int = 0) -> RunOutcome:
    """One attempt at the run ``run_id``, whatever came before it: a run that already
    finished is read back, one with a checkpoint goes on from it, any other starts.

    This is the function behind :data:`train_task`. It has its own module-level name
    so that Dask pickles it by reference (a function named like the Task object that
    wraps it would be pickled by value, with whatever its globals hold)."""
    done = finished_outcome(spec, uri, run_id)
    if done is not None:
        return done
    return execute_run(spec, uri, run_id, checkpoint_every=checkpoint_every,
                       resume=load_checkpoint(uri, run_id) if checkpoint_every else None)


#: Prefect task: :func:`run_attempt`, retried (twice, 2 s apart) on transient errors only.
train_task = task(run_attempt, name="train-run", retries=2, retry_delay_seconds=2,
                  retry_condition_fn=_retry_transient, task_run_name="{spec.pipeline} seed={spec.seed}",
                  persist_result=False)


@flow(name="gradpipe-train", log_prints=False, persist_result=False)
def train_flow(spec: RunSpec, uri: str, experiment: str = "gradpipe") -> RunOutcome:
    """Prefect flow: one run as its own top-level MLflow run in ``experiment``."""
    exp_id = tracking.ensure_experiment(uri, experiment)
    run_id = tracking.create_child_run(uri, exp_id, None, spec.run_name, {}, {})
    return train_task(spec, uri, run_id)
