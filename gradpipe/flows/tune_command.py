"""``gradpipe compare --tune``: the command line of :func:`gradpipe.flows.tuning.tuned_compare`.

``compare`` hands over to :func:`cmd_tuned_compare` when any tuning flag is
given; the flags are added to ``compare``'s parser by :func:`add_tune_arguments`.
Mistakes are one line on stderr and exit status 2 before anything is written;
the command exits 1 when no reporting run finished.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Any

__all__ = ["add_tune_arguments", "tune_requested", "cmd_tuned_compare", "print_tuned_ranking"]

_FLAGS = ("tune", "tune_budget", "tune_seeds", "target", "eval_every")


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """``--tune``, ``--tune-budget``, ``--tune-seeds``, ``--target`` and ``--eval-every``."""
    g = p.add_argument_group("fair comparison (tune every pipeline with the same budget first)")
    g.add_argument("--tune", action="append", metavar="NAME=LO..HI:log:N",
                   help="tune NAME over LO..HI:log:N (N values evenly spaced in log), LO..HI:lin:N, or a list "
                   "V1,V2,...; repeatable (the product is the grid). Each pipeline's best trial on held-out "
                   "training data (holdout=tune) is then run on --seeds and ranked")
    g.add_argument("--tune-budget", type=int, metavar="B",
                   help="trials per pipeline, the same points for every pipeline (default: the whole grid; "
                   "fewer: a seeded Sobol subset of it)")
    g.add_argument("--tune-seeds", type=int, metavar="N", help="tuning runs per trial (default 1; seeds 10000, ...)")
    g.add_argument("--target", type=float, metavar="X",
                   help="also report the steps each pipeline needs to reach X of the task's metric")
    g.add_argument("--eval-every", type=int, metavar="K",
                   help="evaluate every K steps (default: the task's); the resolution of the steps to --target")


def tune_requested(args: argparse.Namespace) -> bool:
    """Whether any tuning flag was given (then ``compare`` is a tuned comparison)."""
    return any(getattr(args, f, None) is not None for f in _FLAGS)


def _check_flags(args: argparse.Namespace) -> None:
    from .spec import SpecError
    if not args.tune:
        given = next(f for f in _FLAGS if getattr(args, f, None) is not None)
        raise SpecError(f"--{given.replace('_', '-')} needs --tune NAME=LO..HI:log:N")
    if getattr(args, "grid", None):
        raise SpecError("give --grid or --tune, not both (--tune tries its points on held-out data first)")
    if getattr(args, "baseline", None):
        raise SpecError("--baseline does not go with --tune: compare the tuned pipelines with gradpipe diff")


def cmd_tuned_compare(args: argparse.Namespace) -> int:
    """Run :func:`~gradpipe.flows.tuning.tuned_compare` from ``compare``'s arguments; print the table."""
    from .commands import _end_runs_on_sigterm, _fail, _pipelines, _user_errors, progress_bar, report_comparison
    from .spec import parse_sets
    from .tuning import TuneWarning, parse_tune, trial_points, tuned_compare
    seeds = list(range(args.seed, args.seed + args.seeds))
    try:
        _check_flags(args)
        pipelines = _pipelines(args.pipelines, args.task)
        sets = parse_sets(args.set)
        points = trial_points(parse_tune(args.tune), args.tune_budget)
        tune_seeds = args.tune_seeds if args.tune_seeds is not None else 1
        _end_runs_on_sigterm()
        with warnings.catch_warnings(), progress_bar(
                args, args.task, len(pipelines) * (len(points) * tune_seeds + len(seeds))):
            warnings.simplefilter("always", TuneWarning)
            warnings.showwarning = _one_line_warning
            result = tuned_compare(pipelines, args.task, seeds, tune=args.tune, budget=args.tune_budget,
                                   tune_seeds=tune_seeds, target=args.target, steps=args.steps, sets=sets,
                                   runner=args.runner, address=args.address, workers=args.workers,
                                   tracking_uri=args.tracking_uri, experiment=args.experiment, backend=args.backend,
                                   eval_every=args.eval_every, threads=args.threads,
                                   checkpoint_every=args.checkpoint_every)
    except _user_errors() as e:
        return _fail("compare", e)
    return report_comparison(result, print_tuned_ranking)


def _one_line_warning(message: Any, *_: Any, **__: Any) -> None:
    print(f"gradpipe compare: warning: {message}", file=sys.stderr)


def print_tuned_ranking(result: Any, out=None) -> None:
    """The tuned ranking on stdout: chosen setting, mean [95% CI], steps to the target."""
    from rich.console import Console
    from rich.table import Table
    from .commands import _fmt
    from .tuning import steps_text
    console = Console(file=out or sys.stdout, width=160)
    where = "held-out training data" if result.held_out else "the task's usual evaluation"
    t = Table(title=f"ranked by {result.metric} ({'higher' if result.higher_is_better else 'lower'} is better), "
              f"each pipeline at its best of {result.budget} trials on {where}")
    cols = [("#", "right"), ("pipeline", "left"), ("chosen", "left"), ("runs", "right"),
            (f"{result.metric} [95% CI]", "right")]
    if result.target is not None:
        cols.append((f"steps to {result.target:g}", "right"))
    cols += [("final loss", "right"), ("trials ok", "right"), ("note", "left")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for i, r in enumerate(result.ranking, 1):
        score = "failed" if math.isnan(r.score_mean) else f"{_fmt(r.score_mean)} [{_fmt(r.ci_lo)}, {_fmt(r.ci_hi)}]"
        cells = [str(i), r.pipeline, r.chosen_text or "-", f"{r.finished}/{r.finished + r.failed}", score]
        if result.target is not None:
            cells.append(steps_text(r))
        cells += ["" if math.isnan(r.loss_mean) else _fmt(r.loss_mean), f"{r.trials_ok}/{r.trials}",
                  "; ".join(r.notes)[:70]]
        t.add_row(*cells)
    console.print(t)
