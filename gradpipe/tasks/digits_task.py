"""The ``digits`` and ``digits-multitask`` tasks as :class:`~gradpipe.tasks.base.Task` objects.

They wrap the data, model and batch order of :mod:`gradpipe.tasks.digits` and
:mod:`gradpipe.tasks.digits_multitask` unchanged, so
``run_task(DigitsTask(), make_opt, steps=n, seed=s).losses`` is bit for bit
``digits.train(make_opt, steps=n, seed=s).losses`` (same split, same initial
weights, same minibatches, same step).

The train/validation split depends on the seed (as in ``digits.train``), so
:meth:`make_model` records the seed on the model (attribute
``_gradpipe_seed``) and :meth:`evaluate` scores it on that seed's validation
images; a model that was not built by :meth:`make_model` is evaluated on the
split of seed 0.

Both take the ``holdout`` option (:mod:`gradpipe.tasks.options`): ``"val"``
(the default) is the above; ``"tune"`` trains on 1149 of the seed's 1437
training images and evaluates on the other 288 (a stratified, seeded fifth,
:func:`~gradpipe.tasks.digits.load_digits_holdout`), with the same metric
names, never reading the validation images. The split is re-drawn per seed,
so a tuning seed's training split holds other seeds' validation images: the
option ``reserve`` (seeds, with ``holdout="tune"`` only) drops the validation
images of those seeds from both parts first (``gradpipe compare --tune``
passes the reporting seeds).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, TaskError, model_seed, tag_seed
from .digits import load_digits_holdout, make_mlp, minibatches
from .digits_multitask import aux_labels, make_multitask_model
from .options import float_option, holdout_option, int_option, reserve_option

__all__ = ["DigitsTask", "DigitsMultitaskTask"]

def _load(task: Task, seed: int):
    """:func:`load_digits_holdout` for the task's ``holdout`` and ``reserve`` options (one-line TaskError)."""
    try:
        return load_digits_holdout(seed, task.holdout, task.reserve)
    except ValueError as e:
        raise TaskError(f"task {task.name!r}: {e}") from None


def _minibatches(task: str, n_train: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    if batch_size > n_train:
        raise TaskError(f"task {task!r}: option batch_size must be at most {n_train}, got {batch_size}")
    return minibatches(n_train, batch_size, steps, seed)


class DigitsTask(Task):
    """scikit-learn's 8x8 digits, ``Linear(64, hidden) -> Tanh -> Linear(hidden, 10)``, cross-entropy.

    The data, model and batch order are :mod:`gradpipe.tasks.digits`'s
    (:func:`~gradpipe.tasks.digits.load_digits_split`,
    :func:`~gradpipe.tasks.digits.make_mlp`,
    :func:`~gradpipe.tasks.digits.minibatches`). A batch is ``(x, y)`` with
    ``x`` of shape ``(batch_size, 64)``; the loss is
    ``L = CE(model(x), y)``. Metrics: ``val_accuracy`` (the headline) and
    ``val_loss`` on the 360 held-out images.

    Options:
        batch_size: minibatch size, 1 to 1437 (default 128, as ``digits.train``).
        hidden: width of the hidden layer (default 64).
        holdout: ``"val"`` or ``"tune"`` (see the module docstring).
        reserve: seeds whose validation images ``"tune"`` leaves out (default none; see the module docstring).
    """

    name = "digits"
    metric = "val_accuracy"
    higher_is_better = True
    default_steps = 200
    loss_names = ("loss",)

    def __init__(self, batch_size: int = 128, hidden: int = 64, holdout: str = "val",
                 reserve: tuple[int, ...] = ()) -> None:
        self.batch_size = int_option(self.name, "batch_size", batch_size)
        self.hidden = int_option(self.name, "hidden", hidden)
        self.holdout = holdout_option(self.name, holdout)
        self.reserve = reserve_option(self.name, reserve, self.holdout)

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "hidden": self.hidden, "holdout": self.holdout,
                "reserve": self.reserve}

    def make_model(self, seed: int) -> nn.Module:
        model = make_mlp(seed, hidden=self.hidden)
        return tag_seed(model, seed)

    def batches(self, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = _load(self, seed)
        order = _minibatches(self.name, data.x_train.shape[0], self.batch_size, steps, seed)
        x, y = data.x_train, data.y_train
        return ((x.index_select(0, idx), y.index_select(0, idx)) for idx in order)

    def losses(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        data = _load(self, model_seed(model))
        with torch.no_grad():
            logits = model(data.x_val)
            return {"val_loss": float(F.cross_entropy(logits, data.y_val)),
                    "val_accuracy": float((logits.argmax(dim=1) == data.y_val).to(torch.float64).mean())}

    def sample_grads(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ..runtime.per_sample import per_sample_grads

        x, y = batch
        return per_sample_grads(model, F.cross_entropy, x, y)


class DigitsMultitaskTask(Task):
    """The digits with a shared trunk and two heads: the digit (``main``) and its parity (``aux``).

    Model, data and batch order are :mod:`gradpipe.tasks.digits_multitask`'s.
    A batch is ``(x, y, y mod 2)``; the named losses are
    ``main = CE(main_logits, y)`` and ``aux = aux_weight * CE(aux_logits, y mod 2)``
    (the weight is applied inside the ``aux`` loss, as ``train_multitask``
    steps it), so pipelines reading ``grads.main`` and ``grads.aux`` get the
    two gradients and any other optimizer minimises ``main + aux``. Metrics:
    ``val_accuracy`` (digit, the headline), ``val_loss`` (digit cross-entropy),
    ``val_aux_accuracy`` and ``val_aux_loss`` (parity, unweighted).

    Options:
        batch_size: minibatch size, 1 to 1437 (default 64, as ``train_multitask``).
        hidden: width of the shared hidden layer (default 64).
        aux_weight: weight of the parity loss, finite and at least 0 (default 1).
        holdout: ``"val"`` or ``"tune"`` (see the module docstring).
        reserve: seeds whose validation images ``"tune"`` leaves out (default none; see the module docstring).
    """

    name = "digits-multitask"
    metric = "val_accuracy"
    higher_is_better = True
    default_steps = 200
    loss_names = ("main", "aux")

    def __init__(self, batch_size: int = 64, hidden: int = 64, aux_weight: float = 1.0,
                 holdout: str = "val", reserve: tuple[int, ...] = ()) -> None:
        self.batch_size = int_option(self.name, "batch_size", batch_size)
        self.hidden = int_option(self.name, "hidden", hidden)
        self.aux_weight = float_option(self.name, "aux_weight", aux_weight)
        self.holdout = holdout_option(self.name, holdout)
        self.reserve = reserve_option(self.name, reserve, self.holdout)

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "hidden": self.hidden, "aux_weight": self.aux_weight,
                "holdout": self.holdout, "reserve": self.reserve}

    def make_model(self, seed: int) -> nn.Module:
        model = make_multitask_model(seed, hidden=self.hidden)
        return tag_seed(model, seed)

    def batches(self, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        data = _load(self, seed)
        order = _minibatches(self.name, data.x_train.shape[0], self.batch_size, steps, seed)
        x, y = data.x_train, data.y_train
        a = aux_labels(y)
        return ((x.index_select(0, idx), y.index_select(0, idx), a.index_select(0, idx)) for idx in order)

    def losses(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y, a = batch
        main_logits, aux_logits = model(x)
        return {"main": F.cross_entropy(main_logits, y),
                "aux": self.aux_weight * F.cross_entropy(aux_logits, a)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        data = _load(self, model_seed(model))
        a_val = aux_labels(data.y_val)
        with torch.no_grad():
            main_logits, aux_logits = model(data.x_val)
            return {
                "val_loss": float(F.cross_entropy(main_logits, data.y_val)),
                "val_accuracy": float((main_logits.argmax(dim=1) == data.y_val).to(torch.float64).mean()),
                "val_aux_loss": float(F.cross_entropy(aux_logits, a_val)),
                "val_aux_accuracy": float((aux_logits.argmax(dim=1) == a_val).to(torch.float64).mean()),
            }

    def sample_grads(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Per-example gradients of ``main + aux`` (the summed loss)."""
        from ..runtime.per_sample import per_sample_grads

        x, y, a = batch
        w = self.aux_weight

        def loss_fn(out: tuple[torch.Tensor, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out[0], t[:, 0]) + w * F.cross_entropy(out[1], t[:, 1])

        return per_sample_grads(model, loss_fn, x, torch.stack([y, a], dim=1))
