"""Percentile bootstrap confidence intervals of a mean, and steps to reach a target.

The ranked table of a tuned comparison (:mod:`gradpipe.flows.tuning`) reports,
per pipeline, the mean of the headline metric over the reporting seeds with a
95% **percentile bootstrap** interval (Efron, 1979, "Bootstrap methods: another
look at the jackknife"; Efron & Tibshirani, 1993, *An Introduction to the
Bootstrap*, ch. 13): draw ``resamples`` samples of size ``n`` with replacement
from the ``n`` values, take each one's mean, and report the ``(1 - c)/2`` and
``(1 + c)/2`` quantiles of those means. The draws come from a seeded
``numpy.random.Generator`` (PCG64), so an interval is the same every time.

With few seeds the interval is narrow (it cannot show spread the seeds did not
show) and with one seed it is the point itself; it says how much the mean moves
with the seeds drawn, not how the pipeline behaves on other tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "steps_to_target", "median_steps"]


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (NaN values left out).

    Returns ``(lo, hi)``; ``(x, x)`` for one value; ``(nan, nan)`` for none.

    Raises:
        ValueError: ``confidence`` not in (0, 1) or ``resamples`` < 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    xs = np.asarray([float(v) for v in values if not math.isnan(float(v))], dtype=np.float64)
    if xs.size == 0:
        return math.nan, math.nan
    if xs.size == 1:
        return float(xs[0]), float(xs[0])
    rng = np.random.Generator(np.random.PCG64(seed))
    means = xs[rng.integers(0, xs.size, size=(resamples, xs.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)


def steps_to_target(curve: Sequence[tuple[int, float]], target: float, higher_is_better: bool) -> int | None:
    """The first step at which ``curve`` (``(step, value)`` evaluations) reaches ``target``:
    ``value >= target`` when higher is better, ``value <= target`` otherwise. None if it never does
    (a NaN value never reaches anything). The answer is only as fine as the evaluations."""
    for step, value in sorted(curve):
        if not math.isnan(value) and (value >= target if higher_is_better else value <= target):
            return int(step)
    return None


def median_steps(per_seed: Sequence[int | None]) -> float | None:
    """The median over seeds of :func:`steps_to_target`, a seed that never reached the target
    counting as infinitely many steps; None when that median is not reached (more than half
    of the seeds, or half with an even count, never got there) or there are no seeds."""
    if not per_seed:
        return None
    xs = sorted(math.inf if s is None else float(s) for s in per_seed)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0
    return None if math.isinf(med) else med
