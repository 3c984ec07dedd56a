"""``project_out``: remove the components of a gradient in a protected input subspace (GPM, ROGO)."""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, register


def gpm_basis(activations: torch.Tensor, threshold: float = 0.97, previous: torch.Tensor | None = None
              ) -> torch.Tensor:
    r"""The GPM basis of a layer's input space from its inputs on a finished task.

    ``activations`` is ``(N, n_in)`` (the layer's inputs on N examples). With
    :math:`R = A^\top` and its SVD :math:`R = U \Sigma V^\top`, GPM keeps the
    smallest :math:`k` with :math:`\lVert R_k\rVert_F^2 \ge \epsilon_{th} \lVert R\rVert_F^2`
    and returns :math:`U_{:, :k}` (``n_in × k``, orthonormal columns, most
    significant first). Given the ``previous`` basis :math:`M`, only the residual
    :math:`R - M M^\top R` is decomposed and the new directions are appended
    while the total captured energy stays below the threshold (Saha et al., Algorithm 1).
    """
    r = activations.detach().to(torch.float64).t()
    total = float((r * r).sum())
    if previous is not None and previous.numel():
        m = previous.to(torch.float64)
        resid = r - m @ (m.t() @ r)
        u, s, _ = torch.linalg.svd(resid, full_matrices=False)
        captured = total - float((resid * resid).sum())
        need = threshold * total - captured
        if need <= 0:
            return previous.clone()
        acc = torch.cumsum(s * s, 0)
        k = int(torch.searchsorted(acc, torch.tensor(need, dtype=acc.dtype)).item()) + 1
        return torch.cat([m, u[:, :k]], 1).to(previous.dtype)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    acc = torch.cumsum(s * s, 0) / max(total, 1e-300)
    k = int(torch.searchsorted(acc, torch.tensor(threshold, dtype=acc.dtype)).item()) + 1
    return u[:, :min(k, u.shape[1])].to(activations.dtype)


@register
class ProjectOut(TensorOp):
    r"""Project a weight gradient off a protected subspace of the layer's input space.

    For a weight gradient :math:`G` (``out × in``; a conv kernel is viewed as
    ``out × (in·kh·kw)``) and an orthonormal basis :math:`M` (``in × k``) of the
    input space that earlier tasks use:

    .. math::
        u = G - G\, M_{:, :k-\rho} M_{:, :k-\rho}^\top

    so the update does not change the layer's outputs on those inputs (GPM).
    ``relax`` :math:`=\rho` leaves the :math:`\rho` least significant basis
    directions free: ROGO's "restricted" relaxation, which lets the update
    move in part of the frozen space. The seed gives only ROGO's abstract, so
    the rule for choosing that subspace (here: the trailing columns of a
    basis ordered by significance, as ``gpm_basis`` returns it) is this
    library's reading, not the paper's verified equation.

    The basis is state, set per parameter with ``opt.set_basis(param, M)``
    (``gradpipe.gpm_basis`` builds one from a layer's inputs) and saved in
    ``state_dict``. A parameter without a basis, or with fewer than two
    dimensions, passes unchanged.

    Reference: G. Saha, I. Garg, K. Roy, "Gradient Projection Memory for
    Continual Learning", ICLR 2021; X. Yang et al., "Restricted Orthogonal
    Gradient Projection for Continual Learning" (ROGO), 2023.
    """

    name = "project_out"
    summary = "G - G M M^T for a stored input-space basis M (GPM / ROGO)"
    reference = "Saha et al. 2021 (GPM); Yang et al. 2023 (ROGO)"
    params = (Param("relax", kind="int", default=0, low=0, doc="trailing basis directions left free (ROGO)"),)
    buffers = (Buffer("basis", "orthonormal input-space basis M (in × k), set with opt.set_basis",
                      shape=lambda shape, a: None),)  # the user's, never created by the runtime

    def buffers_for(self, args):
        return ()  # the basis is the user's (opt.set_basis), not state the runtime creates

    @staticmethod
    def basis_for(param: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``basis`` checked as a protected basis of ``param`` (``in × k`` for a weight
        ``out × in``, a conv kernel viewed as ``out × (in·kh·kw)``), in ``param``'s compute
        dtype, as :meth:`gradpipe.Optimizer.set_basis` stores it; ``ValueError`` otherwise."""
        cols = param.reshape(param.shape[0], -1).shape[1] if param.dim() >= 2 else None
        if basis.dim() != 2 or cols is None or basis.shape[0] != cols:
            raise ValueError(f"a basis for a parameter of shape {tuple(param.shape)} has shape ({cols}, k), "
                             f"got {tuple(basis.shape)}")
        dtype = torch.promote_types(param.dtype, torch.float32)
        return basis.detach().to(dtype).clone()

    def update(self, x, state, a, lane):
        basis = state.get("basis")
        if basis is None or x.dim() < 2 or basis.numel() == 0:
            return x.clone()
        keep = basis.shape[1] - int(a.relax)
        if keep <= 0:
            return x.clone()
        m = basis[:, :keep].to(x.dtype)
        g = x.reshape(x.shape[0], -1)
        return (g - (g @ m) @ m.t()).reshape(x.shape)
