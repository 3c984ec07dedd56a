"""Fair comparison: tune every pipeline with the same budget, then report its seeds at its best.

A ranking at one shared learning rate mostly ranks how well that learning rate
suits each optimizer. Published comparisons tune each optimizer with the same
budget and report the time to a target instead (Dahl et al., 2023,
"Benchmarking Neural Network Training Algorithms", the AlgoPerf benchmark;
Schmidt, Schneider & Hennig, 2021, "Descending through a Crowded Valley").
:func:`tuned_compare` (``gradpipe compare --tune``) does that in one Prefect flow
and one MLflow parent run:

1. **The same trials for every pipeline.** Each ``--tune`` range
   (:func:`parse_range`: ``lr=1e-4..1e-1:log:8``, ``lr=0.1..0.9:lin:5`` or a
   list ``betas=(0.9,0.99),(0.9,0.999)``) gives values; their product is the
   grid. With a budget of B trials per pipeline (default: the grid's size) every
   pipeline runs the same B grid points (:func:`trial_points`: the whole grid,
   or a seeded scrambled-Sobol subset of it when B is smaller), with the same
   tuning seeds.
2. **Tuning never sees the validation split.** Tuning runs pass the task
   option ``holdout="tune"``: the task holds out a seeded fifth of its
   training split and evaluates there. Tuning seeds are
   :data:`TUNE_SEED_BASE`, ``+1``, ... and may not overlap the reporting seeds.
   A task whose split is drawn per seed (the digits tasks) also gets the
   option ``reserve``, the reporting seeds: a tuning seed's training split
   holds images of the reporting seeds' validation splits, and ``reserve``
   leaves them out of both tuning parts (parent param ``tune.reserve``).
   A task without the ``holdout`` option (a user's task) is tuned on its usual
   evaluation, with a warning and the parent tag ``gradpipe.tune_holdout=none``.
3. **The best trial** of a pipeline has the best mean over the tuning seeds of
   the task's headline metric at the end of the run (the final evaluation, as
   the report uses; not the best seen during the run). A trial with a failed
   or diverged run, or a NaN metric, loses to every trial without one. Ties go
   to the trial that comes first in grid order.
4. **The report.** The pipeline's ``--seeds`` runs at its best setting use
   ``holdout="val"``. The ranked table gives the mean over seeds with a 95%
   percentile bootstrap interval (:func:`gradpipe.flows.bootstrap.bootstrap_ci`),
   and with ``target`` the median over seeds of the first evaluated step that
   reached it (:func:`~gradpipe.flows.bootstrap.steps_to_target`).

MLflow: one parent run (``gradpipe.kind=tuned-comparison``); its children are
tagged ``gradpipe.phase=tune`` (with ``gradpipe.trial``) or ``final``, and carry
their hyperparameters as params. The parent logs the budget and the ranges as
params, the chosen setting of each pipeline (``chosen.<pipeline>.<name>``),
``tuned_comparison.md``/``.json``, ``tuning.json`` (every trial's score) and
``plots/tuned_curves.png`` (each pipeline's validation curve at its best
setting, mean over seeds with a min-max band).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from prefect import flow

from . import tracking
from .bootstrap import bootstrap_ci, median_steps, steps_to_target
from .comparison import (_end_unfinished, _flow_tags, check_dask_address, create_children, make_runner, plan_runs,
                         run_children)
from .spec import RunSpec, SpecError, _split_pair, _top_level_split, parse_value, pipeline_label
from .train import RunOutcome, load_pipeline

__all__ = ["TUNE_SEED_BASE", "TuneRange", "TuneWarning", "Trial", "TunedRow", "TunedComparison", "parse_range",
           "parse_tune", "trial_points", "plan_tuning", "group_trials", "best_trials", "tuned_rank", "tuned_markdown",
           "tuned_compare", "tuned_compare_flow"]

#: The first tuning seed (then ``+1``, ``+2``...): far from the reporting seeds ``--seed``, ``--seed+1``, ...
TUNE_SEED_BASE = 10_000
#: Significant digits a log/lin range's values are rounded to (``1e-3``, not ``0.0009999999999999998``).
DIGITS = 6


class TuneWarning(UserWarning):
    """Tuning could not hold out data: the task has no ``holdout`` option."""


@dataclass(frozen=True)
class TuneRange:
    """The values one ``--tune NAME=...`` tries.

    Attributes:
        name: the hyperparameter.
        kind: ``"log"`` (``lo..hi:log:n``, n values evenly spaced in log),
            ``"lin"`` (``lo..hi:lin:n``, evenly spaced) or ``"list"`` (``a,b,c``).
        values: the values, in order (log/lin: from ``lo`` to ``hi``, both
            included as given; the values between rounded to :data:`DIGITS`
            significant digits unless that would make two of them equal).
        lo, hi, n: the range (None for a list).
    """

    name: str
    kind: str
    values: tuple[Any, ...]
    lo: float | None = None
    hi: float | None = None
    n: int | None = None

    @property
    def text(self) -> str:
        """The ``--tune`` text that parses back to this range."""
        if self.kind == "list":
            return f"{self.name}={','.join(repr(v) for v in self.values)}"
        return f"{self.name}={self.lo!r}..{self.hi!r}:{self.kind}:{self.n}"

    @classmethod
    def spaced(cls, name: str, lo: float, hi: float, kind: str, n: int) -> "TuneRange":
        """``n`` values from ``lo`` to ``hi`` spaced evenly (``kind="lin"``) or evenly in log (``"log"``)."""
        if kind == "log":
            vals = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        else:
            vals = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
        vals = [float(v) for v in vals]
        vals[0], vals[-1] = float(lo), float(hi)
        short = [vals[0], *(float(f"{v:.{DIGITS}g}") for v in vals[1:-1]), vals[-1]]
        if all(a < b for a, b in zip(short, short[1:])):  # rounding merged no two values
            vals = short
        return cls(name, kind, tuple(vals), float(lo), float(hi), int(n))


_RANGE = re.compile(r"^(?P<lo>[^.:]\S*?)\.\.(?P<hi>\S+?):(?P<kind>\w+):(?P<n>\S+)$")


def parse_range(item: str) -> TuneRange:
    """One ``--tune`` value: ``NAME=LO..HI:log:N``, ``NAME=LO..HI:lin:N`` or ``NAME=V1,V2,...``.

    ``log`` needs ``0 < LO < HI``, ``lin`` ``LO < HI``; N is at least 2. List
    values are Python literals, as ``--grid``'s.

    Raises:
        SpecError: one line saying what to change.
    """
    name, value = _split_pair(item, "--tune")
    value = value.strip()
    if ".." not in value or value.startswith("("):
        values = tuple(parse_value(v) for v in _top_level_split(value))
        if not values:
            raise SpecError(f"--tune {name} has no values")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"--tune {name} lists a value twice")
        return TuneRange(name, "list", values)
    m = _RANGE.match(value.replace(" ", ""))
    if not m:
        raise SpecError(f"--tune {name}: expected LO..HI:log:N or LO..HI:lin:N (e.g. 1e-4..1e-1:log:8), got {value!r}")
    lo, hi, kind = parse_value(m["lo"]), parse_value(m["hi"]), m["kind"]
    for what, v in (("low end", lo), ("high end", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecError(f"--tune {name}: the {what} {v!r} is not a finite number")
    if kind not in ("log", "lin"):
        raise SpecError(f"--tune {name}: the spacing {kind!r} is neither log nor lin")
    try:
        n = int(m["n"])
    except ValueError:
        raise SpecError(f"--tune {name}: the count {m['n']!r} is not a whole number") from None
    if n < 2:
        raise SpecError(f"--tune {name}: a range needs at least 2 points, got {n} (use --set for one value)")
    if not lo < hi:
        raise SpecError(f"--tune {name}: the low end {lo!r} must be below the high end {hi!r}")
    if kind == "log" and lo <= 0:
        raise SpecError(f"--tune {name}: a log range needs a positive low end, got {lo!r} (use lin)")
    return TuneRange.spaced(name, float(lo), float(hi), kind, n)


def parse_tune(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, TuneRange]:
    """``--tune`` values (repeatable) by name, from the command line's texts or the API's mapping
    ``{"lr": "1e-4..1e-1:log:4", "momentum": [0.0, 0.9], "eps": TuneRange(...)}``."""
    out: dict[str, TuneRange] = {}
    if isinstance(items, Mapping):
        for k, v in items.items():
            if isinstance(v, TuneRange):
                r = v
            elif isinstance(v, str):
                r = parse_range(f"{k}={v}")
            else:
                r = parse_range(f"{k}={','.join(repr(x) for x in v)}")
            if r.name != k:
                raise SpecError(f"--tune {k}: the range names {r.name!r}")
            out[k] = r
        return out
    for item in items or ():
        r = parse_range(item)
        if r.name in out:
            raise SpecError(f"--tune {r.name} given twice")
        out[r.name] = r
    return out


def _grid(ranges: Mapping[str, TuneRange]) -> list[dict[str, Any]]:
    """Every point of the ranges' product, in grid order (names sorted, each range's values in order)."""
    import itertools
    names = sorted(ranges)
    return [dict(zip(names, combo)) for combo in itertools.product(*(ranges[k].values for k in names))]


def trial_points(ranges: Mapping[str, TuneRange], budget: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The points every pipeline tries, in grid order.

    The whole grid when ``budget`` is None or the grid's size. A smaller budget
    takes ``budget`` distinct grid points along a scrambled Sobol sequence
    (``scipy.stats.qmc.Sobol``, seeded with ``seed``; Owen scrambling): each
    Sobol point in [0, 1)^d picks, per hyperparameter, the value whose cell it
    falls in, so the subset spreads over every range instead of clumping.

    Raises:
        SpecError: no ranges, or a budget below 1 or above the grid's size.
    """
    if not ranges:
        raise SpecError("nothing to tune: give --tune NAME=LO..HI:log:N")
    grid = _grid(ranges)
    if budget is None or budget == len(grid):
        return grid
    if budget < 1:
        raise SpecError(f"--tune-budget must be at least 1, got {budget}")
    if budget > len(grid):
        raise SpecError(f"--tune-budget {budget} is more than the {len(grid)} points the --tune ranges give: "
                        f"give more points (:N) or a smaller budget")
    from scipy.stats import qmc
    names = sorted(ranges)
    sizes = [len(ranges[k].values) for k in names]
    sobol = qmc.Sobol(d=len(names), scramble=True, seed=seed)
    chosen: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(chosen) < budget:
        for u in sobol.random(max(2, 1 << (budget - 1).bit_length())):  # powers of 2 keep Sobol's balance
            cell = tuple(min(int(x * s), s - 1) for x, s in zip(u, sizes))
            if cell not in seen:
                seen.add(cell)
                chosen.append(cell)
                if len(chosen) == budget:
                    break
    flat = sorted(chosen)  # grid order: itertools.product order is lexicographic in the indices
    return [{k: ranges[k].values[i] for k, i in zip(names, cell)} for cell in flat]


def _holdout_supported(task: str) -> bool:
    """Whether the task takes the ``holdout`` option (``"val"``/``"tune"``; see :mod:`gradpipe.tasks`)."""
    from ..tasks import task_options
    return "holdout" in task_options(task)


def _reserve_supported(task: str) -> bool:
    """Whether the task takes the ``reserve`` option (seeds whose validation data tuning leaves out;
    the digits tasks, whose split is drawn per seed: :mod:`gradpipe.tasks.options`)."""
    from ..tasks import task_options
    return "reserve" in task_options(task)


def plan_tuning(pipelines: Sequence[str], task: str, ranges: Mapping[str, TuneRange], points: Sequence[Mapping[str, Any]],
                tune_seeds: Sequence[int], *, holdout: bool, reserve: Sequence[int] = (),
                sets: Mapping[str, Any] | None = None, task_options: Mapping[str, Any] | None = None,
                task_losses: Sequence[str] | None = None, **run_options: Any) -> list[tuple[int, RunSpec]]:
    """Every tuning run, checked: ``(trial index, spec)`` for pipelines x points x tuning seeds.

    ``holdout``: give the runs the task option ``holdout="tune"``; ``reserve`` (with ``holdout``):
    also the option ``reserve=tuple(reserve)``, the reporting seeds whose validation data the
    runs must not read.

    Raises:
        SpecError: a pipeline does not declare a tuned hyperparameter (the message names the
            pipeline and what it declares), or a tuned name is also ``--set``.
        GradError: a trial's value is out of the hyperparameter's range.
    """
    clash = sorted(set(ranges) & set(sets or {}))
    if clash:
        raise SpecError(f"{clash[0]} is both --set and --tune: give one")
    opts = {**dict(task_options or {}), **({"holdout": "tune"} if holdout else {}),
            **({"reserve": tuple(int(s) for s in reserve)} if holdout and reserve else {})}
    base = plan_runs(pipelines, task, tune_seeds, sets=sets, task_options=opts, task_losses=task_losses,
                     **run_options)
    out: list[tuple[int, RunSpec]] = []
    for ref in pipelines:
        program = load_pipeline(ref)
        label = pipeline_label(ref)
        missing = [k for k in sorted(ranges) if k not in program.hyperparams]
        if missing:
            raise SpecError(f"{label} has no hyperparameter {missing[0]!r} to tune; it declares "
                            f"{', '.join(program.hyperparams) or 'none'}")
        mine = [s for s in base if pipeline_label(s.pipeline) == label]
        for i, point in enumerate(points):
            program.check_hyperparams({**dict(sets or {}), **point}, "--tune")
            out.extend((i, dataclasses.replace(s, hyperparams={**dict(s.hyperparams), **point})) for s in mine)
    return out


@dataclass
class Trial:
    """One point of one pipeline's tuning: its hyperparameters and its runs over the tuning seeds.

    ``score`` is the mean headline metric, NaN when any run failed or gave NaN (it then loses)."""

    pipeline: str
    index: int
    hyperparams: dict[str, Any]
    run_ids: list[str]
    score: float
    reasons: list[str] = field(default_factory=list)


def group_trials(tagged: Sequence[tuple[int, RunOutcome]]) -> list[Trial]:
    """The tuning runs ``(trial index, outcome)`` grouped into one :class:`Trial` per pipeline and
    index; a trial's score is NaN if any of its runs failed or has a NaN metric."""
    groups: dict[tuple[str, int], list[RunOutcome]] = {}
    for i, o in tagged:
        groups.setdefault((pipeline_label(o.spec.pipeline), i), []).append(o)
    out = []
    for (label, i), runs in groups.items():
        out.append(Trial(pipeline=label, index=i, hyperparams=dict(runs[0].spec.hyperparams),
                         run_ids=[o.run_id for o in runs], score=statistics.fmean(o.score for o in runs),  # NaN stays
                         reasons=sorted({o.reason for o in runs if o.reason})))
    return out


def best_trials(trials: Sequence[Trial], higher_is_better: bool) -> dict[str, Trial]:
    """Each pipeline's best trial: the best score; a NaN score (a failed or diverged run) loses to
    any number; ties go to the lower trial index (grid order). A pipeline whose every trial has
    a NaN score has no best trial (it is left out)."""
    sign = -1.0 if higher_is_better else 1.0
    best: dict[str, Trial] = {}
    for t in sorted(trials, key=lambda t: (t.pipeline, math.isnan(t.score), sign * t.score if not math.isnan(t.score)
                                           else 0.0, t.index)):
        if t.pipeline not in best and not math.isnan(t.score):
            best[t.pipeline] = t
    return best


@dataclass
class TunedRow:
    """One line of the tuned ranking: a pipeline at its best setting, over the reporting seeds.

    Attributes:
        pipeline: its label; ``chosen``: the tuned hyperparameters picked (empty if none was).
        trials / trials_ok: tuning runs' trials, and how many had no failure.
        tune_score: the best trial's tuning score (on the held-out part of the training split).
        finished / failed: reporting runs.
        score_mean, ci_lo, ci_hi, score_std: the headline metric over the finished seeds.
        loss_mean: the mean final training loss.
        steps_to_target: per seed, the first evaluated step at the target (None: not reached).
        steps_median: the median of those (None: not reached, or no target).
        seconds_mean: the mean training time of a reporting run.
        notes: a chosen value at the edge of its range, failures.
    """

    pipeline: str
    chosen: dict[str, Any]
    trials: int
    trials_ok: int
    tune_score: float
    finished: int
    failed: int
    score_mean: float
    ci_lo: float
    ci_hi: float
    score_std: float
    loss_mean: float
    steps_to_target: list[int | None]
    steps_median: float | None
    seconds_mean: float
    notes: list[str] = field(default_factory=list)

    @property
    def chosen_text(self) -> str:
        return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.chosen.items()))


def _edges(chosen: Mapping[str, Any], ranges: Mapping[str, TuneRange]) -> list[str]:
    """A note for each chosen value at an end of a log/lin range: the best may lie beyond it."""
    out = []
    for k, r in sorted(ranges.items()):
        if r.kind != "list" and k in chosen and chosen[k] in (r.values[0], r.values[-1]):
            out.append(f"{k} at the {'low' if chosen[k] == r.values[0] else 'high'} end of its range")
    return out


def tuned_rank(pipelines: Sequence[str], trials: Sequence[Trial], finals: Sequence[RunOutcome],
               curves: Mapping[str, list[tuple[int, float]]], ranges: Mapping[str, TuneRange], *,
               higher_is_better: bool, target: float | None = None, seed: int = 0) -> list[TunedRow]:
    """The ranked rows, best first: by mean score, pipelines without a finished run last, ties by name.

    ``curves[run_id]`` is a final run's ``(step, value)`` evaluations of the headline metric.
    """
    best = best_trials(trials, higher_is_better)
    rows = []
    for label in (pipeline_label(p) for p in pipelines):
        mine = [t for t in trials if t.pipeline == label]
        runs = [o for o in finals if pipeline_label(o.spec.pipeline) == label]
        ok = [o for o in runs if o.ok and not math.isnan(o.score)]
        scores = [o.score for o in ok]
        lo, hi = bootstrap_ci(scores, seed=seed)
        per_seed = [steps_to_target(curves.get(o.run_id, []), target, higher_is_better) if o.ok else None
                    for o in runs] if target is not None else []
        chosen = {k: best[label].hyperparams[k] for k in sorted(ranges)} if label in best else {}
        notes = _edges(chosen, ranges)
        if label not in best:
            reasons = sorted({r for t in mine for r in t.reasons})
            notes.append("every tuning trial failed" + (f" ({reasons[0]})" if reasons else ""))
        notes += sorted({o.reason for o in runs if o.reason})
        rows.append(TunedRow(
            pipeline=label, chosen=chosen, trials=len(mine), trials_ok=sum(not math.isnan(t.score) for t in mine),
            tune_score=best[label].score if label in best else math.nan, finished=len(ok),
            failed=len(runs) - len(ok), score_mean=statistics.fmean(scores) if scores else math.nan, ci_lo=lo,
            ci_hi=hi, score_std=statistics.stdev(scores) if len(scores) > 1 else (0.0 if scores else math.nan),
            loss_mean=statistics.fmean([o.final_loss for o in ok]) if ok else math.nan,
            steps_to_target=per_seed, steps_median=median_steps(per_seed) if target is not None else None,
            seconds_mean=statistics.fmean([o.seconds for o in ok]) if ok else math.nan, notes=notes))
    sign = -1.0 if higher_is_better else 1.0
    rows.sort(key=lambda r: (math.isnan(r.score_mean), sign * r.score_mean if not math.isnan(r.score_mean) else 0.0,
                             r.pipeline))
    return rows


def steps_text(r: TunedRow) -> str:
    """``"120 (3/3)"``: the median steps to the target and how many seeds reached it."""
    reached = sum(s is not None for s in r.steps_to_target)
    n = len(r.steps_to_target)
    med = "not reached" if r.steps_median is None else f"{r.steps_median:g}"
    return f"{med} ({reached}/{n})" if n else med


def tuned_markdown(rows: Sequence[TunedRow], metric: str, target: float | None = None) -> str:
    """The ranked table as Markdown (the parent run's ``tuned_comparison.md``)."""
    from .commands import _fmt
    head = f"| rank | pipeline | chosen | runs | {metric} mean [95% CI] |"
    rule = "|---:|---|---|---:|---:|"
    if target is not None:
        head += f" steps to {metric} {target:g} (median, reached) |"
        rule += "---:|"
    lines = [head + " final loss | tuning trials ok | note |", rule + "---:|---:|---|"]
    for i, r in enumerate(rows, 1):
        score = ("failed" if math.isnan(r.score_mean)
                 else f"{_fmt(r.score_mean)} [{_fmt(r.ci_lo)}, {_fmt(r.ci_hi)}]")
        cells = [str(i), r.pipeline, r.chosen_text or "-", f"{r.finished}/{r.finished + r.failed}", score]
        if target is not None:
            cells.append(steps_text(r))
        cells += ["" if math.isnan(r.loss_mean) else _fmt(r.loss_mean), f"{r.trials_ok}/{r.trials}",
                  "; ".join(r.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class TunedComparison:
    """The result of :func:`tuned_compare`.

    Attributes:
        experiment_id / parent_run_id / tracking_uri: where MLflow keeps it.
        trials: every pipeline's trials; ``tune_outcomes`` / ``final_outcomes``: every run.
        ranking: :func:`tuned_rank` rows, best first.
        metric / higher_is_better: the task's headline metric.
        budget: trials per pipeline; ``target``: the target metric (or None).
        held_out: whether tuning ran on ``holdout="tune"`` (False: the task has no such option).
    """

    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    trials: list[Trial]
    tune_outcomes: list[RunOutcome]
    final_outcomes: list[RunOutcome]
    ranking: list[TunedRow]
    metric: str
    higher_is_better: bool
    budget: int
    target: float | None
    held_out: bool

    @property
    def outcomes(self) -> list[RunOutcome]:
        return [*self.tune_outcomes, *self.final_outcomes]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def all_failed(self) -> bool:
        """No reporting run finished (every trial of every pipeline failed, or every final run did)."""
        return not any(o.ok for o in self.final_outcomes)


def _eval_curves(uri: str, run_ids: Sequence[str], metric: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    return {rid: sorted((m.step, m.value) for m in client.get_metric_history(rid, f"eval/{metric}"))
            for rid in run_ids}


@flow(name="gradpipe-tuned-compare", persist_result=False, log_prints=False)
def tuned_compare_flow(tune_plan: list[tuple[int, RunSpec]], final_template: list[RunSpec], ranges: dict[str, TuneRange],
                       uri: str, experiment_id: str, name: str, parent_params: dict[str, str], *,
                       held_out: bool, budget: int, target: float | None = None, checkpoint_every: int = 0,
                       bootstrap_seed: int = 0) -> TunedComparison:
    """Prefect flow: one parent run; the tuning runs fanned out, then each pipeline's reporting
    seeds at its best trial (``final_template``: one spec per pipeline and seed, without the
    tuned values), ranked."""
    import gradpipe
    from ..tasks import get_task
    from .figures import eval_band_curves

    first = get_task(final_template[0].task, **dict(final_template[0].task_options))
    metric, higher = first.metric, first.higher_is_better
    parent = tracking.start_parent_run(uri, experiment_id, name, parent_params, {
        "gradpipe.version": gradpipe.__version__, "gradpipe.kind": "tuned-comparison",
        "gradpipe.tune_holdout": "tune" if held_out else "none", **_flow_tags()})
    log = tracking.RunLogger(uri, parent)
    children: list[str] = []
    try:
        specs = [s for _, s in tune_plan]
        for i, s in tune_plan:
            create_children([s], uri, experiment_id, parent, first.default_steps, into=children,
                            tags={"gradpipe.phase": "tune", "gradpipe.trial": str(i)}, prefix="tune: ")
        tuned = run_children(specs, children, uri, checkpoint_every, metric, higher)
        trials = group_trials([(i, o) for (i, _), o in zip(tune_plan, tuned)])
        best = best_trials(trials, higher)
        finals = [dataclasses.replace(s, hyperparams={**dict(s.hyperparams), **best[pipeline_label(s.pipeline)]
                                                      .hyperparams})
                  for s in final_template if pipeline_label(s.pipeline) in best]
        final_ids = create_children(finals, uri, experiment_id, parent, first.default_steps, into=[],
                                    tags={"gradpipe.phase": "final"}, prefix="final: ")
        children += final_ids
        reported = run_children(finals, final_ids, uri, checkpoint_every, metric, higher)
        curves = _eval_curves(uri, final_ids, metric)
        pipelines = list(dict.fromkeys(s.pipeline for s in final_template))
        ranking = tuned_rank(pipelines, trials, reported, curves, ranges, higher_is_better=higher, target=target,
                             seed=bootstrap_seed)
        log.params({f"chosen.{r.pipeline}.{k}": v for r in ranking for k, v in r.chosen.items()})
        log.text(tuned_markdown(ranking, metric, target), "tuned_comparison.md")
        log.dict({"metric": metric, "higher_is_better": higher, "budget": budget, "target": target,
                  "held_out": held_out, "rows": [{"rank": i, **dataclasses.asdict(r)} for i, r in enumerate(ranking, 1)],
                  "runs": [{"run_id": o.run_id, "pipeline": pipeline_label(o.spec.pipeline), "seed": o.spec.seed,
                            "status": o.status, "reason": o.reason, metric: o.score} for o in reported]},
                 "tuned_comparison.json")
        log.dict({"ranges": {k: r.text for k, r in ranges.items()},
                  "trials": [dataclasses.asdict(t) for t in sorted(trials, key=lambda t: (t.pipeline, t.index))]},
                 "tuning.json")
        groups: dict[str, list[list[tuple[int, float]]]] = {}
        for o in reported:
            if curves.get(o.run_id):
                label = pipeline_label(o.spec.pipeline)
                groups.setdefault(f"{label} {_chosen(best[label].hyperparams, ranges)}", []).append(curves[o.run_id])
        log.figure(eval_band_curves(groups, f"tuned pipelines on {final_template[0].task}: {metric} "
                                    f"(validation, {budget} trials each)", metric, target=target,
                                    log_y=not higher), "plots/tuned_curves.png")
        top = next((r for r in ranking if not math.isnan(r.score_mean)), None)
        if top is not None:
            log.metrics({f"best/{metric}": top.score_mean}, 0)
            log.tags({"gradpipe.best": f"{top.pipeline} {top.chosen_text}"})
        log.metrics({"runs/tune_failed": sum(not o.ok for o in tuned), "runs/final_failed": sum(not o.ok for o in reported),
                     "runs/finished": sum(o.ok for o in tuned) + sum(o.ok for o in reported)}, 0)
        result = TunedComparison(experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri, trials=trials,
                                 tune_outcomes=tuned, final_outcomes=reported, ranking=ranking, metric=metric,
                                 higher_is_better=higher, budget=budget, target=target, held_out=held_out)
        log.finish("FAILED" if result.all_failed else "FINISHED", "no reporting run finished" if result.all_failed else None)
        return result
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        log.finish("FAILED", reason)
        _end_unfinished(uri, children, f"the comparison stopped ({reason})")
        raise


def _chosen(hp: Mapping[str, Any], ranges: Mapping[str, TuneRange]) -> str:
    return " ".join(f"{k}={hp[k]:g}" if isinstance(hp[k], float) else f"{k}={hp[k]}" for k in sorted(ranges))


def tuned_compare(pipelines: Sequence[str], task: str = "digits", seeds: Sequence[int] = (0,), *,
                  tune: Mapping[str, Any] | Sequence[str], budget: int | None = None, tune_seeds: int = 1,
                  target: float | None = None, steps: int | None = None, sets: Mapping[str, Any] | None = None,
                  runner: str = "local", address: str | None = None, workers: int = 2,
                  tracking_uri: str | None = None, experiment: str = "gradpipe", backend: str = "eager",
                  task_options: Mapping[str, Any] | None = None, eval_every: int | None = None,
                  name: str | None = None, checkpoint_every: int = 0, threads: int = 1, sample_seed: int = 0,
                  bootstrap_seed: int = 0) -> TunedComparison:
    """Tune every pipeline with the same budget, then rank them at their best (the module docstring).

    Args:
        pipelines: names, ``.grad`` files.
        task: the task; ``seeds``: the reporting seeds (validation split).
        tune: the ranges, ``{"lr": "1e-4..1e-1:log:8"}`` (a mapping of texts, value lists or
            :class:`TuneRange`) or the command line's ``["lr=1e-4..1e-1:log:8"]``.
        budget: trials per pipeline (default: every grid point), the same points for all.
        tune_seeds: tuning runs per trial, on seeds ``TUNE_SEED_BASE``, ``+1``, ...
        target: report the steps each pipeline needs to reach this value of the metric.
        sample_seed: seeds the Sobol subset when ``budget`` is below the grid's size.
        bootstrap_seed: seeds the bootstrap intervals.
        The rest as :func:`gradpipe.flows.comparison.compare`.

    Everything is checked before anything is written (SpecError, GradError, TaskError,
    TrackingError, ConnectionError with one line each); a task without the ``holdout``
    option gives a :class:`TuneWarning` and is tuned on its usual evaluation. A task with
    the ``reserve`` option (the digits tasks) is tuned with ``reserve=`` the reporting
    ``seeds``, so no tuning run reads an image a reporting seed validates on.
    """
    from ..runtime.optimizer import BACKENDS
    from ..tasks import get_task
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if "holdout" in (task_options or {}):
        raise SpecError("--tune chooses the holdout itself (tune for tuning runs, val for the reported ones): "
                        "leave the holdout option out")
    if "reserve" in (task_options or {}):
        raise SpecError("--tune sets the reserve option itself (the reporting seeds, for the tuning runs): "
                        "leave it out")
    if tune_seeds < 1:
        raise SpecError(f"--tune-seeds must be at least 1, got {tune_seeds}")
    if target is not None and not math.isfinite(target):
        raise SpecError(f"--target must be a finite number, got {target}")
    ranges = parse_tune(tune)
    points = trial_points(ranges, budget, sample_seed)
    t_seeds = list(range(TUNE_SEED_BASE, TUNE_SEED_BASE + tune_seeds))
    overlap = sorted(set(int(s) for s in seeds) & set(t_seeds))
    if overlap:
        raise SpecError(f"seed {overlap[0]} is a tuning seed ({TUNE_SEED_BASE} and up): report on seeds below "
                        f"{TUNE_SEED_BASE}")
    held_out = _holdout_supported(task)
    reserve = tuple(sorted({int(s) for s in seeds})) if held_out and _reserve_supported(task) else ()
    the_task = get_task(task, **dict(task_options or {}))
    run_options = dict(steps=steps, backend=backend, eval_every=eval_every, threads=threads)
    plan = plan_tuning(pipelines, task, ranges, points, t_seeds, holdout=held_out, reserve=reserve, sets=sets,
                       task_options=task_options, task_losses=the_task.loss_names, **run_options)
    final_opts = {**dict(task_options or {}), **({"holdout": "val"} if held_out else {})}
    template = plan_runs(pipelines, task, seeds, sets=sets, task_options=final_opts,
                         task_losses=the_task.loss_names, **run_options)
    if not held_out:
        warnings.warn(f"task {task!r} has no holdout option: tuning runs evaluate on its usual evaluation "
                      f"(the data the ranking reports on)", TuneWarning, stacklevel=2)
    runner_obj = make_runner(runner, address=address, workers=1 if backend == "compiled" else workers)
    if runner == "dask" and address:
        check_dask_address(address)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    exp_id = tracking.ensure_experiment(uri, experiment)
    labels = [pipeline_label(p) for p in pipelines]
    title = name or f"tuned compare {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''} on {task}"
    params = {"task": task, "seeds": ",".join(str(s) for s in seeds), "pipelines": ",".join(labels)[:5000],
              "runner": runner, "backend": backend, "steps": str(steps) if steps else "default",
              "tune.budget": str(len(points)), "tune.seeds": ",".join(map(str, t_seeds)),
              "tune.holdout": "tune" if held_out else "none",
              "tune.reserve": ",".join(map(str, reserve)) or "none", "target": "none" if target is None else str(target),
              "runs": str(len(plan) + len(template)),
              **{f"tune.{k}": r.text.partition("=")[2] for k, r in ranges.items()}}
    return tuned_compare_flow.with_options(task_runner=runner_obj)(
        plan, template, ranges, uri, exp_id, title, params, held_out=held_out, budget=len(points), target=target,
        checkpoint_every=checkpoint_every, bootstrap_seed=bootstrap_seed)
