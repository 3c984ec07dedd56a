"""``adafactor``: torch.optim.Adafactor as a `.grad` file, with its factored second moment.

The moments of matrices are state cells that start from a reduction over rows or columns,
so they keep one number per row and one per column (Adafactor's sublinear memory), on
both backends; the pipeline follows torch.optim.Adafactor to 1e-9 in float64 with every
option torch has.
"""

from __future__ import annotations

import pytest
import torch

import gradpipe
from torch_parity import follow

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

#: torch's eps=(None, 1e-3) means the dtype's machine epsilon: float64's here
EPS64 = (torch.finfo(torch.float64).eps, 1e-3)

ROWS = [
    {"eps": EPS64},
    {"eps": EPS64, "lr": 0.05, "weight_decay": 0.1},
    {"eps": EPS64, "maximize": True},
    {"eps": EPS64, "beta2_decay": -0.5, "d": 2.0},
    {"eps": (1e-20, 1e-2), "lr": 1.0},
    {"eps": EPS64, "lr": 0.0},
]


@pytest.mark.parametrize("kwargs", ROWS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_adafactor_follows_torch(kwargs):
    assert follow("adafactor", torch.optim.Adafactor, kwargs, "eager") <= 1e-9


def test_adafactor_compiled_follows_torch():
    kwargs = {"eps": EPS64, "lr": 0.05, "weight_decay": 0.1, "maximize": True}
    assert follow("adafactor", torch.optim.Adafactor, kwargs, "compiled", steps=20) <= 1e-9


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_adafactor_keeps_one_number_per_row_and_column(backend):
    conv = torch.nn.Parameter(torch.randn(3, 2, 4, 5))
    lin = torch.nn.Parameter(torch.randn(4, 6))
    bias = torch.nn.Parameter(torch.randn(4))
    opt = gradpipe.Optimizer([conv, lin, bias], "adafactor", backend=backend)
    for p in (conv, lin, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = {k: tuple(v.shape) for p in (conv, lin, bias) for k, v in opt.state[p].items() if k != "step"}
    assert {tuple(opt.state[conv][k].shape) for k in opt.state[conv] if k != "step"} == {(3, 2, 4, 1), (3, 2, 1, 5)}
    assert {tuple(opt.state[lin][k].shape) for k in opt.state[lin] if k != "step"} == {(4, 1), (1, 6)}
    assert [tuple(v.shape) for k, v in opt.state[bias].items() if k != "step"] == [(4,)], shapes
