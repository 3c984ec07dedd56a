"""Loading a checkpoint into an edited pipeline (``Optimizer.load_state_dict``).

State buffers are named after the nodes that keep them (``main/adam.m``), and node
names come from the source, so most edits leave most names alone. Loading a state
dict saved by another version of the pipeline therefore works node by node:

* a node that keeps state on both sides under the same name, op and buffer list
  is **carried**: its buffers (and its node state, such as ``noise``'s generator)
  are loaded as saved, after checking each buffer's shape against its parameter;
* a node only this pipeline has is **new**: it has no state after loading; the
  runtime creates it from the op's declared buffers (``Op.init``) before the node's
  next step, exactly as in a fresh optimizer's first step;
* a node only the checkpoint has is **dropped** and reported;
* a node on both sides whose op or buffer list changed (``rms(centered=true)``
  after ``rms(centered=false)``, ``gcond`` with another number of tasks) is
  **reset**: dropped and new at once, since half of a node's state is not a state.

Hyperparameters follow the same rule: the loaded param groups keep the saved
values of the hyperparameters both pipelines declare, take this optimizer's
values for the ones only this pipeline declares, and lose the ones only the
saved pipeline declared.

Two pipelines with no stateful node in common (and not both stateless) are
*unrelated* (:func:`gradpipe.compiler.diff.related_state`): loading would carry
nothing over, so it is refused with a :class:`GradError`.

A ``torch.optim`` state dict (Adam, AdamW, SGD, RMSprop) is first converted by
:mod:`gradpipe.runtime.torch_state` into the pipeline's own form; one of another
algorithm is refused with a :class:`GradError` that says what the dict holds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..compiler.diff import ProgramDiff, describe, diff_descriptions, related_state, state_of_schema
from ..compiler.ops import Args
from ..dsl.diagnostics import GradError

if TYPE_CHECKING:
    from ..compiler.program import Program
    from .optimizer import Optimizer

__all__ = ["StateMigration", "StateMigrationWarning", "load_state", "expected_shape", "state_meta", "saved_meta"]


class StateMigrationWarning(UserWarning):
    """A state dict saved by another version of the pipeline was loaded: some state was
    dropped or starts afresh (``opt.last_migration`` holds the report)."""


def _listing(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class StateMigration:
    """What ``load_state_dict`` did with a state dict (``opt.last_migration``).

    Buffer names are ``node.buffer``. ``carried``: loaded as saved; ``new``: this
    pipeline's buffers the state dict did not provide (created by their op in the next
    step); ``dropped``: the state dict's buffers this pipeline does not keep;
    ``reset``: nodes on both sides whose state could not be carried, with the reason
    (their buffers are in ``dropped`` and ``new``). ``node_state_*`` likewise for the
    state a node shares over its parameters (``noise``'s generator).
    ``hyperparams_added`` got this optimizer's values, ``hyperparams_removed`` were
    taken out of the loaded param groups. ``diff`` is the structural difference
    from the saved pipeline (``None`` for a state dict that does not describe it).
    """

    saved_pipeline: str
    saved_hash: str
    pipeline: str
    hash: str
    carried: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reset: dict[str, str] = field(default_factory=dict)
    node_state_carried: list[str] = field(default_factory=list)
    node_state_dropped: list[str] = field(default_factory=list)
    hyperparams_added: list[str] = field(default_factory=list)
    hyperparams_removed: list[str] = field(default_factory=list)
    diff: ProgramDiff | None = None

    @property
    def changed(self) -> bool:
        """Whether anything was not loaded as saved (False for the same pipeline)."""
        return bool(self.new or self.dropped or self.reset or self.node_state_dropped
                    or self.hyperparams_added or self.hyperparams_removed)

    def to_dict(self) -> dict[str, Any]:
        return {"saved_pipeline": self.saved_pipeline, "saved_hash": self.saved_hash, "pipeline": self.pipeline,
                "hash": self.hash, "changed": self.changed, "carried": list(self.carried), "new": list(self.new),
                "dropped": list(self.dropped), "reset": dict(self.reset),
                "node_state_carried": list(self.node_state_carried),
                "node_state_dropped": list(self.node_state_dropped),
                "hyperparams_added": list(self.hyperparams_added),
                "hyperparams_removed": list(self.hyperparams_removed),
                "diff": None if self.diff is None else self.diff.to_dict()}

    def to_text(self) -> str:
        lines = [f"state dict of '{self.saved_pipeline}' (hash {self.saved_hash}) loaded into "
                 f"'{self.pipeline}' (hash {self.hash})",
                 f"  carried over: {len(self.carried)} buffer(s): {_listing(self.carried, 8)}",
                 f"  new (created in the next step): {_listing(self.new, 8)}",
                 f"  dropped: {_listing(self.dropped, 8)}"]
        for n, why in sorted(self.reset.items()):
            lines.append(f"  reset {n}: {why}")
        if self.node_state_dropped:
            lines.append(f"  node state dropped: {_listing(self.node_state_dropped, 8)}")
        if self.hyperparams_added:
            lines.append(f"  hyperparameters added (this optimizer's values): {', '.join(self.hyperparams_added)}")
        if self.hyperparams_removed:
            lines.append(f"  hyperparameters removed from the param groups: {', '.join(self.hyperparams_removed)}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One sentence for the warning."""
        parts = [f"{len(self.carried)} buffer(s) carried over"]
        if self.dropped:
            parts.append(f"dropped: {_listing(self.dropped, 6)}")
        if self.new:
            parts.append(f"new (they start afresh in the next step): {_listing(self.new, 6)}")
        if self.reset:
            parts.append("reset because their op or buffers changed: " + _listing(sorted(self.reset), 4))
        if self.node_state_dropped:
            parts.append(f"node state dropped: {_listing(self.node_state_dropped, 4)}")
        if self.hyperparams_added:
            parts.append(f"hyperparameters added: {', '.join(self.hyperparams_added)}")
        if self.hyperparams_removed:
            parts.append(f"hyperparameters removed: {', '.join(self.hyperparams_removed)}")
        return (f"loaded a state dict of another version of the pipeline ('{self.saved_pipeline}', hash "
                f"{self.saved_hash}) into '{self.pipeline}' (hash {self.hash}): " + "; ".join(parts))


# --------------------------------------------------------------------------- what a state dict records
def state_meta(prog: "Program") -> dict[str, Any]:
    """The pipeline's identity that ``state_dict()`` stores beside the state: name, hash,
    state schema, hyperparameter names and the structural description (for the diff)."""
    return {"pipeline": prog.name, "pipeline_hash": prog.hash, "schema": prog.state_schema(),
            "hyperparams": list(prog.hyperparams), "structure": describe(prog)}


# --------------------------------------------------------------------------- shapes
def expected_shape(prog: "Program", node: str, shape: tuple[int, ...], buffer: str | None = None
                   ) -> tuple[int, ...] | None:
    """The shape of ``node``'s buffer ``buffer`` for a parameter of ``shape``, from the op's
    declaration (``Buffer.shape``) at the shape the node sees: the parameter's, or the shape
    the enclosing block ops (``galore``) hand their inner pipeline. ``None`` where it is not
    known: a buffer the op does not declare for these arguments (``project_out``'s basis,
    which the user sets), or no buffer for a parameter of this shape. A state cell that
    starts from a reduction has that reduction's shape (Adafactor's per-row moment)."""
    n = prog.find_node(node)
    if n is None or not n.is_op:
        return None
    for name, op, const, shp in prog.state_layout(n.route, tuple(shape)):
        if name != node:
            continue
        bufs = op.buffers_for(const)
        if buffer is None:  # the first buffer of the parameter's shape
            return tuple(shp) if any(b.shape is None for b in bufs) else None
        for b in bufs:
            if b.name == buffer:
                try:
                    return b.shape_for(tuple(shp), const)
                except (KeyError, TypeError, ValueError):
                    return None
        return None
    return None


def _split(key: str) -> tuple[str, str] | None:
    """``"main/adam.m"`` -> ``("main/adam", "m")``; None for ``"step"`` (buffer names have no dot)."""
    node, dot, buf = key.rpartition(".")
    return (node, buf) if dot and node else None


def _param_label(names: list[str | None], i: int) -> str:
    return f"'{names[i]}'" if names[i] else f"number {i}"


def saved_meta(sd: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``"gradpipe"`` entry of a state dict: at the top, or, in a dict that passed through
    ``torch.distributed.checkpoint`` (which keeps only ``state`` and ``param_groups``), the copy the
    first param group carries (``Optimizer.state_dict``); None for a dict with neither."""
    meta = sd.get("gradpipe")
    if meta is None:
        groups = sd.get("param_groups")
        if isinstance(groups, list) and groups and isinstance(groups[0], Mapping):
            meta = groups[0].get("gradpipe")
    return meta if isinstance(meta, Mapping) else None


def _meta_of_entryless(prog: "Program", sd: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``"gradpipe"`` entry of a state dict of this pipeline that lost it, or None.

    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only ``state`` and
    ``param_groups``, keyed by parameter name, and when flattened only the group keys the live
    optimizer has, so the copy the first group carries (:func:`saved_meta`) is lost. A dict whose
    per-parameter keys are all this pipeline's own (``node.buffer`` of a node it has, and
    ``step``) is taken as saved by it: its identity is this pipeline's. What it does not hold
    (the node state, such as ``noise``'s generator, and the non-finite counters) starts afresh.
    A dict with no per-parameter state is this pipeline's only when the pipeline keeps none."""
    keys = {k for st in sd["state"].values() for k in st if k != "step"}
    for k in keys:
        parts = _split(k) if isinstance(k, str) else None
        if parts is None or prog.find_node(parts[0]) is None:
            return None
    if not keys and prog.state_schema():
        return None
    return {**state_meta(prog), "node_state": {}}


# --------------------------------------------------------------------------- loading
def load_state(opt: "Optimizer", state_dict: Mapping[str, Any],
               torch_load: Callable[[dict[str, Any]], None]) -> StateMigration:
    """Load ``state_dict`` into ``opt`` (see the module docstring); ``torch_load`` is
    ``torch.optim.Optimizer.load_state_dict`` bound to ``opt`` (it loads the param groups).

    Everything is checked before anything changes: a refused state dict leaves the
    optimizer as it was."""
    prog = opt.program
    meta = saved_meta(state_dict)
    if isinstance(state_dict.get("param_groups"), list):  # the entry the first group carries is no hyperparameter
        state_dict = {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != "gradpipe"}
                                                     if isinstance(g, Mapping) else g
                                                     for g in state_dict["param_groups"]]}
    from .torch_state import from_torch_state_dict, is_torch_state_dict
    lost: list[str] = []
    if meta is None and is_torch_state_dict(state_dict):
        meta = _meta_of_entryless(prog, state_dict)  # gradpipe's own, through DCP
        if meta is not None:
            lost = [n for n in state_of_schema(prog.state_schema()) if prog.node(n).impl.has_node_state]
        else:  # torch.optim's, of the same algorithm
            state_dict = from_torch_state_dict(prog, state_dict)
            meta = state_dict["gradpipe"]
    if meta is None:
        raise GradError("this state dict was not saved by a gradpipe Optimizer", prog.file_span(),
                        "load a state dict saved from gradpipe.Optimizer.state_dict()")
    saved = state_of_schema(meta.get("schema", []))
    ours = state_of_schema(prog.state_schema())
    saved_name, saved_hash = meta.get("pipeline"), meta.get("pipeline_hash")
    if not related_state(saved, ours):
        def keeps(st: Mapping[str, Any]) -> str:
            names = [f"{n}.{b}" for n in sorted(st) for b in st[n]["buffers"]] + \
                    [f"{n} (node state)" for n in sorted(st) if not st[n]["buffers"]]
            return _listing(names, 4) if names else "no state"
        raise GradError(f"this state dict is from another pipeline ('{saved_name}', hash {saved_hash}) whose state "
                        f"does not match '{prog.name}' (hash {prog.hash}): no node keeps state in both; it keeps "
                        f"{keeps(saved)}, '{prog.name}' keeps {keeps(ours)}", prog.file_span(),
                        "load it into an Optimizer built from the same .grad pipeline, or from an edit of it "
                        "that keeps one of its stateful nodes (`gradpipe diff` shows what changed)")
    sd = {k: v for k, v in state_dict.items() if k != "gradpipe"}
    from .optimizer import check_torch_options
    for i, group in enumerate(sd.get("param_groups", [])):
        extra = {k: v for k, v in group.items() if k in prog.hyperparams}
        prog.check_hyperparams(extra, f"the loaded param group {i}")
        # torch's options (maximize, foreach, ...) at values this pipeline does not implement are
        # refused; any other key is the user's metadata and is loaded as saved, as torch does
        saved_hps = set(meta.get("hyperparams") or ())  # the saved pipeline's own hyperparameter of that name
        check_torch_options(prog, {k: v for k, v in group.items() if k not in saved_hps},
                            f"the loaded param group {i}", loading=True)
    saved_groups = sd.get("param_groups", [])
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, opt.param_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")

    # the decision per stateful node
    carry, reset = set(), {}
    for n in set(saved) & set(ours):
        if saved[n]["op"] != ours[n]["op"]:
            reset[n] = f"its op changed from {saved[n]['op']} to {ours[n]['op']}"
        elif list(saved[n]["buffers"]) != list(ours[n]["buffers"]):
            reset[n] = (f"its buffers changed from {','.join(saved[n]['buffers']) or '(none)'} "
                        f"to {','.join(ours[n]['buffers']) or '(none)'}")
        else:
            carry.add(n)
    saved_ops = {n: d["op"] for n, d in meta.get("structure", {}).get("nodes", {}).items() if d.get("kind") == "op"}

    def keep_key(key: str) -> bool:
        parts = _split(key)
        if parts is None:
            return True  # "step"
        node = parts[0]
        if node in saved or node in ours:
            return node in carry
        # state outside the schema (project_out's basis, set by the user): kept while its node is
        n = prog.find_node(node)
        if n is None or not n.is_op:
            return False
        return saved_ops.get(node, n.op) == n.op

    # the state per parameter, shape-checked, before anything changes
    saved_state = sd.get("state", {})
    saved_ids = [i for grp in saved_groups for i in grp["params"]]
    params = [p for grp in opt.param_groups for p in grp["params"]]
    names = [n for grp in opt.param_groups for n in (grp.get("param_names") or [None] * len(grp["params"]))]
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    carried_keys, dropped_keys = set(), set()
    for i, (pid, p) in enumerate(zip(saved_ids, params)):
        if pid not in saved_state:
            continue
        st = {}
        for k, v in saved_state[pid].items():
            if not keep_key(k):
                dropped_keys.add(k)
                continue
            parts = _split(k)
            if parts is not None and isinstance(v, torch.Tensor) and prog.find_node(parts[0]) is not None:
                # a complex parameter's state is in its real layout (torch.view_as_real: a last dim of 2)
                shape = tuple(p.shape) + ((2,) if p.is_complex() else ())
                want = expected_shape(prog, parts[0], shape, parts[1])
                if want is not None and tuple(v.shape) != want:
                    raise GradError(f"the state dict's buffer '{k}' of parameter {_param_label(names, i)} has shape "
                                    f"{tuple(v.shape)}, but this optimizer needs {want} "
                                    f"(the parameter's shape is {tuple(p.shape)}"
                                    f"{', complex, stepped as real ' + str(shape) if p.is_complex() else ''})",
                                    prog.node(parts[0]).span,
                                    "load the state dict into an optimizer over the same model; if you changed "
                                    "this op's arguments (such as a rank), its state cannot be carried over")
                carried_keys.add(k)
            st[k] = (v.detach().clone().to(device="cpu" if k == "step" else p.device)
                     if isinstance(v, torch.Tensor) else v)
        new_state[p] = st

    # now change the optimizer: the groups through torch, then the state
    before = [dict(grp) for grp in opt.param_groups]
    torch_load({**sd, "state": {}})
    saved_hps = meta.get("hyperparams")
    added_hps, removed_hps = set(), set()
    for grp, old in zip(opt.param_groups, before):
        for h in prog.hyperparams:
            if h not in grp and h in old:
                grp[h] = old[h]
                added_hps.add(h)
        for h in saved_hps or []:
            if h not in prog.hyperparams and h in grp:
                del grp[h]
                removed_hps.add(h)
    for p, st in new_state.items():
        opt.state[p] = st
    carried_ns, dropped_ns = [], []
    for node, saved_ns in meta.get("node_state", {}).items():
        if node not in carry:
            dropped_ns.append(node)
            continue
        n = prog.node(node)
        op = n.impl
        ns = opt._node_state.setdefault(node, op.init_node_state(Args(n.const)))
        op.load_node_state_dict(ns, saved_ns)
        carried_ns.append(node)
    for node in list(opt._node_state):
        if node in ours and (node not in carry or node in lost):  # new, reset or not saved: initialised again
            del opt._node_state[node]
    if lost:
        warnings.warn(f"this state dict has no 'gradpipe' entry, at the top or in its first param group (a "
                      f"flattened torch.distributed.checkpoint dict keeps only the live optimizer's group keys), "
                      f"so the state that '{prog.name}' keeps outside the parameters starts afresh: "
                      f"{_listing(sorted(lost), 4)}", StateMigrationWarning, stacklevel=3)

    schema_bufs = {f"{n}.{b}" for n in carry for b in ours[n]["buffers"]}
    report = StateMigration(
        saved_pipeline=str(saved_name), saved_hash=str(saved_hash), pipeline=prog.name, hash=prog.hash,
        carried=sorted(schema_bufs | {k for k in carried_keys if _split(k) is not None}),
        new=sorted(f"{n}.{b}" for n in ours if n not in carry for b in ours[n]["buffers"]),
        dropped=sorted(dropped_keys | {f"{n}.{b}" for n in saved if n not in carry for b in saved[n]["buffers"]}),
        reset=dict(sorted(reset.items())),
        node_state_carried=sorted(carried_ns), node_state_dropped=sorted(dropped_ns),
        hyperparams_added=sorted(added_hps), hyperparams_removed=sorted(removed_hps),
        diff=diff_descriptions(meta["structure"], describe(prog)) if "structure" in meta else None)
    if report.changed:
        warnings.warn(report.summary(), StateMigrationWarning, stacklevel=3)
    return report
