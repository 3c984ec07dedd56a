"""A scheduled deployment that re-runs a comparison over the ``.grad`` files in a folder.

``gradpipe serve pipelines/ --cron "0 3 * * *"`` registers the deployment
``gradpipe-scheduled-compare/<name>`` with a cron schedule and serves it:
each run (a scheduled one, or one triggered with
``prefect deployment run 'gradpipe-scheduled-compare/<name>'``) lists the
folder's ``.grad`` files at that moment and compares them, in a subprocess
that Prefect starts, logging to the same MLflow store. The tracking URI and
folder are made absolute when the deployment is registered, so runs do not
depend on the working directory.
"""

from __future__ import annotations

import pathlib
from typing import Any

from prefect import flow

from .checks import check_serve, fitting_task, grad_files
from .comparison import compare
from .spec import SpecError

__all__ = ["scheduled_compare", "serve", "check_serve", "deployment_name"]

FLOW_NAME = "gradpipe-scheduled-compare"


def deployment_name(name: str) -> str:
    """The full deployment name ``prefect deployment run`` takes."""
    return f"{FLOW_NAME}/{name}"


@flow(name=FLOW_NAME, persist_result=False, log_prints=True, validate_parameters=False)
def scheduled_compare(directory: str, task: str = "digits", seeds: int = 1, steps: int | None = None,
                      tracking_uri: str | None = None, experiment: str = "gradpipe-scheduled",
                      backend: str = "eager", sets: dict[str, Any] | None = None,
                      threads: int = 1) -> dict[str, Any]:
    """Compare every ``.grad`` file in ``directory`` now; returns a summary (parent run id, counts)."""
    files, skipped = fitting_task(grad_files(directory), task)
    if skipped:
        print(f"skipped (they need named losses {task} lacks): {', '.join(skipped)}")
    if not files:
        raise SpecError(f"no .grad files in {directory} that task {task!r} can train")
    result = compare(files, task, list(range(seeds)), steps=steps, sets=sets, tracking_uri=tracking_uri,
                     experiment=experiment, backend=backend, name=f"scheduled: {pathlib.Path(directory).name}",
                     threads=threads)
    print(f"compared {len(files)} pipelines: parent run {result.parent_run_id}, "
          f"{len(result.failed)} of {len(result.outcomes)} runs failed")
    if result.all_failed:
        raise RuntimeError("every run of the scheduled comparison failed")
    return {"parent_run_id": result.parent_run_id, "experiment_id": result.experiment_id,
            "runs": len(result.outcomes), "failed": len(result.failed)}


def serve(directory: str | pathlib.Path, cron: str, *, name: str | None = None, task: str = "digits",
          seeds: int = 1, steps: int | None = None, tracking_uri: str | None = None,
          experiment: str = "gradpipe-scheduled", backend: str = "eager", sets: dict[str, Any] | None = None,
          threads: int = 1) -> None:
    """Register and serve the scheduled comparison until interrupted (needs ``PREFECT_API_URL``).

    Checks first: the folder has ``.grad`` files that compile, the task
    exists, the cron expression parses, the tracking store answers.
    """
    from . import tracking

    folder = check_serve(directory, cron, task=task, seeds=seeds)
    files = grad_files(folder)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    tracking.ensure_experiment(uri, experiment)
    params = {"directory": str(folder), "task": task, "seeds": seeds, "steps": steps, "tracking_uri": uri,
              "experiment": experiment, "backend": backend, "sets": dict(sets or {}), "threads": threads}
    dep_name = name or folder.name
    scheduled_compare.serve(name=dep_name, cron=cron, parameters=params,
                            description=f"Compare the {len(files)} .grad files in {folder} on {task}")
