"""Parameter-space pipelines (issue 13 item 5): ``param = EXPR``, ``eval:``/``train:`` sequences.

The references: Schedule-Free AdamW and SGD are ``schedulefree`` 1.4.1's ``AdamWScheduleFree``
and ``SGDScheduleFree`` (the classes users use: foreach, no closure), Lookahead around Adam is
``pytorch_optimizer.Lookahead`` (4.1.0, default pullback) around ``torch.optim.Adam``. Each
row trains the same float64 parameters (a matrix, a vector, and one large enough to be a
solo bucket of the compiled backend, written inside the kernel) with the pipeline and the
reference for :data:`STEPS` steps on the same gradients (a seeded random part plus a part
that depends on the parameters, so the trajectories matter), switching to eval and back
every few steps where the pipeline has an eval sequence; every value read must agree to a
relative 1e-9. The compiled rows compile once each and also check that a checkpoint loaded
back into the same optimizer replays the steps bit for bit.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable

import pytest
import torch

import gradpipe
from gradpipe.runtime.compiled import SOLO_MIN, CompileFallbackWarning
from gradpipe.dsl.formatter import format_source
from gradpipe.dsl.parser import parse
from gradpipe.dsl import ast

schedulefree = pytest.importorskip("schedulefree")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

STEPS = 50
RTOL, ATOL = 1e-9, 1e-12
#: a matrix, a vector, and a parameter large enough for a bucket of its own on the compiled
#: backend (SOLO_MIN elements: its new value is written inside the fused kernel)
SHAPES = [(6, 5), (5,), (SOLO_MIN + 3,)]
EVAL_EVERY = 7  # switch to eval (reading the parameters there) and back every 7 steps


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.3 * p.detach() for p in params]


def _lookahead(ps, lr, k, alpha):
    return pytorch_optimizer.Lookahead(torch.optim.Adam(ps, lr=lr), k=k, alpha=alpha)


#: pipeline, reference factory, keyword arguments of both, whether it has eval/train sequences
CASES = {
    "schedulefree_adamw": (lambda ps, **kw: schedulefree.AdamWScheduleFree(ps, **kw),
                           dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, warmup_steps=6, r=0.5,
                                weight_lr_power=1.5), True),
    "schedulefree_sgd": (lambda ps, **kw: schedulefree.SGDScheduleFree(ps, **kw),
                         dict(lr=0.05, momentum=0.85, weight_decay=0.05, warmup_steps=6), True),
    "lookahead_adam": (lambda ps, **kw: _lookahead(ps, **kw), dict(lr=0.01, k=3, alpha=0.3), False),
}


def _trajectory(opt: Any, params: list[torch.Tensor], modes: bool, steps: range = range(STEPS),
                on_step: Callable[[int], None] | None = None) -> list[list[torch.Tensor]]:
    """Step ``opt``; the parameters after every step, and in eval mode every EVAL_EVERY steps;
    the learning rate halves before step 30."""
    seen = []
    for t in steps:
        if t == 30:  # a schedule's cut: Schedule-Free keeps averaging with the largest lr seen (lr_max)
            for group in opt.param_groups:
                group["lr"] *= 0.5
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()
        seen.append([p.detach().clone() for p in params])
        if modes and t % EVAL_EVERY == EVAL_EVERY - 1:
            opt.eval()
            opt.eval()  # a second eval() changes nothing
            seen.append([p.detach().clone() for p in params])
            opt.train()
        if on_step is not None:
            on_step(t)
    return seen


def _reference(name: str) -> list[list[torch.Tensor]]:
    make, kw, modes = CASES[name]
    params = _params()
    opt = make(params, **kw)
    if modes:
        opt.train()  # schedulefree starts in eval mode
    return _trajectory(opt, params, modes)


def _assert_close(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"entry {i}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_follows_reference(name):
    _, kw, modes = CASES[name]
    params = _params()
    opt = gradpipe.Optimizer(params, name, backend="eager", **kw)
    _assert_close(_trajectory(opt, params, modes), _reference(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_follows_reference_and_replays_a_checkpoint_bitwise(name):
    """One compile per pipeline: the reference run, then a checkpoint taken in eval mode (where
    the pipeline has one) at step 20 is loaded back and steps 21.. replay bit for bit."""
    _, kw, modes = CASES[name]
    params = _params()
    opt = gradpipe.Optimizer(params, name, backend="compiled", **kw)
    saved: dict[str, Any] = {}

    def save(t: int) -> None:
        if t == 20:
            if modes:
                opt.eval()
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
            saved["ckpt"] = buf.getvalue()
            if modes:
                opt.train()

    with warnings.catch_warnings():  # compiled, the in-kernel write of the large parameter included
        warnings.simplefilter("error", CompileFallbackWarning)
        seen = _trajectory(opt, params, modes, on_step=save)
    _assert_close(seen, _reference(name))
    ckpt = torch.load(io.BytesIO(saved["ckpt"]), weights_only=False)
    with torch.no_grad():
        for p, v in zip(params, ckpt["params"]):
            p.copy_(v)
    opt.load_state_dict(ckpt["opt"])  # the mode too: eval, as the parameters were saved
    assert opt.mode == ("eval" if modes else "train")
    if modes:
        opt.train()
    replay = _trajectory(opt, params, modes, steps=range(21, STEPS))
    after = seen[len(seen) - len(replay):]
    for a, b in zip(replay, after):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_into_a_new_optimizer_resumes_bitwise(mode):
    kw = CASES["schedulefree_adamw"][1]

    def fresh(ps):
        return gradpipe.Optimizer(ps, "schedulefree_adamw", backend="eager", **kw)

    params = _params()
    opt = fresh(params)
    _trajectory(opt, params, True, steps=range(0, 15))
    if mode == "eval":
        opt.eval()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    if mode == "eval":
        opt.train()
    want = _trajectory(opt, params, True, steps=range(15, 30))

    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert ckpt["opt"]["gradpipe"]["mode"] == mode
    params2 = [v.clone().requires_grad_() for v in ckpt["params"]]
    opt2 = fresh(params2)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.mode == mode
    if mode == "eval":
        with pytest.raises(RuntimeError, match="call opt.train"):
            opt2.step()
        opt2.train()
    got = _trajectory(opt2, params2, True, steps=range(15, 30))
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # and through deepcopy / pickle, in eval mode
    opt2.eval()
    clone = copy.deepcopy(opt2)
    assert clone.mode == "eval"


def test_eval_without_an_eval_sequence_is_an_error_and_changes_nothing():
    params = _params()
    opt = gradpipe.Optimizer(params, "adam", backend="eager")
    _trajectory(opt, params, False, steps=range(3))
    before = [p.detach().clone() for p in params]
    with pytest.raises(AttributeError, match=r"'adam' has no 'eval:' sequence.*'eval: param = \.\.\.'"):
        opt.eval()
    assert opt.mode == "train" and not opt.has_eval
    # tools that switch an optimizer when it has eval/train (Hugging Face's Trainer) leave it alone
    assert not hasattr(opt, "eval") and not hasattr(opt, "train")
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_step_in_eval_mode_is_refused_and_changes_nothing():
    params = _params()
    opt = gradpipe.Optimizer(params, "schedulefree_sgd", backend="eager")
    assert opt.has_eval and opt.mode == "train"
    _trajectory(opt, params, False, steps=range(3))
    opt.eval()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(RuntimeError, match="eval mode.*opt.train()"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in state.items())


def test_eval_before_any_step_leaves_the_parameters():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = gradpipe.Optimizer(params, "schedulefree_adamw", backend="eager")
    opt.eval()
    assert opt.mode == "eval" and all(torch.equal(a, b) for a, b in zip(before, params))
    opt.train()


def test_a_failing_eval_writes_no_parameter():
    params = _params()
    opt = gradpipe.Optimizer(params, "schedulefree_sgd", backend="eager")
    _trajectory(opt, params, False, steps=range(3))
    opt.state[params[1]]["main/z.value"] = torch.zeros(3, dtype=torch.float64)  # broken on purpose
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError):
        opt.eval()
    assert opt.mode == "train" and all(torch.equal(a, b) for a, b in zip(before, params))


def test_mixed_routes_and_eval_touches_only_param_form_routes():
    """A param-form route beside an update-form one: both are SGD written two ways."""
    src = """
state z = param then z - lr * grad
route ndim >= 2: param = param - lr * grad + 0 * previous(z)
route default: grad
eval: param = z
train: param = param
"""
    params = _params()[:2]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gradpipe.Optimizer(params, src, lr=0.1, backend="eager")
    sgd = torch.optim.SGD(ref, lr=0.1)
    for t in range(5):
        for p, q, g in zip(params, ref, _grads(t, params)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        sgd.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    vector = params[1].detach().clone()
    opt.eval()
    assert torch.equal(params[1], vector)  # the update-form route's parameter stays
    torch.testing.assert_close(params[0].detach(), ref[0].detach(), rtol=1e-12, atol=1e-12)  # z is the same point


def test_half_precision_parameter_is_written_once_from_float32():
    p = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)
    want = (p.detach().float() * 0.5 - 0.1 * torch.ones(16)).to(torch.bfloat16)
    opt = gradpipe.Optimizer([p], "param = param * 0.5 - lr * grad", lr=0.1, backend="eager")
    p.grad = torch.ones(16, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), want)


# ------------------------------------------------------------------------- the language
def test_new_statements_parse_and_format():
    src = ("state z = param then z - lr * grad\n"
           "route ndim >= 2: param = param + 0.5 * (previous(z) - param)\n"
           "route default: grad\n"
           "eval: param = z\n"
           "train: param = param\n")
    m = parse(src)
    assert isinstance(m.stmts[1], ast.Route) and m.stmts[1].param
    assert isinstance(m.stmts[2], ast.Route) and not m.stmts[2].param
    assert [s.mode for s in m.stmts if isinstance(s, ast.Mode)] == ["eval", "train"]
    assert format_source(src) == src
    assert parse("param = grad").stmts == (ast.Body(ast.Name(("grad",)), param=True),)
    assert parse("param = grad") != parse("grad")
    assert format_source("eval :\n   param=  z\nparam =grad") == "eval: param = z\nparam = grad\n"


@pytest.mark.parametrize("src,line,column,message", [
    ("param = grad\nparam = grad", 2, 1, "a second pipeline; the first is on line 1"),
    ("param = grad\ngrad", 2, 1, "a second pipeline; the first is on line 1"),
    ("def f() = param = grad\nparam = grad", 1, 17, "unexpected '='"),
    ("x = grad", 1, 1, "can only assign 'param'"),
    ("state z = param then z\nparam = z\neval: param = z", 3, 1, "an 'eval:' sequence without a 'train:'"),
    ("state z = param then z\nparam = z\ntrain: param = z", 3, 1, "a 'train:' sequence without an 'eval:'"),
    ("state z = param then z - grad\ngrad\neval: param = z\ntrain: param = param", 3, 1,
     "the pipeline gives the update u"),
    ("state z = param then z - grad\nparam = z\neval: param = z + grad\ntrain: param = param", 3, 19,
     "cannot read 'grad'"),
    ("state z = param then z - grad\nparam = z\neval: param = z * step\ntrain: param = param", 3, 19,
     "cannot read 'step'"),
    ("state z = param then z - grad\nstate w = 0 then w\nparam = z\neval: param = w\ntrain: param = param", 4, 15,
     "state 'w', which the step of route 'main' does not keep"),
    ("state z = param then z - grad\nparam = z\neval: param = (z | adam)\ntrain: param = param", 3, 16,
     "cannot be used"),
    ("state z = param then z - grad\nparam = z\neval: param = 2\ntrain: param = param", 3, 15,
     "reads neither param nor a state cell"),
    ("state z = param then z - grad\nparam = z\neval: param = z\neval: param = z\ntrain: param = param", 4, 1,
     "a second 'eval:' sequence"),
    ("param = grad > 0", 1, 9, "the new parameter"),
    ("ev: param = grad", 1, 1, "'ev:' is not a statement"),
])
def test_misuse_is_a_positioned_grad_error(src, line, column, message):
    with pytest.raises(gradpipe.GradError) as info:
        gradpipe.compile(src)
    e = info.value
    assert message in str(e) and (e.line, e.column) == (line, column), str(e)


def _spied(calls: list[str]):
    def make(model):
        opt = gradpipe.Optimizer(model.named_parameters(), "schedulefree_sgd", lr=1.0, backend="eager")
        for mode in ("eval", "train"):
            method = getattr(opt, mode)  # opt.eval is a property: wrap what it hands out
            setattr(opt, "_" + mode, lambda method=method, mode=mode: (calls.append(mode), method())[1])
        return opt
    return make


def test_the_training_loops_evaluate_schedule_free_at_its_eval_point():
    from gradpipe.tasks import DigitsTask, run_task, train
    calls: list[str] = []
    result = run_task(DigitsTask(), _spied(calls), steps=20, eval_every=10)
    assert calls == ["eval", "train"] * 2 and len(result.evals) == 2
    calls.clear()
    train(_spied(calls), steps=5)
    assert calls == ["eval"]


def test_explain_counts_the_parameter_write_once():
    from gradpipe.compiler.lowering import route_cost
    # read grad and param, write the parameter: no read of u, no second read of p
    assert route_cost(gradpipe.compile("param = param - lr * grad"), "main").bytes_per_param == 12
    # grad, param, three state buffers read and written, the parameter written
    assert route_cost(gradpipe.load("schedulefree_sgd"), "main").bytes_per_param == 36
    assert "new parameter = " in gradpipe.load("lookahead_adam").explain()
