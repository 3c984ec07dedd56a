"""Compare pipelines: every pipeline x seed x grid point, fanned out by a Prefect task runner.

:func:`compare` checks everything first (pipelines compile, the task
exists, grid names are hyperparameters of every pipeline, the tracking store
answers, the Dask scheduler answers), so a mistake costs nothing and leaves
nothing half-written. Then the :func:`compare_flow` flow opens one MLflow
parent run, creates every child run (SCHEDULED, so the whole sweep is visible
in the UI at once), submits one :data:`~gradpipe.flows.train.train_task` per
run to the task runner, and closes the parent with a comparison table and a
figure of every curve.

Runners:

- ``local`` (default): Prefect's thread pool, ``workers`` runs at a time.
- ``dask``: :class:`prefect_dask.DaskTaskRunner`, on a new
  ``distributed.LocalCluster`` of ``workers`` processes, or on an existing
  cluster at ``address`` (every worker needs gradpipe installed at the same
  version: tasks are pickled by reference).

Runs get the tracking URI as an argument, never from the environment, and
log with explicit run ids: MLflow's active-run stack is per thread and per
process, so ``nested=True`` would not nest here.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefect import flow

from . import tracking
from .checks import fitting_task, grad_files  # noqa: F401  (re-exported)
from .spec import RunSpec, SpecError, grid_points, pipeline_label
from .train import RunOutcome, load_pipeline, run_params, run_tags, train_task

__all__ = ["RANKED_COLUMNS", "Comparison", "RankedRow", "compare", "compare_flow", "make_runner", "fitting_task",
           "grad_files",
           "plan_runs", "rank", "check_dask_address", "progress_hook"]

_progress: list[Callable[[RunOutcome], None]] = []


@contextlib.contextmanager
def progress_hook(fn: Callable[[RunOutcome], None]) -> Iterator[None]:
    """Call ``fn(outcome)`` as each run of a :func:`compare` in this process finishes."""
    _progress.append(fn)
    try:
        yield
    finally:
        _progress.remove(fn)


def _notify(outcome: RunOutcome) -> None:
    # a module-level function, not the list itself, in the flow's code: Prefect ships the flow
    # to Dask workers pickled by value, and the CLI's hooks hold a terminal (locks, threads)
    for fn in list(_progress):
        fn(outcome)


@dataclass
class RankedRow:
    """One line of the ranked table: a pipeline and hyperparameters, over its seeds."""

    label: str
    pipeline: str
    hyperparams: dict[str, Any]
    finished: int
    failed: int
    score_mean: float
    score_std: float
    loss_mean: float
    loss_std: float
    seconds_mean: float
    reasons: list[str] = field(default_factory=list)


RANKED_COLUMNS = ("rank", "pipeline", "runs", "score", "final loss", "s/run")


@dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        experiment_id / parent_run_id: where MLflow keeps it.
        outcomes: every run, in plan order.
        ranking: :func:`rank` of the outcomes.
        metric / higher_is_better: the task's headline metric.
        tracking_uri: the store.
    """

    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    outcomes: list[RunOutcome]
    ranking: list[RankedRow]
    metric: str
    higher_is_better: bool

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def all_failed(self) -> bool:
        return bool(self.outcomes) and all(not o.ok for o in self.outcomes)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def rank(outcomes: Sequence[RunOutcome], higher_is_better: bool) -> list[RankedRow]:
    """Group runs by label (pipeline + hyperparameters), average over seeds, best first.

    A group with any finished run ranks by the mean of its headline metric;
    groups where every run failed come last.
    """
    groups: dict[str, list[RunOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.spec.label, []).append(o)
    rows = []
    for label, runs in groups.items():
        ok = [o for o in runs if o.ok]
        sm, ss = _mean_std([o.score for o in ok])
        lm, ls = _mean_std([o.final_loss for o in ok])
        rows.append(RankedRow(label=label, pipeline=pipeline_label(runs[0].spec.pipeline),
                              hyperparams=dict(runs[0].spec.hyperparams), finished=len(ok),
                              failed=len(runs) - len(ok), score_mean=sm, score_std=ss, loss_mean=lm,
                              loss_std=ls, seconds_mean=_mean_std([o.seconds for o in ok])[0],
                              reasons=sorted({o.reason for o in runs if o.reason})))
    sign = -1.0 if higher_is_better else 1.0
    rows.sort(key=lambda r: (math.isnan(r.score_mean), sign * r.score_mean if not math.isnan(r.score_mean) else 0.0,
                             r.loss_mean if not math.isnan(r.loss_mean) else math.inf, r.label))
    return rows


def ranking_markdown(rows: Sequence[RankedRow], metric: str) -> str:
    """The ranked table as Markdown (the parent run's ``comparison.md``)."""
    lines = [f"| rank | pipeline | runs | {metric} (mean ± sd) | final loss (mean ± sd) | s/run |",
             "|---:|---|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        runs = f"{r.finished}/{r.finished + r.failed}"
        score = "failed" if math.isnan(r.score_mean) else f"{r.score_mean:.4f} ± {r.score_std:.4f}"
        loss = "" if math.isnan(r.loss_mean) else f"{r.loss_mean:.4f} ± {r.loss_std:.4f}"
        secs = "" if math.isnan(r.seconds_mean) else f"{r.seconds_mean:.2f}"
        lines.append(f"| {i} | {r.label} | {runs} | {score} | {loss} | {secs} |")
    return "\n".join(lines) + "\n"


def plan_runs(pipelines: Sequence[str], task: str, seeds: Sequence[int], *, steps: int | None = None,
              grid: Mapping[str, Sequence[Any]] | None = None, sets: Mapping[str, Any] | None = None,
              per_pipeline: Mapping[str, Mapping[str, Any]] | None = None, backend: str = "eager",
              task_options: Mapping[str, Any] | None = None, eval_every: int | None = None,
              task_losses: Sequence[str] | None = None, threads: int = 1) -> list[RunSpec]:
    """Every run of a comparison, checked: pipelines x grid points x seeds.

    ``sets`` apply to every pipeline; ``per_pipeline[label]`` (e.g. the demo's
    tuned learning rates) apply to one and lose to ``sets`` and the grid.

    Raises:
        GradError: a pipeline does not compile, or a hyperparameter is unknown
            to it or out of its range.
        SpecError: no pipelines or no seeds, the same pipeline twice, or a
            pipeline that reads named losses (``grads.main``) the task does
            not have (``task_losses``).
    """
    if not pipelines:
        raise SpecError("no pipelines to compare")
    if not seeds:
        raise SpecError("no seeds: give --seeds N (at least 1)")
    labels = [pipeline_label(p) for p in pipelines]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SpecError(f"pipeline {dup[0]!r} given twice")
    points = grid_points(grid or {})
    specs = []
    for ref, label in zip(pipelines, labels):
        program = load_pipeline(ref)
        missing = sorted(set(program.losses) - set(task_losses)) if task_losses is not None else []
        if missing:
            raise SpecError(f"{label} reads {', '.join('grads.' + m for m in missing)}, but task {task!r} has "
                            f"the losses {', '.join(task_losses or ()) or 'none'}: choose a multi-loss task "
                            f"such as digits-multitask")
        for point in points:
            hp = dict((per_pipeline or {}).get(label, {}))
            hp.update(sets or {})
            hp.update(point)
            hp = {k: v for k, v in hp.items() if k in program.hyperparams or k in (sets or {}) or k in point}
            program.check_hyperparams(hp, "--set/--grid")
            for seed in seeds:
                specs.append(RunSpec(pipeline=_absolute(ref), task=task, seed=int(seed), steps=steps, hyperparams=hp,
                                     backend=backend, task_options=dict(task_options or {}), eval_every=eval_every,
                                     threads=threads))
    return specs


def _absolute(ref: str) -> str:
    """A pipeline file as an absolute path (runs on other processes, or resumed later from another
    folder, must find it); a built-in name as it is."""
    p = pathlib.Path(ref)
    return str(p.resolve()) if p.suffix == ".grad" and p.is_file() else str(ref)


def check_dask_address(address: str, timeout: float = 10.0) -> None:
    """Raise :class:`tracking.TrackingError`-like ``ConnectionError`` unless a Dask scheduler answers."""
    from distributed import Client
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ConnectionError(f"no Dask scheduler answers at {address} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'timed out'})") from None
    client.close()


def make_runner(runner: str = "local", *, address: str | None = None, workers: int = 2) -> Any:
    """The Prefect task runner for ``--runner``."""
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    if runner == "dask":
        from prefect_dask import DaskTaskRunner
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers))
    raise SpecError(f"unknown runner {runner!r}: choose local or dask")


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments for ``--runner dask`` without ``--address``: worker
    processes of one thread, everything on 127.0.0.1, no dashboard. The scheduler still serves
    its small HTTP API (health, metrics); it goes on a free loopback port instead of Dask's
    default 8787, which a second comparison running at the same time would find taken."""
    return {"n_workers": max(1, workers), "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "host": "127.0.0.1",
            "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}


@flow(name="gradpipe-compare", persist_result=False, log_prints=False)
def compare_flow(specs: list[RunSpec], uri: str, experiment_id: str, name: str = "compare",
                 parent_params: dict[str, str] | None = None, checkpoint_every: int = 0,
                 baseline: str | None = None) -> Comparison:
    """Prefect flow: one parent run, one child run per spec, fanned out on the flow's task runner."""
    from ..tasks import get_task
    from .figures import band_curves
    import gradpipe

    first = get_task(specs[0].task, **dict(specs[0].task_options))
    metric, higher = first.metric, first.higher_is_better
    parent = tracking.start_parent_run(
        uri, experiment_id, name, dict(parent_params or {}),
        {"gradpipe.version": gradpipe.__version__, "gradpipe.kind": "comparison", **_flow_tags()})
    parent_log = tracking.RunLogger(uri, parent)
    try:
        if baseline is not None:  # what each pipeline changes, structurally, against the baseline
            from ..compiler.diff import diff_against_baseline
            refs = {pipeline_label(s.pipeline): s.pipeline for s in specs}
            text, data = diff_against_baseline(load_pipeline(baseline),
                                               {k: load_pipeline(v) for k, v in refs.items()})
            parent_log.text(text, "diff_vs_baseline.txt")
            parent_log.dict(data, "diff_vs_baseline.json")
            parent_log.tags({"gradpipe.baseline": pipeline_label(baseline)})
        children: list[str] = []
        create_children(specs, uri, experiment_id, parent, first.default_steps, into=children)
        outcomes = run_children(specs, children, uri, checkpoint_every, metric, higher)
        ranking = rank(outcomes, higher)
        table = ranking_markdown(ranking, metric)
        parent_log.text(table, "comparison.md")
        parent_log.dict({"metric": metric, "higher_is_better": higher,
                         "rows": [{"rank": i, **r.__dict__} for i, r in enumerate(ranking, 1)],
                         "runs": [{"run_id": o.run_id, "label": o.spec.label, "seed": o.spec.seed,
                                   "status": o.status, "reason": o.reason, metric: o.score,
                                   "final_loss": o.final_loss} for o in outcomes]},
                        "comparison.json")
        groups: dict[str, list[list[float]]] = {}
        for o in outcomes:
            if o.losses:
                groups.setdefault(o.spec.label, []).append(o.losses)
        if groups:
            parent_log.figure(band_curves(groups, f"{len(specs)} runs on {specs[0].task}"), "plots/loss_curves.png")
        best = next((r for r in ranking if not math.isnan(r.score_mean)), None)
        if best is not None:
            parent_log.metrics({f"best/{metric}": best.score_mean}, 0)
            parent_log.tags({"gradpipe.best": best.label})
        failed = [o for o in outcomes if not o.ok]
        parent_log.metrics({"runs/finished": len(outcomes) - len(failed), "runs/failed": len(failed)}, 0)
        all_failed = bool(outcomes) and len(failed) == len(outcomes)
        parent_log.finish("FAILED" if all_failed else "FINISHED", "every run failed" if all_failed else None)
        return Comparison(experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri, outcomes=outcomes,
                          ranking=ranking, metric=metric, higher_is_better=higher)
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        parent_log.finish("FAILED", reason)
        _end_unfinished(uri, children if "children" in locals() else [], f"the comparison stopped ({reason})")
        raise


def create_children(specs: Sequence[RunSpec], uri: str, experiment_id: str, parent: str, default_steps: int, *,
                    into: list[str], tags: Mapping[str, str] | None = None, prefix: str = "") -> list[str]:
    """Create one SCHEDULED child run of ``parent`` per spec (named ``prefix`` + the run name, with
    the extra ``tags``), appending each id to ``into`` as it is made: a flow that stops halfway
    knows which runs exist (:func:`_end_unfinished`). Returns ``into``."""
    for spec in specs:
        program = load_pipeline(spec.pipeline)
        steps = spec.steps or default_steps
        into.append(tracking.create_child_run(uri, experiment_id, parent, prefix + spec.run_name,
                                              run_params(spec, program, steps), run_tags(spec, dict(tags or {}))))
    return into


def run_children(specs: Sequence[RunSpec], children: Sequence[str], uri: str, checkpoint_every: int, metric: str,
                 higher: bool) -> list[RunOutcome]:
    """Submit one :data:`train_task` per (spec, child run) to the flow's task runner and wait for
    them all; a run whose retries ran out is a FAILED outcome (and FAILED in MLflow), never an
    exception. Outcomes come back in ``specs`` order; each is passed to the progress hooks."""
    futures = [train_task.submit(spec, uri, rid, checkpoint_every) for spec, rid in zip(specs, children)]
    outcomes: list[RunOutcome] = []
    for spec, rid, fut in zip(specs, children, futures):
        try:
            out = fut.result()
        except Exception as e:  # retries exhausted: the run is FAILED in MLflow already
            out = RunOutcome(spec=spec, run_id=rid, status="FAILED",
                             reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             metric=metric, higher_is_better=higher)
            tracking.RunLogger(uri, rid).finish("FAILED", out.reason)
        outcomes.append(out)
        _notify(out)
    return outcomes


def _end_unfinished(uri: str, run_ids: Sequence[str], reason: str) -> None:
    """Mark the runs of a comparison that stopped, and that no task will finish, as KILLED
    (not left SCHEDULED or RUNNING forever); what they logged stays."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    for rid in run_ids:
        try:
            if client.get_run(rid).info.status in ("SCHEDULED", "RUNNING"):
                tracking.RunLogger(uri, rid).finish("KILLED", reason[:2000])
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _flow_tags() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run
        return {"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}
    except Exception:  # pragma: no cover
        return {}


def compare(pipelines: Sequence[str], task: str = "digits", seeds: Sequence[int] = (0,), *,
            steps: int | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
            sets: Mapping[str, Any] | None = None, per_pipeline: Mapping[str, Mapping[str, Any]] | None = None,
            runner: str = "local", address: str | None = None, workers: int = 2,
            tracking_uri: str | None = None, experiment: str = "gradpipe", backend: str = "eager",
            task_options: Mapping[str, Any] | None = None, eval_every: int | None = None,
            name: str | None = None, checkpoint_every: int = 0, threads: int = 1,
            baseline: str | None = None) -> Comparison:
    """Run a comparison and return it (see the module docstring).

    Everything is checked before anything is written: a GradError for a bad
    pipeline or hyperparameter, a :class:`gradpipe.tasks.TaskError` for a bad
    task, :class:`tracking.TrackingError` for a store that does not answer,
    ``ConnectionError`` for a Dask address that does not answer.

    ``checkpoint_every=K`` logs each run's model and optimizer state every K
    steps and at the end (``checkpoints/latest.pt``); a retried run then goes on
    from its latest checkpoint instead of step 1. ``threads`` is each run's
    ``torch.set_num_threads`` (1 by default: runs go side by side).
    """
    from ..runtime.optimizer import BACKENDS
    from ..tasks import get_task
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    the_task = get_task(task, **dict(task_options or {}))
    specs = plan_runs(pipelines, task, seeds, steps=steps, grid=grid, sets=sets, per_pipeline=per_pipeline,
                      backend=backend, task_options=task_options, eval_every=eval_every,
                      task_losses=the_task.loss_names, threads=threads)
    runner_obj = make_runner(runner, address=address, workers=1 if backend == "compiled" else workers)
    if runner == "dask" and address:
        check_dask_address(address)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    exp_id = tracking.ensure_experiment(uri, experiment)  # creates the store before any fan-out
    labels = sorted({pipeline_label(p) for p in pipelines})
    title = name or f"compare {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''} on {task}"
    parent_params = {"task": task, "seeds": ",".join(str(s) for s in seeds), "pipelines": ",".join(labels)[:5000],
                     "runs": str(len(specs)), "runner": runner, "backend": backend,
                     "steps": str(steps) if steps else "default"}
    parent_params.update({f"grid.{k}": ",".join(map(str, v)) for k, v in (grid or {}).items()})
    if baseline is not None:
        load_pipeline(baseline)  # a GradError now, not after the parent run exists
    return compare_flow.with_options(task_runner=runner_obj)(specs, uri, exp_id, title, parent_params,
                                                             checkpoint_every, baseline)
