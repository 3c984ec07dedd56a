"""Prefect settings gradpipe applies, and a local Prefect server for schedules.

Prefect's scheduler runs only in a real ``prefect server start``: the
ephemeral server that a flow call starts on its own cannot schedule.
``gradpipe serve`` therefore uses the server at ``PREFECT_API_URL`` when one
is set and otherwise starts one on 127.0.0.1 for as long as it serves.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PREFECT_DEFAULTS", "apply_prefect_defaults", "LocalPrefectServer", "start_prefect_server", "free_port"]

#: Settings gradpipe sets unless the user already has: no analytics, and a
#: start-up timeout long enough for a first start on a small machine (~20 s).
PREFECT_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def apply_prefect_defaults(environ: dict[str, str] | None = None) -> None:
    """Set :data:`PREFECT_DEFAULTS` in ``environ`` (default ``os.environ``) where unset.

    Call before importing prefect: it reads its settings at import time.
    """
    env = os.environ if environ is None else environ
    for k, v in PREFECT_DEFAULTS.items():
        env.setdefault(k, v)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalPrefectServer:
    """A ``prefect server start`` child process on ``host:port``."""

    process: subprocess.Popen
    api_url: str
    log_path: Path

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "LocalPrefectServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_prefect_server(home: Path, *, host: str = "127.0.0.1", port: int | None = None, ui: bool = False,
                         timeout: float = 120.0) -> LocalPrefectServer:
    """Start ``prefect server start`` with ``PREFECT_HOME=home`` and wait until it answers.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout``
            seconds (the message ends with its log).
    """
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    env = dict(os.environ)
    apply_prefect_defaults(env)
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalPrefectServer(proc, f"http://{host}:{port}/api", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _healthy(server.api_url):
            return server
        time.sleep(0.25)
    server.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the Prefect server on {host}:{port} did not start:\n{tail}")
