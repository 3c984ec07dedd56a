"""Muon and the matrix functions (issue 13 items 1 and 2).

``pipelines/muon.grad`` against ``torch.optim.Muon`` (torch 2.13) in float64 over 50 steps,
every option, on both backends; ``pipelines/muon_adamw.grad`` against torch's Muon on the
hidden matrices plus AdamW on the rest; ``matmul``/``transpose`` values, matrix-shaped state
cells and their checkpoints; ``newton_schulz`` batching; and the errors of matrix functions
used where shapes do not fit (when the pipeline compiles where the selector proves it, when
the optimizer is built otherwise).
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.compiler.ops.newton_schulz import newton_schulz
from matrix_parity import grads, replay_from_checkpoint, run, start, worst

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

#: wide, tall, square, and three of one shape (one batched Newton-Schulz call)
SHAPES = ((6, 9), (9, 6), (7, 7), (5, 8), (5, 8), (5, 8))

#: torch.optim.Muon's options, alone and combined
ROWS = [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False),
    dict(lr=0.02, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, adjust_lr_fn="original", weight_decay=0.0),
    dict(lr=0.01, momentum=0.9, weight_decay=0.05, eps=1e-3),
    dict(lr=0.02, ns_steps=2, ns_coefficients=(2.0, -1.5, 0.5)),
    dict(lr=0.02, ns_steps=0, nesterov=False, momentum=0.5),
]
COMPILED = (0, 2)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(x) for x in start(SHAPES, seed)]


def _follow(kwargs: dict, backend: str, steps: int = 50) -> float:
    ours, theirs = _params(), _params()
    gs = grads(SHAPES, steps)
    run(ours, gradpipe.Optimizer(ours, "muon", backend=backend, **kwargs), gs)
    run(theirs, torch.optim.Muon(theirs, **kwargs), gs)
    return worst(ours, theirs)


_CASES = [pytest.param(r, "eager", id=f"{i}-eager") for i, r in enumerate(ROWS)]
_CASES += [pytest.param(ROWS[i], "compiled", id=f"{i}-compiled") for i in COMPILED]


@pytest.mark.parametrize("kwargs,backend", _CASES)
def test_muon_follows_torch_optim_muon(kwargs: dict, backend: str) -> None:
    assert _follow(kwargs, backend) < 1e-9


def test_muon_refuses_an_adjust_lr_fn_torch_does_not_know() -> None:
    with pytest.raises(ValueError, match="Adjust learning rate function 'cosine' is not supported"):
        gradpipe.Optimizer(_params(), "muon", adjust_lr_fn="cosine")


def test_muon_refuses_vectors_when_built_as_torch_does() -> None:
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(GradError, match="match no route"):
        gradpipe.Optimizer(params, "muon")


class _LM(torch.nn.Module):
    """An embedding, two hidden matrices with biases, a norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return self.head(self.norm(h))


def _hidden(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and not any(k in name for k in ("embed", "head"))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_muon_adamw_is_muon_on_hidden_matrices_and_adamw_on_the_rest(backend: str) -> None:
    ours = _LM().double()
    theirs = copy.deepcopy(ours)
    lr, wd = 3e-3, 0.05
    opt = gradpipe.Optimizer(ours.named_parameters(), "muon_adamw", lr=lr, weight_decay=wd, backend=backend)
    muon = torch.optim.Muon([p for n, p in theirs.named_parameters() if _hidden(n, p)], lr=lr, weight_decay=wd,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for n, p in theirs.named_parameters() if not _hidden(n, p)], lr=lr,
                              weight_decay=wd, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        x = torch.randint(0, 11, (4, 6), generator=gen)
        for model, opts in ((ours, (opt,)), (theirs, (muon, adamw))):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            for o in opts:
                o.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert float(((a.detach() - b.detach()).abs() / b.detach().abs().clamp_min(1e-3)).max()) < 1e-9, name


def test_newton_schulz_batches_matrices_of_one_shape_with_the_same_math() -> None:
    """A batch is the same iteration as one matrix at a time, up to the rounding of its dtype
    (``baddbmm`` and ``addmm`` round now and then differently: why muon.grad says batch=none)."""
    gen = torch.Generator().manual_seed(3)
    gs = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-5)):
        batched = newton_schulz(gs, 5, 3.4445, -4.775, 2.0315, 1e-7, dtype)
        one_by_one = torch.stack([newton_schulz(g, 5, 3.4445, -4.775, 2.0315, 1e-7, dtype) for g in gs])
        torch.testing.assert_close(batched.double(), one_by_one.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("batch,calls", [("shape", [(3, 5, 8), (6, 9), (9, 6)]),
                                         ("none", [(5, 8)] * 3 + [(6, 9), (9, 6)])])
def test_newton_schulz_stacks_matrices_of_one_shape_unless_told_not_to(batch: str, calls: list, monkeypatch) -> None:
    import gradpipe.compiler.ops.newton_schulz as ns
    seen = []
    real = ns.newton_schulz
    monkeypatch.setattr(ns, "newton_schulz", lambda g, *a: seen.append(tuple(g.shape)) or real(g, *a))
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((5, 8), (6, 9), (5, 8), (9, 6), (5, 8))]
    opt = gradpipe.Optimizer(params, gradpipe.compile(f"newton_schulz(grad, batch={batch})"), backend="eager")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert sorted(seen) == sorted(calls)


def test_newton_schulz_orthogonalises() -> None:
    """In float32 with enough steps every singular value lands near 1 (Muon's coefficients
    aim at [0.7, 1.2]), and the singular vectors are G's."""
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    o = newton_schulz(g, 10, 3.4445, -4.775, 2.0315, 1e-7, torch.float32).double()
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.3
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(u.T @ o @ vh.T, torch.diag(torch.diagonal(u.T @ o @ vh.T)), atol=0.05, rtol=0)


def _one_step(source: str, params: list[torch.Tensor], grads: list[torch.Tensor], backend: str = "eager"
              ) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = gradpipe.Optimizer(ps, gradpipe.compile(source), lr=1.0, backend=backend)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    return [p0 - p.detach() for p0, p in zip(params, ps)]  # the update u (lr = 1)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_matmul_and_transpose_act_on_each_matrix_view(backend: str) -> None:
    """G Gᵀ G / numel on a matrix and on a conv kernel (viewed as (out, in*kh*kw)), plus an
    elementwise term: the matrix value combines with the parameter's other values."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, 6, generator=gen, dtype=torch.float64),
              torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    u = _one_step("matmul(matmul(grad, transpose(grad)), grad) / numel + 0.5 * grad", params, grads, backend)
    for p, g, got in zip(params, grads, u):
        m = g.reshape(g.shape[0], -1)
        want = ((m @ m.T @ m) / g.numel()).reshape(g.shape) + 0.5 * g
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


SHAMPOO_LIKE = """
# a left preconditioner statistic L = sum of G Gᵀ, a matrix-shaped state cell (m×m)
state stat = 0 * matmul(grad, transpose(grad)) then stat + matmul(grad, transpose(grad))
route ndim >= 2: matmul(stat, grad) / (1 + norm(stat, over=tensor))
route default: grad
"""


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_a_matrix_cell_keeps_its_shape_and_resumes_bitwise(backend: str) -> None:
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 3), (5, 3), (4,)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    steps = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(6)]
    prog = gradpipe.compile(SHAMPOO_LIKE)

    ps = [torch.nn.Parameter(p.clone()) for p in start]
    opt = gradpipe.Optimizer(ps, prog, lr=0.1, backend=backend)
    run(ps, opt, steps[:3])
    cells = [v for st in opt.state.values() for k, v in st.items() if k.endswith(".value")]
    assert sorted(tuple(c.shape) for c in cells) == [(5, 5), (5, 5)]
    again = replay_from_checkpoint(lambda ps2: gradpipe.Optimizer(ps2, prog, lr=0.1, backend=backend), ps, opt,
                                   steps[3:])
    assert all(torch.equal(a, b) for a, b in zip(ps, again))
    # and the cell is the sum of G Gᵀ over the six steps
    want = sum(g[0] @ g[0].T for g in steps)
    got = next(v for p, st in opt.state.items() if p is ps[0] for k, v in st.items() if k.endswith(".value"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("source,match", [
    ("route ndim == 1: newton_schulz(grad)\nroute default: grad", "needs parameters of 2 or more dimensions"),
    ('route ndim < 2 and "*.bias": matmul(grad, transpose(grad))\nroute default: grad',
     "needs parameters of 2 or more dimensions"),
    ("route not ndim >= 2: transpose(grad) | sign\nroute default: grad", "needs parameters of 2 or more"),
    ("matmul(grad, 2)", "'matmul' needs matrices"),
    ("sum(matmul(grad, transpose(grad)), over=global) * grad", "over=global of a matrix value"),
    ("grad | galore(rank=2) { transpose | sign }", "cannot be used in the"),
])
def test_matrix_misuse_is_refused_when_the_pipeline_compiles(source: str, match: str) -> None:
    with pytest.raises(GradError, match=match) as err:
        gradpipe.compile(source)
    assert err.value.span.line >= 1


@pytest.mark.parametrize("source,match", [
    ("newton_schulz(grad)", r"needs a parameter of 2 or more dimensions.*parameter\(s\) b\b"),
    ("matmul(grad, grad)", r"the inner sizes differ.*parameter\(s\) w\b"),
    ("matmul(grad, transpose(grad)) + grad", r"do not broadcast.*parameter\(s\) w\b"),
    ("state s = 0 then s + matmul(grad, transpose(grad))\ns", r"do not broadcast|parameter's shape"),
])
def test_matrix_misuse_is_refused_when_the_optimizer_is_built(source: str, match: str) -> None:
    named = [("w", torch.nn.Parameter(torch.zeros(3, 4))), ("b", torch.nn.Parameter(torch.zeros(4)))]
    prog = gradpipe.compile(source)
    with pytest.raises(GradError, match=match):
        gradpipe.Optimizer(named, prog)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_muon_resumes_bitwise_from_a_state_dict(backend: str) -> None:
    steps = grads(SHAPES, 6, seed=7)
    ps = _params()
    opt = gradpipe.Optimizer(ps, "muon", lr=0.02, backend=backend)
    run(ps, opt, steps[:3])
    again = replay_from_checkpoint(lambda ps2: gradpipe.Optimizer(ps2, "muon", lr=0.02, backend=backend), ps, opt,
                                   steps[3:])
    assert all(torch.equal(a, b) for a, b in zip(ps, again))


def test_newton_schulz_on_a_vector_inside_a_block_is_a_positioned_error_at_the_step() -> None:
    """GaLore hands vectors to its block at full size; building the optimizer cannot see that,
    so the step reports it at the op, as a GradError rather than a traceback."""
    named = [("w", torch.nn.Parameter(torch.randn(6, 4))), ("b", torch.nn.Parameter(torch.randn(4)))]
    opt = gradpipe.Optimizer(named, gradpipe.compile("grad | galore(rank=2) { newton_schulz(precision=float32) }"),
                             backend="eager")
    for _, p in named:
        p.grad = torch.randn(p.shape)
    with pytest.raises(GradError, match=r"1:25: error: 'newton_schulz' needs a parameter of 2 or more dimensions"):
        opt.step()
