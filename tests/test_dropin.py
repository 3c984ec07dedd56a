"""gradpipe.Optimizer as a drop-in for torch.optim: copy and pickle, torch's keyword arguments,
param-group metadata, state-dict hooks, duplicate, sparse and complex parameters. Each case
beside ``torch.optim.Adam`` as the control, on both backends (docs/language.md 11).

The compiled tests share one model shape (``nn.Linear(4, 3)``) and pipeline (``adam``), so
Inductor compiles them once."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import gradpipe

BACKENDS = ["eager", "compiled"]


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _data(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=g) for _ in range(6)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, xs: list[torch.Tensor]) -> None:
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _snapshot(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def _same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --------------------------------------------------------------------------- 1. deepcopy and pickle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_is_independent_and_continues_identically(backend: str, how: str) -> None:
    xs = _data()
    runs = {}
    for kind in ("torch", "gradpipe"):
        model = _model()
        opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if kind == "torch" else
               gradpipe.Optimizer(model.named_parameters(), "adam", lr=1e-2, backend=backend))
        _train(model, opt, xs[:2])
        if how == "deepcopy":
            model2, opt2 = copy.deepcopy((model, opt))
        else:
            model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
        assert opt2.param_groups[0]["params"][0] is model2.weight  # the copy steps the copied model
        before = _snapshot(opt)
        params_before = [p.detach().clone() for p in model.parameters()]
        _train(model2, opt2, xs[2:])  # stepping the copy leaves the original alone
        assert _same_state(_snapshot(opt), before)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
        _train(model, opt, xs[2:])  # ... and the original then ends where the copy did
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)
        assert _same_state(_snapshot(opt), _snapshot(opt2))
        runs[kind] = [p.detach().clone() for p in model2.parameters()]
    for p, q in zip(runs["torch"], runs["gradpipe"]):  # the control: torch.optim.Adam, copied the same way
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_copy_keeps_the_pipeline_and_counters() -> None:
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), "grad | clip_norm(1.0) | adam", lr=1e-2, backend="eager")
    _train(model, opt, _data()[:2])
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2.program.hash == opt.program.hash and opt2.backend == "eager"
    assert opt2.state_dict()["gradpipe"]["nonfinite"] == opt.state_dict()["gradpipe"]["nonfinite"]
    assert [p.shape for p in opt2.param_groups[0]["params"]] == [p.shape for p in model.parameters()]
    assert opt2.param_groups[0]["param_names"] == ["weight", "bias"]


# --------------------------------------------------------------------------- 2. torch's keyword arguments
TORCH_DEFAULTS = dict(foreach=None, fused=None, capturable=False, differentiable=False, maximize=False,
                      amsgrad=False, decoupled_weight_decay=False)


def test_torch_keyword_arguments_at_their_defaults() -> None:
    xs = _data()
    m1, m2 = _model(), _model()
    ref = torch.optim.Adam(m1.parameters(), lr=1e-2, **TORCH_DEFAULTS)
    opt = gradpipe.Optimizer(m2.named_parameters(), "adam", lr=1e-2, backend="eager", **TORCH_DEFAULTS)
    _train(m1, ref, xs)
    _train(m2, opt, xs)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # torch's options kept in every param group, as torch keeps them (code reads group["maximize"])
    for k in ("maximize", "foreach", "capturable", "differentiable", "fused"):
        assert opt.param_groups[0][k] == ref.param_groups[0][k]
    # SGD's and RMSprop's options at their defaults, and foreach/fused=False
    gradpipe.Optimizer(_model().parameters(), "sgd", lr=0.1, nesterov=False, maximize=False, foreach=False,
                       backend="eager")
    gradpipe.Optimizer(_model().parameters(), "adam", centered=False, fused=False, backend="eager")


@pytest.mark.parametrize("kw, hint", [({"maximize": True}, "write it in the pipeline"),
                                      ({"capturable": True}, "capturable=False"),
                                      ({"amsgrad": True}, "pipeline"),
                                      ({"differentiable": True}, "not differentiable")])
def test_torch_keyword_arguments_at_other_values_are_refused(kw: dict, hint: str) -> None:
    """On a pipeline that does not declare the option (the built-in adam declares maximize and amsgrad)."""
    (name, _), = kw.items()
    with pytest.raises(ValueError, match=name) as info:
        gradpipe.Optimizer(_model().parameters(), "lion", backend="eager", **kw)
    assert hint in str(info.value)
    with pytest.raises(ValueError, match=name):  # in a param group too
        gradpipe.Optimizer([{"params": _model().parameters(), **kw}], "lion", backend="eager")
    if name in ("maximize", "amsgrad"):  # the built-in adam has them
        gradpipe.Optimizer(_model().parameters(), "adam", backend="eager", **kw)


def test_kernel_options_are_accepted_at_any_value_and_kept_as_given() -> None:
    """foreach and fused choose torch's kernels, never the math: gradpipe picks its own."""
    opt = gradpipe.Optimizer(_model().parameters(), "adamw", foreach=True, fused=False, backend="eager")
    assert (opt.param_groups[0]["foreach"], opt.param_groups[0]["fused"]) == (True, False)
    gradpipe.Optimizer([{"params": _model().parameters(), "fused": True}], "adamw", backend="eager")


@pytest.mark.parametrize("pipeline, torch_class", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_groups_hold_the_keys_of_torchs_groups(pipeline, torch_class) -> None:
    """torch's AdamW keeps decoupled_weight_decay=True in every group (Adam: False), and clients
    read it (a KeyError before); adamw accepts it only at True, as it decays decoupled."""
    ref = torch_class(_model().parameters()).param_groups[0]
    opt = gradpipe.Optimizer(_model().parameters(), pipeline, backend="eager")
    ours = opt.param_groups[0]
    assert set(ours) - {"param_names"} == set(ref)
    assert {k: ours[k] for k in ref if k != "params"} == {k: v for k, v in ref.items() if k != "params"}
    sd = opt.state_dict()
    del sd["param_groups"][0]["decoupled_weight_decay"]  # a dict saved before it was kept
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["decoupled_weight_decay"] is ref["decoupled_weight_decay"]
    gradpipe.Optimizer(_model().parameters(), "adamw", decoupled_weight_decay=True, backend="eager")
    with pytest.raises(ValueError, match="decoupled_weight_decay=True and accepts only that value"):
        gradpipe.Optimizer([{"params": _model().parameters(), "decoupled_weight_decay": False}], "adamw",
                           backend="eager")


def test_a_torch_dict_saved_with_kernel_or_gpu_options_loads() -> None:
    m = _model()
    ref = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    ref.step()
    sd = ref.state_dict()
    sd["param_groups"][0]["capturable"] = True  # as saved on a GPU
    opt = gradpipe.Optimizer(m.parameters(), "adamw", lr=1e-3, backend="eager")
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[m.weight]["main/exp_avg/ema.m"], ref.state[m.weight]["exp_avg"])


@pytest.mark.parametrize("key, value", [("weight_decay", 0.5), ("momentum", 0.9), ("betas", (0.9, 0.95))])
def test_a_torch_hyperparameter_the_pipeline_does_not_declare_is_refused_in_a_group(key, value) -> None:
    """Kept as metadata it would change nothing, silently (a decay / no-decay split on a
    pipeline without weight_decay): it is an unknown hyperparameter, as a keyword argument is."""
    with pytest.raises(gradpipe.GradError, match=f"unknown hyperparameter '{key}'"):
        gradpipe.Optimizer([{"params": _model().parameters(), key: value}], "noisy_sgd", lr=0.1,
                           backend="eager")
    # at the value where torch's optimizers do nothing with it, it is the user's metadata
    if key in ("weight_decay", "momentum"):
        gradpipe.Optimizer([{"params": _model().parameters(), key: 0}], "noisy_sgd", lr=0.1, backend="eager")


def test_a_declared_hyperparameter_of_a_torch_option_name_is_that_hyperparameter() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = gradpipe.Optimizer([p], "hparam maximize = 0.0 in [0, 1]\ngrad | scale(1 - 2 * maximize)", lr=0.1,
                             maximize=1.0, backend="eager")
    assert opt.param_groups[0]["maximize"] == 1.0
    p.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 1.1))  # ascended


def test_old_state_dict_without_torch_option_keys_loads_with_them() -> None:
    opt = gradpipe.Optimizer(_model().parameters(), "adam", backend="eager")
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for k in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            del g[k]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["foreach"] is None


# --------------------------------------------------------------------------- 3. param-group metadata
def test_param_group_metadata_is_kept_and_round_trips() -> None:
    groups = lambda m: [{"params": [m.weight], "name": "encoder", "tags": ["a"]},  # noqa: E731
                        {"params": [m.bias], "name": "bias", "lr": 1e-3}]
    m1, m2 = _model(), _model()
    ref = torch.optim.Adam(groups(m1), lr=1e-2)
    opt = gradpipe.Optimizer(groups(m2), "adam", lr=1e-2, backend="eager")
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in ref.param_groups] == ["encoder", "bias"]
    _train(m1, ref, _data()[:2])
    _train(m2, opt, _data()[:2])
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    sd = opt.state_dict()
    assert [g["name"] for g in sd["param_groups"]] == ["encoder", "bias"]
    fresh = gradpipe.Optimizer(groups(_model()), "adam", backend="eager")
    fresh.param_groups[0]["name"] = "renamed"
    fresh.load_state_dict(sd)
    assert [g["name"] for g in fresh.param_groups] == ["encoder", "bias"]
    assert fresh.param_groups[0]["tags"] == ["a"] and fresh.param_groups[1]["lr"] == 1e-3
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "name": "head"})
    assert opt.param_groups[-1]["name"] == "head"


def test_a_misspelt_hyperparameter_in_a_group_is_still_an_error() -> None:
    src = "hparam beta = 0.9 in [0, 1)\ngrad | ema(beta)"
    with pytest.raises(gradpipe.GradError, match="unknown hyperparameter 'bta'") as info:
        gradpipe.Optimizer([{"params": _model().parameters(), "bta": 0.5}], src, backend="eager")
    assert "did you mean 'beta'?" in info.value.hint
    # keyword arguments are hyperparameters only: an unknown one stays an error
    with pytest.raises(gradpipe.GradError, match="unknown hyperparameter 'name'"):
        gradpipe.Optimizer(_model().parameters(), src, name="x", backend="eager")


# --------------------------------------------------------------------------- 4. state-dict hooks
def test_state_dict_hooks_behave_as_torch() -> None:
    seen: dict[str, list] = {"torch": [], "gradpipe": []}
    for kind in ("torch", "gradpipe"):
        model = _model()
        opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if kind == "torch" else
               gradpipe.Optimizer(model.parameters(), "adam", lr=1e-2, backend="eager"))
        _train(model, opt, _data()[:2])
        log = seen[kind]
        opt.register_state_dict_pre_hook(lambda o: log.append("sd-pre"))

        def sd_post(o, sd):
            log.append(("sd-post", sorted(sd)))
            return {**sd, "extra": 1}
        opt.register_state_dict_post_hook(sd_post)
        sd = opt.state_dict()
        assert sd["extra"] == 1

        other_model = _model(5)
        other = (torch.optim.Adam(other_model.parameters(), lr=1e-2) if kind == "torch" else
                 gradpipe.Optimizer(other_model.parameters(), "adam", lr=1e-2, backend="eager"))

        def pre(o, loaded):
            log.append(("load-pre", len(loaded["state"])))
            loaded = dict(loaded)
            loaded["param_groups"] = [{**g, "lr": 0.5} for g in loaded["param_groups"]]
            return loaded

        def post(o):
            p = o.param_groups[0]["params"][0]
            log.append(("load-post", len(o.state), float(o.state[p]["step"]), o.param_groups[0]["lr"]))
            # the post-hook sees the loaded state itself
            assert torch.equal(o.state[p]["exp_avg" if kind == "torch" else "main/exp_avg/ema.m"],
                               sd["state"][0]["exp_avg" if kind == "torch" else "main/exp_avg/ema.m"])
        other.register_load_state_dict_pre_hook(pre)
        other.register_load_state_dict_post_hook(post)
        other.load_state_dict(sd)
    assert seen["gradpipe"][0] == "sd-pre" and seen["gradpipe"][2:] == seen["torch"][2:]
    assert seen["gradpipe"][2:] == [("load-pre", 2), ("load-post", 2, 2.0, 0.5)]
    # the state_dict post-hook sees the whole state dict, gradpipe's part included
    assert seen["gradpipe"][1] == ("sd-post", ["gradpipe", "param_groups", "state"])
    assert seen["torch"][1] == ("sd-post", ["param_groups", "state"])


# --------------------------------------------------------------------------- 5. a parameter listed twice
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_parameter_warns_and_steps_as_torch(backend: str) -> None:
    finals = []
    for kind in ("torch", "gradpipe"):
        model = _model()
        ps = [model.weight, model.bias, model.weight]
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = (torch.optim.Adam(ps, lr=1e-2) if kind == "torch" else
                   gradpipe.Optimizer(ps, "adam", lr=1e-2, backend=backend))
        _train(model, opt, _data()[:3])
        finals.append([p.detach().clone() for p in model.parameters()])
        assert float(opt.state[model.weight]["step"]) == 6 and float(opt.state[model.bias]["step"]) == 3
    for p, q in zip(*finals):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_parameter_in_two_groups_is_refused_as_in_torch() -> None:
    m = _model()
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.Adam([{"params": [m.weight]}, {"params": [m.weight]}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        gradpipe.Optimizer([{"params": [m.weight]}, {"params": [m.weight]}], "adam", backend="eager")


# --------------------------------------------------------------------------- 6. sparse gradients
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_is_a_clear_error(backend: str) -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ref = torch.optim.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):  # the control
        ref.step()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = gradpipe.Optimizer(emb.named_parameters(), "adam", backend=backend)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 'weight' has a sparse gradient.*sparse=False"):
        opt.step()
    assert torch.equal(emb.weight, before)


# --------------------------------------------------------------------------- 7. complex parameters
def _complex_run(make, steps: int = 6) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex128)),
          torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = make(ps)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(4, dtype=torch.complex128, generator=g)
        opt.zero_grad()
        ((ps[0] @ x).abs().pow(2).sum() + ps[1].pow(3).sum()).backward()
        opt.step()
    return [p.detach().clone() for p in ps], opt


CASES = [("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
         ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
         ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True))]


@pytest.mark.parametrize("backend, case", [("eager", c) for c in CASES] + [("compiled", CASES[0])],
                         ids=lambda v: v if isinstance(v, str) else v[0])
def test_complex_parameters_step_as_real_and_imaginary_parts_as_torch(backend: str, case) -> None:
    name, cls, kw = case
    ref, _ = _complex_run(lambda ps: cls(ps, **kw))
    got, opt = _complex_run(lambda ps: gradpipe.Optimizer(ps, name, backend=backend, **kw))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
    z = opt.param_groups[0]["params"][0]
    # the state is in the real layout (torch.view_as_real), and loads back
    assert all(v.shape == (3, 4, 2) for k, v in opt.state[z].items() if k != "step")
    again = gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.complex128)),
                                torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], name, backend=backend, **kw)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["step"], opt.state[z]["step"])


def test_complex_state_of_the_wrong_shape_is_refused() -> None:
    _, opt = _complex_run(lambda ps: gradpipe.Optimizer(ps, "adam", backend="eager"), steps=1)
    other = gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.complex128)),
                                torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], "adam", backend="eager")
    with pytest.raises(gradpipe.GradError, match=r"needs \(4, 3, 2\)"):
        other.load_state_dict(opt.state_dict())
