"""What a search leaves behind: its best programs as ``.grad`` files with their lineage.

Each of the top ``k`` programs is written as ``NN_<key>.grad``, formatted, with
a header of comments::

    # found by gradpipe search 5f0c..., seed 0
    # rank 1 of 3: score 0.8722 on digits (hidden=16, batch_size=32), best lr 0.001;
    #   funnel score 0.9111 on digits, best lr 0.001
    # lineage, from the seed pipeline (key: mutation, proxy score):
    #   3f2a91c4d0b1e6a7: seed adam, 0.8611
    #   9d0e...: set hparam lr default 0.001 -> 0.003, 0.8722

and beside it ``NN_<key>.diff.txt``, the ``gradpipe diff`` of the seed pipeline
it descends from against it. Both go to the parent run too (``top/``).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["Finalist", "lineage", "header", "write_top"]


@dataclass(frozen=True)
class Finalist:
    """A program of the top ``k``: its candidate, its proxy result and its funnel result (or None)."""

    candidate: Any
    score: float
    best_lr: float | None
    funnel_score: float | None = None
    funnel_best_lr: float | None = None


def lineage(key: str, by_key: Mapping[str, Any]) -> list[Any]:
    """The chain of candidates from a seed pipeline down to ``key`` (the seed first)."""
    chain = [by_key[key]]
    while chain[-1].parent is not None and chain[-1].parent in by_key and len(chain) <= len(by_key):
        chain.append(by_key[chain[-1].parent])
    return chain[::-1]


def _score(x: float | None) -> str:
    return "n/a" if x is None else ("failed" if not math.isfinite(x) else f"{x:.6g}")


def _task_text(task: str, options: Mapping[str, Any]) -> str:
    return task + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def header(f: Finalist, rank: int, total: int, chain: Sequence[Any], scores: Mapping[str, float],
           parent_run_id: str, config: Any) -> str:
    """The comment block at the top of a written program (see the module docstring)."""
    lr = f", best lr {f.best_lr:g}" if f.best_lr is not None else ""
    lines = [f"found by gradpipe search {parent_run_id}, seed {config.seed}",
             f"rank {rank} of {total}: score {_score(f.score)} on {_task_text(config.task, config.task_options)}"
             f" ({config.steps} steps){lr}"]
    if f.funnel_score is not None:
        flr = f", best lr {f.funnel_best_lr:g}" if f.funnel_best_lr is not None else ""
        lines.append(f"  funnel score {_score(f.funnel_score)} on "
                     f"{_task_text(config.funnel_task, config.funnel_options)} ({config.funnel_steps} steps){flr}")
    lines.append("lineage, from the seed pipeline (key: mutation, proxy score):")
    lines.extend(f"  {c.key}: {c.mutation}, {_score(scores.get(c.key))}" for c in chain)
    return "".join(f"# {line}\n".replace("\r", " ") for line in lines)


def write_top(finalists: Sequence[Finalist], by_key: Mapping[str, Any], scores: Mapping[str, float],
              parent_run_id: str, config: Any, out_dir: pathlib.Path, log: Any) -> list[pathlib.Path]:
    """Write the finalists (best first) into ``out_dir`` and log them on the parent run ``log``."""
    import gradpipe
    from ..compiler.diff import diff_programs
    from ..dsl.formatter import format_source
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, f in enumerate(finalists, 1):
        chain = lineage(f.candidate.key, by_key)
        text = format_source(header(f, rank, len(finalists), chain, scores, parent_run_id, config) + "\n"
                             + f.candidate.source)
        name = f"{rank:02d}_{f.candidate.key[:16]}"
        path = out_dir / f"{name}.grad"
        path.write_text(text)
        root = chain[0]
        seed_name = root.mutation.removeprefix("seed ").strip() if root.parent is None else root.key
        diff = diff_programs(gradpipe.compile(root.source, f"<seed {seed_name}>"), gradpipe.compile(text, str(path)),
                             a_label=f"seed {seed_name}", b_label=path.name).to_text()
        (out_dir / f"{name}.diff.txt").write_text(diff)
        log.text(text, f"top/{name}.grad")
        log.text(diff, f"top/{name}.diff.txt")
        written.append(path)
    return written
