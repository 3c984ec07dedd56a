"""The matrix optimizers against their peers on a transformer's matrix shapes.

    .venv/bin/python benchmarks/matrix_bench.py [--layers 6] [--width 384] [--rounds 5]

The hidden matrices of ``--layers`` transformer blocks of width ``--width`` (per block the
attention's q, k, v and output projections, ``w×w``, and the MLP's ``w×4w`` and ``4w×w``),
in float32 on the CPU, with fixed gradients. Two groups, each timed in interleaved rounds
(so that a change in the machine's load hits every optimizer alike) and reported as median
step times and ratios to the group's first row:

* Muon: ``torch.optim.Muon``; ``pipelines/muon.grad`` (one matrix at a time, as torch:
  ``batch=none``, bit for bit); the same file with ``batch=shape`` (matrices of one shape
  orthogonalised in one batched call); heavyball's ``Muon`` where heavyball installs.
* SOAP: pytorch-optimizer's ``SOAP`` (the parity reference); ``pipelines/soap.grad``;
  heavyball's ``SOAP`` where it installs.

Peak memory is measured in a fresh process per optimizer: the peak growth of the resident
set size from the optimizer's construction through a few steps (sampled every millisecond),
over the parameters and gradients already built; it includes what compiling allocates.
Prints Markdown tables for ``docs/benchmarks.md``.
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
from typing import Any, Callable

import torch

import gradpipe
from gradpipe.bench import machine_info
from gradpipe.compiler.program import builtin_dir



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


def _gradpipe(file: str, batched: bool = False) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        path = builtin_dir() / file
        source = path.read_text()
        if batched:
            source = source.replace("batch=none", "batch=shape")
        return gradpipe.Optimizer(ps, gradpipe.compile(source, str(path)), lr=0.02 if "muon" in file else 3e-3)
    return make


def _heavyball(name: str, **kw: Any) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None:
    try:
        import heavyball
    except ImportError:
        return None
    return lambda ps: getattr(heavyball, name)(ps, **kw)


def _pytorch_optimizer_soap(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP
    return SOAP(ps, lr=3e-3)


#: group -> (label, factory); the first row of a group is what the others are compared with
GROUPS: dict[str, dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None]] = {
    "muon": {
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
        "muon.grad (batch=none, as torch)": _gradpipe("muon.grad"),
        "muon.grad with batch=shape": _gradpipe("muon.grad", batched=True),
        "heavyball Muon": _heavyball("Muon", lr=0.02),
    },
    "soap": {
        "pytorch-optimizer SOAP": _pytorch_optimizer_soap,
        "soap.grad": _gradpipe("soap.grad"),
        "heavyball SOAP": _heavyball("SOAP", lr=3e-3),
    },
}


def make(label: str, ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    for group in GROUPS.values():
        if label in group and group[label] is not None:
            opt = group[label](ps)  # type: ignore[misc]
            opt._bench_grads = [(p, p.grad) for p in ps]  # type: ignore[attr-defined]
            return opt
    raise KeyError(label)


def step(opt: torch.optim.Optimizer) -> None:
    """One step on the fixed gradients, set again first: heavyball frees ``p.grad`` in its step."""
    for p, g in opt._bench_grads:  # type: ignore[attr-defined]
        p.grad = g
    opt.step()


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
        step(opt)
    done.set()
    t.join()
    print((max(peak[0], _rss()) - base) / 2 ** 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed block")
    ap.add_argument("--groups", default="muon,soap")
    ap.add_argument("--peak", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        peak_memory(args.peak, args.layers, args.width, args.steps + 2)
        return
    n = sum(a * b for a, b in shapes(args.layers, args.width))
    info = machine_info()
    print(f"<!-- {info['date']}, {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {args.layers} layers "
          f"of width {args.width} ({len(shapes(args.layers, args.width))} matrices, {n / 1e6:.1f}M parameters), "
          f"float32, {args.rounds} rounds of {args.steps} steps -->")
    for group in args.groups.split(","):
        labels = [label for label, f in GROUPS[group].items() if f is not None]
        torch.manual_seed(0)
        opts = {label: make(label, params(args.layers, args.width)) for label in labels}
        for opt in opts.values():  # compile and warm up
            for _ in range(2):
                step(opt)
        times: dict[str, list[float]] = {label: [] for label in labels}
        for _ in range(args.rounds):
            for label, opt in opts.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(opt)
                times[label].append((time.perf_counter() - t0) / args.steps)
        del opts
        med = {label: statistics.median(ts) for label, ts in times.items()}
        peaks = {}
        for label in labels:
            out = subprocess.run([sys.executable, __file__, "--peak", label, "--layers", str(args.layers), "--width",
                                  str(args.width), "--steps", str(args.steps)], capture_output=True, text=True,
                                 check=True)
            peaks[label] = float(out.stdout.strip().splitlines()[-1])
        first = labels[0]
        print()
        print(f"| optimizer | step (median) | vs {first} | peak memory growth |")
        print("| --- | --- | --- | --- |")
        for label in labels:
            print(f"| {label} | {med[label] * 1e3:.0f} ms | {med[label] / med[first]:.2f}x | {peaks[label]:.0f} MiB |")


if __name__ == "__main__":
    main()
