"""Graph passes on the IR: common-subexpression elimination, dead-node elimination, and the
checks that need the whole graph (per-example gradients, every op's own rules).

CSE merges nodes that compute the same thing: the same op with the same
arguments on the same inputs. For a stateful op this means one state buffer
where the source spelled two (``ema`` used as the projection reference and as
a momentum on the same stream is stored once). Ops that draw random numbers
are never merged.
"""

from __future__ import annotations

from typing import Any, Iterator

import networkx as nx

from .ir import COMMIT_PORT, Node, freeze_node
from .ops import CheckView, op_impl

__all__ = ["cse", "eliminate_dead", "inputs_of", "check_per_sample", "check_ops"]


def inputs_of(g: nx.MultiDiGraph, node: str) -> dict[str, str]:
    """port -> source node."""
    return {d["port"]: u for u, _, d in g.in_edges(node, data=True)}


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def cse(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    """Merge identical nodes in place, state cells that are the same cell included (then the
    nodes that read them, again); return (removed, kept) pairs."""
    merged = _cse_once(g)
    while True:
        cells = _merge_cells(g)
        if not cells:
            return merged
        merged += cells + _cse_once(g)


def _cse_once(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    seen: dict[tuple, str] = {}
    for node in list(nx.topological_sort(g)):
        if node not in g:
            continue
        attrs = g.nodes[node]
        kind = attrs["kind"]
        if kind in ("output", "source", "block_in"):
            continue
        if kind == "op" and not op_impl(attrs["op"]).mergeable:
            continue
        ins = tuple(sorted(inputs_of(g, node).items()))
        # a node with no inputs (a shape value such as ``numel``) is per route: never merged across routes
        key = (kind, attrs["op"], _freeze(attrs["args"]), ins, None if ins else attrs.get("route"))
        keep = seen.get(key)
        if keep is None:
            seen[key] = node
            continue
        for _, dst, d in list(g.out_edges(node, data=True)):
            g.add_edge(keep, dst, **d)
        g.remove_node(node)
        merged.append((node, keep))
    return merged


def _merge_cells(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    """Merge state cells that are the same cell: the same initial value and the same new value
    (``previous(grad)`` written twice). A cell whose new value reads the cell itself (a
    recurrence) is never the same node as another's, so it stays."""
    merged: list[tuple[str, str]] = []
    seen: dict[tuple, str] = {}
    for out, d in list(g.nodes(data=True)):
        if d["kind"] != "output":
            continue
        for new, _, key, e in list(g.in_edges(out, keys=True, data=True)):
            cell = e["port"][len(COMMIT_PORT):] if e["port"].startswith(COMMIT_PORT) else None
            if cell is None or cell not in g:
                continue
            ident = (out, _freeze(g.nodes[cell]["args"]), tuple(sorted(inputs_of(g, cell).items())), new)
            keep = seen.get(ident)
            if keep is None:
                seen[ident] = cell
                continue
            g.remove_edge(new, out, key)
            for _, dst, d2 in list(g.out_edges(cell, data=True)):
                g.add_edge(keep, dst, **d2)
            g.remove_node(cell)
            merged.append((cell, keep))
    return merged


def eliminate_dead(g: nx.MultiDiGraph) -> list[str]:
    """Remove nodes no output depends on; return their names. A state cell's new value (an
    output's ``cell:<cell>`` port) is live only while the cell is: a cell nothing reads is
    dropped with its update."""
    live: set[str] = set()
    commits: list[tuple[str, str, str]] = []  # (output, cell, its new value)
    for n, d in g.nodes(data=True):
        if d["kind"] == "output":
            live.add(n)
            for src, _, e in g.in_edges(n, data=True):
                if e["port"] == "x":
                    live |= {src} | nx.ancestors(g, src)
                elif e["port"].startswith(COMMIT_PORT):
                    commits.append((n, e["port"][len(COMMIT_PORT):], src))
    changed = True
    while changed:
        changed = False
        for _, cell, new in commits:
            if cell in live and new not in live:
                live |= {new} | nx.ancestors(g, new)
                changed = True
    for out, cell, new in commits:
        if cell not in live and new in live:
            for key, e in list(g.get_edge_data(new, out).items()):
                if e["port"] == COMMIT_PORT + cell:
                    g.remove_edge(new, out, key)
    dead = [n for n in g.nodes if n not in live]
    g.remove_nodes_from(dead)
    return dead


def check_per_sample(g: nx.MultiDiGraph) -> None:
    """Per-example gradients (``samples``) may only flow into per-sample ops (``dp_clip``) until
    an op aggregates them (``dp_noise``)."""
    from ..dsl.diagnostics import GradError
    batched: dict[str, bool] = {}
    for node in nx.topological_sort(g):
        d = g.nodes[node]
        fed = {port: batched.get(src, False) for port, src in inputs_of(g, node).items()}
        kind = d["kind"]
        if kind == "source":
            batched[node] = d["op"] == "samples"
            continue
        mode = op_impl(d["op"]).per_sample if kind == "op" else None
        if mode is not None:
            if not fed.get("x"):
                raise GradError(f"'{d['op']}' works on per-example gradients", d["span"],
                                f"feed it the 'samples' source: samples | {d['op']}")
            batched[node] = mode == "map"
            continue
        if any(fed.values()):
            what = "the pipeline's result" if kind == "output" else f"'{d['op']}'"
            raise GradError(f"{what} cannot take per-example gradients", d["span"],
                            "aggregate them first: samples | dp_clip(1.0) | dp_noise(1.0) | ...")
        batched[node] = False


class _GraphView(CheckView):
    """What op hooks see of the graph: its nodes, frozen."""

    def __init__(self, g: nx.MultiDiGraph) -> None:
        self.g = g
        self._frozen: dict[str, Node] = {}

    def node(self, name: str) -> Node:
        n = self._frozen.get(name)
        if n is None:
            n = self._frozen[name] = freeze_node(self.g, name)
        return n

    def forget(self, name: str) -> None:
        self._frozen.pop(name, None)

    def nodes(self) -> Iterator[Node]:
        for n in self.g.nodes:
            yield self.node(n)

    def input(self, node: Node, port: str = "x") -> Node | None:
        src = node.inputs.get(port)
        return None if src is None else self.node(src)


def check_ops(g: nx.MultiDiGraph) -> None:
    """Every op's own rules (:meth:`Op.infer_args`, then :meth:`Op.check`), in evaluation order,
    so the first error is the first in the pipeline."""
    view = _GraphView(g)
    order = list(nx.lexicographical_topological_sort(g))
    for name in order:
        d = g.nodes[name]
        if d["kind"] == "op":
            new = op_impl(d["op"]).infer_args(view.node(name), view)
            if new is not None:
                d["args"] = dict(new)
                view.forget(name)
    for name in order:
        d = g.nodes[name]
        if d["kind"] == "op":
            op_impl(d["op"]).check(view.node(name), view)
