"""Non-finite steps: ``skip_nonfinite`` (the default policy) and ``allow_nonfinite``.

A step whose gradients hold a NaN or an Inf must leave the parameters, every state buffer,
the step counter and the ops' random generators exactly as they were (compared bit for bit),
be counted (``nonfinite_steps``, ``consecutive_nonfinite``, ``last_step_skipped``, kept in
``state_dict``), and the next finite step must proceed as if the bad batch had never been
seen. More than ``max_consecutive`` in a row raise :class:`gradpipe.NonFiniteError`. Both
backends, and the three ways gradients reach a step: ``p.grad`` from ``backward()``,
``step(losses=...)`` and ``step(samples=...)``.
"""

from __future__ import annotations

import math
import pickle
import re
from typing import Any

import pytest
import torch

import gradpipe
import gradpipe.runtime.nonfinite as nonfinite_module
import gradpipe.runtime.optimizer as optimizer_module
from gradpipe import GradError, NonFiniteError
from gradpipe.compiler.lowering import fused_check

SHAPES = ((3, 4), (5,))
NAMES = ("w", "b")
B = 4  # examples per step of the per-example pipelines
BACKENDS = ("eager", "compiled")

#: pipeline -> (how its gradients reach the step, hyperparameters)
PIPELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("grad", {"lr": 1e-2}),
    "diffgrad": ("grad", {"lr": 1e-2}),
    "scalpel": ("grad", {"lr": 1e-2}),
    "pcgrad_adam": ("losses", {"lr": 1e-2}),
    "dp_sgd": ("samples", {"lr": 0.5, "sigma": 0.5}),
}


# ------------------------------------------------------------------ helpers
def make_params() -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in zip(NAMES, SHAPES)]


def batches(mode: str, n: int) -> list[Any]:
    """``n`` steps of inputs: per tensor a gradient (``grad``), per loss a gradient per tensor
    (``losses``), or per tensor ``B`` per-example gradients (``samples``)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(n):
        scale = (1.0, 0.3, 2.0, 0.5, 1.5, 0.8)[t % 6]
        if mode == "grad":
            out.append([torch.randn(s, generator=gen) * scale for s in SHAPES])
        elif mode == "losses":
            out.append({k: [torch.randn(s, generator=gen) * scale for s in SHAPES] for k in ("main", "aux")})
        else:
            out.append([torch.randn((B, *s), generator=gen) * scale for s in SHAPES])
    return out


def poison(batch: Any, mode: str, value: float) -> Any:
    """A copy of ``batch`` with one element of one gradient of tensor ``w`` set to ``value``."""
    if mode == "losses":
        out = {k: [g.clone() for g in v] for k, v in batch.items()}
        out["aux"][0][1, 2] = value
        return out
    out = [g.clone() for g in batch]
    if mode == "grad":
        out[0][1, 2] = value
    else:
        out[0][2, 1, 2] = value  # one example of w
    return out


def feed(opt: gradpipe.Optimizer, named: list[tuple[str, torch.Tensor]], batch: Any, mode: str) -> None:
    """One step. ``grad``: a linear loss whose autograd gradient is the batch, so the compiled
    backend's flat gradient buffers are filled by backward() as in training."""
    params = [p for _, p in named]
    if mode == "grad":
        opt.zero_grad()
        torch.stack([(p * g).sum() for p, g in zip(params, batch)]).sum().backward()
        opt.step()
    elif mode == "losses":
        opt.step(losses={k: torch.stack([(p * g).sum() for p, g in zip(params, gs)]).sum()
                         for k, gs in batch.items()})
    else:
        opt.step(samples={p: g for p, g in zip(params, batch)})


def build(pipeline: str, backend: str, named: list[tuple[str, torch.Tensor]] | None = None) -> tuple[
        gradpipe.Optimizer, list[tuple[str, torch.Tensor]]]:
    named = make_params() if named is None else named
    mode, hps = PIPELINES.get(pipeline, ("grad", {"lr": 1e-2}))
    return gradpipe.Optimizer(named, pipeline, backend=backend, **hps), named


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(opt: gradpipe.Optimizer, named: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Every bit the optimizer keeps: parameters, every state entry (buffers and step) and the
    ops' node state (random generators)."""
    out: dict[str, Any] = {}
    for name, p in named:
        out[f"param {name}"] = _bits(p)
        for k, v in opt.state[p].items():
            out[f"state {name} {k}"] = _bits(v) if isinstance(v, torch.Tensor) else v
    for node, st in opt._node_state.items():
        for k, v in st.items():
            out[f"node {node} {k}"] = v.get_state().clone() if isinstance(v, torch.Generator) else v
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: state entries differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        x, y = a[k], b[k]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert same, f"{what}: {k} changed"


def counters(opt: gradpipe.Optimizer) -> tuple[int, int, bool]:
    return opt.nonfinite_steps, opt.consecutive_nonfinite, opt.last_step_skipped


CASES = [(pl, be) for pl in PIPELINES for be in BACKENDS]
IDS = [f"{pl}-{be}" for pl, be in CASES]


# ------------------------------------------------------------------ the skipped step
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pipeline,backend", CASES, ids=IDS)
def test_a_nonfinite_step_changes_nothing(pipeline, backend, value, monkeypatch):
    mode = PIPELINES[pipeline][0]
    opt, named = build(pipeline, backend)
    data = batches(mode, 4)
    for batch in data[:3]:  # the compiled backend runs compiled code from the second step on
        feed(opt, named, batch, mode)
    assert counters(opt) == (0, 0, False)
    before = snapshot(opt, named)
    assert any(k.endswith(" step") for k in before) and len(before) > 4

    ran = []
    real = optimizer_module.run_route
    monkeypatch.setattr(optimizer_module, "run_route", lambda *a, **k: ran.append("eager") or real(*a, **k))
    if opt._compiled is not None:
        real_compiled = opt._compiled.prepare_route
        monkeypatch.setattr(opt._compiled, "prepare_route",
                            lambda *a, **k: ran.append("compiled") or real_compiled(*a, **k))
        real_planned = opt._compiled.run_plan  # a step of a planned layout (runtime/step_plan.py)
        monkeypatch.setattr(opt._compiled, "run_plan", lambda *a, **k: ran.append("planned") or real_planned(*a, **k))

    feed(opt, named, poison(data[3], mode, value), mode)
    if opt._compiled is not None and fused_check(opt.program, "main"):
        # the planned step's check runs inside the kernel (lowering.fused_check), which writes nothing back
        assert ran == ["planned"] and not opt._compiled._oks[("main", "cpu")].item()
    else:
        assert ran == [], "a route (a fused segment) ran in a non-finite step"
    assert_same(before, snapshot(opt, named), f"{pipeline} [{backend}]")
    assert counters(opt) == (1, 1, True)

    feed(opt, named, data[3], mode)  # the same batch, finite: it is taken
    assert ran and counters(opt) == (1, 0, False)
    assert not torch.equal(before["param w"], _bits(named[0][1]))


@pytest.mark.parametrize("pipeline,backend", CASES, ids=IDS)
def test_the_next_step_proceeds_as_if_the_batch_was_never_seen(pipeline, backend):
    mode = PIPELINES[pipeline][0]
    data = batches(mode, 6)
    bad = 2
    opt, named = build(pipeline, backend)
    for t, batch in enumerate(data):
        feed(opt, named, poison(batch, mode, math.nan) if t == bad else batch, mode)
    ref, ref_named = build(pipeline, backend)
    for t, batch in enumerate(data):
        if t != bad:
            feed(ref, ref_named, batch, mode)
    assert_same(snapshot(ref, ref_named), snapshot(opt, named), f"{pipeline} [{backend}]")
    assert int(opt.state[named[0][1]]["step"].item()) == len(data) - 1
    assert counters(opt) == (1, 0, False) and counters(ref) == (0, 0, False)


# ------------------------------------------------------------------ too many in a row
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_max_consecutive_raises(backend):
    opt, named = build("grad | skip_nonfinite(2) | adam", backend)
    data = batches("grad", 5)
    feed(opt, named, data[0], "grad")
    for _ in range(2):
        feed(opt, named, poison(data[1], "grad", math.nan), "grad")
    before = snapshot(opt, named)
    with pytest.raises(NonFiniteError) as info:
        feed(opt, named, poison(data[1], "grad", math.inf), "grad")
    err = info.value
    assert isinstance(err, FloatingPointError)
    msg = str(err)
    assert msg.startswith("step 2: non-finite gradients (NaN or Inf) in w (grad); 3 such steps in a row, "
                          "more than skip_nonfinite(max_consecutive=2) allows (3 skipped in this run).")
    assert "\nhint: lower the learning rate" in msg and "grad | skip_nonfinite(max_consecutive=...) |" in msg
    assert (err.step, err.consecutive, err.max_consecutive, err.total, err.params) == (2, 3, 2.0, 3, ["w (grad)"])
    assert_same(before, snapshot(opt, named), "the raising step")
    assert counters(opt) == (3, 3, True)
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (Dask workers)
    assert str(again) == msg and again.params == err.params


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_default_policy_is_skip_with_max_consecutive_10(backend):
    opt, named = build("adam", backend)
    assert opt._nonfinite.policy == nonfinite_module.NonFinitePolicy(True, 10.0, None)
    data = batches("grad", 2)
    feed(opt, named, data[0], "grad")
    for _ in range(10):
        feed(opt, named, poison(data[1], "grad", math.nan), "grad")
    assert counters(opt) == (10, 10, True)
    with pytest.raises(NonFiniteError, match=r"11 such steps in a row, more than skip_nonfinite\(max_consecutive=10\) allows"):
        feed(opt, named, poison(data[1], "grad", math.nan), "grad")


def test_max_consecutive_zero_raises_on_the_first_and_inf_never():
    opt, named = build("grad | skip_nonfinite(0) | adam", "eager")
    before = snapshot(opt, named)
    with pytest.raises(NonFiniteError, match=re.escape("more than skip_nonfinite(max_consecutive=0) allows")):
        feed(opt, named, poison(batches("grad", 1)[0], "grad", math.nan), "grad")
    assert_same(before, snapshot(opt, named), "max_consecutive=0")

    opt, named = build("grad | skip_nonfinite(max_consecutive=inf) | adam", "eager")
    for _ in range(25):
        feed(opt, named, poison(batches("grad", 1)[0], "grad", math.nan), "grad")
    assert counters(opt) == (25, 25, True)


def test_the_error_names_the_loss_and_the_parameters_of_a_multi_loss_step():
    opt, named = build("pcgrad(grads.main, grads.aux) | skip_nonfinite(0) | adam", "eager")
    batch = poison(batches("losses", 1)[0], "losses", math.nan)
    batch["main"][1][0] = math.inf
    with pytest.raises(NonFiniteError) as info:
        feed(opt, named, batch, "losses")
    assert info.value.params == ["w (grads.aux)", "b (grads.main)"]  # losses in name order


def test_unnamed_parameters_are_named_by_position_and_shape():
    params = [p for _, p in make_params()]
    opt = gradpipe.Optimizer(params, "grad | skip_nonfinite(0) | momentum(0.9)", backend="eager")
    params[1].grad = torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0])
    params[0].grad = torch.zeros(3, 4)
    with pytest.raises(NonFiniteError, match=r"parameter 1 of shape \(5,\) \(grad\)"):
        opt.step()


# ------------------------------------------------------------------ counters
@pytest.mark.parametrize("backend", BACKENDS)
def test_counters_survive_a_state_dict_round_trip(backend):
    src = "grad | skip_nonfinite(2) | adam"
    opt, named = build(src, backend)
    data = batches("grad", 6)
    for t, batch in enumerate(data[:5]):  # bad, bad, good, good, bad
        feed(opt, named, poison(batch, "grad", math.nan) if t in (0, 1, 4) else batch, "grad")
    assert counters(opt) == (3, 1, True)
    sd = opt.state_dict()
    assert sd["gradpipe"]["nonfinite"] == {"total": 3, "consecutive": 1, "last_step_skipped": True}

    again, named2 = build(src, backend, [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named])
    again.load_state_dict(sd)
    assert counters(again) == (3, 1, True)
    feed(again, named2, poison(data[5], "grad", math.nan), "grad")  # the 2nd in a row: allowed
    with pytest.raises(NonFiniteError, match=r"step 3: .*; 3 such steps in a row, .* \(5 skipped"):
        feed(again, named2, poison(data[5], "grad", math.nan), "grad")

    old = opt.state_dict()
    del old["gradpipe"]["nonfinite"]  # a checkpoint from before the counters existed
    fresh, _ = build(src, backend, [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named])
    fresh.load_state_dict(old)
    assert counters(fresh) == (0, 0, False)


def test_a_step_without_gradients_leaves_the_counters_alone():
    opt, named = build("adam", "eager")
    feed(opt, named, poison(batches("grad", 1)[0], "grad", math.nan), "grad")
    opt.zero_grad()
    opt.step()  # no parameter has a gradient: nothing to check, nothing to count
    assert counters(opt) == (1, 1, True)


# ------------------------------------------------------------------ what is checked
def test_a_nonfinite_loss_skips_a_pipeline_that_reads_it():
    named = make_params()
    w, b = (p for _, p in named)
    opt = gradpipe.Optimizer(named, "aegd", lr=0.1, backend="eager")

    def closure(bad: bool):
        def f():
            opt.zero_grad()
            loss = (w * 0.1).sum() + (b * 0.2).sum() + 5.0
            (loss + (math.nan if bad else 0.0)).backward()
            return loss + (math.nan if bad else 0.0)
        return f
    opt.step(closure(False))
    before = snapshot(opt, named)
    opt.step(closure(True))  # finite gradients, a NaN loss: aegd reads the loss
    assert_same(before, snapshot(opt, named), "aegd with a NaN loss")
    assert counters(opt) == (1, 1, True)

    plain, pnamed = build("adam", "eager")
    pw, pb = (p for _, p in pnamed)
    pw.grad, pb.grad = torch.ones(3, 4), torch.ones(5)
    plain.step(lambda: torch.tensor(math.nan))  # adam does not read the loss
    assert counters(plain) == (0, 0, False) and "step" in plain.state[pw]


def test_a_gradient_the_pipeline_does_not_read_is_not_checked():
    # pcgrad_adam reads grads.main and grads.aux, not their sum; a loss it does not name is ignored
    opt, named = build("pcgrad_adam", "eager")
    batch = batches("losses", 1)[0]
    extra = (named[0][1] * torch.full((3, 4), math.nan)).sum()
    opt.step(losses={k: torch.stack([(p * g).sum() for (_, p), g in zip(named, gs)]).sum()
                     for k, gs in batch.items()} | {"other": extra})
    assert counters(opt) == (0, 0, False)


@pytest.mark.parametrize("pipeline", ["adam", "scalpel"])
def test_the_compiled_backend_checks_small_gradients_in_one_gathered_buffer(pipeline, monkeypatch):
    opt, named = build(pipeline, "compiled")
    fused = fused_check(opt.program, "main")
    assert fused == (pipeline == "adam")  # scalpel's plan has two fused segments: the check runs before them
    seen = []
    real = nonfinite_module.any_nonfinite
    monkeypatch.setattr(nonfinite_module, "any_nonfinite", lambda ts: seen.append(list(ts)) or real(ts))
    gathered = []
    real_gather = opt._compiled._gather
    monkeypatch.setattr(opt._compiled, "_gather", lambda purpose, b, ts: gathered.append(purpose) or
                        real_gather(purpose, b, ts))
    for t, batch in enumerate(batches("grad", 2)):  # the first step takes the general path, the second its plan
        seen.clear()
        feed(opt, named, batch, "grad")
        assert gathered == []
        if fused and t:  # the planned step's check ran inside the kernel, over the plan's gathered buffer
            assert seen == [] and opt._compiled._oks[("main", "cpu")].item()
            continue
        # the parameters keep their own gradients (DESIGN 5); the small ones are gathered into one
        # buffer, reused every step, for one reduction, and the step reads that buffer (no second gather)
        grads = torch.cat([p.grad.reshape(-1) for _, p in named])
        assert len(seen) == 1 and len(seen[0]) == 1 and torch.equal(seen[0][0], grads)
    assert opt._compiled.plan_builds == 1
    buf = opt._compiled.step_plans[next(iter(opt._compiled.step_plans))].routes[0].plan.check[0]

    # hand-set gradients are read the same way, and a NaN among them skips the step
    seen.clear()
    w, b = (p for _, p in named)
    w.grad, b.grad = torch.ones(3, 4), torch.full((5,), math.nan)
    before = snapshot(opt, named)
    opt.step()
    assert counters(opt) == (1, 1, True)
    assert_same(before, snapshot(opt, named), pipeline)
    if fused:
        assert seen == [] and not opt._compiled._oks[("main", "cpu")].item()
    else:
        assert len(seen[0]) == 1 and seen[0][0] is buf


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_backward_did_not_reach_is_not_read(backend):
    opt, named = build("adam", backend)
    w, b = (p for _, p in named)
    opt.zero_grad()
    (w * 2.0).sum().backward()  # b is not reached: no gradient (torch's set_to_none), no step
    assert b.grad is None
    before_b = _bits(b)
    opt.step()
    assert counters(opt) == (0, 0, False)
    assert "step" in opt.state[w] and "step" not in opt.state[b] and torch.equal(_bits(b), before_b)
    # a gradient is a gradient once .grad is set (as in torch): a NaN written into it by hand is seen
    opt.zero_grad(set_to_none=False)
    (w * 2.0).sum().backward()
    b.grad = torch.zeros_like(b)
    b.grad[1] = math.nan
    opt.step()
    assert counters(opt) == (1, 1, True) and torch.equal(_bits(b), before_b)


# ------------------------------------------------------------------ allow_nonfinite and the policy's form
@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_nonfinite_lets_nan_through_as_torch_does(backend):
    opt, named = build("grad | allow_nonfinite | adam", backend)
    assert not opt._nonfinite.policy.check
    feed(opt, named, poison(batches("grad", 1)[0], "grad", math.nan), "grad")
    w = named[0][1]
    assert torch.isnan(w[1, 2]) and torch.isnan(opt.state[w]["main/adam.m"][1, 2])
    assert counters(opt) == (0, 0, False)

    ref = torch.nn.Parameter(make_params()[0][1].detach().clone())
    ref.grad = poison(batches("grad", 1)[0], "grad", math.nan)[0]
    torch.optim.Adam([ref], lr=1e-2).step()
    assert torch.equal(torch.isnan(ref), torch.isnan(w))


def test_one_policy_covers_every_route():
    src = 'route "w": grad | skip_nonfinite(1) | adam\nroute default: grad | skip_nonfinite(1) | sign\n'
    opt = gradpipe.Optimizer(make_params(), src, backend="eager")
    assert opt._nonfinite.policy.max_consecutive == 1
    # stated in one route only, it still covers the other: a NaN in b (the sign route) skips w too
    src = 'route "w": grad | skip_nonfinite(0) | adam\nroute default: grad | sign\n'
    named = make_params()
    opt = gradpipe.Optimizer(named, src, backend="eager")
    before = snapshot(opt, named)
    named[0][1].grad, named[1][1].grad = torch.ones(3, 4), torch.full((5,), math.nan)
    with pytest.raises(NonFiniteError, match=r"in b \(grad\)"):
        opt.step()
    assert_same(before, snapshot(opt, named), "two routes")


@pytest.mark.parametrize("src,message", [
    ('route "w": grad | skip_nonfinite(1) | adam\nroute default: grad | skip_nonfinite(2) | sign\n',
     "two different non-finite policies"),
    ('route "w": grad | skip_nonfinite | adam\nroute default: grad | allow_nonfinite | sign\n',
     "two different non-finite policies"),
    ("hparam n = 3 in [0, inf)\ngrad | skip_nonfinite(n) | adam\n", "must be a whole number or inf, known when"),
    ("grad | skip_nonfinite(2.5) | adam\n", "must be a whole number or inf"),
    ("grad | galore(rank=2) { skip_nonfinite | adam }\n", "cannot sit inside a { ... } block"),
])
def test_policy_mistakes_are_grad_errors(src, message):
    with pytest.raises(GradError, match=re.escape(message)) as info:
        gradpipe.Optimizer(make_params(), src, backend="eager")
    assert info.value.line >= 1


def test_out_of_range_max_consecutive_is_a_compile_error():
    with pytest.raises(GradError, match=r"max_consecutive=-1 is outside the valid range \[0, inf\] of .skip_nonfinite."):
        gradpipe.compile("grad | skip_nonfinite(-1) | adam")


def test_policy_ops_are_the_identity_on_the_stream_and_keep_no_state():
    for src in ("grad | skip_nonfinite(2) | adam", "grad | allow_nonfinite | adam"):
        assert gradpipe.compile(src).state_schema() == gradpipe.compile("grad | adam").state_schema()
    for backend in BACKENDS:
        runs = []
        for src in ("grad | skip_nonfinite(2) | adam", "grad | allow_nonfinite | adam", "grad | adam"):
            opt, named = build(src, backend)
            for batch in batches("grad", 3):
                feed(opt, named, batch, "grad")
            runs.append(snapshot(opt, named))
        assert_same(runs[0], runs[2], f"skip_nonfinite [{backend}]")
        assert_same(runs[1], runs[2], f"allow_nonfinite [{backend}]")


@pytest.mark.parametrize("source,check_bytes,fused", [
    ("adam", 4, True),  # one route, one fused segment: the kernel checks
    ("scalpel", 4, False),  # two segments: the check runs before them
    ("bloop_adam", 8, False),  # two losses' gradients, each read once more
    ("grad | allow_nonfinite | adam", 0, False),  # no check
    ("grad | skip_nonfinite(updates=true) | adam", 4, False),  # the update is checked too: spares, not a gate
])
def test_explain_counts_the_checks_bytes_and_says_where_it_runs(source, check_bytes, fused):
    from gradpipe.compiler.lowering import route_cost
    prog = gradpipe.load(source) if "|" not in source else gradpipe.compile(source)
    cost = route_cost(prog, "main")
    assert (cost.check_bytes_per_param, cost.check_fused) == (check_bytes, fused)
    text = prog.explain()
    assert (f"+ {check_bytes} bytes per fp32 parameter for the non-finite check" in text) == bool(check_bytes)
    assert ("inside the fused kernel" in text) == fused


@pytest.mark.parametrize("where", [0, 1], ids=["solo-bucket", "gathered-bucket"])
def test_the_kernels_own_check_writes_back_every_bit(where):
    """A planned step whose check runs inside the kernel (adam: lowering.fused_check): a NaN in the
    gradient of a parameter updated in place by the kernel (a solo bucket, over 2^18 elements) or
    of a gathered one leaves every bit as it was, and the next finite step proceeds."""
    gen = torch.Generator().manual_seed(3)
    named = [("big", torch.nn.Parameter(torch.randn(300, 1000, generator=gen))),
             ("small", torch.nn.Parameter(torch.randn(7, generator=gen)))]
    opt = gradpipe.Optimizer(named, "adam", lr=1e-2, backend="compiled")
    for _ in range(3):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    plan = next(iter(opt._compiled.step_plans.values()))
    assert plan.fused and plan.runs == 2 and plan.routes[0].plan.solo  # planned, checked in the kernel
    before = snapshot(opt, named)
    grads = [torch.randn(p.shape, generator=gen) for _, p in named]
    grads[where].view(-1)[5] = math.nan
    for (_, p), g in zip(named, grads):
        p.grad = g
    opt.step()
    assert plan.runs == 3 and counters(opt) == (1, 1, True)
    assert_same(before, snapshot(opt, named), "adam [compiled]")
    grads[where].view(-1)[5] = 0.5
    opt.step()
    assert counters(opt) == (1, 0, False) and not torch.equal(before["param big"], _bits(named[0][1]))


@pytest.mark.parametrize("name,least,uncounted", [
    ("adam", "28 bytes", None),
    ("pcgrad_adam", "32 bytes", "the work of pcgrad"),  # two losses' gradients read
    ("scalpel", "52 bytes", "the extra passes of 2 global reductions"),
    ("galore_adamw", "12.8 bytes per fp32 parameter for a 4096x4096 matrix", "the work of galore"),
])
def test_explain_states_each_pipelines_roofline_as_bench_computes_it(name, least, uncounted):
    """explain's roofline line and gradpipe bench's roofline share one model (lowering.least_traffic)."""
    from gradpipe.compiler.lowering import least_traffic
    prog = gradpipe.load(name)
    line = next(l for l in prog.explain().splitlines() if "roofline" in l)
    assert least in line and ((uncounted is None and "not counted" not in line) or (uncounted or "") in line)
    shape = (4096, 4096)
    state = prog.state_numel("main", shape) / (4096 * 4096)
    grads = 2 if name == "pcgrad_adam" else 1
    assert least_traffic(prog, "main", shape) == pytest.approx(4 * (grads + 2) + 8 * state)
