"""``newton_schulz``: orthogonalise each matrix by a quintic Newton-Schulz iteration (Muon)."""

from __future__ import annotations

from typing import Any

import torch

from .base import NodeCtx, Op, Param, register
from .lowrank import as_matrix

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(g: torch.Tensor, steps: int, a: float, b: float, c: float, eps: float,
                  dtype: torch.dtype | None) -> torch.Tensor:
    """``k`` quintic Newton-Schulz iterations on ``g`` (a matrix, or a batch of matrices of one
    shape, ``(B, m, n)``), in ``dtype`` (None: ``g``'s), as ``torch.optim.Muon`` computes them:
    the wide orientation, ``X_0 = G / max(||G||_F, eps)``, then
    ``A = X Xᵀ``, ``X <- a X + (b A + c A²) X``. Returns the result in ``dtype``."""
    x = g.to(dtype) if dtype is not None else g
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:  # torch.optim.Muon's calls, so that a matrix gets its numbers bit for bit
        x = x.div(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:  # matrices of one shape, batched: one call per product for all of them
        norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        x = x.div(norms.clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


@register
class NewtonSchulz(Op):
    r"""The orthogonalisation of each matrix, by Newton-Schulz iteration (Muon).

    For a matrix :math:`G` (a tensor of more than two dimensions viewed as
    ``(shape[0], -1)``), transposed to be wide (:math:`m \le n`) and in ``precision``:

    .. math::
        X_0 = \frac{G}{\max(\lVert G\rVert_F, \epsilon)},\qquad
        A_k = X_k X_k^\top,\qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2)\,X_k

    and the value is :math:`X_{\text{steps}}` (transposed back), cast to the compute dtype.
    With Muon's coefficients :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`, five steps
    map every singular value of :math:`G` to roughly :math:`[0.7, 1.2]`: about
    :math:`U V^\top` for :math:`G = U S V^\top`, the orthogonal matrix nearest to
    :math:`G`, without an SVD. The iteration runs in bfloat16 by default, as the
    reference and ``torch.optim.Muon`` run it (``precision=float32`` or ``input`` for more
    digits). With ``batch=shape`` (the default) matrices of one shape, dtype and arguments
    are stacked and iterated with one batched product per multiplication (as heavyball
    does: 1.9x faster for four 768×768 matrices on a 2-core CPU, 5x for 48 of 64×64);
    ``baddbmm`` rounds its bfloat16 result differently from ``addmm`` now and then, so
    ``batch=none`` takes exactly ``torch.optim.Muon``'s calls, one matrix at a time, and
    ``pipelines/muon.grad`` (which follows torch bit for bit) uses it.

    A primitive rather than a definition in the language: ``steps`` is a hyperparameter
    (the language has no loops), and the reference's ``addmm`` sequence in bfloat16 is
    what its numbers are.

    Reference: K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein,
    "Muon: An optimizer for hidden layers in neural networks" (2024),
    https://kellerjordan.github.io/posts/muon/ (KellerJordan/Muon ``muon.py``);
    ``torch.optim.Muon`` (torch 2.9+).
    """

    name = "newton_schulz"
    summary = "each matrix orthogonalised (~U Vᵀ) by quintic Newton-Schulz steps, as Muon (bfloat16 by default)"
    reference = "Jordan et al. 2024 (Muon, KellerJordan/Muon); torch.optim.Muon"
    params = (
        Param("steps", default=5, low=0, high=100, high_closed=False, doc="number of iterations (a whole number)"),
        Param("a", default=3.4445, doc="coefficient of X"),
        Param("b", default=-4.7750, doc="coefficient of A X"),
        Param("c", default=2.0315, doc="coefficient of A² X"),
        Param("eps", default=1e-7, low=0.0, low_closed=False, doc="floor of the Frobenius norm G is divided by"),
        Param("precision", kind="choice", default="bfloat16", choices=("bfloat16", "float32", "input"),
              doc="the dtype of the iteration (input: the compute dtype)"),
        Param("batch", kind="choice", default="shape", choices=("shape", "none"),
              doc="shape: matrices of one shape iterate together (batched products); none: one at a time, "
                  "torch.optim.Muon's calls"),
    )
    validates = ("steps",)
    matrix = True

    def validate(self, args):
        if float(args["steps"]) != int(args["steps"]):
            return (f"newton_schulz needs a whole number of steps, got {args['steps']:g}", "write e.g. steps=5")
        return None

    def reduction(self, args):
        return "tensor"  # a matrix at a time

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        mats = [as_matrix(x) for x in ctx.x]  # every input has 2 or more dimensions (eval_node checks)
        groups: dict[tuple, list[int]] = {}
        for i, (m, a) in enumerate(zip(mats, ctx.args)):
            key = (tuple(m.shape), m.dtype, m.device, *(_num(a.get(k)) for k in ("steps", "a", "b", "c", "eps")),
                   a.get("precision"), i if a.get("batch") == "none" else -1)
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(ctx.x)
        for idxs in groups.values():
            a = ctx.args[idxs[0]]
            g = mats[idxs[0]] if len(idxs) == 1 else torch.stack([mats[i] for i in idxs])
            o = newton_schulz(g, int(_num(a.steps)), _num(a.a), _num(a.b), _num(a.c), _num(a.eps),
                              _DTYPES.get(a.precision))
            for k, i in enumerate(idxs):
                x = ctx.x[i]
                out[i] = (o if len(idxs) == 1 else o[k]).to(x.dtype).reshape(x.shape)
        return out


def _num(v: Any) -> Any:
    """A number as a Python float (an argument may be a 0-d tensor)."""
    return v.item() if isinstance(v, torch.Tensor) else float(v) if v is not None else None


__all__ = ["NewtonSchulz", "newton_schulz"]
