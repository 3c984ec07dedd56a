"""Seeded float64 parameters and gradients for the matrix optimizers' parity tests
(tests/test_muon.py, tests/test_shampoo.py, tests/test_soap.py), and running them."""

from __future__ import annotations

import io
from typing import Callable, Sequence

import torch

Shapes = Sequence[tuple[int, ...]]


def start(shapes: Shapes, seed: int = 0) -> list[torch.Tensor]:
    """The parameters' starting values (plain tensors: wrap them in Parameters per optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def grads(shapes: Shapes, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def run(ps: Sequence[torch.Tensor], opt: torch.optim.Optimizer, steps: Sequence[Sequence[torch.Tensor]]) -> None:
    """Step ``opt`` once per entry of ``steps``, with those gradients."""
    for gs in steps:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


def both_after(shapes: Shapes, steps: int,
               ours: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
               theirs: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> float:
    """Two optimizers, each on its own parameters from :func:`start`, stepped through the same
    ``steps`` gradients from :func:`grads`: the :func:`worst` difference of their parameters."""
    mine, ref = ([torch.nn.Parameter(x) for x in start(shapes)] for _ in range(2))
    gs = grads(shapes, steps)
    run(mine, ours(mine), gs)
    run(ref, theirs(ref), gs)
    return worst(mine, ref)


def worst(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> float:
    """The largest relative difference (against max(|theirs|, 1e-3)) over every element."""
    return max(float(((a.detach() - b.detach()).abs() / b.detach().abs().clamp_min(1e-3)).max())
               for a, b in zip(ours, theirs))


def replay_from_checkpoint(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                           ps: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer,
                           rest: Sequence[Sequence[torch.Tensor]]) -> list[torch.nn.Parameter]:
    """Checkpoint ``opt`` (its state dict through ``torch.save`` and ``torch.load(weights_only=True)``)
    and the parameters ``ps``, step ``opt`` on through ``rest``, then step a fresh optimizer from
    ``make``, loaded from the checkpoint, through ``rest`` from the saved parameters: its parameters,
    to compare with ``ps`` (a bitwise resume gives equal tensors)."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    run(ps, opt, rest)
    again = make(saved)
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    run(saved, again, rest)
    return saved
