"""Regularized evolution over `.grad` programs: :class:`Candidate` and :class:`Evolution`.

Method (Real et al. 2019, "Regularized Evolution for Image Classifier Architecture
Search", algorithm 1; the program search of Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms", section 2): the seeds are handed out first; every later
candidate is a mutant (:mod:`gradpipe.search.mutate`) of the winner of a tournament of
``tournament`` members drawn from the population, the ``population`` most recent candidates
with a finite score (older ones age out: the "regularized" part). A mutant is compiled: one
the compiler rejects is counted in :attr:`Evolution.invalid`, one whose key (the hash of
the program after the compiler's passes, :attr:`Program.structure_hash`) was handed out
before is counted in :attr:`Evolution.duplicates`, and either is drawn again.

Batches: candidates are asked ``batch`` at a time (the number of workers); every candidate
of batch ``k`` (indices ``k * batch`` ... ) draws its parent from the candidates of the
batches before it, which are all told when the flow tells a batch before asking the next.
So what ``ask`` returns depends only on ``seed``, the settings and the scores, never on
when they arrived.

Determinism: all randomness comes from ``random.Random`` instances seeded by strings made
of ``seed`` and the ask index (and the try), never from global state, time, or hash order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..compiler.program import Program, compile as compile_grad
from ..dsl import ast
from ..dsl.diagnostics import GradError
from ..dsl.formatter import format_module
from ..dsl.parser import parse
from .astpaths import size
from .mutate import MutationContext, mutate

__all__ = ["Candidate", "Evolution"]


@dataclass(frozen=True)
class Candidate:
    """One program handed out by :meth:`Evolution.ask`."""

    #: the program as formatted .grad text (gradpipe.dsl.formatter output, comments dropped); compiles
    source: str
    #: the hash of the program after the compiler's passes (:attr:`Program.structure_hash`)
    key: str
    #: the key of the candidate it was mutated from; None for a seed
    parent: str | None
    #: one readable line: "seed adam", "insert clip_norm(1.5) after ema(0.9)", ...
    mutation: str
    #: 0-based position in the order ``ask`` handed candidates out
    index: int


def _strip_comments(module: ast.Module) -> ast.Module:
    import dataclasses
    stmts = tuple(dataclasses.replace(st, comments=()) for st in module.stmts)
    return dataclasses.replace(module, stmts=stmts, trailing_comments=())


def compile_seed(name: str, text: str) -> tuple[ast.Module, Program]:
    """A seed's module (comments dropped) and program, compiled as :class:`Evolution`
    compiles it: from its text alone, named ``<seed NAME>`` (so an ``import`` finds no file;
    a GradError then). :func:`gradpipe.flows.search.make_config` checks the stored seeds with it."""
    module = _strip_comments(parse(text, f"<seed {name}>"))
    return module, compile_grad(format_module(module), f"<seed {name}>")


def _finite(score: float | None) -> bool:
    return score is not None and not math.isnan(score) and score != -math.inf


class Evolution:
    """Regularized evolution (Real et al. 2019, "Regularized Evolution for Image Classifier
    Architecture Search"; the program search of Chen et al. 2023, "Symbolic Discovery of
    Optimization Algorithms").

    ``seeds``: name -> .grad source, each must compile (else GradError); ``seed``: the RNG
    seed. ``batch``: how many candidates are asked before their scores are told (see the
    module docstring); ``max_nodes``: the size bound on programs (AST nodes), by default
    twice the largest seed's plus 20."""

    def __init__(self, seeds: Mapping[str, str], *, seed: int, population: int = 16,
                 tournament: int = 4, max_tries: int = 100, batch: int = 1,
                 max_nodes: int | None = None) -> None:
        if population < 1 or tournament < 1 or max_tries < 1 or batch < 1:
            raise ValueError("population, tournament, max_tries and batch must be at least 1")
        if not seeds:
            raise ValueError("give at least one seed pipeline")
        self.seed = seed
        self.population = population
        self.tournament = tournament
        self.max_tries = max_tries
        self.batch = batch
        self.invalid = 0
        self.duplicates = 0
        self._asked: list[Candidate] = []
        self._scores: dict[str, float] = {}
        self._by_key: dict[str, Candidate] = {}
        self._parsed: dict[str, tuple[ast.Module, Program]] = {}
        self._seeds: list[Candidate] = []
        self._reask: list[Candidate] = []
        for name, text in seeds.items():
            module, prog = compile_seed(name, text)
            self._seeds.append(Candidate(format_module(module), prog.structure_hash, None, f"seed {name}", -1))
            self._parsed.setdefault(prog.structure_hash, (module, prog))
        largest = max(size(m) for m, _ in self._parsed.values())
        self.max_nodes = max_nodes if max_nodes is not None else 2 * largest + 20
        self._next_seed = 0

    # ------------------------------------------------------------------ public
    @property
    def history(self) -> list[tuple[Candidate, float | None]]:
        """Every asked candidate, in ask order, with its score or None."""
        return [(c, self._scores.get(c.key)) for c in self._asked]

    @property
    def pending(self) -> tuple[Candidate, ...]:
        """The candidates ``ask`` hands out again before any new one: those a restored search
        made again because the record has no score for them (asked, never told)."""
        return tuple(self._reask)

    def ask(self) -> Candidate | None:
        """The next candidate (see the class docstring); None when ``max_tries`` draws gave
        nothing new."""
        if self._reask:
            return self._reask.pop(0)
        cand = self._generate(len(self._asked), None)
        if cand is not None:
            self._record(cand)
        return cand

    def tell(self, key: str, score: float) -> None:
        """The score of a candidate ``ask`` handed out (higher is better; nan or -inf: failed,
        never a parent)."""
        if key not in self._by_key:
            raise KeyError(f"no candidate with key {key!r} was asked; tell only keys that ask returned")
        self._scores[key] = float(score)

    @classmethod
    def restore(cls, seeds: Mapping[str, str], told: Sequence[tuple[Candidate, float]], *, seed: int,
                **kwargs: int) -> "Evolution":
        """Rebuild a search from the ``(candidate, score)`` pairs recorded so far, in ask order,
        without evaluating anything: each recorded candidate is made again from its recorded
        parent (which also gives the same invalid and duplicate counts) and checked against
        the record; an index missing from the record (asked, never told) is made again as the
        uninterrupted search made it, and ``ask`` hands those out again first.

        A pair whose score is None is a candidate asked and never scored whose key, parent and
        index were recorded (its ``source`` may be empty): it is made again from its recorded
        parent, checked by key, and handed out again first. Record a candidate that way where
        its score is lost but a later one's is not: an index missing from the record is made
        from the population the restore has then, which lacks the lost scores, so it can differ
        from what the uninterrupted search made."""
        evo = cls(seeds, seed=seed, **kwargs)
        by_index = {}
        for cand, score in told:
            if cand.index in by_index:
                raise ValueError(f"candidate {cand.index} is recorded twice")
            by_index[cand.index] = (cand, score)
        last = max(by_index, default=-1)
        missing = []
        for i in range(last + 1):
            rec = by_index.get(i)
            if rec is not None and rec[0].parent is not None and rec[0].parent not in evo._by_key:
                raise ValueError(f"recorded candidate {i}'s parent {rec[0].parent} was not asked before it: "
                                 f"give every recorded candidate, in ask order")
            made = evo._generate(i, rec[0].parent if rec is not None else None, rec is not None)
            if made is None or (rec is not None and (made.key != rec[0].key if rec[1] is None else made != rec[0])):
                raise ValueError(f"recorded candidate {i} ({rec[0].mutation if rec else 'not recorded'}) is not what "
                                 f"this search makes: restore with the seeds, seed and settings of the recorded search")
            evo._record(made)
            if rec is not None and rec[1] is not None:
                evo.tell(made.key, rec[1])
            else:
                missing.append(made)
        evo._reask = missing
        return evo

    # ------------------------------------------------------------------ internals
    def _record(self, cand: Candidate) -> None:
        self._asked.append(cand)
        self._by_key[cand.key] = cand

    def _generate(self, index: int, parent: str | None, use_parent: bool = False) -> Candidate | None:
        """Candidate ``index``: the next seed, or a mutant of ``parent`` (when ``use_parent``)
        or of the tournament winner."""
        while self._next_seed < len(self._seeds):
            s = self._seeds[self._next_seed]
            self._next_seed += 1
            if s.key in self._by_key:
                self.duplicates += 1
                continue
            return Candidate(s.source, s.key, None, s.mutation, index)
        rng = random.Random(f"gradpipe.search:{self.seed}:{index}:parent")
        parent_key = parent if use_parent else self._select(index, rng)
        if parent_key is None:
            return None
        module, prog = self._program(parent_key)
        ctx = MutationContext(prog.hyperparams, self.max_nodes)
        for attempt in range(self.max_tries):
            rng = random.Random(f"gradpipe.search:{self.seed}:{index}:{attempt}")
            m = mutate(module, rng, ctx)
            if m is None:
                continue
            source = format_module(m.module)
            try:
                child = compile_grad(source, "<candidate>")
            except GradError:
                self.invalid += 1
                continue
            key = child.structure_hash
            if key in self._by_key:
                self.duplicates += 1
                continue
            self._parsed.setdefault(key, (m.module, child))
            return Candidate(source, key, parent_key, m.description, index)
        return None

    def _program(self, key: str) -> tuple[ast.Module, Program]:
        got = self._parsed.get(key)
        if got is None:
            cand = self._by_key[key]
            got = self._parsed[key] = (parse(cand.source), compile_grad(cand.source, "<candidate>"))
        return got

    def _select(self, index: int, rng: random.Random) -> str | None:
        """The tournament winner for candidate ``index``: among the last ``population``
        candidates of earlier batches with a finite score; if there are none yet, among the
        earlier candidates not known to have failed; if none, among the seeds."""
        bound = (index // self.batch) * self.batch
        earlier = self._asked[:bound]
        pool = [c for c in earlier if _finite(self._scores.get(c.key))][-self.population:]
        if not pool:
            pool = [c for c in earlier if c.key not in self._scores or _finite(self._scores[c.key])]
            pool = pool[-self.population:] or [c for c in self._asked if c.parent is None]
        if not pool:
            return None
        members = rng.sample(pool, min(self.tournament, len(pool)))
        return max(members, key=lambda c: (self._score(c), c.index)).key

    def _score(self, c: Candidate) -> float:
        s = self._scores.get(c.key)
        return s if _finite(s) else -math.inf  # type: ignore[return-value]
