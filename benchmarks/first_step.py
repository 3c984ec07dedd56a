"""The first step of a fresh process: building the optimizer and taking one step, per cache state.

Every number is a new Python process. After ``import torch``, ``import gradpipe`` and making
the parameters (timed apart, and the same for every row), the child times building the
optimizer and its first step (gradients preset, as ``backward()`` leaves them). Rows:

* ``torch fused Adam``: ``torch.optim.Adam(fused=True)``, the reference a user compares with;
* ``cold``: the compiled backend with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``
  emptied before each run) and no gradpipe cache: everything traced and compiled;
* ``cold, Inductor used here before``: the same, after one ``torch.compile`` of ``x + 1`` in
  another process on the emptied cache: what a new pipeline costs on a machine where Inductor
  has run (its one-time probes of the compiler, which build a test library per vector
  extension, are then cached);
* ``Inductor cache``: Inductor's on-disk cache warm (a previous process compiled the same
  graphs): Dynamo still traces, Inductor loads its compiled code;
* ``GRADPIPE_CACHE_DIR, storing``: ``cold`` plus writing each segment's AOTInductor package
  (what the first process with the cache set pays, once);
* ``GRADPIPE_CACHE_DIR``: the packages on disk (``gradpipe/runtime/aot.py``): no tracing,
  no compiling.

    .venv/bin/python benchmarks/first_step.py                   # adam, 1M parameters in 51 tensors
    .venv/bin/python benchmarks/first_step.py --pipelines adam,diffgrad,scalpel --runs 3

Medians over ``--runs`` processes per row; results to
``benchmarks/results/first-step-<date>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import gradpipe
from gradpipe.bench import layout_shapes
t2 = time.perf_counter()
pipeline, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
params = [torch.randn(s, requires_grad=True) for _, s in layout_shapes(size, "1+50")]
for p in params:
    p.grad = torch.randn_like(p)
t3 = time.perf_counter()
if pipeline == "torch-fused-adam":
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
else:
    opt = gradpipe.Optimizer([(f"p{i}", p) for i, p in enumerate(params)], pipeline, backend="compiled")
t4 = time.perf_counter()
opt.step()
t5 = time.perf_counter()
from gradpipe.runtime import aot
print(json.dumps({"import_torch_s": t1 - t0, "import_gradpipe_s": t2 - t1, "build_s": t4 - t3,
                  "step1_s": t5 - t4, "first_step_s": t5 - t3, "aot": dict(aot.stats),
                  "dynamo_frames": dict(sys.modules["torch._dynamo.utils"].counters["frames"])
                  if "torch._dynamo.utils" in sys.modules else {}}))
"""

_PRIME = "import torch; torch.compile(lambda x: x + 1)(torch.ones(8))"

ROWS = ["cold", "cold, Inductor used here before", "Inductor cache", "GRADPIPE_CACHE_DIR, storing", "GRADPIPE_CACHE_DIR"]


def _child(pipeline: str, size: int, threads: int, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, pipeline, str(size), str(threads)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(pipelines: list[str], size: int, runs: int, threads: int) -> list[dict]:
    """Per pipeline and row, ``runs`` fresh processes; the rows of each run in the order above."""
    base = {k: v for k, v in os.environ.items() if k not in ("GRADPIPE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    base["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).resolve().parent.parent),
                                          base.get("PYTHONPATH", "")])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        ind, pkg = pathlib.Path(tmp, "inductor"), pathlib.Path(tmp, "gradpipe")
        env_ind = {**base, "TORCHINDUCTOR_CACHE_DIR": str(ind)}
        for r in range(runs):
            out.append({"pipeline": "torch-fused-adam", "row": "torch fused Adam", "run": r,
                        **_child("torch-fused-adam", size, threads, env_ind)})
        for pipe in pipelines:
            for r in range(runs):
                for row in ROWS:
                    if row.startswith("cold") or row == "GRADPIPE_CACHE_DIR, storing":
                        shutil.rmtree(ind, ignore_errors=True)
                    if row == "cold, Inductor used here before":
                        subprocess.run([sys.executable, "-c", _PRIME], env=env_ind, check=True, timeout=600)
                    if row == "GRADPIPE_CACHE_DIR, storing":
                        shutil.rmtree(pkg, ignore_errors=True)
                    env = {**env_ind, "GRADPIPE_CACHE_DIR": str(pkg)} if row.startswith("GRADPIPE") else env_ind
                    res = _child(pipe, size, threads, env)
                    out.append({"pipeline": pipe, "row": row, "run": r, **res})
                    print(f"  {pipe:10s} {row:28s} build+step {res['first_step_s']:7.2f} s  {res['aot']}",
                          file=sys.stderr)
    return out


def markdown(results: list[dict]) -> str:
    def med(rows: list[dict], k: str) -> float:
        return statistics.median(x[k] for x in rows)
    lines = ["| pipeline | caches | build + first step (s) | of which the step (s) |",
             "| --- | --- | ---: | ---: |"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for x in results:
        groups.setdefault((x["pipeline"], x["row"]), []).append(x)
    for (pipe, row), xs in groups.items():
        lines.append(f"| {pipe} | {row} | {med(xs, 'first_step_s'):.2f} | {med(xs, 'step1_s'):.2f} |")
    lines.append("")
    lines.append(f"Every process also imported torch ({med(results, 'import_torch_s'):.2f} s) and gradpipe "
                 f"({med(results, 'import_gradpipe_s'):.2f} s), medians, not in the table.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", default="adam")
    ap.add_argument("--size", type=int, default=1_000_000, help="parameters, layout 1+50")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    from gradpipe.bench import machine_info
    results = measure(args.pipelines.split(","), args.size, args.runs, args.threads)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = args.out or pathlib.Path(__file__).parent / "results" / f"first-step-{date}.json"
    path.write_text(json.dumps({"machine": machine_info(), "size": args.size, "threads": args.threads,
                                "results": results}, indent=1))
    print(markdown(results))
    print(f"\n(written to {path})")


if __name__ == "__main__":
    main()
