"""Fuzz the parser, compiler and formatter for a given number of minutes.

    python benchmarks/fuzz_nightly.py --minutes 30            # every strategy, random seeds
    python benchmarks/fuzz_nightly.py --minutes 5 --strategies mutants,soup
    python benchmarks/fuzz_nightly.py --replay fuzz-out/failures/mutants-1a2b3c4d.grad

It runs the Hypothesis strategies and the oracle of ``tests/test_fuzz.py``
(see that file for what is checked) in batches, each with a fresh random
seed, until the time is up. A batch that finds a failure shrinks it to a
small example and saves it under ``OUT/failures/`` as a ``.grad`` file (the
exact text, UTF-8) next to a ``.txt`` with the error, the strategy, the seed
and the command that replays it. A case that runs longer than
``--case-seconds`` is saved under ``OUT/slow/`` (a small input that takes long
to compile is a denial of service). ``OUT/summary.json`` and
``OUT/summary.md`` count the cases and outcomes per strategy.

Exit status: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import pathlib
import random
import signal
import sys
import time
import traceback
from collections import Counter
from typing import Any, Iterator

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import test_fuzz  # noqa: E402  (tests/test_fuzz.py: the strategies and the oracle)


class CaseTimeout(Exception):
    """One case ran longer than --case-seconds."""


class OutOfTime(BaseException):
    """The run's time is up (a BaseException: Hypothesis lets it through, even while shrinking)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in this (main) thread after ``seconds`` (POSIX; no limit elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"a case ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _signature(exc: BaseException) -> str:
    """What identifies a bug: the exception type and the first line of its message, digits dropped."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {''.join('#' if c.isdigit() else c for c in first)[:160]}"


def _save(folder: pathlib.Path, name: str, text: str, note: str) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{_digest(text)}.grad"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    path.with_suffix(".txt").write_text(note + f"\nreplay: python benchmarks/fuzz_nightly.py --replay {path}\n")
    return path


def run_batch(name: str, batch_seed: int, examples: int, case_seconds: float, out: pathlib.Path,
              stats: dict[str, Any], hard_deadline: float) -> None:
    """One Hypothesis run of ``examples`` cases of strategy ``name`` with seed ``batch_seed``.

    A failure is shrunk until ``hard_deadline`` (time.monotonic()); the smallest
    failing text seen is saved either way."""
    strategy = test_fuzz.STRATEGIES[name]
    counts: Counter = stats["outcomes"].setdefault(name, Counter())
    smallest: dict[str, Any] = {}

    @seed(batch_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              report_multiple_bugs=False, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def case(text: str) -> None:
        if time.monotonic() > hard_deadline:
            raise OutOfTime
        start = time.perf_counter()
        try:
            with _time_limit(case_seconds):
                outcome = test_fuzz.check_source(text)
        except CaseTimeout:
            saved = _save(out / "slow", name, text, f"strategy {name}, seed {batch_seed}: longer than "
                                                    f"{case_seconds:g} s")
            stats["slow"].append(str(saved))
            counts["slow"] += 1
            return
        except Exception as exc:  # noqa: BLE001 - remember the smallest failure, let Hypothesis shrink it
            if "text" not in smallest or len(text) < len(smallest["text"]):
                smallest.update(text=text, exc=exc)
            raise
        elapsed = time.perf_counter() - start
        if elapsed > stats["slowest"][0]:
            stats["slowest"] = [elapsed, name, _digest(text)]
        counts[outcome] += 1

    try:
        case()
    except OutOfTime:
        pass
    except Exception:  # noqa: BLE001 - the oracle failed (the smallest case is saved below)
        pass
    if smallest:
        exc, text = smallest["exc"], smallest["text"]
        sig = _signature(exc)
        note = (f"strategy {name}, seed {batch_seed}\n{sig}\n\n"
                + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:])
        saved = _save(out / "failures", name, text, note)
        stats["failures"].setdefault(sig, []).append(str(saved))
        counts["failed"] += 1
        print(f"  FAILED ({name}, seed {batch_seed}): {sig}\n    saved {saved}", flush=True)


def write_summary(out: pathlib.Path, stats: dict[str, Any], seconds: float) -> None:
    summary = {
        "seconds": round(seconds, 1),
        "cases": {k: sum(v.values()) for k, v in stats["outcomes"].items()},
        "outcomes": {k: dict(v) for k, v in stats["outcomes"].items()},
        "batches": stats["batches"],
        "failures": stats["failures"],
        "slow": stats["slow"],
        "slowest_case_seconds": round(stats["slowest"][0], 3),
        "slowest_case": stats["slowest"][1:],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# gradpipe fuzzing: {seconds / 60:.1f} min, {sum(summary['cases'].values()):,} cases, "
             f"{stats['batches']} batches", "",
             "| strategy | cases | compiled | rejected | syntax | slow | failed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in summary["outcomes"].items():
        lines.append(f"| {k} | {sum(v.values()):,} | {v.get('compiled', 0):,} | {v.get('rejected', 0):,} | "
                     f"{v.get('syntax', 0):,} | {v.get('slow', 0)} | {v.get('failed', 0)} |")
    lines += ["", f"slowest case: {summary['slowest_case_seconds']} s ({' '.join(map(str, summary['slowest_case']))})",
              "", f"## failures ({len(stats['failures'])} distinct)", ""]
    lines += [f"- `{sig}`: {', '.join(paths)}" for sig, paths in stats["failures"].items()] or ["none"]
    lines += ["", f"## slow cases ({len(stats['slow'])})", ""] + ([f"- {p}" for p in stats["slow"]] or ["none"])
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def replay(paths: list[str]) -> int:
    status = 0
    for p in paths:
        text = pathlib.Path(p).read_bytes().decode("utf-8", "surrogatepass")
        try:
            print(f"{p}: {test_fuzz.check_source(text)}")
        except Exception:  # noqa: BLE001
            status = 1
            print(f"{p}: FAILED")
            traceback.print_exc()
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--strategies", default=",".join(test_fuzz.STRATEGIES),
                    help=f"comma-separated, from {', '.join(test_fuzz.STRATEGIES)} (default all)")
    ap.add_argument("--examples", type=int, default=300, help="cases per batch (default 300)")
    ap.add_argument("--case-seconds", type=float, default=20.0,
                    help="a case slower than this is saved as slow (default 20; 0: no limit)")
    ap.add_argument("--shrink-seconds", type=float, default=120.0,
                    help="time allowed past --minutes to shrink a failure found late (default 120)")
    ap.add_argument("--seed", type=int, help="seed of the batch seeds (default: random)")
    ap.add_argument("--out", default="fuzz-out", help="output folder (default ./fuzz-out)")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="run the oracle on saved cases and exit")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in test_fuzz.STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies: {', '.join(unknown)}")
    out = pathlib.Path(args.out)
    master = random.Random(args.seed)
    stats: dict[str, Any] = {"outcomes": {}, "failures": {}, "slow": [], "batches": 0, "slowest": [0.0, "", ""]}
    start = time.monotonic()
    deadline = start + args.minutes * 60
    print(f"fuzzing {', '.join(names)} for {args.minutes:g} min -> {out}/", flush=True)
    try:
        while time.monotonic() < deadline:
            for name in names:
                if time.monotonic() >= deadline:
                    break
                run_batch(name, master.getrandbits(64), args.examples, args.case_seconds, out, stats,
                          deadline + args.shrink_seconds)
                stats["batches"] += 1
            write_summary(out, stats, time.monotonic() - start)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    write_summary(out, stats, time.monotonic() - start)
    print((out / "summary.md").read_text())
    return 1 if stats["failures"] or stats["slow"] else 0


if __name__ == "__main__":
    sys.exit(main())
