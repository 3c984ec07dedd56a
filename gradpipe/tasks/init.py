"""PyTorch's default initialisation of a model's layers, drawn from an explicit generator.

Tasks build their layers with :func:`torch.nn.utils.skip_init` (nothing drawn
from the process-wide RNG) and then call :func:`reset_default` with a
:class:`torch.Generator` seeded from the run's seed, so a model is a function
of its seed alone and building one never disturbs another run's randomness.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import tag_seed

__all__ = ["reset_default", "seeded"]


def reset_default(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise every layer of ``model`` as its ``reset_parameters`` would, drawing from ``generator``.

    In ``model.modules()`` order: ``nn.Linear`` and ``nn.Conv*d`` weights
    ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and biases
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; ``nn.Embedding`` weights ``N(0, 1)``;
    ``nn.LayerNorm`` weights 1 and biases 0. Other layers are left alone.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=generator)
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    bound = 1.0 / math.sqrt(m.weight[0].numel())
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def seeded(model: nn.Module, seed: int, offset: int) -> nn.Module:
    """``model`` initialised by :func:`reset_default` from a generator seeded with ``seed + offset``
    (the offset keeps a task's initialisation independent of its other seeded draws), and
    marked with ``seed`` (:func:`~gradpipe.tasks.base.tag_seed`)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) + offset) % (2**63))
    reset_default(model, gen)
    return tag_seed(model, seed)
