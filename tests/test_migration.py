"""Loading a checkpoint into an edited pipeline (``gradpipe/runtime/migration.py``).

Each test trains pipeline A for a few steps, checkpoints it, and loads the state dict
into an optimizer of an edited pipeline B: the buffers of the nodes B kept must come
back bitwise, B's new nodes must start as in a fresh optimizer, and what B dropped must
be reported (a ``StateMigrationWarning`` and ``opt.last_migration``). A state dict of an
unrelated pipeline is a ``GradError``. Both backends; float64, so the compiled backend
can be held to the eager one closely.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import gradpipe
from gradpipe.runtime.migration import StateMigrationWarning

BACKENDS = ["eager", "compiled"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (12,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _checkpoint(opt: torch.optim.Optimizer) -> dict:
    """The state dict through torch.save / torch.load(weights_only=True), as from a file."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _trained(pipeline: str, backend: str = "eager", steps: int = 4, **hp) -> tuple[torch.nn.Module, dict]:
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), pipeline, backend=backend, lr=1e-2, **hp)
    _train(model, opt, steps)
    return model, _checkpoint(opt)


def _load(model: torch.nn.Module, pipeline: str, sd: dict, backend: str = "eager", **hp):
    """A copy of ``model`` and an optimizer of ``pipeline`` that loaded ``sd``; the warnings it gave."""
    m = copy.deepcopy(model)
    opt = gradpipe.Optimizer(m.named_parameters(), pipeline, backend=backend, lr=1e-2, **hp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(sd)
    return m, opt, [w for w in caught if issubclass(w.category, StateMigrationWarning)]


def _saved(sd: dict, i: int, key: str) -> torch.Tensor:
    return sd["state"][i][key]


# ------------------------------------------------------------------------ the same pipeline
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_pipeline_loads_without_a_warning(backend):
    model, sd = _trained("scalpel", backend)
    _, opt, caught = _load(model, "scalpel", sd, backend)
    assert caught == []
    report = opt.last_migration
    assert not report.changed and report.dropped == [] and report.new == []
    assert report.carried == ["main/clip_median.m", "main/diffgrad.m", "main/diffgrad.prev", "main/diffgrad.v",
                              "main/project_orthogonal/ema.m"]
    assert report.diff is not None and report.diff.is_empty


def test_a_fresh_optimizer_has_no_migration_report():
    assert gradpipe.Optimizer([torch.nn.Parameter(torch.ones(2))], "adam").last_migration is None


# ------------------------------------------------------------------------ edits
@pytest.mark.parametrize("backend", BACKENDS)
def test_inserting_a_stateless_op_carries_everything(backend):
    """clip_norm inserted before adam: the state schema is the same, the load is plain."""
    model, sd = _trained("grad | adam", backend)
    m, opt, caught = _load(model, "grad | clip_norm(1.0) | adam", sd, backend)
    assert caught == [] and not opt.last_migration.changed
    assert opt.last_migration.diff.nodes_added == {"main/clip_norm": "clip_norm(max=1.0, scope=global) <- main/grad"}
    for i, p in enumerate(m.parameters()):
        for k in ("main/adam.m", "main/adam.v", "step"):
            assert torch.equal(opt.state[p][k], _saved(sd, i, k)), k
    _train(m, opt, 2, start=4)
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_adding_a_stateful_node_starts_it_afresh(backend):
    """ema inserted before adam: adam's state comes back bitwise; the ema has no state after
    loading and, after one step, exactly the state a fresh optimizer's first step gives it."""
    model, sd = _trained("grad | adam", backend)
    edited = "grad | ema(0.9) | adam"
    m, opt, caught = _load(model, edited, sd, backend)
    report = opt.last_migration
    assert report.carried == ["main/adam.m", "main/adam.v"]
    assert report.new == ["main/ema.m"] and report.dropped == [] and report.reset == {}
    assert len(caught) == 1 and "main/ema.m" in str(caught[0].message)
    for i, p in enumerate(m.parameters()):
        assert set(opt.state[p]) == {"main/adam.m", "main/adam.v", "step"}
        for k in ("main/adam.m", "main/adam.v", "step"):
            assert torch.equal(opt.state[p][k], _saved(sd, i, k)), k
            assert opt.state[p][k] is not _saved(sd, i, k)  # a copy, never the checkpoint's tensor

    fresh_m = copy.deepcopy(model)
    fresh = gradpipe.Optimizer(fresh_m.named_parameters(), edited, backend=backend, lr=1e-2)
    _train(m, opt, 1, start=4)
    _train(fresh_m, fresh, 1, start=4)  # same parameters before the step, so the same gradient
    for p, q in zip(m.parameters(), fresh_m.parameters()):
        assert torch.equal(opt.state[p]["main/ema.m"], fresh.state[q]["main/ema.m"])
        assert float(opt.state[p]["step"]) == 5 and float(fresh.state[q]["step"]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_removing_a_node_reports_its_buffers(backend):
    """scalpel without clip_median: the other buffers come back bitwise, clip_median's are dropped."""
    model, sd = _trained("scalpel", backend)
    m, opt, caught = _load(model, "grad | project_orthogonal(ema) | scale(diffgrad)", sd, backend)
    report = opt.last_migration
    assert report.dropped == ["main/clip_median.m"] and report.new == []
    assert report.diff.nodes_removed.keys() == {"main/clip_median"}
    assert len(caught) == 1
    assert "dropped: main/clip_median.m" in str(caught[0].message)
    for i, p in enumerate(m.parameters()):
        assert "main/clip_median.m" not in opt.state[p]
        for k in ("main/project_orthogonal/ema.m", "main/diffgrad.m", "main/diffgrad.v", "main/diffgrad.prev"):
            assert torch.equal(opt.state[p][k], _saved(sd, i, k)), k
    _train(m, opt, 2, start=4)
    assert all(torch.isfinite(p).all() for p in m.parameters())


#: Adam as a chain of ops (the built-in adam is written from EMAs and a state cell)
ADAM_OP = ("hparam lr = 0.001 in [0, inf)\nhparam betas = (0.9, 0.999) in [0, 1)\nhparam eps = 1e-8 in [0, inf)\n"
           "hparam weight_decay = 0 in [0, inf)\ngrad | decay(weight_decay) | adam(betas[0], betas[1], eps)\n")


def test_appending_a_second_adam():
    model, sd = _trained(ADAM_OP)
    _, opt, caught = _load(model, "grad | adam | adam", sd)
    report = opt.last_migration
    assert report.carried == ["main/adam.m", "main/adam.v"]
    assert report.new == ["main/adam#2.m", "main/adam#2.v"]
    assert report.hyperparams_removed == ["betas", "eps", "weight_decay"]
    assert all(k not in opt.param_groups[0] for k in ("betas", "eps", "weight_decay"))
    assert len(caught) == 1


def test_changed_hyperparameter_default_keeps_the_saved_value():
    """A changed default does not touch the state; the loaded param group keeps the saved
    value, as torch's load_state_dict does."""
    base = "hparam lr = 1e-2 in [0, inf)\nhparam b1 = 0.9 in [0, 1)\ngrad | adam(b1)\n"
    model, sd = _trained(base, b1=0.8)
    _, opt, caught = _load(model, base.replace("0.9", "0.95"), sd)
    assert caught == [] and not opt.last_migration.changed
    assert opt.param_groups[0]["b1"] == 0.8
    assert opt.last_migration.diff.hyperparams_changed["b1"][0].text() == "default: 0.9 -> 0.95"


def test_an_added_hyperparameter_takes_this_optimizers_value():
    """Before migration the loaded group lacked 'wd' and the next step failed with a KeyError."""
    model, sd = _trained("grad | adam")
    m, opt, caught = _load(model, "hparam wd = 0.1 in [0, 1)\ngrad | adam | decay(wd)", sd, wd=0.05)
    assert opt.last_migration.hyperparams_added == ["wd"]
    assert opt.param_groups[0]["wd"] == 0.05
    assert len(caught) == 1 and "hyperparameters added: wd" in str(caught[0].message)
    _train(m, opt, 1, start=4)


def test_changed_buffers_reset_the_node():
    """rms(centered=true) keeps v and g_avg, rms(centered=false) only v: the node starts afresh."""
    model, sd = _trained("grad | rms(0.99, 1e-8, true) | momentum(0.9)")
    m, opt, caught = _load(model, "grad | rms(0.99, 1e-8, false) | momentum(0.9)", sd)
    report = opt.last_migration
    assert report.reset == {"main/rms": "its buffers changed from v,g_avg to v"}
    assert report.carried == ["main/momentum.buf"]
    assert report.dropped == ["main/rms.g_avg", "main/rms.v"] and report.new == ["main/rms.v"]
    for i, p in enumerate(m.parameters()):
        assert set(opt.state[p]) == {"main/momentum.buf", "step"}
        assert torch.equal(opt.state[p]["main/momentum.buf"], _saved(sd, i, "main/momentum.buf"))
    assert "reset because their op or buffers changed: main/rms" in str(caught[0].message)


def test_renaming_a_definition_renames_its_state():
    """A def adds its name to the nodes under it: renaming it drops and re-creates their state."""
    src = "def {name}() = project_orthogonal(ema)\ngrad | {name} | adam\n"
    model, sd = _trained(src.format(name="surgery"))
    _, opt, caught = _load(model, src.format(name="scalpel"), sd)
    report = opt.last_migration
    assert report.carried == ["main/adam.m", "main/adam.v"]
    assert report.dropped == ["main/surgery/project_orthogonal/ema.m"]
    assert report.new == ["main/scalpel/project_orthogonal/ema.m"]
    assert len(caught) == 1


def test_node_state_is_carried_and_dropped_with_its_node():
    model, sd = _trained("grad | noise(0.01, 0.55, seed=3) | sign")
    _, opt, _ = _load(model, "grad | noise(0.01, 0.55, seed=3) | adam", sd)
    assert opt.last_migration.node_state_carried == ["main/noise"]
    assert torch.equal(opt._node_state["main/noise"]["generator"].get_state(),
                       sd["gradpipe"]["node_state"]["main/noise"]["rng"])
    model, sd = _trained("grad | noise(0.01, 0.55, seed=3) | adam")
    _, opt, caught = _load(model, "grad | adam", sd)
    assert opt.last_migration.node_state_dropped == ["main/noise"]
    assert "node state dropped: main/noise" in str(caught[0].message)


def test_a_state_dict_without_the_structure_still_migrates():
    """State dicts saved before the structure was recorded: the schema is enough."""
    model, sd = _trained("grad | adam")
    for key in ("structure", "hyperparams"):
        del sd["gradpipe"][key]
    _, opt, caught = _load(model, "grad | ema | adam", sd)
    assert opt.last_migration.new == ["main/ema.m"] and opt.last_migration.diff is None
    assert len(caught) == 1


# ------------------------------------------------------------------------ the compiled backend
@pytest.mark.parametrize("first,second", [("eager", "compiled"), ("compiled", "eager"), ("compiled", "compiled")])
def test_migrated_state_reaches_the_compiled_flat_buffers(first, second):
    """Saved on one backend, loaded into an edited pipeline on another, trained on: the same as
    the all-eager run, so the carried state is what the compiled segments read."""
    a, b = "scalpel", "grad | project_orthogonal(ema) | clip_median | ema(0.5) | scale(diffgrad)"
    model, sd = _trained(a, first)
    ref_model, ref_sd = _trained(a, "eager")
    m, opt, _ = _load(model, b, sd, second)
    ref_m, ref_opt, _ = _load(ref_model, b, ref_sd, "eager")
    _train(m, opt, 3, start=4)
    _train(ref_m, ref_opt, 3, start=4)
    for p, q in zip(m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # and the carried state did matter: without it the run differs
    control_m = copy.deepcopy(model)
    control = gradpipe.Optimizer(control_m.named_parameters(), b, backend="eager", lr=1e-2)
    _train(control_m, control, 3, start=4)
    assert not all(torch.allclose(p, q) for p, q in zip(control_m.parameters(), ref_m.parameters()))
    if second == "compiled":
        ms = [opt.state[p]["main/diffgrad.m"] for p in m.parameters()]
        assert len({t.untyped_storage().data_ptr() for t in ms}) == 1  # views of one flat buffer


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unrelated_pipeline_is_refused(backend, tmp_path):
    model, sd = _trained("adam", backend)
    f = tmp_path / "mine.grad"
    f.write_text("grad | lion(0.9, 0.99) | decay(0.1)\n")
    m = copy.deepcopy(model)
    opt = gradpipe.Optimizer(m.named_parameters(), str(f), backend=backend, lr=1e-2)
    with pytest.raises(gradpipe.GradError) as info:
        opt.load_state_dict(sd)
    err = info.value
    assert err.path == str(f) and (err.line, err.column) == (1, 1)
    assert "this state dict is from another pipeline ('adam'" in err.message
    assert "no node keeps state in both" in err.message
    assert "main/exp_avg/ema.m, main/exp_avg_sq/ema.m" in err.message and "'mine' keeps main/lion.m" in err.message
    assert "gradpipe diff" in err.hint
    assert opt.state_dict()["state"] == {} and opt.last_migration is None  # nothing was loaded


def test_a_stateless_checkpoint_does_not_load_into_a_stateful_pipeline():
    model, sd = _trained("grad | sign")
    with pytest.raises(gradpipe.GradError, match="it keeps no state, '<string>' keeps main/adam.m"):
        _load(model, "grad | sign | adam", sd)
    _, opt, caught = _load(model, "grad | clip_norm(1.0) | sign", sd)  # both stateless: nothing to lose
    assert caught == [] and not opt.last_migration.changed


def test_a_shape_mismatch_names_the_buffer_and_loads_nothing():
    model, sd = _trained("grad | ema(0.9) | adam")
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    src = "grad | ema(0.9) | adam\n"
    opt = gradpipe.Optimizer(other.named_parameters(), gradpipe.compile(src, "edited.grad"), lr=1e-2)
    with pytest.raises(gradpipe.GradError) as info:
        opt.load_state_dict(sd)
    err = info.value
    assert "buffer 'main/ema.m' of parameter '0.weight' has shape (7, 5)" in err.message
    assert "needs (5, 7)" in err.message
    assert (err.path, err.line, err.column) == ("edited.grad", 1, 8)  # the ema in the source
    assert opt.state_dict()["state"] == {}


def test_a_param_group_mismatch_is_torchs_error():
    model, sd = _trained("adam")
    ps = list(copy.deepcopy(model).parameters())
    opt = gradpipe.Optimizer([{"params": ps[:2]}, {"params": ps[2:]}], "adam")
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(sd)
