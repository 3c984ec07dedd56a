"""Checking task options: integers, numbers and the ``holdout`` option every built-in task has.

Options arrive as keyword arguments of a task's constructor, from Python or as
strings from a command line, so each check accepts a value or a string of one
and raises a one-line :class:`~gradpipe.tasks.base.TaskError` that names the
option and what it must be.

**The holdout option.** ``holdout="val"`` (the default) trains on the task's
training split and evaluates on its validation split. ``holdout="tune"`` is
for tuning hyperparameters without ever reading the validation split: a
seeded part of about a fifth (:data:`TUNE_FRACTION`) of the *training* split
is held out, the model trains on the rest, and :meth:`Task.evaluate` reports
the same metric names computed on that held-out part. Tasks without data (the
synthetic objectives) accept both values and evaluate the same objective:
there is nothing to leak.

**The reserve option** (the digits tasks). Their train/validation split is
re-drawn per seed, so the training split of a tuning seed holds validation
images of the reporting seeds. ``reserve`` (a tuple of seeds, for
``holdout="tune"`` only) drops every image in the validation split of those
seeds from both the part trained on and the tuning part;
``gradpipe compare --tune`` passes the reporting seeds, so tuning never reads
an image a reported run is validated on. Tasks whose validation data does not
depend on the seed (``charlm``, ``tinylm``: a fixed validation text) do not
need it.
"""

from __future__ import annotations

import math
from typing import Any

from .base import TaskError

__all__ = ["HOLDOUTS", "TUNE_FRACTION", "int_option", "float_option", "holdout_option", "reserve_option"]

#: The values of the ``holdout`` option: evaluate on the validation split, or on a tuning part of the training split.
HOLDOUTS: tuple[str, ...] = ("val", "tune")
#: The fraction of the training split that ``holdout="tune"`` holds out.
TUNE_FRACTION = 0.2


def int_option(task: str, name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int ``>= low`` (an int, or a string of one, as a command line gives it)."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = int(value)
    except (TypeError, ValueError):
        raise TaskError(f"task {task!r}: option {name} must be an integer, got {value!r}") from None
    if out < low:
        raise TaskError(f"task {task!r}: option {name} must be at least {low}, got {out}")
    return out


def float_option(task: str, name: str, value: Any, low: float = 0.0) -> float:
    """``value`` as a finite float ``>= low`` (a number, or a string of one)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise TaskError(f"task {task!r}: option {name} must be a number, got {value!r}") from None
    if not (math.isfinite(out) and out >= low):
        raise TaskError(f"task {task!r}: option {name} must be finite and at least {low}, got {out}")
    return out


def holdout_option(task: str, value: Any) -> str:
    """``value`` if it is one of :data:`HOLDOUTS` (``"val"`` or ``"tune"``), else a :class:`TaskError`."""
    if isinstance(value, str) and value.strip() in HOLDOUTS:
        return value.strip()
    raise TaskError(f"task {task!r}: option holdout must be 'val' (evaluate on the validation split) or "
                    f"'tune' (evaluate on a held-out fifth of the training split), got {value!r}")


def reserve_option(task: str, value: Any, holdout: str) -> tuple[int, ...]:
    """``value`` as a sorted tuple of distinct seeds ``>= 0`` (a sequence of ints, or a string
    ``"0,1,2"`` as a command line gives it); a non-empty one needs ``holdout="tune"``.

    A tuple of ints, so a task spec carrying it pickles to Dask workers and logs as one param.
    """
    items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()] if isinstance(
        value, str) else value
    try:
        if isinstance(items, (bytes, dict)) or isinstance(items, (int, float)):
            raise TypeError
        seeds = [int_option(task, "reserve", v, low=0) for v in items]
    except (TypeError, TaskError):
        raise TaskError(f"task {task!r}: option reserve must be seeds (integers >= 0, e.g. (0, 1, 2)), "
                        f"got {value!r}") from None
    out = tuple(sorted(set(seeds)))
    if out and holdout != "tune":
        raise TaskError(f"task {task!r}: option reserve holds tuning data out of reporting seeds' validation "
                        f"images and needs holdout='tune', got holdout={holdout!r}")
    return out
