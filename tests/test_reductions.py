"""Reductions as values (``sum mean norm rms max min dot`` with ``over=``) and shape values
(``numel rows cols ndim``), language.md 5.13.

Every reduction in every scope is checked against torch in float64 on both backends, with
parameters in two param groups (so ``global`` spans groups, and the compiled backend's
buckets); then broadcasting in arithmetic, the shape values, the stage form, the names they
share with older forms, two pipelines a user would recognise (gradient centralisation and
torch's Adafactor), the compiled plan, ``explain``, the formatter, and every misuse as a
positioned GradError with a hint.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.compiler.ir import Kind
from gradpipe.compiler.lowering import plan_route, route_cost
from gradpipe.dsl.formatter import format_source
from test_math import assert_positioned_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKENDS = ["eager", "compiled"]
STEPS = 3
#: matrices (one of 3 dims: rows/cols keep the leading dim), and a vector and a 0-d tensor for the scopes
#: that take them
MATRICES = [(3, 4), (2, 3, 5), (4, 2)]
ALL = MATRICES + [(6,), ()]
LRS = (0.1, 0.05)  # two param groups: the first two tensors, the rest

Ref = Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


def _data(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    return params, grads


def _run(src: str, backend: str, shapes=ALL, groups: bool = True, **hp) -> list[torch.Tensor]:
    init, grads = _data(shapes)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    spec = ([{"params": params[:2], "lr": LRS[0]}, {"params": params[2:], "lr": LRS[1]}] if groups
            else [{"params": params, "lr": LRS[0]}])
    opt = gradpipe.Optimizer(spec, src, backend=backend, **hp)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _reference(ref: Ref, shapes=ALL, groups: bool = True) -> list[torch.Tensor]:
    """The parameters after STEPS steps of p <- p - lr * u, u = ref(grads, params), per tensor."""
    ps, grads = _data(shapes)
    lrs = [LRS[0] if (i < 2 or not groups) else LRS[1] for i in range(len(ps))]
    for gs in grads:
        us = ref(gs, ps)
        ps = [p - lr * torch.broadcast_to(u, p.shape) for p, u, lr in zip(ps, us, lrs)]
    return ps


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- each reduction x scope
def _torch_reduce(fn: str, x: torch.Tensor, y: torch.Tensor | None, dim) -> torch.Tensor:
    kw = dict(dim=dim, keepdim=True)
    return {"sum": lambda: x.sum(**kw), "mean": lambda: x.mean(**kw),
            "norm": lambda: torch.linalg.vector_norm(x, 2, **kw), "rms": lambda: (x * x).mean(**kw).sqrt(),
            "max": lambda: x.amax(**kw), "min": lambda: x.amin(**kw), "dot": lambda: (x * y).sum(**kw)}[fn]()


def _scope_ref(fn: str, scope: str) -> Ref:
    """u = grad - 0.5 * fn(grad[, param], over=scope), the reduction computed by torch."""
    def ref(gs, ps):
        if scope == "global":  # one flat vector of every tensor of the route, across groups
            flat_g = torch.cat([g.reshape(-1) for g in gs])
            flat_p = torch.cat([p.reshape(-1) for p in ps])
            r = _torch_reduce(fn, flat_g, flat_p, 0).reshape(())
            return [g - 0.5 * r for g in gs]
        out = []
        for g, p in zip(gs, ps):
            dim = tuple(range(g.dim())) if scope == "tensor" else (-1 if scope == "rows" else -2)
            out.append(g - 0.5 * _torch_reduce(fn, g, p, dim))
        return out
    return ref


REDUCTIONS = ["sum", "mean", "norm", "rms", "max", "min", "dot"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global", "rows", "cols"])
@pytest.mark.parametrize("fn", REDUCTIONS)
def test_each_reduction_in_each_scope_matches_torch(fn, scope, backend):
    shapes = MATRICES if scope in ("rows", "cols") else ALL
    operands = "grad, param" if fn == "dot" else "grad"
    src = f"grad - 0.5 * {fn}({operands}, over={scope})"
    _close(_run(src, backend, shapes), _reference(_scope_ref(fn, scope), shapes))


def test_rows_and_cols_follow_adafactor_shapes():
    """``rows`` reduces the last dim to (..., R, 1), ``cols`` dim -2 to (..., 1, C), as the row_var and
    col_var of torch.optim.Adafactor; leading dims are kept."""
    from gradpipe.compiler.ir import Node  # noqa: F401 - the interpreter is what runs the node
    from gradpipe.runtime.interpret import reduce as run_reduce
    prog = gradpipe.compile("grad / (rms(grad, over=rows) + rms(grad, over=cols))")
    nodes = {n.const.get("over"): n for n in prog.nodes() if n.kind is Kind.ARITH and n.op == "rms"}
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    (row,) = run_reduce(nodes["rows"], {"main/grad": [x]}, [None])
    (col,) = run_reduce(nodes["cols"], {"main/grad": [x]}, [None])
    assert row.shape == (2, 3, 1) and col.shape == (2, 1, 5)
    torch.testing.assert_close(row ** 2, torch.norm(x, dim=-1, keepdim=True).square() / x.size(-1))
    torch.testing.assert_close(col ** 2, torch.norm(x, dim=-2, keepdim=True).square() / x.size(-2))


# --------------------------------------------------------------------------- broadcasting, shape values, stages
CASES: list[tuple[str, Ref, list]] = [
    # centring each tensor, and a mixed expression of the three scopes with scalars
    ("grad - mean(grad, over=tensor)", lambda gs, ps: [g - g.mean() for g in gs], ALL),
    ("(grad - mean(grad, over=rows)) / (rms(grad, over=cols) + 1e-8) * norm(grad, over=global) / 2",
     lambda gs, ps: [(g - g.mean(-1, keepdim=True)) / ((g * g).mean(-2, keepdim=True).sqrt() + 1e-8)
                     * torch.linalg.vector_norm(torch.cat([h.reshape(-1) for h in gs])) / 2 for g in gs], MATRICES),
    # a reduction of a per-tensor value counts it once per element it stands for
    ("grad * mean(mean(grad, over=rows), over=tensor) + sum(numel, over=global) * 0.001",
     lambda gs, ps: [g * g.mean() + 0.001 * sum(h.numel() ** 2 for h in gs) for g in gs], MATRICES),
    # shape values
    ("grad / numel + ndim", lambda gs, ps: [g / g.numel() + g.dim() for g in gs], ALL),
    ("grad * sqrt(max(1, rows / cols))",
     lambda gs, ps: [g * math.sqrt(max(1, g.shape[-2] / g.shape[-1])) for g in gs], MATRICES),
    # the stage form
    ("grad | mean(over=tensor)", lambda gs, ps: [g.mean() for g in gs], ALL),
    ("grad | rms(over=rows) | ema(0.5)", None, MATRICES),  # checked for eager == compiled only
    ("grad | abs | max(over=global)", lambda gs, ps: [max(h.abs().max() for h in gs)] * len(gs), ALL),
    ("grad * 2 | sum(over=cols) | normalize",
     lambda gs, ps: [(2 * g).sum(-2, keepdim=True).expand(g.shape) / (
         torch.linalg.vector_norm((2 * g).sum(-2, keepdim=True).expand(g.shape)) + 1e-8) for g in gs], MATRICES),
    # a per-tensor value feeding an op is expanded first: its state has the parameter's shape
    ("grad - mean(grad, over=tensor) * 0 + numel | adam", None, ALL),
    ("where(mean(grad, over=tensor) > 0, grad, -grad)",
     lambda gs, ps: [g if g.mean() > 0 else -g for g in gs], ALL),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,ref,shapes", CASES, ids=[c[0] for c in CASES])
def test_values_broadcast_and_match(src, ref, shapes, backend):
    got = _run(src, backend, shapes)
    if ref is not None:
        _close(got, _reference(ref, shapes))
    if backend == "compiled":
        _close(got, _run(src, "eager", shapes))


def test_stage_form_is_the_call():
    a = gradpipe.compile("grad | mean(over=tensor) | adam")
    b = gradpipe.compile("mean(grad, over=tensor) | adam")
    assert a.explain().split("\n", 1)[1] == b.explain().split("\n", 1)[1]


def test_names_shared_with_older_forms():
    """``max(a, b)`` stays elementwise, ``rms`` without ``over=`` stays the op."""
    def ops(src):
        return sorted((n.kind.value, n.op) for n in gradpipe.compile(src).nodes() if n.kind in (Kind.ARITH, Kind.OP))
    assert ops("max(grad, 0) + min(grad, param)") == [("arith", "+"), ("arith", "max"), ("arith", "min")]
    assert ("arith", "amax") in ops("grad - max(grad, over=tensor)")
    assert ops("grad | rms(0.99, 1e-8)") == [("op", "rms")]
    assert ops("grad | rms") == [("op", "rms")]
    assert ("arith", "rms") in ops("grad / rms(grad, over=tensor)")
    assert ("arith", "rms") in ops("grad | rms(over=tensor)")
    # numel and ndim stay route-selector words, and are values in the same file
    prog = gradpipe.compile("route ndim >= 2 and numel > 4: grad / numel\nroute default: grad * ndim")
    assert [r.label for r in prog.routes] == ["ndim>=2andnumel>4", "default"]
    # a let or def of the same name shadows them, as math functions
    assert ops("let numel = 2\ngrad * numel") == [("arith", "*")]
    assert ops("let mean = abs\ngrad | mean") == [("arith", "abs")]
    assert ops("def dot(a, b) = a * b\ndot(grad, param)") == [("arith", "*")]


def test_gradient_centralization_matches_the_centralize_op():
    """centralize subtracts the mean over every dim but the first: for a matrix, the mean of each row
    (``over=rows``); vectors pass. (``grad - mean(grad, over=tensor)`` is another thing: each tensor's
    mean, vectors too; checked above.)"""
    shapes = [(3, 4), (4, 2), (5,)]
    written = "route ndim == 2: grad - mean(grad, over=rows) | adam\nroute default: grad | adam"
    for backend in BACKENDS:
        _close(_run(written, backend, shapes), _run("grad | centralize | adam", backend, shapes))


ADAFACTOR = """
# torch.optim.Adafactor (weight_decay=0), with its factored second moment for matrices
hparam eps1 = 2.220446049250313e-16
hparam eps2 = 1e-3
let b2 = 1 - step ** -0.8
let row = rms(grad, over=rows) ** 2 | ema(b2)
let col = rms(grad, over=cols) ** 2 | ema(b2)
def scaled(v) = grad / sqrt(max(v, eps1 ** 2))
def adafactor(v) = scaled(v) / max(1, rms(scaled(v), over=tensor)) * max(eps2, rms(param, over=tensor)) * (min(lr, 1 / sqrt(step)) / lr)
route ndim >= 2: adafactor(row * col / max(mean(row, over=cols), eps1))
route default: adafactor(grad * grad | ema(b2))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_adafactor_factored_moment_matches_torch(backend):
    shapes = [(4, 5), (2, 3, 4), (7,)]
    init, grads = _data(shapes)
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    opt = gradpipe.Optimizer(ours, ADAFACTOR, backend=backend, lr=0.01)
    ref = torch.optim.Adafactor(theirs, lr=0.01)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    _close([p.detach() for p in ours], [q.detach() for q in theirs])


# --------------------------------------------------------------------------- compiled plan, explain
def test_compiled_plan_fuses_global_reductions_and_runs_per_tensor_values_between():
    prog = gradpipe.compile("grad / (norm(grad, over=global) + 1e-8) - mean(grad, over=tensor) * numel")
    plan = plan_route(prog, label="main")
    eager = [item for kind, item in plan if kind == "eager"]
    assert sorted(n.rsplit("/", 1)[1] for n in eager) == ["mean", "mul", "numel"]  # mean * numel: per tensor
    segments = [item for kind, item in plan if kind == "segment"]
    assert any("main/norm" in s.nodes for s in segments)
    assert route_cost(prog, "main").kernels == len(plan) + 1  # one more pass for the global norm


def test_sharded_plan_runs_every_reduction_on_the_dtensors():
    """Over each rank's shards (FSDP2) a fused global reduction would miss the other ranks'
    shards: the plan for DTensor parameters keeps reductions, written or inside an op, out of
    the segments, and fuses the rest as before."""
    prog = gradpipe.compile("grad / (norm(grad, over=global) + 1e-8) | clip_norm(1.0) | adam")
    plain = plan_route(prog, label="main")
    # unsharded, all fused: clip_norm reads its input again after its norm, so it starts a
    # second segment (the value crosses in a reused buffer, lowering._kept_across)
    assert [kind for kind, _ in plain] == ["segment", "segment"]
    sharded = plan_route(prog, label="main", sharded=True)
    eager = [item.rsplit("/", 1)[1] for kind, item in sharded if kind == "eager"]
    assert eager == ["norm", "clip_norm"]
    fused = [n for kind, item in sharded if kind == "segment" for n in item.nodes]
    assert any(n.endswith("/adam") for n in fused) and not any(n.endswith(("/norm", "/clip_norm")) for n in fused)


def test_explain_reads_reductions_as_written():
    text = gradpipe.compile("grad - max(grad, over=tensor) + dot(grad, param, over=global) * rows").explain()
    assert "max(main/grad, over=tensor)" in text
    assert "dot(main/grad, main/param, over=global)" in text
    assert any(line.split() == ["main/rows", "rows"] for line in text.splitlines())
    assert "reduces over every tensor of its route" in text and "reduces within each tensor" in text


@pytest.mark.parametrize("text,canonical", [
    ("grad-mean( grad ,over = tensor )", "grad - mean(grad, over=tensor)\n"),
    ("grad|rms(over=rows)|ema", "grad | rms(over=rows) | ema\n"),
    ("grad*sqrt(max(1,rows/cols))/numel", "grad * sqrt(max(1, rows / cols)) / numel\n"),
    ("dot(grad,param,over=global)*grad", "dot(grad, param, over=global) * grad\n"),
])
def test_formatter_writes_the_new_syntax(text, canonical):
    assert format_source(text) == canonical
    assert format_source(canonical) == canonical
    assert gradpipe.compile(text).hash == gradpipe.compile(canonical).hash


def test_diff_sees_a_changed_scope():
    from gradpipe.compiler.diff import diff_programs
    d = diff_programs(gradpipe.compile("grad - mean(grad, over=tensor)"),
                      gradpipe.compile("grad - mean(grad, over=global)"))
    assert not d.is_empty
    assert "over" in d.to_text()


# --------------------------------------------------------------------------- misuse
ERRORS = [
    ("grad - mean(grad)", 1, 8, "'mean' needs a scope", "mean(grad, over=tensor)"),
    ("grad | mean", 1, 8, "'mean' needs a scope", "mean(x, over=tensor)"),
    ("grad | max(over=batch)", 1, 17, "unknown scope 'batch'", "over= is one of tensor"),
    ("grad - mean(grad, over=tensr)", 1, 24, "unknown scope 'tensr'", "tensor"),
    ("grad - sum(grad, over=grad)", 1, 23, "unknown scope 'grad'", "over= is one of"),
    ("grad - sum(grad > 0, over=tensor)", 1, 12, "'sum' needs numbers, but this is a mask",
     "sum(where(grad > 0, 1, 0), over=tensor)"),
    ("grad * dot(grad, over=tensor)", 1, 8, "'dot' takes 2 operands, got 1", "dot(a, b, over=tensor)"),
    ("grad * mean(3, over=tensor)", 1, 13, "'mean' has nothing to reduce: this is a number", "reduce a signal"),
    ("grad * norm(lr * 2, over=global)", 1, 13, "nothing to reduce", "norm(grad, over=global)"),
    ("grad * sum(true, over=tensor)", 1, 12, "nothing to reduce: this is a boolean", "reduce a signal"),
    ("where(mean(grad, over=tensor), grad, 0)", 1, 7, "a number per tensor",
     "where(mean(grad, over=tensor) > 0, a, b)"),
    ("where(numel, grad, 0)", 1, 7, "a number per tensor", "where(numel > 0, a, b)"),
    ("grad - mean(grad, over=tensor, eps=1)", 1, 32, "'mean' takes no argument 'eps'", "mean(x, over=tensor)"),
    ("grad - mean(grad, param, over=tensor)", 1, 8, "'mean' takes 1 operand, got 2", "mean(x, over=tensor)"),
    ("grad * numel(grad)", 1, 8, "'numel' is a shape value, not an op", "grad / numel"),
    ("grad * numl", 1, 8, "unknown name 'numl'", "numel"),
    ("grad * mean(grad, over=tensor) { adam }", 1, 34, "takes no { ... } block", None),
    ("grad | galore(rank=1) { mean(over=tensor) }", 1, 25, "the reduction 'mean' cannot be used in the { ... }",
     "outside the block"),
    ("grad | galore(rank=1) { adam | scale(numel) }", 1, 38, "the shape value 'numel' cannot be used", None),
]


@pytest.mark.parametrize("src,line,col,msg,hint", ERRORS, ids=[e[0] for e in ERRORS])
def test_misuse_is_a_positioned_error(src, line, col, msg, hint):
    assert_positioned_error(src, line, col, msg, hint)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,col,what", [
    ("grad / (rms(grad, over=rows) + 1e-8)", 9, "a reduction over rows"),
    ("grad - mean(grad, over=cols)", 8, "a reduction over cols"),
    ("grad * sqrt(rows)", 13, "'rows'"),
    ("grad * cols", 8, "'cols'"),
])
def test_rows_and_cols_of_a_vector_fail_at_the_first_step(src, col, what, backend):
    with pytest.raises(GradError) as info:
        _run(src, backend, [(3, 4), (5,)], groups=False)
    e = info.value
    assert f"{what} needs a parameter of 2 or more dimensions" in e.message, str(e)
    assert "shape (5,)" in e.message
    assert (e.line, e.column) == (1, col), str(e)
    assert "route ndim >= 2" in e.hint
