"""State cells: ``state NAME = init then update`` and ``previous(x)``.

A cell is state like any op's: created by the runtime, saved in ``state_dict`` under its
name from the source, resumed bit for bit, fused by the compiled backend, left alone by a
skipped step, merged by CSE when two cells are the same. The pipelines below are the ones
the language issue names (AMSGrad's running maximum, the previous gradient, an
accumulator over k micro-steps, a counter, slow weights), each checked against the
recurrence written out in Python, or against torch.optim where torch has the optimizer.
"""

from __future__ import annotations

import copy
import io
import pathlib
import warnings

import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.compiler.lowering import plan_route, route_cost
from gradpipe.dsl.formatter import format_source
from gradpipe.runtime.compiled import CompileFallbackWarning
from gradpipe.runtime.migration import StateMigrationWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

BACKENDS = ("eager", "compiled")
SHAPES = [(4, 3), (5,)]

#: torch.optim.Adam(amsgrad=True), from primitives and one state cell
AMSGRAD = """\
hparam lr = 0.001 in [0, inf)
hparam betas = (0.9, 0.999) in [0, 1)
hparam eps = 1e-8 in [0, inf)

let m = grad | ema(betas[0])
let v = grad * grad | ema(betas[1])
state vmax = 0 then max(vmax, v)
m / (1 - betas[0] ** step) / (sqrt(vmax) / sqrt(1 - betas[1] ** step) + eps)
"""


def _params(seed: int = 1) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _grads(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def _feed(opt: gradpipe.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    """A step of ``opt`` per item of ``grads``, each parameter given its gradient."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _run(src: str, backend: str, steps: int = 6, **hp) -> tuple[list[torch.Tensor], gradpipe.Optimizer]:
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend=backend, **hp)
    _feed(opt, params, _grads(steps))
    return [p.detach().clone() for p in params], opt


def _reference(update, steps: int = 6, lr: float = 1.0) -> list[torch.Tensor]:
    """``p <- p - lr * update(state, g, step)`` per parameter, ``state`` a dict per parameter."""
    params = [p.detach().clone() for p in _params()]
    states: list[dict] = [{} for _ in params]
    for t, gs in enumerate(_grads(steps), start=1):
        for i, g in enumerate(gs):
            params[i] -= lr * update(states[i], g, t)
    return params


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-12) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_from_a_state_cell_follows_torch(backend):
    """AMSGrad's running maximum as a cell: torch.optim.Adam(amsgrad=True) to 1e-9, 50 steps."""
    ours, _ = _run(AMSGRAD, backend, steps=50, lr=0.01)
    params = _params()
    ref = torch.optim.Adam(params, lr=0.01, amsgrad=True)
    _feed(ref, params, _grads(50))
    _close(ours, [p.detach() for p in params], rtol=1e-9)


def test_amsgrad_is_one_fused_segment():
    """The cell fuses with the ops around it: one segment, and the cell's buffer is counted."""
    prog = gradpipe.compile(AMSGRAD)
    plan = plan_route(prog, label="main")
    assert [k for k, _ in plan] == ["segment"]
    assert plan[0][1].commits == [("main/vmax", "main/vmax/max")]
    # grad 4, m and v and vmax read and written 24, the parameter read and written 8
    assert route_cost(prog, "main").bytes_per_param == 36


PIPELINES = {
    # the previous gradient, 0 before the first step
    "previous": ("hparam lr = 1\ngrad + 0.5 * previous(grad)", lambda s, g, t: _prev(s, g)),
    # two steps back: a cell of a cell (a shift register)
    "shift": ("hparam lr = 1\nlet p1 = previous(grad)\nprevious(p1)", lambda s, g, t: _shift(s, g)),
    # a counter
    "counter": ("hparam lr = 1\nstate n = 0 then n + 1\ngrad * n", lambda s, g, t: g * t),
    # a running maximum starting at the first gradient
    "running_max": ("hparam lr = 1\nstate mx = grad then max(mx, grad)\nmx",
                    lambda s, g, t: _keep(s, "mx", g, lambda old: torch.maximum(old, g))),
    # a running sum with a hyperparameter initial value (Adagrad's initial_accumulator_value)
    "accumulator": ("hparam lr = 1\nhparam init = 0.1\nstate acc = init then acc + grad * grad\n"
                    "grad / sqrt(acc)",
                    lambda s, g, t: g / torch.sqrt(_keep(s, "acc", torch.full_like(g, 0.1) + g * g,
                                                         lambda old: old + g * g))),
    # the cell's new value is a number
    "number_update": ("hparam lr = 1\nstate c = 5 then step\ngrad * previous(c)",
                      lambda s, g, t: g * (5 if t == 1 else t - 1)),
}


def _prev(s, g):
    old = s.get("prev", torch.zeros_like(g))
    s["prev"] = g.clone()
    return g + 0.5 * old


def _shift(s, g):
    p1, p2 = s.get("p1", torch.zeros_like(g)), s.get("p2", torch.zeros_like(g))
    s["p2"], s["p1"] = p1, g.clone()
    return p2


def _keep(s, key, first, later):
    s[key] = first.clone() if key not in s else later(s[key])
    return s[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_cells_follow_their_recurrence(case, backend):
    src, update = PIPELINES[case]
    ours, _ = _run(src, backend)
    _close(ours, _reference(update))


ACCUMULATE = """\
hparam lr = 1
hparam k = 3 in [1, inf)
# the sum of this window's gradients: restarted on the first micro-step of each window
state acc = 0 then where((step - 1) % k == 0, grad, acc + grad)
# applied (as their mean) on the window's last micro-step; nothing moves in between
where(step % k == 0, acc / k, 0)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_over_k_micro_steps(backend):
    """optax.MultiSteps' arithmetic: every k-th step applies the mean of the last k gradients."""
    def ref(s, g, t):
        s["acc"] = g.clone() if (t - 1) % 3 == 0 else s["acc"] + g
        return s["acc"] / 3 if t % 3 == 0 else torch.zeros_like(g)
    ours, _ = _run(ACCUMULATE, backend, steps=7)
    _close(ours, _reference(ref, steps=7))


SLOW = """\
hparam lr = 0.1
hparam k = 2 in [1, inf)
hparam alpha = 0.5 in [0, 1]
# Lookahead's slow weights: synced toward the parameters every k steps
state slow = param then where(step % k == 0, slow + alpha * (param - slow), slow)
# a pull toward them
grad + 0.01 * (param - slow)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_weights_start_at_the_parameters_and_sync_every_k_steps(backend):
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = gradpipe.Optimizer(params, SLOW, backend=backend)
    slow = [s.clone() for s in start]
    for t, gs in enumerate(_grads(5), start=1):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if t % 2 == 0:
            slow = [s + 0.5 * (b - s) for s, b in zip(slow, before)]
        want = [b - 0.1 * (g + 0.01 * (b - s)) for b, g, s in zip(before, gs, slow)]
        _close([p.detach() for p in params], want)
    for p, s in zip(params, slow):
        torch.testing.assert_close(opt.state[p]["main/slow.value"], s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_state_is_named_from_the_source_and_resumes_bitwise(backend):
    """The keys are ``<route>/<name>.value``; a run resumed from a state_dict (through
    torch.save) equals one that never stopped, bit for bit."""
    whole, opt = _run(AMSGRAD, backend, steps=8, lr=0.01)
    assert "main/vmax.value" in opt.state[opt.param_groups[0]["params"][0]]
    params = _params()
    first = gradpipe.Optimizer(params, AMSGRAD, backend=backend, lr=0.01)
    grads = _grads(8)
    _feed(first, params, grads[:4])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = gradpipe.Optimizer(params, AMSGRAD, backend=backend, lr=0.01)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _feed(resumed, params, grads[4:])
    for a, b in zip(whole, params):
        assert torch.equal(a, b.detach())


def test_cell_state_moves_between_backends():
    _, eager = _run(AMSGRAD, "eager", steps=3, lr=0.01)
    params = _params()
    compiled = gradpipe.Optimizer(params, AMSGRAD, backend="compiled", lr=0.01)
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    for p, q in zip(params, eager.param_groups[0]["params"]):
        assert torch.equal(compiled.state[p]["main/vmax.value"], eager.state[q]["main/vmax.value"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_leaves_cells_alone(backend):
    """A non-finite gradient skips the step: no cell takes a new value."""
    src = "hparam lr = 1\nstate acc = 0 then acc + grad\nacc"
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend=backend)
    _feed(opt, params, _grads(2))
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    params[0].grad = torch.full(SHAPES[0], float("nan"), dtype=torch.float64)
    params[1].grad = torch.ones(SHAPES[1], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_that_starts_later_starts_its_cells_then(backend):
    """Two parameters in one bucket, the second reached first at step 3: its cell starts at
    its own first step (the compiled backend selects per element)."""
    src = "hparam lr = 1\nstate mx = grad then max(mx, grad)\nmx"
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend=backend)
    gs = _grads(4)
    for t, step_grads in enumerate(gs, start=1):
        params[0].grad = step_grads[0].clone()
        params[1].grad = step_grads[1].clone() if t >= 3 else None
        opt.step()
    want = torch.maximum(gs[2][1], gs[3][1])
    torch.testing.assert_close(opt.state[params[1]]["main/mx.value"], want, rtol=0, atol=0)


def test_cells_are_merged_when_they_are_the_same_cell():
    prog = gradpipe.compile("let a = previous(grad)\nlet b = previous(grad)\na + b")
    assert [k for k in prog.state_buffers() if k.endswith(".value")] == ["main/a/previous.value"]
    # two recurrences are two cells, even when they are written alike
    two = gradpipe.compile("state a = 0 then a + grad\nstate b = 0 then b + grad\na + b")
    assert sum(k.endswith(".value") for k in two.state_buffers()) == 2


def test_a_cell_nothing_reads_keeps_no_state():
    prog = gradpipe.compile("state n = 0 then n + 1\ngrad")
    assert not [k for k in prog.state_buffers() if k.endswith(".value")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [False, True])
def test_a_let_read_in_both_branches_keeps_its_cell(flag, backend):
    """A let that reads a cell is built once but read in every branch that uses it: its cell
    is kept in both branches of where(flag, ...) (it was kept only where the first use's
    branch is taken, so previous(grad) read 0 every step with the other value of flag)."""
    src = ("hparam flag = false\nlet d = grad - previous(grad, grad)\n"
           "where(flag, d + 0 * param, d / 2)")
    got, _ = _run(src, backend, flag=flag, lr=1.0)

    def ref(st, g, t):
        d = g - st.get("prev", g)
        st["prev"] = g
        return d if flag else d / 2
    _close(got, _reference(ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_let_used_in_both_branches_keeps_its_cell_in_both(backend):
    """``u`` reads the cell under ``where(ams, ...)`` and is built inside one branch of
    ``where(dec, ...)``, then used again in the other: the cell is kept where ``ams`` holds,
    whatever ``dec`` is (it was kept only where both held, and read zeros otherwise)."""
    src = ("hparam lr = 1\nhparam ams = false\nhparam dec = false\n"
           "state mx = 0 then max(mx, abs(grad))\nlet u = grad / (where(ams, mx, abs(grad)) + 1)\n"
           "where(dec, u | decay(0.1), u)")
    keep = gradpipe.compile(src).node("main/mx").args["keep"]
    assert [keep.eval({"ams": a, "dec": d}) for a in (False, True) for d in (False, True)] == \
        [False, False, True, True]
    ours, _ = _run(src, backend, ams=True, dec=False)
    want = _reference(lambda s, g, t: g / (_keep(s, "mx", g.abs(), lambda old: torch.maximum(old, g.abs())) + 1))
    _close(ours, want)


def test_cells_of_two_routes_are_two_cells():
    src = "state n = 0 then n + grad\nroute ndim >= 2: n\nroute default: n * 2"
    prog = gradpipe.compile(src)
    assert {k for k in prog.state_buffers() if k.endswith(".value")} == {"ndim>=2/n.value", "default/n.value"}


def test_state_statements_format_canonically():
    src = "state   acc=0 then\n    where(step % 2 == 0, 0, acc+grad)\nacc\n"
    assert format_source(src) == "state acc = 0 then where(step % 2 == 0, 0, acc + grad)\nacc\n"
    assert format_source(format_source(src)) == format_source(src)


ERRORS = [
    # (source, line:col of the error, words of the message)
    ("state a = 0 then b\nlet b = a + grad\ngrad + a", "2:9", "depends on itself"),
    ("state a = ema then a\ngrad + a", "1:11", "initial value of state 'a' must be a number or a signal"),
    ("state a = grad > 0 then a\ngrad + a", "1:11", "initial value of state 'a' needs numbers"),
    ("state a = 0 then grad > 0\ngrad + a", "1:18", "new value of state 'a' needs numbers"),
    ("state a = 0 then ema\ngrad + a", "1:18", "new value of state 'a' must be a number or a signal"),
    ("state a = 0 then a + grad\ngrad + previous(a, 1)", "2:20", "starts at its own initial value"),
    ("grad | previous(init=1, x=2)", "1:25", "'previous' has no argument 'x'"),
    ("grad + previous(grad, 1, 2)", "1:8", "takes 1 or 2 arguments"),
    ("grad + previous(ema)", "1:17", "'previous' needs a signal"),
    ("grad | galore(rank=2) { previous }", "1:25", "cannot be kept inside the { ... } pipeline"),
    ("state a = 0 then a + grad\nlet a = 1\ngrad", "2:1", "already defined"),
    ("state a = 0 then a + grad\ngrad | a(1)", "2:8", "is a state cell, not an op"),
    ("state step = 0 then step + 1\ngrad", "1:1", "built-in name"),
]


@pytest.mark.parametrize("src,where,words", ERRORS)
def test_misuse_is_a_positioned_error(src, where, words):
    with pytest.raises(GradError) as info:
        gradpipe.compile(src, "bad.grad")
    text = str(info.value)
    assert f"bad.grad:{where}:" in text, text
    assert words in text, text
    assert "hint:" in text, text


def test_an_unused_state_is_checked_too():
    """``gradpipe check`` (and building the optimizer) report a mistake in a cell nothing reads."""
    with pytest.raises(GradError, match="log of a number that is not positive"):
        gradpipe.compile("state b = 0 then b + log(0)\ngrad")


def test_the_compiled_step_is_compiled_once_with_cells():
    params = _params()
    opt = gradpipe.Optimizer(params, AMSGRAD, backend="compiled", lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        _feed(opt, params, _grads(3))


#: torch.optim.Adam from two state cells and elementwise math: the file benchmarks/prelude_bench.py times
ADAM_FROM_PRIMITIVES = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "adam_from_primitives.grad"
                        ).read_text(encoding="utf-8")


def test_adam_from_primitives_costs_what_the_builtin_op_costs():
    """The same plan as the built-in ``adam`` op (one fused segment, 28 bytes per parameter,
    8 bytes of state), and the same numbers to 1e-12 in float64 over 50 steps."""
    ours, builtin = gradpipe.compile(ADAM_FROM_PRIMITIVES), gradpipe.load("adam")
    for prog in (ours, builtin):
        assert [k for k, _ in plan_route(prog, label="main")] == ["segment"]
    assert route_cost(ours, "main") == route_cost(builtin, "main")
    assert ours.state_bytes_per_param("main") == builtin.state_bytes_per_param("main") == 8
    a, _ = _run(ADAM_FROM_PRIMITIVES, "eager", steps=50, lr=0.01)
    b, _ = _run("adam", "eager", steps=50, lr=0.01)
    _close(a, b, rtol=1e-12)


def test_adam_from_primitives_compiled_matches_eager():
    a, _ = _run(ADAM_FROM_PRIMITIVES, "eager", steps=5, lr=0.01)
    b, _ = _run(ADAM_FROM_PRIMITIVES, "compiled", steps=5, lr=0.01)
    _close(a, b, rtol=1e-12)


def test_an_update_that_also_feeds_a_cell_is_applied_in_its_segment():
    """Adadelta's step also feeds its accumulator: the segment still applies it to the
    parameters itself (28 bytes per parameter, as fused Adam), not through a buffer."""
    prog = gradpipe.load("adadelta")
    (kind, seg), = plan_route(prog, label="main")
    assert seg.final == prog.ir["main"].update
    assert route_cost(prog, "main").bytes_per_param == 28


def test_cells_are_carried_by_migration():
    """A checkpoint of Adam from cells loads into the pipeline edited to AMSGrad: ``m`` and
    ``v`` keep their values, the new cell ``vmax`` starts in the next step (a migration
    warning says so), and a cell the edit removes is dropped."""
    params = _params()
    opt = gradpipe.Optimizer(params, ADAM_FROM_PRIMITIVES, lr=0.01)
    _feed(opt, params, _grads(3))
    saved = copy.deepcopy(opt.state_dict())
    amsgrad = ADAM_FROM_PRIMITIVES.replace(
        "m / (1 - betas[0] ** step) / (sqrt(v)",
        "state vmax = 0 then max(vmax, v)\nm / (1 - betas[0] ** step) / (sqrt(vmax)")
    edited = gradpipe.Optimizer(params, amsgrad, lr=0.01)
    with pytest.warns(StateMigrationWarning):
        edited.load_state_dict(saved)
    for p in params:
        assert torch.equal(edited.state[p]["main/m.value"], opt.state[p]["main/m.value"])
        assert "main/vmax.value" not in edited.state[p]
    for p, g in zip(params, _grads(1, seed=9)[0]):
        p.grad = g.clone()
    edited.step()
    assert all("main/vmax.value" in edited.state[p] for p in params)
    back = gradpipe.Optimizer(params, ADAM_FROM_PRIMITIVES, lr=0.01)
    with pytest.warns(StateMigrationWarning):
        back.load_state_dict(edited.state_dict())
    assert all("main/vmax.value" not in back.state[p] for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cell_that_starts_from_a_global_value_has_the_parameters_shape(backend):
    """One number for the route (a reduction over ``global``) fills a cell of the parameter's
    shape on both backends, so their state dicts are interchangeable."""
    src = "hparam lr = 1\nstate c = sum(grad, over=global) then c + 1\ngrad * 0 + c"
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend=backend)
    _feed(opt, params, _grads(2))
    total = sum(float(g.sum()) for g in _grads(2)[0])
    for p in params:
        assert opt.state[p]["main/c.value"].shape == p.shape
        torch.testing.assert_close(opt.state[p]["main/c.value"], torch.full_like(p, total + 2), rtol=1e-12, atol=0)


def test_per_row_cells_have_their_shape_in_the_state_layout():
    prog = gradpipe.load("adafactor")
    shapes = {n: shp for n, _, _, shp in prog.state_layout("ndim>=2", (4, 6)) if n.endswith("_var")}
    assert shapes == {"ndim>=2/row_var": (4, 1), "ndim>=2/col_var": (1, 6)}
