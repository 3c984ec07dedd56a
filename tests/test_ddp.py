"""gradpipe under ``torch.nn.parallel.DistributedDataParallel``: 2 processes, gloo, CPU.

Each test spawns two processes (``torch.multiprocessing``, start method ``spawn``,
a ``FileStore`` rendezvous in ``tmp_path``). Each builds the same seeded float64
model, wraps it in DDP, *then* builds ``gradpipe.Optimizer`` and trains ``K``
steps in which rank ``r`` takes its half of each global batch with the per-rank
mean loss. DDP averages the gradients over the ranks, so every rank steps with
the mean gradient of the global batch: the run must end where one process
training on the full global batches ends (rank 0 computes that reference after
its DDP runs, without DDP). Three runs per test: the optimizer built from
``ddp.named_parameters()`` (names with DDP's ``module.`` prefix), from
``model.named_parameters()`` (the same tensors, so both work), and from the
former with ``DDP(gradient_as_bucket_view=True)``.

Tolerances. In float64 the DDP run and the one-process run agree to
``rtol=1e-12, atol=1e-14`` for adam, not bit for bit: the one-process gradient
is one matmul over all 16 rows, while under DDP each rank sums its 8 rows and
the allreduce adds the two ranks' results and divides by 2, so the gradients
differ in their last bits and the optimizer carries that on. scalpel gets
``atol=1e-12``: its ``project_orthogonal(ema)`` projects the gradient against an
EMA that, in the first step, is the gradient times 0.1, so the projection is a
difference of nearly equal vectors (what is left is about ``2e-5`` of the
gradient here) and its relative rounding error is some 5e4 times the gradient's.
That is the pipeline's conditioning, not DDP's: in one process, a random
relative change of 2**-52 to every gradient moves the final parameters by about
2e-14, as much as DDP's summation order does. Between the two ranks nothing may
differ: both apply the same allreduced gradient, so their parameters and their
optimizer state (Adam's ``m`` and ``v``; scalpel's EMA, median and diffGrad
buffers; the step counters) must be bitwise equal, and so must the runs built
from the two kinds of ``named_parameters``.

On the compiled backend DDP keeps the flat-buffer link: DDP's reducer copies the
averaged bucket back into ``p.grad`` in place (``gradient_as_bucket_view=False``,
DDP's default), so ``p.grad`` stays the optimizer's view of its flat gradient
buffer and the step reads it without gathering; the test checks that too. With
``gradient_as_bucket_view=True`` the reducer sets ``p.grad`` to a view of its
bucket after each backward: the link is broken (checked), the step gathers the
gradients and ``zero_grad`` re-links them, with the same results up to the
tolerance above (the update is then applied outside the fused segment).
"""

from __future__ import annotations

import faulthandler
import gc
import os

import pytest
import torch
from spawned import join_group, run_processes

import gradpipe

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:torch")]

WORLD = 2
STEPS = 5  # K
GLOBAL_BATCH = 16
#: how long the parent waits for the two processes before it ends them (a hang, not a timing check)
DEADLINE_S = 120
PIPELINES = {"adam": {"lr": 1e-2}, "scalpel": {"lr": 1e-2}}
#: (rtol, atol) between the DDP run and the one-process run (float64; see the module docstring)
TOLERANCE = {"adam": (1e-12, 1e-14), "scalpel": (1e-12, 1e-12)}
#: the runs: the optimizer built from the DDP wrapper (``module.``-prefixed names), from the model,
#: and from the wrapper of a DDP with ``gradient_as_bucket_view=True``
SOURCES = ("ddp", "model", "bucket_view")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    return x, y


def _result(model: torch.nn.Module, opt: gradpipe.Optimizer) -> dict:
    """Final parameters and optimizer state (cloned: the compiled backend's are views of flat buffers)."""
    sd = opt.state_dict()
    state = {i: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state}


def _storage(model: torch.nn.Module) -> list[int]:
    """The address of each parameter's data (the optimizer must leave them alone: DESIGN 5)."""
    return [p.data_ptr() for p in model.parameters()]


def _train(model: torch.nn.Module, opt: gradpipe.Optimizer, rank: int, world: int) -> None:
    """``STEPS`` steps; this process takes block ``rank`` of ``world`` equal blocks of each global
    batch, with the mean loss over its block."""
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _ddp_run(rank: int, out_dir: str, pipeline: str, backend: str, source: str) -> None:
    """Build DDP, then the optimizer (see ``SOURCES``); train; save."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    # DDP first (it broadcasts rank 0's parameters), then the optimizer
    ddp = DDP(model, gradient_as_bucket_view=source == "bucket_view")
    named = model.named_parameters() if source == "model" else ddp.named_parameters()
    before = _storage(model)
    opt = gradpipe.Optimizer(named, pipeline, backend=backend, **PIPELINES[pipeline])
    _train(ddp, opt, rank, WORLD)
    out = _result(model, opt)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out["own_storage"] = _storage(model) == before and len(storages) == len(before)
    out["names"] = [n for g in opt.param_groups for n in g.get("param_names", [])]
    torch.save(out, os.path.join(out_dir, f"{source}-rank{rank}.pt"))


def _worker(rank: int, init_file: str, out_dir: str, pipeline: str, backend: str) -> None:
    """One DDP process: a run per source of parameters, then (rank 0) the one-process reference."""
    join_group(rank, WORLD, init_file, out_dir, DEADLINE_S)
    import torch.distributed as dist

    try:
        for source in SOURCES:
            _ddp_run(rank, out_dir, pipeline, backend, source)
    finally:
        # DDP's reducer holds the process group; if it is the last holder, freeing it destroys the
        # group with the GIL held, which can deadlock with gloo's worker thread (a torch issue,
        # pytorch/pytorch#56297; it hung about one run in ten here). So the DDP objects are freed first,
        # while the group is still registered: they die when _ddp_run returns (gc for any cycle left)
        gc.collect()
        dist.destroy_process_group()
    if rank == 0:  # the reference, here rather than in the parent: the compiled segments are reused
        torch.save(_single(pipeline, backend), os.path.join(out_dir, "single.pt"))
    faulthandler.cancel_dump_traceback_later()


def _spawn(tmp_path, pipeline: str, backend: str) -> tuple[dict[tuple[str, int], dict], dict]:
    """Run the two DDP processes; end them if they fail or hang; load what each rank saved, and the
    one-process reference."""
    run_processes(_worker, (str(tmp_path / "rendezvous"), str(tmp_path), pipeline, backend), WORLD, tmp_path,
                  DEADLINE_S, "the DDP processes")
    runs = {(s, r): torch.load(tmp_path / f"{s}-rank{r}.pt", weights_only=True)
            for s in SOURCES for r in range(WORLD)}
    return runs, torch.load(tmp_path / "single.pt", weights_only=True)


def _single(pipeline: str, backend: str) -> dict:
    """The same training in one process without DDP, one step per full global batch."""
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), pipeline, backend=backend, **PIPELINES[pipeline])
    _train(model, opt, 0, 1)
    return _result(model, opt)


def _assert_state(a: dict, b: dict, *, tol: tuple[float, float] | None, what: str) -> None:
    """Optimizer states equal bit for bit (``tol=None``) or to ``(rtol, atol)``."""
    assert a.keys() == b.keys(), what
    for i in a:
        assert a[i].keys() == b[i].keys(), f"{what}: state of parameter {i}"
        for k in a[i]:
            msg = f"{what}: parameter {i} {k!r}"
            if tol is None:
                assert torch.equal(a[i][k], b[i][k]), msg
            else:
                torch.testing.assert_close(a[i][k], b[i][k], rtol=tol[0], atol=tol[1],
                                           msg=lambda m, msg=msg: f"{msg}\n{m}")


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_ddp_two_processes_match_one_process(tmp_path, pipeline, backend):
    runs, ref = _spawn(tmp_path, pipeline, backend)
    base = runs[("ddp", 0)]
    rtol, atol = TOLERANCE[pipeline]
    assert base["names"][0].startswith("module.") and not runs[("model", 0)]["names"][0].startswith("module.")
    for (source, rank), run in runs.items():
        what = f"{source} rank {rank}"
        # the ranks agree bit for bit, and so do the two ways of passing the parameters
        same = runs[(source, 0)] if source == "bucket_view" else base
        for i, (p, q) in enumerate(zip(run["params"], same["params"])):
            assert torch.equal(p, q), f"{what}: parameter {i} differs from rank 0"
        _assert_state(run["state"], same["state"], tol=None, what=what)
        # and all of them end where one process on the global batches ends, up to the last bits
        for i, (p, q) in enumerate(zip(run["params"], ref["params"])):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, what=what: f"{what}: parameter {i} vs one process\n{m}")
        _assert_state(run["state"], ref["state"], tol=(rtol, atol), what=f"{what} vs one process")
        assert run["state"][0]["step"].item() == STEPS
        # every parameter kept its own storage, at the same address, through DDP and the steps
        assert run["own_storage"], f"{what}: the parameters' storage moved or is shared"
    # training moved the parameters (the comparison is not between untouched copies)
    assert not torch.equal(ref["params"][0], _model()[0].weight.detach())
