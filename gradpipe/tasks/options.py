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
"""

from __future__ import annotations

import math
from typing import Any

from .base import TaskError

__all__ = ["HOLDOUTS", "TUNE_FRACTION", "int_option", "float_option", "holdout_option"]

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
