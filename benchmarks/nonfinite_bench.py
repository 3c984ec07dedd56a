"""What ``skip_nonfinite(updates=true)`` costs per step (``docs/reliability.md``).

    .venv/bin/python benchmarks/nonfinite_bench.py [--sizes 100K,10M] [--backends compiled,eager] [--rounds 11]

For each size (1 large + 50 small float32 tensors, ``gradpipe.bench.layout_shapes``) and
backend, two pipelines, each with and without the option: ``adam``, and a pipeline whose own
arithmetic can divide by zero (the gradient normalised per tensor, then Adam). The four
optimizers and torch's fused Adam step the same parameters in interleaved rounds (a change
in the machine's load hits all alike) and the medians are reported: each pipeline with the
option as a ratio to the same pipeline without it, and every one as a ratio to fused Adam.
Every step is finite (the cost of the check and the copies, not of an undo). Prints
Markdown rows for ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import gradpipe
from gradpipe.bench import machine_info, parse_size
from prelude_bench import _params  # the same 1 + 50 tensors, gradients preset (this folder is on sys.path)

#: name -> pipeline text, with {policy} where the policy op goes
PIPELINES = {
    "adam": "grad | {policy} | adam",
    "grad / norm(grad) | adam": "let g = grad / norm(grad, over=tensor)\ng | {policy} | adam",
}
POLICIES = {"off": "skip_nonfinite", "on": "skip_nonfinite(updates=true)"}


def run(size: str, backend: str, rounds: int, steps: int) -> list[str]:
    n = parse_size(size)
    opts: dict[tuple[str, str], torch.optim.Optimizer] = {("torch fused Adam", ""): torch.optim.Adam(
        _params(n), lr=1e-3, fused=True)}
    for name, text in PIPELINES.items():
        for mode, policy in POLICIES.items():
            opts[(name, mode)] = gradpipe.Optimizer(_params(n), text.format(policy=policy), backend=backend, lr=1e-3)
    for opt in opts.values():  # compile and warm up
        for _ in range(3):
            opt.step()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for key, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[key].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    fused = med[("torch fused Adam", "")]
    rows = []
    for name in PIPELINES:
        off, on = med[(name, "off")], med[(name, "on")]
        rows.append(f"| {size} | {backend} | {name} | {off * 1e3:.2f} | {on * 1e3:.2f} | {on / off:.2f}x | "
                    f"{off / fused:.2f}x | {on / fused:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100K,10M")
    ap.add_argument("--backends", default="compiled,eager")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {datetime.date.today()}, {info.get('cpu', '')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds of {args.steps} steps")
    print("| params | backend | pipeline | step, off (ms) | step, updates=true (ms) | on / off | off vs fused Adam "
          "| on vs fused Adam |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        for backend in args.backends.split(","):
            for row in run(size, backend, args.rounds, args.steps):
                print(row, flush=True)


if __name__ == "__main__":
    main()
