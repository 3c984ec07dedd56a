"""A hash of what a compiled program computes: its optimised graph, up to names.

:attr:`Program.hash <gradpipe.compiler.program.Program>` hashes the file's canonical text,
so ``let unused = grad | sign`` or a renamed ``let`` changes it. :func:`structure_hash`
hashes the graph the passes left instead (constants folded, common subexpressions merged,
dead nodes removed: ``docs/language.md`` section 8), so two files that compile to the same
computation get the same value, whatever their names, layout and unused definitions. The
optimizer search (``gradpipe.search``) keys candidates by it, as the program search of
Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms", section 2) deduplicates
programs after removing redundant statements.

Method: a Merkle hash of the DAG (Weisfeiler-Lehman colour refinement on a directed graph,
Shervashidze et al. 2011, "Weisfeiler-Lehman Graph Kernels", which on a DAG in topological
order names each node by the whole expression below it in one round). A node's colour is
the hash of its label (kind, op, arguments with numbers normalised, hyperparameters by
name; the route for nodes without inputs and for outputs) and of its inputs' colours by
port. The graph's two cycles in meaning enter through ports: a block reaches its wrapper on
the wrapper's ``inner`` port, and the output pairs each state cell with its new value on a
``cell:`` port (named here by the cell's colour). A cell's value before the step is read
by its own update and, through ``previous(NAME)`` (``docs/language.md`` section 4.7), by
other cells' updates and the output, so the DAG's colours alone give ``state a ... then
0.9 * a + grad`` and ``... then 0.9 * previous(b) + grad`` one colour. So the cells are
refined around that cycle: a cell's colour also holds the last round's colour of its new
value, and the rounds repeat until the number of colours stops growing (the partition is
then stable; at most one round more than there are cells). The hash is that of the sorted
multiset of colours (so two draws of a random op are not one draw used twice), the routes'
outputs, the hyperparameters the graph reads (name, default, range; ``lr`` always) and the
``eval:``/``train:`` sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING, Any, Mapping

import networkx as nx

from . import scalars as S
from .ir import COMMIT_PORT, is_scalar

if TYPE_CHECKING:
    from .modules import HyperParam
    from .modes import ModeSeq

__all__ = ["structure_hash"]


def _canon(v: Any) -> Any:
    """A value as a plain, deterministic structure: numbers as floats (``1`` and ``1.0`` are
    the same argument), dataclasses (scalar expressions) as their name and fields."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        f = float(v)
        return "nan" if math.isnan(f) else f
    if isinstance(v, (tuple, list)):
        return tuple(_canon(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _canon(x)) for k, x in v.items()))
    if dataclasses.is_dataclass(v):
        return (type(v).__name__,) + tuple(_canon(getattr(v, f.name)) for f in dataclasses.fields(v)
                                           if f.name != "span")
    return repr(v)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _hparams_read(g: nx.MultiDiGraph, modes: Mapping[str, "ModeSeq"]) -> set[str]:
    """The hyperparameters the graph's arguments and the mode sequences read, and ``lr``."""
    from ..dsl import ast
    names = {"lr"}
    for _, d in g.nodes(data=True):
        for v in d["args"].values():
            if is_scalar(v):
                names |= {leaf.name for leaf in S.leaves(v) if isinstance(leaf, S.HP)}
    for seq in modes.values():
        for expr in (seq.expr, *seq.lets.values()):
            names |= {n.parts[0] for n in ast.walk(expr) if isinstance(n, ast.Name)}
    return names


def _commits(g: nx.MultiDiGraph) -> dict[str, list[str]]:
    """Each state cell's new values: the nodes on the outputs' ``cell:<cell>`` ports."""
    commits: dict[str, list[str]] = {}
    for u, _, d in g.edges(data=True):
        if d["port"].startswith(COMMIT_PORT):
            commits.setdefault(d["port"][len(COMMIT_PORT):], []).append(u)
    return commits


def _colours(g: nx.MultiDiGraph, order: list[str], labels: Mapping[str, Any],
             last: Mapping[str, str] | None = None,
             commits: Mapping[str, list[str]] | None = None) -> dict[str, str]:
    """Each node's colour, in topological order: its label and its inputs' colours by port
    (a state cell's commit port named by the cell's colour, not its node name). After the
    first round (``last``, the previous round's colours), a state cell's colour also holds
    its new values' colours from ``last``: the one edge of the cycle the DAG leaves out."""
    colour: dict[str, str] = {}
    for n in order:
        ins = sorted((d["port"] if not d["port"].startswith(COMMIT_PORT) else
                      COMMIT_PORT + colour[d["port"][len(COMMIT_PORT):]], colour[u])
                     for u, _, d in g.in_edges(n, data=True))
        if last is not None and commits and n in commits:
            colour[n] = _digest(labels[n], ins, sorted(last[u] for u in commits[n]))
        else:
            colour[n] = _digest(labels[n], ins)
    return colour


def _refined_colours(g: nx.MultiDiGraph, order: list[str], labels: Mapping[str, Any]) -> dict[str, str]:
    """The colours once the refinement around the state cells is stable: each round
    refines the last, and the first round that does not split a colour ends it (so the
    number of rounds depends only on the graph's structure, and its colours name the stable
    partition's cells by their new values). A graph without cells needs one round."""
    commits = _commits(g)
    colour = _colours(g, order, labels)
    for _ in range(len(commits) + 1 if commits else 0):
        new = _colours(g, order, labels, colour, commits)
        stable = len(set(new.values())) == len(set(colour.values()))
        colour = new
        if stable:
            break
    return colour


def structure_hash(graph: nx.MultiDiGraph, hyperparams: Mapping[str, "HyperParam"],
                   modes: Mapping[str, "ModeSeq"] | None = None) -> str:
    """The hash of an optimised program graph (``Program.graph``) up to node and variable
    names (see the module docstring): 16 hex digits."""
    from ..dsl.formatter import format_expr
    modes = modes or {}
    order = list(nx.lexicographical_topological_sort(graph))
    labels: dict[str, Any] = {}
    for n in order:
        d = graph.nodes[n]
        has_inputs = graph.in_degree(n) > 0
        labels[n] = (d["kind"], d["op"], _canon(d["args"]),
                     d["route"] if d["kind"] == "output" or not has_inputs else None)
    colour = _refined_colours(graph, order, labels)
    hps = tuple((name, _canon(hp.default), _canon(hp.low), _canon(hp.high), hp.low_closed, hp.high_closed)
                for name, hp in sorted(hyperparams.items()) if name in _hparams_read(graph, modes))
    outputs = sorted(colour[n] for n in order if graph.nodes[n]["kind"] == "output")
    seqs = tuple((m, format_expr(seq.expr), tuple(sorted((k, format_expr(v)) for k, v in seq.lets.items())),
                  tuple(sorted((route, tuple(sorted((c, colour.get(node, node)) for c, node in cells.items())))
                               for route, cells in seq.cells.items())))
                 for m, seq in sorted(modes.items()))
    return _digest(sorted(colour.values()), outputs, hps, seqs)[:16]
