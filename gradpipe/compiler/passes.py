"""Graph passes on the IR: common-subexpression elimination and dead-node elimination.

CSE merges nodes that compute the same thing: the same op with the same
arguments on the same inputs. For a stateful op this means one state buffer
where the source spelled two (``ema`` used as the projection reference and as
a momentum on the same stream is stored once). Ops that draw random numbers
are never merged.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from .ops import OPS

__all__ = ["cse", "eliminate_dead", "inputs_of"]


def inputs_of(g: nx.MultiDiGraph, node: str) -> dict[str, str]:
    """port -> source node."""
    return {d["port"]: u for u, _, d in g.in_edges(node, data=True)}


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def cse(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    """Merge identical nodes in place; return (removed, kept) pairs."""
    merged: list[tuple[str, str]] = []
    seen: dict[tuple, str] = {}
    for node in list(nx.topological_sort(g)):
        if node not in g:
            continue
        attrs = g.nodes[node]
        kind = attrs["kind"]
        if kind in ("output", "source"):
            continue
        if kind == "op" and not OPS[attrs["op"]].mergeable:
            continue
        key = (kind, attrs["op"], _freeze(attrs["args"]), tuple(sorted(inputs_of(g, node).items())))
        keep = seen.get(key)
        if keep is None:
            seen[key] = node
            continue
        for _, dst, d in list(g.out_edges(node, data=True)):
            g.add_edge(keep, dst, **d)
        g.remove_node(node)
        merged.append((node, keep))
    return merged


def eliminate_dead(g: nx.MultiDiGraph) -> list[str]:
    """Remove nodes no output depends on; return their names."""
    live: set[str] = set()
    for n, d in g.nodes(data=True):
        if d["kind"] == "output":
            live.add(n)
            live |= nx.ancestors(g, n)
    dead = [n for n in g.nodes if n not in live]
    g.remove_nodes_from(dead)
    return [n for n in dead if g.graph.get("report_dead", True)]
