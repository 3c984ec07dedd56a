"""Tests for the ``digits_multitask`` task (one trunk, a digit head and a parity head).

They train with ``torch.optim.Adam`` and with ``gradpipe.Optimizer`` pipelines
that read ``grads.main`` and ``grads.aux`` (stepped with ``step(losses=...)``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradpipe
from gradpipe.tasks import MultiTaskResult, load_digits_split, make_multitask_model, train_multitask
from gradpipe.tasks.digits_multitask import MultiTaskModel, aux_labels

NAMES = ["trunk.0.weight", "trunk.0.bias", "main_head.weight", "main_head.bias",
         "aux_head.weight", "aux_head.bias"]
SUM_PIPELINE = "grads.main + grads.aux | adam"


def torch_adam(lr: float = 1e-2):
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


def pipeline(source: str, lr: float = 1e-2):
    return lambda model: gradpipe.Optimizer(model.named_parameters(), source, lr=lr)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_model_names_shapes_seeding_and_global_rng() -> None:
    state = torch.get_rng_state()
    m1, m2, m3 = make_multitask_model(1), make_multitask_model(1), make_multitask_model(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(m1, MultiTaskModel)
    assert [n for n, _ in m1.named_parameters()] == NAMES
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(m1.trunk[0].weight, m3.trunk[0].weight)
    main, aux = m1(torch.zeros(5, 64))
    assert main.shape == (5, 10) and aux.shape == (5, 2)
    m64 = make_multitask_model(1, hidden=32, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert m64.trunk[0].weight.shape == (32, 64) and m64.aux_head.weight.shape == (2, 32)
    assert aux_labels(torch.arange(10)).tolist() == [0, 1] * 5


def test_same_seed_bit_identical_different_seed_different() -> None:
    for make in (torch_adam(), pipeline(SUM_PIPELINE)):
        a = train_multitask(make, steps=20, seed=3)
        b = train_multitask(make, steps=20, seed=3)
        assert a.losses == b.losses and a.aux_losses == b.aux_losses
        assert (a.val_loss, a.val_accuracy, a.val_aux_loss, a.val_aux_accuracy) == \
               (b.val_loss, b.val_accuracy, b.val_aux_loss, b.val_aux_accuracy)
    c = train_multitask(torch_adam(), steps=20, seed=4)
    assert c.losses != train_multitask(torch_adam(), steps=20, seed=3).losses


def test_torch_adam_trains_both_heads() -> None:
    r = train_multitask(torch_adam(), steps=150)
    assert isinstance(r, MultiTaskResult)
    assert len(r.losses) == len(r.aux_losses) == 150
    assert r.initial_loss == r.losses[0] == pytest.approx(math.log(10), abs=0.2)
    assert r.initial_aux_loss == r.aux_losses[0] == pytest.approx(math.log(2), abs=0.2)
    assert r.final_loss == pytest.approx(sum(r.losses[-10:]) / 10)
    assert r.final_aux_loss == pytest.approx(sum(r.aux_losses[-10:]) / 10)
    assert r.final_loss < 0.2 * r.initial_loss
    assert r.final_aux_loss < 0.4 * r.initial_aux_loss
    assert r.val_accuracy > 0.85  # chance: 0.1
    assert r.val_aux_accuracy > 0.85  # chance: 0.5
    assert 0.0 < r.val_loss < r.initial_loss and 0.0 < r.val_aux_loss < r.initial_aux_loss
    assert r.seconds > 0.0


def test_grads_main_plus_grads_aux_pipeline_trains() -> None:
    prog = gradpipe.compile(SUM_PIPELINE)
    assert prog.losses == {"main", "aux"}
    seen = {}

    def make(model: nn.Module) -> gradpipe.Optimizer:
        seen["model"], seen["init"] = model, snapshot(model)
        return gradpipe.Optimizer(model.named_parameters(), SUM_PIPELINE, lr=1e-2)

    r = train_multitask(make, steps=150)
    assert r.final_loss < 0.2 * r.initial_loss
    assert r.final_aux_loss < 0.4 * r.initial_aux_loss
    assert r.val_accuracy > 0.85 and r.val_aux_accuracy > 0.85
    # every parameter moved, both heads included
    after = snapshot(seen["model"])
    assert all(not torch.equal(after[n], seen["init"][n]) for n in NAMES)


def test_named_losses_and_backward_paths_agree() -> None:
    # grads.main + grads.aux is the gradient of the sum, so the step(losses=...) path
    # matches the backward() path up to rounding (the sums are formed in another order)
    named = train_multitask(pipeline(SUM_PIPELINE), steps=30, aux_weight=0.5)
    summed = train_multitask(pipeline("grad | adam"), steps=30, aux_weight=0.5)
    ref = train_multitask(torch_adam(), steps=30, aux_weight=0.5)
    for other in (summed, ref):
        assert named.losses == pytest.approx(other.losses, abs=1e-4)
        assert named.aux_losses == pytest.approx(other.aux_losses, abs=1e-4)


def test_each_head_gets_zero_gradient_from_the_other_heads_loss() -> None:
    data = load_digits_split(0)
    x, y = data.x_train[:64], data.y_train[:64]
    for source, untouched in (("grads.main", "aux_head"), ("grads.aux", "main_head")):
        model = make_multitask_model(0)
        before = snapshot(model)
        opt = gradpipe.Optimizer(model.named_parameters(), source, lr=0.1)
        main, aux = model(x)
        opt.step(losses={"main": F.cross_entropy(main, y), "aux": F.cross_entropy(aux, aux_labels(y))})
        after = snapshot(model)
        for n in NAMES:
            moved = not torch.equal(after[n], before[n])
            assert moved == (not n.startswith(untouched)), (source, n)


def test_main_only_pipeline_leaves_aux_head_at_init_and_trains_main() -> None:
    # the main head is unreached by the aux loss and the aux head by the main loss:
    # a pipeline reading only grads.main trains trunk + main head and never moves the aux head
    seen = {}

    def make(model: nn.Module) -> gradpipe.Optimizer:
        seen["model"] = model
        return gradpipe.Optimizer(model.named_parameters(), "grads.main | adam", lr=1e-2)

    r = train_multitask(make, steps=60)
    init = make_multitask_model(0)
    assert torch.equal(seen["model"].aux_head.weight, init.aux_head.weight)
    assert torch.equal(seen["model"].aux_head.bias, init.aux_head.bias)
    assert not torch.equal(seen["model"].main_head.weight, init.main_head.weight)
    assert r.final_loss < 0.5 * r.initial_loss


def test_aux_weight_zero_global_rng_and_argument_checks() -> None:
    state = torch.get_rng_state()
    r = train_multitask(torch_adam(), steps=5, aux_weight=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(r.aux_losses) == 5 and all(math.isfinite(v) for v in r.aux_losses)
    with pytest.raises(ValueError):
        train_multitask(torch_adam(), steps=0)
    with pytest.raises(ValueError):
        train_multitask(torch_adam(), batch_size=0)
    with pytest.raises(ValueError):
        train_multitask(torch_adam(), aux_weight=-1.0)
    with pytest.raises(ValueError):
        train_multitask(torch_adam(), aux_weight=float("nan"))
    with pytest.raises(ValueError):
        make_multitask_model(hidden=0)
