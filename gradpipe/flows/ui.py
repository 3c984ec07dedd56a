"""The MLflow UI over gradpipe's local tracking store.

``gradpipe ui`` runs ``python -m mlflow ui`` (through ``sys.executable``, so it
works from a virtual environment that is not on ``PATH``) on the same store
that ``gradpipe train`` and ``gradpipe compare`` write to, bound to 127.0.0.1
unless another host is asked for. It is a slim configuration: one worker and no
job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``), ready in about 10 s
instead of 23 s on a 2-core machine (measured when it was chosen; see
``docs/orchestration.md``, sections 4 and 10).

A tracking URI that is already a server (``http://``, ``https://``,
Databricks) has its own UI: :class:`UIError` says to open it instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gradpipe.flows.tracking import artifact_root, resolve_tracking_uri

__all__ = [
    "UIError",
    "UIServer",
    "ui_command",
    "ui_env",
    "start_ui",
    "run_ui",
    "compare_runs_url",
    "experiment_runs_url",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class UIError(RuntimeError):
    """The UI cannot be started; the message is one line saying why and what to do."""


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition(":")
    if not sep or len(head) == 1:          # bare path, or a Windows drive letter
        return uri.lower() if uri.lower() in _REMOTE_SCHEMES else ""
    return head.lower().split("+", 1)[0]


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory or other schemes)."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    path = urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(path) if path not in ("", ":memory:") else None


def _local_store(tracking_uri: str | None) -> str:
    """The absolute local store URI to serve; :class:`UIError` for servers."""
    uri = resolve_tracking_uri(tracking_uri)
    scheme = _scheme(uri)
    if scheme in _REMOTE_SCHEMES:
        raise UIError(
            f"the tracking URI {uri} is a tracking server with its own UI: open {uri} in a browser"
            if scheme in ("http", "https")
            else f"the tracking URI {uri} is hosted; open its workspace in a browser"
        )
    if scheme == "sqlite" and _sqlite_file(uri) is None:
        raise UIError(f"the tracking URI {uri} is an in-memory database: nothing to show")
    return uri


def _url_host(host: str) -> str:
    """The host to put in a URL for a server bound to ``host``."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def compare_runs_url(base_url: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The UI page comparing ``run_ids`` side by side (params, metrics, tags, and
    parallel-coordinates/scatter/contour plots): ``<base>/#/compare-runs?runs=[..]&experiments=[..]``."""
    runs = json.dumps([str(r) for r in run_ids], separators=(",", ":"))
    experiments = json.dumps([str(e) for e in experiment_ids], separators=(",", ":"))
    query = urllib.parse.urlencode({"runs": runs, "experiments": experiments}, quote_via=urllib.parse.quote)
    return f"{base_url.rstrip('/')}/#/compare-runs?{query}"


def experiment_runs_url(
    base_url: str,
    experiment_id: str,
    *,
    parent_run_id: str | None = None,
    chart: bool = True,
) -> str:
    """The experiment's runs page, flat and sorted by run name, in chart view by default.

    With ``parent_run_id`` only that sweep's child runs are listed (search
    filter ``tags.mlflow.parentRunId = '<id>'``). The UI nests child runs
    under a collapsed parent when the list is unfiltered and sorted by start
    time, and its charts then show only the parent; sorting by run name keeps
    every run visible, so the loss curves of all runs are drawn.
    """
    params = {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}
    if parent_run_id is not None:
        params["searchFilter"] = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if chart:
        params["compareRunsMode"] = "CHART"
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    return f"{base_url.rstrip('/')}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs?{query}"


def ui_command(
    tracking_uri: str | None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
) -> list[str]:
    """The argv of ``python -m mlflow ui`` serving the local store ``tracking_uri``.

    ``tracking_uri`` goes through
    :func:`gradpipe.flows.tracking.resolve_tracking_uri` (None means
    ``$MLFLOW_TRACKING_URI`` or ``./mlruns.db``; relative paths become
    absolute). For a ``sqlite:///`` store, artifacts logged through the UI's
    proxy go to ``<directory of the database>/mlartifacts``, where gradpipe's
    experiments keep theirs. Raises :class:`UIError` for ``http(s)://`` and
    Databricks URIs (open that URL instead) and for in-memory databases.
    """
    uri = _local_store(tracking_uri)
    if not 0 <= int(port) <= 65535:
        raise UIError(f"port {port} is not a TCP port (0-65535)")
    if int(workers) < 1:
        raise UIError(f"workers must be at least 1, got {workers}")
    argv = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--host", host,
        "--port", str(int(port)),
        "--workers", str(int(workers)),
    ]
    artifacts = artifact_root(uri)
    if artifacts is not None:
        argv += ["--artifacts-destination", str(artifacts)]
    return argv


def ui_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the UI process: ``base`` (default ``os.environ``) plus
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.

    The job runner (several huey consumer processes) only serves MLflow's
    GenAI jobs; without it the UI starts twice as fast on a small machine.
    A value the user set explicitly is kept.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in _WILDCARD_HOSTS else "", 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host if host not in _WILDCARD_HOSTS else "", port))
        except OSError as exc:
            raise UIError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port"
            ) from None


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _terminate(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM the process group (the UI runs in its own session), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)   # workers the leader left behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@dataclass
class UIServer:
    """A running ``mlflow ui`` child process (its own session and process group).

    ``url`` is the address to open (``http://127.0.0.1:<port>``); the MLflow UI
    is hash-routed, e.g. ``url + "/#/experiments/1"``.
    """

    process: subprocess.Popen[Any]
    url: str
    tracking_uri: str
    log_path: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/health`` answers 200; :class:`UIError` (with the log tail) if the
        process exits or ``timeout`` seconds pass (the process is then stopped)."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            if self.process.poll() is not None:
                raise UIError(
                    f"mlflow ui exited with code {self.process.returncode} before answering"
                    + (f"; its log ({self.log_path}):\n{_tail(self.log_path)}" if self.log_path else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise UIError(
                    f"mlflow ui did not answer {self.url}/health within {timeout:.0f} s"
                    + (f"; its log ({self.log_path}):\n{_tail(self.log_path)}" if self.log_path else "")
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the UI: SIGTERM to its process group, SIGKILL after ``timeout`` s. Idempotent."""
        with self._lock:
            _terminate(self.process, timeout)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the UI's log file (empty when it logs to the terminal)."""
        return _tail(self.log_path, lines)

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(
    tracking_uri: str | None,
    host: str,
    port: int,
    workers: int,
    log: IO[bytes] | None,
    env: Mapping[str, str] | None,
) -> tuple[subprocess.Popen[Any], str, str]:
    uri = _local_store(tracking_uri)
    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        raise UIError(f"no tracking database at {db}: run `gradpipe train` or `gradpipe compare` first, "
                      "or point --tracking-uri at an existing store")
    if port == 0:
        port = _free_port(host)
    else:
        _check_port_free(host, port)
    argv = ui_command(uri, host=host, port=port, workers=workers)
    output: Any = log if log is not None else None
    process = subprocess.Popen(
        argv,
        env=ui_env(env),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,      # Ctrl-C in the terminal reaches us, not the UI; we stop it
    )
    return process, f"http://{_url_host(host)}:{port}", uri


def start_ui(
    tracking_uri: str | None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    wait: bool = True,
    timeout: float = 60.0,
    *,
    workers: int = 1,
    log_path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
) -> UIServer:
    """Start the MLflow UI on ``tracking_uri`` in the background and return it.

    ``port=0`` picks a free port. Output goes to ``log_path`` (default: a
    temporary file). With ``wait`` the call returns once ``/health`` answers,
    or raises :class:`UIError` with the log tail. Stop it with
    :meth:`UIServer.stop` or use it as a context manager.
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="gradpipe-mlflow-ui-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        process, url, uri = _spawn(tracking_uri, host, port, workers, log, env)
    server = UIServer(process=process, url=url, tracking_uri=uri, log_path=log_path)
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
    return server


def run_ui(
    tracking_uri: str | None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    workers: int = 1,
    timeout: float = 120.0,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C (or SIGTERM); the exit code.

    The UI's own output goes to this terminal. Once ``/health`` answers,
    ``echo`` prints the URL. Ctrl-C stops the UI's whole process group and
    returns 0; if the UI exits by itself its exit code is returned.
    """
    process, url, uri = _spawn(tracking_uri, host, port, workers, None, None)
    server = UIServer(process=process, url=url, tracking_uri=uri)

    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        def _on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        server.wait_ready(timeout)
        echo(f"MLflow UI for {uri}")
        echo(f"  open {url}  (Ctrl-C to stop)")
        if host not in _LOCAL_HOSTS:
            echo(f"  listening on {host}: other machines can reach it, and the UI has no login")
        return process.wait()
    except KeyboardInterrupt:
        echo("stopping the MLflow UI")
        return 0
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
