"""Muon in gradpipe against ``torch.optim.Muon`` on a transformer's matrix shapes.

    .venv/bin/python benchmarks/muon_bench.py [--layers 6] [--width 384] [--rounds 7]

The hidden matrices of ``--layers`` transformer blocks of width ``--width`` (per block the
attention's q, k, v and output projections, ``w×w``, and the MLP's ``w×4w`` and ``4w×w``),
in float32 on the CPU, with fixed gradients. Three optimizers step them, timed in
interleaved rounds so that a change in the machine's load hits them alike: torch's Muon,
``pipelines/muon.grad`` (one matrix at a time, as torch: ``batch=none``, bit for bit), and
the same file with ``batch=shape`` (matrices of one shape orthogonalised in one batched
call). Each is reported as the median step time and its ratio to torch's. Peak memory is
measured in a fresh process per optimizer: the peak growth of the resident set size from the
optimizer's construction through a few steps (sampled every millisecond), over the parameters
and gradients already built; it includes what compiling allocates.
Prints Markdown rows for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

import gradpipe
from gradpipe.bench import machine_info
from gradpipe.compiler.program import builtin_dir

MUON = builtin_dir() / "muon.grad"


def shapes(layers: int, width: int) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]]


def params(layers: int, width: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in shapes(layers, width):
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * 0.01
        out.append(p)
    return out


def make(name: str, ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "torch":
        return torch.optim.Muon(ps, lr=0.02)
    source = MUON.read_text()
    if name == "batched":
        source = source.replace("batch=none", "batch=shape")
    return gradpipe.Optimizer(ps, gradpipe.compile(source, str(MUON)), lr=0.02)


NAMES = {"torch": "torch.optim.Muon", "gradpipe": "muon.grad (batch=none, as torch)",
         "batched": "muon.grad with batch=shape"}


def _rss() -> int:
    """The process's resident set size now, in bytes (Linux: /proc/self/statm)."""
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_memory(name: str, layers: int, width: int, steps: int) -> None:
    """In a fresh process: print the peak growth of the resident set (MiB) from building the
    optimizer through ``steps`` steps, sampled every millisecond by a thread."""
    ps = params(layers, width)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss())
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    opt = make(name, ps)
    for _ in range(steps):
        opt.step()
    done.set()
    t.join()
    print((max(peak[0], _rss()) - base) / 2 ** 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--peak", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        peak_memory(args.peak, args.layers, args.width, args.steps + 2)
        return
    torch.manual_seed(0)
    opts = {name: make(name, params(args.layers, args.width)) for name in NAMES}
    for opt in opts.values():  # compile and warm up
        for _ in range(2):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {}
    for name in NAMES:
        out = subprocess.run([sys.executable, __file__, "--peak", name, "--layers", str(args.layers), "--width",
                              str(args.width), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        peaks[name] = float(out.stdout.strip().splitlines()[-1])
    n = sum(a * b for a, b in shapes(args.layers, args.width))
    info = machine_info()
    print(f"<!-- {info['date']}, {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {args.layers} layers of width "
          f"{args.width} ({len(shapes(args.layers, args.width))} matrices, {n / 1e6:.1f}M parameters), float32, "
          f"{args.rounds} rounds of {args.steps} steps -->")
    print("| optimizer | step (median) | vs torch.optim.Muon | peak memory growth |")
    print("| --- | --- | --- | --- |")
    for name, label in NAMES.items():
        print(f"| {label} | {med[name] * 1e3:.0f} ms | {med[name] / med['torch']:.2f}x | {peaks[name]:.0f} MiB |")


if __name__ == "__main__":
    main()
