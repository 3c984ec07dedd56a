"""Experiment tracking for gradpipe runs, on MLflow.

Everything here goes through ``mlflow.MlflowClient(tracking_uri=uri)`` with
explicit run ids. MLflow's fluent API (``mlflow.start_run``/``active_run``)
keeps its run stack per thread and per process, so runs started in a thread
pool or on a Dask worker lose their parent and experiment; passing ids
around does not.

Layout of a study (one MLflow experiment)::

    parent run  (one sweep / flow run)            start_parent_run
      child run (pipeline x seed x hyperparams)   create_child_run -> SCHEDULED
                                                  RunLogger.start   -> RUNNING
                                                  RunLogger.finish  -> FINISHED/FAILED/KILLED

Metrics are buffered as ``mlflow.entities.Metric`` objects and written with
``log_batch`` (one request per ``flush_every`` steps is 30-50x cheaper than
one request per value on SQLite). Local stores default to
``sqlite:///<cwd>/mlruns.db`` with artifacts beside the database in
``mlartifacts/``, both as absolute paths so that worker processes with a
different working directory write to the same place.

``mlflow`` is imported lazily: importing this module costs nothing until a
store is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
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
from base64 import b64encode
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from matplotlib.figure import Figure
    from mlflow import MlflowClient

DEFAULT_STORE = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"

#: Longest param value MLflow stores (it truncates longer ones silently).
MAX_PARAM_LENGTH = 6000
#: Longest ``gradpipe.failure`` tag value written by :meth:`RunLogger.finish`.
MAX_REASON_LENGTH = 5000
#: Tag holding the failure reason of a FAILED or KILLED run.
FAILURE_TAG = "gradpipe.failure"

_PASSTHROUGH_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SUPPORTED_SCHEMES = ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql", "mssql")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line saying why
    (unreachable server, missing or unwritable directory, unsupported scheme,
    a param value too long to store)."""


# --------------------------------------------------------------------------- URIs


def _scheme(uri: str) -> str:
    """Lower-case URI scheme without a ``+driver`` suffix; "" for a bare path
    (Windows drive letters such as ``C:`` count as paths)."""
    if uri.lower() in ("databricks", "databricks-uc", "uc"):
        return uri.lower()
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if not m or len(m.group(1)) == 1:
        return ""
    return m.group(1).lower().split("+", 1)[0]


def _abs(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = base / p
    return os.path.abspath(p)


def _sqlite_path(uri: str) -> str | None:
    """File path of a ``sqlite:///`` URI, None for in-memory databases."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return urllib.parse.unquote(path)


def _is_file_store(d: Path) -> bool:
    """An existing MLflow file store directory (has the Default experiment or a trash folder)."""
    return (d / "0" / "meta.yaml").is_file() or (d / ".trash").is_dir()


def resolve_tracking_uri(uri: str | None = None, cwd: Path | None = None) -> str:
    """The tracking URI to use, made independent of the working directory.

    Precedence: the ``uri`` argument, then ``$MLFLOW_TRACKING_URI``, then
    ``sqlite:///<cwd>/mlruns.db``. Relative locations are made absolute
    against ``cwd`` (default: the process's working directory):

    * ``sqlite:///runs/x.db`` -> ``sqlite:////abs/runs/x.db``
    * ``file:mlruns`` -> ``file:///abs/mlruns``
    * a bare path ending in .db/.sqlite/.sqlite3 (or naming an existing
      file) -> ``sqlite:///`` on that file; an existing MLflow file-store
      directory -> ``file://``; any other bare path is a directory that
      holds ``mlruns.db``.

    http(s), databricks and SQL-server URIs are returned untouched.
    """
    base = Path(os.path.abspath(os.path.expanduser(str(cwd)))) if cwd is not None else Path.cwd()
    raw = (uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not raw:
        return f"sqlite:///{base / DEFAULT_STORE}"
    scheme = _scheme(raw)
    if scheme == "sqlite":
        if not raw.lower().startswith("sqlite:///"):
            return raw                                   # sqlite:// (in memory)
        rest = raw[len("sqlite:///"):]
        path, sep, query = rest.partition("?")
        if path in ("", ":memory:"):
            return raw
        return f"sqlite:///{_abs(path, base)}{sep}{query}"
    if scheme == "file":
        parsed = urllib.parse.urlparse(raw)
        path = urllib.parse.unquote(parsed.path)
        if parsed.netloc in (".", ".."):                 # file://./mlruns
            path = parsed.netloc + path
        elif parsed.netloc not in ("", "localhost"):
            return raw                                   # a network share: leave it
        return Path(_abs(path or ".", base)).as_uri()
    if scheme:
        return raw                                       # http(s), databricks, SQL servers, unknown
    path = Path(_abs(raw, base))
    if path.suffix.lower() in _SQLITE_SUFFIXES or path.is_file():
        return f"sqlite:///{path}"
    if path.is_dir() and _is_file_store(path):
        return path.as_uri()
    return f"sqlite:///{path / DEFAULT_STORE}"


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's REST client would send, from its environment variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and pw:
        return {"Authorization": "Basic " + b64encode(f"{user}:{pw}".encode()).decode()}
    return {}


def _get(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> int:
    """HTTP status of one GET, no retries. Raises URLError/OSError when unreachable."""
    req = urllib.request.Request(url, headers=dict(headers or {}), method="GET")
    try:
        with urllib.request.urlopen(req, timeout=max(timeout, 0.05)) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.close()
        return int(e.code)


def _check_http(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    deadline = time.monotonic() + timeout
    try:
        health = _get(base + "/health", timeout)
        if health == 200:
            return
        search = _get(base + "/api/2.0/mlflow/experiments/search?max_results=1",
                      deadline - time.monotonic(), _auth_headers())
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason}); "
                            "start one with `mlflow server` or use a sqlite:/// URI") from None
    if search == 200:
        return
    if search in (401, 403):
        raise TrackingError(f"the MLflow tracking server at {uri} refused access (HTTP {search}); set "
                            "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD")
    raise TrackingError(f"{uri} does not answer like an MLflow tracking server "
                        f"(GET /health: HTTP {health}, experiments search: HTTP {search})")


def _check_writable_dir(d: Path, what: str) -> None:
    if not d.exists():
        raise TrackingError(f"the directory {d} for the {what} does not exist")
    if not d.is_dir():
        raise TrackingError(f"{d} (for the {what}) is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise TrackingError(f"the directory {d} for the {what} is not writable")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a one-line :class:`TrackingError`, when ``uri`` cannot be used.

    * http(s): one GET on ``<uri>/health`` (then the experiments-search REST
      endpoint if that is not 200), with ``timeout`` seconds in all and no
      retries (MLflow's own client retries for minutes).
    * sqlite: the database's directory exists and is writable; an existing
      database file is a writable SQLite file.
    * file: the store directory (or its parent) exists and is writable.
    * databricks and SQL servers are accepted without a probe.

    Nothing is created on disk, so a failed check leaves no files behind.
    """
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
        return
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            if uri.lower().startswith("sqlite:///") or uri.lower().rstrip("/") == "sqlite:":
                return                                    # in-memory database
            raise TrackingError(f"malformed SQLite URI '{uri}': use sqlite:///relative.db or sqlite:////abs/path.db")
        p = Path(path)
        _check_writable_dir(p.parent, "tracking database")
        if p.exists():
            if p.is_dir():
                raise TrackingError(f"the tracking database {p} is a directory, not a file")
            if not os.access(p, os.R_OK | os.W_OK):
                raise TrackingError(f"the tracking database {p} is not writable")
            with open(p, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise TrackingError(f"{p} is not an SQLite database")
        return
    if scheme == "file" or scheme == "":
        parsed = urllib.parse.urlparse(uri)
        p = Path(urllib.parse.unquote(parsed.path if scheme else uri))
        _check_writable_dir(p if p.exists() else p.parent, "tracking file store")
        return
    if scheme in _PASSTHROUGH_SCHEMES or scheme in _SQL_SCHEMES:
        return
    raise TrackingError(f"unsupported tracking URI scheme '{scheme}:' in '{uri}'; supported: "
                        + ", ".join(f"{s}:" for s in SUPPORTED_SCHEMES))


# --------------------------------------------------------------------------- experiments and runs


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on the directory of a ``sqlite:///`` database (no-op otherwise).

    MLflow creates and migrates a SQLite store's schema on the first open in
    each process; two processes doing that at once against a new file fail
    with ``table ... already exists``. Holding a ``flock`` on the database's
    directory while the store opens serialises them without leaving a lock
    file behind. Platforms without ``fcntl`` go unlocked.
    """
    path = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri`` whose store is already open.

    Safe to call from several processes at once against a fresh SQLite file:
    the first open (which creates the schema) happens under
    :func:`_schema_lock`.
    """
    from mlflow import MlflowClient

    with _schema_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def artifact_root(uri: str) -> Path | None:
    """``<directory of the database>/mlartifacts`` for a ``sqlite:///`` store, else None."""
    path = _sqlite_path(uri)
    return Path(path).parent / DEFAULT_ARTIFACTS if path else None


def ensure_experiment(uri: str, name: str) -> str:
    """Id of the experiment ``name``, created when missing.

    Opening the store creates its schema, so call this once in the parent
    process before fanning out: concurrent first-time migrations of one
    SQLite file crash. For ``sqlite:///`` stores the experiment's artifacts go
    to ``<directory of the database>/mlartifacts/<name>`` (absolute
    ``file://`` URI) instead of MLflow's cwd-relative ``./mlruns``. Another
    process creating the same experiment at the same time is tolerated.
    """
    from mlflow.exceptions import MlflowException

    try:
        client = open_client(uri)
        exp = client.get_experiment_by_name(name)
    except MlflowException as e:
        raise TrackingError(f"cannot open the tracking store {uri}: {_one_line(e)}") from e
    except Exception as e:  # store construction: sqlalchemy, OSError, ...
        raise TrackingError(f"cannot open the tracking store {uri}: {_one_line(e)}") from e
    if exp is None:
        root = artifact_root(uri)
        location = (root / _safe_name(name)).as_uri() if root is not None else None
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except MlflowException as e:
            exp = client.get_experiment_by_name(name)        # lost a race with another creator
            if exp is None:
                raise TrackingError(f"cannot create experiment '{name}' in {uri}: {_one_line(e)}") from e
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment '{name}' (id {exp.experiment_id}) is deleted; restore it "
                            "(mlflow experiments restore) or delete it permanently (mlflow gc)")
    return str(exp.experiment_id)


def _params(params: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        s = str(v)
        if len(s) > MAX_PARAM_LENGTH:
            raise TrackingError(f"param '{k}' is {len(s)} characters long (MLflow keeps {MAX_PARAM_LENGTH}); "
                                "log long text as an artifact")
        out[str(k)] = s
    return out


def _tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items()}


def _default_tags(tags: dict[str, str]) -> dict[str, str]:
    if "mlflow.user" not in tags:
        try:
            import getpass

            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # no user name in containers without a passwd entry
            pass
    return tags


def _create_run(uri: str, experiment_id: str, name: str, params: Mapping[str, Any] | None,
                tags: dict[str, str], status: str | None) -> str:
    from mlflow.entities import Param

    p = _params(params)                                       # validate before creating anything
    client = open_client(uri)
    run = client.create_run(str(experiment_id), tags=_default_tags(tags), run_name=name)
    run_id = run.info.run_id
    try:
        if p:
            client.log_batch(run_id, params=[Param(k, v) for k, v in p.items()])
        if status is not None:
            client.update_run(run_id, status=status)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def start_parent_run(uri: str, experiment_id: str, name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None) -> str:
    """Create a top-level run (status RUNNING) named ``name``; returns its id.

    Params and tags are stringified; a param longer than 6000 characters
    raises :class:`TrackingError` before anything is created.
    """
    return _create_run(uri, experiment_id, name, params, _tags(tags), None)


def create_child_run(uri: str, experiment_id: str, parent_id: str | None, name: str,
                     params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """Create a child of ``parent_id`` in status SCHEDULED; returns its id
    (``parent_id=None``: a top-level run, as ``gradpipe train`` makes).

    The child carries ``mlflow.parentRunId`` (the UI nests it; find children
    with ``filter_string="tags.mlflow.parentRunId = '<id>'"``) and
    ``mlflow.runName``. :meth:`RunLogger.start` moves it to RUNNING. Its
    start time is the creation time, so the UI's duration includes the wait
    in the queue.
    """
    t = _tags(tags)
    if parent_id is not None:
        t["mlflow.parentRunId"] = str(parent_id)
    return _create_run(uri, experiment_id, name, params, t, "SCHEDULED")


_OPEN: set[RunLogger] = set()
_OPEN_LOCK = threading.Lock()


def end_open_runs(status: str = "KILLED", reason: str | None = "terminated (SIGTERM)") -> None:
    """Finish every :class:`RunLogger` of this process that is not finished yet
    (errors are ignored: this runs on the way out). Pass it to
    :func:`install_sigterm_handler`."""
    with _OPEN_LOCK:
        loggers = list(_OPEN)
    for lg in loggers:
        try:
            lg.finish(status, reason)
        except Exception:
            pass


class RunLogger:
    """Log to one existing run, by id. Metrics are buffered and written with
    ``log_batch`` whenever ``flush_every`` distinct steps (or 1000 values) are
    waiting, and on :meth:`flush`/:meth:`finish`. One thread per run; the
    methods take a lock, so a signal handler or another thread may call
    :meth:`finish` too.

    Also a context manager: ``with RunLogger(uri, rid) as log:`` starts the
    run and finishes it FINISHED, FAILED (exception, message in
    ``gradpipe.failure``) or KILLED (KeyboardInterrupt).
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 100) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        self.uri = uri
        self.run_id = run_id
        self.flush_every = int(flush_every)
        self.client = open_client(uri)
        self._buffer: list[Any] = []
        self._steps: set[int] = set()
        self._lock = threading.RLock()
        self._finished = False
        with _OPEN_LOCK:
            _OPEN.add(self)

    @property
    def finished(self) -> bool:
        return self._finished

    def _check_open(self) -> None:
        if self._finished:
            raise TrackingError(f"run {self.run_id} is already finished")

    def start(self) -> None:
        """Mark the run RUNNING."""
        with self._lock:
            self._check_open()
            self.client.update_run(self.run_id, status="RUNNING")

    def _add(self, key: str, value: float, step: int, ts: int) -> None:
        from mlflow.entities import Metric

        self._buffer.append(Metric(str(key), float(value), ts, int(step)))
        self._steps.add(int(step))

    def _maybe_flush(self) -> None:
        if len(self._steps) >= self.flush_every or len(self._buffer) >= 1000:
            self.flush()

    def metric(self, key: str, value: float, step: int) -> None:
        """Buffer one value of ``key`` at optimizer step ``step``; NaN and inf are kept."""
        with self._lock:
            self._check_open()
            self._add(key, value, step, int(time.time() * 1000))
            self._maybe_flush()

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Buffer several values at one step."""
        with self._lock:
            self._check_open()
            ts = int(time.time() * 1000)
            for k, v in values.items():
                self._add(k, v, step, ts)
            self._maybe_flush()

    def params(self, d: Mapping[str, Any]) -> None:
        """Log params now (stringified; over 6000 characters raises TrackingError)."""
        from mlflow.entities import Param

        p = _params(d)
        if p:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in p.items()])

    def tags(self, d: Mapping[str, Any]) -> None:
        """Set tags now (stringified)."""
        from mlflow.entities import RunTag

        t = _tags(d)
        if t:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in t.items()])

    def text(self, text: str, artifact_path: str) -> None:
        """Store ``text`` as the artifact ``artifact_path`` (e.g. "pipeline.grad")."""
        self.client.log_text(self.run_id, text, artifact_path)

    def figure(self, fig: Figure, artifact_path: str) -> None:
        """Store a matplotlib figure; the extension picks the format ("plots/loss.png")."""
        self.client.log_figure(self.run_id, fig, artifact_path)

    def dict(self, d: Mapping[str, Any], artifact_path: str) -> None:
        """Store a mapping as JSON or YAML, after the extension of ``artifact_path``."""
        self.client.log_dict(self.run_id, {**d}, artifact_path)

    def flush(self) -> None:
        """Write the buffered metrics in one ``log_batch`` (kept in the buffer if it fails)."""
        with self._lock:
            if not self._buffer:
                return
            self.client.log_batch(self.run_id, metrics=list(self._buffer))
            self._buffer.clear()
            self._steps.clear()

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush, record ``reason`` in the tag ``gradpipe.failure`` (first 5000
        characters) when given, and end the run with ``status`` (FINISHED,
        FAILED or KILLED). A second call does nothing. The run is ended even
        when the flush fails; the flush error is raised afterwards."""
        status = status.upper()
        if status not in _TERMINAL:
            raise ValueError(f"status must be one of {', '.join(_TERMINAL)}, got {status!r}")
        with self._lock:
            if self._finished:
                return
            error: BaseException | None = None
            try:
                self.flush()
            except Exception as e:
                error = e
            if reason:
                self.client.set_tag(self.run_id, FAILURE_TAG, str(reason)[:MAX_REASON_LENGTH])
            self.client.set_terminated(self.run_id, status)
            self._finished = True
            with _OPEN_LOCK:
                _OPEN.discard(self)
            if error is not None:
                raise error

    def __enter__(self) -> RunLogger:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish("FINISHED")
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("KILLED", "interrupted (KeyboardInterrupt)")
        else:
            self.finish("FAILED", f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        return f"RunLogger(run_id={self.run_id!r}, uri={self.uri!r}, finished={self._finished})"


# --------------------------------------------------------------------------- artifacts and provenance


def pipeline_artifacts(program: Any, source: str) -> dict[str, str]:
    """The text artifacts describing a pipeline, by file name.

    ``pipeline.grad`` (``source`` as given), ``canonical.grad``
    (``program.canonical``), ``explain.txt`` (``program.explain()``) and the
    graph: ``graph.svg`` rendered with Graphviz, or ``graph.dot`` when no
    renderer works.
    """
    out = {"pipeline.grad": source, "canonical.grad": program.canonical, "explain.txt": program.explain()}
    with tempfile.TemporaryDirectory(prefix="gradpipe-graph-") as d:
        try:
            svg = Path(program.draw(Path(d) / "graph.svg"))
            out["graph.svg"] = svg.read_text(encoding="utf-8")
            return out
        except Exception:  # no renderer, renderer crashed or timed out: fall back to the dot text
            pass
    try:
        out["graph.dot"] = program.to_dot()
    except ImportError:
        pass
    return out


def _git(path: Path | str, *args: str) -> str | None:
    p = Path(path)
    d = p if p.is_dir() else p.parent
    if not d.is_dir():
        return None
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        res = subprocess.run(["git", "-C", str(d), *args], capture_output=True, text=True, timeout=5,
                             env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_commit(path: Path | str) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path``; None when it
    is not in a repository, the repository has no commit, or git is missing."""
    out = _git(path, "rev-parse", "HEAD")
    sha = out.strip() if out else ""
    return sha if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha) else None


def git_dirty(path: Path | str) -> bool | None:
    """Whether tracked files of ``path``'s repository differ from HEAD (untracked
    files ignored); None when unknown. Takes no index lock."""
    out = _git(path, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def install_sigterm_handler(ends: Callable[[], None]) -> Callable[[], None]:
    """On SIGTERM call ``ends()`` (e.g. :func:`end_open_runs`, which marks the
    open runs KILLED), then the previously installed Python handler if any,
    then exit with status 143 (128 + SIGTERM).

    Without it a run killed by SIGTERM (Prefect cancellation, workers, ``kill``)
    stays RUNNING forever. Signal handlers can only be installed from the main
    thread; elsewhere this does nothing. Returns a function that puts the
    previous handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:                                   # a second SIGTERM skips straight to exiting
            fired = True
            try:
                ends()
            except Exception as e:
                print(f"gradpipe: could not close the tracking runs: {_one_line(e)}", file=sys.stderr)
        if callable(previous):
            previous(signum, frame)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore


__all__ = [
    "DEFAULT_STORE", "DEFAULT_ARTIFACTS", "FAILURE_TAG", "MAX_PARAM_LENGTH", "SUPPORTED_SCHEMES",
    "TrackingError", "resolve_tracking_uri", "check_tracking_uri", "artifact_root", "ensure_experiment",
    "start_parent_run", "create_child_run", "RunLogger", "end_open_runs", "pipeline_artifacts",
    "git_commit", "git_dirty", "install_sigterm_handler",
]
