"""``topk``: keep the largest entries of each tensor (a sparsifying compressor)."""

from __future__ import annotations

import math

import torch

from .base import Param, TensorOp, register


@register
class TopK(TensorOp):
    r"""Top-k sparsification per tensor: keep the :math:`\lceil k\,d\rceil` entries of
    largest magnitude (at least one) of each tensor of :math:`d` entries, zero the rest.

    .. math::
        u_j = x_j\,[\,|x_j| \text{ is among the } \lceil k d\rceil \text{ largest}\,]

    ``k`` is a fraction of the entries, so one pipeline fits every tensor size
    (EControl and the error-feedback literature write Top-K with K = k d). Ties
    are broken by ``torch.topk``. A contractive compressor: :math:`\lVert C(x) -
    x\rVert^2 \le (1 - k)\lVert x\rVert^2`. Use it as the compressor of
    ``error_feedback``.

    Reference: A. F. Aji, K. Heafield, "Sparse Communication for Distributed
    Gradient Descent", EMNLP 2017; S. U. Stich et al., "Sparsified SGD with
    Memory", NeurIPS 2018.
    """

    name = "topk"
    summary = "keep the fraction k of entries with the largest magnitude per tensor"
    reference = "Aji & Heafield 2017; Stich et al. 2018"
    params = (Param("k", default=0.01, low=0.0, high=1.0, low_closed=False, doc="fraction of entries kept"),)

    def reduction(self, args):
        return "tensor"

    def identity(self, const_args):
        return const_args.get("k") == 1

    def update(self, x, state, a, lane):
        n = x.numel()
        if n == 0:
            return x.clone()
        keep = min(n, max(1, math.ceil(a.k * n - 1e-9)))
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), keep, sorted=False).indices
        out = torch.zeros_like(flat)
        out[idx] = flat[idx]
        return out.reshape(x.shape)
