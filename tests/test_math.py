"""Elementwise math: the math functions, comparisons, masks, ``where`` and ``%``.

Every function and operator runs on signals and on scalars and is checked against NumPy
in float64 (:data:`SIGNALS`, :data:`SCALARS`); a few pipelines that use all of them run on
the compiled backend too, fused into one segment compiled once (:func:`test_compiled_fuses`).
Every misuse is a positioned GradError with a hint (:data:`ERRORS`), and the formatter
writes the new syntax canonically.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.compiler import scalars as S
from gradpipe.compiler.lowering import route_cost
from gradpipe.compiler.prims import FUNCTIONS, PORTS
from gradpipe.runtime.compiled import CompileFallbackWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

LR = 0.1
STEPS = 4
SHAPES = [(3, 4), (5,)]

Ref = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _grads(seed: int = 0) -> list[list[torch.Tensor]]:
    """Per step, per parameter, a float64 gradient with some exact zeros and ties."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        gs = []
        for shape in SHAPES:
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            g.view(-1)[0] = 0.0
            gs.append(g)
        out.append(gs)
    return out


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _run(src: str, backend: str = "eager", **hp) -> list[torch.Tensor]:
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend=backend, lr=LR, **hp)
    for gs in _grads():
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _reference(ref: Ref) -> list[np.ndarray]:
    """The parameters after STEPS steps of p <- p - lr * ref(g, p, step), in NumPy."""
    ps = [p.detach().numpy().copy() for p in _params()]
    for step, gs in enumerate(_grads(), start=1):
        ps = [p - LR * np.asarray(ref(g.numpy(), p, step), dtype=np.float64) for p, g in zip(ps, gs)]
    return ps


def _where(c, a, b):
    return np.where(c, a, b)


# --------------------------------------------------------------------------- signals
#: (pipeline, reference u(g, p, step)) in float64
SIGNALS: list[tuple[str, Ref]] = [
    ("grad | abs", lambda g, p, s: np.abs(g)),
    ("abs(grad)", lambda g, p, s: np.abs(g)),
    ("sign(grad)", lambda g, p, s: np.sign(g)),
    ("grad | sign", lambda g, p, s: np.sign(g)),
    ("sqrt(abs(grad))", lambda g, p, s: np.sqrt(np.abs(g))),
    ("abs(grad) | sqrt", lambda g, p, s: np.sqrt(np.abs(g))),
    ("exp(-abs(grad))", lambda g, p, s: np.exp(-np.abs(g))),
    ("log(1 + abs(grad))", lambda g, p, s: np.log(1 + np.abs(g))),
    ("max(grad, param)", lambda g, p, s: np.maximum(g, p)),
    ("grad | max(1e-3)", lambda g, p, s: np.maximum(g, 1e-3)),
    ("max(0.5, grad)", lambda g, p, s: np.maximum(0.5, g)),
    ("min(grad, param)", lambda g, p, s: np.minimum(g, p)),
    ("grad | min(step / 10)", lambda g, p, s: np.minimum(g, s / 10)),
    ("clamp(grad, -0.5, 0.5)", lambda g, p, s: np.clip(g, -0.5, 0.5)),
    ("grad | clamp(-0.5, 0.5)", lambda g, p, s: np.clip(g, -0.5, 0.5)),
    ("clamp(grad, -abs(param), abs(param))", lambda g, p, s: np.clip(g, -np.abs(p), np.abs(p))),
    ("clamp(0.1, grad, param)", lambda g, p, s: np.minimum(np.maximum(0.1, g), p)),
    ("where(grad > 0, grad, 0.1 * grad)", lambda g, p, s: _where(g > 0, g, 0.1 * g)),
    ("where(grad >= 0, 1, -1)", lambda g, p, s: _where(g >= 0, 1.0, -1.0)),
    ("where(grad < param, grad, param)", lambda g, p, s: _where(g < p, g, p)),
    ("where(grad <= 0, 0.3, grad)", lambda g, p, s: _where(g <= 0, 0.3, g)),
    ("where(grad == 0, 1, grad)", lambda g, p, s: _where(g == 0, 1.0, g)),
    ("where(grad != 0, grad, 7)", lambda g, p, s: _where(g != 0, g, 7.0)),
    ("where(0 < grad, grad, 0)", lambda g, p, s: _where(0 < g, g, 0.0)),
    ("where(step > 2, grad, -grad)", lambda g, p, s: g if s > 2 else -g),
    ("where(true, grad, param)", lambda g, p, s: g),
    ("where(step > 2, grad, 0)", lambda g, p, s: g if s > 2 else 0 * g),
    ("where(step > 2, 1, grad)", lambda g, p, s: 1 + 0 * g if s > 2 else g),
    ("hparam f = false\nwhere(f, 1, grad)", lambda g, p, s: g),
    # a scalar condition computes only the scalar branch it picks (1 / 0 at step 2, log(0) at step 1)
    ("where(step > 2, 1 / (step - 2), grad)", lambda g, p, s: 1 / (s - 2) + 0 * g if s > 2 else g),
    ("where(step > 1, log(step - 1), grad)", lambda g, p, s: np.log(s - 1) + 0 * g if s > 1 else g),
    ("where(step <= 1, param, 1 / (step - 1))", lambda g, p, s: p if s <= 1 else 1 / (s - 1) + 0 * g),
    ("hparam k = 2\nwhere(k > 3, sqrt(k - 3), grad)", lambda g, p, s: g),
    ("grad % 0.3", lambda g, p, s: np.mod(g, 0.3)),
    ("grad % param", lambda g, p, s: np.mod(g, p)),
    ("grad * where(step % 2 == 0, 1, 0)", lambda g, p, s: g * (1.0 if s % 2 == 0 else 0.0)),
    ("grad * sqrt(1 - 0.999 ** step)", lambda g, p, s: g * np.sqrt(1 - 0.999 ** s)),
    ("grad | scale(max(step, 2) / 4)", lambda g, p, s: g * max(s, 2) / 4),
]


@pytest.mark.parametrize("src,ref", SIGNALS, ids=[c[0] for c in SIGNALS])
def test_signals_match_numpy(src, ref):
    got = _run(src)
    for x, y in zip(got, _reference(ref)):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12, atol=1e-14, err_msg=src)


def test_mask_stage_form_of_where():
    """A mask piped into ``where(a, b)`` is its condition: ``m | where(a, b)`` is ``where(m, a, b)``."""
    got = _run("grad > 0 | where(grad, 0)")
    for x, y in zip(got, _reference(lambda g, p, s: _where(g > 0, g, 0.0))):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12)


def test_amsgrad_style_max_keeps_state_and_round_trips():
    """``max`` of a stateful signal, and a checkpoint taken mid-way resumes to the same result."""
    src = "grad | ema(0.9) | max(1e-3) | clamp(-1, 1)"
    full = _run(src)
    params = _params()
    opt = gradpipe.Optimizer(params, src, lr=LR)
    grads = _grads()
    for gs in grads[:2]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = gradpipe.Optimizer(params, src, lr=LR)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    for gs in grads[2:]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt2.step()
    for x, y in zip(params, full):
        torch.testing.assert_close(x.detach(), y, rtol=0, atol=0)


# --------------------------------------------------------------------------- scalars
#: (scalar expression of step, NumPy reference of step)
SCALARS: list[tuple[str, Callable[[int], float]]] = [
    ("abs(2 - step)", lambda s: np.abs(2 - s)),
    ("sqrt(step)", lambda s: np.sqrt(s)),
    ("exp(-step)", lambda s: np.exp(-s)),
    ("log(step)", lambda s: np.log(s)),
    ("max(step, 2)", lambda s: np.maximum(s, 2)),
    ("min(step, 2)", lambda s: np.minimum(s, 2)),
    ("clamp(step, 2, 3)", lambda s: np.clip(s, 2, 3)),
    ("step % 3", lambda s: np.mod(s, 3)),
    ("(0 - step) % 3", lambda s: np.mod(-s, 3)),
    ("step % -3", lambda s: np.mod(s, -3)),
    ("where(step % 2 == 0, 1, 0)", lambda s: 1.0 if s % 2 == 0 else 0.0),
    ("where(step < 2, 1, 0)", lambda s: float(s < 2)),
    ("where(step <= 2, 1, 0)", lambda s: float(s <= 2)),
    ("where(step > 2, 1, 0)", lambda s: float(s > 2)),
    ("where(step >= 2, 1, 0)", lambda s: float(s >= 2)),
    ("where(step != 2, 1, 0)", lambda s: float(s != 2)),
    ("where(step > 1, 1 / (step - 1), 0)", lambda s: 1 / (s - 1) if s > 1 else 0.0),  # only the branch taken
    ("sqrt(1 - 0.999 ** step)", lambda s: np.sqrt(1 - 0.999 ** s)),
]


@pytest.mark.parametrize("expr,ref", SCALARS, ids=[c[0] for c in SCALARS])
def test_scalars_match_numpy(expr, ref):
    got = _run(f"grad * ({expr})")
    for x, y in zip(got, _reference(lambda g, p, s: g * ref(s))):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12, atol=1e-14, err_msg=expr)


@pytest.mark.parametrize("expr,value", [
    ("sqrt(4)", 2.0), ("log(1) + 3", 3.0), ("exp(0) + 1", 2.0), ("abs(-3)", 3),
    ("max(1, 2)", 2), ("min(3, 2)", 2), ("clamp(5, 0, 2)", 2), ("8 % 3", 2), ("-7 % 3", 2), ("where(1 < 2, 3, 4)", 3),
    ("where(2 == 2.0, 3, 4)", 3), ("where(1 != 1, 3, 4)", 4), ("where(false, 3, step)", None),
])
def test_constants_fold(expr, value):
    prog = gradpipe.compile(f"grad | scale({expr})")
    (node,) = [n for n in prog.ir["main"].nodes if n.op == "scale"]
    if value is None:
        assert node.args["x"] == S.Src("step")
    else:
        assert node.const["x"] == value and type(node.const["x"]) is type(value)


def test_hyperparameter_conditions_and_booleans():
    src = "hparam k = 2 in [1, 10]\nhparam f = true\ngrad * where(step % k == 0, 1, 0) * where(f, 2, 3)"
    got = _run(src, k=3)
    ref = _reference(lambda g, p, s: g * (1.0 if s % 3 == 0 else 0.0) * 2)
    for x, y in zip(got, ref):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12)


def test_user_definitions_shadow_math_names():
    """Like op names, math names may be redefined by a let or def in a file."""
    prog = gradpipe.compile("def max(x=1) = scale(x)\ngrad | max(2)")
    assert [n.op for n in prog.ir["main"].nodes if n.kind.value != "source"] == ["scale", "out"]


# --------------------------------------------------------------------------- compiled backend
#: pipelines that use every primitive, each fused into one segment
COMPILED = [
    "where(grad > 0, grad, 0.1 * grad) + max(grad, param) - min(grad, 0.1) + clamp(grad, -0.5, 0.5)"
    " + where(step > 2, grad, 0) + where(step % 2 == 1, 3, param)"
    " + where(step > 2, 1 / (step - 2), grad) + where(step > 1, log(step - 1), param)",
    "grad * where(step % 2 == 0, 1, 0) * sqrt(1 - 0.999 ** step) + abs(grad) + sign(grad) - exp(-abs(grad))"
    " + log(1 + abs(param)) + grad % 0.3 + where(grad <= param, 1, -1) + where(grad != 0, grad, 1)"
    " * where(step >= 2, 1, 2) + where(grad == 0, 1, 0) + where(grad < 0, 0, 1) + where(grad >= 0, 0, 1)",
]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("src", COMPILED, ids=["select", "everything"])
def test_compiled_fuses(src):
    """The compiled backend matches the eager one, runs the pipeline as one fused segment with
    no eager node (``explain``'s plan), and compiles it once although ``step % 2 == 0`` and
    ``step >= 2`` change value from step to step."""
    prog = gradpipe.compile(src)
    cost = route_cost(prog, "main")
    assert (cost.segments, cost.eager_nodes) == (1, [])
    eager = _run(src)
    params = _params()
    opt = gradpipe.Optimizer(params, src, backend="compiled", lr=LR)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # really compiled, not run eagerly
        for gs in _grads():
            for p, g in zip(params, gs):
                p.grad = g.clone()
            before = _unique_graphs()
            opt.step()
            counts.append(_unique_graphs() - before)
    assert counts == [1] + [0] * (STEPS - 1), counts
    for x, y in zip(params, eager):
        torch.testing.assert_close(x.detach(), y, rtol=1e-12, atol=1e-14)


def test_compiled_mask_across_segments():
    """A mask computed before an eager op and read after it crosses two fused segments (stored
    as 0/1 in the segment's float buffer): the compiled backend still matches the eager one."""
    src = "let m = grad > 0\nlet c = where(m, grad, 0) | clip_norm(1, scope=tensor)\nwhere(m, c, 1)"
    assert route_cost(gradpipe.compile(src), "main").segments == 2
    for x, y in zip(_run(src, "compiled"), _run(src)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_explain_shows_math_nodes():
    from gradpipe.compiler.explain import explain
    text = explain(gradpipe.compile("where(grad > 0, clamp(grad, -1, 1), 0)"))
    assert "main/grad > 0" in text and "clamp(main/grad, -1, 1)" in text
    assert "where(main/gt, main/clamp, 0)" in text
    assert "1 fused segment" in text


def test_every_function_has_ports():
    assert set(FUNCTIONS) <= set(PORTS)
    assert all(len(PORTS[f]) >= n for f, n in FUNCTIONS.items())


# --------------------------------------------------------------------------- misuse
#: (source, line, column, message fragment, hint fragment)
ERRORS = [
    ("grad * (step % 0)", 1, 16, "'%' by zero", "whole number other than 0"),
    ("grad * (step % 2.5)", 1, 16, "'%' needs whole numbers, got 2.5", "remainder"),
    ("grad * (2 % 0)", 1, 13, "'%' by zero", "remainder"),
    ("grad * (0.5 % 2)", 1, 9, "whole numbers", "remainder"),
    ("hparam k = 0\ngrad * (7 % k)", 2, 9, "by zero with the hyperparameters' defaults", "remainder"),
    ("hparam k = 2.5\ngrad * (step % k)", 2, 9, "whole numbers, got 2.5", "remainder"),
    ("grad * log(0)", 1, 8, "log of a number that is not positive (0)", "log needs a number > 0"),
    ("grad * log(-2)", 1, 8, "not positive", "log needs"),
    ("grad * sqrt(-1)", 1, 8, "sqrt of a negative number (-1)", "sqrt needs a number >= 0"),
    ("hparam c = 0\ngrad * log(c)", 2, 8, "not positive (0) with the hyperparameters' defaults", "log needs"),
    ("grad * exp(1000)", 1, 8, "not a finite real number", "exp"),
    ("(grad > 0) * 2", 1, 2, "'*' needs numbers, but this is a mask", "where(grad > 0, a, b)"),
    ("grad > 0", 1, 1, "the update needs numbers, but this is a mask", "where(grad > 0, a, b)"),
    ("grad > 0 | adam", 1, 12, "'adam' needs numbers, but this is a mask", "where(grad > 0, a, b)"),
    ("grad | project_orthogonal(grad > 0)", 1, 27, "argument 'ref' of 'project_orthogonal' needs numbers",
     "where("),
    ("max(grad > 0, 1)", 1, 5, "'max' needs numbers, but this is a mask", "where("),
    ("(grad > 0) < 1", 1, 2, "'<' needs numbers", "where("),
    ("let m = grad != param\ngrad | scale(m)", 1, 9, "mask", "where(grad != param, a, b)"),
    ("where(grad, 1, 2)", 1, 7, "the condition of 'where' must be a comparison", "where(grad > 0, a, b)"),
    ("where(1, grad, 2)", 1, 7, "the condition of 'where' must be a comparison or a boolean", "x > 0"),
    ("grad * (step == 3)", 1, 9, "'*' needs a number, but this is a boolean", "where(step == 3, a, b)"),
    ("grad * ((step > 2) + 1)", 1, 10, "'+' needs a number", "where(step > 2, a, b)"),
    ("grad | adam(eps=step == 5)", 1, 17, "must be a number, got a boolean", "where(cond, a, b)"),
    ("grad | scale(step > 2)", 1, 14, "got a boolean", "where("),
    ("grad * (true % 2)", 1, 9, "arithmetic needs numbers or signals, but this is a boolean", "where("),
    ("hparam f = true\ngrad * (f + 1)", 2, 9, "'f' is a boolean", "where(f, a, b)"),
    ("hparam k = 1 < 2\ngrad", 1, 12, "cannot be a comparison", "true or false"),
    ("grad | max", 1, 8, "'max' takes 2 arguments, got 0", "x | max(b)"),
    ("grad | clamp(1)", 1, 8, "'clamp' takes 3 arguments, got 1", "x | clamp(lo, hi)"),
    ("where(grad > 0, 1, 2, 3)", 1, 1, "'where' takes 3 arguments, got 4", "where(cond, a, b)"),
    ("grad | max(a=1)", 1, 12, "'max' takes its arguments by position", "max(a, b)"),
    ("grad | abs { adam }", 1, 14, "'abs' takes no { ... } block", "abs(x)"),
    ("grad | abs(grad)", 1, 8, "a signal cannot be a pipeline stage", "add("),
    ("grad ** abs(grad)", 1, 9, "the exponent must be a number", "exp(y * log(x))"),
    ("grad | running_max", 1, 8, "unknown name 'running_max'", "not an op, a math function"),
    ("v | adam", 1, 1, "unknown name 'v'", "'gradpipe ops' lists the ops"),
    ("grad | mxa(1)", 1, 8, "unknown op 'mxa'", "did you mean 'max'?"),
    ("grad | emaa", 1, 8, "unknown name 'emaa'", "did you mean 'ema'?"),
    ("a < b < c", 1, 7, "unexpected '<'", "comparisons do not chain"),
    ("grad % 0", 1, 8, "'%' by zero", "divisor other than 0"),
    ("grad * 2 % (1 - 1)", 1, 13, "'%' by zero", "divisor other than 0"),
    ("hparam k = 0\ngrad % k", 2, 8, "'%' by zero with the hyperparameters' defaults", "divisor other than 0"),
    ("hparam k = 1000\ngrad * exp(k)", 2, 8, "exp overflows", "exp(x) is larger than the largest float"),
    ("hparam k = 2\ngrad * where(k > 1, sqrt(k - 3), 0)", 2, 21, "sqrt of a negative number (-1) with", "sqrt"),
    ("hparam k = 2\nwhere(k > 3, grad * sqrt(k - 3), grad)", 2, 21, "sqrt of a negative number", "sqrt"),
    ("grad | clip_norm(max=1) == 2", 1, 1, "mask", "where(clip_norm(max=1) == 2, a, b)"),
]


def assert_positioned_error(src: str, line: int, col: int, msg: str, hint: str | None) -> None:
    """Compiling ``src`` is a GradError at ``line:col`` whose message has ``msg`` and which has a
    hint (with ``hint`` in it, when given)."""
    with pytest.raises(GradError) as info:
        gradpipe.compile(src)
    e = info.value
    assert msg in e.message, str(e)
    assert (e.line, e.column) == (line, col), str(e)
    assert e.hint, str(e)
    if hint is not None:
        assert hint in e.hint, str(e)


@pytest.mark.parametrize("src,line,col,msg,hint", ERRORS, ids=[e[0] for e in ERRORS])
def test_misuse_is_a_positioned_error(src, line, col, msg, hint):
    assert_positioned_error(src, line, col, msg, hint)


def test_did_you_mean_needs_real_similarity():
    """``max`` is a function now: no more ``did you mean 'ema'``; unrelated names get none."""
    from gradpipe.dsl.diagnostics import did_you_mean
    gradpipe.compile("max(grad, 1)")
    assert did_you_mean("max", ["ema", "adam"]) is None
    assert did_you_mean("running_max", ["ema", "max", "adam", "momentum"]) is None
    assert did_you_mean("adma", ["adam", "ema"]) == "did you mean 'adam'?"
    assert did_you_mean("Clip_nrom", ["clip_norm", "clip_value"]) == "did you mean 'clip_norm'?"


@pytest.mark.parametrize("src,step,msg", [
    ("grad * sqrt(2 - step)", 3, "sqrt of a negative number (-1)"),
    ("grad * log(3 - step)", 3, "log of a number that is not positive (0)"),
    ("grad * (7 % (2 - step))", 2, "'%' by zero"),
    ("hparam k = 2\ngrad * (step % (k - step))", 2, "'%' by zero"),
])
def test_scalar_math_fails_at_the_step_where_it_is_undefined(src, step, msg):
    params = _params()
    opt = gradpipe.Optimizer(params, src, lr=LR)
    for t, gs in enumerate(_grads(), start=1):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        if t < step:
            opt.step()
            continue
        with pytest.raises(GradError) as info:
            opt.step()
        assert msg in info.value.message and f"at step {step}" in info.value.message
        assert info.value.line == src.count("\n") + 1 and info.value.hint
        break


def test_param_group_values_are_checked_for_modulo_and_log():
    with pytest.raises(GradError, match="cannot be computed from param group 0"):
        gradpipe.Optimizer(_params(), "hparam k = 2\ngrad * where(step % k == 0, 1, 0)", k=2.5)
    with pytest.raises(GradError, match="cannot be computed from param group 0"):
        gradpipe.Optimizer(_params(), "hparam c = 1\ngrad * log(c)", c=0.0)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_param_group_values_are_checked_for_signal_modulo_and_exp(backend):
    """The divisor of a signal's ``%`` must not be 0 (it would make the parameters NaN), and
    ``exp`` of a hyperparameter must not overflow: both refused per param group, at the call."""
    with pytest.raises(GradError, match="argument 'b' of '%' cannot be computed from param group 0") as info:
        gradpipe.Optimizer(_params(), "hparam k = 1\ngrad % k", backend=backend, k=0)
    assert (info.value.line, info.value.column) == (2, 8)
    with pytest.raises(GradError, match="argument 'x' of 'exp' cannot be computed from param group 0") as info:
        gradpipe.Optimizer(_params(), "hparam k = 4\ngrad * exp(k)", backend=backend, k=1000)
    assert (info.value.line, info.value.column) == (2, 8)


def test_where_guards_the_domain_checks_of_its_scalar_branches():
    """A hyperparameter's domain (sqrt, log, %, exp) is checked only where a ``where`` with a
    scalar condition picks the branch: at the defaults and per param group."""
    for src in ["hparam k = 2\ngrad * where(k > 3, sqrt(k - 3), 0)",
                "hparam k = 0\ngrad * where(k <= 0, 1, log(k))",
                "hparam k = 0.5\ngrad * where(k >= 1, step % k, 0)",
                "hparam k = 1000\ngrad * where(k < 700, exp(k), 0)",
                "hparam k = 2\nhparam f = false\ngrad * where(f, where(k > 1, 1, sqrt(k - 3)), sqrt(k - 3) * 0)"]:
        if "f = false" in src:
            with pytest.raises(GradError, match="sqrt of a negative number"):  # the branch picked
                gradpipe.compile(src)
        else:
            gradpipe.compile(src)
    src = "hparam k = 4\ngrad * where(k > 3, sqrt(k - 3), 0)"
    got = _run(src, k=2)  # the group's k = 2 picks 0: nothing to compute a square root of
    for x, y in zip(got, _reference(lambda g, p, s: 0 * g)):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12)
    got = _run(src, k=7)
    for x, y in zip(got, _reference(lambda g, p, s: 2 * g)):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-12)
    with pytest.raises(GradError, match="argument 'x' of 'sqrt' cannot be computed from param group 0"):
        gradpipe.Optimizer(_params(), "hparam k = 4\ngrad * where(k > 1, sqrt(k - 3), 0)", k=2)
    # a signal branch runs in every step: its checks are not guarded
    with pytest.raises(GradError, match="argument 'x' of 'sqrt' cannot be computed from param group 0"):
        gradpipe.Optimizer(_params(), "hparam k = 4\nwhere(k > 3, grad * sqrt(k - 3), grad)", k=2)


def test_sign_of_a_pipeline_is_the_math_function():
    """``sign(adam)`` as a stage is ``adam | sign``, as ``abs(adam)`` is ``adam | abs``."""
    for x, y in zip(_run("grad | sign(adam)"), _run("grad | adam | sign")):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(_run("grad | abs(adam)"), _run("grad | adam | abs")):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------- formatter
@pytest.mark.parametrize("text,canonical", [
    ("where(step%k==0,a,b)", "where(step % k == 0, a, b)"),
    ("grad|abs|clamp(-1,1)", "grad | abs | clamp(-1, 1)"),
    ("(a<b)==c", "(a < b) == c"),
    ("a<(b<c)", "a < (b < c)"),
    ("(a+b)<c*d%e", "a + b < c * d % e"),
    ("a|(b>0)", "a | b > 0"),
    ("(a|b)>0", "(a | b) > 0"),
    ("a%(b*c)", "a % (b * c)"),
    ("-(a<b)", "-(a < b)"),
    ("f(k=(a!=b))", "f(k=a != b)"),
])
def test_formatter_writes_the_new_syntax(text, canonical):
    assert gradpipe.format_source(text) == canonical + "\n"
    assert gradpipe.format_source(canonical) == canonical + "\n"


def test_a_signal_for_an_op_coefficient_is_refused_with_the_per_element_way():
    """Op coefficients are numbers (one per step for the whole tensor); per-element ones are arithmetic."""
    with pytest.raises(GradError) as e:
        gradpipe.compile("grad | ema(beta=param)")
    assert (e.value.line, e.value.column) == (1, 17)
    assert "must be a number, got a signal" in e.value.message
    assert "where(param > 0, 0.9, 0.99) * grad" in e.value.hint
    gradpipe.compile("where(param > 0, 0.9, 0.99) * grad | adam")  # the way the hint shows compiles
