"""``skip_nonfinite(updates=true)``: a step whose *update* is not finite is undone and skipped.

The gradients of these steps are finite; the pipeline's own arithmetic makes the NaN:
``grad / norm(grad, over=tensor)`` divides by zero where a tensor's gradient is zero (or a
hyperparameter divides by zero). The ops have written their state by the time the update
is known, so the step must put back every state tensor, every state dict entry, the step
counters, the random generators and any parameter the compiled kernel updated in place,
bit for bit, and count the step as a skipped one. On finite steps the option changes
nothing (bitwise). Both backends; a solo bucket (a parameter of 2**18 elements, updated
inside the compiled kernel) included.
"""

from __future__ import annotations

import math
import pickle
import re
from typing import Any

import pytest
import torch

import gradpipe
from gradpipe import GradError, NonFiniteError
from test_nonfinite import BACKENDS, _bits, assert_same, counters, snapshot

#: ``g`` is NaN for a tensor whose gradient is zero (0 / 0): finite gradients, a non-finite update
NORMALIZED = "let g = grad / norm(grad, over=tensor)\n"
POLICY = "skip_nonfinite(2, updates=true)"

#: name -> pipeline source (each states POLICY once)
PIPELINES = {
    # adam's moments take the NaN before the update shows it
    "adam": NORMALIZED + f"g | {POLICY} | adam",
    # a state cell (its new value is written at the end of the route) and p <- value (Lookahead)
    "lookahead": NORMALIZED + "hparam k = 2 in [1, inf)\n"
                 f"let fast = param - lr * (g | {POLICY} | adam)\n"
                 "let sync = step % k == 0\n"
                 "state slow = param then where(sync, slow + 0.5 * (fast - slow), slow)\n"
                 "param = where(sync, slow, fast)\n",
    # a random generator (advanced by the skipped step: it must be put back) and a running maximum
    "noise": NORMALIZED + "state peak = abs(g) then max(peak, abs(g))\n"
             f"g | {POLICY} | noise(0.01, 0.55, seed=0) | momentum(0.9) | scale(1) / (peak + 1e-3)\n",
}
SMALL = ((3, 4), (5,))
#: the first tensor takes a bucket of its own on the compiled backend (SOLO_MIN elements), updated in the kernel
SOLO = ((512, 512), (5,))


def make(shapes: tuple[tuple[int, ...], ...]) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in zip(("w", "b"), shapes)]


def grads(shapes: tuple[tuple[int, ...], ...], n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) * (1.0, 0.3, 2.0, 0.5)[t % 4] for s in shapes] for t in range(n)]


def zeroed(batch: list[torch.Tensor], which: int = 1) -> list[torch.Tensor]:
    """The batch with one tensor's gradient zero: finite, and its normalised gradient 0 / 0."""
    out = [g.clone() for g in batch]
    out[which].zero_()
    return out


def feed(opt: gradpipe.Optimizer, named: list[tuple[str, torch.Tensor]], batch: list[torch.Tensor]) -> None:
    for (_, p), g in zip(named, batch):
        p.grad = g.clone()
    opt.step()


def build(src: str, backend: str, shapes=SMALL, **hps: Any) -> tuple[gradpipe.Optimizer, list]:
    named = make(shapes)
    return gradpipe.Optimizer(named, src, backend=backend, lr=1e-2, **hps), named


def state_tensors(opt: gradpipe.Optimizer) -> dict[str, Any]:
    """What ``state_dict()`` holds, as bits: every state tensor, the node state, the counters."""
    sd = opt.state_dict()
    out: dict[str, Any] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            out[f"state {i} {k}"] = _bits(v)
    for node, st in sd["gradpipe"]["node_state"].items():
        for k, v in st.items():
            out[f"node {node} {k}"] = _bits(v) if isinstance(v, torch.Tensor) else v
    out["nonfinite"] = sd["gradpipe"]["nonfinite"]
    return out


CASES = [(pl, be) for pl in PIPELINES for be in BACKENDS]
IDS = [f"{pl}-{be}" for pl, be in CASES]


# ------------------------------------------------------------------ the undone step
@pytest.mark.parametrize("pipeline,backend", CASES, ids=IDS)
def test_a_nonfinite_update_is_undone_and_the_run_goes_on_as_if_it_had_not_happened(pipeline, backend):
    src = PIPELINES[pipeline]
    data = grads(SMALL, 6)
    bad = 3
    opt, named = build(src, backend)
    for batch in data[:bad]:
        feed(opt, named, batch)
    before, saved = snapshot(opt, named), state_tensors(opt)
    assert saved["nonfinite"] == {"total": 0, "consecutive": 0, "last_step_skipped": False}

    feed(opt, named, zeroed(data[bad]))  # the gradients are finite; b's update is 0 / 0
    assert counters(opt) == (1, 1, True)
    assert_same(before, snapshot(opt, named), f"{pipeline} [{backend}]")
    after = state_tensors(opt)
    assert after.pop("nonfinite") == {"total": 1, "consecutive": 1, "last_step_skipped": True}
    saved.pop("nonfinite")
    assert_same(saved, after, f"{pipeline} [{backend}] state_dict")

    for batch in data[bad:]:  # the same batches, finite
        feed(opt, named, batch)
    ref, ref_named = build(src, backend)
    for batch in data:
        feed(ref, ref_named, batch)
    assert_same(snapshot(ref, ref_named), snapshot(opt, named), f"{pipeline} [{backend}] after")
    assert counters(opt) == (1, 0, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_first_step_leaves_no_state(backend):
    opt, named = build(PIPELINES["noise"], backend)
    before = snapshot(opt, named)
    feed(opt, named, zeroed(grads(SMALL, 1)[0]))
    assert_same(before, snapshot(opt, named), "first step")
    assert not any(opt.state[p] for _, p in named) and counters(opt) == (1, 1, True)
    feed(opt, named, grads(SMALL, 1)[0])
    ref, ref_named = build(PIPELINES["noise"], backend)
    feed(ref, ref_named, grads(SMALL, 1)[0])
    assert_same(snapshot(ref, ref_named), snapshot(opt, named), "after a bad first step")


@pytest.mark.parametrize("pipeline", ["adam", "adamw", "lookahead"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_updated_inside_the_kernel_is_put_back(backend, pipeline):
    """A (512, 512) parameter is a solo bucket on the compiled backend: the fused segment writes
    it in place (``p - lr * u``, or Lookahead's new value), so the undo copies it back; its zero
    gradient makes its own update NaN. ``adamw``'s decay and Lookahead read the parameter in
    the same kernel that writes it."""
    src = PIPELINES[pipeline] if pipeline in PIPELINES else NORMALIZED + f"g | {POLICY} | adam | decay(0.1)\n"
    data = grads(SOLO, 4)
    opt, named = build(src, backend, SOLO)
    if backend == "compiled":
        buckets = opt._compiled._buckets(gradpipe.runtime.eager.RouteBatch(
            [p for _, p in named], {}, [{}] * 2, [{}] * 2))
        assert any(b.solo and b.idxs == [0] for b in buckets)
    for batch in data[:2]:
        feed(opt, named, batch)
    before, saved = snapshot(opt, named), state_tensors(opt)
    with pytest.raises(NonFiniteError) as info:  # max_consecutive=2: the third undone step in a row raises
        for _ in range(3):
            feed(opt, named, zeroed(data[2], which=0))
    assert info.value.params == ["w (update)"] and info.value.update
    assert_same(before, snapshot(opt, named), f"solo [{backend}]")
    saved.pop("nonfinite")
    assert state_tensors(opt).pop("nonfinite") == {"total": 3, "consecutive": 3, "last_step_skipped": True}
    for batch in data[2:]:
        feed(opt, named, batch)
    ref, ref_named = build(src, backend, SOLO)
    for batch in data:
        feed(ref, ref_named, batch)
    assert_same(snapshot(ref, ref_named), snapshot(opt, named), f"solo [{backend}] after")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_taken_after_an_undone_step_resumes_to_the_same_bits(backend, tmp_path):
    """On the compiled backend the state is written into a second set of flat buffers, which become
    the state once the update is known to be finite: ``opt.state`` then points at the other set,
    and a checkpoint saved at any point resumes bitwise."""
    src = PIPELINES["lookahead"]
    data = grads(SMALL, 7)
    plan = [zeroed(b) if t == 2 else b for t, b in enumerate(data)]
    straight, s_named = build(src, backend)
    for batch in plan:
        feed(straight, s_named, batch)
    opt, named = build(src, backend)
    for batch in plan[:3]:
        feed(opt, named, batch)
    w = named[0][1]
    held = {k: v for k, v in opt.state[w].items() if k != "step"}
    feed(opt, named, plan[3])
    moved = sorted(k for k, v in held.items() if opt.state[w][k] is not v)
    assert moved == (sorted(held) if backend == "compiled" else []), moved  # the compiled backend's other buffers
    torch.save({"opt": opt.state_dict(), "model": {n: p.detach() for n, p in named}}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed, r_named = build(src, backend)
    with torch.no_grad():
        for n, p in r_named:
            p.copy_(saved["model"][n])
    resumed.load_state_dict(saved["opt"])
    for batch in plan[4:]:
        feed(resumed, r_named, batch)
    assert_same(snapshot(straight, s_named), snapshot(resumed, r_named), f"resume [{backend}]")
    assert counters(resumed) == counters(straight) == (1, 0, False)


# ------------------------------------------------------------------ finite steps: nothing changes
@pytest.mark.parametrize("pipeline,backend,shapes", [
    *[(pl, be, SMALL) for pl in PIPELINES for be in BACKENDS], ("adam", "compiled", SOLO), ("adam", "eager", SOLO),
], ids=[*IDS, "adam-compiled-solo", "adam-eager-solo"])
def test_finite_steps_are_bitwise_those_without_the_option(pipeline, backend, shapes):
    src = PIPELINES[pipeline]
    runs = []
    for text in (src, src.replace(POLICY, "skip_nonfinite(2)")):
        opt, named = build(text, backend, shapes)
        for batch in grads(shapes, 4):
            feed(opt, named, batch)
        runs.append(snapshot(opt, named))
    assert_same(runs[1], runs[0], f"{pipeline} [{backend}]")


# ------------------------------------------------------------------ counting and the error
@pytest.mark.parametrize("backend", BACKENDS)
def test_undone_steps_count_with_skipped_gradients_and_raise_naming_the_update(backend):
    opt, named = build(PIPELINES["adam"], backend)
    data = grads(SMALL, 3)
    feed(opt, named, data[0])
    before = snapshot(opt, named)
    nan = [g.clone() for g in data[1]]
    nan[0][0, 0] = math.nan
    feed(opt, named, nan)  # a NaN gradient: skipped before any op runs
    feed(opt, named, zeroed(data[1]))  # an update 0 / 0: undone; the 2nd skipped step in a row
    assert counters(opt) == (2, 2, True)
    with pytest.raises(NonFiniteError) as info:
        feed(opt, named, zeroed(data[1]))
    err = info.value
    assert (err.step, err.consecutive, err.max_consecutive, err.total, err.params, err.update) == \
        (2, 3, 2.0, 3, ["b (update)"], True)
    msg = str(err)
    assert msg.startswith("step 2: the pipeline's update is not finite (NaN or Inf) for b (update), from finite "
                          "gradients; 3 skipped steps in a row, more than skip_nonfinite(max_consecutive=2, "
                          "updates=true) allows (3 skipped in this run).")
    assert "\nhint: look for a division by zero" in msg
    assert_same(before, snapshot(opt, named), "the raising step")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == msg and again.update
    feed(opt, named, data[2])
    assert counters(opt) == (3, 0, False)


def test_a_hyperparameter_that_divides_by_zero_is_undone():
    src = f"hparam d = 1 in [0, 10]\n(grad | {POLICY} | adam) / d\n"
    opt, named = build(src, "eager")
    data = grads(SMALL, 2)
    feed(opt, named, data[0])
    before = snapshot(opt, named)
    opt.param_groups[0]["d"] = 0.0
    feed(opt, named, data[1])
    assert_same(before, snapshot(opt, named), "d = 0") and counters(opt) == (1, 1, True)
    opt.param_groups[0]["d"] = 1.0
    feed(opt, named, data[1])
    assert counters(opt) == (1, 0, False) and opt.state[named[0][1]]["step"].item() == 2


def test_without_the_option_the_nonfinite_update_reaches_the_parameters():
    opt, named = build(PIPELINES["adam"].replace(POLICY, "skip_nonfinite(2)"), "eager")
    feed(opt, named, zeroed(grads(SMALL, 1)[0]))
    assert torch.isnan(named[1][1]).all() and counters(opt) == (0, 0, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_grad_at_with_the_option(backend):
    """grad_at's second pass runs before the routes: the update check comes after it, and an
    undone step leaves the parameters as the closure's calls found them."""
    src = ("let e = grad * (0.05 / (norm(grad, over=global) + 1e-12))\nlet h = grad_at(param + e)\n"
           f"h / norm(h, over=tensor) | {POLICY} | momentum(0.9)\n")
    named = make(SMALL)
    opt = gradpipe.Optimizer(named, src, backend=backend, lr=1e-2)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    w, b = (p for _, p in named)

    def closure(zero_b: bool):
        def f():
            opt.zero_grad()
            loss = (x @ w.T).sum() * 0.1 + ((b * 0).sum() if zero_b else (b ** 2).sum())
            loss.backward()
            return loss
        return f
    opt.step(closure(False))
    before = snapshot(opt, named)
    opt.step(closure(True))  # b's gradient at the point is zero: its update divides 0 by 0
    assert_same(before, snapshot(opt, named), "sam") and counters(opt) == (1, 1, True)
    opt.step(closure(False))
    assert counters(opt) == (1, 0, False) and opt.state[named[0][1]]["step"].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_branch_guard_skips_the_division_in_the_steps_that_do_not_take_it(backend):
    """The per-tensor norm is read only under ``where(step % 2 == 0, ...)`` (a branch guard: it is
    computed only in even steps), so a zero gradient gives a NaN update in even steps only."""
    src = f"let g = where(step % 2 == 0, grad / norm(grad, over=tensor), grad)\ng | {POLICY} | momentum(0.9)\n"
    opt, named = build(src, backend)
    data = grads(SMALL, 4)
    feed(opt, named, zeroed(data[0]))  # step 1 (odd): the plain gradient, finite
    assert counters(opt) == (0, 0, False)
    before = snapshot(opt, named)
    feed(opt, named, zeroed(data[1]))  # step 2 (even): 0 / 0, undone
    assert_same(before, snapshot(opt, named), f"guard [{backend}]") and counters(opt) == (1, 1, True)
    feed(opt, named, data[1])
    assert counters(opt) == (1, 0, False) and opt.state[named[0][1]]["step"].item() == 2


def test_a_parameter_listed_twice_is_refused_before_anything_changes():
    named = make(SMALL)
    params = [p for _, p in named]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = gradpipe.Optimizer([*params, params[0]], PIPELINES["adam"], backend="eager")
    for p, g in zip(params, grads(SMALL, 1)[0]):
        p.grad = g
    with pytest.raises(ValueError, match=re.escape("skip_nonfinite(updates=true) cannot step a parameter listed "
                                                   "twice")):
        opt.step()
    assert not opt.state


# ------------------------------------------------------------------ the option's form
@pytest.mark.parametrize("src,message", [
    ("hparam u = true\ngrad | skip_nonfinite(updates=u) | adam\n",
     "updates of 'skip_nonfinite' must be written true or false, known when the pipeline compiles"),
    ("grad | skip_nonfinite(updates=1) | adam\n", "argument 'updates' of 'skip_nonfinite' must be true or false"),
    ('route "w": grad | skip_nonfinite(updates=true) | adam\nroute default: grad | skip_nonfinite | sign\n',
     "two different non-finite policies"),
])
def test_option_mistakes_are_grad_errors(src, message):
    with pytest.raises(GradError, match=re.escape(message)) as info:
        gradpipe.compile(src)
    assert info.value.line >= 1


def test_the_policy_reads_the_option():
    assert gradpipe.compile("grad | skip_nonfinite(3, updates=true) | adam").nonfinite.updates
    assert gradpipe.compile("grad | skip_nonfinite(updates=true) | adam").nonfinite.max_consecutive == 10
    assert not gradpipe.compile("grad | skip_nonfinite(3) | adam").nonfinite.updates
    assert not gradpipe.compile("grad | adam").nonfinite.updates
