"""Race gradpipe's optimizer pipelines on the ``digits`` task and print a table.

Every pipeline trains the same MLP from the same initial weights on the same
minibatches (see :mod:`gradpipe.tasks.digits`), so the rows differ only in the
optimizer. A reference row trained with :class:`torch.optim.SGD` shows that
gradpipe's ``sgd`` pipeline reproduces PyTorch's.

Run it with ``python -m gradpipe.demo [PIPELINE ...] [--steps N] [--seed S]``
or call :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import torch
from torch import nn

from .tasks.digits import TrainResult, train

__all__ = ["DEFAULT_PIPELINES", "LR", "DEFAULT_LR", "REFERENCE_LABEL", "DemoRow", "run_demo", "main"]

#: The pipelines raced when :func:`run_demo` is given none (builtin names).
DEFAULT_PIPELINES: tuple[str, ...] = (
    "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lion", "diffgrad", "scalpel",
)

#: Learning rate per pipeline. A pipeline given as a path is looked up by its
#: file stem (``pipelines/scalpel.grad`` -> ``scalpel``).
LR: dict[str, float] = {
    "sgd": 0.1,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adam": 1e-2,
    "adamw": 1e-2,
    "rmsprop": 1e-2,
    "lion": 1e-3,
    "diffgrad": 1e-2,
    "scalpel": 1e-3,
    "grams": 1e-2,
    "bloop_adam": 1e-2,
    "pcgrad_adam": 1e-2,
    "gcond": 1e-2,
    "samgs_adam": 1e-2,
    "galore_adamw": 1e-2,
    "coap_adamw": 1e-2,
    "natural_galore_adamw": 0.05,
    "gwt_adam": 1e-2,
    "sgg_adamw": 1e-2,
    "noisy_sgd": 0.1,
    "dp_sgd": 1.0,
    "econtrol_sgd": 0.1,
    "aegd": 0.1,
    "gravity": 0.1,
}
#: Learning rate for a pipeline not in :data:`LR`.
DEFAULT_LR = 1e-2

#: Label of the :class:`torch.optim.SGD` row.
REFERENCE_LABEL = "torch.optim.SGD (reference)"
_REFERENCE_LR = 0.1
_MAX_REASON = 160


@dataclass
class DemoRow:
    """One line of the demo table.

    Attributes:
        pipeline: the pipeline name or path as given (or :data:`REFERENCE_LABEL`).
        lr: the learning rate it was run with.
        result: the training result, or None if the run failed.
        error: a one-line reason for a failed run, else None.
    """

    pipeline: str
    lr: float
    result: TrainResult | None = field(default=None, repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the run finished."""
        return self.error is None

    @property
    def initial_loss(self) -> float:
        return self.result.initial_loss if self.result else math.nan

    @property
    def final_loss(self) -> float:
        return self.result.final_loss if self.result else math.nan

    @property
    def val_accuracy(self) -> float:
        return self.result.val_accuracy if self.result else math.nan

    @property
    def seconds(self) -> float:
        return self.result.seconds if self.result else math.nan


def lr_for(pipeline: str) -> float:
    """The demo's learning rate for ``pipeline`` (a builtin name or a ``.grad`` path)."""
    if pipeline in LR:
        return LR[pipeline]
    stem = pathlib.PurePath(pipeline).stem if pipeline.endswith(".grad") else pipeline
    return LR.get(stem, DEFAULT_LR)


def _one_line(exc: BaseException) -> str:
    """A single-line description of ``exc``, no traceback.

    A :class:`~gradpipe.GradError` renders as ``path:line:col: error: message``
    (its first line); anything else as ``TypeName: message``.
    """
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    diagnostics = getattr(exc, "diagnostics", None)
    if isinstance(exc, ValueError) and diagnostics is not None and hasattr(exc, "span"):
        reason = first or type(exc).__name__
        if len(diagnostics) > 1:
            reason += f" (+{len(diagnostics) - 1} more)"
    else:
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON - 3] + "..."
    return reason


def _run_row(label: str, lr: float, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
             steps: int, seed: int) -> DemoRow:
    try:
        result = train(make_optimizer, steps=steps, seed=seed)
    except Exception as exc:  # noqa: BLE001 - a broken pipeline must not stop the demo
        return DemoRow(label, lr, None, _one_line(exc))
    return DemoRow(label, lr, result, None)


def _format_table(rows: Sequence[DemoRow]) -> list[str]:
    width = max([len("pipeline"), *(len(r.pipeline) for r in rows)])
    head = (f"{'pipeline':<{width}}  {'lr':>8}  {'initial loss':>12}  {'final loss':>10}  "
            f"{'val acc':>7}  {'seconds':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r.pipeline:<{width}}  {r.lr:>8.3g}"
        if r.ok:
            lines.append(f"{left}  {r.initial_loss:>12.4f}  {r.final_loss:>10.4f}  "
                         f"{r.val_accuracy:>7.1%}  {r.seconds:>7.3f}")
        else:
            lines.append(f"{left}  FAILED: {r.error}")
    return lines


def _sgd_comparison(rows: Sequence[DemoRow]) -> str | None:
    """A line comparing gradpipe's ``sgd`` row with the torch reference, if both ran."""
    ours = next((r for r in rows if r.pipeline == "sgd" and r.ok), None)
    ref = next((r for r in rows if r.pipeline == REFERENCE_LABEL and r.ok), None)
    if ours is None or ref is None or ours.lr != ref.lr:
        return None
    a, b = ours.result.losses, ref.result.losses  # type: ignore[union-attr]
    if a == b:
        return f"gradpipe sgd and torch.optim.SGD gave identical losses at every one of {len(a)} steps."
    diff = max(abs(x - y) for x, y in zip(a, b))
    return (f"gradpipe sgd vs torch.optim.SGD: largest per-step loss difference {diff:.3g} "
            f"over {len(a)} steps.")


def run_demo(
    pipelines: Sequence[str] | None = None,
    steps: int = 200,
    seed: int = 0,
    out: TextIO | None = None,
    *,
    reference: bool = True,
) -> list[DemoRow]:
    """Train the ``digits`` MLP with each pipeline and print a comparison table.

    Each pipeline is built as ``gradpipe.Optimizer(model.named_parameters(),
    name, lr=lr_for(name), backend="eager")`` (the reference interpreter: on a
    5K-parameter MLP a compiled step saves nothing and compiling costs seconds per
    pipeline) and trained with :func:`gradpipe.tasks.digits.train`
    for ``steps`` steps at ``seed``. A pipeline that fails (a
    :class:`~gradpipe.GradError` or any other exception, while building or
    training) is shown as a ``FAILED`` row with a one-line reason and the rest
    still run.

    Args:
        pipelines: builtin pipeline names or ``.grad`` paths; None means
            :data:`DEFAULT_PIPELINES`.
        steps: optimizer steps per run.
        seed: seed for the data split, initial weights and minibatch order.
        out: where to print (default: ``sys.stdout`` at call time).
        reference: also run :class:`torch.optim.SGD` at lr 0.1, placed right
            after the ``sgd`` row (or last if there is none).

    Returns:
        The rows in table order.
    """
    if out is None:
        out = sys.stdout
    names = list(DEFAULT_PIPELINES if pipelines is None else pipelines)

    print(f"gradpipe demo: each optimizer trains a 64-64-10 MLP on scikit-learn's digits for "
          f"{steps} steps (batch 128, seed {seed}) from the same weights on the same batches.",
          file=out)

    gradpipe = None
    import_error: str | None = None
    if names:
        try:
            import gradpipe  # lazily: the demo module must import without the compiler
            getattr(gradpipe, "Optimizer")
        except Exception as exc:  # noqa: BLE001
            import_error = f"cannot use gradpipe.Optimizer: {_one_line(exc)}"

    def reference_row() -> DemoRow:
        return _run_row(REFERENCE_LABEL, _REFERENCE_LR,
                        lambda m: torch.optim.SGD(m.parameters(), lr=_REFERENCE_LR), steps, seed)

    rows: list[DemoRow] = []
    for name in names:
        lr = lr_for(name)
        if import_error is not None:
            rows.append(DemoRow(name, lr, None, import_error))
        else:
            def make(model: nn.Module, _name: str = name, _lr: float = lr) -> torch.optim.Optimizer:
                return gradpipe.Optimizer(model.named_parameters(), _name, lr=_lr,  # type: ignore[union-attr]
                                          backend="eager")

            rows.append(_run_row(name, lr, make, steps, seed))
        if reference and name == "sgd" and not any(r.pipeline == REFERENCE_LABEL for r in rows):
            rows.append(reference_row())
    if reference and not any(r.pipeline == REFERENCE_LABEL for r in rows):
        rows.append(reference_row())

    for line in _format_table(rows):
        print(line, file=out)
    note = _sgd_comparison(rows)
    if note:
        print(note, file=out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 1 if any pipeline failed."""
    parser = argparse.ArgumentParser(prog="python -m gradpipe.demo", description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="*", help="builtin names or .grad paths (default: all builtins)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the torch.optim.SGD row")
    args = parser.parse_args(argv)
    rows = run_demo(args.pipelines or None, steps=args.steps, seed=args.seed,
                    reference=not args.no_reference)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
