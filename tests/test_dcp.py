"""``torch.distributed.checkpoint`` (DCP) with gradpipe: ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, and a DCP save / load resume, alone, under DDP and under FSDP2.

Each case trains ``STEPS`` steps without interruption, and again with a checkpoint after
``SPLIT`` steps: ``dcp.save`` of ``get_model_state_dict`` and ``get_optimizer_state_dict``, then a
fresh model (other initial weights) and a fresh optimizer, ``dcp.load`` into their state dicts,
``set_model_state_dict`` / ``set_optimizer_state_dict``, and the remaining steps. The resumed run
must end bit for bit where the uninterrupted one ends, as torch.optim.Adam's does (the control,
run the same way beside it).

DCP keeps only ``state`` and ``param_groups`` (keyed by parameter name), so gradpipe's own
``"gradpipe"`` entry does not travel: a state dict whose per-parameter keys are all the pipeline's
own buffers is loaded as saved by it (``gradpipe/runtime/migration.py``); state outside the
parameters (``noise``'s generator) starts afresh, with a warning.

The multi-process cases spawn two gloo processes on CPU (a ``FileStore`` rendezvous in
``tmp_path``; the parent waits on the processes, never on sleeps), as ``tests/test_ddp.py`` does.
Under FSDP2 (``fully_shard``) the parameters are DTensors, and both backends keep the state as
DTensors sharded like the parameters: the compiled backend fuses each rank's shards and runs the
reductions (over a tensor, its rows or columns, or the route) on the DTensors. Its runs equal the
eager backend's and torch.optim.Adam's (to the last bits: fused kernels round differently, as in
tests/test_compiled.py), resume bit for bit from DCP, and its two-rank checkpoint resumes in one
process on the eager backend (the same layout); a NaN in one rank's shard skips the step on
every rank; an op DTensors cannot run is the same GradError on both backends.
"""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from spawned import join_group, run_processes
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import gradpipe
from gradpipe import GradError
from gradpipe.runtime.migration import StateMigrationWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch", "ignore::FutureWarning")

STEPS, SPLIT = 6, 3
WORLD = 2
DEADLINE_S = 240  # the compiled backend compiles four segments in each process


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


def _batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``rank`` of ``world`` of the global batch of ``step`` (the same in every process)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 4, generator=g, dtype=torch.float64)
    per = 8 // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _optimizer(model: torch.nn.Module, kind: str, pipeline: str = "adam") -> torch.optim.Optimizer:
    if kind == "torch":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return gradpipe.Optimizer(model.named_parameters(), pipeline, lr=1e-2, backend=kind)


def _train(model, opt, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = _batch(step, rank, world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The full parameters (gathered from their shards under FSDP2)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _resume_matches(wrap, kind: str, ckpt: str, pipeline: str = "adam", rank: int = 0, world: int = 1
                    ) -> tuple[bool, list[torch.Tensor]]:
    """Whether training resumed from a DCP checkpoint at ``SPLIT`` ends bit for bit where the
    uninterrupted run ends; and that run's parameters."""
    model = wrap(_model())
    opt = _optimizer(model, kind, pipeline)
    _train(model, opt, range(STEPS), rank, world)
    want = _params(model)

    model = wrap(_model())
    opt = _optimizer(model, kind, pipeline)
    _train(model, opt, range(SPLIT), rank, world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    del model, opt
    model = wrap(_model(seed=1))  # other weights: the checkpoint must bring them back
    opt = _optimizer(model, kind, pipeline)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    _train(model, opt, range(SPLIT, STEPS), rank, world)
    got = _params(model)
    return all(torch.equal(a, b) for a, b in zip(got, want)), want


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("kind", ["torch", "eager", "compiled"])
def test_get_set_optimizer_state_dict(kind):
    """The state dict of get_optimizer_state_dict (keyed by name, no "gradpipe" entry) loads through
    set_optimizer_state_dict into a fresh optimizer, which goes on as the original does."""
    model = _model()
    opt = _optimizer(model, kind)
    _train(model, opt, range(SPLIT))
    # a copy: the dict holds the optimizer's own tensors, and torch.optim.Adam loads them without
    # copying, so the two Adams would share their moments
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert set(osd) == {"state", "param_groups"} and "0.weight" in osd["state"]
    other = _model(seed=1)
    other.load_state_dict(model.state_dict())
    opt2 = _optimizer(other, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateMigrationWarning)  # the same pipeline: a plain load
        set_optimizer_state_dict(other, opt2, osd)
    _train(model, opt, range(SPLIT, STEPS))
    _train(other, opt2, range(SPLIT, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    if kind != "torch":
        assert opt2.state[other[0].weight]["step"].item() == STEPS


@pytest.mark.parametrize("kind", ["torch", "eager", "compiled"])
def test_dcp_resume_one_process(kind, tmp_path):
    same, _ = _resume_matches(lambda m: m, kind, str(tmp_path / "ckpt"))
    assert same


def test_dcp_resume_scalpel(tmp_path):
    """A pipeline of several stateful ops (EMA, online median, diffGrad) resumes bit for bit too."""
    same, _ = _resume_matches(lambda m: m, "eager", str(tmp_path / "ckpt"), pipeline="scalpel")
    assert same


def test_node_state_travels_in_the_first_param_group():
    """noise's generator lives outside the parameters' state: the first param group carries it
    (with the rest of the "gradpipe" entry), so the noise of the resumed run is the same. A
    flattened dict (``flatten_optimizer_state_dict=True``) keeps only the group keys the live
    optimizer has, so there the generator starts afresh, with a warning."""
    src = "hparam lr = 1e-2\ngrad | noise(0.1, seed=3) | adam"
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), src, backend="eager")
    _train(model, opt, range(2))
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    other = _model(seed=1)
    other.load_state_dict(model.state_dict())
    opt2 = gradpipe.Optimizer(other.named_parameters(), src, backend="eager")
    set_optimizer_state_dict(other, opt2, osd)
    assert "gradpipe" not in opt2.param_groups[0]  # carried in the state dict only
    _train(model, opt, range(2, 4))
    _train(other, opt2, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    third = _model()
    opt3 = gradpipe.Optimizer(third.named_parameters(), src, backend="eager")
    with pytest.warns(StateMigrationWarning, match="no 'gradpipe' entry.*noise"):
        set_optimizer_state_dict(third, opt3, flat, options=StateDictOptions(flatten_optimizer_state_dict=True))


def test_edited_pipeline_migrates_through_a_partial_dcp_load(tmp_path):
    """A checkpoint of an edited pipeline: DCP needs allow_partial_load (the new node's buffers are
    not in it), then gradpipe migrates it node by node as for its own state dicts."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), "hparam lr = 1e-2\ngrad | adam", backend="eager")
    _train(model, opt, range(1))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    other = _model(seed=1)
    edited = gradpipe.Optimizer(other.named_parameters(), "hparam lr = 1e-2\ngrad | adam | momentum(0.9)",
                                backend="eager")
    state = {"optim": get_optimizer_state_dict(other, edited)}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    with pytest.warns(StateMigrationWarning, match="2 buffer"):
        set_optimizer_state_dict(other, edited, state["optim"])
    assert edited.last_migration.carried == ["main/adam.m", "main/adam.v"]
    assert edited.last_migration.new == ["main/momentum.buf"]
    assert "main/momentum.buf" not in edited.state[other[0].weight]  # it starts afresh in the next step
    assert torch.equal(edited.state[other[0].weight]["main/adam.m"], opt.state[model[0].weight]["main/adam.m"])


def test_another_pipelines_dict_is_still_refused():
    """Without the "gradpipe" entry, a dict whose keys this pipeline does not keep is not taken as its own."""
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), "lion", lr=1e-3, backend="eager")
    _train(model, opt, range(1))
    osd = get_optimizer_state_dict(model, opt)
    with pytest.raises(GradError):
        gradpipe.Optimizer(model.named_parameters(), "adam", lr=1e-2, backend="eager").load_state_dict(osd)


# --------------------------------------------------------------------------- two processes
def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model)


def _fsdp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


#: (wrapper, optimizer, pipeline) cases of the two-process test; noisy_sgd's generator is node state,
#: carried by the first param group through DCP; the FSDP2 checkpoints of gradpipe's optimizers are
#: resumed in the parent too, in one process on the eager backend (DCP reshards)
CASES = [("ddp", "torch", "adam"), ("ddp", "eager", "adam"), ("ddp", "compiled", "adam"), ("fsdp", "torch", "adam"),
         ("fsdp", "eager", "adam"), ("fsdp", "compiled", "adam"), ("fsdp", "eager", "noisy_sgd")]
#: reductions fed to a fused segment: per row and per column of a sharded matrix (a rows value is
#: sharded with it, a columns value is not), per tensor, and over the route (``global``, which a
#: fused segment would sum over this rank's shards only), written in the language and as an op
#: (clip_norm), whose result is the update
REDUCTIONS = """hparam lr = 1e-2
route ndim >= 2: grad / (norm(grad, over=rows) + norm(grad, over=cols) + norm(grad, over=global)) | clip_norm(0.5)
route default: grad / (norm(grad, over=tensor) + 1) | clip_norm(0.5)
"""
#: pipelines stepped under FSDP2 beside one unsharded process: elementwise state and two ops that
#: reduce over the route (scalpel's project_orthogonal and clip_median), a factored moment (rows
#: and columns of a sharded matrix), REDUCTIONS, noise drawn whole and sharded, and one that cannot
#: run on a DTensor (error_feedback's top-k index_put_), a GradError naming it. The compiled backend
#: runs those of at most two fused segments (REDUCTIONS has the others' kinds of reduction): each
#: segment costs 10 to 20 s of compiling in each process here
SHARDED = ("scalpel", "adafactor", REDUCTIONS, "noisy_sgd", "econtrol_sgd")
COMPILED_SHARDED = (REDUCTIONS, "noisy_sgd", "econtrol_sgd")


def _key(pipeline: str) -> str:
    return "reductions" if pipeline == REDUCTIONS else pipeline


def _sharded_runs(rank: int) -> dict:
    """Under FSDP2: ``SHARDED`` two steps each on both backends (final parameters, or the
    GradError); the layout of each backend's state; a NaN in one rank's shard; the default backend."""
    out: dict = {}
    for kind, pipelines in (("eager", SHARDED), ("compiled", COMPILED_SHARDED)):
        for pipeline in pipelines:
            model = _fsdp(_model())
            try:
                _train(model, _optimizer(model, kind, pipeline), range(2), rank, WORLD)
                out[f"sharded-{kind}-{_key(pipeline)}"] = _params(model)
            except GradError as e:
                out[f"sharded-{kind}-{_key(pipeline)}"] = str(e)
        model = _fsdp(_model())  # the state is sharded as the parameters, the same on both backends
        opt = _optimizer(model, kind)
        _train(model, opt, range(1), rank, WORLD)
        p = model[0].weight
        m = opt.state[p]["main/exp_avg/ema.m"]
        saved = sorted((k, type(v).__name__, str(getattr(v, "placements", "")))
                       for k, v in get_optimizer_state_dict(model, opt)["state"]["0.weight"].items())
        out[f"fsdp-state-{kind}"] = (type(m).__name__, m.placements == p.placements, tuple(m.to_local().shape),
                                     tuple(p.to_local().shape), saved)
    # a NaN in rank 0's shard only: every rank skips the step (the ranks agree on the check)
    model = _fsdp(_model())
    opt = _optimizer(model, "compiled")
    _train(model, opt, range(1), rank, WORLD)
    before = _params(model)
    x, y = _batch(1, rank, WORLD)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if rank == 0:
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    opt.step()
    out["fsdp-nonfinite"] = (opt.last_step_skipped, all(torch.equal(a, b) for a, b in zip(before, _params(model))))
    # left to the default, the backend is the compiled one, DTensors or not (this process's own
    # default, as tests/conftest.py sets it to eager for the suite)
    os.environ["GRADPIPE_BACKEND"] = "compiled"
    out["fsdp-default"] = gradpipe.Optimizer(_fsdp(_model()).parameters(), "adam").backend
    out["ddp-default"] = gradpipe.Optimizer(_ddp(_model()).parameters(), "adam").backend
    return out


def _worker(rank: int, tmp: str) -> None:
    import faulthandler

    import torch.distributed as dist
    join_group(rank, WORLD, f"{tmp}/rendezvous", tmp, DEADLINE_S)
    out: dict = {}
    try:
        for where, kind, pipeline in CASES:
            wrap = _ddp if where == "ddp" else _fsdp
            case = f"{where}-{kind}-{pipeline}"
            same, final = _resume_matches(wrap, kind, os.path.join(tmp, case), pipeline, rank, WORLD)
            out[case] = {"same": same, "params": final}
            gc.collect()
        out.update(_sharded_runs(rank))
        gc.collect()  # the wrapped models die before the group (see tests/test_ddp.py's _worker)
    finally:
        dist.destroy_process_group()
    if rank == 0:  # one process on the whole batches, the reference for the sharded runs
        for kind, pipeline in {(kind if kind == "torch" else "eager", pipeline) for _, kind, pipeline in CASES}:
            model = _model()
            _train(model, _optimizer(model, kind, pipeline), range(STEPS))
            out[f"single-{kind}-{pipeline}"] = _params(model)
        for pipeline in SHARDED[:-1]:
            model = _model()
            _train(model, _optimizer(model, "eager", pipeline), range(2))
            out[f"single-sharded-{_key(pipeline)}"] = _params(model)
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.slow
def test_dcp_resume_ddp_and_fsdp2_two_processes(tmp_path):
    run_processes(_worker, (str(tmp_path),), WORLD, tmp_path, DEADLINE_S)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for where, kind, pipeline in CASES:
        case = f"{where}-{kind}-{pipeline}"
        single = runs[0][f"single-{kind if kind == 'torch' else 'eager'}-{pipeline}"]
        for rank, run in enumerate(runs):
            assert run[case]["same"], f"{case} rank {rank}: the resumed run differs from the uninterrupted one"
            # the ranks end equal, and where one process on the whole batches ends (up to the last bits:
            # the gradients are averaged over the ranks in another order, see tests/test_ddp.py)
            for a, b, c in zip(run[case]["params"], runs[0][case]["params"], single):
                assert torch.equal(a, b), f"{case} rank {rank}"
                torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    # under FSDP2 the compiled backend ends where the eager one and torch.optim.Adam end
    for kind in ("eager", "torch"):
        for a, b in zip(runs[0]["fsdp-compiled-adam"]["params"], runs[0][f"fsdp-{kind}-adam"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for rank, run in enumerate(runs):
        for kind in ("eager", "compiled"):
            name, same_placements, local, param_local, saved = run[f"fsdp-state-{kind}"]
            assert name == "DTensor" and same_placements and local == param_local == (8, 6), (rank, kind, name)
            assert saved == run["fsdp-state-eager"][4], (rank, kind, saved)  # what DCP saves: the same layout
        assert run["fsdp-nonfinite"] == (True, True), (rank, run["fsdp-nonfinite"])
    for kind, pipelines in (("eager", SHARDED), ("compiled", COMPILED_SHARDED)):
        for pipeline in pipelines[:-1]:
            got = runs[0][f"sharded-{kind}-{_key(pipeline)}"]
            assert not isinstance(got, str), (kind, _key(pipeline), got)
            for a, b in zip(got, runs[0][f"single-sharded-{_key(pipeline)}"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert "'error_feedback' does not run on DTensor parameters" in runs[0][f"sharded-{kind}-econtrol_sgd"]
    assert runs[0]["fsdp-default"] == "compiled" and runs[0]["ddp-default"] == "compiled"
    # DCP reshards: the FSDP2 checkpoint of two ranks resumes in this one process, unsharded, on the
    # eager backend (the compiled backend's checkpoint too: its state has the same layout)
    for kind, pipeline in (("eager", "adam"), ("eager", "noisy_sgd"), ("compiled", "adam")):
        model = _model(seed=1)
        opt = _optimizer(model, "eager", pipeline)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path / f"fsdp-{kind}-{pipeline}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        _train(model, opt, range(SPLIT, STEPS))
        for a, b in zip(_params(model), runs[0][f"single-eager-{pipeline}"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
