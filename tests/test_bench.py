"""``gradpipe.bench`` and ``gradpipe bench``: a smoke run at a tiny size.

Only the structure of the results is checked (keys, positive times, finite ratios,
exact state bytes), never a timing: CI machines are shared and noisy.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from gradpipe import bench
from gradpipe.cli import main

KEYS = {"size", "n_params", "layout", "n_tensors", "threads", "impl", "library", "pipeline", "backend", "status",
        "error", "repeats", "step_s", "step_min_s", "step_times_s", "fused_step_s", "ratio_to_fused", "step1_s",
        "step2_s", "first_two_s", "state_bytes", "state_bytes_per_param", "peak_rss_delta_bytes",
        "traffic_bytes_per_param", "bandwidth_gbs", "roofline_s", "roofline_pct", "includes_autograd",
        "autograd_s", "compile_fallback", "device", "given", "given_params", "given_tensors", "peak_cuda_delta_bytes"}


@pytest.fixture
def no_heavyball(monkeypatch):
    """heavyball as if it were not installed (``import heavyball`` raises ImportError): its
    rows say so, and the smoke runs skip its compilation (seconds per optimizer)."""
    monkeypatch.setitem(sys.modules, "heavyball", None)


def test_sizes_and_layouts() -> None:
    assert [bench.parse_size(s) for s in ("100K", "1M", "1.5M", "10_000", 7)] == [100_000, 10**6, 1_500_000, 10_000, 7]
    assert [bench.size_label(n) for n in (100_000, 10**7, 12_345)] == ["100K", "10M", "12345"]
    with pytest.raises(ValueError):
        bench.parse_size("lots")
    for n in (10_000, 100_000, 10**6, 10**7, 10**8):
        one = bench.layout_shapes(n, "1+50")
        assert len(one) == 51 and sum(math.prod(s) for _, s in one) == n
        model = bench.layout_shapes(n, "model")
        total = sum(math.prod(s) for _, s in model)
        assert len({name for name, _ in model}) == len(model)
        if n >= 10**5:
            assert abs(total - n) / n < 0.05, (n, total)
    with pytest.raises(ValueError):
        bench.layout_shapes(1000, "2+3")


def test_run_bench_smoke(tmp_path, no_heavyball) -> None:
    out = tmp_path / "r.json"
    rows = bench.run_bench(["10K"], ["adam", "pcgrad_adam"], ["eager"], repeats=2, threads=1, out_json=out,
                           warmup=0, bandwidth_mb=4, retries=0)
    by = {r["impl"]: r for r in rows}
    assert set(by) >= {"torch Adam (forloop)", "torch Adam (foreach)", "torch Adam (fused)",
                       "gradpipe adam [eager]", "gradpipe pcgrad_adam [eager]"}
    for r in rows:
        assert set(r) >= KEYS, set(KEYS) - set(r)
        if r["library"] == "heavyball":
            assert r["status"] == "not installed" and r["step_s"] is None
            continue
        if r["library"] == "pytorch_optimizer":
            assert r["status"] in ("ok", "not installed")
            continue
        assert r["status"] == "ok", r
        assert r["n_params"] == 10_000 and r["n_tensors"] == 51
        assert r["repeats"] == 2 and len(r["step_times_s"]) == 2
        for k in ("step_s", "step_min_s", "fused_step_s", "step1_s", "step2_s", "first_two_s", "bandwidth_gbs",
                  "roofline_s"):
            assert r[k] > 0 and math.isfinite(r[k]), (r["impl"], k, r[k])
        assert math.isfinite(r["ratio_to_fused"]) and r["ratio_to_fused"] > 0
        assert math.isfinite(r["roofline_pct"]) and r["roofline_pct"] > 0
        # Adam keeps m and v: 8 bytes per fp32 parameter (plus a 4-byte step per tensor)
        assert 8 * 10_000 <= r["state_bytes"] <= 8 * 10_000 + 16 * 51, (r["impl"], r["state_bytes"])
        # (pcgrad_adam reads two losses' gradients: 4 bytes more, lowering.least_traffic)
        assert r["traffic_bytes_per_param"] == pytest.approx(32.0 if "pcgrad" in r["impl"] else 28.0)
    assert by["gradpipe pcgrad_adam [eager]"]["includes_autograd"]
    assert by["gradpipe pcgrad_adam [eager]"]["autograd_s"] > 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "bandwidth", "config", "results"} and len(doc["results"]) == len(rows)
    assert doc["machine"]["torch"] and doc["bandwidth"]["best_gbs"] > 0
    table = bench.to_markdown(rows)
    assert "| torch Adam (fused)" in table and "| gradpipe adam [eager]" in table
    targets = bench.check_targets(rows)
    assert targets and all(t["met"] is None for t in targets)  # nothing here is a target case


def test_traffic_model() -> None:
    """Bytes per parameter from the math: 12 + 8 per state element (fp32)."""
    rows = bench.run_bench(["10K"], ["diffgrad", "scalpel"], ["eager"], repeats=1, threads=1, warmup=0,
                           baselines=(), others=False, bandwidth_mb=4, retries=0)
    by = {r["pipeline"]: r for r in rows}
    assert by["diffgrad"]["traffic_bytes_per_param"] == pytest.approx(12 + 8 * 3)  # m, v, prev
    assert by["scalpel"]["traffic_bytes_per_param"] == pytest.approx(12 + 8 * 5)  # ema, median, m, v, prev


def test_cli_bench(tmp_path, capsys, no_heavyball) -> None:
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "--sizes", "10K", "--pipelines", "adam", "--backends", "eager", "--repeats", "2",
               "--threads", "1", "--retries", "0", "--bandwidth-mb", "4", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "gradpipe adam [eager]" in out and "vs fused Adam" in out
    assert json.loads(js.read_text())["results"] and "| target |" in md.read_text()


#: the peers of the fast test: all but torch.compile, which compiles for about 40 s here
FAST_PEERS = [k for k in bench.PEERS if k != "torch_compile"]


def test_cli_bench_peers(tmp_path, capsys, no_heavyball) -> None:
    """``gradpipe bench --peers`` at 10K parameters: one row per peer and pipeline, the
    columns of the table, heavyball's rows ``not installed``, matrix optimizers given the
    matrices, the JSON."""
    js = tmp_path / "p.json"
    rc = main(["bench", "--peers", ",".join(FAST_PEERS), "--sizes", "10K", "--pipelines", "adam,diffgrad,muon",
               "--backends", "eager", "--repeats", "2", "--threads", "1", "--retries", "0", "--bandwidth-mb", "4",
               "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| " + " | ".join(bench.PEER_COLUMNS) + " |" in out and "streaming bandwidth" in out
    rows = json.loads(js.read_text())["results"]
    by = {r["impl"]: r for r in rows}
    peers = [bench.PEERS[k].name for k in FAST_PEERS]
    assert list(by) == list(dict.fromkeys(by)) and set(by) == {*peers, "gradpipe adam [eager]",
                                                               "gradpipe diffgrad [eager]", "gradpipe muon [eager]"}
    for r in rows:
        assert set(r) >= KEYS, set(KEYS) - set(r)
        line = next(x for x in out.splitlines() if x.startswith(f"| {r['impl']}"))
        assert line.count("|") == len(bench.PEER_COLUMNS) + 1, line
        if r["library"] == "heavyball":
            assert r["status"] == "not installed" and "| not installed |" in line
            continue
        assert r["status"] in ("ok", "not installed"), r
        if r["status"] != "ok":
            continue
        assert math.isfinite(r["ratio_to_fused"]) and r["bandwidth_gbs"] > 0
        assert (r["roofline_pct"] is not None) == (r["library"] == "gradpipe" or r["impl"].startswith("torch Adam"))
    for name in ("torch Muon", "heavyball Muon", "heavyball SOAP", "gradpipe muon [eager]"):
        assert by[name]["given"] == "matrices" and by[name]["given_tensors"] == 1, name
    assert by["gradpipe muon [eager]"]["given_params"] == 9_000  # the (9, 1000) matrix of 1+50 at 10K
    assert by["gradpipe adam [eager]"]["given"] == "all" and by["gradpipe adam [eager]"]["given_tensors"] == 51
    doc = json.loads(js.read_text())
    assert doc["config"]["peers"] == FAST_PEERS and doc["bandwidth"]["best_gbs"] > 0


@pytest.mark.slow
def test_run_peers_every_peer() -> None:
    """Every peer, heavyball's and torch.compile's included where they import, on a 3-tensor
    layout (torch.compile's time grows with the tensors): ok or ``not installed``, never an error."""
    rows = bench.run_peers(["10K"], ["adam", "muon"], ["eager"], ["1+2"], repeats=2, threads=1, warmup=0,
                           bandwidth_mb=4, retries=0)
    assert {r["impl"] for r in rows} >= {c.name for c in bench.PEERS.values()}
    for r in rows:
        assert r["status"] in ("ok", "not installed"), (r["impl"], r["status"], r["error"])
    assert "| torch Adam (torch.compile)" in bench.peers_markdown(rows)


@pytest.mark.parametrize("argv", [["--sizes", "lots"], ["--backends", "jit"], ["--layouts", "3+1"],
                                  ["--peers", "torch_fused,nadam_of_my_own"]])
def test_cli_bench_bad_arguments(argv, capsys) -> None:
    assert main(["bench", *argv]) == 2
    assert "gradpipe bench:" in capsys.readouterr().err


def test_cli_bench_unknown_pipeline(capsys) -> None:
    assert main(["bench", "--sizes", "10K", "--pipelines", "adma"]) == 1


@pytest.mark.slow
def test_cli_bench_quick_compiled(capsys) -> None:
    """``gradpipe bench --quick`` as documented (it compiles two pipelines: seconds)."""
    assert main(["bench", "--quick", "--threads", "1", "--retries", "0"]) == 0
    out = capsys.readouterr().out
    assert "gradpipe diffgrad [compiled]" in out and "100K parameters" in out
