"""Mutations of a `.grad` program: each takes a module (:class:`gradpipe.dsl.ast.Module`)
and a ``random.Random`` and returns a new module with a one-line description of the change,
or None when the program has no place for that kind of change.

The kinds follow the program mutations of Chen et al. 2023 ("Symbolic Discovery of
Optimization Algorithms", section 2: insert, delete or modify a statement) over gradpipe's
stages rather than raw tensor functions, and the argument changes of regularized evolution
(Real et al. 2019, "Regularized Evolution for Image Classifier Architecture Search"):

========== ================================================================================
insert     a stage of the vocabulary into a pipeline (``grad | ema`` -> ``grad | ema | sign``)
delete     a stage of a pipeline (never its source)
replace    a stage by another stage of the vocabulary
set_arg    an argument of an op to a new value inside the op's declared range
set_hparam a hyperparameter's default to a new value inside its declared range
swap       a signal argument for another signal (``project_orthogonal(ema)`` -> ``(grad | sign)``)
mix        a stage ``S`` into ``S + c * T``: a second term from the vocabulary, weighted
========== ================================================================================

Arguments are drawn by kind (numbers inside ranges, words among choices, bools flipped), so
most mutants compile; whether one does is decided by compiling it, not here. ``insert`` and
``mix`` are refused once the program has ``max_nodes`` AST nodes, so programs stay small.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..compiler.modules import HyperParam
from ..dsl import ast
from ..dsl.formatter import format_expr
from .astpaths import Path, replace_at, size, walk_paths
from .vocabulary import (SIGNALS, ArgSpec, StageSpec, bounds_of, draw_number, draw_value, literal_value, number_expr,
                         signal_expr, stage, stages)

__all__ = ["Mutation", "MutationContext", "MUTATIONS", "mutate"]

_SOURCES = frozenset({"grad", "param", "grads", "samples"})


@dataclass(frozen=True)
class Mutation:
    module: ast.Module
    description: str


@dataclass(frozen=True)
class MutationContext:
    """What mutations need besides the module: the program's hyperparameters (their
    ranges, from the compiled parent) and the size bound."""

    hparams: Mapping[str, HyperParam] = field(default_factory=dict)
    max_nodes: int = 400


# ------------------------------------------------------------------------- reading
def _text(e: ast.Expr, width: int = 40) -> str:
    t = format_expr(e)
    return t if len(t) <= width else t[:width - 3] + "..."


def _stage_name(e: ast.Expr) -> str | None:
    """The op or primitive of the vocabulary a stage is (``ema``, ``ema(0.9)``), else None."""
    name = e.func if isinstance(e, ast.Call) else e
    if isinstance(name, ast.Name) and len(name.parts) == 1 and not (isinstance(e, ast.Call) and e.block):
        return name.parts[0] if stage(name.parts[0]) is not None else None
    return None


def _sites(module: ast.Module) -> list[tuple[Path, tuple[ast.Expr, ...]]]:
    """Every stage list: each chain, and each route's or body's pipeline that is not a chain
    (one stage, which an insert turns into a chain)."""
    out = []
    for path, node in walk_paths(module):
        if isinstance(node, ast.Chain):
            out.append((path, node.stages))
        elif isinstance(node, (ast.Body, ast.Route)) and not isinstance(_root(node), ast.Chain):
            out.append((path + ((_root_field(node), None),), (_root(node),)))
    return out


def _root_field(node: ast.Body | ast.Route) -> str:
    return "expr" if isinstance(node, ast.Body) else "body"


def _root(node: ast.Body | ast.Route) -> ast.Expr:
    return getattr(node, _root_field(node))


def _with_stages(stages_: tuple[ast.Expr, ...]) -> ast.Expr:
    return stages_[0] if len(stages_) == 1 else ast.Chain(stages_)


def _op_uses(module: ast.Module) -> list[tuple[Path, ast.Expr, StageSpec]]:
    """Every call of a vocabulary op, and every bare op name that is a stage."""
    stage_paths = {path + (("stages", j),) for path, st in _sites(module) if len(st) > 1 for j in range(len(st))}
    stage_paths |= {path for path, st in _sites(module) if len(st) == 1}
    out = []
    for path, node in walk_paths(module):
        name = _stage_name(node) if isinstance(node, (ast.Call, ast.Name)) else None
        if name is not None and (isinstance(node, ast.Call) or path in stage_paths):
            spec = stage(name)
            if spec is not None and spec.kind == "op":
                out.append((path, node, spec))
    return out


def _bound_args(call: ast.Expr, spec: StageSpec) -> dict[str, tuple[str, int | str]]:
    """Where each argument of an op call is written: name -> ("pos", index) or ("kw", name).
    A first positional argument that is a signal where the op's first parameter is not
    (``ema(grads.main, 0.99)``) is the op's input, not an argument."""
    if not isinstance(call, ast.Call):
        return {}
    out: dict[str, tuple[str, int | str]] = {}
    shift = 0
    if call.args and spec.params and spec.params[0].kind != "signal" and _is_signal(call.args[0]):
        shift = 1
    for i in range(shift, len(call.args)):
        if i - shift < len(spec.params):
            out[spec.params[i - shift].name] = ("pos", i)
    for kw in call.kwargs:
        out[kw.name] = ("kw", kw.name)
    return out


def _is_signal(e: ast.Expr) -> bool:
    return isinstance(e, ast.Chain) or (isinstance(e, ast.Name) and e.parts[0] in _SOURCES)


def _arg_expr(call: ast.Expr, where: tuple[str, int | str]) -> ast.Expr:
    assert isinstance(call, ast.Call)
    if where[0] == "pos":
        return call.args[int(where[1])]
    return next(kw.value for kw in call.kwargs if kw.name == where[1])


def _set_arg(call: ast.Expr, spec: StageSpec, name: str, value: ast.Expr) -> ast.Call:
    """``call`` with argument ``name`` set to ``value`` (where it is written, else as a keyword)."""
    if isinstance(call, ast.Name):
        call = ast.Call(call)
    assert isinstance(call, ast.Call)
    where = _bound_args(call, spec).get(name)
    if where is None:
        return dataclasses.replace(call, kwargs=call.kwargs + (ast.Kwarg(name, value),))
    if where[0] == "pos":
        args = list(call.args)
        args[int(where[1])] = value
        return dataclasses.replace(call, args=tuple(args))
    return dataclasses.replace(call, kwargs=tuple(ast.Kwarg(k.name, value) if k.name == name else k
                                                  for k in call.kwargs))


def _value_expr(spec: ArgSpec, v: Any) -> ast.Expr:
    if spec.kind == "bool":
        return ast.Bool(bool(v))
    if spec.kind == "choice":
        return ast.Name((str(v),))
    return number_expr(v)


def _signal(rng: random.Random, spec: ArgSpec | None = None, avoid: str | None = None) -> ast.Expr:
    """A signal of the vocabulary (or, for an argument that takes numbers too, sometimes a
    number), other than ``avoid``."""
    if spec is not None and spec.numbers and rng.random() < 0.5:
        return number_expr(float(f"{10 ** rng.uniform(-2, 0):.2g}"))
    return signal_expr(rng.choice([s for s in SIGNALS if s != avoid]))


def _new_stage(spec: StageSpec, rng: random.Random) -> ast.Expr:
    """A stage to insert: an op with its required signal, or its first scalar argument
    drawn near the default (``clip_norm(1.5)``), else the bare name."""
    name = ast.Name((spec.name,))
    if spec.required is not None:
        req = spec.param(spec.required)
        value = _signal(rng, req)
        if spec.params[0].name == spec.required:
            return ast.Call(name, args=(value,))
        return ast.Call(name, kwargs=(ast.Kwarg(spec.required, value),))
    if spec.params and spec.params[0].kind == "scalar" and spec.params[0].default is not None \
            and rng.random() < 0.5:
        v = draw_number(spec.params[0], None, rng)
        if v is not None:
            return ast.Call(name, args=(number_expr(v),))
    return name


# ------------------------------------------------------------------------ mutations
def insert_stage(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    sites = _sites(module)
    if not sites or size(module) >= ctx.max_nodes:
        return None
    path, st = rng.choice(sites)
    pos = rng.randint(1, len(st))
    new = _new_stage(rng.choice(stages()), rng)
    where = f"after {_text(st[pos - 1])}"
    return Mutation(replace_at(module, path, _with_stages(st[:pos] + (new,) + st[pos:])),
                    f"insert {_text(new)} {where}")


def delete_stage(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    choices = [(path, st, j) for path, st in _sites(module) if len(st) > 1 for j in range(1, len(st))]
    if not choices:
        return None
    path, st, j = rng.choice(choices)
    return Mutation(replace_at(module, path, _with_stages(st[:j] + st[j + 1:])), f"delete {_text(st[j])}")


def replace_stage(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    choices = [(path, st, j) for path, st in _sites(module) for j in range(len(st)) if _stage_name(st[j])]
    if not choices:
        return None
    path, st, j = rng.choice(choices)
    old = _stage_name(st[j])
    spec = rng.choice([s for s in stages() if s.name != old])
    new = _new_stage(spec, rng)
    return Mutation(replace_at(module, path, _with_stages(st[:j] + (new,) + st[j + 1:])),
                    f"replace {_text(st[j])} with {_text(new)}")


def set_arg(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    uses = [(path, node, spec) for path, node, spec in _op_uses(module) if spec.mutable]
    if not uses:
        return None
    path, node, spec = rng.choice(uses)
    arg = rng.choice(spec.mutable)
    where = _bound_args(node, spec).get(arg.name)
    old_expr = _arg_expr(node, where) if where is not None else None
    current = literal_value(old_expr) if old_expr is not None else arg.default
    value = draw_value(arg, current, rng)
    if value is None:
        return None
    if old_expr is None and arg.default is not None:
        old_expr = _value_expr(arg, arg.default)
    old = format_expr(old_expr) if old_expr is not None else "default"
    new_expr = _value_expr(arg, value)
    return Mutation(replace_at(module, path, _set_arg(node, spec, arg.name, new_expr)),
                    f"set {spec.name} {arg.name} {old} -> {format_expr(new_expr)}")


def swap_signal(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    choices = []
    for path, node, spec in _op_uses(module):
        bound = _bound_args(node, spec)
        choices += [(path, node, spec, p, bound[p.name]) for p in spec.params if p.kind == "signal" and p.name in bound]
    if not choices:
        return None
    path, node, spec, p, where = rng.choice(choices)
    old = format_expr(_arg_expr(node, where))
    new = _signal(rng, p, avoid=old)
    return Mutation(replace_at(module, path, _set_arg(node, spec, p.name, new)),
                    f"swap {spec.name} {p.name} {_text(_arg_expr(node, where))} -> {_text(new)}")


def _number_literal(e: ast.Expr) -> bool:
    """Whether ``e`` is a number or bool literal (``0.9``, ``-1``, ``true``): a tuple item
    :func:`set_hparam` can draw anew (``1 - 1e-3`` is not: its value is not read here)."""
    v = literal_value(e)
    return isinstance(v, (int, float))


def set_hparam(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    """A hyperparameter's default (one item of a tuple's) drawn anew in its range; tuples
    qualify only when all their items are number or bool literals, so the drawn item's
    kind and current value are known."""
    choices = [(i, st) for i, st in enumerate(module.stmts) if isinstance(st, ast.HParam)
               and st.name in ctx.hparams
               and (all(_number_literal(x) for x in st.default.items) if isinstance(st.default, ast.Tuple)
                    else isinstance(st.default, ast.Bool) or literal_value(st.default) is not None)]
    if not choices:
        return None
    i, st = rng.choice(choices)
    hp = ctx.hparams[st.name]
    label, path, old_expr = st.name, (("stmts", i), ("default", None)), st.default
    if isinstance(st.default, ast.Tuple):
        j = rng.randrange(len(st.default.items))
        label, old_expr, path = f"{st.name}[{j}]", st.default.items[j], path + (("items", j),)
    kind = "bool" if isinstance(old_expr, ast.Bool) else "scalar"
    default = literal_value(old_expr) if old_expr is not st.default else hp.default
    spec = ArgSpec(st.name, kind, default, bounds_of(hp))  # type: ignore[arg-type]
    value = draw_value(spec, literal_value(old_expr), rng)
    if value is None:
        return None
    new_expr = _value_expr(spec, value)
    return Mutation(replace_at(module, path, new_expr),
                    f"set hparam {label} default {format_expr(old_expr)} -> {format_expr(new_expr)}")


def mix_stage(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    choices = [(path, st, j) for path, st in _sites(module) for j in range(1, len(st))]
    if not choices or size(module) >= ctx.max_nodes:
        return None
    path, st, j = rng.choice(choices)
    term = _new_stage(rng.choice(stages()), rng) if rng.random() < 0.5 else _signal(rng)
    c = float(f"{rng.choice((-1, 1)) * 10 ** rng.uniform(-2, 0):.2g}")
    mixed = ast.BinOp("+", st[j], ast.BinOp("*", number_expr(c), term))
    return Mutation(replace_at(module, path, _with_stages(st[:j] + (mixed,) + st[j + 1:])),
                    f"mix {_text(term)} into {_text(st[j])} with weight {c}")


#: every kind of mutation, by name (the names used in docs/search.md and the tests)
MUTATIONS: dict[str, Callable[[ast.Module, random.Random, MutationContext], "Mutation | None"]] = {
    "insert": insert_stage, "delete": delete_stage, "replace": replace_stage, "set_arg": set_arg,
    "set_hparam": set_hparam, "swap": swap_signal, "mix": mix_stage,
}


def mutate(module: ast.Module, rng: random.Random, ctx: MutationContext) -> Mutation | None:
    """One mutation of a kind drawn uniformly among those that apply to ``module``; None if
    none does."""
    kinds = list(MUTATIONS)
    rng.shuffle(kinds)
    for kind in kinds:
        m = MUTATIONS[kind](module, rng, ctx)
        if m is not None:
            return m
    return None
