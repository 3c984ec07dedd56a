"""The Prefect flows for real: comparisons, failures, a Dask cluster, a cron schedule, the CLI.

Every test here runs against a real Prefect server on 127.0.0.1 (the
``prefect_server`` fixture) and an MLflow SQLite store in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from prefect_server import api_request, prefect_env

pytestmark = pytest.mark.slow

GRADPIPE = [sys.executable, "-m", "gradpipe"]

#: Last-resort guards, never what a test checks: a child on a loaded 2-core machine may take
#: minutes to import torch, Prefect and MLflow and to train; the tests wait on its marker files.
REACH_S = 300
EXIT_S = 300
RUN_S = 900

#: ``gradpipe ARGS...`` (``python -c PROBE MARKERS ARGS...``) with two probes, through RunLogger's
#: public methods, that write marker files the test waits on instead of polling the store the
#: child is writing:
#:
#: * ``MARKERS/flushed`` (JSON: run_id, steps) after every flush that wrote train/loss values,
#:   ``steps`` counting the distinct steps written so far;
#: * with ``GRADPIPE_TEST_PAUSE_AT=N``: on logging step N, ``MARKERS/paused`` (JSON: run_id, step),
#:   then the child sleeps there until it is killed (at most 10 minutes, then it exits 3), so a
#:   kill lands at a known step of the run.
#:
#: Markers are written to a temporary name and renamed: a marker the test sees is complete.
PROBE = r"""
import json, os, pathlib, sys, time
from gradpipe.flows import tracking

markers = pathlib.Path(sys.argv[1])
pause_at = int(os.environ.get("GRADPIPE_TEST_PAUSE_AT", "0"))
pending, flushed = set(), set()


def mark(name, **data):
    tmp = markers / (name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, markers / name)


real_metrics, real_flush = tracking.RunLogger.metrics, tracking.RunLogger.flush


def metrics(self, values, step):
    if "train/loss" in values:
        pending.add(int(step))
    real_metrics(self, values, step)
    if pause_at and step == pause_at:
        mark("paused", run_id=self.run_id, step=int(step))
        time.sleep(600)
        os._exit(3)


def flush(self):
    real_flush(self)
    if pending:
        flushed.update(pending)
        pending.clear()
        mark("flushed", run_id=self.run_id, steps=len(flushed))


tracking.RunLogger.metrics, tracking.RunLogger.flush = metrics, flush
sys.argv = ["gradpipe", *sys.argv[2:]]
from gradpipe.cli import main
sys.exit(main())
"""


def _probed(markers, *argv):
    """The argv of ``gradpipe *argv`` under :data:`PROBE`, writing its markers to ``markers``."""
    markers.mkdir(exist_ok=True)
    return [sys.executable, "-c", PROBE, str(markers), *argv]


def _wait_for_marker(path, proc, log, timeout=REACH_S):
    """The JSON of the marker file ``path`` once the child ``proc`` has written it. Fails at once
    if the child exits first (with the tail of its ``log``); ``timeout`` is only a guard."""
    deadline = time.monotonic() + timeout
    tail = lambda: log.read_text(errors="replace")[-3000:]  # noqa: E731
    while not path.exists():
        assert proc.poll() is None, f"the child exited ({proc.returncode}) before writing {path.name}:\n{tail()}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s:\n{tail()}"
        time.sleep(0.1)  # a file check: no load on the store the child writes
    return json.loads(path.read_text())


def _client(uri):
    from gradpipe.flows.tracking import open_client
    return open_client(uri)  # under the schema lock: the store may be new and a subprocess opening it too


def _runs(uri, experiment):
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _curve(uri, run_id, key="train/loss"):
    return [m.value for m in sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_compare_2x2_leaves_one_parent_and_four_finished_children(prefect_server, tmp_path):
    """The issue's acceptance check: 2 pipelines x 2 seeds, 30 steps on digits."""
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    result = compare(["adam", "momentum"], "digits", [0, 1], steps=30,
                     per_pipeline={"adam": {"lr": 0.01}, "momentum": {"lr": 0.1}},
                     tracking_uri=uri, experiment="acceptance", baseline="adam")
    parents, children = _runs(uri, "acceptance")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == result.parent_run_id
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result.parent_run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {(r.data.params["pipeline"], r.data.params["seed"]) for r in children} == {
        ("adam", "0"), ("adam", "1"), ("momentum", "0"), ("momentum", "1")}
    for r in children:
        curve = _curve(uri, r.info.run_id)
        assert len(curve) == 30
        assert sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5, "the loss must fall"
        assert r.data.tags["prefect.flow_run_id"] == parents[0].data.tags["prefect.flow_run_id"]
    arts = {a.path for a in _client(uri).list_artifacts(result.parent_run_id)}
    assert {"comparison.md", "comparison.json", "plots", "diff_vs_baseline.txt", "diff_vs_baseline.json"} <= arts
    assert parents[0].data.tags["gradpipe.baseline"] == "adam"
    assert {r.label for r in result.ranking} == {"adam lr=0.01", "momentum lr=0.1"}


def test_a_failing_run_does_not_stop_the_others(prefect_server, tmp_path):
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    result = compare(["adam", "sgd"], "digits", [0], steps=20,
                     per_pipeline={"adam": {"lr": 0.01}, "sgd": {"lr": 1e38}},
                     tracking_uri=uri, experiment="failing")
    assert [o.spec.label for o in result.failed] == ["sgd lr=1e+38"]
    parents, children = _runs(uri, "failing")
    status = {r.data.params["pipeline"]: r for r in children}
    assert status["adam"].info.status == "FINISHED"
    assert status["sgd"].info.status == "FAILED"
    assert "became inf" in status["sgd"].data.tags["gradpipe.failure"]
    assert _curve(uri, status["sgd"].info.run_id), "a failed run keeps what it logged"
    assert parents[0].info.status == "FINISHED"
    assert result.ranking[-1].label == "sgd lr=1e+38"


def test_compare_on_a_dask_cluster_of_two_worker_processes(prefect_server, tmp_path):
    from distributed import LocalCluster
    from gradpipe.flows.comparison import local_cluster_kwargs
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    with LocalCluster(**local_cluster_kwargs(2)) as cluster:
        result = compare(["adam", "rmsprop"], "digits", [0, 1], steps=15, sets={"lr": 0.01}, runner="dask",
                         address=cluster.scheduler_address, tracking_uri=uri, experiment="dask")
        worker_pids = {w.pid for w in cluster.workers.values()} if hasattr(cluster, "workers") else set()
    assert not result.failed
    parents, children = _runs(uri, "dask")
    assert len(parents) == 1 and len(children) == 4
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all(len(_curve(uri, r.info.run_id)) == 15 for r in children)
    assert len(worker_pids) == 2


def test_a_cron_schedule_runs_the_comparison(prefect_server, tmp_path):
    """`gradpipe serve DIR --cron` for real: serve, trigger the deployment, find the runs in MLflow."""
    from prefect.deployments import run_deployment
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "mine.grad").write_text("hparam lr = 0.01\ngrad | adam(0.9, 0.999, 1e-8)\n")
    (folder / "plain.grad").write_text("hparam lr = 0.05\ngrad\n")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = prefect_env(prefect_server)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([*GRADPIPE, "serve", str(folder), "--cron", "0 3 * * *", "--name", "nightly",
                             "--steps", "10", "--tracking-uri", uri, "--experiment", "sched"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        dep = None
        while time.monotonic() < deadline and dep is None:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            found = api_request(prefect_server.api_url, "/deployments/filter", {})
            dep = next((d for d in found if d["name"] == "nightly"), None)
            time.sleep(0.5)
        assert dep is not None, (tmp_path / "serve.log").read_text()
        assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        run = run_deployment("gradpipe-scheduled-compare/nightly", timeout=240)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        import signal
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    parents, children = _runs(uri, "sched")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["pipeline"] for r in children) == ["mine", "plain"]
    assert {r.info.status for r in children} == {"FINISHED"}


def test_cli_compare_prints_the_ranking_and_the_ui_command(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = subprocess.run([*GRADPIPE, "compare", "adam", "sgd", "--task", "digits", "--seeds", "2", "--steps", "10",
                          "--set", "lr=0.05", "--tracking-uri", uri, "--experiment", "cli"],
                         env=prefect_env(prefect_server), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranked by val_accuracy" in out.stdout and "2/2" in out.stdout
    assert "gradpipe ui" in out.stdout and "#/experiments/" in out.stdout
    assert "Traceback" not in out.stderr
    assert len(_runs(uri, "cli")[1]) == 4


def test_cli_exits_nonzero_only_when_every_run_fails(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = subprocess.run([*GRADPIPE, "compare", "sgd", "momentum", "--steps", "10", "--set", "lr=1e38",
                          "--tracking-uri", uri, "--experiment", "allfail"],
                         env=prefect_env(prefect_server), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 1
    assert "2 of 2 runs failed" in out.stderr and "Traceback" not in out.stderr
    parents, children = _runs(uri, "allfail")
    assert parents[0].info.status == "FAILED" and {r.info.status for r in children} == {"FAILED"}


def test_cli_train_on_the_char_lm(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = subprocess.run([*GRADPIPE, "train", "adam", "--task", "charlm", "--steps", "40", "--set", "lr=3e-3",
                          "--tracking-uri", uri, "--experiment", "lm"],
                         env=prefect_env(prefect_server), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val_loss=" in out.stdout
    parents, _ = _runs(uri, "lm")
    (run,) = parents
    assert run.info.status == "FINISHED" and run.data.params["task"] == "charlm"
    evals = _curve(uri, run.info.run_id, "eval/val_loss")
    assert evals[-1] < evals[0]


BAD = [
    (["compare", "adma", "--steps", "5"], "did you mean"),
    (["compare", "adam", "--task", "digitz"], "digits"),
    (["compare", "adam", "--set", "lrr=0.1"], "unknown hyperparameter 'lrr'"),
    (["compare", "adam", "--set", "lr"], "--set expects NAME=VALUE"),
    (["compare", "pcgrad_adam", "--task", "digits"], "digits-multitask"),
    (["compare", "adam", "--tracking-uri", "http://127.0.0.1:9"], "127.0.0.1:9"),
    (["compare", "adam", "--runner", "dask", "--address", "tcp://127.0.0.1:9"], "no Dask scheduler answers"),
    (["train", "nope.grad"], "nope.grad"),
    (["serve", ".", "--cron", "every day"], "cron"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_message_and_nothing_written(tmp_path, argv, needle):
    (tmp_path / "p.grad").write_text("grad\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    out = subprocess.run([*GRADPIPE, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.grad"], "nothing half-written"


def test_prefect_retries_a_transient_failure_into_the_same_run(prefect_server, tmp_path, monkeypatch):
    """An OSError mid-run (a lost connection) is retried by Prefect; the retry reopens the same MLflow
    run and logs every step exactly once."""
    import gradpipe.flows.train as train_mod
    from gradpipe.flows import compare
    real = train_mod.execute_run
    calls = []

    def flaky(spec, uri, run_id, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            return real(spec, uri, run_id, on_step=lambda s, n: (_ for _ in ()).throw(OSError("reset"))
                        if s == 7 else None)
        return real(spec, uri, run_id, **kw)

    monkeypatch.setattr(train_mod, "execute_run", flaky)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    result = compare(["adam"], "digits", [0], steps=12, sets={"lr": 0.01}, tracking_uri=uri, experiment="retry")
    assert len(calls) == 2 and calls[0] == calls[1]
    assert not result.failed
    parents, children = _runs(uri, "retry")
    (child,) = children
    assert child.info.status == "FINISHED" and child.data.tags["gradpipe.resumed_after_step"] == "6"
    steps = sorted(m.step for m in _client(uri).get_metric_history(child.info.run_id, "train/loss"))
    assert steps == list(range(1, 13))


def test_sigterm_ends_the_run_as_killed_and_keeps_its_metrics(prefect_server, tmp_path):
    """SIGTERM mid-training (after a flush of metrics): the run ends KILLED, not RUNNING, and
    keeps every metric it had flushed."""
    import signal
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    log_path, markers = tmp_path / "train.log", tmp_path / "markers"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_probed(markers, "train", "sgd", "--task", "charlm", "--steps", "100000",
                                        "--tracking-uri", uri, "--experiment", "term"),
                                env=prefect_env(prefect_server), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        flushed = _wait_for_marker(markers / "flushed", proc, log_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(EXIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, log_path.read_text(errors="replace")[-3000:]
    (run,) = _runs(uri, "term")[0]
    assert run.info.run_id == flushed["run_id"]
    assert run.info.status == "KILLED", log_path.read_text(errors="replace")[-3000:]
    assert flushed["steps"] > 0 and len(_curve(uri, run.info.run_id)) >= flushed["steps"]


#: checkpoints every 100 steps; the SIGKILL lands at step 350, half-way between two
KILL_EVERY, KILL_AT = 100, 350


def test_a_run_killed_with_sigkill_resumes_to_the_same_final_parameters(prefect_server, tmp_path):
    """`gradpipe train` killed with SIGKILL mid-run, then `gradpipe train --resume RUN_ID`: the final
    parameters are bitwise those of an uninterrupted run. The kill lands at step 350 (the child
    waits there for it), so steps 301-350 are lost and trained again from the checkpoint of step 300."""
    import signal
    import torch
    from gradpipe.flows.train import load_checkpoint
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = prefect_env(prefect_server)
    args = ["train", "adam", "--task", "charlm", "--steps", "1500", "--checkpoint-every", str(KILL_EVERY),
            "--set", "lr=3e-3", "--tracking-uri", uri, "--experiment", "kill"]
    argv = [*GRADPIPE, *args]
    log_path, markers = tmp_path / "train.log", tmp_path / "markers"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_probed(markers, *args), env={**env, "GRADPIPE_TEST_PAUSE_AT": str(KILL_AT)},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        paused = _wait_for_marker(markers / "paused", proc, log_path)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(EXIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_id = paused["run_id"]
    assert _client(uri).get_run(run_id).info.status == "RUNNING"  # SIGKILL: nothing could end it
    killed_at = load_checkpoint(uri, run_id).step
    assert killed_at == KILL_AT // KILL_EVERY * KILL_EVERY  # the last checkpoint before the kill

    out = subprocess.run([*GRADPIPE, "train", "--resume", run_id, "--tracking-uri", uri], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=RUN_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from step {killed_at}" in out.stdout
    straight = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=RUN_S)
    assert straight.returncode == 0, straight.stderr[-3000:]
    runs = {r.info.run_id: r for r in _runs(uri, "kill")[0]}
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    (other,) = set(runs) - {run_id}
    a, b = load_checkpoint(uri, run_id), load_checkpoint(uri, other)
    assert a.step == b.step == 1500
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    steps = sorted(m.step for m in _client(uri).get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 1501)), "every step logged exactly once"


def test_cli_compare_on_a_dask_local_cluster(prefect_server, tmp_path):
    """`--runner dask` without an address: gradpipe starts a LocalCluster of --workers processes.
    Through the CLI, whose progress hooks hold a terminal: the flow must still pickle for Dask."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = subprocess.run([*GRADPIPE, "compare", "adam", "sgd", "--steps", "8", "--runner", "dask", "--workers", "2",
                          "--progress", "--tracking-uri", uri, "--experiment", "cli-dask"],
                         env=prefect_env(prefect_server), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Failed to serialize" not in out.stderr
    # (Dask may log its own connection tracebacks while the cluster shuts down; none may be ours)
    assert "gradpipe/" not in "\n".join(l for l in out.stderr.splitlines() if l.strip().startswith("File "))
    parents, children = _runs(uri, "cli-dask")
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
