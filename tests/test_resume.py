"""Bitwise resume: a checkpoint restores a run exactly.

For every file in ``pipelines/``, on both backends, in float32 and float64: ``N`` steps, a
checkpoint (``model.state_dict()`` and ``opt.state_dict()`` through ``torch.save``), a *fresh*
model and optimizer (new objects, as after a process restart) loaded with
``torch.load(..., weights_only=True)``, and ``N`` more steps give parameters, optimizer state
and node state (the seeded generators of ``noise``, ``dp_noise``, ``gravity`` and ``pcgrad``)
bitwise equal to ``2N`` steps straight. Also: param groups under a cosine LR schedule (the
scheduler's state saved too), a pipeline with routes by parameter name, PCGrad with three
tasks (where the random order changes the result), and the periodic events of the projection
and grouping ops (GaLore, COAP, SGG, the Fisher history) falling after the checkpoint.

The straight run never calls ``state_dict``: saving must not be needed to stay on track.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import pytest
import torch

import gradpipe
from optimizer_table import MATRICES_ONLY
from test_runtime import _data, _model, _train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

N = 4
BACKENDS = ("eager", "compiled")
#: every shipped pipeline that takes a whole model (the matrices-only ones resume in their own tests:
#: tests/test_muon.py)
PIPELINES = sorted(p for p in pathlib.Path(__file__).resolve().parent.parent.glob("pipelines/*.grad")
                   if p.stem not in MATRICES_ONLY)
DTYPES = {"f32": torch.float32, "f64": torch.float64}

Train = Callable[[torch.nn.Module, torch.optim.Optimizer, int, int], None]


def _default_train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int) -> None:
    _train(model, opt, steps, start=start)


def _make(pipeline: Any, backend: str, dtype: torch.dtype, seed: int,
          groups: Callable[[torch.nn.Module], Any] | None, hp: dict[str, Any]
          ) -> tuple[torch.nn.Module, gradpipe.Optimizer]:
    model = _model(seed=seed, dtype=dtype)
    params = groups(model) if groups is not None else model.named_parameters()
    return model, gradpipe.Optimizer(params, pipeline, backend=backend, **hp)


def _node_state(opt: gradpipe.Optimizer) -> dict[str, Any]:
    return opt.state_dict()["gradpipe"]["node_state"]


def _assert_same(a: Any, b: Any, what: str) -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def _resume(tmp_path: pathlib.Path, pipeline: Any, backend: str, dtype: torch.dtype = torch.float32, *,
            groups: Callable[[torch.nn.Module], Any] | None = None, hp: dict[str, Any] | None = None,
            train: Train = _default_train, schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
            keep_node_state: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``2N`` steps straight and ``N`` + checkpoint + ``N`` in fresh objects; with
    ``keep_node_state`` they must agree bitwise. Returns both runs' final parameters."""
    hp = {"lr": 1e-2, **(hp or {})}

    def run(model, opt, sched, start):
        for t in range(start, start + N):
            train(model, opt, 1, t)
            if sched is not None:
                sched.step()

    straight, opt = _make(pipeline, backend, dtype, 0, groups, hp)
    sched = schedule(opt) if schedule else None
    run(straight, opt, sched, 0)
    run(straight, opt, sched, N)

    first, opt1 = _make(pipeline, backend, dtype, 0, groups, hp)
    sched1 = schedule(opt1) if schedule else None
    run(first, opt1, sched1, 0)
    ckpt = {"model": first.state_dict(), "opt": opt1.state_dict()}
    if sched1 is not None:
        ckpt["sched"] = sched1.state_dict()
    if not keep_node_state:
        ckpt["opt"]["gradpipe"]["node_state"] = {}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    del first, opt1, sched1, ckpt

    loaded = torch.load(path, weights_only=True)
    resumed, opt2 = _make(pipeline, backend, dtype, 1, groups, hp)  # another init: the load must set it
    sched2 = schedule(opt2) if schedule else None  # as torch's recipe: build, then load
    resumed.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    if sched2 is not None:
        sched2.load_state_dict(loaded["sched"])
    run(resumed, opt2, sched2, N)

    a = [p.detach().clone() for p in straight.parameters()]
    b = [p.detach().clone() for p in resumed.parameters()]
    if not keep_node_state:
        return a, b
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert p.dtype == q.dtype == dtype
        assert torch.equal(p, q), f"{name} differs after resuming"
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        _assert_same(opt.state[p], opt2.state[q], f"state of {name}")
    _assert_same(_node_state(opt), _node_state(opt2), "node_state")
    for g, h in zip(opt.param_groups, opt2.param_groups):
        assert g["lr"] == h["lr"]
    if sched is not None:
        _assert_same(sched.state_dict(), sched2.state_dict(), "scheduler")
    return a, b


# ------------------------------------------------------------------ every shipped pipeline
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_pipeline_resumes_bitwise(tmp_path: pathlib.Path, path: pathlib.Path, backend: str,
                                        dtype: torch.dtype) -> None:
    _resume(tmp_path, path, backend, dtype)


# ------------------------------------------------------------------ the RNG state
SEEDED = {"noisy_sgd": "main/noise", "dp_sgd": "main/dp_noise", "pcgrad_adam": "main/pcgrad",
          "gravity": "main/gravity"}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_generator_state_is_a_uint8_tensor_in_the_checkpoint(tmp_path: pathlib.Path, name: str) -> None:
    """The generator's state, not the generator (``weights_only`` loads no Generator objects)."""
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), name, lr=1e-2)
    _train(model, opt, 2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)["gradpipe"]["node_state"]
    assert set(saved) == {SEEDED[name]}
    rng = saved[SEEDED[name]]["rng"]
    assert isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
    assert not torch.equal(rng, torch.Generator().manual_seed(0).get_state())  # it has drawn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["noisy_sgd", "dp_sgd"])
def test_without_the_generator_state_the_noise_differs(tmp_path: pathlib.Path, name: str, backend: str) -> None:
    """Control: the bitwise test above is sensitive to the RNG (a fresh generator draws other noise)."""
    path = next(p for p in PIPELINES if p.stem == name)
    a, b = _resume(tmp_path, path, backend, keep_node_state=False)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def _three_tasks(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int) -> None:
    """Three losses; the third pulls against both others, so its gradient is projected twice
    and the order of the two projections changes it."""
    for t in range(start, start + steps):
        opt.zero_grad()
        x, y = _data(t, next(model.parameters()).dtype)
        out = model(x).float()
        a = torch.nn.functional.cross_entropy(out, y)
        b = 0.3 * out.pow(2).mean()
        opt.step(losses={"a": a, "b": b, "c": -0.6 * a - 0.4 * b + 0.1 * out[:, 0].mean()})


PCGRAD3 = "hparam lr = 0.01\npcgrad(grads.a, grads.b, grads.c) | adam"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pcgrad_random_order_of_three_tasks(tmp_path: pathlib.Path, backend: str) -> None:
    """With three tasks the order of the projections changes the result: the resumed run must
    draw the same orders (and does not without the saved generator)."""
    _resume(tmp_path, PCGRAD3, backend, train=_three_tasks)
    a, b = _resume(tmp_path, PCGRAD3, backend, train=_three_tasks, keep_node_state=False)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ groups, schedules, routes, dtypes
#: the second group's own values (the weights' group takes the defaults)
GROUP2 = {"adamw": {"lr": 5e-3, "betas": (0.8, 0.99), "weight_decay": 0.0}, "noisy_sgd": {"lr": 5e-3, "eta": 0.02}}


def _two_groups(name: str) -> Callable[[torch.nn.Module], list[dict[str, Any]]]:
    def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        weights = [(n, p) for n, p in named if p.ndim >= 2]
        biases = [(n, p) for n, p in named if p.ndim < 2]
        return [{"params": weights}, {"params": biases, **GROUP2[name]}]
    return groups


def _cosine(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * N, eta_min=1e-4)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "noisy_sgd"])
def test_param_groups_and_cosine_schedule(tmp_path: pathlib.Path, name: str, backend: str,
                                          dtype: torch.dtype) -> None:
    hp = {"weight_decay": 0.05} if name == "adamw" else {}
    path = next(p for p in PIPELINES if p.stem == name)
    _resume(tmp_path, path, backend, dtype, groups=_two_groups(name), hp=hp, schedule=_cosine)


ROUTES = """
hparam lr = 0.01 in [0, inf)
hparam b1 = 0.9 in [0, 1)
route "*.bias": grad | noise(0.01, 0.55, seed=1) | sign
route /^0\\./ and ndim >= 2: grad | clip_norm(1.0) | adam(b1, 0.99) | decay(0.01)
route default: grad | noise(0.01, 0.55, seed=1) | momentum(0.9)
"""


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_routes_by_name(tmp_path: pathlib.Path, backend: str, dtype: torch.dtype) -> None:
    """Two noise nodes with the same seed, on two routes: each keeps its own generator."""
    _resume(tmp_path, ROUTES, backend, dtype)
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), ROUTES, backend=backend)
    assert {opt.route_of(p) for p in model.parameters()} == {'"*.bias"', "/^0\\./andndim>=2", "default"}
    _train(model, opt, 1)
    ns = _node_state(opt)
    assert set(ns) == {'"*.bias"/noise', "default/noise"}
    assert not torch.equal(ns['"*.bias"/noise']["rng"], ns["default/noise"]["rng"])  # 11 draws vs 24


# ------------------------------------------------------------------ periodic events after the checkpoint
PERIODIC = {
    "galore": "grad | galore(rank=2, gap=3) { adam }",
    "coap": "grad | coap(rank=2, interval=2, reproject=2) { adam }",
    "group_scale": "grad | group_scale(k=2, interval=3) { adam }",
    "natural_galore": "grad | galore(rank=2, gap=3) { woodbury_fisher(3, 0.001) | adam }",
    "wavelet": "grad | wavelet(levels=1) { adam }",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(PERIODIC))
def test_periodic_events_after_the_checkpoint(tmp_path: pathlib.Path, name: str, backend: str) -> None:
    """Projectors recomputed, clusters redrawn and histories full within the ``N`` steps after
    the checkpoint (the shipped files' intervals, 32 to 500 steps, fall past ``2N``)."""
    _resume(tmp_path, "hparam lr = 0.01\n" + PERIODIC[name], backend)
