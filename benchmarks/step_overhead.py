"""The fixed cost of a compiled step: small models, many tensors.

At 100K parameters a fused Adam kernel takes microseconds, so what a step costs is
the Python around it (bucketing, step counters, the non-finite check, Dynamo's
guards). This script times ``opt.step()`` of the compiled backend against
``torch.optim.Adam(fused=True)`` on the same shapes, in alternating blocks in one
process, with gradients written by a real ``backward()`` (so the optimizer's flat
gradient buffers are linked, as in training), and reports the median ratio.

    .venv/bin/python benchmarks/step_overhead.py                  # adam, 51 and 500 tensors
    .venv/bin/python benchmarks/step_overhead.py --pipelines adam,diffgrad --tensors 51

Results go to ``benchmarks/results/step-overhead-<date>.json``. Timings on a shared
machine are noisy: compare ratios from one run, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import torch

import gradpipe
from gradpipe.bench import layout_shapes, machine_info


def _median_step(step, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(pipeline: str, total: int, tensors: int, blocks: int = 15, per_block: int = 50) -> dict:
    """Median step of ``pipeline`` (compiled) and of fused Adam, in alternating blocks."""
    torch.manual_seed(0)
    shapes = [shape for _, shape in layout_shapes(total, f"1+{tensors - 1}")]  # gradpipe bench's layouts
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = gradpipe.Optimizer([(f"p{i}", p) for i, p in enumerate(params)], pipeline, lr=1e-3)
    opt.zero_grad(set_to_none=False)
    sum((p * torch.randn_like(p)).sum() for p in params).backward()  # autograd writes the gradients
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for q in ref:
        q.grad = torch.randn_like(q)
    fused = torch.optim.Adam(ref, lr=1e-3, fused=True)
    for _ in range(5):  # the first step compiles; warm-up steps
        opt.step()
        fused.step()
    ours, theirs = [], []
    for _ in range(blocks):
        ours.append(_median_step(opt.step, per_block))
        theirs.append(_median_step(fused.step, per_block))
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    return {"pipeline": pipeline, "params": sum(p.numel() for p in params), "tensors": tensors,
            "step_ms": statistics.median(ours) * 1e3, "fused_adam_ms": statistics.median(theirs) * 1e3,
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default="adam")
    ap.add_argument("--tensors", default="51,500")
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for pipeline in args.pipelines.split(","):
        for tensors in (int(t) for t in args.tensors.split(",")):
            row = measure(pipeline, args.params, tensors)
            rows.append(row)
            print(f"{pipeline:10s} {row['params']:>9,d} params in {tensors:3d} tensors: "
                  f"{row['step_ms']:.3f} ms a step, fused Adam {row['fused_adam_ms']:.3f} ms, "
                  f"ratio {row['ratio_median']:.2f}x (blocks {row['ratio_min']:.2f}-{row['ratio_max']:.2f})")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or pathlib.Path(__file__).parent / "results" / f"step-overhead-{now:%Y-%m-%d}.json"
    out.write_text(json.dumps({"machine": machine_info(), "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
