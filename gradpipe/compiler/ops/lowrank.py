"""Shared machinery of the low-rank wrappers (``galore``, ``coap``): a matrix view of a
tensor, the side to project on, and projecting to and from the rank-r space."""

from __future__ import annotations

import torch

__all__ = ["as_matrix", "projects", "right_side", "to_low", "from_low", "low_shape", "projector_shape"]


def projects(x: torch.Tensor) -> bool:
    """Tensors with fewer than two dimensions bypass the projection (GaLore's rule)."""
    return x.dim() >= 2


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view: a matrix as is, a conv kernel ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def right_side(m: int, n: int) -> bool:
    """GaLore's choice: project on the right (``R = G Qᵀ``, ``Q`` r×n) when ``m >= n``,
    else on the left (``R = Pᵀ G``, ``P`` m×r); the projected side is the smaller one."""
    return m >= n


def to_low(g: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``G Qᵀ`` (m×r) for a right projector ``Q`` (r×n), ``Pᵀ G`` (r×n) for a left one ``P`` (m×r)."""
    m, n = g.shape
    return g @ proj.t() if right_side(m, n) else proj.t() @ g


def from_low(low: torch.Tensor, proj: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The inverse map: ``N Q`` or ``P N`` (m×n)."""
    return low @ proj if right_side(m, n) else proj @ low


def low_shape(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape the inner pipeline sees for a parameter of ``shape``."""
    if len(shape) < 2:
        return shape
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    r = min(rank, m, n)
    return (m, r) if right_side(m, n) else (r, n)


def projector_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """The projector's shape for a parameter of ``shape``: r×n (right) or m×r (left); None
    for a tensor with fewer than two dimensions (it bypasses the projection)."""
    if len(shape) < 2:
        return None
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    r = min(rank, m, n)
    return (r, n) if right_side(m, n) else (m, r)
