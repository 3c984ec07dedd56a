"""``gradpipe.Optimizer`` behaves as a ``torch.optim.Optimizer``.

Parameter forms, zero_grad, skipped parameters, closures, ``state_dict``
round trips (every built-in pipeline, and the noise RNG), state names,
half-precision parameters, hyperparameters in param groups, hyperparameter
errors, routing, and the ways a pipeline can be given.
"""

from __future__ import annotations

import copy
import io
import pathlib

import pytest
import torch

import gradpipe
from optimizer_table import BUILTIN_NAMES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin badly on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A 6-8-3 MLP, initialised on the CPU from ``seed`` (the same weights on every device)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device, dtype)


def _data(t: int, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(16, 6, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)
    return x.to(device), y.to(device)


def _batch(model: torch.nn.Module, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``t``'s batch in the model's dtype, on its device."""
    p = next(model.parameters())
    return _data(t, p.dtype, p.device)


def _loss(model: torch.nn.Module, t: int) -> torch.Tensor:
    x, y = _batch(model, t)
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    """Steps the way the pipeline needs: named losses (``grads.main``/``grads.aux``),
    per-example gradients (``samples``), a closure that computes the gradient (``grad_at``),
    the loss value (a closure), or plain ``backward``."""
    prog = getattr(opt, "program", None)
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = _loss(model, t)
        if prog is not None and prog.losses:
            x, _ = _batch(model, t)
            aux = 0.1 * model(x).float().pow(2).mean()
            opt.step(losses={"main": loss, "aux": aux})
        elif prog is not None and "samples" in prog.reads:
            x, y = _batch(model, t)
            per = gradpipe.per_sample_grads(model, torch.nn.functional.cross_entropy, x, y)
            opt.step(samples=dict(zip(model.parameters(), per.values())))  # keyed by tensor: works unnamed
        elif getattr(opt, "needs_closure", False):  # grad_at (SAM): a closure that step() calls twice
            opt.step(_closure(model, opt, t))
        else:
            loss.backward()
            opt.step(lambda: loss)


def _closure(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model, t)
        loss.backward()
        return loss
    return closure


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ torch optimizer protocol
def test_is_a_torch_optimizer() -> None:
    opt = gradpipe.Optimizer(_model().parameters(), "adam")
    assert isinstance(opt, torch.optim.Optimizer)


def test_accepts_every_params_form() -> None:
    """Plain tensors, named_parameters, group dicts with and without names: the same run."""
    def forms(m: torch.nn.Module):
        named = list(m.named_parameters())
        return {
            "tensors": list(m.parameters()),
            "named": m.named_parameters(),
            "groups": [{"params": [p for _, p in named[:2]]}, {"params": [p for _, p in named[2:]]}],
            "named_groups": [{"params": named[:2]}, {"params": named[2:]}],
        }

    results = {}
    for form in forms(_model()):
        m = _model()
        opt = gradpipe.Optimizer(forms(m)[form], "adam", lr=1e-2)
        _train(m, opt, 3)
        results[form] = _params(m)
        if form in ("named", "named_groups"):
            names = [n for g in opt.param_groups for n in g["param_names"]]
            assert names == [n for n, _ in m.named_parameters()]
    for form, ps in results.items():
        for a, b in zip(ps, results["tensors"]):
            assert torch.equal(a, b), form
    assert not torch.equal(results["tensors"][0], _params(_model())[0])


def test_zero_grad() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "sgd", lr=0.1)
    _loss(m, 0).backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    _loss(m, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


def test_params_without_grad_are_skipped() -> None:
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = gradpipe.Optimizer([a, b], "adam", lr=0.1)
    b0 = b.detach().clone()
    a.grad = torch.randn(4, 3)
    opt.step()
    assert torch.equal(b, b0)
    assert len(opt.state[b]) == 0
    # b gets state once it has a gradient; a later step without its grad leaves that state alone
    b.grad = torch.randn(5)
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[b].items()}
    b1 = b.detach().clone()
    b.grad = None
    a.grad = torch.randn(4, 3)
    opt.step()
    assert torch.equal(b, b1)
    assert saved.keys() == opt.state[b].keys()
    for k, v in saved.items():
        assert torch.equal(v, opt.state[b][k]), k
    assert float(opt.state[a]["step"]) == 3 and float(opt.state[b]["step"]) == 1


def test_closure_returns_loss() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "adam", lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = _loss(m, 0)
        loss.backward()
        return loss

    expected = float(_loss(m, 0).detach())
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(expected)
    assert float(_loss(m, 0).detach()) < expected
    assert opt.step() is None


def test_pipeline_reading_loss_with_closure() -> None:
    """``grad | scale(loss)``: u = loss * g, so p <- p - lr * loss * g."""
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "grad | scale(loss)", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _loss(m, 0)
        loss.backward()
        return loss

    before = _params(m)
    loss = opt.step(closure)
    for p, p0 in zip(m.parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * float(loss.detach()) * p.grad)


def test_pipeline_reading_loss_without_closure_is_an_error() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "grad | scale(loss)", lr=0.1)
    _loss(m, 0).backward()
    with pytest.raises(ValueError, match="loss"):
        opt.step()


# ------------------------------------------------------------------ state_dict
def _round_trip(pipeline: str, hp: dict | None = None) -> None:
    """Train 10 steps; checkpoint through torch.save / torch.load(weights_only=True) into a fresh
    optimizer on a copy of the model; 10 more steps on both must be bitwise identical."""
    hp = hp or {}
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(), pipeline, **hp)
    _train(m, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    m2 = _model(seed=1)
    m2.load_state_dict(ckpt["model"])
    opt2 = gradpipe.Optimizer(m2.named_parameters(), pipeline, **hp)
    opt2.load_state_dict(ckpt["opt"])
    _train(m, opt, 10, start=10)
    _train(m2, opt2, 10, start=10)
    for (name, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), f"{pipeline}: {name} differs after resuming"
    for p, q in zip(m.parameters(), m2.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), k


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_state_dict_round_trip_builtin(name: str) -> None:
    _round_trip(name, {"lr": 1e-2})


def test_state_dict_round_trip_restores_noise_rng() -> None:
    _round_trip("grad | noise(0.01, 0.55, seed=3) | adam", {"lr": 1e-2})


def test_state_dict_noise_differs_without_rng() -> None:
    """Control for the test above: a fresh generator (state not loaded) draws other noise."""
    pipe = "grad | noise(0.1, 0.55, seed=3) | sign"
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), pipe, lr=1e-2)
    _train(m, opt, 3)
    m2 = copy.deepcopy(m)
    opt2 = gradpipe.Optimizer(m2.parameters(), pipe, lr=1e-2)  # no load_state_dict
    _train(m, opt, 1, start=3)
    _train(m2, opt2, 1, start=3)
    assert not all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_load_state_dict_from_another_pipeline_raises() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "adam", lr=1e-2)
    _train(m, opt, 2)
    sd = opt.state_dict()
    for other in ("lion", "rmsprop", "grad | sign"):  # ("grad | adam | adam" migrates: tests/test_migration.py)
        with pytest.raises(gradpipe.GradError):
            gradpipe.Optimizer(m.parameters(), other).load_state_dict(sd)


def test_state_keys_are_structure_names() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(), "adam", lr=1e-2)
    _train(m, opt, 1)
    for p in m.parameters():
        assert set(opt.state[p]) == {"main/exp_avg/ema.m", "main/exp_avg_sq/ema.m", "step"}
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"main/exp_avg/ema.m", "main/exp_avg_sq/ema.m", "step"}
    assert "gradpipe" in sd

    opt = gradpipe.Optimizer(m.parameters(), "lion")
    _train(m, opt, 1)
    assert set(opt.state[next(m.parameters())]) == {"main/lion.m", "step"}

    opt = gradpipe.Optimizer(m.parameters(), "grad | project_orthogonal(ema) | adam")
    _train(m, opt, 1)
    keys = set(opt.state[next(m.parameters())])
    assert {"main/project_orthogonal/ema.m", "main/adam.m", "main/adam.v", "step"} <= keys


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_state_keys_are_declared_buffers(name: str) -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(), name, lr=1e-2)
    _train(m, opt, 2)
    declared = set(opt.program.state_buffers()) | {"step"}
    for p in m.parameters():
        assert set(opt.state[p]) <= declared
        assert float(opt.state[p]["step"]) == 2


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_half_precision_params(dtype: torch.dtype, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
    ph = torch.nn.Parameter(p32.detach().to(dtype))
    opt32 = gradpipe.Optimizer([p32], name, lr=0.05)
    opth = gradpipe.Optimizer([ph], name, lr=0.05)
    for _ in range(10):
        g = torch.randn(8, 5, generator=gen)
        p32.grad = g.clone()
        ph.grad = g.to(dtype)
        opt32.step()
        opth.step()
    assert ph.dtype == dtype
    for k, v in opth.state[ph].items():
        if k != "step":
            assert v.dtype == torch.float32, k
    torch.testing.assert_close(ph.detach().float(), p32.detach(), atol=0.05, rtol=0.02)
    assert (ph.detach().float() - p32.detach().to(dtype).float()).abs().max() < 0.2


def test_half_precision_state_survives_round_trip() -> None:
    """Loading a checkpoint keeps fp32 state for bf16 params (torch's loader would cast it to
    the param dtype), and training continues bitwise as without the checkpoint."""
    m = _model(dtype=torch.bfloat16)
    opt = gradpipe.Optimizer(m.parameters(), "adam", lr=1e-2)
    _train(m, opt, 2)
    m2 = copy.deepcopy(m)
    opt2 = gradpipe.Optimizer(m2.parameters(), "adam", lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    st = opt2.state[next(m2.parameters())]
    assert st["main/exp_avg/ema.m"].dtype == torch.float32
    assert st["main/exp_avg_sq/ema.m"].dtype == torch.float32
    _train(m, opt, 2, start=2)
    _train(m2, opt2, 2, start=2)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert q.dtype == torch.bfloat16
        assert torch.equal(p, q)


# ------------------------------------------------------------------ hyperparameters
def test_hyperparameters_live_in_param_groups() -> None:
    opt = gradpipe.Optimizer(_model().parameters(), "adam", lr=3e-3)
    g = opt.param_groups[0]
    assert g["lr"] == 3e-3
    assert tuple(g["betas"]) == (0.9, 0.999)
    assert g["eps"] == 1e-8 and g["weight_decay"] == 0
    opt = gradpipe.Optimizer(_model().parameters(), "adam", betas=(0.8, 0.99))
    assert tuple(opt.param_groups[0]["betas"]) == (0.8, 0.99)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_changing_group_lr_changes_the_step(name: str) -> None:
    deltas = []
    for lr in (0.01, 0.02):
        p = torch.nn.Parameter(torch.ones(4))
        opt = gradpipe.Optimizer([p], name, lr=0.01)
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor([0.5, -1.0, 2.0, 0.25])
        opt.step()
        deltas.append(1 - p.detach())
    torch.testing.assert_close(deltas[1], 2 * deltas[0])
    if name == "sgd":
        torch.testing.assert_close(deltas[0], 0.01 * torch.tensor([0.5, -1.0, 2.0, 0.25]))


def test_changing_group_betas_changes_the_step() -> None:
    outs = []
    for betas in ((0.9, 0.999), (0.5, 0.999)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = gradpipe.Optimizer([p], "adam", lr=0.1)
        for t, g in enumerate(([1.0, 2.0, 3.0], [-3.0, 1.0, 0.5])):
            if t == 1:
                opt.param_groups[0]["betas"] = betas
            p.grad = torch.tensor(g)
            opt.step()
        outs.append(p.detach().clone())
    assert not torch.allclose(outs[0], outs[1])


def test_unknown_hyperparameter_suggests() -> None:
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(_model().parameters(), "adam", betas1=(0.9, 0.99))
    assert "betas1" in str(e.value)
    assert "did you mean" in str(e.value) and "betas" in (e.value.hint or "")


def test_out_of_range_hyperparameter_points_at_declaration() -> None:
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(_model().parameters(), "adam", betas=(1.2, 0.999))
    adam_grad = gradpipe.compiler.program.builtin_dir() / "adam.grad"
    lines = adam_grad.read_text().splitlines()
    decl = next(i for i, line in enumerate(lines, 1) if line.startswith("hparam betas"))
    assert e.value.line == decl
    assert pathlib.Path(e.value.path).name == "adam.grad"
    assert "1.2" in str(e.value) and "hparam betas" in str(e.value)


def test_out_of_range_in_param_group_raises() -> None:
    m = _model()
    with pytest.raises(gradpipe.GradError):
        gradpipe.Optimizer([{"params": list(m.parameters()), "betas": (0.9, 1.5)}], "adam")
    with pytest.raises(gradpipe.GradError):
        gradpipe.Optimizer([{"params": list(m.parameters()), "momentun": 0.5}], "sgd")


# ------------------------------------------------------------------ routing
ROUTED = "route ndim >= 2: grad | adam\nroute default: grad | sign\n"


def test_routing_weights_and_biases() -> None:
    m = _model()
    ref = copy.deepcopy(m)
    opt = gradpipe.Optimizer(m.named_parameters(), ROUTED, lr=0.01)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.ndim >= 2], lr=0.01)
    for (name, p) in m.named_parameters():
        assert opt.route_of(p) == ("ndim>=2" if p.ndim >= 2 else "default"), name
    for t in range(4):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt.zero_grad()
        ref_opt.zero_grad()
        _loss(m, t).backward()
        _loss(ref, t).backward()
        opt.step()
        ref_opt.step()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            if p.ndim >= 2:  # adam route: as torch Adam
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
            else:  # sign route: p - lr * sign(g)
                torch.testing.assert_close(p.detach(), before[name] - 0.01 * torch.sign(p.grad), msg=name)
                q.data.copy_(p.detach())
    bias = m[0].bias
    weight = m[0].weight
    assert "main/adam.m" not in opt.state[bias] and not any("adam" in k for k in opt.state[bias])
    assert any("adam" in k for k in opt.state[weight])


def test_routing_by_name() -> None:
    """Glob and regex selectors match parameter names; labels are the selector text without spaces."""
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(),
                             'route "*.bias": grad | sign\nroute /^0\\./ and ndim >= 2: grad | adam\n'
                             'route default: grad', lr=0.1)
    labels = {n: opt.route_of(p) for n, p in m.named_parameters()}
    assert labels == {"0.weight": "/^0\\./andndim>=2", "0.bias": '"*.bias"', "2.weight": "default",
                      "2.bias": '"*.bias"'}
    before = _params(m)
    _loss(m, 0).backward()
    opt.step()
    for (name, p), p0 in zip(m.named_parameters(), before):
        if labels[name] == "default":  # plain SGD
            torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad, msg=name)
        elif labels[name] == '"*.bias"':
            torch.testing.assert_close(p.detach(), p0 - 0.1 * torch.sign(p.grad), msg=name)


def test_overlapping_routes_raise_with_names() -> None:
    m = _model()
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(m.named_parameters(), "route ndim >= 2: grad | adam\nroute numel > 3: grad | sign\n"
                                                 "route default: grad")
    msg = str(e.value)
    assert "0.weight" in msg and "2.weight" in msg  # the weights match both
    assert "bias" not in msg.split("(e.g.")[0]  # 0.bias only matches numel > 3, 2.bias only default


def test_uncovered_params_raise_with_names() -> None:
    m = _model()
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(m.named_parameters(), "route ndim >= 2: grad | adam")
    msg = str(e.value)
    assert "0.bias" in msg and "2.bias" in msg and "0.weight" not in msg


def test_name_routes_need_named_params() -> None:
    m = _model()
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(m.parameters(), 'route "*.bias": grad | sign\nroute default: grad | adam')
    assert "name" in str(e.value)
    # shape-only routes work without names
    gradpipe.Optimizer(m.parameters(), ROUTED)


def test_add_param_group_after_construction_routes_new_params() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(), ROUTED, lr=0.01)
    extra_w = torch.nn.Parameter(torch.randn(3, 2))
    extra_b = torch.nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [("extra.weight", extra_w), ("extra.bias", extra_b)], "lr": 0.5})
    assert opt.route_of(extra_w) == "ndim>=2" and opt.route_of(extra_b) == "default"
    assert opt.param_groups[1]["lr"] == 0.5
    b0 = extra_b.detach().clone()
    extra_w.grad = torch.randn(3, 2)
    extra_b.grad = torch.tensor([0.3, -2.0])
    _loss(m, 0).backward()
    opt.step()
    torch.testing.assert_close(extra_b.detach(), b0 - 0.5 * torch.tensor([1.0, -1.0]))
    assert "main/adam.m" not in opt.state[extra_b]
    assert any("adam" in k for k in opt.state[extra_w])


def test_add_param_group_uncovered_raises() -> None:
    m = _model()
    opt = gradpipe.Optimizer(m.named_parameters(), 'route "0.*": grad | adam\nroute "2.*": grad | sign')
    head = torch.nn.Parameter(torch.randn(2, 2))
    with pytest.raises(gradpipe.GradError) as e:
        opt.add_param_group({"params": [("head.weight", head)]})
    assert "head.weight" in str(e.value)
    # the rejected group is not kept: the optimizer still steps (as torch, which validates first)
    assert len(opt.param_groups) == 1
    head.grad = torch.ones(2, 2)
    _loss(m, 0).backward()
    opt.step()


# ------------------------------------------------------------------ how a pipeline is given
def test_pipeline_forms(tmp_path: pathlib.Path) -> None:
    src = "hparam lr = 0.1 in [0, inf)\ngrad | sign\n"
    path = tmp_path / "signsgd.grad"
    path.write_text(src)
    forms = {
        "text": "grad | sign",
        "program": gradpipe.compile(src),
        "path": path,
        "path-str": str(path),
    }
    for label, pipe in forms.items():
        p = torch.nn.Parameter(torch.zeros(3))
        opt = gradpipe.Optimizer([p], pipe, lr=0.1)
        p.grad = torch.tensor([2.0, -0.5, 0.0])
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, 0.0]), msg=label)
    assert gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(1))], path).program.name == "signsgd"


def test_builtin_name_and_builtin_path_agree() -> None:
    by_name = gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(1))], "adamw").program
    by_path = gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(1))],
                                 gradpipe.compiler.program.builtin_dir() / "adamw.grad").program
    assert by_name.hash == by_path.hash


def test_unknown_builtin_name_raises() -> None:
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(1))], "adamm")
    assert "adam" in str(e.value)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_step_counters_follow_each_parameter_through_skips_loads_and_hand_edits(backend):
    """The counters of parameters stepped together share one tensor (one op per step); each
    parameter's count is still its own: a parameter without a gradient is not counted, and a
    counter replaced by ``load_state_dict`` or by hand is picked up."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = gradpipe.Optimizer([a, b], "adam", backend=backend, lr=0.1)

    def step(*ps):
        opt.zero_grad()
        sum(p.sum() for p in ps).backward()
        opt.step()

    def counts():
        return [opt.state[a]["step"].item(), opt.state[b]["step"].item()]

    step(a, b)
    step(a, b)
    step(a)  # b gets no gradient
    assert counts() == [3, 2]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(a, b)
    assert counts() == [4, 3]
    opt.state[a]["step"] = torch.tensor(10.0)
    step(a, b)
    assert counts() == [11, 4]
    assert all(opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0 for p in (a, b))
