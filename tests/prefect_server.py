"""A real Prefect server for the tests, started quickly from a pre-migrated database.

``prefect_test_harness`` migrates a brand-new SQLite database every time it
starts, which costs most of its start-up time. This module migrates ONE
template ``prefect.db`` per test session (shared by all pytest-xdist workers,
guarded by an ``fcntl`` lock so only one worker builds it), copies it with the
``sqlite3`` backup API into a per-worker ``PREFECT_HOME`` and starts
``python -m prefect server start --no-ui`` on a free port of 127.0.0.1.

Unlike the ephemeral server, this one runs the scheduler services, so flows
served with a ``cron`` schedule get their runs (``docs/orchestration.md``:
the ephemeral server runs no scheduler). Teardown fails when
the server log holds a ``Traceback``: scheduler crashes such as the
SQLAlchemy 2.1 ``InvalidRequestError`` show up nowhere else.

Use it from a test module (``tests`` is on ``pythonpath``)::

    from prefect_server import prefect_server, prefect_env  # noqa: F401

or register it once in ``tests/conftest.py`` with
``pytest_plugins = ["prefect_server"]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "PrefectServer",
    "ServerError",
    "api_request",
    "build_template",
    "copy_database",
    "free_port",
    "prefect_env",
    "prefect_server",
    "running_server",
    "stop_process_group",
]

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
TEMPLATE_NAME = "prefect-template.db"


class ServerError(RuntimeError):
    """The Prefect server did not start, or its log shows an error."""


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server.

    ``env`` holds the variables a process needs to talk to it
    (``PREFECT_API_URL``, ``PREFECT_HOME``, ``PREFECT_RUNNER_POLL_FREQUENCY=1``,
    analytics off); :func:`prefect_env` merges them into a full environment.
    """

    api_url: str
    home: Path
    log_path: Path
    env: dict[str, str]
    pid: int

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server log."""
        return _tail(self.log_path, lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _client_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "DO_NOT_TRACK": "1",
    }
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def _base_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` without inherited ``PREFECT_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(extra)
    return env


def prefect_env(server: PrefectServer, **extra: str) -> dict[str, str]:
    """A complete environment for a subprocess that talks to ``server``.

    It is ``os.environ`` with every inherited ``PREFECT_*`` variable dropped,
    then ``server.env`` and ``extra`` added (``COLUMNS`` is widened so that
    Prefect's rich console does not wrap the lines tests look for).
    """
    env = _base_environ(server.env)
    env.setdefault("COLUMNS", "200")
    env.update(extra)
    return env


def copy_database(src: Path, dst: Path) -> None:
    """Copy a SQLite database consistently (WAL content included) with the backup API."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()


def api_request(api_url: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET (``body`` is None) or POST JSON to ``<api_url><path>``; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # the leader may be gone while children it started live on
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _start(home: Path, log_path: Path, timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server on ``home``; return it once ``/api/health`` answers."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _base_environ(_client_env(home, None))
    home.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start",
             "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(
                f"prefect server exited with code {proc.returncode} before it answered;"
                f" log {log_path}:\n{_tail(log_path, 60)}"
            )
        try:
            with urllib.request.urlopen(api_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, api_url
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_process_group(proc)
            raise ServerError(
                f"prefect server did not answer {api_url}/health within {timeout:.0f} s;"
                f" log {log_path}:\n{_tail(log_path, 60)}"
            )
        time.sleep(0.2)


_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def _tracebacks(text: str) -> list[str]:
    """The log's tracebacks, one string per chain of exceptions (a block whose end says
    "The above exception was the direct cause ..." continues into the next)."""
    chains: list[str] = []
    continues = False
    for block in text.split("Traceback (most recent call last)")[1:]:
        if continues:
            chains[-1] += block
        else:
            chains.append(block)
        continues = any(marker in block[-300:] for marker in _CHAINED)
    return chains


def _check_log(log_path: Path) -> None:
    """A Traceback in the server's log fails the test session, except SQLite's "database is
    locked": Prefect's SQLite store raises it when a read transaction upgrades to a write while
    another connection writes (the comment above ``PRAGMA journal_mode = WAL`` in Prefect's
    ``server/database/configurations.py``), which a machine loaded by other jobs makes likely;
    the request fails on the server, and the test decides by its own assertions."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    if any("database is locked" not in chain for chain in _tracebacks(text)):
        raise ServerError(f"the prefect server log {log_path} contains a Traceback:\n{_tail(log_path, 80)}")


def build_template(shared_dir: Path, timeout: float = STARTUP_TIMEOUT_S) -> Path:
    """The path of a migrated ``prefect.db`` in ``shared_dir``, building it once.

    Processes that call this at the same time serialize on an ``fcntl`` lock;
    the first one starts a server on a fresh ``PREFECT_HOME`` (which runs the
    migrations and registers the built-in block types), stops it and
    publishes the database with an atomic rename. Starting the server was
    measured faster than ``prefect server database upgrade`` followed by a
    start, and later starts on its copy skip the block registration as well.
    """
    shared_dir.mkdir(parents=True, exist_ok=True)
    template = shared_dir / TEMPLATE_NAME
    with open(shared_dir / (TEMPLATE_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if template.exists():
                return template
            build_home = Path(tempfile.mkdtemp(prefix="prefect-template-", dir=shared_dir))
            log_path = build_home / "server.log"
            proc, _ = _start(build_home, log_path, timeout)
            stop_process_group(proc)
            _check_log(log_path)
            staging = shared_dir / (TEMPLATE_NAME + f".{os.getpid()}.tmp")
            copy_database(build_home / "prefect.db", staging)
            os.replace(staging, template)
            shutil.rmtree(build_home, ignore_errors=True)
            return template
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _prefect_settings(env: Mapping[str, str]) -> Iterator[None]:
    """Point this process's Prefect settings at the server (if Prefect can be imported).

    Setting ``os.environ`` is not enough once ``prefect`` has been imported:
    its settings are read into a context at import time.
    """
    try:
        import prefect.context
        import prefect.settings as ps
    except ImportError:  # pragma: no cover - prefect is a test dependency
        yield
        return
    updates = {
        ps.PREFECT_API_URL: env["PREFECT_API_URL"],
        ps.PREFECT_HOME: env["PREFECT_HOME"],
        ps.PREFECT_RUNNER_POLL_FREQUENCY: int(env["PREFECT_RUNNER_POLL_FREQUENCY"]),
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(ps.temporary_settings(updates=updates))
        # Also the process-global context, for contexts copied before this one
        # (what prefect_test_harness does; private, so only when present).
        global_ctx = getattr(prefect.context, "_temporary_global_settings_context", None)
        if global_ctx is not None:
            stack.enter_context(global_ctx(prefect.context.get_settings_context()))
        yield


def _drain_prefect_workers() -> None:
    """Ship buffered logs and events before the server goes away."""
    if "prefect" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5, at_exit=False)
        EventsWorker.drain_all(timeout=5, at_exit=False)


@contextlib.contextmanager
def running_server(
    home: Path,
    template: Path | None = None,
    *,
    timeout: float = STARTUP_TIMEOUT_S,
    configure_process: bool = True,
) -> Iterator[PrefectServer]:
    """Run a Prefect server on ``home`` (seeded from ``template`` if given) for the ``with`` block.

    With ``configure_process`` the server's variables are set in ``os.environ``
    and in Prefect's settings context for the block, then restored. On exit the
    process group gets SIGTERM, then SIGKILL after 15 s, and :class:`ServerError`
    is raised if the log holds a ``Traceback``.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    if template is not None and not (home / "prefect.db").exists():
        copy_database(template, home / "prefect.db")
    log_path = home / "server.log"
    proc, api_url = _start(home, log_path, timeout)
    env = _client_env(home, api_url)
    server = PrefectServer(api_url=api_url, home=home, log_path=log_path, env=env, pid=proc.pid)
    saved = {key: os.environ.get(key) for key in env}
    try:
        if configure_process:
            os.environ.update(env)
            with _prefect_settings(env):
                try:
                    yield server
                finally:
                    _drain_prefect_workers()
        else:
            yield server
    finally:
        if configure_process:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        stop_process_group(proc)
    _check_log(log_path)


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is <session dir>/popen-gwN: share the
    # session dir. Without xdist, basetemp is the session dir itself (its
    # parent outlives the session, and a stale template must not be reused).
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server per test session (per xdist worker), on a copy of a migrated DB.

    While it runs, ``PREFECT_API_URL``, ``PREFECT_HOME``,
    ``PREFECT_RUNNER_POLL_FREQUENCY=1`` and analytics-off are set in
    ``os.environ`` and in Prefect's settings context; pass
    ``env=prefect_env(server)`` to subprocesses. Teardown fails with the log
    tail when the server log contains a ``Traceback``.
    """
    try:
        template = build_template(_shared_dir(tmp_path_factory) / "prefect-template")
        with running_server(tmp_path_factory.mktemp("prefect-home"), template) as server:
            yield server
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
