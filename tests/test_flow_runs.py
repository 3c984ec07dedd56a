"""Training runs and comparison planning, without a Prefect server.

:func:`gradpipe.flows.train.execute_run` is the whole of a run as plain
Python, so what it records in MLflow is checked here directly against SQLite
stores in ``tmp_path``; ``test_flows.py`` runs the same code through Prefect.
"""

from __future__ import annotations

import math
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gradpipe import GradError
from gradpipe.flows import tracking
from gradpipe.flows.comparison import plan_runs, rank, ranking_markdown
from gradpipe.flows.spec import RunSpec, SpecError, grid_points, parse_grid, parse_sets, parse_value
from gradpipe.flows.train import RunOutcome, execute_run


@pytest.fixture()
def store(tmp_path):
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    return uri, tracking.ensure_experiment(uri, "t")


def _client(uri):
    from gradpipe.flows.tracking import open_client
    return open_client(uri)  # under the schema lock: the store may be new and a subprocess opening it too


def _new_run(uri, exp, spec):
    return tracking.create_child_run(uri, exp, None, spec.run_name)


# --- values from the command line -------------------------------------------------------------

def test_set_values_are_literals_never_code():
    assert parse_sets(["lr=1e-3", "betas=(0.9, 0.99)", "nesterov=True"]) == {
        "lr": 1e-3, "betas": (0.9, 0.99), "nesterov": True}
    assert parse_value("__import__('os').system('true')") == "__import__('os').system('true')"


def test_grid_splits_on_top_level_commas_only():
    assert parse_grid(["lr=1e-3,1e-2", "betas=(0.9,0.99),(0.8,0.9)"]) == {
        "lr": [1e-3, 1e-2], "betas": [(0.9, 0.99), (0.8, 0.9)]}
    assert grid_points({"b": [1, 2], "a": [3]}) == [{"a": 3, "b": 1}, {"a": 3, "b": 2}]
    assert grid_points({}) == [{}]


@pytest.mark.parametrize("bad", ["lr", "=1", "lr=", "1x=2"])
def test_malformed_set_is_one_clear_error(bad):
    with pytest.raises(SpecError, match="--set"):
        parse_sets([bad])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded machine draws slowly
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                       st.lists(st.one_of(st.integers(-5, 5), st.floats(1e-6, 10, allow_nan=False)),
                                min_size=1, max_size=3), min_size=1, max_size=3))
def test_grid_round_trips_through_its_text(grid):
    items = [f"{k}={','.join(repr(v) for v in vs)}" for k, vs in grid.items()]
    assert parse_grid(items) == grid
    assert len(grid_points(grid)) == math.prod(len(v) for v in grid.values())


def test_run_key_is_stable_and_decided_by_the_numbers():
    a = RunSpec("adam", "digits", 0, 30, {"lr": 0.01})
    assert a.key == RunSpec("adam", "digits", 0, 30, {"lr": 0.01}).key
    assert a.key != RunSpec("adam", "digits", 1, 30, {"lr": 0.01}).key
    assert a.run_name == "adam lr=0.01 seed=0"
    assert RunSpec("pipelines/scalpel.grad").label == "scalpel"


# --- planning a comparison --------------------------------------------------------------------

def test_plan_is_pipelines_times_grid_times_seeds():
    specs = plan_runs(["adam", "sgd"], "digits", [0, 1], steps=5, grid={"lr": [0.1, 0.01]})
    assert len(specs) == 8
    assert {s.hyperparams["lr"] for s in specs} == {0.1, 0.01}
    assert [s.seed for s in specs[:2]] == [0, 1]


def test_plan_rejects_bad_input_before_anything_runs():
    with pytest.raises(GradError, match="did you mean (one of )?'adam'"):
        plan_runs(["adma"], "digits", [0])
    with pytest.raises(GradError, match="unknown hyperparameter 'lrr'"):
        plan_runs(["adam"], "digits", [0], sets={"lrr": 0.1})
    with pytest.raises(GradError, match="outside"):
        plan_runs(["adam"], "digits", [0], grid={"lr": [-1.0]})
    with pytest.raises(SpecError, match="digits-multitask"):
        plan_runs(["pcgrad_adam"], "digits", [0], task_losses=("loss",))
    with pytest.raises(SpecError, match="twice"):
        plan_runs(["adam", "adam"], "digits", [0])
    with pytest.raises(SpecError, match="seeds"):
        plan_runs(["adam"], "digits", [])


def test_per_pipeline_values_lose_to_sets():
    specs = plan_runs(["adam", "sgd"], "digits", [0], per_pipeline={"adam": {"lr": 0.5}, "sgd": {"lr": 0.2}},
                      sets={"weight_decay": 0.0})
    assert [s.hyperparams["lr"] for s in specs] == [0.5, 0.2]
    specs = plan_runs(["adam"], "digits", [0], per_pipeline={"adam": {"lr": 0.5}}, sets={"lr": 0.1})
    assert specs[0].hyperparams["lr"] == 0.1


def _outcome(pipeline, seed, score, status="FINISHED", loss=1.0):
    return RunOutcome(spec=RunSpec(pipeline, seed=seed), run_id=f"{pipeline}{seed}", status=status,
                      metrics={"val_accuracy": score}, final_loss=loss, metric="val_accuracy",
                      higher_is_better=True, reason=None if status == "FINISHED" else "diverged")


def test_ranking_averages_seeds_and_puts_failures_last():
    rows = rank([_outcome("a", 0, 0.5), _outcome("a", 1, 0.7), _outcome("b", 0, 0.9), _outcome("b", 1, 0.1),
                 _outcome("c", 0, 0.99, "FAILED")], higher_is_better=True)
    assert [r.label for r in rows] == ["a", "b", "c"]
    assert rows[0].score_mean == pytest.approx(0.6) and rows[0].score_std == pytest.approx(0.1414, abs=1e-4)
    assert rows[2].finished == 0 and rows[2].reasons == ["diverged"]
    table = ranking_markdown(rows, "val_accuracy")
    assert "| 3 | c | 0/1 | failed |" in table


# --- one run, recorded ------------------------------------------------------------------------

def test_a_run_records_params_tags_metrics_and_artifacts(store):
    uri, exp = store
    spec = RunSpec("adam", "digits", seed=3, steps=12, hyperparams={"lr": 0.01})
    rid = _new_run(uri, exp, spec)
    out = execute_run(spec, uri, rid)
    assert out.ok and len(out.losses) == 12 and out.losses[-1] < out.losses[0]
    c = _client(uri)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["pipeline"], p["task"], p["seed"], p["steps"], p["lr"], p["betas.0"]) == (
        "adam", "digits", "3", "12", "0.01", "0.9")
    import gradpipe
    assert p["pipeline_hash"] == gradpipe.load("adam").hash
    assert run.data.tags["gradpipe.version"] == gradpipe.__version__
    assert run.data.tags["gradpipe.backend"] == "eager"
    history = c.get_metric_history(rid, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 13))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(out.losses)
    for key in ("opt/grad_norm", "opt/update_norm", "time/step_ms", "opt/nonfinite_steps"):
        assert len(c.get_metric_history(rid, key)) == 12
    assert c.get_metric_history(rid, "eval/val_accuracy")
    assert "final/val_accuracy" in run.data.metrics
    arts = {a.path for a in c.list_artifacts(rid, "pipeline")} | {a.path for a in c.list_artifacts(rid, "plots")}
    assert {"pipeline/pipeline.grad", "pipeline/canonical.grad", "pipeline/explain.txt",
            "plots/loss.png"} <= arts
    assert arts & {"pipeline/graph.svg", "pipeline/graph.dot"}


def test_a_diverging_run_is_failed_with_its_reason_and_keeps_its_steps(store):
    uri, exp = store
    spec = RunSpec("sgd", "digits", seed=0, steps=40, hyperparams={"lr": 1e38})
    rid = _new_run(uri, exp, spec)
    out = execute_run(spec, uri, rid)
    assert out.status == "FAILED" and "step" in out.reason
    run = _client(uri).get_run(rid)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE_TAG] == out.reason
    assert 0 < len(_client(uri).get_metric_history(rid, "train/loss")) < 40  # the steps before it


def test_a_user_error_fails_the_run_without_raising(store):
    uri, exp = store
    spec = RunSpec("adam", "digits", steps=5, hyperparams={"nope": 1})
    rid = _new_run(uri, exp, spec)
    out = execute_run(spec, uri, rid)
    assert out.status == "FAILED" and "unknown hyperparameter 'nope'" in out.reason
    assert _client(uri).get_run(rid).info.status == "FAILED"


def test_a_retried_run_logs_every_step_exactly_once(store):
    """A transient error mid-run propagates (for Prefect to retry); the retry reopens the same
    run and, training being deterministic, skips the steps already logged."""
    uri, exp = store
    spec = RunSpec("adam", "digits", seed=1, steps=30, hyperparams={"lr": 0.01})
    rid = _new_run(uri, exp, spec)

    def flaky(step, steps):
        if step == 17:
            raise OSError("connection reset by peer")

    with pytest.raises(OSError):
        execute_run(spec, uri, rid, on_step=flaky)
    run = _client(uri).get_run(rid)
    assert run.info.status == "FAILED" and "connection reset" in run.data.tags[tracking.FAILURE_TAG]
    out = execute_run(spec, uri, rid)
    assert out.ok
    run = _client(uri).get_run(rid)
    assert run.info.status == "FINISHED" and tracking.FAILURE_TAG not in run.data.tags
    steps = sorted(m.step for m in _client(uri).get_metric_history(rid, "train/loss"))
    assert steps == list(range(1, 31))
    straight_id = _new_run(uri, exp, spec)
    straight = execute_run(spec, uri, straight_id)
    assert straight.losses == out.losses
    by_step = {m.step: m.value for m in _client(uri).get_metric_history(rid, "train/loss")}
    assert [by_step[s] for s in range(1, 31)] == pytest.approx(straight.losses, rel=0, abs=0)


def test_a_folder_skips_the_pipelines_its_task_cannot_train(tmp_path):
    from gradpipe.flows.comparison import fitting_task, grad_files
    files = grad_files("pipelines")
    fit, skipped = fitting_task(files, "digits")
    assert {pathlib.Path(f).stem for f in skipped} == {"pcgrad_adam", "gcond", "samgs_adam", "bloop_adam"}
    assert len(fit) + len(skipped) == len(files)
    fit, skipped = fitting_task(files, "digits-multitask")
    assert not skipped


def _final_params(uri, run_id):
    from gradpipe.flows.train import load_checkpoint
    return load_checkpoint(uri, run_id)


def test_an_interrupted_run_resumes_to_the_same_bits(store):
    """Checkpoints every 5 steps; a run stopped at step 13 resumes from step 10 and ends with
    parameters and optimizer state bitwise equal to a run that never stopped."""
    import torch
    from gradpipe.flows.train import resume_run
    uri, exp = store
    spec = RunSpec("diffgrad", "digits", seed=2, steps=20, hyperparams={"lr": 0.01})
    straight = _new_run(uri, exp, spec)
    assert execute_run(spec, uri, straight, checkpoint_every=5).ok

    broken = _new_run(uri, exp, spec)

    def stop(step, steps):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, uri, broken, on_step=stop, checkpoint_every=5)
    assert _client(uri).get_run(broken).data.tags["gradpipe.checkpoint_step"] == "10"
    out = resume_run(uri, broken)
    assert out.ok
    run = _client(uri).get_run(broken)
    assert run.info.status == "FINISHED" and run.data.tags["gradpipe.resumed_from_step"] == "10"
    a, b = _final_params(uri, straight), _final_params(uri, broken)
    assert a.step == b.step == 20
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for pa, pb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    steps = sorted(m.step for m in _client(uri).get_metric_history(broken, "train/loss"))
    assert steps == list(range(1, 21))


def test_resume_refuses_a_finished_run_or_a_changed_pipeline(store, tmp_path):
    from gradpipe.flows.train import ResumeError, resume_run
    uri, exp = store
    f = tmp_path / "mine.grad"
    f.write_text("hparam lr = 0.01\ngrad | adam(0.9, 0.999, 1e-8)\n")
    spec = RunSpec(str(f), "digits", steps=6)
    rid = _new_run(uri, exp, spec)
    assert execute_run(spec, uri, rid, checkpoint_every=2).ok
    with pytest.raises(ResumeError, match="already finished"):
        resume_run(uri, rid)
    rid2 = _new_run(uri, exp, spec)
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, uri, rid2, checkpoint_every=2,
                    on_step=lambda s, n: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else None)
    f.write_text("hparam lr = 0.01\ngrad | adam(0.8, 0.999, 1e-8)\n")
    with pytest.raises(ResumeError, match="changed since"):
        resume_run(uri, rid2)


def test_a_stopped_comparison_marks_its_unfinished_runs_killed(store):
    from gradpipe.flows.comparison import _end_unfinished
    uri, exp = store
    done = _new_run(uri, exp, RunSpec("adam", steps=3))
    assert execute_run(RunSpec("adam", steps=3), uri, done).ok
    waiting = _new_run(uri, exp, RunSpec("sgd", steps=3))
    _end_unfinished(uri, [done, waiting], "the comparison stopped (KeyboardInterrupt)")
    c = _client(uri)
    assert c.get_run(done).info.status == "FINISHED"
    assert c.get_run(waiting).info.status == "KILLED"
    assert "KeyboardInterrupt" in c.get_run(waiting).data.tags[tracking.FAILURE_TAG]
