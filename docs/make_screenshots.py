"""Regenerate the MLflow UI screenshots in docs/img from a real comparison.

    .venv/bin/python docs/make_screenshots.py      # needs Debian's chromium (apt-get install chromium)

Runs ``gradpipe compare adam lion diffgrad --task digits --seeds 2 --steps 150``
into a scratch MLflow store (an ephemeral Prefect server starts for it), starts
the MLflow UI on it, and saves two pictures in headless Chromium:

- ``docs/img/mlflow-runs.png``: the comparison's runs in the chart view
  (every child's loss curve);
- ``docs/img/mlflow-compare.png``: the compare page of two runs (params,
  metrics, parallel coordinates).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from gradpipe.flows import compare
    from gradpipe.flows.screenshot import dump_dom, find_chromium, screenshot, visible_text
    from gradpipe.flows.ui import compare_runs_url, experiment_runs_url, start_ui

    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium (or set GRADPIPE_CHROMIUM)", file=sys.stderr)
        return 1
    out = HERE / "img"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        result = compare(["adam", "lion", "diffgrad"], "digits", [0, 1], steps=150,
                         per_pipeline={"adam": {"lr": 0.01}, "lion": {"lr": 0.001}, "diffgrad": {"lr": 0.01}},
                         tracking_uri=uri, experiment="gradpipe-demo", name="compare adam, lion, diffgrad on digits")
        seed0 = [o.run_id for o in result.outcomes if o.spec.seed == 0][:2]
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        with start_ui(uri, host="::1" if _has_ipv6() else "127.0.0.1", port=0, env=env) as ui:
            runs = experiment_runs_url(ui.url, result.experiment_id, parent_run_id=result.parent_run_id)
            text = visible_text(dump_dom(runs, chromium=chromium, width=1600, height=1100, wait_ms=60000))
            assert "adam" in text and "lion" in text, text[:2000]
            screenshot(runs, out / "mlflow-runs.png", chromium=chromium, width=1600, height=1100, wait_ms=60000)
            pair = compare_runs_url(ui.url, seed0, [result.experiment_id])
            screenshot(pair, out / "mlflow-compare.png", chromium=chromium, width=1600, height=1500, wait_ms=30000)
    print(f"wrote {out / 'mlflow-runs.png'} and {out / 'mlflow-compare.png'}")
    return 0


def _has_ipv6() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
