"""The ``gradpipe`` command line.

    gradpipe check FILE|DIR...        report every problem (pipelines and libraries), exit 1 if any
    gradpipe fmt [--check] [--diff] FILE|DIR...  rewrite files in canonical form (--diff: print, write nothing)
    gradpipe explain FILE|NAME        nodes, state bytes, reductions, optimisations
    gradpipe graph FILE|NAME -o out.svg|png|dot
    gradpipe diff A B                 structural difference of two pipelines; exit 1 if they differ
    gradpipe ops                      the op library
    gradpipe bench [--quick] ...      time optimizer steps against torch.optim.Adam
    gradpipe bench --peers ...        the same next to torch, heavyball and pytorch-optimizer peers
    gradpipe train FILE|NAME --task T one training run, recorded in MLflow
    gradpipe compare FILE|NAME|DIR... pipelines x seeds x grid as a Prefect flow, ranked
    gradpipe search --task T --seed-pipelines adam,sgd --budget N  evolve new pipelines (MLflow, resumable)
    gradpipe serve DIR --cron "..."   a Prefect deployment re-running the comparison on a schedule
    gradpipe ui                       the MLflow UI on 127.0.0.1
    gradpipe demo                     compare the standard and seed pipelines on digits

A mistake in a `.grad` file is printed as ``path:line:col: error: ...`` with the
line and a caret, never as a Python traceback.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys
from typing import Sequence

__all__ = ["main"]


def _grad_files(targets: Sequence[str]) -> tuple[list[pathlib.Path], list[str]]:
    files: list[pathlib.Path] = []
    missing: list[str] = []
    for t in targets:
        p = pathlib.Path(t)
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*.grad") if x.is_file()))
        elif p.exists() or p.suffix == ".grad":
            files.append(p)
        else:
            missing.append(t)
    return files, missing


def _resolve(target: str):
    """A Program from a file path or a built-in name."""
    import gradpipe
    return gradpipe.load(target)


def cmd_check(args: argparse.Namespace) -> int:
    """Check pipeline files, library files (definitions only, imported by pipelines: every
    definition is checked) and built-in names; exit 1 if any has an error."""
    from .compiler.program import Library, check_file
    from .dsl.diagnostics import GradError
    files, missing = _grad_files(args.paths)
    bad = libraries = 0
    for target in [*missing, *files]:  # a missing path may be a built-in name, fine to check too
        try:
            checked = check_file(target)
        except GradError as e:
            print(e, file=sys.stderr)
            bad += 1
        else:
            libraries += isinstance(checked, Library)
    total = len(files) + len(missing)
    if bad:
        print(f"{bad} of {total} file(s) have errors", file=sys.stderr)
        return 1
    print(f"ok: {total} file(s) checked" + (f" ({libraries} of them library file(s))" if libraries else ""))
    return 0


def _unified_diff(text: str, new: str, name: str) -> str:
    """The unified diff from ``text`` to ``new``, as ``patch`` reads it (a last line without a
    newline is marked so)."""
    lines = difflib.unified_diff(text.splitlines(True), new.splitlines(True), name, f"{name} (formatted)")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def cmd_fmt(args: argparse.Namespace) -> int:
    """Rewrite files in canonical form. ``--check``: write nothing, exit 1 if a file would
    change. ``--diff``: write nothing, print the unified diff of each file that would change,
    exit 1 if one would (0 if none would). Exit 1 on a file that cannot be formatted."""
    from .dsl.diagnostics import GradError
    from .dsl.formatter import format_source
    from .dsl.parser import read_source
    if args.paths == ["-"]:
        text = sys.stdin.read()
        try:
            new = format_source(text, "<stdin>")
        except GradError as e:
            print(e, file=sys.stderr)
            return 1
        if not (args.check or args.diff):
            sys.stdout.write(new)
            return 0
        if new != text:
            if args.diff:
                sys.stdout.write(_unified_diff(text, new, "<stdin>"))
            else:
                print("would reformat <stdin>")
            return 1
        return 0
    files, missing = _grad_files(args.paths)
    status = 0
    for m in missing:
        print(f"{m}: no such file or directory", file=sys.stderr)
        status = 1
    # --diff alone: stdout carries the diff and nothing else (it can go to `patch`)
    note = sys.stderr if args.diff and not args.check else sys.stdout
    changed = 0
    for f in files:
        try:
            text = read_source(f)
            new = format_source(text, str(f))
        except GradError as e:
            print(e, file=sys.stderr)
            status = 1
            continue
        if new == text:
            continue
        changed += 1
        if args.check or args.diff:
            print(f"would reformat {f}", file=note)
            if args.diff:
                sys.stdout.write(_unified_diff(text, new, str(f)))
        else:
            f.write_text(new)
            print(f"reformatted {f}")
    if (args.check or args.diff) and changed:
        status = 1
    if not changed and status == 0:
        print(f"{len(files)} file(s) already formatted", file=note)
    return status


def cmd_explain(args: argparse.Namespace) -> int:
    sys.stdout.write(_resolve(args.target).explain())
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    prog = _resolve(args.target)
    out = pathlib.Path(args.output) if args.output else pathlib.Path(f"{prog.name}.svg")
    try:
        prog.draw(out)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"gradpipe graph: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Exit status as diff(1): 0 when the pipelines have the same structure, 1 when they
    differ, 2 when one cannot be loaded."""
    from .compiler.diff import diff_programs
    from .dsl.diagnostics import GradError
    try:
        a, b = _resolve(args.a), _resolve(args.b)
    except GradError as e:
        print(e, file=sys.stderr)
        return 2
    d = diff_programs(a, b, a_label=args.a, b_label=args.b)
    sys.stdout.write(d.to_json() + "\n" if args.json else d.to_text())
    return 0 if d.is_empty else 1


def cmd_ops(args: argparse.Namespace) -> int:
    from .compiler.ops import OPS
    from .docs_ops import signature
    from .compiler.prims import SUMMARIES
    for name in sorted(OPS):
        op = OPS[name]
        print(f"{signature(op)}\n    {op.summary}  [{op.reference}]")
    print("\nmath functions and operators, reductions and shape values (docs/language.md, sections 5.4 "
          "and 5.13):")
    for form, summary in SUMMARIES.items():
        print(f"  {form}\n      {summary}")
    return 0




def _bench_options(args: argparse.Namespace) -> dict:
    """``gradpipe bench``'s sizes, pipelines, backends, layouts and repeats from the flags and
    the mode's defaults (``--quick``, ``--peers``); ``ValueError`` on a bad size, layout or backend."""
    from . import bench
    from .runtime.optimizer import BACKENDS
    sizes, repeats = (["100K"], 3) if args.quick else (["1M", "10M"] if args.peers else list(bench.SIZES), None)
    pipelines = bench.PEER_PIPELINES if args.peers else ("adam", "diffgrad") if args.quick else bench.PIPELINES
    opts = {"sizes": _csv(args.sizes) or sizes, "pipelines": _csv(args.pipelines) or list(pipelines),
            "backends": _csv(args.backends) or (["compiled"] if args.peers else ["eager", "compiled"]),
            "layouts": _csv(args.layouts) or ["1+50"],
            "repeats": args.repeats if args.repeats is not None else repeats}
    for s in opts["sizes"]:
        bench.parse_size(s)
    for lay in opts["layouts"]:
        bench.layout_shapes(10**6, lay)
    bad = [b for b in opts["backends"] if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backend {bad[0]!r}: choose from {', '.join(BACKENDS)}")
    peers = None if args.peers in (None, "all") else _csv(args.peers)
    bench.check_peer_keys(peers or ())
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
    return {**opts, "peers": peers}


def cmd_bench(args: argparse.Namespace) -> int:
    """Time optimizer steps; with ``--peers`` next to torch's, heavyball's and
    pytorch-optimizer's implementations of the same algorithms."""
    from . import bench
    try:
        o = _bench_options(args)
    except ValueError as e:
        print(f"gradpipe bench: {e}", file=sys.stderr)
        return 2
    for name in o["pipelines"]:
        _resolve(name)  # a typo is a GradError, before any timing

    def progress(row: dict) -> None:
        if args.verbose:
            t = row.get("step_s")
            print(f"  {row['size']} {row['layout']} {row['impl']}: "
                  + (f"{t * 1e3:.3f} ms" if t is not None else row["status"]), file=sys.stderr, flush=True)

    common = dict(threads=args.threads or None, out_json=args.json, retries=args.retries, device=args.device,
                  bandwidth_mb=args.bandwidth_mb or (64 if args.quick else 256), progress=progress)
    grid = (o["sizes"], o["pipelines"], o["backends"], o["layouts"], o["repeats"])
    if args.peers:
        rows = bench.run_peers(*grid, peers=o["peers"], **common)
        table = bench.peers_markdown(rows)
    else:
        rows = bench.run_bench(*grid, **common)
        table = bench.to_markdown(rows)
    sys.stdout.write(table)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table if args.peers else table + "\n" + bench.targets_markdown(rows))
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = argparse.ArgumentParser(prog="gradpipe", description="Optimizers as pipelines of gradient transforms.")
    ap.add_argument("--version", action="version", version=f"gradpipe {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="report every problem in .grad files; exit 1 if any",
                       description="Check .grad files, folders (every *.grad below them) and built-in names. "
                       "A pipeline file is compiled as Optimizer(...) would compile it; a library file (only "
                       "import, hparam, let and def lines, meant to be imported) has every definition "
                       "checked. Exit 1 if any file has an error (an empty file is one).")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("fmt", help="rewrite .grad files in canonical form")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="files or folders; '-' formats stdin to stdout")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    p.add_argument("--diff", action="store_true",
                   help="change nothing; print a unified diff of each file that would change (on stdout, "
                   "nothing else there without --check); exit 1 if a file would change, 0 if none would, "
                   "as with --check (black --diff exits 0 unless --check is given too)")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("explain", help="nodes, state bytes per parameter, reductions, optimisations")
    p.add_argument("target", metavar="FILE|NAME")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("graph", help="draw the optimised graph (.svg, .png or .dot)")
    p.add_argument("target", metavar="FILE|NAME")
    p.add_argument("-o", "--output", help="output file; its suffix picks the format (default NAME.svg)")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("diff", help="structural difference of two pipelines (nodes, hyperparameters, routes, "
                       "state); exit 0 if none, 1 if they differ, 2 on errors")
    p.add_argument("a", metavar="A", help="a .grad file or a built-in name")
    p.add_argument("b", metavar="B", help="a .grad file or a built-in name")
    p.add_argument("--json", action="store_true", help="print the difference as JSON")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("ops", help="list the op library")
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("bench", help="time optimizer steps against torch.optim.Adam (a Markdown table)")
    p.add_argument("--quick", action="store_true", help="100K parameters, adam and diffgrad, 3 repeats")
    p.add_argument("--sizes", help="comma-separated parameter counts (default 100K,1M,10M,100M)")
    p.add_argument("--pipelines", help="comma-separated pipelines (default: the benchmark set)")
    p.add_argument("--backends", help="comma-separated gradpipe backends (default eager,compiled)")
    p.add_argument("--layouts", help="comma-separated layouts: 1+K (1 large, K small tensors), model (default 1+50)")
    p.add_argument("--repeats", type=int, help="timed steps per case (default: by size)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2; 0 keeps torch's)")
    p.add_argument("--bandwidth-mb", type=int, help="buffer size of the bandwidth measurements "
                   "(default 256; 64 with --quick)")
    p.add_argument("--retries", type=int, default=2,
                   help="time a case again when other processes slowed it (default 2)")
    p.add_argument("--peers", nargs="?", const="all", metavar="KEYS",
                   help="the peers table: torch Adam (for-loop, foreach, fused, torch.compile), torch Muon, "
                   "heavyball AdamW, Muon and SOAP and pytorch-optimizer DiffGrad and Grams next to the pipelines "
                   "(default adam,adamw,diffgrad,grams,muon,soap, compiled, at 1M,10M), as ratios to torch fused "
                   "Adam; a peer that does not import is a 'not installed' row. KEYS: a comma-separated subset "
                   "(torch_fused, torch_foreach, torch_forloop, torch_compile, torch_muon, heavyball_adamw, "
                   "heavyball_muon, heavyball_soap, pytorch_optimizer_diffgrad, pytorch_optimizer_grams)")
    p.add_argument("--device", default="cpu", help="where the parameters live: cpu (default) or cuda")
    p.add_argument("--json", metavar="OUT.json", help="write every measurement, the machine and the bandwidth")
    p.add_argument("--markdown", metavar="OUT.md", help="write the table (and, without --peers, the targets check)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each case as it finishes")
    p.set_defaults(func=cmd_bench)

    from .flows.commands import add_commands
    add_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from .dsl.diagnostics import GradError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:  # `gradpipe ops | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
