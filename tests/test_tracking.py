"""Tracking layer (gradpipe.flows.tracking, gradpipe.flows.figures) on SQLite stores in tmp dirs."""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import gradpipe
from gradpipe.flows import figures
from gradpipe.flows import tracking as tr

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """One SQLite store and experiment shared by the module (schema creation costs ~2 s)."""
    d = tmp_path_factory.mktemp("mlstore")
    uri = tr.resolve_tracking_uri(str(d / "runs.db"))
    tr.check_tracking_uri(uri)
    exp = tr.ensure_experiment(uri, "gradpipe/test study")
    return uri, exp, d


# --------------------------------------------------------------------------- URIs


def test_resolve_default_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tr.resolve_tracking_uri(cwd=tmp_path) == f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.chdir(tmp_path)
    assert tr.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tr.resolve_tracking_uri(cwd=tmp_path / "w") == f"sqlite:///{tmp_path}/w/env.db"
    assert tr.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"   # argument wins


def test_resolve_relative_and_bare_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = tr.resolve_tracking_uri
    assert r("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path}/sub/x.db"
    assert r("sqlite:///../x.db", tmp_path / "a") == f"sqlite:///{tmp_path}/x.db"
    assert r("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert r("sqlite:///x.db?timeout=20", tmp_path) == f"sqlite:///{tmp_path}/x.db?timeout=20"
    assert r("sqlite:///:memory:", tmp_path) == "sqlite:///:memory:"
    assert r("runs.sqlite", tmp_path) == f"sqlite:///{tmp_path}/runs.sqlite"
    assert r("trackdir", tmp_path) == f"sqlite:///{tmp_path}/trackdir/mlruns.db"
    assert r("file:mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    assert r("file:///abs/mlruns", tmp_path) == "file:///abs/mlruns"
    for uri in ("https://mlflow.example.com/", "databricks", "postgresql+psycopg2://u@h/db"):
        assert r(uri, tmp_path) == uri


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_check_unreachable_http_fails_fast() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(tr.TrackingError, match="cannot reach the MLflow tracking server") as e:
        tr.check_tracking_uri(uri, timeout=2.0)
    assert "\n" not in str(e.value)


@pytest.fixture()
def stub_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A local HTTP server answering each path with the status in ``codes`` (404 if absent)."""
    codes: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            code = codes.get(self.path.split("?")[0], 404)
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", codes
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def test_check_http_answers(stub_server: tuple[str, dict[str, int]]) -> None:
    url, codes = stub_server
    with pytest.raises(tr.TrackingError, match=r"does not answer like an MLflow .*HTTP 404.*HTTP 404"):
        tr.check_tracking_uri(url, timeout=2.0)
    codes["/api/2.0/mlflow/experiments/search"] = 401
    with pytest.raises(tr.TrackingError, match="refused access .HTTP 401"):
        tr.check_tracking_uri(url + "/", timeout=2.0)
    codes["/api/2.0/mlflow/experiments/search"] = 200
    tr.check_tracking_uri(url, timeout=2.0)
    codes.clear()
    codes["/health"] = 200
    tr.check_tracking_uri(url, timeout=2.0)


def test_check_local_stores(tmp_path: Path) -> None:
    with pytest.raises(tr.TrackingError, match="does not exist"):
        tr.check_tracking_uri(f"sqlite:///{tmp_path}/missing/x.db")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(tr.TrackingError, match="not a directory"):
        tr.check_tracking_uri(f"sqlite:///{tmp_path}/afile/x.db")
    with pytest.raises(tr.TrackingError, match="not an SQLite database"):
        tr.check_tracking_uri(f"sqlite:///{tmp_path}/afile")
    with pytest.raises(tr.TrackingError, match="supported: sqlite:.*http:"):
        tr.check_tracking_uri("ftp://host/x")
    tr.check_tracking_uri(f"sqlite:///{tmp_path}/new.db")
    tr.check_tracking_uri((tmp_path / "fs").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]          # checks create nothing


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_check_unwritable_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(tr.TrackingError, match="not writable"):
            tr.check_tracking_uri(f"sqlite:///{ro}/x.db")
    finally:
        ro.chmod(0o700)


def test_check_unwritable_dir_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(tr.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(tr.TrackingError, match=f"{tmp_path} for the tracking database is not writable"):
        tr.check_tracking_uri(f"sqlite:///{tmp_path}/x.db")


# --------------------------------------------------------------------------- experiments and runs


def test_experiment_idempotent_with_artifacts_beside_db(store: tuple[str, str, Path]) -> None:
    uri, exp, d = store
    assert tr.ensure_experiment(uri, "gradpipe/test study") == exp
    loc = MlflowClient(tracking_uri=uri).get_experiment(exp).artifact_location
    assert loc == (d / "mlartifacts" / "gradpipe_test_study").as_uri()
    assert tr.artifact_root(uri) == d / "mlartifacts"


def test_concurrent_experiment_creation(store: tuple[str, str, Path]) -> None:
    uri, _, _ = store
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(tr.ensure_experiment(uri, "race"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4 and len(set(ids)) == 1


def test_parent_and_children_are_searchable(store: tuple[str, str, Path]) -> None:
    uri, exp, _ = store
    client = MlflowClient(tracking_uri=uri)
    parent = tr.start_parent_run(uri, exp, "sweep", {"pipelines": "adam,lion", "seeds": 2},
                                 {"prefect.flow_run_id": "abc"})
    kids = [tr.create_child_run(uri, exp, parent, f"adam-s{s}", {"seed": s, "lr": 1e-3},
                                {"gradpipe.pipeline": "adam"}) for s in range(2)]
    assert client.get_run(parent).info.status == "RUNNING"
    found = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    for r in found:
        assert r.info.status == "SCHEDULED"
        assert r.data.tags["mlflow.runName"] in ("adam-s0", "adam-s1")
        assert r.data.params["lr"] == "0.001" and r.data.tags["gradpipe.pipeline"] == "adam"
    p = client.get_run(parent)
    assert p.data.params == {"pipelines": "adam,lion", "seeds": "2"} and p.data.tags["prefect.flow_run_id"] == "abc"
    for k in kids:
        with tr.RunLogger(uri, k) as log:
            assert client.get_run(k).info.status == "RUNNING"
            log.metric("train/loss", 1.0, 1)
    tr.RunLogger(uri, parent).finish()
    assert {client.get_run(r).info.status for r in [parent, *kids]} == {"FINISHED"}


def test_long_param_rejected_before_creating(store: tuple[str, str, Path]) -> None:
    uri, exp, _ = store
    client = MlflowClient(tracking_uri=uri)
    before = len(client.search_runs([exp]))
    with pytest.raises(tr.TrackingError, match="6001 characters"):
        tr.start_parent_run(uri, exp, "too-long", {"source": "x" * 6001}, {})
    assert len(client.search_runs([exp])) == before


class _CountingClient:
    """Wraps an MlflowClient and counts log_batch calls that carry metrics."""

    def __init__(self, inner: MlflowClient) -> None:
        self.inner, self.metric_batches = inner, []

    def log_batch(self, run_id, metrics=(), **kw):  # type: ignore[no-untyped-def]
        if metrics:
            self.metric_batches.append(len(metrics))
        return self.inner.log_batch(run_id, metrics=metrics, **kw)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def test_buffered_metrics_complete_in_three_batches(store: tuple[str, str, Path]) -> None:
    uri, exp, _ = store
    rid = tr.start_parent_run(uri, exp, "buffered", {}, {})
    log = tr.RunLogger(uri, rid, flush_every=100)
    log.client = counting = _CountingClient(log.client)
    log.start()
    for step in range(1, 251):
        log.metric("train/loss", 1.0 / step, step)
    assert counting.metric_batches == [100, 100]
    log.metric("eval/val_loss", float("nan"), 250)
    log.metrics({"opt/grad_norm": float("inf"), "opt/update_norm": 0.5}, 250)
    log.finish()
    log.finish()                                                   # idempotent
    assert counting.metric_batches == [100, 100, 53]
    client = MlflowClient(tracking_uri=uri)
    hist = client.get_metric_history(rid, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, 251))
    assert all(math.isclose(m.value, 1.0 / m.step) for m in hist)
    assert math.isnan(client.get_metric_history(rid, "eval/val_loss")[0].value)
    assert client.get_metric_history(rid, "opt/grad_norm")[0].value > 1e300
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and tr.FAILURE_TAG not in run.data.tags
    with pytest.raises(tr.TrackingError, match="already finished"):
        log.metric("train/loss", 1.0, 251)


def test_failed_run_keeps_reason(store: tuple[str, str, Path]) -> None:
    uri, exp, _ = store
    rid = tr.create_child_run(uri, exp, tr.start_parent_run(uri, exp, "p", {}, {}), "c", {}, {})
    log = tr.RunLogger(uri, rid)
    log.start()
    log.metric("train/loss", 2.0, 1)
    log.finish("FAILED", "loss became nan at step 17" + "!" * 6000)
    run = MlflowClient(tracking_uri=uri).get_run(rid)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags[tr.FAILURE_TAG].startswith("loss became nan at step 17")
    assert len(run.data.tags[tr.FAILURE_TAG]) == 5000
    assert run.data.metrics["train/loss"] == 2.0

    rid2 = tr.start_parent_run(uri, exp, "ctx", {}, {})
    with pytest.raises(ZeroDivisionError):
        with tr.RunLogger(uri, rid2):
            1 / 0
    run2 = MlflowClient(tracking_uri=uri).get_run(rid2)
    assert run2.info.status == "FAILED" and "ZeroDivisionError" in run2.data.tags[tr.FAILURE_TAG]


def test_end_open_runs_and_sigterm_handler(store: tuple[str, str, Path]) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    uri, exp, _ = store
    rid = tr.start_parent_run(uri, exp, "to-kill", {}, {})
    log = tr.RunLogger(uri, rid)
    log.metric("train/loss", 3.0, 1)
    calls: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        restore = tr.install_sigterm_handler(tr.end_open_runs)
        with pytest.raises(SystemExit) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.code == 143 and calls == [signal.SIGTERM]          # chained to the previous handler
        restore()
        assert signal.getsignal(signal.SIGTERM) is not None and callable(signal.getsignal(signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, old)
    run = MlflowClient(tracking_uri=uri).get_run(rid)
    assert run.info.status == "KILLED" and run.data.metrics["train/loss"] == 3.0
    assert log.finished

    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(tr.install_sigterm_handler(lambda: None)))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGTERM) is old                          # no-op off the main thread


def test_artifacts_on_disk(store: tuple[str, str, Path]) -> None:
    uri, exp, d = store
    prog = gradpipe.load("adam")
    arts = tr.pipeline_artifacts(prog, prog.source)
    assert arts["pipeline.grad"] == prog.source and arts["canonical.grad"] == prog.canonical
    assert arts["explain.txt"] == prog.explain()
    assert "<svg" in arts.get("graph.svg", "<svg") and ("graph.svg" in arts or "digraph" in arts["graph.dot"])
    rid = tr.start_parent_run(uri, exp, "arts", {}, {})
    log = tr.RunLogger(uri, rid)
    for name, text in arts.items():
        log.text(text, name)
    log.dict({"final_loss": 0.25, "steps": 10}, "summary.json")
    log.figure(figures.loss_curves({"adam": [(1, 2.0), (2, 1.0)]}, "loss"), "plots/loss.png")
    log.finish()
    root = d / "mlartifacts" / "gradpipe_test_study" / rid / "artifacts"
    assert (root / "pipeline.grad").read_text() == prog.source
    for name in arts:
        assert (root / name).is_file()
    assert '"final_loss": 0.25' in (root / "summary.json").read_text()
    assert (root / "plots" / "loss.png").read_bytes().startswith(PNG)


def test_pipeline_artifacts_fall_back_to_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = gradpipe.load("adam")

    def no_renderer(path: object) -> None:
        raise RuntimeError("no Graphviz renderer found")

    monkeypatch.setattr(type(prog), "draw", lambda self, path: no_renderer(path))
    arts = tr.pipeline_artifacts(prog, "src")
    assert "graph.svg" not in arts and arts["graph.dot"] == prog.to_dot()


def test_git_commit(tmp_path: Path) -> None:
    assert tr.git_commit(tmp_path) is None and tr.git_dirty(tmp_path) is None
    assert tr.git_commit(tmp_path / "missing" / "file.grad") is None
    sha = tr.git_commit(Path(__file__))
    assert sha is None or len(sha) in (40, 64)


# --------------------------------------------------------------------------- figures


def test_loss_curves_render_and_survive_nan() -> None:
    fig = figures.loss_curves({"adam": [(s, 1.0 / s) for s in range(1, 50)],
                               "lion": [(1, 2.0), (2, 1.5), (3, float("nan")), (4, float("inf"))],
                               "single": [(1, 0.7)]}, "digits: train loss")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "digits: train loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["adam", "lion (diverged at step 3)", "single"]
    assert figures.figure_png(fig).startswith(PNG)

    lin = figures.loss_curves({"acc": [(1, -0.5), (2, 0.3)]}, "accuracy", ylabel="val_accuracy")
    assert lin.axes[0].get_yscale() == "linear"
    assert figures.figure_png(lin).startswith(PNG)
    assert figures.figure_png(figures.loss_curves({}, "empty")).startswith(PNG)
    assert figures.figure_png(figures.loss_curves({"x": [(1, float("nan"))]}, "all nan")).startswith(PNG)


def test_band_curves_render() -> None:
    fig = figures.band_curves({"adam": [[3.0, 2.0, 1.0], [4.0, 2.5, 1.5, 1.2]],
                               "sgd": [[3.0, float("nan")], [3.5, 3.0, 2.0]],
                               "one": [[1.0, 0.5]], "none": []}, "digits: 2 seeds")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["adam (mean of 2 seeds)", "sgd (mean of 2 seeds, 1 diverged)", "one (mean of 1 seed)"]
    mean = ax.get_lines()[0].get_ydata()
    assert list(mean) == [3.5, 2.25, 1.25, 1.2]
    assert [list(x.get_ydata()) for x in ax.get_lines()[1:3]] == [[3.0, 2.0, 1.0], [4.0, 2.5, 1.5, 1.2]]
    assert len(ax.get_lines()) == 3 + 3 + 1  # every run thin, plus each pipeline's mean
    assert ax.get_legend().get_title().get_text().startswith("bold: mean over seeds, thin: each run")
    assert figures.figure_png(fig).startswith(PNG)


_OPEN_STORE = """
import sys
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (slow imports first: only the opening races)
from gradpipe.flows.tracking import ensure_experiment
Path(sys.argv[2]).write_text("")  # ready
sys.stdin.read()                  # blocks until the test closes stdin: the four start together
print(ensure_experiment(sys.argv[1], "together"))
"""

#: Last-resort guards, not what the test checks (four interpreters importing MLflow on a loaded
#: 2-core machine can take minutes)
READY_S = 300
DONE_S = 300


def test_processes_opening_a_new_sqlite_store_at_once_do_not_race(tmp_path: Path) -> None:
    """Four processes open one fresh ``mlruns.db`` at the same instant (two ``gradpipe train``
    started together, or a test polling a store a subprocess is creating). Unlocked, MLflow's
    schema creation fails with ``table ... already exists`` in all but one of them.

    Each child imports MLflow, writes a ready marker and blocks reading its stdin; once all four
    are ready the test closes their stdins at once. No clock decides when they start."""
    import subprocess
    import sys
    import time

    store, sync = tmp_path / "store", tmp_path / "sync"
    store.mkdir()
    sync.mkdir()
    uri = f"sqlite:///{store}/mlruns.db"
    errors = lambda: [(sync / f"err{i}").read_text(errors="replace")[-2000:] for i in range(4)]  # noqa: E731
    procs: list[subprocess.Popen] = []
    try:
        for i in range(4):
            with open(sync / f"out{i}", "wb") as out, open(sync / f"err{i}", "wb") as err:
                procs.append(subprocess.Popen([sys.executable, "-c", _OPEN_STORE, uri, str(sync / f"ready{i}")],
                                              stdin=subprocess.PIPE, stdout=out, stderr=err))
        deadline = time.monotonic() + READY_S
        while not all((sync / f"ready{i}").exists() for i in range(4)):
            assert all(p.poll() is None for p in procs), errors()
            assert time.monotonic() < deadline, f"not all ready after {READY_S} s: {errors()}"
            time.sleep(0.05)  # a file check
        for p in procs:  # go
            p.stdin.close()
        for p in procs:
            p.wait(DONE_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4, errors()
    ids = {(sync / f"out{i}").read_text().strip() for i in range(4)}
    assert len(ids) == 1 and ids != {""}  # one experiment, seen by all
    assert set(os.listdir(store)) <= {"mlartifacts", "mlruns.db"}  # no lock file left behind
