"""The optimizer leaves parameter storage alone (DESIGN.md section 5, normative).

On both backends every parameter keeps its own storage at the same address through
construction and steps, ``p.grad`` is whatever autograd or the user put there, and a
parameter has a gradient in a step exactly when ``p.grad is not None`` (torch's rule).
``torch.optim.Adam`` is the control throughout, on the same small model in float64; the
clients that broke when the compiled backend moved parameters into one flat buffer
(safetensors, accelerate, ``model.to()``, hand-written gradients, ``set_to_none``) are
checked here. Every test uses one model shape and the ``adam`` pipeline, so the compiled
functions are shared.
"""

from __future__ import annotations

import pytest
import torch

import gradpipe

BACKENDS = ("eager", "compiled")
LR = 1e-2


def _model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dtype)


def _pair(backend: str, dtype: torch.dtype = torch.float64) -> tuple[tuple, tuple]:
    """(model, gradpipe optimizer) and (model, torch.optim.Adam) from the same weights."""
    ours, ref = _model(dtype), _model(dtype)
    return (ours, gradpipe.Optimizer(ours.parameters(), "adam", lr=LR, backend=backend)), \
        (ref, torch.optim.Adam(ref.parameters(), lr=LR))


def _batch(t: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(16, 2, generator=g, dtype=dtype)


def _loss(model: torch.nn.Module, t: int) -> torch.Tensor:
    x, y = _batch(t, next(model.parameters()).dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def _storages(model: torch.nn.Module) -> list[int]:
    return [p.untyped_storage().data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_parameter_keeps_its_own_storage_at_the_same_address(backend):
    (m, opt), (r, ref) = _pair(backend)
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert len(set(_storages(m))) == len(ptrs)
    gradpipe.Optimizer(m.parameters(), "adam", lr=LR, backend=backend)  # a second one moves nothing either
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    for t in range(3):
        opt.zero_grad()
        _loss(m, t).backward()
        grads = [p.grad for p in m.parameters()]
        opt.step()
        assert all(p.grad is g for p, g in zip(m.parameters(), grads))  # the step leaves .grad alone
    _train(r, ref, 3)
    assert [p.data_ptr() for p in m.parameters()] == ptrs and len(set(_storages(m))) == len(ptrs)
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
    _same(m, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_safetensors_save_and_load_model_hold_every_weight(backend, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    (m, opt), (r, ref) = _pair(backend)
    _train(m, opt, 3)
    _train(r, ref, 3)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_model(m, path)  # raised "None is covering the entire storage" on adopted parameters
    saved = safetensors_torch.load_file(path)
    assert sorted(saved) == sorted(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(saved[k], v), k
    fresh = _model(seed=1)
    missing, unexpected = safetensors_torch.load_model(fresh, path)
    assert not missing and not unexpected
    _same(fresh, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_to_float64_after_building_the_optimizer_steps_as_torch(backend):
    (m, opt), (r, ref) = _pair(backend, torch.float32)
    m.to(torch.float64)  # replaces every p.data: the optimizer must see the new tensors and their gradients
    r.to(torch.float64)
    for t in range(4):
        for model, o in ((m, opt), (r, ref)):
            o.zero_grad(set_to_none=t % 2 == 0)  # both kinds of zero_grad must clear the gradients
            _loss(model, t).backward()
            o.step()
    _same(m, r)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_written_by_hand_count(backend):
    (m, opt), (r, ref) = _pair(backend)
    for model in (m, r):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # set by hand: autograd then accumulates into it in place
    for t in range(3):
        for model, o in ((m, opt), (r, ref)):
            o.zero_grad(set_to_none=False)
            if t == 1:  # after a backward: the hand-written values replace autograd's
                _loss(model, t).backward()
            for i, p in enumerate(model.parameters()):  # in place, into the tensor .grad already is
                p.grad.copy_(torch.full_like(p, 0.1 * (i + 1) * (t + 1)))
            o.step()
    _same(m, r)
    assert all(float(opt.state[p]["step"]) == 3 for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_sets_gradients_to_none_or_zeroes_them_in_place(backend):
    (m, opt), _ = _pair(backend)
    _loss(m, 0).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())
    _loss(m, 0).backward()
    grads = [p.grad for p in m.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(m.parameters(), grads))
    opt.zero_grad()  # torch's default
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_without_gradient_on_some_steps_follows_torch(backend, set_to_none):
    """The last layer is reached on even steps only. After ``zero_grad(set_to_none=True)`` it has
    no gradient on odd steps and is not stepped; after ``set_to_none=False`` its gradient is zero
    and it is stepped (Adam's moments still move it), as torch.optim.Adam does."""
    (m, opt), (r, ref) = _pair(backend)
    for t in range(6):
        for model, o in ((m, opt), (r, ref)):
            o.zero_grad(set_to_none=set_to_none)
            x, _ = _batch(t)
            out = model(x) if t % 2 == 0 else model[1](model[0](x))
            out.pow(2).mean().backward()
            o.step()
    _same(m, r)
    last = list(m[2].parameters())
    assert all(p.grad is None for p in last) == set_to_none
    assert all(float(opt.state[p]["step"]) == (3 if set_to_none else 6) for p in last)
    assert all(float(opt.state[p]["step"]) == 6 for p in m[0].parameters())


@pytest.mark.parametrize("pipeline", ["adam", "adamw"])
def test_a_large_parameter_is_updated_in_its_own_storage(pipeline):
    """The compiled backend gives a parameter of ``SOLO_MIN`` elements or more a bucket of its own
    and updates it inside the fused kernel, in place; adamw also reads the parameter there."""
    from gradpipe.runtime.compiled import SOLO_MIN
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(SOLO_MIN // 64, 64), torch.nn.ReLU(),
                                          torch.nn.Linear(64, 2)).double())
    m, r = models
    assert m[0].weight.numel() == SOLO_MIN
    ptrs = [p.data_ptr() for p in m.parameters()]
    opt = gradpipe.Optimizer(m.parameters(), pipeline, lr=LR, weight_decay=0.1, backend="compiled")
    ref = (torch.optim.Adam if pipeline == "adam" else torch.optim.AdamW)(r.parameters(), lr=LR, weight_decay=0.1)
    for t in range(3):
        for model, o in ((m, opt), (r, ref)):
            o.zero_grad()
            x = torch.randn(8, SOLO_MIN // 64, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            model(x).pow(2).mean().backward()
            o.step()
    _same(m, r)
    assert [p.data_ptr() for p in m.parameters()] == ptrs


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_saves_and_restores_every_weight(backend, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    (m, opt), (r, ref) = _pair(backend)
    acc = accelerate.Accelerator(cpu=True)
    m, opt = acc.prepare(m, opt)
    _train(m, opt, 3)
    _train(r, ref, 3)
    _same(m, r)
    acc.save_model(m, str(tmp_path / "model"))  # silently saved only the first weight of a flat buffer
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert sorted(saved) == sorted(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(saved[k], v), k

    acc.save_state(str(tmp_path / "state"))
    kept = [p.detach().clone() for p in m.parameters()]
    kept_state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    _train(m, opt, 2, start=3)  # move away, then restore
    acc.load_state(str(tmp_path / "state"))
    for p, k in zip(m.parameters(), kept):
        assert torch.equal(p, k)
    for k, v in kept_state.items():
        assert torch.equal(opt.state_dict()["state"][0][k], v), k
    _train(m, opt, 2, start=3)  # and training goes on as torch's from the same point
    _train(r, ref, 2, start=3)
    _same(m, r)
