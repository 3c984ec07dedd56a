"""torch.optim's Adam family, Adagrad and Adadelta as `.grad` pipelines (issue 12 item 5, part A).

One table: each row is a built-in pipeline, the torch.optim class it writes, and keyword
arguments both get (torch's names). The rows cover every option of every pipeline: each
boolean option on, non-default numbers for each hyperparameter, and the combinations torch's
own tests run. Every row follows torch to 1e-9 relative in float64 over 50 steps on the
eager backend; a few rows per pipeline run on the compiled backend too (compiles are slow;
the shapes are the same for all, so compiled artifacts are shared).
"""

from __future__ import annotations

import pytest
import torch

import gradpipe
from torch_parity import follow

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

TOL = 1e-9
PART_A = ("adam", "adamw", "adamax", "nadam", "radam", "adagrad", "adadelta")

ROWS = [
    # Adam: L2 or decoupled decay, amsgrad, maximize
    ("adam", torch.optim.Adam, {}),
    ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    ("adam", torch.optim.Adam, dict(lr=0.01, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True,
                                    decoupled_weight_decay=True)),
    # AdamW: decoupled decay always; amsgrad, maximize
    ("adamw", torch.optim.AdamW, {}),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, maximize=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    # Adamax
    ("adamax", torch.optim.Adamax, {}),
    ("adamax", torch.optim.Adamax, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-3)),
    ("adamax", torch.optim.Adamax, dict(lr=0.01, weight_decay=0.1)),
    ("adamax", torch.optim.Adamax, dict(lr=0.01, maximize=True)),
    ("adamax", torch.optim.Adamax, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    # NAdam: momentum_decay, L2 or decoupled decay, maximize
    ("nadam", torch.optim.NAdam, {}),
    ("nadam", torch.optim.NAdam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.01)),
    ("nadam", torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1)),
    ("nadam", torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("nadam", torch.optim.NAdam, dict(lr=0.01, maximize=True)),
    ("nadam", torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True,
                                      momentum_decay=0.006)),
    # RAdam: the rectification from step 6 (default betas), from step 2 (beta2 = 0.8), never (beta2 = 0.5)
    ("radam", torch.optim.RAdam, {}),
    ("radam", torch.optim.RAdam, dict(lr=0.01, betas=(0.8, 0.8), eps=1e-6)),
    ("radam", torch.optim.RAdam, dict(lr=0.01, betas=(0.9, 0.5))),
    ("radam", torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1)),
    ("radam", torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", torch.optim.RAdam, dict(lr=0.01, maximize=True)),
    ("radam", torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    # Adagrad: lr_decay, initial_accumulator_value, eps, weight_decay, maximize
    ("adagrad", torch.optim.Adagrad, {}),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05)),
    ("adagrad", torch.optim.Adagrad, dict(initial_accumulator_value=0.5, eps=1e-3)),
    ("adagrad", torch.optim.Adagrad, dict(weight_decay=0.1)),
    ("adagrad", torch.optim.Adagrad, dict(maximize=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-6,
                                          weight_decay=0.1, maximize=True)),
    # Adadelta: lr, rho, eps, weight_decay, maximize
    ("adadelta", torch.optim.Adadelta, {}),
    ("adadelta", torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4)),
    ("adadelta", torch.optim.Adadelta, dict(weight_decay=0.1)),
    ("adadelta", torch.optim.Adadelta, dict(maximize=True)),
    ("adadelta", torch.optim.Adadelta, dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1, maximize=True)),
    # maximize on the pipelines torch's OptimizerInfo runs with it (SGD, RMSprop)
    ("sgd", torch.optim.SGD, dict(lr=0.01, maximize=True)),
    ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True, maximize=True)),
    ("rmsprop", torch.optim.RMSprop, dict(maximize=True)),
    ("rmsprop", torch.optim.RMSprop, dict(weight_decay=0.1, centered=True, momentum=0.5, maximize=True)),
]

#: the rows also run on the compiled backend (indices into ROWS): the last row of each pipeline
#: of part A, which turns on every boolean option it has
COMPILED = [max(i for i, r in enumerate(ROWS) if r[0] == name) for name in PART_A]


def _id(row) -> str:
    name, _, kw = row
    return name + "-" + ("-".join(f"{k}={v}" for k, v in kw.items()) or "defaults")


def _run(row, backend):
    name, cls, kw = row
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps NAdam's mu_product in the default dtype
    try:
        return follow(name, cls, kw, backend)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_eager_follows_torch(row):
    assert _run(row, "eager") <= TOL


@pytest.mark.parametrize("row", [ROWS[i] for i in COMPILED], ids=[_id(ROWS[i]) for i in COMPILED])
def test_compiled_follows_torch(row):
    assert _run(row, "compiled") <= TOL


def test_table_covers_every_option():
    """Each hyperparameter of the pipelines of part A is set in some row (a boolean one on),
    and each is set in a compiled row too; every pipeline of the table has a compiled row."""
    for name in PART_A:
        prog = gradpipe.load(name)
        rows = [kw for n, _, kw in ROWS if n == name]
        compiled = [ROWS[i][2] for i in COMPILED if ROWS[i][0] == name]
        assert compiled, f"{name}: no compiled row"
        for hp, spec in prog.hyperparams.items():
            on = [kw for kw in rows if hp in kw and kw[hp] is not False]
            assert on or hp == "lr" and rows, f"{name}: no row sets {hp}"
            if spec.kind == "bool":
                assert any(kw.get(hp) is True for kw in compiled), f"{name}: no compiled row with {hp}=True"
