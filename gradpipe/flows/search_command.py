"""``gradpipe search``: the command line of :func:`gradpipe.flows.search.search`.

A mistake (a seed pipeline that does not compile, an unknown task, a
malformed option, a tracking store or Dask scheduler that does not answer, a
``--resume`` id that is not a search) is one line on stderr and exit status 2
before anything is written. A search that ran exits 1 only if every candidate
failed (``--top-k 0``, which writes no program, still exits 0).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable

__all__ = ["add_search_command", "cmd_search"]

#: Options that decide a search's candidates: a resumed search takes them from its parent run.
_CONFIG_OPTIONS = ("task", "seed_pipelines", "budget", "seed", "batch", "steps", "task_option", "lrs", "lr_spread",
                   "funnel_task", "funnel_option", "funnel_steps", "top_k", "population", "tournament")


def _given(value: Any, default: Any) -> Any:
    """``value`` unless the option was left out: a 0 given reaches make_config's range checks."""
    return default if value is None else value


def _config(args: argparse.Namespace):
    from .search import make_config
    from .spec import SpecError, parse_sets
    if not args.task or not args.seed_pipelines or args.budget is None:
        raise SpecError("give --task, --seed-pipelines and --budget (or --resume RUN_ID)")
    return make_config([p.strip() for p in args.seed_pipelines.split(",") if p.strip()], args.task, args.budget,
                       seed=args.seed or 0, batch=_given(args.batch, args.workers), steps=args.steps,
                       task_options=parse_sets(args.task_option, "--task-option"), lrs=_given(args.lrs, 3),
                       lr_spread=_given(args.lr_spread, 10.0), funnel_task=args.funnel_task,
                       funnel_options=parse_sets(args.funnel_option, "--funnel-option"),
                       funnel_steps=args.funnel_steps, top_k=_given(args.top_k, 3),
                       population=_given(args.population, 16), tournament=_given(args.tournament, 4),
                       backend=args.backend, threads=args.threads)


def cmd_search(args: argparse.Namespace) -> int:
    from .commands import _end_runs_on_sigterm, _fail, _ui_hint, _user_errors
    from .search import SearchResumeError, search, search_progress
    from .spec import SpecError
    try:
        if args.resume:
            given = [f"--{o.replace('_', '-')}" for o in _CONFIG_OPTIONS if getattr(args, o) is not None]
            if given:
                raise SpecError(f"--resume takes the search's settings from its parent run: drop {', '.join(given)}")
            config = None
        else:
            config = _config(args)
        _end_runs_on_sigterm()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a resume reads the sources back
        with search_progress(lambda line: print(line, file=sys.stderr, flush=True)):
            result = search(config, resume=args.resume, runner=args.runner, address=args.address,
                            workers=args.workers, tracking_uri=args.tracking_uri, experiment=args.experiment,
                            out_dir=args.out,
                            on_parent=lambda rid: print(f"MLflow parent run {rid}", flush=True))
    except _user_errors() + (SearchResumeError,) as e:
        return _fail("search", e)
    _print_top(result)
    print(_ui_hint(result.tracking_uri, result.experiment_id, result.parent_run_id))
    return 1 if result.failed == len(result.history) else 0


def _print_top(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    r = result
    print(f"{len(r.history)} candidates evaluated ({r.trained} trained now, {r.read_back} read from MLflow), "
          f"{r.failed} failed, {r.invalid} invalid and {r.duplicates} duplicate mutants rejected")
    t = Table(title=f"top {len(r.finalists)} (written to {r.files[0].parent if r.files else '-'})")
    for col in ("#", "key", "mutation", "score", "funnel score", "file"):
        t.add_column(col)
    for i, (f, path) in enumerate(zip(r.finalists, r.files), 1):
        funnel = "" if f.funnel_score is None else ("failed" if not math.isfinite(f.funnel_score)
                                                    else f"{f.funnel_score:.4f}")
        t.add_row(str(i), f.candidate.key[:12], f.candidate.mutation[:60], f"{f.score:.4f}", funnel, path.name)
    Console(file=sys.stdout, width=140).print(t)


def add_search_command(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``search`` to the CLI's subparsers (``common``: the shared tracking/backend options)."""
    p = sub.add_parser("search", help="evolve new pipelines from seed pipelines (regularized evolution; MLflow, "
                       "resumable, on Dask too)",
                       description="Regularized evolution over .grad programs: each candidate is scored by a short "
                       "learning-rate sweep on --task, the best --top-k are evaluated again on --funnel-task and "
                       "written as .grad files with their lineage. Exit status 1 only if every candidate failed. "
                       "docs/search.md has the details.")
    p.add_argument("--task", help="the proxy task every candidate trains on (digits, or package.module:factory)")
    p.add_argument("--seed-pipelines", metavar="A,B", help="comma-separated names or .grad files to start from")
    p.add_argument("--budget", type=int, help="candidates to evaluate (the seed pipelines count)")
    p.add_argument("--seed", type=int, help="the evolution's random seed (default 0)")
    p.add_argument("--batch", type=int, help="candidates evaluated side by side per round (default: --workers); "
                   "part of the search's identity, with --seed")
    p.add_argument("--task-option", action="append", metavar="NAME=VALUE",
                   help="an option of --task, e.g. hidden=16 (repeatable)")
    p.add_argument("--lrs", type=int, help="learning rates per candidate, log-spaced around its default (default 3)")
    p.add_argument("--lr-spread", type=float, help="largest over smallest learning rate of the sweep (default 10)")
    p.add_argument("--funnel-task", help="re-evaluate the top --top-k on this (larger) task")
    p.add_argument("--funnel-option", action="append", metavar="NAME=VALUE", help="an option of --funnel-task")
    p.add_argument("--funnel-steps", type=int, help="steps on --funnel-task (default: the task's)")
    p.add_argument("--top-k", type=int, help="programs to re-evaluate and write (default 3; 0: none)")
    p.add_argument("--population", type=int, help="the evolution's population (default 16)")
    p.add_argument("--tournament", type=int, help="the tournament size (default 4)")
    p.add_argument("--out", metavar="DIR", help="where the top programs go (default ./search-<parent run id>)")
    p.add_argument("--resume", metavar="RUN_ID", help="go on with a search that stopped, from what MLflow holds")
    p.add_argument("--runner", default="local", choices=("local", "dask"), help="Prefect task runner")
    p.add_argument("--address", help="with --runner dask: an existing scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, default=2, help="threads (local) or LocalCluster workers (dask)")
    common(p)
    p.set_defaults(func=cmd_search, experiment="gradpipe-search")
