"""Peak memory of building an optimizer and taking its first steps, next to torch's fused Adam.

Each implementation runs in a process of its own (``ru_maxrss`` is a process's high-water
mark): the parameters and their gradients are made first (one large matrix with 90% of the
parameters and 50 vectors, as ``gradpipe bench``'s ``1+50`` layout), the compiler is warmed on
a 10-element parameter, and the script reports how far the peak resident memory rose above
that while the optimizer was built and took 3 steps, with the bytes of state it keeps.

    .venv/bin/python benchmarks/peak_memory.py                 # adam, 100M parameters: ~1 min
    .venv/bin/python benchmarks/peak_memory.py --size 10M --pipeline diffgrad
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(impl: str, pipeline: str, size: int) -> dict:
    """In this process: the peak rise while ``impl`` (``fused`` or a gradpipe backend) is built and steps."""
    import gradpipe
    from gradpipe.bench import layout_shapes

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for _, s in layout_shapes(size, "1+50")]
    for p in params:
        p.grad = torch.randn_like(p)
    q = torch.nn.Parameter(torch.randn(10))
    q.grad = torch.randn(10)
    if impl == "fused":  # load the kernels before the baseline
        torch.optim.Adam([q], lr=1e-3, fused=True).step()
    else:  # the compiler's own memory is not the optimizer's
        gradpipe.Optimizer([("q", q)], pipeline, lr=1e-3, backend=impl).step()
    base = _rss_mib()
    opt = torch.optim.Adam(params, lr=1e-3, fused=True) if impl == "fused" else \
        gradpipe.Optimizer([(f"p{i}", p) for i, p in enumerate(params)], pipeline, lr=1e-3, backend=impl)
    for _ in range(3):
        opt.step()
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    return {"impl": impl, "peak_rise_mib": round(_rss_mib() - base), "state_mib": round(sum(state.values()) / 2**20)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100M", help="parameters: 100M, 10M, 1M or a number")
    ap.add_argument("--pipeline", default="adam")
    ap.add_argument("--impls", default="fused,compiled,eager")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process's part
    args = ap.parse_args(argv)
    size = int(float(args.size[:-1]) * {"K": 1e3, "M": 1e6}[args.size[-1]]) if args.size[-1] in "KM" \
        else int(args.size)
    if args.one:
        print(json.dumps(one(args.one, args.pipeline, size)))
        return
    rows = []
    for impl in args.impls.split(","):
        out = subprocess.run([sys.executable, __file__, "--size", str(size), "--pipeline", args.pipeline,
                              "--one", impl], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    fused = next((r["peak_rise_mib"] for r in rows if r["impl"] == "fused"), None)
    print(f"| {args.pipeline} at {args.size} | peak rise MiB | vs fused Adam | state MiB |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['peak_rise_mib'] / fused:.2f}x" if fused else "-"
        print(f"| {r['impl']} | {r['peak_rise_mib']} | {ratio} | {r['state_mib']} |")


if __name__ == "__main__":
    main()
