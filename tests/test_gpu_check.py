"""``benchmarks/gpu_check.sh`` on the CPU: the one-command GPU check runs every part but
CUDA's synchronisation here (``--device cpu --quick``: two pipelines, 10K parameters).

The structure of the JSON and the exit status are checked, never a timing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path) -> None:
    """Parity of adam and muon (matrices only) in both dtypes in two worker processes, the
    benchmark at 10K, one JSON with every part, exit 0."""
    out = tmp_path / "check.json"
    p = _run(str(out), "--device", "cpu", "--quick", "--jobs", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"machine", "bandwidth", "config", "results", "device", "parity", "hbm", "ok", "wall_s"}
    assert doc["ok"] is True and doc["device"]["type"] == "cpu" and doc["config"]["jobs"] == 2
    parity = doc["parity"]
    assert [(r["pipeline"], r["dtype"]) for r in parity["results"]] == [
        ("adam", "float64"), ("adam", "float32"), ("muon", "float64"), ("muon", "float32")]
    for r in parity["results"]:
        assert r["status"] == "equal", r
        assert r["max_tolerance_ratio"] <= 1 and math.isfinite(r["max_abs_diff"]) and r["rtol"] > 0
    assert parity["counts"] == {"equal": 4, "mismatch": 0, "fallback": 0, "error": 0, "not checked": 0}
    assert {r["impl"] for r in doc["results"]} == {"torch Adam (fused)", "torch Muon", "gradpipe adam [compiled]",
                                                   "gradpipe muon [compiled]"}
    assert all(r["status"] == "ok" and r["device"] == "cpu" for r in doc["results"])
    assert doc["bandwidth"]["stream_gbs"] > 0 and doc["bandwidth"]["copy_gbs"] > 0
    hbm = {h["impl"]: h for h in doc["hbm"]}
    assert hbm["gradpipe adam [compiled]"]["effective_gbs"] > 0 and hbm["torch Muon"]["effective_gbs"] is None
    assert "parity (compiled == eager, 20 steps): 4 checks: 4 equal" in p.stdout and "| torch Muon" in p.stdout


def test_a_difference_exits_1(tmp_path, monkeypatch, capsys) -> None:
    """A compiled result outside the tolerance fails the run (exit 1, ``ok`` false, named
    in the summary); the checks themselves are replaced here, so nothing compiles."""
    gc = _gpu_check()

    def fake(task):
        name, dtype, device = task
        bad = name == "muon" and dtype == "float32"
        return {"pipeline": name, "dtype": dtype, "device": device, "status": "mismatch" if bad else "equal",
                "max_abs_diff": 3e-3 if bad else 0.0, "max_tolerance_ratio": 30.0 if bad else 0.0,
                "rtol": 1e-4, "atol": 1e-5, "error": None}
    monkeypatch.setattr(gc, "check_one", fake)
    out = tmp_path / "c.json"
    assert gc.main([str(out), "--device", "cpu", "--quick", "--skip-bench"]) == 1
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["parity"]["counts"]["mismatch"] == 1 and doc["results"] == []
    assert "MISMATCH muon float32" in capsys.readouterr().out


def test_differences_follow_assert_close() -> None:
    """Within means ``|c - e| <= atol + rtol |e|`` everywhere; a NaN is never within."""
    gc = _gpu_check()
    e = [torch.tensor([1.0, -2.0]), torch.tensor([[0.0]])]
    near = [torch.tensor([1.0 + 1e-7, -2.0]), torch.tensor([[1e-8]])]
    assert gc._differences(e, near, 1e-6, 1e-7)["within"]
    assert not gc._differences(e, [torch.tensor([1.1, -2.0]), torch.tensor([[0.0]])], 1e-6, 1e-7)["within"]
    assert not gc._differences(e, [torch.tensor([float("nan"), -2.0]), torch.tensor([[0.0]])], 1e-6, 1e-7)["within"]


def test_every_pipeline_is_checked_and_muon_on_matrices() -> None:
    gc = _gpu_check()
    names = gc.parity_names()
    assert set(names) == {p.stem for p in (ROOT / "pipelines").glob("*.grad")}
    assert gc.tolerance("adam", "float32") == (1e-6, 1e-7) and gc.tolerance("soap", "float64") == (1e-9, 1e-10)
    assert gc.tolerance("adan", "float32") == gc.FLOAT32_OTHERS and gc.tolerance("soap", "float32")[1] >= 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_exits_2(tmp_path) -> None:
    p = _run(str(tmp_path / "x.json"), "--skip-parity", "--skip-bench")
    assert p.returncode == 2 and "no cuda device here" in p.stderr
