"""What a comparison or a schedule checks before it starts anything (no Prefect import here:
``gradpipe serve`` must set ``PREFECT_API_URL`` before Prefect is first imported)."""

from __future__ import annotations

import pathlib
from typing import Sequence

from .spec import SpecError

__all__ = ["grad_files", "fitting_task", "check_serve"]


def grad_files(directory: str | pathlib.Path) -> list[str]:
    """The pipeline files under ``directory`` (``*.grad``, recursively, sorted). Library files
    (definitions that pipelines import, no pipeline of their own) are checked but not listed:
    there is nothing to train with them. A file that does not compile raises its GradError."""
    import gradpipe
    files = (p for p in sorted(pathlib.Path(directory).rglob("*.grad")) if p.is_file())
    return [str(p) for p in files if not isinstance(gradpipe.check_file(p), gradpipe.Library)]


def fitting_task(files: Sequence[str], task: str) -> tuple[list[str], list[str]]:
    """Split a folder's pipelines into those ``task`` can train and those it cannot
    (a pipeline reading ``grads.main`` needs a task with a loss named ``main``).

    Named pipelines that don't fit are an error (:func:`plan_runs`); a folder
    usually mixes single- and multi-loss pipelines, so its misfits are skipped.
    """
    from ..tasks import get_task
    from .. import load as load_pipeline
    names = set(get_task(task).loss_names)
    fit, skipped = [], []
    for f in files:
        (fit if set(load_pipeline(f).losses) <= names else skipped).append(f)
    return fit, skipped


def check_serve(directory: str | pathlib.Path, cron: str, *, task: str = "digits", seeds: int = 1) -> pathlib.Path:
    """Everything ``serve`` checks before it registers anything; returns the folder, absolute.

    Raises:
        SpecError: not a folder, no ``.grad`` files the task can train, a bad cron expression.
        GradError: a file does not compile. TaskError: an unknown task.
    """
    import datetime

    from cronsim import CronSim, CronSimError  # Prefect's own cron parser, without importing Prefect

    import gradpipe
    from ..tasks import get_task

    folder = pathlib.Path(directory).resolve()
    if not folder.is_dir():
        raise SpecError(f"{directory} is not a folder")
    files = grad_files(folder)
    if not files:
        raise SpecError(f"no .grad files in {directory}")
    for f in files:
        gradpipe.load(f)
    get_task(task)
    if not fitting_task(files, task)[0]:
        raise SpecError(f"no .grad file in {directory} can train on task {task!r} (they read named losses)")
    try:
        CronSim(cron, datetime.datetime.now())
    except (CronSimError, ValueError):
        raise SpecError(f"{cron!r} is not a cron expression (e.g. \"0 3 * * *\": every day at 03:00)") from None
    if seeds < 1:
        raise SpecError("--seeds must be at least 1")
    return folder
