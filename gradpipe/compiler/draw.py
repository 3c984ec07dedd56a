"""Draw a Program's optimised graph with Graphviz (through pydot).

``to_dot`` needs only pydot. Rendering SVG or PNG runs a Graphviz ``dot``
program: the system's ``dot`` when installed, else ``graphviz-pure`` (a
self-contained Graphviz port that pip installs with gradpipe).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from .explain import describe_node

if TYPE_CHECKING:
    from .program import Program

_COLORS = {"source": "#dbeafe", "op": "#fef3c7", "arith": "#e5e7eb", "output": "#dcfce7"}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(prog: "Program") -> str:
    """The graph in Graphviz's dot language, one cluster per route."""
    import networkx as nx
    import pydot

    g = pydot.Dot("gradpipe", graph_type="digraph", rankdir="TB", fontname="Helvetica",
                  label=_q(f"{prog.name}  ({prog.hash})"), labelloc="t")
    g.set_node_defaults(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11")
    g.set_edge_defaults(fontname="Helvetica", fontsize="9")
    for r in prog.routes:
        cluster = pydot.Cluster(_q(r.label).strip('"').replace("/", "_").replace("*", "s").replace(".", "_")
                                or "route", label=_q("all parameters" if r.label == "main" else f"route {r.label}"),
                                style="dashed")
        for n in prog.route_nodes(r.label):
            kind = prog.node(n).kind.value
            bufs = prog.node_buffers(n)
            label = f"{n}\n{describe_node(prog, n).split('  <-')[0]}"
            if bufs:
                label += f"\nstate: {', '.join(bufs)}"
            cluster.add_node(pydot.Node(_q(n), label=_q(label), fillcolor=_COLORS.get(kind, "white")))
        g.add_subgraph(cluster)
    for u, v, d in prog.graph.edges(data=True):
        attrs = {} if d["port"] == "x" else {"label": _q(d["port"]), "style": "dashed"}
        g.add_edge(pydot.Edge(_q(u), _q(v), **attrs))
    del nx
    return g.to_string()


def dot_program() -> str | None:
    """Path of a Graphviz renderer: ``dot``, or ``graphviz-pure``."""
    found = shutil.which("dot")
    if found:
        return found
    candidates = [pathlib.Path(sys.executable).parent / "graphviz-pure", shutil.which("graphviz-pure")]
    for c in candidates:
        if c and pathlib.Path(c).exists():
            return str(c)
    return None


def draw(prog: "Program", path: str | pathlib.Path) -> pathlib.Path:
    """Write the graph to ``path``; the suffix picks the format: .dot, .svg or .png."""
    out = pathlib.Path(path)
    fmt = out.suffix.lower().lstrip(".")
    text = to_dot(prog)
    if fmt in ("dot", "gv"):
        out.write_text(text)
        return out
    if fmt not in ("svg", "png"):
        raise ValueError(f"unsupported picture format '.{fmt}': use .svg, .png or .dot")
    exe = dot_program()
    if exe is None:
        raise RuntimeError("no Graphviz renderer found: install gradpipe's dependencies "
                           "(pip install graphviz-pure) or Graphviz's 'dot', or write a .dot file")
    res = subprocess.run([exe, f"-T{fmt}", "-o", str(out)], input=text.encode(), capture_output=True,
                         timeout=120)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"{pathlib.Path(exe).name} failed: {res.stderr.decode(errors='replace').strip()}")
    return out
