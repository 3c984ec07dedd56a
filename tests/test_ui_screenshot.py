"""The MLflow UI over a gradpipe-style store, rendered in headless Chromium.

Builds a small tracking store (one experiment, a parent run and two child
runs with a loss history), starts ``gradpipe.flows.ui.start_ui`` on it, and
checks that the comparison page and the experiment's chart view render: the
PNGs are full-size and not blank, and the rendered DOM names both runs.

Skipped only when no Chromium is installed (CI installs Debian's). The
pictures in docs/img come from a real comparison: ``.venv/bin/python
docs/make_screenshots.py``. To keep this test's own picture::

    GRADPIPE_SAVE_SCREENSHOT=/tmp/compare.png .venv/bin/python -m pytest tests/test_ui_screenshot.py -n 0 -q
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradpipe.flows.screenshot import (
    ScreenshotError,
    chromium_command,
    dump_dom,
    find_chromium,
    screenshot,
    visible_text,
)
from gradpipe.flows.ui import (
    UIError,
    UIServer,
    compare_runs_url,
    experiment_runs_url,
    start_ui,
    ui_command,
    ui_env,
)

CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get("GRADPIPE_REQUIRE_CHROMIUM"):  # CI installs it: a skip there would hide a gap
    raise RuntimeError("GRADPIPE_REQUIRE_CHROMIUM is set but no Chromium was found")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (/usr/bin/chromium, chromium, chromium-browser, google-chrome or $GRADPIPE_CHROMIUM);"
    " Debian/Ubuntu: apt-get install chromium",
)

WIDTH, HEIGHT = 1600, 1000
DOC_HEIGHT = 1560
CHILDREN = {"adamw-seed0": (1e-3, 0.05), "lion-seed0": (3e-4, 0.08)}   # name: (lr, decay rate of the loss)
# Chromium's --virtual-time-budget: page time runs ahead while the page is
# idle, so a large budget costs a few seconds; the chart view draws its charts
# lazily and needs it, the comparison page is ready much sooner.
WAIT_MS = 60_000


@dataclass(frozen=True)
class Store:
    uri: str
    experiment_id: str
    parent_id: str
    child_ids: dict[str, str]


def _loopback_host() -> str:
    """``::1`` when this machine has IPv6 loopback, else ``127.0.0.1``.

    MLflow 3.17 opens its Assistant side panel on a browser's first visit when
    ``location.hostname`` is ``localhost``, ``127.0.0.1`` or ``::1``; for
    ``http://[::1]:port`` the hostname is ``[::1]`` (with brackets), so the
    panel stays closed and the screenshot gets the page's full width.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return "::1"
    except OSError:
        return "127.0.0.1"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("gradpipe-digits", artifact_location=str(root / "mlartifacts"))
    parent = client.create_run(experiment_id, run_name="compare-digits", tags={"gradpipe.pipeline": "sweep"})
    t0 = int(time.time() * 1000)
    child_ids: dict[str, str] = {}
    for name, (lr, rate) in CHILDREN.items():
        pipeline = name.split("-")[0]
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": parent.info.run_id, "gradpipe.pipeline": pipeline},
        )
        losses = [Metric("train/loss", 2.3 * math.exp(-rate * s) + 0.1, t0 + s, s) for s in range(1, 101)]
        evals = [Metric("eval/val_accuracy", 0.5 + 0.45 * (1 - math.exp(-rate * s)), t0 + s, s) for s in range(10, 101, 10)]
        client.log_batch(
            run.info.run_id,
            metrics=losses + evals,
            params=[Param("pipeline", pipeline), Param("lr", str(lr)), Param("seed", "0"), Param("steps", "100")],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        child_ids[name] = run.info.run_id
    client.set_terminated(parent.info.run_id, "FINISHED")
    return Store(uri=uri, experiment_id=experiment_id, parent_id=parent.info.run_id, child_ids=child_ids)


@pytest.fixture(scope="module")
def ui(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    log_path = tmp_path_factory.mktemp("mlflow-ui-log") / "ui.log"
    server = start_ui(store.uri, host=_loopback_host(), port=0, timeout=120, log_path=log_path, env=env)
    yield server
    server.stop()


def _assert_picture(path: Path, width: int, height: int) -> None:
    from matplotlib.image import imread

    assert path.stat().st_size > 20_000, f"{path} is only {path.stat().st_size} bytes"
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3]
    assert float(rgb.std()) > 0.03, "the screenshot is (almost) one colour"
    distinct = {tuple(p) for p in (rgb[::8, ::8].reshape(-1, 3) * 255).round().astype(int).tolist()}
    assert len(distinct) > 50, f"only {len(distinct)} distinct colours: nothing rendered?"


@pytest.mark.slow
@needs_chromium
def test_compare_page_shows_both_runs(ui: UIServer, store: Store, tmp_path: Path) -> None:
    url = compare_runs_url(ui.url, list(store.child_ids.values()), [store.experiment_id])
    text = visible_text(dump_dom(url, chromium=CHROMIUM, width=WIDTH, height=HEIGHT, wait_ms=WAIT_MS))
    for name in CHILDREN:
        assert name in text, f"{name} missing from the comparison page: {text[:1500]}"
    assert "train/loss" in text and "lr" in text

    png = screenshot(url, tmp_path / "compare.png", chromium=CHROMIUM, width=WIDTH, height=HEIGHT, wait_ms=WAIT_MS)
    _assert_picture(png, WIDTH, HEIGHT)

    target = os.environ.get("GRADPIPE_SAVE_SCREENSHOT")
    if target:        # for the docs: tall enough to show the params and metrics tables too
        saved = screenshot(url, target, chromium=CHROMIUM, width=WIDTH, height=DOC_HEIGHT, wait_ms=WAIT_MS)
        _assert_picture(saved, WIDTH, DOC_HEIGHT)


@pytest.mark.slow
@needs_chromium
def test_experiment_chart_view_lists_the_sweep(ui: UIServer, store: Store, tmp_path: Path) -> None:
    url = experiment_runs_url(ui.url, store.experiment_id, parent_run_id=store.parent_id)
    text = visible_text(dump_dom(url, chromium=CHROMIUM, width=WIDTH, height=HEIGHT, wait_ms=WAIT_MS))
    for name in CHILDREN:
        assert name in text, f"{name} missing from the experiment page: {text[:1500]}"
    assert "2 matching runs" in text, text[:1500]       # the parent is filtered out

    png = screenshot(url, tmp_path / "experiment.png", chromium=CHROMIUM, width=WIDTH, height=HEIGHT, wait_ms=WAIT_MS)
    _assert_picture(png, WIDTH, HEIGHT)


# ---------------------------------------------------------------- fast checks, no server


def test_ui_command_serves_the_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ui_command("sqlite:///runs/mlruns.db", port=5123)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    db = tmp_path / "runs" / "mlruns.db"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{db}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "runs" / "mlartifacts")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com", "databricks"])
def test_ui_command_points_servers_at_their_own_ui(uri: str) -> None:
    with pytest.raises(UIError, match="open"):
        ui_command(uri)


def test_ui_env_turns_off_the_job_runner() -> None:
    assert ui_env({"PATH": "/bin"}) == {"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert ui_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_start_ui_refuses_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(UIError, match="no tracking database"):
        start_ui(f"sqlite:///{tmp_path / 'nothing.db'}", port=0)
    assert not (tmp_path / "nothing.db").exists()


def test_ui_urls() -> None:
    url = compare_runs_url("http://127.0.0.1:5000/", ["a1", "b2"], ["3"])
    assert url == "http://127.0.0.1:5000/#/compare-runs?runs=%5B%22a1%22%2C%22b2%22%5D&experiments=%5B%223%22%5D"
    url = experiment_runs_url("http://127.0.0.1:5000", "3", parent_run_id="p9")
    assert url.startswith("http://127.0.0.1:5000/#/experiments/3/runs?")
    assert "searchFilter=tags.mlflow.parentRunId%20%3D%20%27p9%27" in url and "compareRunsMode=CHART" in url


def test_chromium_lookup_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GRADPIPE_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)
    argv = chromium_command("http://x/", chromium=str(fake), user_data_dir=tmp_path / "p",
                            width=800, height=600, wait_ms=100, output=("--screenshot=/o.png",))
    assert argv[0] == str(fake) and argv[-1] == "http://x/"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=800,600",
                 "--virtual-time-budget=100", "--screenshot=/o.png", f"--user-data-dir={tmp_path / 'p'}"):
        assert flag in argv
    with pytest.raises(ScreenshotError, match="no Chromium"):
        dump_dom("http://x/", chromium=str(tmp_path / "absent"))


def test_visible_text_drops_markup() -> None:
    dom = "<html><head><style>p{}</style><script>var a = '<b>';</script></head><body><p>a &amp; b</p>\n<i>c</i></body></html>"
    assert visible_text(dom) == "a & b c"


# ---------------------------------------------------------------- the foreground UI

RUN_UI = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)   # a background shell may ignore SIGINT
from gradpipe.flows.ui import run_ui
sys.exit(run_ui(sys.argv[1], port=int(sys.argv[2])))
"""


@pytest.mark.slow
def test_run_ui_stops_cleanly_on_ctrl_c(store: Store, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out.log"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUN_UI, store.uri, str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "(Ctrl-C to stop)" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, out.read_text(errors="replace")[-3000:]
            time.sleep(0.25)
        assert f"open http://127.0.0.1:{port}" in out.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, out.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):            # nothing listens any more: the UI's workers are gone too
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
