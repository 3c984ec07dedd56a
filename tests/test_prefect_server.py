"""The Prefect server fixture: an in-process flow run, and the scheduler regression test.

The second test is the scheduler check of ``docs/orchestration.md``: a flow served
with a cron schedule must get ``auto_scheduled`` runs from the server's
scheduler (with SQLAlchemy 2.1 none ever appear and the server log fills with
``InvalidRequestError`` tracebacks, which the fixture's teardown reports).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prefect_server import PrefectServer, api_request, prefect_env, stop_process_group


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="prefect is not installed"),
]

FLOW_NAME = "gradpipe-cron-probe"

FLOWS_MODULE = textwrap.dedent(
    f"""
    from prefect import flow


    @flow(name={FLOW_NAME!r})
    def probe(x: int = 1) -> int:
        return x + 1


    if __name__ == "__main__":
        probe.serve(name="t", cron="* * * * *")
    """
)


def _wait_for(predicate, timeout: float, what: str, describe=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")
        time.sleep(0.25)


def test_flow_runs_against_the_server(prefect_server: PrefectServer) -> None:
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    assert PREFECT_API_URL.value() == prefect_server.api_url

    @flow(name="gradpipe-fixture-probe")
    def add(a: int, b: int) -> int:
        return a + b

    state = add(2, 3, return_state=True)
    assert state.is_completed(), state
    assert state.result() == 5

    runs = api_request(
        prefect_server.api_url,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": ["gradpipe-fixture-probe"]}}, "limit": 5},
    )
    assert [run["state_type"] for run in runs] == ["COMPLETED"]


def test_served_cron_flow_gets_scheduled_runs(prefect_server: PrefectServer, tmp_path: Path) -> None:
    from prefect.deployments import run_deployment

    (tmp_path / "sched_flows.py").write_text(FLOWS_MODULE)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "sched_flows.py"],
            cwd=tmp_path,
            env=prefect_env(prefect_server),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def serve_log() -> str:
        return f"serve log:\n{log_path.read_text(errors='replace')[-4000:]}"

    try:
        def served() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with code {proc.returncode}\n{serve_log()}")
            return "is being served" in re.sub(r"\s+", " ", log_path.read_text(errors="replace"))

        _wait_for(served, 90, "the flow to be served", serve_log)

        deployment = api_request(prefect_server.api_url, f"/deployments/name/{FLOW_NAME}/t")

        def auto_scheduled() -> list[dict]:
            runs = api_request(
                prefect_server.api_url,
                "/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 20},
            )
            return [run for run in runs if run.get("auto_scheduled")]

        scheduled = _wait_for(
            auto_scheduled, 60, "the scheduler to create runs", lambda: prefect_server.log_tail()
        )
        assert all(run["state_type"] in {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"} for run in scheduled)

        flow_run = run_deployment(f"{FLOW_NAME}/t", parameters={"x": 41}, timeout=120, poll_interval=1)
        assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, serve_log())
    finally:
        stop_process_group(proc)
