"""The structural difference between two pipelines (``gradpipe diff A B``).

Nodes are identified by the names the compiler gives them from the source
(``main/adam``, ``main/project_orthogonal/ema``, see docs/language.md, "Node and
state names"), so an edit shows up where it was made: an inserted op is one added
node (and a changed input of the op after it), a changed argument is a change of
one node, and the state buffers that a checkpoint carries across the edit are the
ones whose node keeps its name, its op and its buffers.

A pipeline is first reduced to a *description*, a JSON-able dict
(:func:`describe`); ``Optimizer.state_dict()`` stores it, so the difference between
a checkpoint and the pipeline that loads it can be shown too
(:func:`diff_descriptions`).
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..dsl.diagnostics import printable
from . import prims

if TYPE_CHECKING:
    from .program import Program

__all__ = ["Change", "ProgramDiff", "describe", "diff_descriptions", "diff_programs", "diff_against_baseline",
           "related_state", "state_of_schema"]


# --------------------------------------------------------------------------- descriptions
def _text(v: Any) -> str:
    """A value as the language writes it (``true``, ``inf``, ``betas[0]``, ``(0.9, 0.999)``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_text(x) for x in v) + ")"
    return str(v)


def _label(prog: "Program") -> str:
    """How a report names a pipeline: a built-in by its name, a file by its path."""
    from .program import builtin_dir
    try:
        if pathlib.Path(prog.path).resolve().parent == builtin_dir():
            return prog.name
    except (OSError, ValueError):
        pass
    return prog.path


def describe(prog: "Program", label: str | None = None) -> dict[str, Any]:
    """What :func:`diff_descriptions` compares, as plain JSON-able data.

    ``nodes``: every graph node by name, with its kind, op, arguments (as text),
    inputs (port to node) and enclosing block; ``hyperparams``: default and range
    as text; ``routes``: the route labels in source order; ``state``: every node that
    keeps state, with its op and every buffer it may keep (the checkpoint schema,
    :meth:`Program.state_schema`).
    """
    g = prog.graph
    nodes: dict[str, Any] = {}
    for n in sorted(g.nodes):
        d = g.nodes[n]
        nodes[n] = {"kind": d["kind"], "op": d["op"],
                    "args": {k: _text(v) for k, v in d.get("args", {}).items()},
                    "inputs": dict(sorted(prog.inputs(n).items())), "block": d.get("block")}
    hps = {name: {"default": _text(hp.default), "range": hp.range_text() if hp.has_range else None}
           for name, hp in prog.hyperparams.items()}
    return {"pipeline": label or _label(prog), "hash": prog.hash, "nodes": nodes, "hyperparams": hps,
            "routes": [r.label for r in prog.routes], "state": state_of_schema(prog.state_schema())}


def state_of_schema(schema: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``Program.state_schema()`` lines (``node op buf1,buf2``) as ``{node: {"op", "buffers"}}``.

    A node name may hold spaces (a route selector such as ``"my layer.*"``), an op
    name and a buffer list do not."""
    out: dict[str, dict[str, Any]] = {}
    for line in schema:
        node, op, bufs = str(line).rsplit(" ", 2)
        out[node] = {"op": op, "buffers": [b for b in bufs.split(",") if b]}
    return out


def related_state(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a checkpoint moves between two pipelines with these states (:func:`state_of_schema`).

    They are related when some node keeps state in both under the same name and op
    (per-parameter buffers, or node state such as ``noise``'s generator), or when
    neither keeps any state. Otherwise loading would carry nothing over: every
    buffer of the checkpoint would be dropped and every buffer of the pipeline start
    afresh, so the checkpoint is almost surely not from this pipeline."""
    if not a and not b:
        return True
    return any(n in b and b[n]["op"] == a[n]["op"] for n in a)


# --------------------------------------------------------------------------- the difference
@dataclass(frozen=True)
class Change:
    """One changed property (``what``) of a node, hyperparameter or route, before and after."""

    what: str
    before: str | None
    after: str | None

    def text(self) -> str:
        def show(v: str | None) -> str:
            return "(none)" if v is None else v
        return f"{self.what}: {show(self.before)} -> {show(self.after)}"


@dataclass
class ProgramDiff:
    """What changed from pipeline ``a`` to pipeline ``b``.

    ``nodes_added`` / ``nodes_removed`` map node names to a one-line description;
    ``nodes_changed`` lists, per node present in both, what changed (``op``,
    ``arg <name>``, ``input <port>``, ``kind``, ``block``). Hyperparameters likewise
    (``default``, ``range``). ``buffers_kept`` are the state buffers a checkpoint of
    ``a`` carries into ``b`` (same node name, op and buffer list); ``buffers_reset``
    the nodes present in both whose state does not carry (their op or their buffer
    list changed), with the reason; their buffers are in ``buffers_removed`` and
    ``buffers_added`` as well.
    """

    a: str
    b: str
    a_hash: str
    b_hash: str
    nodes_added: dict[str, str] = field(default_factory=dict)
    nodes_removed: dict[str, str] = field(default_factory=dict)
    nodes_changed: dict[str, list[Change]] = field(default_factory=dict)
    hyperparams_added: dict[str, str] = field(default_factory=dict)
    hyperparams_removed: dict[str, str] = field(default_factory=dict)
    hyperparams_changed: dict[str, list[Change]] = field(default_factory=dict)
    routes_added: list[str] = field(default_factory=list)
    routes_removed: list[str] = field(default_factory=list)
    route_order: Change | None = None
    buffers_added: list[str] = field(default_factory=list)
    buffers_removed: list[str] = field(default_factory=list)
    buffers_kept: list[str] = field(default_factory=list)
    buffers_reset: dict[str, str] = field(default_factory=dict)
    related: bool = True
    #: why the two are (un)related, in words
    relation: str = ""

    @property
    def is_empty(self) -> bool:
        """No structural difference (the sources may still differ in comments, layout, or
        in definitions the pipeline does not use)."""
        return not (self.nodes_added or self.nodes_removed or self.nodes_changed or self.hyperparams_added
                    or self.hyperparams_removed or self.hyperparams_changed or self.routes_added
                    or self.routes_removed or self.route_order or self.buffers_added or self.buffers_removed
                    or self.buffers_reset)

    def to_dict(self) -> dict[str, Any]:
        """The difference as JSON-able data (``json.dumps`` works on it as is)."""
        def changes(d: Mapping[str, list[Change]]) -> dict[str, list[dict[str, str | None]]]:
            return {k: [{"what": c.what, "before": c.before, "after": c.after} for c in v] for k, v in d.items()}
        return {"a": self.a, "b": self.b, "a_hash": self.a_hash, "b_hash": self.b_hash,
                "is_empty": self.is_empty, "related": self.related, "relation": self.relation,
                "nodes": {"added": dict(self.nodes_added), "removed": dict(self.nodes_removed),
                          "changed": changes(self.nodes_changed)},
                "hyperparams": {"added": dict(self.hyperparams_added), "removed": dict(self.hyperparams_removed),
                                "changed": changes(self.hyperparams_changed)},
                "routes": {"added": list(self.routes_added), "removed": list(self.routes_removed),
                           "order": None if self.route_order is None else
                           {"before": self.route_order.before, "after": self.route_order.after}},
                "state": {"added": list(self.buffers_added), "removed": list(self.buffers_removed),
                          "kept": list(self.buffers_kept), "reset": dict(self.buffers_reset)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_text(self) -> str:
        """A readable report in the manner of ``diff -u``: ``+`` added in ``b``, ``-`` removed,
        ``~`` changed; sections in a fixed order, names sorted within each."""
        lines = [f"--- {self.a}  (hash {self.a_hash})", f"+++ {self.b}  (hash {self.b_hash})"]
        if self.is_empty:
            lines.append("no structural difference" + ("" if self.a_hash == self.b_hash else
                                                       " (the sources differ only in what does not change "
                                                       "the pipeline: comments, layout, unused definitions)"))
            return "".join(printable(line) + "\n" for line in lines)

        def section(title: str, added: Mapping[str, str], removed: Mapping[str, str],
                    changed: Mapping[str, list[Change]]) -> None:
            if not (added or removed or changed):
                return
            names = list(added) + list(removed) + list(changed)
            width = max(len(n) for n in names)
            lines.append(f"{title}:")
            for n in sorted(removed):
                lines.append(f"  - {n.ljust(width)}  {removed[n]}".rstrip())
            for n in sorted(added):
                lines.append(f"  + {n.ljust(width)}  {added[n]}".rstrip())
            for n in sorted(changed):
                for i, c in enumerate(changed[n]):
                    lines.append(f"  ~ {(n if i == 0 else '').ljust(width)}  {c.text()}")

        section("nodes", self.nodes_added, self.nodes_removed, self.nodes_changed)
        section("hyperparameters", self.hyperparams_added, self.hyperparams_removed, self.hyperparams_changed)
        if self.routes_added or self.routes_removed or self.route_order:
            lines.append("routes:")
            lines.extend(f"  - route {r}" for r in self.routes_removed)
            lines.extend(f"  + route {r}" for r in self.routes_added)
            if self.route_order:
                lines.append(f"  ~ {self.route_order.text()}")
        if self.buffers_added or self.buffers_removed or self.buffers_reset:
            lines.append("state (what a checkpoint of a carries into b):")
            lines.extend(f"  - {b}" for b in self.buffers_removed)
            lines.extend(f"  + {b}" for b in self.buffers_added)
            for n in sorted(self.buffers_reset):
                lines.append(f"  ~ {n}: starts afresh ({self.buffers_reset[n]})")
            lines.append(f"  = {len(self.buffers_kept)} buffer(s) kept" +
                         (f": {_listing(self.buffers_kept, 8)}" if self.buffers_kept else ""))
        lines.append(f"related: {'yes' if self.related else 'no'} ({self.relation})")
        return "".join(printable(line) + "\n" for line in lines)

    def __str__(self) -> str:
        return self.to_text()


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _node_text(d: Mapping[str, Any]) -> str:
    """One node in a line: ``adam(b1=0.9, ...) <- main/grad [ref<-main/ema]``."""
    ins = d.get("inputs", {})
    kind = d.get("kind")
    if kind == "source":
        return f"source {d['op']}"
    if kind == "output":
        return f"update <- {ins.get('x')}"
    if kind == "block_in":
        return f"input of the {{ ... }} block of {d.get('block')}"
    if kind == "arith":
        args = d.get("args", {})
        return prims.text(d["op"], [str(ins.get(p) or args.get(p)) for p in prims.PORTS[d["op"]]])
    args = ", ".join(f"{k}={v}" for k, v in d.get("args", {}).items())
    text = f"{d['op']}({args})"
    if "x" in ins:
        text += f" <- {ins['x']}"
    others = ", ".join(f"{p}<-{s}" for p, s in ins.items() if p != "x")
    return text + (f"  [{others}]" if others else "")


def _node_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Change]:
    out: list[Change] = []
    for key in ("kind", "op"):
        if a.get(key) != b.get(key):
            out.append(Change(key, a.get(key), b.get(key)))
    aa, ba = a.get("args", {}), b.get("args", {})
    for k in list(aa) + [k for k in ba if k not in aa]:
        if aa.get(k) != ba.get(k):
            out.append(Change(f"arg {k}", aa.get(k), ba.get(k)))
    ai, bi = a.get("inputs", {}), b.get("inputs", {})
    for p in sorted(set(ai) | set(bi)):
        if ai.get(p) != bi.get(p):
            out.append(Change(f"input {p}", ai.get(p), bi.get(p)))
    if a.get("block") != b.get("block"):
        out.append(Change("block", a.get("block"), b.get("block")))
    return out


def _hp_text(h: Mapping[str, Any]) -> str:
    return f"= {h['default']}" + (f" in {h['range']}" if h.get("range") else "")


def diff_descriptions(a: Mapping[str, Any], b: Mapping[str, Any]) -> ProgramDiff:
    """The difference between two :func:`describe` results (``b`` relative to ``a``).

    A description may lack ``nodes``, ``hyperparams`` or ``routes`` (a checkpoint
    written before they were stored): those parts are then not compared."""
    out = ProgramDiff(a=str(a.get("pipeline", "a")), b=str(b.get("pipeline", "b")),
                      a_hash=str(a.get("hash", "?")), b_hash=str(b.get("hash", "?")))
    if "nodes" in a and "nodes" in b:
        an, bn = a["nodes"], b["nodes"]
        out.nodes_added = {n: _node_text(bn[n]) for n in sorted(bn) if n not in an}
        out.nodes_removed = {n: _node_text(an[n]) for n in sorted(an) if n not in bn}
        for n in sorted(set(an) & set(bn)):
            ch = _node_changes(an[n], bn[n])
            if ch:
                out.nodes_changed[n] = ch
    if "hyperparams" in a and "hyperparams" in b:
        ah, bh = a["hyperparams"], b["hyperparams"]
        out.hyperparams_added = {h: _hp_text(bh[h]) for h in sorted(bh) if h not in ah}
        out.hyperparams_removed = {h: _hp_text(ah[h]) for h in sorted(ah) if h not in bh}
        for h in sorted(set(ah) & set(bh)):
            ch = [Change(k, ah[h].get(k), bh[h].get(k)) for k in ("default", "range") if ah[h].get(k) != bh[h].get(k)]
            if ch:
                out.hyperparams_changed[h] = ch
    if "routes" in a and "routes" in b:
        ar, br = list(a["routes"]), list(b["routes"])
        out.routes_added = [r for r in br if r not in ar]
        out.routes_removed = [r for r in ar if r not in br]
        common_a, common_b = [r for r in ar if r in br], [r for r in br if r in ar]
        if common_a != common_b:
            out.route_order = Change("route order", ", ".join(common_a), ", ".join(common_b))
    sa, sb = a.get("state", {}), b.get("state", {})
    kept, added, removed = [], [], []
    for n in sorted(set(sa) | set(sb)):
        x, y = sa.get(n), sb.get(n)
        if x is not None and y is not None:
            if x["op"] != y["op"]:
                out.buffers_reset[n] = f"op {x['op']} -> {y['op']}"
            elif list(x["buffers"]) != list(y["buffers"]):
                out.buffers_reset[n] = (f"buffers {','.join(x['buffers']) or '(none)'} -> "
                                        f"{','.join(y['buffers']) or '(none)'}")
            else:
                kept.extend(f"{n}.{buf}" for buf in x["buffers"])
                continue
        if x is not None:
            removed.extend(f"{n}.{buf}" for buf in x["buffers"])
        if y is not None:
            added.extend(f"{n}.{buf}" for buf in y["buffers"])
    out.buffers_kept, out.buffers_added, out.buffers_removed = kept, added, removed
    out.related = related_state(sa, sb)
    common = sorted(n for n in sa if n in sb and sa[n]["op"] == sb[n]["op"])
    if common:
        out.relation = f"state in common: {_listing(common, 3)}"
    elif not sa and not sb:
        out.relation = "neither keeps state"
    else:
        out.relation = "no node keeps state in both"
    return out


def diff_programs(a: "Program", b: "Program", *, a_label: str | None = None,
                  b_label: str | None = None) -> ProgramDiff:
    """The structural difference from pipeline ``a`` to pipeline ``b`` (see :class:`ProgramDiff`).

    ``diff_programs(p, p).is_empty`` holds for every pipeline; reformatting, comments
    and unused definitions leave a diff empty (they do change ``Program.hash``)."""
    return diff_descriptions(describe(a, a_label), describe(b, b_label))


def diff_against_baseline(baseline: "Program", programs: Mapping[str, "Program"]
                          ) -> tuple[str, dict[str, Any]]:
    """Each of ``programs`` (by label) against ``baseline``: a text report (the
    :meth:`ProgramDiff.to_text` of each, in the order given) and the same as JSON-able
    data ``{"baseline": ..., "baseline_hash": ..., "pipelines": {label: ProgramDiff.to_dict()}}``,
    for a comparison to log beside its ranking."""
    base = describe(baseline)
    texts, data = [], {}
    for label, prog in programs.items():
        d = diff_descriptions(base, describe(prog, label))
        texts.append(f"== {label} against the baseline {base['pipeline']} ==\n{d.to_text()}")
        data[label] = d.to_dict()
    return "\n".join(texts), {"baseline": base["pipeline"], "baseline_hash": base["hash"], "pipelines": data}
