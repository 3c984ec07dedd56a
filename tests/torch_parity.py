"""Run a gradpipe pipeline beside a torch.optim optimizer on the same parameters and gradients.

One helper for the tests that hold the pipelines in ``pipelines/`` to torch.optim (torch
2.13): float64 parameters of a few shapes (a matrix, a vector, a scalar), the same seeded
gradients for both, ``steps`` steps, and the relative difference of the parameters at the
end. The torch optimizer and the pipeline get the same keyword arguments unless the row
says otherwise (gradpipe's pipelines use torch's hyperparameter names and defaults).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

import gradpipe

SHAPES = ((6, 5), (7,), ())


def parity_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def parity_grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Seeded gradients; every fifth step one gradient has exact zeros (``rprop``'s sign cases)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        if t % 5 == 4:
            gs[0].view(-1)[::3] = 0.0
        out.append(gs)
    return out


def run_pair(pipeline: str, torch_cls: Callable[..., torch.optim.Optimizer], kwargs: Mapping[str, Any],
             backend: str, steps: int = 50, gp_kwargs: Mapping[str, Any] | None = None):
    """``pipeline`` and ``torch_cls`` stepped ``steps`` times from the same start with the same
    gradients: (gradpipe's optimizer, torch's, gradpipe's parameters, torch's parameters).
    ``gp_kwargs``: gradpipe's keyword arguments where they differ from ``kwargs``."""
    ours, theirs = parity_params(), parity_params()
    opt = gradpipe.Optimizer(ours, pipeline, backend=backend, **dict(kwargs if gp_kwargs is None else gp_kwargs))
    ref = torch_cls(theirs, **kwargs)
    for gs in parity_grads(steps):
        for a, b, g in zip(ours, theirs, gs):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    return opt, ref, ours, theirs


def follow(pipeline: str, torch_cls: Callable[..., torch.optim.Optimizer], kwargs: Mapping[str, Any],
           backend: str, steps: int = 50, gp_kwargs: Mapping[str, Any] | None = None) -> float:
    """The largest relative difference, over every parameter element, between ``pipeline`` and
    ``torch_cls`` after ``steps`` steps from the same start with the same gradients.
    ``gp_kwargs``: gradpipe's keyword arguments where they differ from ``kwargs``."""
    _, _, ours, theirs = run_pair(pipeline, torch_cls, kwargs, backend, steps, gp_kwargs)
    worst = 0.0
    for a, b in zip(ours, theirs):
        scale = b.detach().abs().clamp_min(1e-3)
        worst = max(worst, float(((a.detach() - b.detach()).abs() / scale).max()))
    return worst
