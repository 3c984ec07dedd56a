"""The search engine of issue 16: the post-pass key, the mutations, and regularized evolution
(determinism, dedup, invalid counts, restore). Scores come from a fake scoring function."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradpipe.compiler.program import compile as compile_grad
from gradpipe.compiler.program import load
from gradpipe.dsl import ast
from gradpipe.dsl.diagnostics import GradError
from gradpipe.dsl.formatter import format_module, format_source
from gradpipe.dsl.parser import parse
from gradpipe.search import Candidate, Evolution
from gradpipe.search import evolution as evolution_mod
from gradpipe.search.mutate import MUTATIONS, Mutation, MutationContext, mutate
from gradpipe.search.vocabulary import stages

PIPELINES = ("adam", "sgd", "lion", "diffgrad", "scalpel")
SOURCES = {name: load(name).source for name in PIPELINES}


def key_of(source: str) -> str:
    return compile_grad(source).structure_hash


def fake_score(c: Candidate) -> float:
    """A score that depends only on the program (and fails one in eight)."""
    r = random.Random(c.key)
    return -math.inf if r.random() < 0.125 else r.random()


def run(seeds: dict[str, str], seed: int, n: int, batch: int = 3, **kw) -> Evolution:
    """The flow's loop: ask a batch, score it, tell in ask order, until n are told."""
    evo = Evolution(seeds, seed=seed, batch=batch, **kw)
    return resume(evo, n, batch)


def resume(evo: Evolution, n: int, batch: int) -> Evolution:
    while sum(s is not None for _, s in evo.history) < n:
        asked = [c for c in (evo.ask() for _ in range(batch)) if c is not None]
        assert asked, "the search ran dry"
        for c in asked:
            evo.tell(c.key, fake_score(c))
    return evo


# ------------------------------------------------------------------ the post-pass key
_TWO = "state a = 0 then 0.9 * {} + grad\nstate b = 0 then 0.5 * {} + grad * grad\na / (sqrt(b) + 1e-8)"
_THREE = ("state a = 0 then 0.9 * {} + grad\nstate b = 0 then 0.5 * {} + grad\n"
          "state c = 0 then 0.1 * {} + grad\na + b + c")


@pytest.mark.parametrize("a, b, same", [
    ("grad | adam", "let unused = grad | sign\ngrad | adam", True),
    ("grad | adam", "let x = grad\n# renamed\nx | adam(0.9)", True),
    ("grad | ema(0.9)", "grad | ema(1 - 0.1)", True),
    ("grad | adam | decay(0)", "grad | adam", True),
    ("hparam unused = 3 in [0, inf)\ngrad | adam", "grad | adam", True),
    ("grad | adam", "grad | adam(0.9, 0.99)", False),
    ("grad | adam | sign", "grad | sign | adam", False),
    ("hparam wd = 0.1 in [0, inf)\ngrad | decay(wd)", "hparam wd = 0.2 in [0, inf)\ngrad | decay(wd)", False),
    ("grad | noise + noise", "let n = grad | noise\nn + n", False),
    ("let m = grad | ema(0.9)\nm | sign", "grad | ema(0.9) | sign", True),
    ("state a = 0 then a * 0.5 + grad\nstate b = 0 then b * 0.9 + grad\ngrad + a - b",
     "state a = 0 then a * 0.5 + grad\nstate b = 0 then b * 0.9 + grad\ngrad + b - a", False),
    ("let s = grad | sign\nprevious(grad) + 2 * previous(s)", "let s = grad | sign\n2 * previous(grad) + previous(s)",
     False),
    ("grad | sign | previous", "grad | previous | sign", False),
    ("let p = previous(grad)\np + grad", "previous(grad) + grad", True),  # the cell's node name differs
    ("let s = grad | sign\ngrad - s", "let s = grad | sign\ns - grad", False),
    # cells that read each other's old value (previous): refined around the cycle
    (_TWO.format("a", "b"), _TWO.format("previous(b)", "previous(a)"), False),
    (_TWO.format("previous(b)", "previous(a)"),
     "state y = 0 then 0.5 * previous(x) + grad * grad\nstate x = 0 then 0.9 * previous(y) + grad\n"
     "x / (sqrt(y) + 1e-8)", True),
    (_THREE.format("a", "b", "c"), _THREE.format("previous(b)", "previous(c)", "previous(a)"), False),
    (_THREE.format("previous(b)", "previous(c)", "previous(a)"),
     _THREE.format("previous(c)", "previous(a)", "previous(b)"), False),
])
def test_structure_hash_is_post_pass(a: str, b: str, same: bool) -> None:
    assert (key_of(a) == key_of(b)) is same


def test_structure_hash_tells_the_builtins_apart() -> None:
    from gradpipe.compiler.program import builtin_names
    keys = {load(n).structure_hash for n in builtin_names()}
    assert len(keys) == len(builtin_names())


# -------------------------------------------------------------------- mutations
def _mutants(kind: str, name: str, n: int = 6):
    prog = load(name)
    module = parse(prog.source)
    ctx = MutationContext(prog.hyperparams)
    for t in range(n):
        m = MUTATIONS[kind](module, random.Random(f"{kind}:{name}:{t}"), ctx)
        if m is not None:
            yield module, m


#: what each kind's description and program change look like
CHANGES = {
    "insert": ("insert ", lambda before, after: after > before),
    "delete": ("delete ", lambda before, after: after < before),
    "replace": ("replace ", None),
    "set_arg": ("set ", None),
    "set_hparam": ("set hparam ", None),
    "swap": ("swap ", None),
    "mix": ("mix ", lambda before, after: after > before),
}


def _stage_count(module: ast.Module) -> int:
    return sum(len(n.stages) for n in ast.walk(module) if isinstance(n, ast.Chain))


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
@pytest.mark.parametrize("name", PIPELINES)
def test_each_mutation_kind_makes_its_change_and_compiles(kind: str, name: str) -> None:
    prefix, grows = CHANGES[kind]
    made = list(_mutants(kind, name))
    if kind == "swap" and name != "scalpel":  # only scalpel has a signal argument
        assert made == []
        return
    assert made, f"no {kind} mutant of {name}"
    for module, m in made:
        assert m.description.startswith(prefix), m.description
        assert m.module != module
        compile_grad(format_module(m.module))  # raises GradError if the mutant does not compile
        if kind == "set_hparam":
            changed = [s for s, t in zip(module.stmts, m.module.stmts) if s != t]
            assert len(changed) == 1 and isinstance(changed[0], ast.HParam)
        elif kind in ("insert", "delete") and grows is not None:
            assert grows(_stage_count(module), _stage_count(m.module)) or kind == "insert"
        hparams = [s for s in module.stmts if isinstance(s, ast.HParam)]
        if kind != "set_hparam":
            assert [s for s in m.module.stmts if isinstance(s, ast.HParam)] == hparams


def test_set_hparam_draws_only_tuples_of_literals() -> None:
    """A tuple default with a computed item (``1 - 1e-3``) is left alone: drawing it used to
    compare a float with the whole tuple default, and Evolution.ask() raised TypeError."""
    source = ("hparam b = (0.9, 1 - 1e-3) in [0, 1)\nhparam c = (0.9, 0.99) in [0, 1)\n"
              "grad | ema(b[1]) | ema(c[0])\n")
    module, ctx = parse(source), MutationContext(compile_grad(source).hyperparams)
    for t in range(20):
        m = MUTATIONS["set_hparam"](module, random.Random(t), ctx)
        assert m is not None and m.description.startswith("set hparam c["), m.description
        assert m.module.stmts[0] == module.stmts[0]
    alone = "hparam b = (0.9, 1 - 1e-3) in [0, 1)\ngrad | ema(b[1])\n"
    assert MUTATIONS["set_hparam"](parse(alone), random.Random(0),
                                   MutationContext(compile_grad(alone).hyperparams)) is None
    run({"s": alone}, seed=0, n=12)


def test_vocabulary_stages_compile_alone() -> None:
    from gradpipe.search.mutate import _new_stage
    for spec in stages():
        stage = _new_stage(spec, random.Random(0))
        compile_grad(format_module(ast.Module((ast.Body(ast.Chain((ast.Name(("grad",)), stage))),))))


def test_size_bound_stops_growth() -> None:
    module = parse("grad | adam")
    ctx = MutationContext({}, max_nodes=1)
    for kind in ("insert", "mix"):
        assert MUTATIONS[kind](module, random.Random(0), ctx) is None
    assert mutate(module, random.Random(0), ctx) is not None  # other kinds still apply


# ------------------------------------------------------------------ the evolution
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), names=st.lists(st.sampled_from(PIPELINES), min_size=1, max_size=3, unique=True))
def test_every_candidate_compiles_round_trips_and_is_new(seed: int, names: list[str]) -> None:
    evo = run({n: SOURCES[n] for n in names}, seed, n=12)
    keys = [c.key for c, _ in evo.history]
    assert len(set(keys)) == len(keys)
    for i, (c, _) in enumerate(evo.history):
        assert c.index == i
        assert format_source(c.source) == c.source
        assert compile_grad(c.source).structure_hash == c.key
        assert (c.parent is None) == c.mutation.startswith("seed ")


def test_seeds_come_first_in_order() -> None:
    evo = run({"sgd": SOURCES["sgd"], "adam": SOURCES["adam"]}, 0, n=4)
    c0, c1 = (c for c, _ in evo.history[:2])
    assert (c0.mutation, c1.mutation) == ("seed sgd", "seed adam")
    assert c0.key == load("sgd").structure_hash


def test_a_seed_with_an_unused_let_is_the_seed() -> None:
    padded = SOURCES["adam"] + "\nlet unused = grad | sign\n"
    evo = Evolution({"adam": SOURCES["adam"], "padded": padded}, seed=0)
    first = evo.ask()
    second = evo.ask()
    assert first is not None and first.mutation == "seed adam"
    assert second is not None and second.parent == first.key  # the padded seed was a duplicate
    assert evo.duplicates == 1


def _unused_let(module: ast.Module, rng: random.Random) -> Mutation:
    let = ast.Let(f"unused{rng.randrange(1000)}", ast.Name(("grad",)))
    return Mutation(ast.Module((let,) + module.stmts), "injected")


#: a mutation that always gives the same thing, and the (invalid, duplicates) counts after
#: five draws of it
INJECTED = {
    "nothing applies": (lambda module, rng: None, (0, 0)),
    "an unused let (the parent's key)": (_unused_let, (0, 5)),
    "a misspelled op (rejected by the compiler)": (lambda module, rng: Mutation(parse("grad | adamm"), "injected"),
                                                   (5, 0)),
}


@pytest.mark.parametrize("case", sorted(INJECTED))
def test_invalid_and_equivalent_mutants_are_counted_never_returned(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    injected, counts = INJECTED[case]
    monkeypatch.setattr(evolution_mod, "mutate", lambda module, rng, ctx: injected(module, rng))
    evo = Evolution({"sgd": SOURCES["sgd"]}, seed=0, max_tries=5)
    assert evo.ask() is not None  # the seed
    assert evo.ask() is None  # five draws, nothing new
    assert (evo.invalid, evo.duplicates) == counts


def test_same_seed_same_history_other_seed_differs() -> None:
    seeds = {"adam": SOURCES["adam"], "lion": SOURCES["lion"]}
    a, b, c = run(seeds, 7, n=20), run(seeds, 7, n=20), run(seeds, 8, n=20)
    assert a.history == b.history
    assert (a.invalid, a.duplicates) == (b.invalid, b.duplicates)
    assert [x.key for x, _ in a.history] != [x.key for x, _ in c.history]


def test_failed_candidates_are_never_parents() -> None:
    # tournaments of one: every parent is a random member of the population
    evo = run({"adam": SOURCES["adam"], "sgd": SOURCES["sgd"]}, 2, n=30, tournament=1)
    failed = {c.key for c, s in evo.history if s is not None and not math.isfinite(s)}
    assert failed
    seeds = {c.key for c, _ in evo.history if c.parent is None}
    assert not {c.parent for c, _ in evo.history} & (failed - seeds)


@pytest.mark.parametrize("told, dropped", [(15, ()), (16, ()), (17, (15,)), (14, (12,))])
def test_restore_equals_an_uninterrupted_run(told: int, dropped: tuple[int, ...]) -> None:
    """Killed after ``told`` candidates were recorded (mid-batch too, with gaps): the restored
    search hands out the unrecorded ones again, then exactly what the uninterrupted one did."""
    seeds = {"lion": SOURCES["lion"], "diffgrad": SOURCES["diffgrad"]}
    full = run(seeds, 11, n=27)
    recorded = [(c, s) for c, s in full.history[:told] if c.index not in dropped]
    evo = Evolution.restore(seeds, recorded, seed=11, batch=3)
    again = [evo.ask() for _ in range(len(dropped))]
    assert [c.index for c in again if c is not None] == list(dropped)
    rest = [evo.ask() for _ in range((3 - told % 3) % 3)]  # the flow finishes the batch it was in
    for c in again + rest:
        assert c is not None
        evo.tell(c.key, fake_score(c))
    resume(evo, 27, 3)
    assert evo.history == full.history[:len(evo.history)] and len(evo.history) == 27
    assert (evo.invalid, evo.duplicates) == (full.invalid, full.duplicates)


def test_restore_refuses_a_record_of_another_search() -> None:
    seeds = {"lion": SOURCES["lion"]}
    recorded = run(seeds, 1, n=6).history
    with pytest.raises(ValueError, match="seeds, seed and settings"):
        Evolution.restore(seeds, recorded, seed=2, batch=3)


@pytest.mark.parametrize("source", ["grad | adamm", "hparam lr = -1 in [0, inf)\ngrad | adam", ""])
def test_a_seed_that_does_not_compile_raises(source: str) -> None:
    with pytest.raises(GradError):
        Evolution({"bad": source}, seed=0)
