"""Per-example gradients with ``torch.func``, for the ``samples`` source (DP-SGD)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["per_sample_grads"]


def per_sample_grads(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One gradient per example: ``{name: (B, *param.shape)}`` for every parameter that requires grad.

    ``loss_fn(outputs, targets)`` is the loss of a batch (e.g. ``F.cross_entropy``);
    it is evaluated on batches of one example, vectorised with ``torch.func.vmap``
    over ``torch.func.grad``, so the model runs in ``B`` independent copies (no
    batch statistics: a model with batch norm in training mode mixes examples
    and has no per-example gradient). Pass the result to
    ``opt.step(samples=...)``.

    Example::

        grads = gradpipe.per_sample_grads(model, F.cross_entropy, x, y)
        opt.step(samples=grads)
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**ps, **frozen}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    with torch.enable_grad():
        grads = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    return {n: grads[n] for n in names}
