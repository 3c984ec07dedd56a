"""Sweeps that lose nothing: 24 runs on a Dask cluster, with and without a worker killed mid-sweep.

A comparison pre-creates every child run (SCHEDULED) before fanning out, gives each task its
run id, and a task that runs again (Prefect's retry, or Dask re-running the task of a worker that
died) reopens the same run, goes on from its latest checkpoint and skips the steps already
logged. So a lost worker costs time, never a run, and never a duplicate.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow

PIPELINES = ["adam", "momentum", "rmsprop", "sgd"]
SEEDS = [0, 1, 2]
GRID = {"lr": [0.01, 0.05]}
STEPS = 40


def _children(uri, experiment):
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return c, [r for r in runs if "mlflow.parentRunId" in r.data.tags], [r for r in runs
                                                                            if "mlflow.parentRunId" not in r.data.tags]


def _assert_complete(uri, experiment):
    c, children, parents = _children(uri, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 24
    keys = {(r.data.params["pipeline"], r.data.params["seed"], r.data.params["lr"]) for r in children}
    assert len(keys) == 24, "every (pipeline, seed, lr) exactly once"
    for r in children:
        assert r.info.status == "FINISHED", (r.info.run_name, r.data.tags.get("gradpipe.failure"))
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1)), f"{r.info.run_name}: a full history, no step twice"
    return children


def _cluster():
    from distributed import LocalCluster
    from gradpipe.flows.comparison import local_cluster_kwargs
    return LocalCluster(**local_cluster_kwargs(2))


def test_24_runs_on_a_dask_cluster_all_finish_with_full_histories(prefect_server, tmp_path):
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    with _cluster() as cluster:
        result = compare(PIPELINES, "digits", SEEDS, steps=STEPS, grid=GRID, runner="dask",
                         address=cluster.scheduler_address, tracking_uri=uri, experiment="sweep",
                         checkpoint_every=10)
    assert not result.failed
    _assert_complete(uri, "sweep")


def test_a_worker_killed_mid_sweep_loses_no_run_and_duplicates_none(prefect_server, tmp_path):
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    with _cluster() as cluster:
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("result", compare(
            PIPELINES, "digits", SEEDS, steps=STEPS, grid=GRID, runner="dask", address=cluster.scheduler_address,
            tracking_uri=uri, experiment="killed", checkpoint_every=10)))
        t.start()
        # wait until a few runs are done and others are under way, then SIGKILL one worker process
        deadline = time.monotonic() + 300
        killed = None
        while time.monotonic() < deadline and killed is None:
            time.sleep(0.5)
            try:
                _, children, _ = _children(uri, "killed")
            except AttributeError:  # the experiment does not exist yet
                continue
            done = sum(r.info.status == "FINISHED" for r in children)
            if done >= 3 and any(r.info.status == "RUNNING" for r in children):
                from distributed import Client
                with Client(cluster.scheduler_address, set_as_default=False) as client:
                    pids = sorted(client.run(os.getpid).values())
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        t.join(600)
        assert killed is not None, "the sweep ended before a worker could be killed"
        assert not t.is_alive()
    result = out["result"]
    assert not result.failed, [(o.spec.run_name, o.reason) for o in result.failed]
    children = _assert_complete(uri, "killed")
    resumed = [r.info.run_name for r in children
               if "gradpipe.resumed_from_step" in r.data.tags or "gradpipe.resumed_after_step" in r.data.tags]
    print("resumed after the kill:", resumed)


def test_a_run_that_fails_for_a_real_reason_stays_failed_while_the_rest_complete(prefect_server, tmp_path):
    from gradpipe.flows import compare
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    result = compare(["adam", "sgd"], "digits", [0, 1], steps=15,
                     per_pipeline={"adam": {"lr": 0.01}, "sgd": {"lr": 1e38}}, tracking_uri=uri,
                     experiment="real-failure", checkpoint_every=5)
    c, children, parents = _children(uri, "real-failure")
    by = {(r.data.params["pipeline"], r.data.params["seed"]): r for r in children}
    assert len(children) == 4
    for seed in ("0", "1"):
        assert by[("adam", seed)].info.status == "FINISHED"
        failed = by[("sgd", seed)]
        assert failed.info.status == "FAILED" and "became inf" in failed.data.tags["gradpipe.failure"]
    assert len(result.failed) == 2 and parents[0].info.status == "FINISHED"
