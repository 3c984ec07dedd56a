"""Adam written from the language's primitives against the built-in ``adam`` op.

    .venv/bin/python benchmarks/prelude_bench.py [--size 10M] [--rounds 15]

Both pipelines and torch's fused Adam step the same 1 large + 50 small float32 tensors
(``gradpipe.bench.layout_shapes``); the pipeline is ``adam_from_primitives.grad`` beside this file on the compiled backend; the three are timed in
interleaved rounds (so a change in the machine's load hits all three alike) and the
medians are reported, with each gradpipe pipeline as a ratio to fused Adam. Prints a
Markdown row per pipeline for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import time

import torch

import gradpipe
from gradpipe.bench import layout_shapes, machine_info, parse_size

#: the built-in Python op ``adam`` (gradpipe/compiler/ops/adam.py)
BUILTIN = """\
hparam lr = 0.001 in [0, inf)
hparam betas = (0.9, 0.999) in [0, 1)
hparam eps = 1e-8 in [0, inf)
grad | adam(betas[0], betas[1], eps)
"""
#: torch.optim.Adam from two state cells and elementwise math (docs/language.md 4.7)
PRIMITIVES = str(pathlib.Path(__file__).resolve().parent / "adam_from_primitives.grad")


def _params(n: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _, shape in layout_shapes(n, "1+50"):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen)
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="10M")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    args = ap.parse_args()
    n = parse_size(args.size)
    opts = {
        "torch fused Adam": torch.optim.Adam(_params(n), lr=1e-3, fused=True),
        "the built-in adam op": gradpipe.Optimizer(_params(n), BUILTIN, lr=1e-3),
        "pipelines/adam.grad (ema and a cell)": gradpipe.Optimizer(_params(n), "adam", lr=1e-3),
        "adam from primitives": gradpipe.Optimizer(_params(n), PRIMITIVES, lr=1e-3),
    }
    for opt in opts.values():  # compile and warm up
        for _ in range(3):
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["torch fused Adam"])
    info = machine_info()
    print(f"# {args.size} params (1 + 50 tensors), {datetime.date.today()}, {info.get('cpu', '')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| pipeline | median step (ms) | vs torch fused Adam |")
    print("| --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
