"""What one training run is, and the values the command line gives it.

A :class:`RunSpec` names everything that decides a run's numbers: the
pipeline, the task, the seed, the step count, the backend and the
hyperparameters. Two runs with equal specs give bitwise-equal losses on the
same machine (tasks are seeded; see :mod:`gradpipe.tasks`), which is what lets
a retried run skip the steps it already logged.

``--set k=v`` and ``--grid k=v1,v2`` values are Python literals
(``1e-3``, ``(0.9, 0.99)``, ``True``), read with :func:`ast.literal_eval`;
nothing in them is executed.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["RunSpec", "SpecError", "parse_value", "parse_sets", "parse_grid", "grid_points",
           "pipeline_label", "hyperparam_params"]


class SpecError(ValueError):
    """A malformed ``--set``/``--grid`` value or an impossible run request (one line)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``pipeline`` x ``task`` x ``seed`` x ``hyperparams``.

    Attributes:
        pipeline: a built-in pipeline name (``"adam"``) or a ``.grad`` path.
        task: a task name or ``"package.module:factory"`` (see :func:`gradpipe.tasks.get_task`).
        seed: seeds the task's data split, initial weights and batch order.
        steps: optimizer steps; ``None`` takes the task's default.
        hyperparams: values for the pipeline's declared hyperparameters.
        backend: ``"eager"`` or ``"compiled"`` (see :class:`gradpipe.Optimizer`).
        task_options: keyword options for the task (e.g. ``batch_size``).
        eval_every: evaluate every this many steps (``None``: the task's default).
        threads: torch's intra-op threads for the run (``torch.set_num_threads``).
            The last bits of a matmul depend on it, so it is part of the run;
            the default 1 suits the small tasks, which run side by side instead.
    """

    pipeline: str
    task: str = "digits"
    seed: int = 0
    steps: int | None = None
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "eager"
    task_options: Mapping[str, Any] = field(default_factory=dict)
    eval_every: int | None = None
    threads: int = 1

    @property
    def label(self) -> str:
        """``pipeline`` plus the hyperparameters that differ from the defaults: ``adam lr=0.01``."""
        hp = " ".join(f"{k}={_short(v)}" for k, v in sorted(self.hyperparams.items()))
        return f"{pipeline_label(self.pipeline)}{' ' + hp if hp else ''}"

    @property
    def run_name(self) -> str:
        """The MLflow run name: the label and the seed."""
        return f"{self.label} seed={self.seed}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the ``run_spec.json`` artifact a resumed run is rebuilt from)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunSpec":
        """The inverse of :meth:`to_json` (JSON lists of hyperparameters become tuples again)."""
        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(pipeline=str(d["pipeline"]), task=str(d["task"]), seed=int(d["seed"]),
                   steps=None if d.get("steps") is None else int(d["steps"]),
                   hyperparams={k: tup(v) for k, v in dict(d.get("hyperparams") or {}).items()},
                   backend=str(d.get("backend", "eager")),
                   task_options=dict(d.get("task_options") or {}),
                   eval_every=None if d.get("eval_every") is None else int(d["eval_every"]),
                   threads=int(d.get("threads", 1)))

    @property
    def key(self) -> str:
        """A stable hash of everything that decides the run's numbers (a retry has the same key)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def pipeline_label(pipeline: str) -> str:
    """The short name of a pipeline reference: the file stem of a path, else the name itself."""
    p = pathlib.PurePath(pipeline)
    return p.stem if p.suffix == ".grad" else pipeline


def parse_value(text: str) -> Any:
    """A ``--set`` value: a Python literal (number, tuple, bool, None) or, failing that, the text itself."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _split_pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise SpecError(f"{flag} expects NAME=VALUE, got {item!r}")
    if not key.isidentifier():
        raise SpecError(f"{flag}: {key!r} is not a hyperparameter name")
    return key, value


def parse_sets(items: Iterable[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``["lr=1e-3", "betas=(0.9, 0.99)"]`` -> ``{"lr": 0.001, "betas": (0.9, 0.99)}``
    (``flag`` names the option in error messages)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, value = _split_pair(item, flag)
        if key in out:
            raise SpecError(f"{flag} {key} given twice")
        out[key] = parse_value(value)
    return out


def _top_level_split(text: str) -> list[str]:
    """Split on commas outside brackets: ``"(0.9,0.99),(0.8,0.9)"`` -> two tuples."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def parse_grid(items: Iterable[str] | None) -> dict[str, list[Any]]:
    """``["lr=1e-3,1e-2"]`` -> ``{"lr": [0.001, 0.01]}`` (commas inside brackets don't split)."""
    out: dict[str, list[Any]] = {}
    for item in items or ():
        key, value = _split_pair(item, "--grid")
        if key in out:
            raise SpecError(f"--grid {key} given twice")
        values = [parse_value(v) for v in _top_level_split(value)]
        if not values:
            raise SpecError(f"--grid {key} has no values")
        out[key] = values
    return out


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order (``[{}]`` for an empty grid)."""
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def hyperparam_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Hyperparameters as MLflow params: tuples flattened to ``betas.0``, ``betas.1`` so each is a column."""
    out: dict[str, str] = {}
    for k, v in values.items():
        if isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                out[f"{k}.{i}"] = str(x)
        else:
            out[k] = str(v)
    return out
