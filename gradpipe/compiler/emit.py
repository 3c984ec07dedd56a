"""The graph emitter: the only code that adds nodes to the IR graph.

Every node is added whole, with its arguments and input edges, once everything it
needs has been built, so an error while building a call never leaves a half-built
node behind. Names come from where a node sits in the source
(``main/project_orthogonal/ema``), with ``#2``, ``#3``... for repeats. The emitter
also keeps the expansion budget (``gradpipe.compiler.build.NODE_BUDGET``), which bounds
what one program may expand to, and what the program reads (sources, named losses).
"""

from __future__ import annotations

from typing import Any, Iterable

import networkx as nx

from ..dsl.diagnostics import GradError, Span
from .ir import Kind
from .prims import NODE_NAMES

__all__ = ["Emitter", "ARITH_NAMES"]

#: the node name of each primitive (``main/mul``, ``main/lt``, ``main/max``)
ARITH_NAMES = NODE_NAMES


class Emitter:
    """Builds the graph of one program: nodes, edges, names, the budget."""

    def __init__(self, budget: int, budget_hint: str) -> None:
        self.graph = nx.MultiDiGraph()
        #: the route being built (nodes get ``route=<it>``)
        self.route = "main"
        #: the block op whose inner sub-pipeline is being built (nodes get ``block=<it>``)
        self.block: str | None = None
        self.budget = budget
        #: the hint of the error when the budget runs out (how the budget is computed)
        self.budget_hint = budget_hint
        self.spent = 0
        #: the error that ended the build when the budget ran out (raised again on every later use)
        self.over_budget: GradError | None = None
        #: the spans of the definitions being expanded, outermost first (where a blown budget is reported)
        self.applying: list[Span] = []
        self.losses: set[str] = set()
        self.reads: set[str] = set()
        self._suffix: dict[str, int] = {}
        self._reserved: set[str] = set()

    # ------------------------------------------------------------------ budget
    def spend(self, span: Span, units: int = 1) -> None:
        """Charge ``units`` to the expansion budget; a GradError once it is spent, at the
        outermost definition being expanded (the one that blew it), else at ``span``."""
        if self.over_budget is not None:
            raise self.over_budget
        self.spent += units
        if self.spent > self.budget:
            where = self.applying[0] if self.applying else span
            self.over_budget = GradError(f"the pipeline expands to more than {self.budget:,} nodes", where,
                                         self.budget_hint)
            raise self.over_budget

    # ------------------------------------------------------------------ names
    def fresh(self, base: str) -> str:
        """``base``, or ``base#2``, ``base#3``... if taken (a counter per base keeps this O(1)).
        The name is reserved: a later call never returns it, even before its node exists."""
        name = base
        if name in self.graph or name in self._reserved:
            k = self._suffix.get(base, 1) + 1
            while f"{base}#{k}" in self.graph or f"{base}#{k}" in self._reserved:
                k += 1
            self._suffix[base] = k
            name = f"{base}#{k}"
        self._reserved.add(name)
        return name

    # ------------------------------------------------------------------ nodes
    def _add(self, name: str, kind: Kind, op: str, args: dict[str, Any], span: Span,
             inputs: Iterable[tuple[str, str]] = (), block: Any = ...) -> str:
        self.graph.add_node(name, kind=kind.value, op=op, args=args, span=span, route=self.route,
                            block=self.block if block is ... else block)
        for src, port in inputs:
            self.graph.add_edge(src, name, port=port)
        self._reserved.discard(name)
        return name

    def source(self, name: str, span: Span) -> str:
        """The route's node for a source (``grad``, ``param``, ``grads.main``), made on first use."""
        node = f"{self.route}/{name}"
        if node not in self.graph:
            self.graph.add_node(node, kind=Kind.SOURCE.value, op=name, args={}, span=span, route=self.route)
        if name.startswith("grads."):
            self.losses.add(name[len("grads."):])
        else:
            self.reads.add(name)
        return node

    def grad_at(self, point: str, span: Span) -> str:
        """The route's ``grad_at`` source: the gradient at ``point`` (an input on port ``point``,
        :data:`gradpipe.compiler.ir.POINT_PORT`), which the runtime computes before the route runs."""
        node = f"{self.route}/grad_at"
        if node not in self.graph:
            self._add(node, Kind.SOURCE, "grad_at", {}, span, [(point, "point")], block=None)
        self.reads.add("grad_at")
        return node

    def arith(self, op: str, prefix: str, span: Span, args: dict[str, Any],
              inputs: Iterable[tuple[str, str]]) -> str:
        """An arithmetic node: the primitive ``op`` on its operands (ports from
        ``gradpipe.compiler.prims.PORTS``: a signal as an input edge, a scalar in ``args``)."""
        self.spend(span)
        return self._add(self.fresh(f"{prefix}/{ARITH_NAMES[op]}"), Kind.ARITH, op, args, span, inputs)

    def op(self, name: str, op: str, args: dict[str, Any], span: Span, inputs: Iterable[tuple[str, str]]) -> str:
        """An op node under a name from :meth:`fresh`, with all its arguments and inputs."""
        return self._add(name, Kind.OP, op, args, span, inputs)

    def block_in(self, owner: str, port: str, span: Span) -> str:
        """The entry of ``owner``'s ``port`` block: the values the block op hands its pipeline."""
        return self._add(f"{owner}/{port}", Kind.BLOCK_IN, port, {}, span, (), block=owner)

    def output(self, label: str, value: str, span: Span, commits: Iterable[tuple[str, str]] = (),
               param: bool = False) -> str:
        """The route's output: the update ``u`` on port ``x`` (with ``param``, the parameter's new
        value: ``args["param"]`` is True), and the new value of each state cell on port
        ``cell:<cell node>`` (:data:`gradpipe.compiler.ir.COMMIT_PORT`)."""
        inputs = [(value, "x")] + [(new, f"cell:{cell}") for cell, new in commits]
        return self._add(f"{label}/out", Kind.OUTPUT, "out", {"param": True} if param else {}, span, inputs,
                         block=None)

    def connect(self, src: str, dst: str, port: str) -> None:
        self.graph.add_edge(src, dst, port=port)

    def block_members(self, node: str) -> set[str]:
        """Every node built inside ``node``'s block, nested blocks included."""
        members = {n for n, d in self.graph.nodes(data=True) if d.get("block") == node}
        todo = list(members)
        while todo:
            m = todo.pop()
            for n, d in self.graph.nodes(data=True):
                if d.get("block") == m and n not in members:
                    members.add(n)
                    todo.append(n)
        return members
