"""Two-gradient methods: ``grad_at(point)``, SAM and ASAM (issue 13 item 4).

``pipelines/sam_sgd.grad``, ``pipelines/asam_sgd.grad`` and ``pipelines/sam_adamw.grad`` follow
davda54/sam (``sam.py``, the SAM class with ``adaptive=False`` and ``True``, around torch's SGD
and AdamW), transcribed below as :class:`DavdaSAM`, to 1e-9, and pytorch-optimizer 4.1.0's
``SAM`` (to 1e-5: it takes the norm in float32), in float64 over :data:`STEPS` steps of a
small MLP whose gradients depend on the parameters, on both backends (one compiled optimizer
per pipeline). Then what ``step(closure)`` promises around the closure's second call: no closure
is a GradError at the ``grad_at`` call with nothing changed; a closure that raises leaves the
parameters bit for bit as they were; a non-finite gradient at the point skips the step with
nothing written; the state dict round trip is bitwise; the compile-time errors of ``grad_at``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import gradpipe
from gradpipe.tasks.base import run_task
from gradpipe.tasks.digits_task import DigitsTask

STEPS = 30
RTOL, ATOL = 1e-9, 1e-12
#: pytorch-optimizer 4.1.0's SAM sums the squared per-tensor norms in float32
#: (``get_global_gradient_norm``), so in float64 it agrees to about 1e-6 only
PO_RTOL = 1e-5


class DavdaSAM:
    """davda54/sam's ``SAM`` (sam.py at 3c3afdb), transcribed: the param groups are the base
    optimizer's, each with ``rho`` and ``adaptive``. ``first_step``: one norm over every
    parameter with a gradient in every group, of the per-tensor norms of ``g`` (``|w| * g``
    when adaptive); per group ``scale = rho / (norm + 1e-12)``; each such parameter is saved
    and moved by ``e_w = (w ** 2 if adaptive else 1.0) * g * scale``; the gradients are zeroed.
    ``second_step``: each parameter gets its saved value back, then the base optimizer steps.
    ``step(closure)``: ``first_step``, the closure under ``enable_grad``, ``second_step``; the
    caller computed the first gradient before."""

    def __init__(self, groups, base, rho=0.05, adaptive=False, **kwargs):
        self.base = base(groups, **kwargs)
        for g in self.base.param_groups:
            g.setdefault("rho", rho)
            g.setdefault("adaptive", adaptive)
        self.old: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self):
        groups = self.base.param_groups
        norm = torch.norm(torch.stack([((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
                                       for g in groups for p in g["params"] if p.grad is not None]), p=2)
        for g in groups:
            scale = g["rho"] / (norm + 1e-12)
            for p in g["params"]:
                if p.grad is None:
                    continue
                self.old[p] = p.data.clone()
                p.add_((torch.pow(p, 2) if g["adaptive"] else 1.0) * p.grad * scale.to(p))
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p, old in self.old.items():
            p.data = old
        self.base.step()

    def step(self, closure):
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    return x, torch.sin(x[:, :2]) + 0.5 * x[:, 2:]  # a target the model can learn


def _closure(model, opt, t):
    x, y = _batch(t)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def _groups(model, **second):
    """Two param groups (the first layer, the second with its own values of ``second``)."""
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]


#: pipeline, gradpipe's and the references' keyword arguments (lr, base SGD options, rho), the second group's
CASES = {
    "sam_sgd": (dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05), False, dict(lr=0.02, rho=0.1)),
    "asam_sgd": (dict(lr=0.05, momentum=0.9, nesterov=True, rho=0.5), True, dict(rho=1.0)),
    "sam_adamw": (dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, rho=0.05), False, dict(lr=0.003)),
}
#: the base optimizer of each pipeline, for the references
BASE = {"sam_sgd": torch.optim.SGD, "asam_sgd": torch.optim.SGD, "sam_adamw": torch.optim.AdamW}


def _reference(name, kind):
    """Parameters after STEPS steps of davda54's SAM or pytorch-optimizer's (the first gradient
    computed before each step, as both expect)."""
    kw, adaptive, second = CASES[name]
    model = _model()
    sgd = {k: v for k, v in kw.items() if k != "rho"}
    if kind == "davda54":
        opt = DavdaSAM(_groups(model, **second), BASE[name], rho=kw["rho"], adaptive=adaptive, **sgd)
        zero = opt.base.zero_grad
    else:
        pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
        opt = pytorch_optimizer.SAM(_groups(model, **second), BASE[name], rho=kw["rho"], adaptive=adaptive,
                                    **sgd)
        zero = opt.zero_grad
    for t in range(STEPS):
        x, y = _batch(t)

        def closure():
            zero()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        closure()
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _gradpipe(name, backend, steps=STEPS):
    kw, _, second = CASES[name]
    model = _model()
    opt = gradpipe.Optimizer(_groups(model, **second), name, backend=backend, **kw)
    losses = [float(opt.step(_closure(model, opt, t)).detach()) for t in range(steps)]
    return model, opt, losses


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_follows_davda54_and_pytorch_optimizer(name, backend):
    model, opt, losses = _gradpipe(name, backend)
    assert opt.needs_closure and not opt.last_step_skipped
    ours = [p.detach() for p in model.parameters()]
    for kind, rtol in (("davda54", RTOL), ("pytorch_optimizer", PO_RTOL)):
        for a, b in zip(ours, _reference(name, kind)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=ATOL, msg=lambda m: f"{name} ({backend}) vs {kind}: {m}")
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert opt.state[model[0].weight]["step"].item() == STEPS


def test_step_returns_the_loss_at_the_parameters_and_keeps_their_gradient():
    model = _model()
    opt = gradpipe.Optimizer(model.parameters(), "sam_sgd", lr=0.1, backend="eager")
    inner = _closure(model, opt, 0)
    expected = inner().detach()
    grads = [p.grad.clone() for p in model.parameters()]
    seen = []

    def closure():
        seen.append(opt.at_point)
        return inner()
    loss = opt.step(closure)
    assert seen == [False, True] and opt.at_point is False
    assert torch.equal(loss.detach(), expected)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)  # the gradient at the parameters, not at the point


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def _assert_unchanged(model, opt, snap):
    params, grads, sd = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        assert all(torch.equal(now["state"][k][n], v) for n, v in st.items())
    assert now["gradpipe"]["nonfinite"] == sd["gradpipe"]["nonfinite"]


def test_no_closure_is_an_error_at_the_grad_at_line_and_changes_nothing():
    model = _model()
    opt = gradpipe.Optimizer(model.parameters(), "sam_sgd", lr=0.1, backend="eager")
    opt.step(_closure(model, opt, 0))
    _closure(model, opt, 1)()  # gradients there, as a loop that forgot the closure would have
    snap = _snapshot(model, opt)
    with pytest.raises(gradpipe.GradError) as e:
        opt.step()
    text = str(e.value)
    assert "sam_sgd.grad:" in text and "grad_at(param + e)" in text and "step() needs a closure" in text
    assert e.value.line == next(i for i, line in enumerate(opt.program.source.splitlines(), 1)
                                if line.startswith("grad_at"))
    _assert_unchanged(model, opt, snap)


def test_closure_raising_at_the_point_restores_the_parameters_bitwise():
    model = _model()
    opt = gradpipe.Optimizer(model.parameters(), "asam_sgd", lr=0.1, backend="eager")
    opt.step(_closure(model, opt, 0))
    calls = []
    inner = _closure(model, opt, 1)

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory at the point")
        return inner()
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="out of memory at the point"):
        opt.step(closure)
    inner()  # what the step's first call left: the gradient at the parameters
    _assert_unchanged(model, opt, _snapshot(model, opt)[:2] + (snap[2],))
    for p, q in zip(model.parameters(), snap[0]):
        assert torch.equal(p, q)


def test_a_closure_that_does_not_backpropagate_is_an_error():
    model = _model()
    opt = gradpipe.Optimizer(model.parameters(), "sam_sgd", lr=0.1, backend="eager")
    closure = _closure(model, opt, 0)
    loss = closure()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="left no gradient"):
        opt.step(lambda: loss)
    _assert_unchanged(model, opt, snap)


def test_losses_and_samples_are_refused():
    model = _model()
    opt = gradpipe.Optimizer(model.parameters(), "sam_sgd", lr=0.1, backend="eager")
    with pytest.raises(ValueError, match=r"opt.step\(closure\) only"):
        opt.step(_closure(model, opt, 0), losses={"main": model(_batch(0)[0]).sum()})


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_nonfinite_gradient_at_the_point_skips_the_step(backend):
    model, opt, _ = _gradpipe("sam_sgd", backend, steps=1)  # as above: the same compiled functions
    calls = []
    x, y = _batch(1)

    def poisoned():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if len(calls) % 2 == 0:  # the second call, at the point
            loss = loss * math.nan
        loss.backward()
        return loss
    _closure(model, opt, 1)()
    snap = _snapshot(model, opt)
    opt.step(poisoned)
    assert (opt.nonfinite_steps, opt.consecutive_nonfinite, opt.last_step_skipped) == (1, 1, True)
    params, grads, sd = snap
    sd["gradpipe"]["nonfinite"] = opt.state_dict()["gradpipe"]["nonfinite"]
    _assert_unchanged(model, opt, (params, grads, sd))
    assert opt.state[model[0].weight]["step"].item() == 1
    opt.step(_closure(model, opt, 1))  # the next finite step goes on
    assert (opt.nonfinite_steps, opt.consecutive_nonfinite, opt.last_step_skipped) == (1, 0, False)
    assert opt.state[model[0].weight]["step"].item() == 2


def test_nonfinite_gradient_at_the_point_past_the_limit_raises():
    src = gradpipe.load("sam_sgd").source.replace("grad_at(param + e) |", "grad_at(param + e) | skip_nonfinite(0) |")
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), src, lr=0.1, backend="eager")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.inf if len(calls) == 2 else 1.0)
        loss.backward()
        return loss
    with pytest.raises(gradpipe.NonFiniteError) as e:
        opt.step(closure)
    assert "0.weight (grad_at)" in e.value.params
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_state_dict_round_trip_is_bitwise():
    model, opt, _ = _gradpipe("asam_sgd", "eager", steps=5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    kw, _, second = CASES["asam_sgd"]
    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = gradpipe.Optimizer(_groups(model2, **second), "asam_sgd", backend="eager", **kw)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(5, 10):
        opt.step(_closure(model, opt, t))
        opt2.step(_closure(model2, opt2, t))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt2.state[q].keys()
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])


def test_only_the_routes_that_read_grad_at_move_to_the_point():
    """Matrices take SAM's step (the norm over the matrices only), vectors plain momentum on the
    gradient at the parameters: the same as two optimizers, SAM over the matrices and momentum."""
    src = """
hparam rho = 0.05 in [0, inf)
route ndim >= 2: grad_at(param + grad * (rho / (norm(grad, over=global) + 1e-12))) | momentum(0.9)
route default: grad | momentum(0.9)
"""
    model = _model()
    opt = gradpipe.Optimizer(model.named_parameters(), src, lr=0.05, backend="eager")
    ref_model = _model()
    weights = [p for n, p in ref_model.named_parameters() if p.ndim >= 2]
    biases = [p for n, p in ref_model.named_parameters() if p.ndim < 2]
    sam = DavdaSAM(weights, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD(biases, lr=0.05, momentum=0.9)
    for t in range(10):
        opt.step(_closure(model, opt, t))
        x, y = _batch(t)

        def closure():
            for p in ref_model.parameters():
                p.grad = None
            loss = torch.nn.functional.mse_loss(ref_model(x), y)
            loss.backward()
            return loss
        closure()
        bias_grads = [p.grad.clone() for p in biases]
        sam.step(closure)
        for p, g in zip(biases, bias_grads):
            p.grad = g
        sgd.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_a_grad_at_route_without_gradients_takes_no_second_pass():
    """The closure reaches only the last layer: the grad_at route has nothing to step, and the
    step calls the closure once."""
    model = _model()
    src = 'route "0.*": grad_at(param + 0.01 * grad) | sign\nroute default: grad | sign'
    opt = gradpipe.Optimizer(model.named_parameters(), src, lr=0.1, backend="eager")
    h = torch.tanh(model[0](_batch(0)[0])).detach()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model[2](h).pow(2).mean()
        loss.backward()
        return loss
    first = model[0].weight.detach().clone()
    opt.step(closure)
    assert len(calls) == 1 and torch.equal(model[0].weight, first)
    assert opt.state[model[2].weight]["step"].item() == 1


def test_run_task_passes_a_closure():
    result = run_task(DigitsTask(), lambda m: gradpipe.Optimizer(m.named_parameters(), "sam_sgd", lr=0.05,
                                                                  backend="eager"), steps=20, seed=0)
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("source,message", [
    ("grad_at(grad | ema) | adam", "the point of 'grad_at' is computed from values without state, but 'ema' keeps state"),
    ("state c = 0 then c + grad\ngrad_at(param + c) | adam", "but a state cell keeps state"),
    ("grad_at(param + grad) + grad_at(param - grad)", "a route takes the gradient at one point only"),
    ("grad_at(1) | adam", "'grad_at' needs a point, a signal of the parameter's shape, but this is a number"),
    ("grad_at(param, 2)", "'grad_at' takes one argument, the point"),
    ("grad_at(param, rho=2)", "'grad_at' takes one argument, the point"),
    ("grad_at(adam)", "'grad_at' needs a point, a signal of the parameter's shape, but this is an op"),
    ("grad_at(param > 0)", "'grad_at' needs numbers, but this is a mask"),
    ("grad | galore(rank=2) { grad_at | adam }", "the { ... } pipeline of 'galore' reads 'grad_at', which lives outside it"),
    ("grad_at(param + grads.aux) | adam", "the point of 'grad_at' cannot read 'grads.aux'"),
])
def test_errors(source, message):
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.compile(source)
    assert message in str(e.value)


def test_stage_form_and_a_shared_name():
    """``x | grad_at`` is ``grad_at(x)``; a let of it read twice is one gradient."""
    a = gradpipe.compile("grad_at(param + 0.1 * grad) | sign")
    b = gradpipe.compile("param + 0.1 * grad | grad_at | sign")
    assert [n.op for n in a.ir["main"].point_nodes] == [n.op for n in b.ir["main"].point_nodes]
    c = gradpipe.compile("let g = grad_at(param + 0.1 * grad)\ng + 0.5 * sign(g)")
    assert c.ir["main"].grad_at == "main/grad_at" and "grad_at" in c.reads


def test_compiled_backend_fuses_the_point():
    """SAM's point (a global norm and elementwise math) is one fused segment of its own, run before
    the closure's second call; explain says so."""
    from gradpipe.compiler.lowering import plan_route
    prog = gradpipe.load("sam_sgd")
    plan = plan_route(prog, label="main", ir=prog.ir["main"].point_ir())
    assert [kind for kind, _ in plan] == ["segment"] and plan[0][1].outputs == [prog.ir["main"].point]
    assert "main: first, the point of grad_at: 1 fused segment; then the closure's second call" in prog.explain()
    assert "main/grad_at" in [n.name for n in prog.ir["main"].nodes]
    assert not {n.name for n in prog.ir["main"].point_nodes} & {n.name for n in prog.ir["main"].nodes if
                                                                 n.kind is not gradpipe.compiler.ir.Kind.SOURCE}


def test_complex_parameters_move_as_their_real_views():
    """A complex parameter is stepped as its real and imaginary parts: the same as a real parameter
    holding them (torch's complex gradient of a real loss is the gradient of its real view)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex128, generator=gen))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    w = torch.randn(3, 2, dtype=torch.float64, generator=gen)
    oz = gradpipe.Optimizer([z], "sam_sgd", lr=0.1, backend="eager")
    orr = gradpipe.Optimizer([r], "sam_sgd", lr=0.1, backend="eager")

    def closure_of(opt, loss_fn):
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        return closure
    for _ in range(5):
        oz.step(closure_of(oz, lambda: ((z.real ** 2 + z.imag ** 2) * w).sum() + (z.real ** 3).sum()))
        orr.step(closure_of(orr, lambda: ((r[..., 0] ** 2 + r[..., 1] ** 2) * w).sum() + (r[..., 0] ** 3).sum()))
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)
