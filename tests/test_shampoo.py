"""Shampoo and the linear-algebra matrix functions (issue 13 items 1 and 3).

``pipelines/shampoo.grad`` against pytorch-optimizer's ``Shampoo`` (4.1.0) on matrices in
float64 over 50 steps, its options alone and combined, on both backends; ``eigvecs``, ``qr``
and ``matrix_power`` against torch.linalg; the statistics as m×m and n×n state cells through
a checkpoint; and the shapes these functions refuse.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_optimizer import Shampoo

import gradpipe
from matrix_parity import both_after, grads, replay_from_checkpoint, run as _run, start
from gradpipe import GradError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

SHAPES = ((6, 9), (9, 6), (7, 7))
ROWS = [
    dict(lr=0.02),
    dict(lr=0.02, momentum=0.9),
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.02, weight_decay=0.1, weight_decouple=True, momentum=0.5),
    dict(lr=0.02, preconditioning_compute_steps=3, matrix_eps=1e-3),
]
_CASES = [pytest.param(r, "eager", id=f"{i}-eager") for i, r in enumerate(ROWS)]
_CASES += [pytest.param(ROWS[3], "compiled", id="3-compiled")]


def _start() -> list[torch.Tensor]:
    return start(SHAPES)


def _grads(steps: int) -> list[list[torch.Tensor]]:
    return grads(SHAPES, steps)


@pytest.mark.parametrize("kwargs,backend", _CASES)
def test_shampoo_follows_pytorch_optimizer_on_matrices(kwargs: dict, backend: str) -> None:
    assert both_after(SHAPES, 50, lambda ps: gradpipe.Optimizer(ps, "shampoo", backend=backend, **kwargs),
                      lambda ps: Shampoo(ps, **kwargs)) < 1e-9


def test_shampoo_keeps_its_statistics_as_matrices_and_resumes_bitwise() -> None:
    grads = _grads(6)
    ps = [torch.nn.Parameter(x) for x in _start()]
    opt = gradpipe.Optimizer(ps, "shampoo", lr=0.02, momentum=0.5, backend="eager")
    _run(ps, opt, grads[:3])
    shapes = {k.split("/")[1].removesuffix(".value"): tuple(v.shape) for k, v in opt.state[ps[0]].items() if k.endswith(".value")}
    assert shapes["left"] == (6, 6) and shapes["right"] == (9, 9) and shapes["inverse_left"] == (6, 6)
    again = replay_from_checkpoint(
        lambda ps2: gradpipe.Optimizer(ps2, "shampoo", lr=0.02, momentum=0.5, backend="eager"), ps, opt, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(ps, again))


def _value(source: str, g: torch.Tensor) -> torch.Tensor:
    """The update ``u`` of one step of ``source`` (lr = 1, the parameter at zero)."""
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = gradpipe.Optimizer([p], gradpipe.compile(source), lr=1.0, backend="eager")
    p.grad = g.clone()
    opt.step()
    return -p.detach()


def test_eigvecs_qr_and_matrix_power_are_torch_linalg() -> None:
    g = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sym = g @ g.T
    lam, v = torch.linalg.eigh(sym)
    # eigenvectors by decreasing eigenvalue: V diag(λ) Vᵀ is the matrix again, λ in decreasing order
    q = _value("eigvecs(matmul(grad, transpose(grad)))", g)
    torch.testing.assert_close(q, v.flip(-1))
    torch.testing.assert_close(_value("qr(grad)", g), torch.linalg.qr(g).Q)
    want = (v * (lam + 0.5).pow(-0.25)) @ v.T
    torch.testing.assert_close(_value("matrix_power(matmul(grad, transpose(grad)), -0.25, 0.5)", g), want)
    # (A + eps I) ** -1/2 squared is the inverse
    inv = _value("matrix_power(matmul(grad, transpose(grad)), -0.5, 0.5)", g)
    torch.testing.assert_close(inv @ inv @ (sym + 0.5 * torch.eye(5, dtype=torch.float64)),
                               torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("source,match", [
    ("eigvecs(grad)", r"needs a square matrix.*parameter\(s\) w\b"),
    ("matrix_power(grad, -0.5, 0)", r"needs a square matrix.*parameter\(s\) w\b"),
])
def test_square_matrix_functions_refuse_rectangles_when_built(source: str, match: str) -> None:
    with pytest.raises(GradError, match=match):
        gradpipe.Optimizer([("w", torch.nn.Parameter(torch.zeros(3, 4)))], gradpipe.compile(source))


@pytest.mark.parametrize("source,match", [
    ("matrix_power(grad, grad, 0)", "takes a number here"),
    ("qr(1)", "'qr' needs matrices"),
])
def test_matrix_functions_check_their_operands_when_compiled(source: str, match: str) -> None:
    with pytest.raises(GradError, match=match):
        gradpipe.compile(source)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_a_refresh_every_k_steps_computes_its_matrix_power_once_per_k_steps(backend: str, monkeypatch) -> None:
    """The branch of a where on a step condition that a step does not take is not computed
    (gradpipe/compiler/guards.py): one eigendecomposition per statistic per refresh."""
    import gradpipe.runtime.interpret as interpret
    calls = []
    real = interpret._power
    monkeypatch.setattr(interpret, "_power", lambda a, p, eps: calls.append(tuple(a.shape)) or real(a, p, eps))
    ps = [torch.nn.Parameter(x) for x in _start()]
    opt = gradpipe.Optimizer(ps, "shampoo", lr=0.02, preconditioning_compute_steps=5, backend=backend)
    _run(ps, opt, _grads(12))
    # steps 5 and 10, a left and a right statistic for each of the three matrices
    assert sorted(calls) == sorted([(6, 6), (9, 9), (9, 9), (6, 6), (7, 7), (7, 7)] * 2)
