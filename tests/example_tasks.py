"""User-style tasks for the task API and registry tests (imported as ``example_tasks:...``).

``LinearRegressionTask`` is a complete task written only against the public
:class:`gradpipe.tasks.Task` interface: least squares on seeded synthetic data.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradpipe.tasks import Task


class LinearRegressionTask(Task):
    """``y = x w* + 0.1 noise`` with ``x ~ N(0, I_dim)``; the model is ``Linear(dim, 1)``; MSE loss."""

    name = "linreg"
    metric = "val_loss"
    higher_is_better = False
    default_steps = 5
    loss_names = ("loss",)

    def __init__(self, dim: int = 4, batch_size: int = 16) -> None:
        self.dim = int(dim)
        self.batch_size = int(batch_size)
        gen = torch.Generator().manual_seed(1234)
        self.w = torch.randn(self.dim, 1, generator=gen)
        self.x_val = torch.randn(256, self.dim, generator=gen)
        self.y_val = self.x_val @ self.w

    def options(self) -> dict[str, Any]:
        return {"dim": self.dim, "batch_size": self.batch_size}

    def make_model(self, seed: int) -> nn.Module:
        model = nn.utils.skip_init(nn.Linear, self.dim, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, self.dim, generator=gen))
            model.bias.zero_()
        return model

    def batches(self, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            x = torch.randn(self.batch_size, self.dim, generator=gen)
            yield x, x @ self.w + 0.1 * torch.randn(self.batch_size, 1, generator=gen)

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.mse_loss(model(x), y)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(model(self.x_val), self.y_val))}


def make_linreg(dim: int = 3) -> LinearRegressionTask:
    """A factory function (``example_tasks:make_linreg``)."""
    return LinearRegressionTask(dim=dim)


#: A ready Task instance (``example_tasks:LINREG``).
LINREG = LinearRegressionTask(dim=2)


def not_a_task() -> str:
    return "hello"


def broken_factory() -> Task:
    raise RuntimeError("the dataset is missing")


class NotATask:
    pass


class NoName(LinearRegressionTask):
    name = ""
