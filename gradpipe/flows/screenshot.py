"""Screenshots and rendered DOM of web pages through headless Chromium.

Used to check (and document) what the MLflow UI shows for gradpipe's runs.
The MLflow UI is a JavaScript single-page app, so a plain HTTP GET returns
an empty shell: Chromium renders the page, ``--virtual-time-budget`` lets its
requests and timers finish (virtual time runs ahead while the page is idle,
so the wait is usually much shorter than the budget), then Chromium writes a
PNG (:func:`screenshot`) or the serialized DOM (:func:`dump_dom`).

Every call uses a fresh throw-away profile (``--user-data-dir``) and turns
off the browser's own network traffic (updates, sync, QUIC), so only the
page's requests leave the process. ``--no-sandbox`` is always passed:
Chromium's sandbox refuses to run as root, which containers and CI often are.
"""

from __future__ import annotations

import contextlib
import html as _html
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["ScreenshotError", "find_chromium", "chromium_command", "screenshot", "dump_dom", "visible_text"]

_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
# log lines Chromium prints without a session bus or GPU; not worth showing
_NOISE = re.compile(r"dbus|Fontconfig|gpu_init|viz_main|unexpected operator|^\s*$")


class ScreenshotError(RuntimeError):
    """Chromium is missing, failed, or produced no output; the message says which."""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable to use, or None when there is none.

    Order: ``$GRADPIPE_CHROMIUM`` (a path or a command name), then
    ``/usr/bin/chromium`` (Debian), ``chromium``, ``chromium-browser``,
    ``google-chrome`` and ``google-chrome-stable`` on ``PATH``.
    """
    override = os.environ.get("GRADPIPE_CHROMIUM", "").strip()
    for name in ((override,) if override else ()) + _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(chromium: str | None) -> str:
    path = shutil.which(chromium) if chromium else find_chromium()
    if not path:
        raise ScreenshotError(
            f"no Chromium found{f' at {chromium}' if chromium else ''}: install it"
            " (Debian: apt-get install chromium) or set GRADPIPE_CHROMIUM"
        )
    return path


def chromium_command(
    url: str,
    *,
    chromium: str,
    user_data_dir: str | Path,
    width: int = 1600,
    height: int = 1000,
    wait_ms: int = 8000,
    output: list[str] | tuple[str, ...] = ("--dump-dom",),
) -> list[str]:
    """The argv that renders ``url`` in a ``width`` x ``height`` window with a
    virtual time budget of ``wait_ms`` ms, then runs ``output``
    (``--dump-dom`` or ``--screenshot=PATH``)."""
    if width < 1 or height < 1:
        raise ValueError(f"window size must be positive, got {width}x{height}")
    if wait_ms < 0:
        raise ValueError(f"wait_ms must be >= 0, got {wait_ms}")
    return [
        chromium,
        *_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={int(width)},{int(height)}",
        f"--virtual-time-budget={int(wait_ms)}",
        *output,
        url,
    ]


def _run(
    argv_for: Callable[[str], list[str]], timeout: float, user_data_dir: str | Path | None,
) -> subprocess.CompletedProcess[bytes]:
    with contextlib.ExitStack() as stack:
        if user_data_dir is None:
            profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="gradpipe-chromium-"))
        else:
            profile = str(Path(user_data_dir).expanduser().resolve())
            Path(profile).mkdir(parents=True, exist_ok=True)
        argv = argv_for(profile)
        try:
            return subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"Chromium did not finish within {timeout:.0f} s: {argv[-1]}") from None
        except OSError as exc:
            raise ScreenshotError(f"cannot run {argv[0]}: {exc}") from None


def _stderr_tail(raw: bytes, lines: int = 15) -> str:
    kept = [line for line in raw.decode(errors="replace").splitlines() if not _NOISE.search(line)]
    return "\n".join(kept[-lines:])


def _timeout(wait_ms: int) -> float:
    return 60.0 + 3 * wait_ms / 1000.0


def screenshot(
    url: str,
    out_png: str | Path,
    *,
    chromium: str | None = None,
    width: int = 1600,
    height: int = 1000,
    wait_ms: int = 8000,
    user_data_dir: str | Path | None = None,
) -> Path:
    """Render ``url`` in headless Chromium and save a ``width`` x ``height`` PNG to ``out_png``.

    ``wait_ms`` is Chromium's ``--virtual-time-budget``: how long (in page
    time) scripts and requests may run before the capture. Returns the PNG's
    path; raises :class:`ScreenshotError` when no Chromium is found, it fails,
    or it writes no image. The browser profile is a fresh temporary
    directory unless ``user_data_dir`` names one to keep (its local storage
    then carries over between calls, e.g. a page's "seen" flags).
    """
    exe = _chromium(chromium)
    out = Path(out_png).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Chromium writes the file itself; a stale one must not pass for a new one
    out.unlink(missing_ok=True)
    result = _run(
        lambda profile: chromium_command(
            url, chromium=exe, user_data_dir=profile, width=width, height=height,
            wait_ms=wait_ms, output=(f"--screenshot={out}",),
        ),
        _timeout(wait_ms),
        user_data_dir,
    )
    if not out.is_file() or out.stat().st_size == 0:
        raise ScreenshotError(
            f"Chromium (exit {result.returncode}) wrote no screenshot of {url}:\n{_stderr_tail(result.stderr)}"
        )
    return out


def dump_dom(
    url: str,
    *,
    chromium: str | None = None,
    width: int = 1600,
    height: int = 1000,
    wait_ms: int = 8000,
    user_data_dir: str | Path | None = None,
) -> str:
    """The DOM of ``url`` as HTML after Chromium rendered it for ``wait_ms`` ms of page time.

    Use :func:`visible_text` to check what the page says. Raises
    :class:`ScreenshotError` when no Chromium is found or it prints nothing.
    ``user_data_dir`` is as for :func:`screenshot`.
    """
    exe = _chromium(chromium)
    result = _run(
        lambda profile: chromium_command(
            url, chromium=exe, user_data_dir=profile, width=width, height=height,
            wait_ms=wait_ms, output=("--dump-dom",),
        ),
        _timeout(wait_ms),
        user_data_dir,
    )
    dom = result.stdout.decode("utf-8", errors="replace")
    if not dom.strip():
        raise ScreenshotError(
            f"Chromium (exit {result.returncode}) printed no DOM for {url}:\n{_stderr_tail(result.stderr)}"
        )
    return dom


def visible_text(dom: str) -> str:
    """The text of an HTML document without scripts, styles and tags, whitespace collapsed."""
    body = re.sub(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", " ", dom, flags=re.S | re.I)
    body = re.sub(r"<[^>]+>", " ", body)
    return re.sub(r"\s+", " ", _html.unescape(body)).strip()
