"""Loss-curve figures for tracked runs, drawn with matplotlib's Agg renderer.

Figures are built from ``matplotlib.figure.Figure`` directly, never through
``pyplot``: no global figure registry, no GUI backend, nothing to close, and
figures can be drawn from several threads at once.

NaN and inf (a diverged run) never break a figure: non-finite values are
left out of the line (it stops where the run diverged, marked with an x) and
out of the min/max band.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_SIZE = (8.0, 5.0)


def _new_figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    return fig, ax


def _finish(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str, finite: list[np.ndarray],
            n_lines: int, legend_title: str | None = None, log_y: bool = True,
            legend_loc: str = "upper right") -> Figure:
    vals = np.concatenate(finite) if finite else np.empty(0)
    if log_y and vals.size and (vals > 0).all():
        ax.set_yscale("log")
    if not vals.size:
        ax.text(0.5, 0.5, "no finite values to plot", transform=ax.transAxes, ha="center", va="center",
                color="0.4")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.grid(True, which="major", alpha=0.35)
    if ax.get_yscale() == "log":
        ax.grid(True, which="minor", alpha=0.12)
    if n_lines:
        ax.legend(fontsize="small", loc=legend_loc, ncol=1 if n_lines <= 8 else 2, framealpha=0.85,
                  title=legend_title, title_fontsize="small")
    return fig


def loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], title: str, ylabel: str = "loss",
                *, xlabel: str = "step") -> Figure:
    """One line per run: ``curves[name] = [(step, value), ...]``.

    The y axis is logarithmic when every finite value is positive. A curve
    with a NaN/inf value stops at its last finite point (marked x) and its
    legend entry says where it diverged.
    """
    fig, ax = _new_figure()
    finite: list[np.ndarray] = []
    lines = 0
    for name, points in curves.items():
        pts = sorted((int(s), float(v)) for s, v in points)
        if not pts:
            continue
        steps = np.array([s for s, _ in pts], dtype=float)
        vals = np.array([v for _, v in pts], dtype=float)
        ok = np.isfinite(vals)
        label = str(name)
        if not ok.all():
            label += f" (diverged at step {int(steps[~ok][0])})"
        (line,) = ax.plot(steps, np.where(ok, vals, np.nan), label=label, lw=1.5,
                          marker="o" if len(pts) == 1 else None)
        lines += 1
        if not ok.all() and ok.any():
            first_bad = int(np.argmax(~ok))
            good_before = np.flatnonzero(ok[:first_bad])
            if good_before.size:
                i = good_before[-1]
                ax.plot([steps[i]], [vals[i]], marker="x", ms=9, mew=2, color=line.get_color())
        finite.append(vals[ok])
    return _finish(fig, ax, title, xlabel, ylabel, finite, lines)


def band_curves(groups: Mapping[str, list[Sequence[float]]], title: str, ylabel: str = "loss",
                *, xlabel: str = "step") -> Figure:
    """Every run's curve (thin), and per pipeline the mean over seeds (bold) with a min-max band.

    ``groups[pipeline] = [losses of seed 0, losses of seed 1, ...]``, each a
    per-step sequence (step 1 first). Seeds may have different lengths (a run
    that diverged early); at each step the mean, min and max are taken over
    the seeds with a finite value there.
    """
    fig, ax = _new_figure()
    finite: list[np.ndarray] = []
    lines = 0
    banded = False
    for name, runs in groups.items():
        runs = [np.asarray(r, dtype=float).ravel() for r in runs]
        n = max((len(r) for r in runs), default=0)
        if n == 0:
            continue
        arr = np.full((len(runs), n), np.nan)
        for i, r in enumerate(runs):
            arr[i, : len(r)] = r
        banded |= _band(ax, str(name), np.arange(1, n + 1), arr, [len(r) for r in runs])
        lines += 1
        finite.append(arr[np.isfinite(arr)])
    return _finish(fig, ax, title, xlabel, ylabel, finite, lines,
                   "bold: mean over seeds, thin: each run, band: min to max" if banded else None)


def _band(ax: Axes, name: str, x: np.ndarray, arr: np.ndarray, lengths: Sequence[int]) -> bool:
    """Draw one group: the mean over rows of ``arr`` (runs x points at ``x``, NaN where a run has
    no finite value) in bold, and with several runs the min-max band and each run's first
    ``lengths[i]`` points thin. Returns whether a band was drawn."""
    ok = np.isfinite(arr)
    count = ok.sum(axis=0)
    has = count > 0
    mean = np.where(has, np.where(ok, arr, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
    lo = np.where(has, np.where(ok, arr, np.inf).min(axis=0), np.nan)
    hi = np.where(has, np.where(ok, arr, -np.inf).max(axis=0), np.nan)
    runs = arr.shape[0]
    diverged = sum(1 for i, n in enumerate(lengths) if not np.isfinite(arr[i, :n]).all())
    label = f"{name} (mean of {runs} seed{'s' if runs != 1 else ''}"
    label += f", {diverged} diverged)" if diverged else ")"
    (line,) = ax.plot(x, mean, label=label, lw=1.6, marker="o" if len(x) == 1 else None)
    if runs < 2:
        return False
    ax.fill_between(x, lo, hi, where=has, alpha=0.15, color=line.get_color(), lw=0)
    for i, n in enumerate(lengths):  # each child run, so the parent's figure shows every curve
        ax.plot(x[:n], arr[i, :n], lw=0.6, alpha=0.55, color=line.get_color())
    return True


def eval_band_curves(groups: Mapping[str, list[Sequence[tuple[int, float]]]], title: str, ylabel: str,
                     *, target: float | None = None, log_y: bool = True) -> Figure:
    """:func:`band_curves` for evaluations: ``groups[pipeline] = [[(step, value), ...] per seed]``.

    Seeds are aligned on their evaluation steps (the union of the group's steps;
    a seed without a value at a step counts as missing there). ``target`` draws
    a dashed horizontal line; ``log_y=False`` keeps a linear y axis, with the legend at the
    lower right (accuracies, which rise).
    """
    fig, ax = _new_figure()
    finite: list[np.ndarray] = []
    lines = 0
    banded = False
    for name, runs in groups.items():
        steps = sorted({int(s) for r in runs for s, _ in r})
        if not steps:
            continue
        col = {s: j for j, s in enumerate(steps)}
        arr = np.full((len(runs), len(steps)), np.nan)
        lengths = []
        for i, r in enumerate(runs):
            for s, v in r:
                arr[i, col[int(s)]] = float(v)
            lengths.append(max((col[int(s)] + 1 for s, _ in r), default=0))
        banded |= _band(ax, str(name), np.asarray(steps, dtype=float), arr, lengths)
        lines += 1
        finite.append(arr[np.isfinite(arr)])
    if target is not None:
        ax.axhline(target, ls="--", lw=1.0, color="0.3", label=f"target {target:g}")
        lines += 1
    return _finish(fig, ax, title, "step", ylabel, finite, lines,
                   "bold: mean over seeds, thin: each run, band: min to max" if banded else None, log_y,
                   "upper right" if log_y else "lower right")


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (rendered with Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


__all__ = ["loss_curves", "band_curves", "eval_band_curves", "figure_png"]
