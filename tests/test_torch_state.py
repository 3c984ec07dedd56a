"""State interop with torch.optim: load_state_dict accepts a torch.optim state dict of the same
algorithm, to_torch_state_dict exports one torch loads (docs/language.md §12)."""

from __future__ import annotations

import pytest
import torch

import gradpipe
from gradpipe.runtime.torch_state import torch_layout

# (pipeline, torch class, options for both)
CASES = {
    "adam": ("adam", torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)),
    "adamw": ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "adam_amsgrad_maximize": ("adam", torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1)),
    "adam_decoupled": ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw_amsgrad": ("adamw", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "sgd_maximize": ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, maximize=True)),
    "sgd_momentum": ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "sgd_plain": ("sgd", torch.optim.SGD, dict(lr=0.05, weight_decay=0.01)),
    "nesterov": ("nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
    "rmsprop": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.01)),
    "rmsprop_centered_momentum": ("rmsprop", torch.optim.RMSprop,
                                  dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.5)),
    "rmsprop_centered": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, centered=True)),
    "rmsprop_momentum": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.7)),
    # maximize: the pipeline's `where(maximize, -grad, grad)` in front of the chain
    "sgd_maximize_momentum": ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, maximize=True)),
    "rmsprop_maximize_centered": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, centered=True, maximize=True)),
}
COMPILED = ("adamw", "adam_amsgrad_maximize", "rmsprop_centered_momentum")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _train(model, opt, steps):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-9)


def _params(backend):
    return [(c, "eager") for c in CASES] + [(c, "compiled") for c in COMPILED] if backend is None else backend


@pytest.mark.parametrize("case,backend", _params(None))
def test_torch_to_gradpipe(case, backend):
    pipeline, cls, kw = CASES[case]
    ref = _model()
    topt = cls(ref.parameters(), **kw)
    _train(ref, topt, 5)
    mine = _model()
    mine.load_state_dict(ref.state_dict())
    gopt = gradpipe.Optimizer(mine.parameters(), pipeline, backend=backend, **kw)
    gopt.load_state_dict(topt.state_dict())
    assert gopt.last_migration is not None and not gopt.last_migration.changed
    _train(ref, topt, 5)
    _train(mine, gopt, 5)
    _assert_same(ref, mine)


@pytest.mark.parametrize("case,backend", _params(None))
def test_gradpipe_to_torch(case, backend):
    pipeline, cls, kw = CASES[case]
    mine = _model()
    gopt = gradpipe.Optimizer(mine.parameters(), pipeline, backend=backend, **kw)
    _train(mine, gopt, 5)
    sd = gopt.to_torch_state_dict()
    assert "gradpipe" not in sd
    ref = _model()
    ref.load_state_dict(mine.state_dict())
    topt = cls(ref.parameters(), **kw)
    topt.load_state_dict(sd)
    # the same keys as torch's own state dict after the same training
    own = _model()
    own_opt = cls(own.parameters(), **kw)
    _train(own, own_opt, 1)
    assert {k: sorted(v) for k, v in sd["state"].items()} == \
           {k: sorted(v) for k, v in own_opt.state_dict()["state"].items()}
    _train(ref, topt, 5)
    _train(mine, gopt, 5)
    _assert_same(ref, mine)


def test_round_trip_and_user_pipeline():
    # a user's pipeline with constants in place of hyperparameters is Adam all the same
    src = "hparam lr = 0.01\ngrad | adam(0.8, 0.99, 1e-8)"
    lay = torch_layout(gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(1))], src).program)
    assert lay.algorithm == "Adam" and lay.buffers == {"main/adam.m": "exp_avg", "main/adam.v": "exp_avg_sq"}
    assert lay.fixed == {"betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0}
    ref = _model()
    topt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.8, 0.99))
    _train(ref, topt, 3)
    mine = _model()
    mine.load_state_dict(ref.state_dict())
    gopt = gradpipe.Optimizer(mine.parameters(), src)
    gopt.load_state_dict(topt.state_dict())
    back = gopt.to_torch_state_dict()
    assert back["param_groups"][0]["betas"] == (0.8, 0.99)
    for k, st in topt.state_dict()["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(back["state"][k][key], v, rtol=0, atol=0)
    _train(ref, topt, 3)
    _train(mine, gopt, 3)
    _assert_same(ref, mine)
    # betas differ from the pipeline's constants: refused, naming them
    other = torch.optim.Adam(_model().parameters(), lr=0.01, betas=(0.9, 0.999))
    with pytest.raises(gradpipe.GradError, match=r"betas=\(0.9, 0.999\).*betas=\(0.8, 0.99\)"):
        gradpipe.Optimizer(_model().parameters(), src).load_state_dict(other.state_dict())


def _torch_dict(cls, steps=2, **kw):
    m = _model()
    o = cls(m.parameters(), **kw)
    _train(m, o, steps)
    return o.state_dict()


def test_other_algorithm_refused():
    adam_sd = _torch_dict(torch.optim.Adam, lr=1e-2)
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer(_model().parameters(), "sgd", momentum=0.9).load_state_dict(adam_sd)
    msg = e.value.message
    assert "torch.optim state dict with exp_avg/exp_avg_sq per parameter (Adam-like)" in msg
    assert "pipeline 'sgd' keeps momentum_buffer" in msg
    sgd_sd = _torch_dict(torch.optim.SGD, lr=1e-2, momentum=0.9)
    with pytest.raises(gradpipe.GradError, match=r"momentum_buffer per parameter \(SGD-like\).*'adam' keeps "
                                                 r"exp_avg, exp_avg_sq, max_exp_avg_sq \(Adam-like"):
        gradpipe.Optimizer(_model().parameters(), "adam").load_state_dict(sgd_sd)
    rms_sd = _torch_dict(torch.optim.RMSprop, lr=1e-2)
    with pytest.raises(gradpipe.GradError, match=r"square_avg per parameter \(RMSprop-like\)"):
        gradpipe.Optimizer(_model().parameters(), "adamw").load_state_dict(rms_sd)
    # plain SGD keeps no state: the param groups tell
    with pytest.raises(gradpipe.GradError, match=r"no state per parameter \(SGD-like\)"):
        gradpipe.Optimizer(_model().parameters(), "adam").load_state_dict(_torch_dict(torch.optim.SGD, lr=0.1))
    with pytest.raises(gradpipe.GradError, match=r"\(like Adagrad\)"):
        gradpipe.Optimizer(_model().parameters(), "adam").load_state_dict(_torch_dict(torch.optim.Adagrad))
    # AMSGrad's state into an Adam without amsgrad (the built-in adam has it)
    with pytest.raises(gradpipe.GradError, match=r"max_exp_avg_sq per parameter \(like Adam with amsgrad=True\)"):
        gradpipe.Optimizer(_model().parameters(), "grad | adam").load_state_dict(
            _torch_dict(torch.optim.Adam, amsgrad=True))
    # AdamW's decoupled decay into an Adam pipeline with L2 decay only (the built-in adam has both)
    with pytest.raises(gradpipe.GradError, match=r"decoupled_weight_decay=True.*decoupled_weight_decay=False"):
        gradpipe.Optimizer(_model().parameters(), "hparam weight_decay = 0.01\ngrad | decay(weight_decay) | adam"
                           ).load_state_dict(_torch_dict(torch.optim.AdamW))
    # weight decay in the dict, none in the pipeline
    with pytest.raises(gradpipe.GradError, match=r"weight_decay=0.1 .*weight_decay=0"):
        gradpipe.Optimizer(_model().parameters(), "hparam lr = 0.01\nhparam betas = (0.9, 0.999)\n"
                           "hparam eps = 1e-8\ngrad | adam(betas[0], betas[1], eps)"
                           ).load_state_dict(_torch_dict(torch.optim.Adam, weight_decay=0.1))
    # a dict of an algorithm gradpipe does not know, with no state yet
    with pytest.raises(gradpipe.GradError, match=r"no state per parameter \(of an unknown algorithm\)"):
        gradpipe.Optimizer(_model().parameters(), "adam").load_state_dict(
            torch.optim.Adadelta(_model().parameters()).state_dict())
    # centered RMSprop into rms(centered=false)
    with pytest.raises(gradpipe.GradError, match=r"grad_avg/square_avg per parameter \(RMSprop-like\); pipeline .* "
                                                 r"keeps square_avg \(RMSprop-like: main/rms.v\), not grad_avg"):
        gradpipe.Optimizer(_model().parameters(), "grad | rms").load_state_dict(
            _torch_dict(torch.optim.RMSprop, centered=True))
    # AdamW without weight decay is Adam: it loads into a pipeline without decay
    gradpipe.Optimizer(_model().parameters(), "grad | adam", lr=1e-3).load_state_dict(
        _torch_dict(torch.optim.AdamW, weight_decay=0))
    # RMSprop momentum into an rms pipeline without momentum
    with pytest.raises(gradpipe.GradError, match=r"keeps square_avg \(RMSprop-like: main/rms.v\), not momentum_buffer"):
        gradpipe.Optimizer(_model().parameters(), "grad | rms").load_state_dict(
            _torch_dict(torch.optim.RMSprop, momentum=0.5))
    # torch.optim.Adam loads AdamW's dict and becomes AdamW: the built-in adam does the same
    opt = gradpipe.Optimizer(_model().parameters(), "adam")
    opt.load_state_dict(_torch_dict(torch.optim.AdamW))
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    # a pipeline with no torch equivalent, both ways
    lion = gradpipe.Optimizer(_model().parameters(), "lion")
    with pytest.raises(gradpipe.GradError, match="Adam-like.*'lion' has no torch.optim equivalent"):
        lion.load_state_dict(adam_sd)
    with pytest.raises(gradpipe.GradError, match="no torch.optim equivalent"):
        lion.to_torch_state_dict()


def test_params_count_differs_refused():
    sd = _torch_dict(torch.optim.Adam, lr=1e-2)
    fewer = torch.nn.Linear(4, 3).double()
    opt = gradpipe.Optimizer(fewer.parameters(), "adam")
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(sd)
    assert not opt.state  # refused before anything changed


def test_torch_step_dtype_and_refusal_leaves_state():
    m = _model()
    opt = gradpipe.Optimizer(m.parameters(), "adam", lr=1e-2)
    _train(m, opt, 2)
    before = {k: v.clone() for k, v in opt.state[next(m.parameters())].items()}
    with pytest.raises(gradpipe.GradError):
        opt.load_state_dict(_torch_dict(torch.optim.SGD, momentum=0.9, lr=0.1))
    after = opt.state[next(m.parameters())]
    assert all(torch.equal(before[k], after[k]) for k in before)
    sd = opt.to_torch_state_dict()
    assert sd["state"][0]["step"].dtype == torch.float32 and float(sd["state"][0]["step"]) == 2
    assert sd["param_groups"][0]["amsgrad"] is False and sd["param_groups"][0]["decoupled_weight_decay"] is False
