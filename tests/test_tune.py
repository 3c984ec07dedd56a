"""Fair comparison (``gradpipe compare --tune``): ranges, trial points, the choice on held-out data,
bootstrap intervals, steps to a target, and the MLflow record of a real tuned comparison.

:class:`ToyHoldoutTask` is a test-local task that takes the ``holdout`` option of the task contract
(``docs/orchestration.md``, "Fair comparison"). Its ``"tune"`` evaluation scores the distance of the
weights from their *initial* values, its ``"val"`` evaluation the distance from the regression's true
weights: tuning then prefers the smallest learning rate and validation the largest, so which one the
tuned comparison picked shows which data it chose on.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from gradpipe import GradError
from gradpipe.flows.bootstrap import bootstrap_ci, median_steps, steps_to_target
from gradpipe.flows.spec import RunSpec, SpecError
from gradpipe.flows.train import RunOutcome
from gradpipe.flows.tuning import (TUNE_SEED_BASE, Trial, TuneRange, best_trials, group_trials, parse_range, parse_tune,
                                   plan_tuning, trial_points, tuned_compare, tuned_markdown, tuned_rank)
from gradpipe.tasks import Task, TaskError


class ToyHoldoutTask(Task):
    """Least squares ``y = x w*`` on 4 features; ``holdout="tune"`` evaluates ``|w - w0|^2`` (w0: the
    initial weights), ``"val"`` ``|w - w*|^2``, both reported as ``val_loss``."""

    name = "toy-holdout"
    metric = "val_loss"
    higher_is_better = False
    default_steps = 8
    loss_names = ("loss",)

    def __init__(self, holdout: str = "val") -> None:
        if holdout not in ("val", "tune"):
            raise TaskError(f"holdout must be 'val' or 'tune', got {holdout!r}")
        self.holdout = holdout
        self.w = torch.randn(1, 4, generator=torch.Generator().manual_seed(7))
        self.w0: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"holdout": self.holdout}

    def make_model(self, seed: int) -> nn.Module:
        model = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, 4, generator=torch.Generator().manual_seed(seed)))
        self.w0 = model.weight.detach().clone()
        return model

    def batches(self, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            x = torch.randn(16, 4, generator=gen)
            yield x, x @ self.w.T

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.mse_loss(model(x), y)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        ref = self.w0 if self.holdout == "tune" else self.w
        return {"val_loss": float(((model.weight - ref) ** 2).sum())}


class NoHoldoutTask(ToyHoldoutTask):
    """The same task without the ``holdout`` option (a user's task)."""

    def __init__(self) -> None:
        super().__init__("val")


TOY = "test_tune:ToyHoldoutTask"


# --- ranges -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, values", [
    ("lr=1e-4..1e-1:log:4", (1e-4, 1e-3, 1e-2, 1e-1)),
    ("lr=1e-3..1e-1:log:3", (1e-3, 1e-2, 1e-1)),
    ("momentum=0..0.9:lin:4", (0.0, 0.3, 0.6, 0.9)),
    ("lr=0.01,0.1", (0.01, 0.1)),
    ("betas=(0.9,0.99),(0.9,0.999)", ((0.9, 0.99), (0.9, 0.999))),
])
def test_a_range_gives_its_values(text, values):
    assert parse_range(text).values == values


@pytest.mark.parametrize("text, needle", [
    ("lr", "NAME=VALUE"),
    ("lr=1e-4..1e-1:cubic:4", "neither log nor lin"),
    ("lr=1e-4..1e-1:log:1", "at least 2 points"),
    ("lr=1e-4..1e-1:log:x", "not a whole number"),
    ("lr=1e-1..1e-4:log:4", "must be below"),
    ("lr=0..1e-1:log:4", "positive low end"),
    ("lr=a..1:lin:4", "not a finite number"),
    ("lr=1e-4..1e-1", "LO..HI:log:N"),
    ("lr=0.1,0.1", "twice"),
])
def test_a_malformed_range_is_one_line_saying_what_to_change(text, needle):
    with pytest.raises(SpecError, match=needle) as e:
        parse_range(text)
    assert "\n" not in str(e.value)


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(1e-8, 1e3), ratio=st.floats(1.001, 1e6), n=st.integers(2, 12), log=st.booleans())
def test_a_range_round_trips_through_its_text(lo, ratio, n, log):
    r = TuneRange.spaced("lr", lo, lo * ratio, "log" if log else "lin", n)
    again = parse_range(r.text)
    assert again == r
    assert len(r.values) == n and r.values[0] == r.lo and r.values[-1] == r.hi
    assert all(a < b for a, b in zip(r.values, r.values[1:])), "increasing, no value twice"


def test_the_same_name_twice_or_a_set_and_tuned_name_is_an_error():
    with pytest.raises(SpecError, match="given twice"):
        parse_tune(["lr=0.1,0.2", "lr=1e-3..1e-1:log:3"])
    with pytest.raises(SpecError, match="both --set and --tune"):
        plan_tuning(["sgd"], "digits", parse_tune(["lr=0.1,0.2"]), [{"lr": 0.1}], [TUNE_SEED_BASE],
                    holdout=False, sets={"lr": 0.1})


# --- trial points -----------------------------------------------------------------------------

def test_the_default_budget_is_the_whole_grid_in_grid_order():
    pts = trial_points(parse_tune(["lr=1e-3..1e-1:log:3", "momentum=0.0,0.9"]))
    assert pts == [{"lr": lr, "momentum": m} for lr in (1e-3, 1e-2, 1e-1) for m in (0.0, 0.9)]


def test_a_smaller_budget_is_a_seeded_spread_subset():
    ranges = parse_tune(["lr=1e-5..1e-1:log:9", "momentum=0..0.9:lin:4"])
    pts = trial_points(ranges, 8, seed=3)
    assert len(pts) == 8 and len({tuple(p.values()) for p in pts}) == 8
    assert pts == trial_points(ranges, 8, seed=3), "the same points every time"
    assert pts != trial_points(ranges, 8, seed=4)
    lrs = sorted({p["lr"] for p in pts})
    assert len(lrs) >= 6 and lrs[0] <= 1e-4 and lrs[-1] >= 1e-2, "the subset spreads over the range"
    grid = trial_points(ranges)
    assert pts == sorted(pts, key=grid.index), "in grid order"


@pytest.mark.parametrize("budget, needle", [(0, "at least 1"), (7, "more than the 6 points")])
def test_an_impossible_budget_is_an_error(budget, needle):
    with pytest.raises(SpecError, match=needle):
        trial_points(parse_tune(["lr=1e-3..1e-1:log:3", "momentum=0.0,0.9"]), budget)


def test_every_pipeline_gets_the_same_points_and_seeds():
    ranges = parse_tune(["lr=1e-3..1e-1:log:5"])
    pts = trial_points(ranges, 3)
    plan = plan_tuning(["adam", "sgd", "lion"], "digits", ranges, pts, [TUNE_SEED_BASE, TUNE_SEED_BASE + 1],
                       holdout=True, steps=5)
    by = {}
    for i, spec in plan:
        by.setdefault(spec.pipeline, set()).add((i, spec.hyperparams["lr"], spec.seed))
        assert spec.task_options == {"holdout": "tune"}
    assert len(by) == 3 and len({frozenset(v) for v in by.values()}) == 1
    assert len(next(iter(by.values()))) == 3 * 2


def test_a_tuned_comparison_on_digits_reserves_the_reporting_seeds_validation_images(tmp_path, monkeypatch):
    """digits draws its split per seed: the tuning runs get reserve=(the reporting seeds), the reported ones not."""
    import gradpipe.flows.tuning as tuning
    got: dict[str, Any] = {}

    class Flow:  # stands in for the Prefect flow: the plan is what is checked
        def with_options(self, **_: Any) -> "Flow":
            return self

        def __call__(self, plan, template, ranges, uri, exp_id, title, params, **_: Any) -> str:
            got.update(plan=plan, template=template, params=params)
            return "ran"

    monkeypatch.setattr(tuning, "tuned_compare_flow", Flow())
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    assert tuned_compare(["sgd", "adam"], "digits", [2, 0, 1], tune={"lr": [0.01, 0.1]}, steps=5,
                         tracking_uri=uri) == "ran"
    assert len(got["plan"]) == 2 * 2 and len(got["template"]) == 2 * 3
    assert all(s.task_options == {"holdout": "tune", "reserve": (0, 1, 2)} for _, s in got["plan"])
    assert all(s.task_options == {"holdout": "val"} for s in got["template"])
    assert got["params"]["tune.reserve"] == "0,1,2"
    with pytest.raises(SpecError, match="sets the reserve option itself"):
        tuned_compare(["sgd"], "digits", [0], tune={"lr": [0.01, 0.1]}, task_options={"reserve": (0,)},
                      tracking_uri=uri)
    # a task whose validation data does not depend on the seed has no reserve option
    tuned_compare(["sgd"], TOY, [0, 1], tune={"lr": [0.01, 0.1]}, tracking_uri=uri)
    assert all(s.task_options == {"holdout": "tune"} for _, s in got["plan"])
    assert got["params"]["tune.reserve"] == "none"


def test_a_pipeline_without_a_tuned_hyperparameter_is_named_with_what_it_declares():
    ranges = parse_tune(["momentum=0.0,0.9"])
    with pytest.raises(SpecError, match=r"^adam has no hyperparameter 'momentum' to tune; it declares lr, betas"):
        plan_tuning(["sgd", "adam"], "digits", ranges, trial_points(ranges), [TUNE_SEED_BASE], holdout=False)


def test_a_value_outside_the_hyperparameters_range_is_a_grad_error():
    ranges = parse_tune(["momentum=0.5..1.5:lin:3"])
    with pytest.raises(GradError):
        plan_tuning(["sgd"], "digits", ranges, trial_points(ranges), [TUNE_SEED_BASE], holdout=False)


# --- choosing the best trial ------------------------------------------------------------------

def _trial(p, i, score):
    return Trial(pipeline=p, index=i, hyperparams={"lr": 10.0 ** -i}, run_ids=[], score=score)


@pytest.mark.parametrize("higher, scores, best", [
    (False, [0.5, 0.2, 0.3], 1),
    (True, [0.5, 0.2, 0.3], 0),
    (False, [math.nan, 0.9, 0.2], 2),   # a diverged trial loses even to a bad one
    (True, [math.nan, 0.1, math.nan], 1),
    (False, [0.3, 0.2, 0.2], 1),        # a tie goes to the first in grid order
    (True, [0.4, 0.4, 0.1], 0),
])
def test_the_best_trial(higher, scores, best):
    trials = [_trial("p", i, s) for i, s in enumerate(scores)]
    assert best_trials(trials[::-1], higher)["p"].index == best


def test_a_trial_with_one_failed_tuning_seed_scores_nan_and_the_others_average():
    def run(i, seed, status, v=0.0):
        spec = RunSpec("sgd", seed=seed, hyperparams={"lr": 0.1 * (i + 1)})
        return i, RunOutcome(spec=spec, run_id=f"{i}-{seed}", status=status, metrics={"val_loss": v})
    trials = {t.index: t for t in group_trials([run(0, 1, "FINISHED", 0.2), run(0, 2, "FAILED"),
                                                run(1, 1, "FINISHED", 0.5), run(1, 2, "FINISHED", 0.7)])}
    assert math.isnan(trials[0].score) and trials[0].run_ids == ["0-1", "0-2"]
    assert trials[1].score == pytest.approx(0.6) and trials[1].hyperparams == {"lr": 0.2}
    assert best_trials(list(trials.values()), False)["sgd"].index == 1


def test_a_pipeline_whose_every_trial_failed_has_no_best_and_ranks_last():
    trials = [_trial("a", 0, 0.5), _trial("b", 0, math.nan), _trial("b", 1, math.nan)]
    assert set(best_trials(trials, False)) == {"a"}
    spec = RunSpec("a", seed=0, hyperparams={"lr": 1.0})
    finals = [RunOutcome(spec=spec, run_id="r", status="FINISHED", metrics={"val_loss": 0.5}, final_loss=0.1)]
    rows = tuned_rank(["b", "a"], trials, finals, {}, parse_tune(["lr=1.0,0.1"]), higher_is_better=False)
    assert [r.pipeline for r in rows] == ["a", "b"]
    assert rows[1].finished == 0 and "every tuning trial failed" in rows[1].notes[0]
    assert "lr at the" not in " ".join(rows[0].notes), "a list has no ends to warn about"
    assert "| 2 | b | - | 0/0 | failed |" in tuned_markdown(rows, "val_loss")


# --- bootstrap and steps to target ------------------------------------------------------------

def test_the_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, reps, hits, widths = 40, 300, 0, []
    for k in range(reps):
        xs = rng.normal(5.0, 2.0, n)
        lo, hi = bootstrap_ci(xs, resamples=2000, seed=k)
        hits += lo <= 5.0 <= hi
        widths.append(hi - lo)
    assert 0.89 <= hits / reps <= 0.99
    # the normal-theory width 2 * 1.96 * sigma / sqrt(n), which the bootstrap estimates
    assert statistics.fmean(widths) == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(n), rel=0.1)


def test_the_bootstrap_interval_is_the_exact_bootstrap_distributions_quantiles():
    """All 5**5 resamples of 5 values, enumerated: the exact percentile interval that the random
    resamples estimate (up to one step, 0.2, of the possible means)."""
    import itertools
    xs = [0.0, 1.0, 2.0, 3.0, 10.0]
    means = [statistics.fmean(c) for c in itertools.product(xs, repeat=5)]
    for confidence in (0.95, 0.8):
        exact = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        assert bootstrap_ci(xs, confidence=confidence, resamples=20_000) == pytest.approx(tuple(exact), abs=0.21)


def test_the_bootstrap_interval_is_fixed_by_its_seed():
    xs = [0.91, 0.93, 0.95, 0.9, 0.97]
    assert bootstrap_ci(xs, seed=1) == bootstrap_ci(xs, seed=1)
    assert bootstrap_ci(xs, seed=1) != bootstrap_ci(xs, seed=2)
    lo, hi = bootstrap_ci(xs)
    assert min(xs) <= lo < statistics.fmean(xs) < hi <= max(xs)


@pytest.mark.parametrize("xs, ci", [([0.7], (0.7, 0.7)), ([0.7, math.nan], (0.7, 0.7)), ([2.0, 2.0], (2.0, 2.0))])
def test_one_value_is_its_own_interval(xs, ci):
    assert bootstrap_ci(xs) == ci


def test_no_value_has_no_interval():
    assert all(math.isnan(x) for x in bootstrap_ci([]))


CURVE = [(10, 0.5), (20, 0.8), (30, 0.7), (40, 0.95)]


@pytest.mark.parametrize("target, higher, steps", [
    (0.8, True, 20), (0.9, True, 40), (0.99, True, None), (0.5, True, 10),
    (0.6, False, 10), (0.4, False, None),
])
def test_steps_to_target_is_the_first_evaluation_that_reaches_it(target, higher, steps):
    assert steps_to_target(CURVE, target, higher) == steps


def test_a_nan_evaluation_reaches_no_target():
    assert steps_to_target([(5, math.nan), (10, 0.1)], 0.5, False) == 10


@pytest.mark.parametrize("per_seed, med", [
    ([10, 30, 20], 20), ([10, None, 20], 20), ([10, None, None], None), ([10, 20], 15), ([10, None], None), ([], None),
])
def test_the_median_counts_a_seed_that_never_reached_as_infinitely_slow(per_seed, med):
    assert median_steps(per_seed) == med


# --- a tuned comparison, for real -------------------------------------------------------------

def _runs(uri, experiment):
    from gradpipe.flows.tracking import open_client
    c = open_client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return c, [r for r in runs if "mlflow.parentRunId" not in r.data.tags], [r for r in runs
                                                                             if "mlflow.parentRunId" in r.data.tags]


def test_a_tuned_comparison_chooses_on_held_out_data_and_reports_on_val(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    result = tuned_compare(["sgd", "adam"], TOY, [0, 1], tune={"lr": "1e-3..1e-1:log:3"}, budget=3, target=3.0,
                           steps=8, eval_every=2, tracking_uri=uri, experiment="tuned")
    c, parents, children = _runs(uri, "tuned")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    tune = [r for r in children if r.data.tags["gradpipe.phase"] == "tune"]
    final = [r for r in children if r.data.tags["gradpipe.phase"] == "final"]
    assert len(tune) == 2 * 3 and len(final) == 2 * 2
    assert {r.data.params["task.holdout"] for r in tune} == {"tune"}
    assert {r.data.params["task.holdout"] for r in final} == {"val"}
    assert {r.data.params["seed"] for r in tune} == {str(TUNE_SEED_BASE)}
    assert {r.data.params["seed"] for r in final} == {"0", "1"}
    for p in ("sgd", "adam"):
        assert sorted(float(r.data.params["lr"]) for r in tune if r.data.params["pipeline"] == p) == [1e-3, 1e-2, 1e-1]
    # the tune evaluation prefers the smallest lr (validation would prefer the largest): chosen on held-out data
    assert {r.data.params["lr"] for r in final} == {"0.001"}
    assert {(r.pipeline, r.chosen["lr"]) for r in result.ranking} == {("sgd", 1e-3), ("adam", 1e-3)}
    best_tune = min(r.data.metrics["final/val_loss"] for r in tune if r.data.params["pipeline"] == "sgd")
    sgd = next(r for r in result.ranking if r.pipeline == "sgd")
    assert sgd.tune_score == best_tune
    assert "lr at the low end of its range" in sgd.notes
    # the reported numbers are the validation runs'
    finals = sorted(r.data.metrics["final/val_loss"] for r in final if r.data.params["pipeline"] == "sgd")
    assert sgd.score_mean == pytest.approx(statistics.fmean(finals))
    assert min(finals) <= sgd.ci_lo <= sgd.ci_hi <= max(finals)
    assert len(sgd.steps_to_target) == 2
    # MLflow: the parent's params, tags and artifacts
    pp = parents[0].data
    assert pp.params["tune.lr"] == "0.001..0.1:log:3" and pp.params["tune.budget"] == "3"
    assert pp.params["chosen.sgd.lr"] == "0.001" and pp.tags["gradpipe.tune_holdout"] == "tune"
    arts = {a.path for a in c.list_artifacts(result.parent_run_id)} | {
        a.path for a in c.list_artifacts(result.parent_run_id, "plots")}
    assert {"tuned_comparison.md", "tuned_comparison.json", "tuning.json", "plots/tuned_curves.png"} <= arts
    table = c.download_artifacts(result.parent_run_id, "tuned_comparison.md", str(tmp_path))
    assert "steps to val_loss 3" in open(table).read()
    trials = json.load(open(c.download_artifacts(result.parent_run_id, "tuning.json", str(tmp_path))))
    assert len(trials["trials"]) == 6
    png = c.download_artifacts(result.parent_run_id, "plots/tuned_curves.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_cli_warns_and_tags_when_the_task_cannot_hold_out(prefect_server, tmp_path, capsys):
    from gradpipe.cli import main
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    code = main(["compare", "sgd", "--task", "test_tune:NoHoldoutTask", "--tune", "lr=0.01,0.1", "--steps", "4",
                 "--tracking-uri", uri, "--experiment", "noholdout"])
    out, err = capsys.readouterr()
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("gradpipe compare: warning:")]
    assert len(warning) == 1 and "has no holdout option" in warning[0], err
    assert "usual evaluation" in out and "│ 1 │ sgd      │ lr=0.1 │  1/1 │" in out, out
    _, parents, children = _runs(uri, "noholdout")
    assert parents[0].data.tags["gradpipe.tune_holdout"] == "none"
    assert len(children) == 3 and not any("task.holdout" in r.data.params for r in children)


@pytest.mark.parametrize("argv, needle", [
    (["--tune", "lr=1e-3..1e-1:cubic:3"], "neither log nor lin"),
    (["--tune-budget", "2"], "--tune-budget needs --tune"),
    (["--tune", "lr=0.1,0.2", "--grid", "lr=0.1"], "--grid or --tune"),
    (["--tune", "lr=0.1,0.2", "--tune-budget", "3"], "more than the 2 points"),
    (["--tune", "momentum=0.0,0.9"], "adam has no hyperparameter 'momentum'"),
    (["--tune", "lr=0.1,0.2", "--seed", str(TUNE_SEED_BASE)], "is a tuning seed"),
    (["--tune", "lr=0.1,0.2", "--task", "digitz"], "unknown task 'digitz'"),
])
def test_bad_tuning_input_is_one_message_and_nothing_written(tmp_path, capsys, argv, needle):
    from gradpipe.cli import main
    code = main(["compare", "sgd", "adam", "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir()), "nothing written"



@pytest.mark.parametrize("x,text", [(0.97501, "0.9750"), (1.31e-08, "1.31e-08"), (4e-05, "4e-05"), (0.0, "0.0000"),
                                    (12.5, "12.5000"), (float("nan"), "")])
def test_a_small_metric_is_not_printed_as_zero(x, text):
    from gradpipe.flows.commands import _fmt
    assert _fmt(x) == text
