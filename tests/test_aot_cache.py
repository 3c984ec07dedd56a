"""The on-disk cache of compiled segments (``GRADPIPE_CACHE_DIR``, ``gradpipe/runtime/aot.py``).

A first process compiles each fused segment and stores it as an AOTInductor package; a second
process, with an empty Inductor cache of its own, loads the packages and takes the same steps
bit for bit without compiling anything (no Dynamo frame). A model of other shapes misses
the cache and compiles; a broken package is a miss with one warning, never a wrong step."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

#: one per kind of segment: hoisted bias corrections and the check inside the kernel (adam);
#: several segments with eager nodes between them (scalpel); a segment that returns per-bucket
#: flags (skip_nonfinite(updates=true): not packaged, always through Dynamo)
PIPELINES = ["adam", "scalpel", "grad | skip_nonfinite(updates=true) | adam"]

_CHILD = r"""
import json, sys
import torch
import gradpipe
from gradpipe.runtime import aot

out, width = sys.argv[1], int(sys.argv[2])
result = {}
states = {}
for k, pipe in enumerate(json.loads(sys.argv[3])):
    torch.manual_seed(0)
    # a 512x512 matrix is a bucket of its own (updated in place by the kernel), the rest share one;
    # a negative width: no such matrix, one bucket
    big = 512 if width > 0 else 64
    width = abs(width)
    model = torch.nn.Sequential(torch.nn.Linear(width, big), torch.nn.Tanh(), torch.nn.Linear(big, big),
                                torch.nn.Tanh(), torch.nn.Linear(big, 3))
    opt = gradpipe.Optimizer(model.named_parameters(), pipe, lr=1e-2)
    x, y = torch.randn(16, width), torch.randint(0, 3, (16,))
    for step in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:  # a skipped step: the check inside the packaged kernel
            next(model.parameters()).grad[0, 0] = float("nan")
        opt.step()
    states[str(k)] = {n: p.detach().clone() for n, p in model.named_parameters()}
counters = sys.modules.get("torch._dynamo.utils")
result["frames"] = dict(counters.counters["frames"]) if counters else {}
result["stats"] = dict(aot.stats)
torch.save(states, out)
print(json.dumps(result))
"""


def _run(tmp: pathlib.Path, name: str, cache: pathlib.Path | None, width: int = 32,
         pipelines: list[str] = PIPELINES) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "GRADPIPE_BACKEND": "compiled",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}")}  # each process its own: no help from it
    env.pop("GRADPIPE_CACHE_DIR", None)
    if cache is not None:
        env["GRADPIPE_CACHE_DIR"] = str(cache)
    out = tmp / f"{name}.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(width), json.dumps(pipelines)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), (k, n)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A process that compiles and stores, and one without the cache: the reference."""
    tmp = tmp_path_factory.mktemp("aot")
    first = _run(tmp, "first", tmp / "cache")
    plain = _run(tmp, "plain", None)
    return tmp, first, plain


@pytest.mark.slow
def test_a_fresh_process_loads_every_segment_and_compiles_nothing(stored):
    tmp, (first, states1), (plain, states0) = stored
    assert first["stats"].get("save", 0) >= 3, first  # adam's segment, scalpel's
    assert first["stats"].get("skip", 0) >= 1, first  # the flags of skip_nonfinite(updates=true)
    assert not plain["stats"], plain
    second, states2 = _run(tmp, "second", tmp / "cache", pipelines=PIPELINES[:2])
    assert second["stats"]["load"] == first["stats"]["save"] and not second["stats"].get("save"), second
    assert second["stats"]["hit"] >= second["stats"]["load"], second
    assert not second["frames"].get("ok"), second  # not one frame compiled: no Dynamo, no Inductor
    _same({k: states0[k] for k in states2}, states2)  # bit for bit the steps of a process without the cache
    _same(states0, states1)


@pytest.mark.slow
def test_a_model_of_other_sizes_loads_the_same_packages(stored):
    """The packages take any bucket sizes (exported with dynamic sizes, checked on each call)."""
    tmp, (first, _), _ = stored
    other, states = _run(tmp, "other", tmp / "cache", width=24, pipelines=PIPELINES[:1])
    assert other["stats"].get("hit") and not other["stats"].get("save"), other
    assert not other["frames"].get("ok"), other
    _, plain = _run(tmp, "other-plain", None, width=24, pipelines=PIPELINES[:1])
    _same(plain, states)


@pytest.mark.slow
def test_other_buckets_miss_the_cache_and_compile(stored):
    """A model without a parameter big enough to be a bucket of its own calls the segment with
    other arguments: another key, compiled and stored."""
    tmp, _, _ = stored
    other, states = _run(tmp, "buckets", tmp / "cache", width=-24, pipelines=PIPELINES[:1])
    assert not other["stats"].get("hit") and other["stats"].get("save") == 1, other
    assert other["frames"].get("ok"), other
    _, plain = _run(tmp, "buckets-plain", None, width=-24, pipelines=PIPELINES[:1])
    _same(plain, states)


@pytest.mark.slow
def test_a_broken_package_is_a_miss_not_a_wrong_step(stored):
    tmp, _, (_, states0) = stored
    broken = tmp / "broken"
    broken.mkdir()
    for f in (tmp / "cache").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".pt2" else data)
    result, states = _run(tmp, "broken", broken, pipelines=PIPELINES[:1])
    assert not result["stats"].get("hit") and not result["stats"].get("load"), result
    _same({"0": states0["0"]}, states)


def test_the_key_tells_calls_apart():
    """What Dynamo would guard on is in the key (dtypes, dimensions, contiguity, Python values, which
    arguments are the same tensor) or checked by the package (sizes: next test)."""
    from gradpipe.runtime.aot import signature

    a, b = torch.zeros(4), torch.zeros(4)
    keys = {signature(args)[0] for args in [
        ([a, b], 0.0), ([a, a], 0.0), ([a, b], 1.0), ([a, b], True), ([a, torch.zeros(2, 2)], 0.0),
        ([a, torch.zeros(4, dtype=torch.float64)], 0.0), ([a, torch.zeros(8)[::2]], 0.0), ([a, None], 0.0),
        ((a, b), 0.0)]}
    assert len(keys) == 9
    same = signature(([a, b], 0.0))[0]
    assert same == signature(([torch.ones(4), torch.ones(4)], 0.0))[0]  # values are not in it
    assert same == signature(([torch.ones(7), torch.ones(7)], 0.0))[0]  # nor sizes
    with pytest.raises(TypeError):
        signature([object()])


def test_a_package_refuses_sizes_it_was_not_compiled_for():
    from gradpipe.runtime.aot import Package

    pkg = Package({"leaf": [0, 1, 2], "pre_in": None, "main_src": None, "narrow": [],
                   "shapes": [["s0"], ["s0", 3], None], "ranges": {"s0": [2, 100]}}, None, None)
    t = torch.zeros
    assert pkg.fits([t(5), t(5, 3), t(())])
    assert not pkg.fits([t(5), t(6, 3), t(())])  # one symbol, one size
    assert not pkg.fits([t(5), t(5, 4), t(())])  # a static size
    assert not pkg.fits([t(101), t(101, 3), t(())])  # out of the exported range
    assert not pkg.fits([t(1), t(1, 3), t(())])
    assert not pkg.fits([t(5, 1), t(5, 3), t(())])  # another number of dimensions


def test_the_key_follows_plugin_sources_and_global_state(tmp_path, monkeypatch):
    """A plug-in op's source file is in its segments' key (gradpipe's own sources are in every
    key); so are the thread count, the default dtype and deterministic algorithms."""
    import importlib.util

    from gradpipe.compiler.ops import op_impl
    from gradpipe.runtime import aot

    builtin = aot.sources_of([op_impl("adam"), op_impl("ema")])
    assert builtin == aot.sources_of([])
    mod = tmp_path / "my_ops.py"
    mod.write_text("class MyOp:\n    pass\n")
    spec = importlib.util.spec_from_file_location("my_ops", mod)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    monkeypatch.setitem(sys.modules, "my_ops", m)  # as an import leaves it
    first = aot.sources_of([m.MyOp()])
    assert first != builtin
    mod.write_text("class MyOp:\n    scale = 2\n")
    assert aot.sources_of([m.MyOp()]) != first

    before = aot._global_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert aot._global_state() != before
    finally:
        torch.set_num_threads(threads)
    assert aot._global_state() == before
