"""The full optimizer-step benchmark: every size, layout and pipeline of the spec.

    .venv/bin/python benchmarks/step_bench.py                 # the full run (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/step_bench.py --sizes 100K,1M # a part of it

Writes ``benchmarks/results/<device>-<date>.json`` (every measurement, the machine, the
bandwidth), ``<same>.md`` (the tables and the targets check) and a plot
``docs/benchmarks_cpu.png`` (when matplotlib is installed). The engine is
:mod:`gradpipe.bench`; ``gradpipe bench`` runs the same code from the command line.

Compilation is measured cold: unless ``--warm-cache`` is given, Inductor's on-disk cache
is pointed at a fresh temporary folder before torch is imported, and each compiled case
starts from ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: the main grid: the spec's sizes, two layouts, every pipeline on both backends
FULL = {"sizes": ("100K", "1M", "10M", "100M"), "layouts": ("1+50", "model")}
#: compile time with 500 tensors (the spec's second first-step target); 2M, a size the
#: main grid does not use, so no compiled graph of the same shapes is cached already
MANY_TENSORS = {"sizes": ("2M",), "layouts": ("1+499",)}
#: sizes of the flat-bucket cost breakdown (layout 1+50)
STORAGE_SIZES = ("100K", "10M", "100M")


def _measure_storage(bench: Any, threads: int) -> dict[str, dict[str, float]]:
    storage = {}
    for size in STORAGE_SIZES:
        storage[size] = bench.storage_costs(size, "1+50", threads=threads)
        print(f"storage costs at {size}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in storage[size].items()
                                                       if k.endswith("_s")), flush=True)
    return storage


def _bandwidth_range(rows: list[dict[str, Any]]) -> str:
    import statistics
    bws = [r["bandwidth_gbs"] for r in rows if r.get("bandwidth_gbs")]
    return f"{min(bws):.0f} to {max(bws):.0f}, median {statistics.median(bws):.0f}" if bws else "-"


def _storage_markdown(storage: dict[str, dict[str, float]]) -> str:
    """The flat-bucket cost breakdown as a Markdown table (ms, and relative to fused Adam)."""
    lines = ["## Flat-bucket storage, part by part (layout 1+50)\n",
             "Median times, and in brackets relative to torch fused Adam on the same tensors "
             "(`gradpipe.bench.storage_costs`).\n",
             "| size | fused Adam | one pass (flat p, g, m, v) | gather grads (reused / fresh buffer) "
             "| kernel g,m,v -> m,v,u | apply p -= lr u | gather + kernel + apply "
             "| one pass, b**step in kernel, f64 / f32 | compile |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, c in storage.items():
        f = c["fused_s"]
        cell = lambda k: f"{c[k] * 1e3:.3g} ms ({c[k] / f:.2f}x)"  # noqa: E731
        lines.append(f"| {size} | {f * 1e3:.3g} ms | {cell('ideal_s')} | {cell('gather_s')} / {cell('gather_alloc_s')} | "
                     f"{cell('kernel_s')} | {cell('apply_s')} | {cell('gather_kernel_apply_s')} | "
                     f"{cell('ideal_pow_s')} / {cell('ideal_pow_f32_s')} | {c['compile_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: pathlib.Path) -> bool:
    """Step time relative to torch fused Adam against the parameter count, one panel per layout."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    layouts = [lay for lay in FULL["layouts"] if any(r["layout"] == lay for r in rows)]
    if not layouts:
        return False
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 4.8), squeeze=False, sharey=True)
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["status"] == "ok"))
    cmap = plt.get_cmap("tab10")
    pipes = list(dict.fromkeys(r["pipeline"] for r in rows if r["library"] == "gradpipe"))
    for ax, lay in zip(axes[0], layouts):
        for impl in impls:
            rs = sorted((r for r in rows if r["impl"] == impl and r["layout"] == lay and r["status"] == "ok"),
                        key=lambda r: r["n_params"])
            if not rs:
                continue
            r0 = rs[0]
            if r0["library"] == "gradpipe":
                color = cmap(pipes.index(r0["pipeline"]) % 10)
                style = "-" if r0["backend"] == "compiled" else ":"
                marker = "o" if r0["backend"] == "compiled" else "x"
            else:
                color, style, marker = "black", {"fused": "-", "foreach": "--"}.get(r0["backend"], ":"), "s"
            ax.plot([r["n_params"] for r in rs], [r["ratio_to_fused"] for r in rs], style, marker=marker,
                    color=color, label=impl, linewidth=1.4, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("parameters")
        ax.set_title(f"layout {lay}" + (" (GPT-2-style shapes)" if lay == "model" else " (1 large + 50 small tensors)"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("step time / torch fused Adam step time")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    m = rows[0]
    fig.suptitle(f"optimizer step, CPU, {m['threads']} threads (solid: compiled, dotted: eager; lower is better)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", help="comma-separated sizes of the main grid (default 100K,1M,10M,100M)")
    ap.add_argument("--layouts", help="comma-separated layouts of the main grid (default 1+50,model)")
    ap.add_argument("--pipelines", help="comma-separated pipelines (default: all of the spec's)")
    ap.add_argument("--repeats", type=int, help="timed steps per case (default: 20 to 2M params, 7 to 20M, 3 above)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-many-tensors", action="store_true", help="skip the 500-tensor compile-time grid")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and Markdown")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks_cpu.png"), help="plot file ('' for none)")
    ap.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (compile times drop)")
    ap.add_argument("--from-json", metavar="RESULTS.json", help="only redo the Markdown and the plot from a run")
    ap.add_argument("--storage-only", metavar="RESULTS.json",
                    help="only measure the flat-bucket storage costs again, into that results file")
    args = ap.parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradpipe-bench-inductor-")
    if args.from_json:
        sys.path.insert(0, str(ROOT))
        render(args.from_json, args.plot)
        return 0
    if args.storage_only:
        import json
        sys.path.insert(0, str(ROOT))
        from gradpipe import bench
        path = pathlib.Path(args.storage_only)
        doc = json.loads(path.read_text())
        doc["storage_costs"] = _measure_storage(bench, args.threads)
        doc["storage_costs_machine"] = bench.machine_info()
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        render(path, args.plot)
        return 0

    sys.path.insert(0, str(ROOT))
    import torch

    from gradpipe import bench

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    sizes = split(args.sizes) or list(FULL["sizes"])
    layouts = split(args.layouts) or list(FULL["layouts"])
    pipelines = split(args.pipelines) or list(bench.PIPELINES)
    t0 = time.time()
    info = bench.machine_info()  # before the run: the source hash of the code that is timed

    def progress(r: dict[str, Any]) -> None:
        t = r.get("step_s")
        what = (f"{t * 1e3:9.3f} ms  {r['ratio_to_fused']:6.2f}x  first 2 steps {r['first_two_s']:.2f} s"
                if t is not None else f"{r['status']} {r.get('error') or ''}")
        print(f"[{time.time() - t0:7.1f}s] {r['size']:>5} {r['layout']:>6} {r['impl']:<36} {what}", flush=True)

    # the first torch.compile of a process pays once for importing and warming up Inductor
    # and the C++ toolchain; measured apart, so that each case's compile time is its own
    t1 = time.perf_counter()
    torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(8))
    first_compile_s = time.perf_counter() - t1
    print(f"first torch.compile in this process (one-time): {first_compile_s:.2f} s", flush=True)

    # a shared machine: time a case again (up to 4 times, pausing 3 s) when the fused-Adam
    # blocks around it disagree, i.e. when other processes took the cores meanwhile
    noise = {"retries": 4, "retry_sleep_s": 3.0}
    rows = bench.run_bench(sizes, pipelines, ("eager", "compiled"), layouts, args.repeats, args.threads,
                           progress=progress, **noise)
    if not args.no_many_tensors:
        rows += bench.run_bench(MANY_TENSORS["sizes"], pipelines, ("compiled",), MANY_TENSORS["layouts"],
                                args.repeats, args.threads, baselines=("fused",), others=False, progress=progress,
                                **noise)

    storage = _measure_storage(bench, args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = f"{device}-{datetime.date.today().isoformat()}"
    out = pathlib.Path(args.out)
    samples = list(dict.fromkeys(tuple(r["bandwidth_samples_gbs"]) for r in rows))
    bw = {"best_gbs": max(r["run_bandwidth_gbs"] for r in rows), "samples_gbs": [x for t in samples for x in t]}
    config = {"sizes": sizes, "layouts": layouts, "pipelines": pipelines, "repeats": args.repeats,
              "threads": args.threads, "many_tensors": None if args.no_many_tensors else MANY_TENSORS,
              "cold_compile": not args.warm_cache, "first_compile_s": first_compile_s, "wall_s": time.time() - t0}
    jpath = bench.write_json(out / f"{stem}.json", rows, bw, config, {"storage_costs": storage}, machine=info)
    print(f"wrote {jpath}")
    render(jpath, args.plot)
    return 0


def render(json_path: str | os.PathLike[str], plot: str | None) -> None:
    """The Markdown report (next to the JSON) and the plot, from a results JSON."""
    import json

    from gradpipe import bench
    jpath = pathlib.Path(json_path)
    doc = json.loads(jpath.read_text())
    info, config, rows = doc["machine"], doc["config"], doc["results"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    md = [f"# Optimizer-step benchmark, {info['date']}\n",
          f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}, "
          f"{config['threads']} threads; streaming bandwidth (a += b, 256 MB buffers) measured next to every "
          f"case: {_bandwidth_range(rows)} GB/s (each case's roofline uses its own); "
          f"{'cold' if config.get('cold_compile') else 'warm'} Inductor cache; "
          f"wall time {config['wall_s'] / 60:.1f} min; gradpipe sources sha256 {info.get('gradpipe_source_sha256')}."
          + (f" The first `torch.compile` of the process (a trivial function, before any case) took "
             f"{config['first_compile_s']:.2f} s, paid once per process and not counted in the cases."
             if config.get("first_compile_s") is not None else "") + "\n",
          *[part for lay in layouts for part in (
              f"## Step time / torch fused Adam, layout {lay}\n", bench.pivot_markdown(rows, lay),
              f"## % of roofline, layout {lay}\n", bench.pivot_markdown(rows, lay, "roofline_pct", "{:.0f}%"),
              f"## Building the optimizer + first 2 steps, layout {lay}\n",
              bench.pivot_markdown(rows, lay, "startup_s", "{:.2f} s"))],
          "## Every case\n", bench.to_markdown(rows), "## Targets\n", bench.targets_markdown(rows)]
    if doc.get("storage_costs"):
        md.append(_storage_markdown(doc["storage_costs"]))
        again = doc.get("storage_costs_machine")
        if again:
            md.append(f"(Measured again with `--storage-only` at {again['date']}, gradpipe sources sha256 "
                      f"{again.get('gradpipe_source_sha256')}.)\n")
    mpath = jpath.with_suffix(".md")
    mpath.write_text("\n".join(md))
    print(f"wrote {mpath}")
    if plot and _plot(rows, pathlib.Path(plot)):
        print(f"wrote {plot}")


if __name__ == "__main__":
    sys.exit(main())
