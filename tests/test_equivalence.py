"""gradpipe's built-in pipelines equal their torch optimizers, step for step.

Driven by :data:`optimizer_table.CASES`: a small float64 MLP is trained for
60 steps by ``gradpipe.Optimizer`` and by the reference (a ``torch.optim``
class, or the paper reference for Lion) from the same initial weights on the
same batches; every parameter, and every state buffer that has a counterpart,
must agree to a relative 1e-9. The same holds with two param groups of
different hyperparameters and under torch LR schedulers.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

import gradpipe
from optimizer_table import CASES, OptCase, case_ids

STEPS = 60
RTOL, ATOL = 1e-9, 1e-12

_ONE_CYCLE = [c for c in CASES if c.one_cycle]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin badly on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (32,), generator=gen)
        out.append((x, y))
    return out


BATCHES = _batches()


def _loss(model: torch.nn.Module, t: int) -> torch.Tensor:
    x, y = BATCHES[t % len(BATCHES)]
    return torch.nn.functional.cross_entropy(model(x), y)


def _train_pair(case: OptCase, make_groups: Callable[[torch.nn.Module, bool], Any] | None = None,
                make_sched: Callable[[torch.optim.Optimizer], Any] | None = None, steps: int = STEPS):
    """Train a gradpipe model and a reference model side by side; return both models and optimizers."""
    m_gp = _model()
    m_ref = copy.deepcopy(m_gp)
    if make_groups is None:
        opt_gp = gradpipe.Optimizer(m_gp.named_parameters(), case.pipeline, **case.hp)
        opt_ref = case.ref_cls(m_ref.parameters(), **case.ref_kwargs)
    else:
        opt_gp = gradpipe.Optimizer(make_groups(m_gp, True), case.pipeline, **case.hp)
        opt_ref = case.ref_cls(make_groups(m_ref, False), **case.ref_kwargs)
    sched_gp = make_sched(opt_gp) if make_sched else None
    sched_ref = make_sched(opt_ref) if make_sched else None
    for t in range(steps):
        for model, opt, sched in ((m_gp, opt_gp, sched_gp), (m_ref, opt_ref, sched_ref)):
            opt.zero_grad()
            _loss(model, t).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return m_gp, m_ref, opt_gp, opt_ref


def _assert_params_close(m_gp: torch.nn.Module, m_ref: torch.nn.Module, m0: torch.nn.Module | None = None) -> None:
    for (name, p), q in zip(m_gp.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda s, n=name: f"param {n}: {s}")
    if m0 is not None:  # the run really trained: parameters moved
        moved = sum(float((p - p0).detach().abs().max()) for p, p0 in zip(m_gp.parameters(), m0.parameters()))
        assert moved > 1e-3


def _assert_state_close(case: OptCase, opt_gp: gradpipe.Optimizer, opt_ref: torch.optim.Optimizer) -> None:
    params_gp = [p for g in opt_gp.param_groups for p in g["params"]]
    params_ref = [p for g in opt_ref.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(params_gp, params_ref)):
        st_gp, st_ref = opt_gp.state[p], opt_ref.state[q]
        for key_gp, key_ref in case.state_map.items():
            assert key_gp in st_gp, f"param {i}: gradpipe state has no {key_gp!r}: {sorted(st_gp)}"
            torch.testing.assert_close(st_gp[key_gp], st_ref[key_ref], rtol=RTOL, atol=ATOL,
                                       msg=lambda s, k=key_gp: f"param {i} state {k}: {s}")
        assert float(st_gp["step"]) == STEPS


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_matches_reference(case: OptCase) -> None:
    m_gp, m_ref, opt_gp, opt_ref = _train_pair(case)
    _assert_params_close(m_gp, m_ref, _model())
    _assert_state_close(case, opt_gp, opt_ref)


def test_table_covers_the_torch_builtins() -> None:
    covered = {c.pipeline for c in CASES}
    assert {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lion"} <= covered


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_two_param_groups(case: OptCase) -> None:
    """Group 0 (first layer) keeps the defaults, group 1 (second layer) overrides hyperparameters."""
    assert case.group2, "every case names a second group's hyperparameters"

    def groups(model: torch.nn.Module, named: bool):
        items = list(model.named_parameters())
        first, second = items[:2], items[2:]
        if not named:
            first, second = [p for _, p in first], [p for _, p in second]
        return [{"params": first}, {"params": second, **case.group2}]

    m_gp, m_ref, opt_gp, opt_ref = _train_pair(case, make_groups=groups)
    for k, v in case.group2.items():
        assert opt_gp.param_groups[1][k] == v
    _assert_params_close(m_gp, m_ref)
    _assert_state_close(case, opt_gp, opt_ref)


_SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-5),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
}


@pytest.mark.parametrize("sched", sorted(_SCHEDULERS))
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_lr_scheduler(case: OptCase, sched: str) -> None:
    m_gp, m_ref, opt_gp, opt_ref = _train_pair(case, make_sched=_SCHEDULERS[sched])
    assert opt_gp.param_groups[0]["lr"] == pytest.approx(opt_ref.param_groups[0]["lr"], rel=1e-12)
    assert opt_gp.param_groups[0]["lr"] != case.hp["lr"]
    _assert_params_close(m_gp, m_ref)
    _assert_state_close(case, opt_gp, opt_ref)


@pytest.mark.parametrize("case", _ONE_CYCLE, ids=case_ids(_ONE_CYCLE))
def test_one_cycle_lr(case: OptCase) -> None:
    """OneCycleLR cycles the lr and ``momentum`` (SGD) or ``betas[0]`` (Adam) in the param group."""
    def sched(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS, base_momentum=0.8,
                                                   max_momentum=0.95)
    m_gp, m_ref, opt_gp, opt_ref = _train_pair(case, make_sched=sched, steps=STEPS // 3)
    key = "betas" if "betas" in opt_gp.param_groups[0] else "momentum"
    assert opt_gp.param_groups[0][key] == opt_ref.param_groups[0][key]
    assert opt_gp.param_groups[0][key] != case.ref_cls(_model().parameters(), **case.ref_kwargs).defaults[key]
    _assert_params_close(m_gp, m_ref)
    params_gp = [p for g in opt_gp.param_groups for p in g["params"]]
    params_ref = [p for g in opt_ref.param_groups for p in g["params"]]
    for p, q in zip(params_gp, params_ref):
        for key_gp, key_ref in case.state_map.items():
            torch.testing.assert_close(opt_gp.state[p][key_gp], opt_ref.state[q][key_ref], rtol=RTOL, atol=ATOL)
