"""SOAP (issue 13 item 3): ``pipelines/soap.grad`` against pytorch-optimizer's ``SOAP`` (4.1.0).

The reference casts the matrix it takes the QR of to float32 whatever the parameters' dtype
(for bfloat16, which ``torch.linalg.qr`` does not take); gradpipe's ``qr`` computes in the
compute dtype. The parity rows run the reference with that one cast removed
(:class:`SOAP64`: its ``get_orthogonal_matrix_qr`` for 2-D parameters, transcribed without the
cast), in float64 over 50 steps, so every eigenbasis refresh is compared to 1e-9; the last
test shows the difference the cast makes on its own.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_optimizer import SOAP

import gradpipe
from matrix_parity import both_after, grads, replay_from_checkpoint, run as _run, start, worst as _worst

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

#: wide, tall (rank-deficient statistics at first), square, and a vector (plain Adam)
SHAPES = ((6, 9), (9, 6), (7, 7), (5,))
ROWS = [
    dict(),
    dict(lr=0.01, betas=(0.9, 0.99), shampoo_beta=0.99, weight_decay=0.1),
    dict(precondition_frequency=3, shampoo_beta=0.9, eps=1e-6),
    dict(weight_decay=0.0, precondition_frequency=1),
]
_CASES = [pytest.param(r, "eager", id=f"{i}-eager") for i, r in enumerate(ROWS)]
_CASES += [pytest.param(ROWS[2], "compiled", id="2-compiled")]


class SOAP64(SOAP):
    """pytorch-optimizer's SOAP with its QR in the parameters' dtype (for 2-D parameters without
    merged dimensions, the only case the rows use): the reference's method, transcribed, minus
    ``.to(torch.float32)`` before ``torch.linalg.qr``."""

    def get_orthogonal_matrix_qr(self, state, max_precondition_dim=10000, merge_dims=False):
        exp_avg_sq = state["exp_avg_sq"]
        matrices = []
        for ind, (m, o) in enumerate(zip(state["GG"], state["Q"])):
            if len(m) == 0:
                matrices.append([])
                continue
            matrix_product = m @ o
            est_eig = (o * matrix_product).sum(dim=0)
            sort_idx = torch.argsort(est_eig, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(ind, sort_idx)
            q, _ = torch.linalg.qr(matrix_product.index_select(1, sort_idx))
            matrices.append(q)
        state["exp_avg_sq"] = exp_avg_sq
        return matrices


def _start() -> list[torch.Tensor]:
    return start(SHAPES)


def _grads(steps: int) -> list[list[torch.Tensor]]:
    return grads(SHAPES, steps)


@pytest.mark.parametrize("kwargs,backend", _CASES)
def test_soap_follows_pytorch_optimizer(kwargs: dict, backend: str) -> None:
    assert both_after(SHAPES, 50, lambda ps: gradpipe.Optimizer(ps, "soap", backend=backend, **kwargs),
                      lambda ps: SOAP64(ps, **kwargs)) < 1e-9


def test_soap_against_the_unpatched_reference_differs_by_its_float32_qr_only() -> None:
    """Before the first refresh (step 11 at the defaults) the two agree to rounding; after it,
    by the float32 QR's precision (about 1e-7), not more."""
    ours = [torch.nn.Parameter(x) for x in _start()]
    theirs = [torch.nn.Parameter(x) for x in _start()]
    grads = _grads(30)
    opt, ref = gradpipe.Optimizer(ours, "soap", backend="eager"), SOAP(theirs)
    _run(ours, opt, grads[:10])
    _run(theirs, ref, grads[:10])
    assert _worst(ours, theirs) < 1e-12
    _run(ours, opt, grads[10:])
    _run(theirs, ref, grads[10:])
    assert 1e-12 < _worst(ours, theirs) < 1e-5


def test_soap_skips_its_first_step_and_resumes_bitwise() -> None:
    ps = [torch.nn.Parameter(x) for x in _start()]
    grads = _grads(14)
    opt = gradpipe.Optimizer(ps, "soap", precondition_frequency=3, backend="eager")
    _run(ps, opt, grads[:1])
    assert all(torch.equal(p, x) for p, x in zip(ps, _start()))  # the first step only builds the bases
    _run(ps, opt, grads[1:7])
    shapes = {k.split("/")[1].removesuffix(".value"): tuple(v.shape) for k, v in opt.state[ps[1]].items()
              if k.endswith(".value")}
    assert shapes["left"] == (9, 9) and shapes["basis_right"] == (6, 6) and shapes["v"] == (9, 6)
    again = replay_from_checkpoint(
        lambda ps2: gradpipe.Optimizer(ps2, "soap", precondition_frequency=3, backend="eager"), ps, opt, grads[7:])
    assert all(torch.equal(a, b) for a, b in zip(ps, again))


def test_descending_orders_by_a_permutation_matrix() -> None:
    g = torch.tensor([[3.0, -1.0, 7.0, 0.5]], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    # the first row of the update: the first row of grad, sorted largest first
    opt = gradpipe.Optimizer([p], gradpipe.compile("matmul(grad, descending(sum(grad, over=cols)))"), lr=1.0,
                             backend="eager")
    p.grad = torch.cat([g, torch.zeros(3, 4, dtype=torch.float64)])
    opt.step()
    assert torch.equal(-p.detach()[0], torch.tensor([7.0, 3.0, 0.5, -1.0], dtype=torch.float64))
