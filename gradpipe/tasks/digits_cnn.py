"""The ``digits-cnn`` task: a small convolutional net on the 8x8 digits images.

**Problem.** Classify scikit-learn's bundled 8x8 greyscale digits (1797
images, nothing downloaded) with the ``digits`` task's seeded, stratified
split (1437 training and 360 validation images) and minibatch order. Unlike
the ``digits`` MLP, the model sees the images as images: weight sharing across
positions and 4-d convolution filters, the parameter shapes that
curvature-aware and matrix optimizers (Shampoo, SOAP, Muon) treat differently
from vectors (Muon's pipeline, for one, routes only 2-d parameters: here the
classifier; the filters need another route).

**Model** (a LeNet-style net, Y. LeCun, L. Bottou, Y. Bengio and P. Haffner,
"Gradient-based learning applied to document recognition", Proc. IEEE 1998,
scaled down to 8x8 inputs)::

    x (B, 64) -> (B, 1, 8, 8) -> Conv 3x3 (1 -> c, pad 1) -> ReLU
              -> Conv 3x3 (c -> 2c, pad 1) -> ReLU -> MaxPool 2x2 -> (B, 2c, 4, 4)
              -> flatten -> Linear(32 c, 10)

With the default ``channels`` c = 16 it has 9,930 parameters (``conv1.weight``
(16, 1, 3, 3), ``conv1.bias``, ``conv2.weight`` (32, 16, 3, 3), ``conv2.bias``,
``head.weight`` (10, 512), ``head.bias``), initialised as PyTorch initialises
``nn.Conv2d`` and ``nn.Linear``, from a generator seeded by the run's seed.

**Training and metrics.** Cross-entropy on minibatches of 128 for 200 steps
by default; ``val_accuracy`` (the headline, higher is better) and
``val_loss`` on the validation images. The model takes the same flattened
``(B, 64)`` batches as ``digits``, so the data, the ``holdout`` option
(``"tune"`` trains on 1149 training images and evaluates on the other 288), the
``reserve`` option (the validation images of those seeds left out of both) and
the per-example gradients for DP pipelines are :class:`DigitsTask`'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .digits import NUM_CLASSES
from .digits_task import DigitsTask
from .init import seeded
from .options import holdout_option, int_option, reserve_option

__all__ = ["DigitsCNN", "DigitsCNNTask"]

_INIT_SEED_OFFSET = 0xC0DE_0C44


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a linear classifier (see the module docstring).

    ``forward(x)`` maps ``(B, 64)`` flattened 8x8 images (or ``(B, 1, 8, 8)``) to ``(B, 10)`` logits.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        # skip_init: no draws from the global RNG; make_model initialises from a generator
        self.conv1 = nn.utils.skip_init(nn.Conv2d, 1, channels, 3, padding=1)
        self.conv2 = nn.utils.skip_init(nn.Conv2d, channels, 2 * channels, 3, padding=1)
        self.head = nn.utils.skip_init(nn.Linear, 2 * channels * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.head(h.flatten(start_dim=1))


class DigitsCNNTask(DigitsTask):
    """The digits with :class:`DigitsCNN` (see the module docstring).

    Options:
        batch_size: minibatch size, 1 to 1437 (default 128).
        channels: filters of the first convolution; the second has twice as many (default 16).
        holdout: ``"val"`` or ``"tune"`` (:mod:`gradpipe.tasks.options`).
        reserve: seeds whose validation images ``"tune"`` leaves out (:mod:`gradpipe.tasks.digits_task`).
    """

    name = "digits-cnn"  # metric val_accuracy, 200 steps, one loss: DigitsTask's

    def __init__(self, batch_size: int = 128, channels: int = 16, holdout: str = "val",
                 reserve: tuple[int, ...] = ()) -> None:
        self.batch_size = int_option(self.name, "batch_size", batch_size)
        self.channels = int_option(self.name, "channels", channels)
        self.holdout = holdout_option(self.name, holdout)
        self.reserve = reserve_option(self.name, reserve, self.holdout)

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "channels": self.channels, "holdout": self.holdout,
                "reserve": self.reserve}

    def make_model(self, seed: int) -> nn.Module:
        return seeded(DigitsCNN(self.channels), seed, _INIT_SEED_OFFSET)
