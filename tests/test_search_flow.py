"""``gradpipe search`` as a flow: MLflow lineage, determinism, resume after a kill, the top-k files, Dask.

The end-to-end search (40 candidates, 30 steps per learning rate, on a small
digits MLP) runs once per module (:func:`straight`) and the other searches are
checked against its history: the same seed gives the same candidates and
scores, a search killed mid-way and resumed ends with the same history without
evaluating any candidate twice, and so does a search on a Dask cluster whose
worker is killed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from gradpipe.flows import tracking
from gradpipe.flows.search_eval import EvalJob, evaluate, signed, sweep_lrs

PROXY = ["--task", "digits", "--task-option", "hidden=16", "--task-option", "batch_size=32", "--steps", "30",
         "--lrs", "2"]
FUNNEL = ["--funnel-task", "digits", "--funnel-steps", "60", "--top-k", "3"]
BUDGET = 40
SEEDS = "adam,sgd"
GRADPIPE = [sys.executable, "-m", "gradpipe"]


def _argv(uri, out, *extra, budget=BUDGET):
    return ["search", *PROXY, *FUNNEL, "--seed-pipelines", SEEDS, "--budget", str(budget), "--seed", "0",
            "--workers", "2", "--tracking-uri", uri, "--experiment", "search", "--out", str(out), *extra]


def _config(budget):
    from gradpipe.flows.search import make_config
    return make_config(SEEDS.split(","), "digits", budget, seed=0, batch=2, steps=30, lrs=2,
                       task_options={"hidden": 16, "batch_size": 32}, funnel_task="digits", funnel_steps=60, top_k=3)


def _children(uri, parent):
    c = tracking.open_client(uri)
    exp = c.get_run(parent).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    return c, runs


def _summary(uri, parent):
    """The parent run's ``search.json``."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(pathlib.Path(tracking.open_client(uri).download_artifacts(parent, "search.json", tmp))
                          .read_text())


def _lineage(summary):
    return [(r["index"], r["key"], r["parent"], r["mutation"], r["score"]) for r in summary["candidates"]]


def _assert_each_evaluated_once(uri, parent, lrs=2):
    """One child per candidate and stage, every learning rate of its sweep logged exactly once."""
    c, runs = _children(uri, parent)
    seen = {}
    for r in runs:
        key = (r.data.tags["gradpipe.search.stage"], r.data.tags["gradpipe.search.key"])
        assert key not in seen, f"{key} has two child runs"
        seen[key] = r
        assert r.info.status in ("FINISHED", "FAILED"), (r.info.run_name, r.info.status)
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "sweep/score"))
        assert steps == list(range(lrs)), f"{r.info.run_name}: each learning rate once, got steps {steps}"
        assert "score" in r.data.metrics
    return seen


# --- the parts, without Prefect -----------------------------------------------------------------

@pytest.mark.parametrize("default, n, spread, expected", [
    (1e-3, 3, 100.0, (1e-4, 1e-3, 1e-2)),
    (1e-3, 1, 10.0, (1e-3,)),
    (0.1, 2, 4.0, (0.05, 0.2)),
    (2.0, 5, 1.0, (2.0,) * 5),
])
def test_the_sweep_is_log_spaced_around_the_default(default, n, spread, expected):
    assert sweep_lrs(default, n, spread) == pytest.approx(expected)


@pytest.mark.parametrize("value, higher, score", [
    (0.9, True, 0.9), (0.3, False, -0.3), (math.nan, True, -math.inf), (math.inf, False, -math.inf)])
def test_a_score_is_higher_better_and_failures_are_minus_inf(value, higher, score):
    assert signed(value, higher) == score


def _fake_score(c):
    """A deterministic stand-in for training: a number from the candidate's key (some fail)."""
    x = int(c.key[:8], 16) / 16**8
    return -math.inf if x < 0.15 else x


def _run_rounds(evo, batch, budget, stop_after=None):
    from gradpipe.flows.search import rounds
    told = 0
    for got in rounds(evo, batch, budget):
        for c in got:
            if stop_after is not None and told == stop_after:
                return evo
            evo.tell(c.key, _fake_score(c))
            told += 1
    return evo


@pytest.mark.parametrize("batch, budget, told, lost", [
    (2, 14, 7, ()),        # killed mid-batch: candidate 7 asked, never scored
    (3, 14, 8, (6,)),      # a gap: 6 never scored, 7 scored, 8 asked
    (3, 14, 9, (7, 8)),    # a whole batch lost but its first member
    (4, 13, 4, ()),        # killed right after a batch
    (1, 10, 5, (2,)),
    (2, 12, 7, (2, 4)),    # scores of earlier batches lost from the record: made again, asked again
    (2, 10, 6, (3,)),      # the last recorded index ends a batch: the re-asked 3 is told before 6 is drawn
])
def test_a_restored_search_goes_on_in_the_rounds_the_uninterrupted_one_had(batch, budget, told, lost):
    """Restored from the candidates scored before a stop (minus ``lost`` ones whose scores never
    reached the record), the search re-asks the unscored ones first and then ends each round
    where a batch ends: its history equals the uninterrupted search's, candidates and counts."""
    import gradpipe
    from gradpipe.search import Evolution
    seeds = {"adam": gradpipe.load("adam").source, "sgd": gradpipe.load("sgd").source}
    straight = _run_rounds(Evolution(seeds, seed=3, batch=batch), batch, budget)
    stopped = _run_rounds(Evolution(seeds, seed=3, batch=batch), batch, budget, stop_after=told)
    # a lost score leaves its child run (key, parent, index: recorded before the evaluation), so it is
    # recorded with None; the candidates of the round the stop cut are not recorded at all
    record = [(c, None if c.index in lost else s) for c, s in stopped.history if s is not None]
    resumed = _run_rounds(Evolution.restore(seeds, record, seed=3, batch=batch), batch, budget)
    assert resumed.history == straight.history
    assert (resumed.invalid, resumed.duplicates) == (straight.invalid, straight.duplicates)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (a new SQLite store costs seconds of schema migrations); every
    search in it has its own parent run, and the checks look only below their own parent."""
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('store')}/mlruns.db")
    return uri, tracking.ensure_experiment(uri, "t")


def _job(source="adam", lrs=(1e-3, 1e-2, 1e-1)):
    import gradpipe
    return EvalJob(source=gradpipe.load(source).source, key="k", task="digits", steps=30, lrs=lrs,
                   task_options={"hidden": 16, "batch_size": 32})


def test_an_evaluation_stopped_mid_sweep_goes_on_without_repeating_a_learning_rate(store, monkeypatch):
    import gradpipe.flows.search_eval as se
    uri, exp = store
    straight = evaluate(_job(), uri, tracking.create_child_run(uri, exp, None, "straight"))
    rid = tracking.create_child_run(uri, exp, None, "stopped")
    trained, real = [], se._trial

    def trial(job, program, task, lr):
        if len(trained) == stop_after:
            raise KeyboardInterrupt
        trained.append(lr)
        return real(job, program, task, lr)

    monkeypatch.setattr(se, "_trial", trial)
    stop_after = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(_job(), uri, rid)
    c = tracking.open_client(uri)
    assert c.get_run(rid).info.status == "KILLED"
    trained.clear()
    stop_after = 99
    again = evaluate(_job(), uri, rid)
    assert trained == [1e-1], "only the learning rate not logged yet is trained"
    assert (again.score, again.best_lr, again.trials) == (straight.score, straight.best_lr, straight.trials)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["gradpipe.search.resumed_after_lrs"] == "2"
    assert sorted(m.step for m in c.get_metric_history(rid, "sweep/score")) == [0, 1, 2]
    assert evaluate(_job(), uri, rid).score == straight.score and trained == [1e-1], "read back, not trained"


def test_a_run_killed_after_its_score_was_logged_is_ended_when_read_back(store, monkeypatch):
    """A SIGKILL between logging the score and ending the run leaves it RUNNING with a score; a
    resumed search reads the score back (trains nothing) and ends the run as the evaluation would
    have (once seen in CI: a resumed search's child still RUNNING)."""
    import gradpipe.flows.search_eval as se
    uri, exp = store
    rid = tracking.create_child_run(uri, exp, None, "killed-late")
    first = evaluate(_job(lrs=(1e-2,)), uri, rid)
    c = tracking.open_client(uri)
    c.update_run(rid, status="RUNNING")  # what the kill leaves
    monkeypatch.setattr(se, "_trial", lambda *a: pytest.fail("a scored run must not train again"))
    again = evaluate(_job(lrs=(1e-2,)), uri, rid)
    assert again.score == first.score and c.get_run(rid).info.status == "FINISHED"


def test_a_candidate_whose_every_learning_rate_diverges_scores_minus_inf(store):
    uri, exp = store
    rid = tracking.create_child_run(uri, exp, None, "diverges")
    out = evaluate(_job("sgd", lrs=(1e38, 1e39)), uri, rid)
    assert out.score == -math.inf and not out.ok and "lr=1e+38" in out.reason
    run = tracking.open_client(uri).get_run(rid)
    assert run.info.status == "FAILED" and math.isnan(run.data.metrics["score"])
    assert evaluate(_job("sgd", lrs=(1e38, 1e39)), uri, rid).score == -math.inf, "read back as -inf"


def test_an_lr_outside_the_declared_range_fails_only_that_lr(store):
    uri, exp = store
    out = evaluate(_job(lrs=(-1.0, 1e-2)), uri, tracking.create_child_run(uri, exp, None, "range"))
    assert out.trials[0] == -math.inf and math.isfinite(out.trials[1]) and out.best_lr == 1e-2


def test_the_lineage_runs_back_to_the_seed_pipeline():
    from gradpipe.flows.search_output import lineage
    from gradpipe.search import Candidate
    a = Candidate("a", "ka", None, "seed adam", 0)
    b = Candidate("b", "kb", "ka", "m1", 2)
    c = Candidate("c", "kc", "kb", "m2", 5)
    by = {x.key: x for x in (a, b, c)}
    assert [x.key for x in lineage("kc", by)] == ["ka", "kb", "kc"]
    assert [x.key for x in lineage("ka", by)] == ["ka"]


def test_a_seed_that_imports_a_file_is_refused_before_the_search_starts(tmp_path):
    """The search keeps a seed's text alone (Evolution compiles it as ``<seed NAME>``), so an
    import would fail only once the parent run exists: make_config refuses it in one line."""
    from gradpipe.flows.search import make_config
    from gradpipe.flows.spec import SpecError
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blocks.grad").write_text("let m = grad | ema(0.9)\n")
    (tmp_path / "sub" / "seed.grad").write_text('import "blocks.grad"\nm | sign\n')
    with pytest.raises(SpecError, match="inline its imports") as info:
        make_config([str(tmp_path / "sub" / "seed.grad"), "adam"], "digits", 4)
    assert "\n" not in str(info.value) and "blocks.grad" in str(info.value)
    (tmp_path / "sub" / "alone.grad").write_text("let m = grad | ema(0.9)\nm | sign\n")
    assert list(make_config([str(tmp_path / "sub" / "alone.grad"), "adam"], "digits", 4).seeds) == ["alone", "adam"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "digits", "--seed-pipelines", "adam,nope", "--budget", "4"], "no pipeline file or built-in"),
    (["--task", "digits", "--seed-pipelines", "adam", "--budget", "0"], "--budget must be at least 1"),
    (["--task", "digits", "--seed-pipelines", "adam,adam", "--budget", "4"], "given twice"),
    *[(["--task", "digits", "--seed-pipelines", "adam", "--budget", "4", option, "0"], f"{option} must be at least 1")
      for option in ("--lrs", "--lr-spread", "--population", "--tournament", "--batch")],
    (["--task", "nope", "--seed-pipelines", "adam", "--budget", "4"], "nope"),
    (["--task", "digits", "--seed-pipelines", "adam", "--budget", "4", "--task-option", "hiden=3"], "hidden"),
    (["--task", "digits-multitask", "--seed-pipelines", "adam", "--budget", "4"], "single-loss"),
    (["--task", "digits", "--seed-pipelines", "adam"], "give --task, --seed-pipelines and --budget"),
    (["--resume", "abc", "--budget", "3"], "drop --budget"),
    (["--resume", "abc"], "no tracking database"),
])
def test_a_mistake_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys, monkeypatch):
    from gradpipe.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["search", *argv, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_resume_refuses_a_run_that_is_not_a_search(store, capsys):
    from gradpipe.cli import main
    uri, exp = store
    rid = tracking.create_child_run(uri, exp, None, "a training run")
    assert main(["search", "--resume", rid, "--tracking-uri", uri]) == 2
    assert "not the parent run of a gradpipe search" in capsys.readouterr().err


def test_top_k_0_writes_no_program_and_exits_0(prefect_server, store, tmp_path, capsys):
    """``--top-k 0`` searches and records without writing a program: the exit status is 1 only
    when every candidate failed, not whenever there are no finalists."""
    from gradpipe.cli import main
    argv = _argv(store[0], tmp_path / "top", budget=2)
    argv[argv.index("--top-k") + 1] = "0"
    assert main(argv) == 0
    assert "2 candidates evaluated" in capsys.readouterr().out
    assert not list((tmp_path / "top").glob("*.grad"))


# --- the whole search ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(prefect_server, store, tmp_path_factory):
    """The uninterrupted end-to-end search through the CLI: (uri, parent run id, out dir, stdout)."""
    from gradpipe.cli import main
    tmp = tmp_path_factory.mktemp("straight")
    uri = store[0]
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_argv(uri, tmp / "top")) == 0
    out = buf.getvalue()
    parent = out.split("MLflow parent run ", 1)[1].split()[0]
    return uri, parent, tmp / "top", out


def test_a_search_records_a_parent_and_a_child_per_candidate_with_its_lineage(straight):
    uri, parent, _, out = straight
    c, _ = _children(uri, parent)
    prun = c.get_run(parent)
    assert prun.info.status == "FINISHED" and prun.data.tags["gradpipe.kind"] == "search"
    assert (prun.data.params["budget"], prun.data.params["seed_pipelines"], prun.data.params["batch"]) == (
        "40", "adam,sgd", "2")
    summary = _summary(uri, parent)
    seen = _assert_each_evaluated_once(uri, parent)
    proxy = {k: r for (stage, k), r in seen.items() if stage == "proxy"}
    funnel = {k: r for (stage, k), r in seen.items() if stage == "funnel"}
    assert len(proxy) == BUDGET and len(funnel) == 3
    assert sorted(int(r.data.params["search.index"]) for r in proxy.values()) == list(range(BUDGET))
    assert [r.data.params["search.mutation"] for r in sorted(proxy.values(), key=lambda r: int(
        r.data.params["search.index"]))][:2] == ["seed adam", "seed sgd"]
    for key, r in proxy.items():
        p = r.data.params
        assert p["search.key"] == key and p["search.mutation"]
        if p["search.parent"] != "none":  # a mutant's parent was asked before it
            assert int(proxy[p["search.parent"]].data.params["search.index"]) < int(p["search.index"])
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "pipeline")}
        assert arts == {"pipeline/pipeline.grad", "pipeline/canonical.grad"}
        row = summary["candidates"][int(p["search.index"])]
        assert row["key"] == key and row["run_id"] == r.info.run_id
        logged = r.data.metrics["score"]
        assert (math.isnan(logged) and row["score"] == -math.inf) or logged == row["score"]
    # the counts on the parent
    m = prun.data.metrics
    assert (m["search/evaluated"], m["search/invalid"], m["search/duplicates"], m["search/failed"]) == (
        BUDGET, summary["invalid"], summary["duplicates"], summary["failed"])
    assert m["best/score"] == max(r["score"] for r in summary["candidates"])
    assert f"{summary['invalid']} invalid and {summary['duplicates']} duplicate" in out
    assert f"({BUDGET + 3} trained now, 0 read from MLflow)" in out


def test_the_top_programs_compile_and_carry_their_lineage(straight):
    from gradpipe.cli import main
    uri, parent, top, _ = straight
    files = sorted(top.glob("*.grad"))
    assert len(files) == 3
    assert main(["check", str(top)]) == 0
    assert main(["fmt", "--check", str(top)]) == 0
    summary = _summary(uri, parent)
    by_key = {r["key"]: r for r in summary["candidates"]}
    for rank, f in enumerate(files, 1):
        text = f.read_text()
        assert text.startswith(f"# found by gradpipe search {parent}, seed 0\n# rank {rank} of 3: score ")
        assert "funnel score" in text
        chain = [line[4:] for line in text.split("lineage", 1)[1].splitlines()[1:]
                 if line.startswith("#   ")]
        assert chain[0].split(": ", 1)[1].startswith("seed "), "the lineage starts at a seed pipeline"
        keys = [line.split(":")[0] for line in chain]
        for child, parent_key in zip(keys[1:], keys):
            assert by_key[child]["parent"] == parent_key
        assert summary["top"][rank - 1]["key"] == keys[-1]
        assert f.with_suffix(".diff.txt").read_text().startswith("--- seed ")
    arts = {a.path for a in tracking.open_client(uri).list_artifacts(parent, "top")}
    assert {f"top/{f.name}" for f in files} | {f"top/{f.stem}.diff.txt" for f in files} == arts


def test_a_killed_search_resumes_to_the_same_history_without_evaluating_a_candidate_twice(straight, prefect_server,
                                                                                           tmp_path):
    """A second search with the same seed, in another process, SIGKILLed a third of the way and
    resumed: its candidates and scores are the uninterrupted search's (the same seed gives the
    same search: the budget only cuts it short), and no candidate or learning rate is evaluated twice."""
    from prefect_server import prefect_env
    from gradpipe.cli import main
    uri, parent0, _, _ = straight
    budget = 16
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen([*GRADPIPE, *_argv(uri, tmp_path / "top", budget=budget)], env=prefect_env(prefect_server),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True)
    parent, scored = None, 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until a third of the budget is scored
            time.sleep(0.1)
            text = (tmp_path / "search.log").read_text()
            if parent is None and "MLflow parent run " in text:
                parent = text.split("MLflow parent run ", 1)[1].split()[0]
            if parent is not None:
                scored = sum("score" in r.data.metrics for r in _children(uri, parent)[1])
                if scored >= budget // 3:
                    break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert parent is not None and budget // 3 <= scored < budget, (scored, (tmp_path / "search.log").read_text())
    assert tracking.open_client(uri).get_run(parent).info.status == "RUNNING", "killed, not finished"
    before = {r.data.tags["gradpipe.search.key"]: (r.info.run_id, r.data.metrics.get("score"))
              for r in _children(uri, parent)[1]}
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["search", "--resume", parent, "--tracking-uri", uri, "--out", str(tmp_path / "top")]) == 0
    read_back = int(buf.getvalue().split(" read from MLflow")[0].rsplit(", ", 1)[1])
    assert read_back >= scored
    summary = _summary(uri, parent)
    assert _lineage(summary) == _lineage(_summary(uri, parent0))[:budget]
    straight_counts = tracking.open_client(uri).get_metric_history(parent0, "search/invalid")
    assert summary["invalid"] == {m.step: m.value for m in straight_counts}[budget], "restored counts"
    seen = _assert_each_evaluated_once(uri, parent)
    assert len(seen) == budget + 3
    for key, (run_id, score) in before.items():  # each run from before the kill was reused, not duplicated
        assert seen[("proxy", key)].info.run_id == run_id
        if score is not None:
            assert seen[("proxy", key)].data.metrics["score"] == score or math.isnan(score)
    assert tracking.open_client(uri).get_run(parent).info.status == "FINISHED"
    assert main(["check", str(tmp_path / "top")]) == 0


# --- Dask -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """One Dask LocalCluster of 2 worker processes for both Dask tests (starting one, and the
    workers' first imports, cost more than a small search); the worker-killing test runs last."""
    from distributed import LocalCluster
    from gradpipe.flows.comparison import local_cluster_kwargs
    with LocalCluster(**local_cluster_kwargs(2)) as c:
        yield c


@pytest.mark.slow
def test_a_search_on_a_dask_cluster_of_two_workers_matches_the_local_one(straight, cluster, tmp_path):
    from gradpipe.flows.search import search
    uri = straight[0]
    result = search(_config(8), runner="dask", address=cluster.scheduler_address, tracking_uri=uri,
                    out_dir=tmp_path / "top")
    mine = [(c.index, c.key, c.parent, c.mutation, r.score) for c, r in result.history]
    assert mine == _lineage(_summary(straight[0], straight[1]))[:8]
    _assert_each_evaluated_once(uri, result.parent_run_id)


@pytest.mark.slow
def test_a_worker_killed_mid_search_loses_no_candidate_and_evaluates_none_twice(straight, cluster, tmp_path):
    from distributed import Client
    from gradpipe.flows.search import search
    uri = straight[0]
    parents: list[str] = []
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("result", search(
        _config(16), runner="dask", address=cluster.scheduler_address, tracking_uri=uri,
        out_dir=tmp_path / "top", on_parent=parents.append)))
    t.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed is None and t.is_alive():
        time.sleep(0.1)
        if not parents:
            continue
        runs = _children(uri, parents[0])[1]
        if sum("score" in r.data.metrics for r in runs) >= 4 and any(r.info.status == "RUNNING" for r in runs):
            with Client(cluster.scheduler_address, set_as_default=False) as client:
                killed = sorted(client.run(os.getpid).values())[0]
            os.kill(killed, signal.SIGKILL)
    t.join(300)
    assert killed is not None, "the search ended before a worker could be killed"
    assert not t.is_alive()
    result = out["result"]
    mine = [(c.index, c.key, c.parent, c.mutation, r.score) for c, r in result.history]
    assert mine == _lineage(_summary(straight[0], straight[1]))[:16]
    assert len(_assert_each_evaluated_once(uri, result.parent_run_id)) == 16 + 3
