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

__all__ = ["cse", "eliminate_dead", "inputs_of", "check_per_sample"]


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
        if kind in ("output", "source", "block_in"):
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


def check_per_sample(g: nx.MultiDiGraph) -> None:
    """Per-example gradients (``samples``) may only flow into per-sample ops (``dp_clip``) until
    an op aggregates them (``dp_noise``). Fills ``dp_noise``'s sensitivity from the ``dp_clip``
    feeding it when it was left at 0."""
    from ..dsl.diagnostics import GradError
    from . import scalars as S
    batched: dict[str, bool] = {}
    for node in nx.topological_sort(g):
        d = g.nodes[node]
        ins = inputs_of(g, node)
        fed = {port: batched.get(src, False) for port, src in ins.items()}
        kind = d["kind"]
        if kind == "source":
            batched[node] = d["op"] == "samples"
            continue
        mode = OPS[d["op"]].per_sample if kind == "op" else None
        if mode is not None:
            if not fed.get("x"):
                raise GradError(f"'{d['op']}' works on per-example gradients", d["span"],
                                f"feed it the 'samples' source: samples | {d['op']}")
            batched[node] = mode == "map"
            if d["op"] == "dp_noise":
                sens, sigma = d["args"].get("sensitivity"), d["args"].get("sigma")
                if isinstance(sens, S.Const) and sens.value == 0 and not (isinstance(sigma, S.Const)
                                                                           and sigma.value == 0):
                    src = g.nodes[ins["x"]]
                    if src["kind"] == "op" and src["op"] == "dp_clip":
                        d["args"]["sensitivity"] = src["args"]["clip"]
                    else:
                        raise GradError("dp_noise needs the sensitivity of one example's gradient", d["span"],
                                        "clip first (samples | dp_clip(1.0) | dp_noise(1.0)) or give the "
                                        "Lipschitz bound: dp_noise(1.0, sensitivity = ...)")
            continue
        if any(fed.values()):
            what = "the pipeline's result" if kind == "output" else f"'{d['op']}'"
            raise GradError(f"{what} cannot take per-example gradients", d["span"],
                            "aggregate them first: samples | dp_clip(1.0) | dp_noise(1.0) | ...")
        batched[node] = False
