"""The orchestration commands of the CLI: ``train``, ``compare``, ``serve``, ``ui`` and ``demo``.

Each ``cmd_*`` takes the parsed arguments and returns the exit status. Every
mistake a user can make (a bad pipeline, an unknown task, a malformed
``--set``, a tracking store or Dask scheduler that does not answer) is
one message on stderr and exit status 2 before anything is written; a
comparison exits 1 only if every run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from .server import apply_prefect_defaults

__all__ = ["add_commands", "DEMO_SINGLE", "DEMO_MULTI"]

#: The demo's single-loss comparison on ``digits``: the standard pipelines and the seed papers'.
DEMO_SINGLE: tuple[str, ...] = (
    "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rprop", "asgd", "lion", "diffgrad", "grams",
    "scalpel", "galore_adamw", "coap_adamw", "natural_galore_adamw", "gwt_adam", "sgg_adamw", "noisy_sgd",
    "dp_sgd", "econtrol_sgd", "aegd", "gravity",
)
#: The demo's multi-loss comparison on ``digits-multitask``.
DEMO_MULTI: tuple[str, ...] = ("adam", "pcgrad_adam", "gcond", "samgs_adam", "bloop_adam")


def _fail(command: str, exc: BaseException) -> int:
    text = str(exc).strip() or type(exc).__name__
    if type(exc).__name__ != "GradError":
        text = f"gradpipe {command}: {text}"
    print(text, file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..dsl.diagnostics import GradError
    from ..tasks import TaskError
    from .spec import SpecError
    from .tracking import TrackingError
    return (GradError, TaskError, SpecError, TrackingError, ConnectionError)


def _console():
    from rich.console import Console
    return Console(stderr=True)


def _fmt(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals, or ``digits - 1`` significant digits where those decimals would
    show only zeros (a suboptimality of 1.3e-08 is not 0.0000); "" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if x != 0 and math.isfinite(x) and abs(x) < 0.5 * 10 ** -(digits - 1):
        return f"{x:.{digits - 1}g}"
    return f"{x:.{digits}f}"


def print_ranking(result: Any, out=None) -> None:
    """The ranked table (mean and spread over seeds) on stdout."""
    from rich.console import Console
    from rich.table import Table
    console = Console(file=out or sys.stdout, width=140)
    t = Table(title=f"ranked by {result.metric} ({'higher' if result.higher_is_better else 'lower'} is better)")
    for col, just in (("#", "right"), ("pipeline", "left"), ("runs", "right"), (result.metric, "right"),
                      ("final loss", "right"), ("s/run", "right"), ("note", "left")):
        t.add_column(col, justify=just)
    for i, r in enumerate(result.ranking, 1):
        score = "failed" if math.isnan(r.score_mean) else f"{r.score_mean:.4f} ± {r.score_std:.4f}"
        loss = "" if math.isnan(r.loss_mean) else f"{r.loss_mean:.4f} ± {r.loss_std:.4f}"
        note = r.reasons[0][:60] if r.reasons else ""
        t.add_row(str(i), r.label, f"{r.finished}/{r.finished + r.failed}", score, loss, _fmt(r.seconds_mean, 2), note)
    console.print(t)


def _ui_hint(uri: str, exp_id: str, run_id: str, *, sweep: bool = True) -> str:
    """The command that opens the MLflow UI on this store, and the page to open: a sweep's
    runs in the chart view (every child's curves), or one run's page."""
    from .ui import experiment_runs_url
    arg = "" if uri == _default_uri() else f" --tracking-uri {uri}"
    base = "http://127.0.0.1:5000"
    page = (experiment_runs_url(base, exp_id, parent_run_id=run_id) if sweep
            else f"{base}/#/experiments/{exp_id}/runs/{run_id}")
    return f"look at it in the MLflow UI:  gradpipe ui{arg}\n  then open {page}"


def _default_uri() -> str:
    from .tracking import resolve_tracking_uri
    return resolve_tracking_uri(None)


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace, task: str, planned: int) -> Iterator[None]:
    """A progress bar on stderr while a comparison's ``planned`` runs go (a red line for each run
    that fails): on a terminal, or anywhere with ``--progress``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from .comparison import progress_hook
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal and not args.progress) as bar:
        job = bar.add_task(f"{task}: starting Prefect", total=None)

        def done(outcome) -> None:
            if bar.tasks[job].total is None:
                bar.update(job, total=planned)
            mark = "" if outcome.ok else f"  FAILED: {outcome.reason}"
            bar.update(job, advance=1, description=f"{task}: {outcome.spec.run_name}")
            if mark:
                console.print(f"[red]{outcome.spec.run_name}{mark}[/red]")

        with progress_hook(done):
            yield


def _run_compare(args: argparse.Namespace, pipelines: Sequence[str], task: str, seeds: Sequence[int], *,
                 per_pipeline: dict[str, dict[str, Any]] | None = None, name: str | None = None):
    from .comparison import compare
    from .spec import parse_grid, parse_sets
    sets = parse_sets(getattr(args, "set", None))
    grid = parse_grid(getattr(args, "grid", None))
    _end_runs_on_sigterm()
    planned = len(pipelines) * len(seeds) * max(1, math.prod(len(v) for v in grid.values()) if grid else 1)
    with progress_bar(args, task, planned):
        return compare(pipelines, task, seeds, steps=args.steps, grid=grid, sets=sets,
                       per_pipeline=per_pipeline, runner=getattr(args, "runner", "local"),
                       address=getattr(args, "address", None), workers=args.workers,
                       tracking_uri=args.tracking_uri, experiment=args.experiment, backend=args.backend,
                       name=name, threads=args.threads, baseline=getattr(args, "baseline", None),
                       checkpoint_every=getattr(args, "checkpoint_every", 0))


def _end_runs_on_sigterm() -> None:
    """A SIGTERM (Prefect cancelling, a scheduler stopping us) ends our open MLflow runs as
    KILLED instead of leaving them RUNNING forever."""
    from . import tracking
    tracking.install_sigterm_handler(tracking.end_open_runs)


def _pipelines(targets: Sequence[str], task: str) -> list[str]:
    """Names and files as given; a folder's ``.grad`` files that ``task`` can train (the others
    are listed on stderr: a folder usually mixes single- and multi-loss pipelines)."""
    from .checks import fitting_task, grad_files
    out: list[str] = []
    for t in targets:
        if not Path(t).is_dir():
            out.append(t)
            continue
        files = grad_files(t)
        if not files:
            from .spec import SpecError
            raise SpecError(f"no .grad files in {t}")
        fit, skipped = fitting_task(files, task)
        for f in skipped:
            print(f"skipping {f}: it reads named losses that task {task!r} does not have", file=sys.stderr)
        out.extend(fit)
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from .tune_command import cmd_tuned_compare, tune_requested
    if tune_requested(args):
        return cmd_tuned_compare(args)
    try:
        result = _run_compare(args, _pipelines(args.pipelines, args.task), args.task, list(range(args.seed, args.seed + args.seeds)))
    except _user_errors() as e:
        return _fail("compare", e)
    return report_comparison(result, print_ranking)


def report_comparison(result: Any, print_table: Any) -> int:
    """Print a comparison's table, its failed runs (stderr) and where to look at it in the
    MLflow UI; the exit status: 1 if every run failed, else 0."""
    print_table(result)
    failed = result.failed
    if failed:
        print(f"{len(failed)} of {len(result.outcomes)} runs failed:", file=sys.stderr)
        for o in failed:
            print(f"  {o.spec.run_name}: {o.reason}", file=sys.stderr)
    print(_ui_hint(result.tracking_uri, result.experiment_id, result.parent_run_id))
    return 1 if result.all_failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import tracking
    from .spec import RunSpec, parse_sets
    from .train import ResumeError, load_pipeline, run_params, run_tags
    from ..tasks import get_task
    try:
        if args.resume:
            if args.pipeline or args.set:
                raise ResumeError("--resume takes the pipeline and hyperparameters from the run: give neither")
            return _resume(args)
        if not args.pipeline:
            raise ResumeError("give a pipeline (FILE or NAME), or --resume RUN_ID")
        the_task = get_task(args.task)
        program = load_pipeline(args.pipeline)
        sets = parse_sets(args.set)
        program.check_hyperparams(sets, "--set")
        from .comparison import plan_runs
        spec: RunSpec = plan_runs([args.pipeline], args.task, [args.seed], steps=args.steps, sets=sets,
                                  backend=args.backend, task_losses=the_task.loss_names, threads=args.threads)[0]
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking_uri(uri)
        exp_id = tracking.ensure_experiment(uri, args.experiment)
    except _user_errors() + (ResumeError,) as e:
        return _fail("train", e)
    steps = spec.steps or the_task.default_steps
    run_id = tracking.create_child_run(uri, exp_id, None, spec.run_name, run_params(spec, program, steps),
                                       run_tags(spec))
    print(f"MLflow run {run_id}", flush=True)
    outcome = _train_with_progress(args, spec.run_name, steps, lambda on_step: _in_flow(
        "execute", spec, uri, run_id, on_step, args.checkpoint_every))
    return _report_run(outcome, uri, exp_id, run_id)


def _resume(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient
    from . import tracking
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking_uri(uri)
    from .train import ResumeError, load_checkpoint
    try:
        run = MlflowClient(tracking_uri=uri).get_run(args.resume)
    except Exception:  # noqa: BLE001 - MlflowException for an unknown id
        raise ResumeError(f"no run {args.resume} in {uri}") from None
    ckpt = load_checkpoint(uri, args.resume)
    steps = int(run.data.params.get("steps", "0") or 0) or None
    start = ckpt.step if ckpt is not None else 0
    print(f"resuming MLflow run {args.resume} ({run.info.run_name}) from step {start}", flush=True)
    outcome = _train_with_progress(args, run.info.run_name, steps, lambda on_step: _in_flow(
        "resume", None, uri, args.resume, on_step, args.checkpoint_every))
    return _report_run(outcome, uri, run.info.experiment_id, args.resume)


def _train_with_progress(args: argparse.Namespace, name: str, steps: int | None, go):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    _end_runs_on_sigterm()
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal and not args.progress) as bar:
        job = bar.add_task(name, total=steps)
        return go(lambda s, n: bar.update(job, completed=s, total=n))


def _report_run(outcome, uri: str, exp_id: str, run_id: str) -> int:
    spec = outcome.spec
    if outcome.ok:
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(outcome.metrics.items()))
        print(f"{spec.run_name} on {spec.task}: final loss {outcome.final_loss:.4f}  {metrics}")
    else:
        print(f"{spec.run_name} on {spec.task} FAILED: {outcome.reason}", file=sys.stderr)
    print(_ui_hint(uri, exp_id, run_id, sweep=False))
    return 0 if outcome.ok else 1


def _in_flow(kind: str, spec, uri: str, run_id: str, on_step, checkpoint_every: int):
    """One run inside a Prefect flow run (so it shows in Prefect), with a progress callback."""
    from prefect import flow
    from .train import execute_run, resume_run

    @flow(name="gradpipe-train", persist_result=False, validate_parameters=False)
    def gradpipe_train(run_id: str):
        if kind == "resume":
            return resume_run(uri, run_id, on_step=on_step, checkpoint_every=checkpoint_every)
        return execute_run(spec, uri, run_id, on_step=on_step, checkpoint_every=checkpoint_every)

    return gradpipe_train(run_id)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import start_prefect_server
    from .spec import parse_sets
    server = None
    try:
        sets = parse_sets(args.set)
        from .checks import check_serve
        check_serve(args.directory, args.cron, task=args.task, seeds=args.seeds)  # before starting anything
        if not os.environ.get("PREFECT_API_URL"):
            home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
            print(f"PREFECT_API_URL is not set: starting a Prefect server on 127.0.0.1 (PREFECT_HOME={home}); "
                  "schedules need one", file=sys.stderr)
            server = start_prefect_server(home, port=args.prefect_port)
            os.environ["PREFECT_API_URL"] = server.api_url
            print(f"Prefect server at {server.api_url.removesuffix('/api')}", file=sys.stderr)
        from .schedule import serve  # imports prefect, which reads PREFECT_API_URL once
        serve(args.directory, args.cron, name=args.name, task=args.task, seeds=args.seeds, steps=args.steps,
              tracking_uri=args.tracking_uri, experiment=args.experiment, backend=args.backend, sets=sets,
              threads=args.threads)
    except _user_errors() as e:
        return _fail("serve", e)
    except RuntimeError as e:
        return _fail("serve", e)
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from . import tracking
    from .ui import UIError, run_ui
    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        return run_ui(uri, host=args.host, port=args.port)
    except _user_errors() + (UIError,) as e:
        return _fail("ui", e)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import lr_for
    from .spec import pipeline_label
    single = list(args.pipelines) if args.pipelines else list(DEMO_SINGLE)
    runs = [("digits", single)]
    if not args.pipelines:
        runs.append(("digits-multitask", list(DEMO_MULTI)))
    status = 0
    last = None
    for task, pipelines in runs:
        lrs = {pipeline_label(p): {"lr": lr_for(p)} for p in pipelines}
        print(f"\n== {len(pipelines)} pipelines on {task}, {args.seeds} seed(s), {args.steps} steps ==")
        try:
            result = _run_compare(args, pipelines, task, list(range(args.seed, args.seed + args.seeds)),
                                  per_pipeline=lrs, name=f"demo: {task}")
        except _user_errors() as e:
            return _fail("demo", e)
        print_ranking(result)
        for o in result.failed:
            print(f"  FAILED {o.spec.run_name}: {o.reason}", file=sys.stderr)
        status = max(status, 1 if result.all_failed else 0)
        last = result
    if last is not None:
        print("\n" + _ui_hint(last.tracking_uri, last.experiment_id, last.parent_run_id))
    return status


def _common(p: argparse.ArgumentParser, *, steps_default: int | None = None) -> None:
    p.add_argument("--steps", type=int, default=steps_default, help="optimizer steps (default: the task's)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--experiment", default="gradpipe", help="MLflow experiment (default %(default)s)")
    p.add_argument("--backend", default=os.environ.get("GRADPIPE_BACKEND", "eager"), choices=("eager", "compiled"),
                   help="gradpipe backend (default $GRADPIPE_BACKEND or eager: small tasks finish before "
                   "compiling would pay off)")
    p.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: small tasks run side by side; part of a run's identity)")


def add_commands(sub: Any) -> None:
    """Add ``train``, ``compare``, ``serve``, ``ui`` and ``demo`` to the CLI's subparsers."""
    apply_prefect_defaults()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial MLflow database tables..."
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a LocalCluster's workers inherit it
    p = sub.add_parser("train", help="train one pipeline on a task, recorded in MLflow")
    p.add_argument("pipeline", metavar="FILE|NAME", nargs="?")
    p.add_argument("--resume", metavar="RUN_ID", help="go on with an interrupted run from its latest checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="K",
                   help="log model and optimizer state every K steps and at the end (default 50; 0: never)")
    p.add_argument("--task", default="digits", help="a built-in task (digits, digits-cnn, charlm, tinylm, quadratic, "
                   "...: docs/orchestration.md section 7) or package.module:factory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a hyperparameter (repeatable)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="compare pipelines over seeds and a grid (a Prefect flow, MLflow runs)")
    p.add_argument("pipelines", nargs="+", metavar="FILE|NAME|DIR")
    p.add_argument("--task", default="digits", help="a built-in task (digits, digits-cnn, charlm, tinylm, quadratic, "
                   "...: docs/orchestration.md section 7) or package.module:factory")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds per pipeline (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a hyperparameter for every run")
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2", help="try each value (repeatable: a product)")
    p.add_argument("--runner", default="local", choices=("local", "dask"), help="Prefect task runner")
    p.add_argument("--address", help="with --runner dask: an existing scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (local) or LocalCluster workers (dask)")
    p.add_argument("--baseline", metavar="FILE|NAME",
                   help="log on the parent run what each pipeline changes against this one (gradpipe diff)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="log each run's model and optimizer state every K steps (default 0: never); "
                   "a retried run goes on from it")
    _common(p)
    from .tune_command import add_tune_arguments
    add_tune_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="serve a Prefect deployment that re-runs a comparison on a cron schedule")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * *" (every day at 03:00)')
    p.add_argument("--name", help="deployment name (default: the folder's name)")
    p.add_argument("--task", default="digits")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--set", action="append", metavar="NAME=VALUE")
    p.add_argument("--prefect-port", type=int, default=4200,
                   help="port of the Prefect server started when PREFECT_API_URL is unset (default 4200)")
    _common(p)
    p.set_defaults(func=cmd_serve, experiment="gradpipe-scheduled")

    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 against the same store")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("demo", help="compare the standard and seed pipelines on digits; print the ranked table")
    p.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="names or .grad files (default: the demo set)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    _common(p, steps_default=200)
    p.set_defaults(func=cmd_demo, experiment="gradpipe-demo")

    from .search_command import add_search_command
    add_search_command(sub, _common)
