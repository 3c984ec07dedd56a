"""Tests for the ``digits`` training task and the demo table's plumbing.

These use only torch's own optimizers (and a stand-in for ``gradpipe.Optimizer``
in the demo tests), so they do not depend on the pipeline compiler.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

from gradpipe.tasks.digits import (  # noqa: E402
    DigitsData,
    TrainResult,
    load_digits_split,
    make_mlp,
    train,
)


def adam(lr: float = 1e-2):
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


def test_split_shapes_and_values() -> None:
    d = load_digits_split()
    assert isinstance(d, DigitsData)
    assert d.x_train.shape == (1437, 64) and d.x_val.shape == (360, 64)
    assert d.y_train.shape == (1437,) and d.y_val.shape == (360,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    for x in (d.x_train, d.x_val):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(d.x_train.max()) == 1.0
    # stratified: every class in both parts, in roughly the dataset's proportions
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_val.tolist())
    assert torch.bincount(d.y_val, minlength=10).min() >= 30
    with pytest.raises(Exception):
        d.x_train = d.x_val  # type: ignore[misc]  # frozen


def test_split_is_deterministic() -> None:
    a, b = load_digits_split(seed=3), load_digits_split(seed=3)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = load_digits_split(seed=4)
    assert not torch.equal(a.y_val, c.y_val)
    # callers get fresh tensors: mutating one result does not leak into the next
    a.x_train.zero_()
    assert torch.equal(load_digits_split(seed=3).x_train, b.x_train)


def test_split_options() -> None:
    d = load_digits_split(val_fraction=0.5, dtype=torch.float64)
    assert d.x_train.dtype == torch.float64
    assert d.x_train.shape[0] + d.x_val.shape[0] == 1797
    assert abs(d.x_val.shape[0] - 1797 / 2) <= 1
    with pytest.raises(ValueError):
        load_digits_split(val_fraction=1.0)


def test_make_mlp_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    m1, m2, m3 = make_mlp(seed=1), make_mlp(seed=1), make_mlp(seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    p1, p2, p3 = (list(m.parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not torch.equal(p1[0], p3[0])
    assert [n for n, _ in m1.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert m1(torch.zeros(5, 64)).shape == (5, 10)
    m64 = make_mlp(seed=1, hidden=32, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert m64[0].weight.shape == (32, 64)


def test_adam_learns_digits() -> None:
    r = train(adam(1e-2), steps=100)
    assert isinstance(r, TrainResult)
    assert len(r.losses) == 100
    assert r.initial_loss == r.losses[0]
    assert r.initial_loss == pytest.approx(2.3, abs=0.2)  # ~log(10) for an untrained model
    assert r.final_loss < 0.5 * r.initial_loss
    assert r.final_loss == pytest.approx(sum(r.losses[-10:]) / 10)
    assert r.val_accuracy > 0.85
    assert 0.0 < r.val_loss < r.initial_loss
    assert r.seconds > 0.0


def test_same_seed_same_losses_different_seed_different() -> None:
    a = train(adam(), steps=30, seed=5)
    b = train(adam(), steps=30, seed=5)
    c = train(adam(), steps=30, seed=6)
    assert a.losses == b.losses
    assert (a.val_loss, a.val_accuracy) == (b.val_loss, b.val_accuracy)
    assert a.losses != c.losses


def test_train_leaves_global_rng_alone_and_checks_arguments() -> None:
    state = torch.get_rng_state()
    train(adam(), steps=3)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError):
        train(adam(), steps=0)
    with pytest.raises(ValueError):
        train(adam(), batch_size=0)


def test_float64_and_epoch_wraparound() -> None:
    # 1437 // 128 = 11 batches per epoch: 25 steps crosses two reshuffles
    r = train(adam(), steps=25, batch_size=128, dtype=torch.float64)
    assert len(r.losses) == 25 and all(math.isfinite(v) for v in r.losses)
    r32 = train(adam(), steps=25, batch_size=128)
    assert r.initial_loss == pytest.approx(r32.initial_loss, rel=1e-5)
