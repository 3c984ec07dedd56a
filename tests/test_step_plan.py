"""Step plans (``gradpipe/runtime/step_plan.py``): a compiled step of a layout seen before runs
from a plan built once, and gives bit for bit what the general path gives; whatever the plan
holds that changes (an lr scheduler's lr, an lr tensor written in place, a hyperparameter that
crosses zero, a parameter without a gradient, ``load_state_dict``, a hand-edited state, a
parameter moved to another dtype, Dynamo's global state) is followed. These tests count plan
builds and calls of the compiled graph; they never time anything."""

from __future__ import annotations

import copy

import pytest
import torch

import gradpipe
from gradpipe.runtime import compiled as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

#: a matrix, a vector, and a parameter large enough for a bucket of its own (read and written in place)
SHAPES = [(6, 5), (5,), (C.SOLO_MIN // 512, 512)]


@pytest.fixture
def calls(monkeypatch):
    """Counts of the compiled graph's calls: through Dynamo's frame, and direct from a plan."""
    n = {"dynamo": 0, "direct": 0}
    through, direct = C._Recorded.__call__, C._Direct.__call__

    def counted_through(self, *a):
        n["dynamo"] += 1
        return through(self, *a)

    def counted_direct(self, var):
        n["direct"] += 1
        return direct(self, var)
    monkeypatch.setattr(C._Recorded, "__call__", counted_through)
    monkeypatch.setattr(C._Direct, "__call__", counted_direct)
    return n


def _params(groups=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    names = [f"layer{i}.weight" for i in range(len(ps))]
    if groups == 1:
        return list(zip(names, ps))
    return [{"params": ps[:2], "param_names": names[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": ps[2:], "param_names": names[2:]}]


def _run(plan, steps=6, pipeline="adam", each=None, groups=1, **kw):
    """``steps`` steps of a compiled optimizer, planned (the default) or with every step on the
    general path, on gradients drawn from a fixed seed; ``each(t, opt, params)`` runs before step
    ``t`` and may change anything, and returns the parameters that get no gradient then."""
    spec = _params(groups)
    params = [p for g in spec for p in g["params"]] if groups > 1 else [p for _, p in spec]
    opt = gradpipe.Optimizer(spec, pipeline, backend="compiled", **{"lr": 1e-3, **kw})
    if not plan:
        opt._plannable = False
    g = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        skip = (each(t, opt, params) if each else None) or ()
        for p in params:
            grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.grad = None if any(p is q for q in skip) else grad
        opt.step()
    return opt, params


def _same(a, b):
    """Parameters and every state tensor equal bit for bit."""
    (oa, pa), (ob, pb) = a, b
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert set(oa.state[p]) == set(ob.state[q])
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k


def test_a_layout_is_planned_once_and_then_the_compiled_graph_is_called_directly(calls):
    opt, _ = _run(plan=True, steps=6)
    # step 1: the general path (it plans the next); step 2: the plan, through Dynamo (recorded);
    # steps 3 to 6: the plan calls the graph itself
    assert opt._compiled.plan_builds == 1
    assert calls == {"dynamo": 2, "direct": 4}
    plan, = opt._compiled.step_plans.values()
    assert all(r.plan is not None for r in plan.routes)


def _scheduler(t, opt, params):
    if t == 1:
        opt.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
    else:
        opt.sched.step()


def _lr_tensor(t, opt, params):
    if t == 1:
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    else:
        opt.param_groups[0]["lr"].mul_(0.5)  # in place: the same tensor, a new value


def _hyperparams(t, opt, params):
    group = opt.param_groups[0]
    if t == 3:
        group["betas"] = (0.8, 0.99)
    if t == 4:
        group["weight_decay"] = 0.1  # crosses zero: the fused function takes another shape
    if t == 5:
        group["amsgrad"] = True  # a boolean: a new buffer
    if t == 7:
        group["weight_decay"] = 0


def _missing_grads(t, opt, params):
    return params[1:2] if 3 <= t <= 5 else ()


def _load(t, opt, params):
    if t == 4:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _state_edit(t, opt, params):
    if t == 4:
        opt.state[params[0]]["main/exp_avg/ema.m"] = torch.zeros(SHAPES[0])
    if t == 5:
        opt.state[params[2]]["step"] = torch.tensor(10.0)


def _retyped(t, opt, params):
    if t == 4:
        for p in params:
            p.data = p.data.to(torch.float64)


@pytest.mark.parametrize("each", [None, _scheduler, _lr_tensor, _hyperparams, _missing_grads, _load, _state_edit,
                                  _retyped], ids=lambda f: f.__name__.strip("_") if f else "plain")
def test_planned_steps_give_what_the_general_path_gives(each, calls):
    planned = _run(plan=True, steps=8, each=each)
    assert calls["direct"] > 0
    general = _run(plan=False, steps=8, each=each)
    _same(planned, general)


@pytest.mark.parametrize("pipeline", ["adamw", "muon_adamw", "schedulefree_adamw", "lion"])
def test_other_pipelines_and_param_groups(pipeline):
    """Two param groups; muon_adamw's muon route has eager nodes (it runs through run_route inside
    the plan), schedulefree_adamw gives the parameter's new value (``param = EXPR``)."""
    planned = _run(plan=True, steps=5, pipeline=pipeline, groups=2)
    general = _run(plan=False, steps=5, pipeline=pipeline, groups=2)
    _same(planned, general)
    assert planned[0]._compiled.plan_builds == 1


def test_half_precision_parameters():
    """bf16 parameters: fp32 buckets, the update rounded once per parameter."""
    def bf16(t, opt, params):
        if t == 1:
            for p in params:
                p.data = p.data.to(torch.bfloat16)
    planned = _run(plan=True, steps=5, each=bf16)
    general = _run(plan=False, steps=5, each=bf16)
    _same(planned, general)
    assert planned[0]._compiled.plan_builds == 1


def test_layouts_that_alternate_are_not_planned_at_every_step():
    """Each layout has its own flat state buffers (a step of the other layout gathers the state
    again and hands out new views), so two layouts that alternate replace each other's plans
    before they run: planning waits longer after each such plan."""
    opt, _ = _run(plan=True, steps=40, each=lambda t, o, ps: ps[:1] if t % 2 else ())
    assert opt._compiled.plan_builds <= 8
    planned = _run(plan=True, steps=12, each=lambda t, o, ps: ps[:1] if t % 2 else ())
    _same(planned, _run(plan=False, steps=12, each=lambda t, o, ps: ps[:1] if t % 2 else ()))


def test_what_makes_a_new_plan():
    def each(t, opt, params):
        if t == 3:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if t == 5:
            opt.state[params[1]]["main/exp_avg_sq/ema.m"] = opt.state[params[1]]["main/exp_avg_sq/ema.m"].clone()
        if t == 7:
            opt.param_groups[0]["amsgrad"] = True
        if t == 9:
            opt.param_groups[0]["lr"] = 1e-4  # a value: the same plan
    opt, _ = _run(plan=True, steps=10, each=each)
    # planned after steps 1, 3 (load), 5 (a state tensor replaced), 7 (amsgrad: another function)
    assert opt._compiled.plan_builds == 4


def test_a_change_in_dynamo_s_global_state_goes_through_dynamo(calls):
    """The graph was compiled under the global state of its recorded call (here 1 thread):
    another thread count is not called directly (Dynamo compiles for it)."""
    threads = torch.get_num_threads()

    def each(t, opt, params):
        torch.set_num_threads(2 if t == 5 else threads)
    try:
        opt, _ = _run(plan=True, steps=6, each=each)
    finally:
        torch.set_num_threads(threads)
    # direct in steps 3, 4 and 6; step 5 through Dynamo (which compiles another variant for it,
    # or runs the segment eagerly once it holds as many variants as its cache allows)
    assert calls["direct"] == 3


def test_the_zero_d_part_that_reads_only_group_values_runs_when_they_change():
    """Adam's hoisted ``1 - beta`` reads only the betas: in planned steps it runs again only after
    the betas change (the plan writes their 0-d tensors, which bumps their version)."""
    opt, params = _run(plan=True, steps=3)
    plan, = opt._compiled.step_plans.values()
    hoisted = plan.routes[0].plan.segs[0].direct.graph.fn
    assert isinstance(hoisted, C._Hoisted)
    runs = []
    pre = hoisted.pre
    hoisted.pre = lambda *a: runs.append(1) or pre(*a)
    g = torch.Generator().manual_seed(2)

    def step():
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    step()
    step()
    assert runs == []
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    step()
    step()
    assert runs == [1]


def test_a_stance_other_than_the_default_is_for_dynamo_to_follow(calls):
    """Under ``torch.compiler.set_stance("force_eager")`` the plan does not call the compiled graph."""
    opt, params = _run(plan=True, steps=3)
    before = calls["direct"]
    for p in params:
        p.grad = torch.ones_like(p)
    with torch.compiler.set_stance("force_eager"):
        opt.step()
    assert calls["direct"] == before
    opt.step()
    assert calls["direct"] == before + 1
