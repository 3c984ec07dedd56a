"""Every pipeline in ``pipelines/`` trains a real task: the seed papers' optimizers as files.

A pipeline that reads named losses (``grads.main``, ``grads.aux``) trains the
two-head digits task (``train_multitask``); one that reads per-example
gradients (``samples``) or the loss value is stepped the way it needs by
``digits.train``; the rest train the digits MLP. Each run is 150 steps at the
demo's learning rate for that pipeline, and must end with a loss well below
where it started and a validation accuracy far above chance.

``scalpel`` (the user's line) is the exception, and the test says so: projecting
a single gradient stream against its own EMA removes the persistent descent
direction (the bloop op's docstring and ``docs/ops.md``), so it does not train; README explains it.
"""

from __future__ import annotations

import pytest

import gradpipe
from optimizer_table import MATRICES_ONLY
from gradpipe.demo import lr_for
from gradpipe.tasks import train_multitask
from gradpipe.tasks.digits import train

STEPS = 150
NAMES = [n for n in gradpipe.builtin_names() if n != "scalpel"]
#: pipelines for matrices only (optimizer_table.MATRICES_ONLY, as torch.optim.Muon) train the
#: model's matrices (the biases stay at their start), as torch's documentation shows Muon used


def _run(name: str, steps: int = STEPS):
    prog = gradpipe.load(name)
    lr = lr_for(name)

    def make(model):
        params = [(n, p) for n, p in model.named_parameters() if name not in MATRICES_ONLY or p.ndim == 2]
        return gradpipe.Optimizer(params, prog, lr=lr)
    return train_multitask(make, steps=steps) if prog.losses else train(make, steps=steps)


@pytest.mark.parametrize("name", NAMES)
def test_seed_pipeline_trains(name: str) -> None:
    r = _run(name)
    assert r.final_loss < 0.5 * r.initial_loss, f"{name}: {r.initial_loss:.3f} -> {r.final_loss:.3f}"
    assert r.val_accuracy > 0.7, f"{name}: validation accuracy {r.val_accuracy:.3f}"


def test_scalpel_is_documented_not_to_train_on_one_loss() -> None:
    r = _run("scalpel")
    assert r.final_loss > 0.8 * r.initial_loss, "scalpel now trains: update README and this test"


def test_multi_loss_pipelines_train_both_heads() -> None:
    for name in NAMES:
        if gradpipe.load(name).losses:
            r = _run(name)
            assert r.val_aux_accuracy > 0.7, f"{name}: aux accuracy {r.val_aux_accuracy:.3f}"
