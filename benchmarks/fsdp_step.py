"""One optimizer step under FSDP2: the compiled backend, the eager one and torch.optim.Adam.

Two gloo processes on the CPU (one torch thread each), a model of ``--layers`` blocks of
``Linear(width, width)`` and ``LayerNorm(width)``, each Linear wrapped by ``fully_shard``
and the whole model too, so every parameter is a DTensor sharded over the two ranks. The
gradients come from one real backward and stay set; each case times ``opt.step()`` alone
(a barrier before each step, so both ranks start together), after a first step that
compiles (reported apart). Prints rank 0's medians and writes them to
``benchmarks/results/fsdp-step-<date>.json``.

    .venv/bin/python benchmarks/fsdp_step.py                            # adam, lion, scalpel: ~2 min
    .venv/bin/python benchmarks/fsdp_step.py --pipelines adam --width 256

Timings on a shared machine are noisy: compare the backends within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _worker(rank: int, tmp: str, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import gradpipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    blocks = []
    for _ in range(args.layers):
        blocks += [torch.nn.Linear(args.width, args.width), torch.nn.LayerNorm(args.width)]
    model = torch.nn.Sequential(*blocks)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    model(torch.randn(8, args.width)).sum().backward()
    rows = []
    for pipeline in args.pipelines.split(","):
        for kind in ("torch", "eager", "compiled"):
            if kind == "torch" and pipeline != "adam":
                continue
            opt = (torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True) if kind == "torch" else
                   gradpipe.Optimizer(model.named_parameters(), pipeline, lr=1e-4, backend=kind))
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            rows.append({"pipeline": pipeline, "backend": kind, "first_s": first,
                         "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)})
    dist.destroy_process_group()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        with open(os.path.join(tmp, "rows.json"), "w") as f:
            json.dump({"params": params, "rows": rows}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default="adam,lion,scalpel")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(tmp, args), nprocs=2, start_method="spawn")
        result = json.loads(pathlib.Path(tmp, "rows.json").read_text())
    print(f"{result['params']} parameters, sharded over 2 gloo processes")
    print(f"{'pipeline':10s} {'backend':9s} {'first step':>11s} {'median':>10s} {'min':>10s}")
    for r in result["rows"]:
        print(f"{r['pipeline']:10s} {r['backend']:9s} {r['first_s']:10.2f}s {r['median_ms']:8.2f}ms "
              f"{r['min_ms']:8.2f}ms")
    out = ROOT / "benchmarks" / "results" / f"fsdp-step-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({**vars(args), **result}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
