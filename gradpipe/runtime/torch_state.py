"""State dicts shared with ``torch.optim`` (Adam, AdamW, SGD, RMSprop).

A pipeline is *torch-equivalent* when its structure is one of torch's algorithms:
one route, a chain of ``grad | decay? | adam | decay?`` (Adam: the decay before
``adam``; AdamW: after), ``grad | decay? | momentum?`` (SGD) or
``grad | decay? | rms | momentum?`` (RMSprop; the ``momentum`` without Nesterov or
dampening), where ``grad`` may be ``where(maximize, -grad, grad)`` with ``maximize`` a
boolean hyperparameter (torch's option); or when its graph is that of the built-in
``adam`` or ``adamw`` pipeline (written from EMAs and a state cell, with ``amsgrad``,
``maximize`` and, for Adam, ``decoupled_weight_decay``: :data:`TEMPLATES`).
For a chain, :func:`torch_layout` derives, from the ops that appear (not from the file
name), which buffer is which torch key:

======== ===================== ======================
op       gradpipe buffer       torch.optim state key
======== ===================== ======================
adam     ``m``, ``v``          ``exp_avg``, ``exp_avg_sq``
momentum ``buf``               ``momentum_buffer``
rms      ``v``, ``g_avg``      ``square_avg``, ``grad_avg``
======== ===================== ======================

and the step counter is ``step`` (torch's SGD keeps none). The buffers have the same
meaning on both sides (``momentum``'s first step copies its input, as torch's SGD and
RMSprop do; ``rms`` and ``adam`` start from zero). Each op argument is either a
hyperparameter of torch's name (``betas[0]``, ``momentum``: the param group's value
carries) or a constant, which must equal the torch param group's value; a torch option
the pipeline has no node for must be at its no-op value (``weight_decay=0`` without a
``decay``, ``momentum=0`` without a ``momentum``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..compiler.diff import describe
from ..dsl.diagnostics import GradError

if TYPE_CHECKING:
    from ..compiler.program import Program
    from .optimizer import Optimizer

__all__ = ["TorchLayout", "torch_layout", "is_torch_state_dict", "from_torch_state_dict", "to_torch_state_dict"]

#: per op: its buffers' torch state keys
BUFFER_KEYS: dict[str, dict[str, str]] = {
    "adam": {"m": "exp_avg", "v": "exp_avg_sq"},
    "momentum": {"buf": "momentum_buffer"},
    "rms": {"v": "square_avg", "g_avg": "grad_avg"},
}
#: per op: its arguments' torch param-group keys (``(key, index)`` for an element of a tuple)
ARG_KEYS: dict[str, dict[str, tuple[str, int | None]]] = {
    "adam": {"b1": ("betas", 0), "b2": ("betas", 1), "eps": ("eps", None)},
    "momentum": {"beta": ("momentum", None), "nesterov": ("nesterov", None), "dampening": ("dampening", None)},
    "rms": {"alpha": ("alpha", None), "eps": ("eps", None), "centered": ("centered", None)},
    "decay": {"wd": ("weight_decay", None)},
}
#: built-in pipelines that are torch algorithms written from primitives (not a chain of ops):
#: a pipeline with the same graph (node for node) is that algorithm, with these buffers
#: (``node.buffer`` -> torch key) and these param-group keys it implies
TEMPLATES: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "adam": ("Adam", {"main/exp_avg/ema.m": "exp_avg", "main/exp_avg_sq/ema.m": "exp_avg_sq",
                      "main/max_exp_avg_sq.value": "max_exp_avg_sq"}, {}),
    "adamw": ("AdamW", {"main/exp_avg/ema.m": "exp_avg", "main/exp_avg_sq/ema.m": "exp_avg_sq",
                        "main/max_exp_avg_sq.value": "max_exp_avg_sq"}, {"decoupled_weight_decay": True}),
}
_template_nodes: dict[str, dict[str, Any]] = {}
#: what each algorithm keeps per parameter (for the messages), and its param-group keys
_KEEPS = {"Adam": "exp_avg/exp_avg_sq", "AdamW": "exp_avg/exp_avg_sq", "SGD": "momentum_buffer",
          "RMSprop": "square_avg (grad_avg, momentum_buffer)"}
_FAMILY = {"Adam": "Adam", "AdamW": "Adam", "SGD": "SGD", "RMSprop": "RMSprop"}
#: state keys of other torch.optim algorithms, to name a dict gradpipe cannot load
_OTHER_KEYS = {"sum": "Adagrad", "acc_delta": "Adadelta", "exp_inf": "Adamax", "mu_product": "NAdam",
               "prev": "Rprop", "eta": "ASGD", "ax": "ASGD", "max_exp_avg_sq": "Adam with amsgrad=True",
               "exp_avg_sq_row": "Adafactor", "old_dirs": "LBFGS"}


@dataclass
class TorchLayout:
    """How a torch-equivalent pipeline's state and param groups are torch's.

    ``buffers``: ``"node.buffer"`` -> torch state key; ``step``: whether torch keeps a
    step counter; ``fixed``: torch group key -> the value the pipeline fixes (a constant
    argument, or the no-op value of an option it has no node for); ``flags``: torch keys
    the pipeline implies (``amsgrad``, ``decoupled_weight_decay``)."""

    algorithm: str
    buffers: dict[str, str] = field(default_factory=dict)
    step: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)

    def keeps(self) -> str:
        if not self.buffers:
            return "no buffers (plain SGD)"
        return (", ".join(self.buffers.values()) + f" ({self.algorithm}-like: "
                + ", ".join(self.buffers) + ")")


def _template(nodes: Mapping[str, Any]) -> TorchLayout | None:
    """The layout of the built-in pipeline in :data:`TEMPLATES` whose graph is ``nodes``, if any."""
    from ..compiler.program import load
    for name, (algorithm, buffers, flags) in TEMPLATES.items():
        if name not in _template_nodes:
            _template_nodes[name] = describe(load(name))["nodes"]
        if nodes == _template_nodes[name]:
            return TorchLayout(algorithm, buffers=dict(buffers), flags=dict(flags))
    return None


def _maximize_head(nodes: Mapping[str, Any], cur: str | None, prog: "Program") -> str | None:
    """The ``grad`` node when ``cur`` is ``where(maximize, -grad, grad)`` (torch's ``maximize``
    as a boolean hyperparameter of that name), else None."""
    n = nodes.get(cur) if cur is not None else None
    if n is None or n["op"] != "where" or n["args"].get("cond") != "maximize":
        return None
    hp = prog.hyperparams.get("maximize")
    lhs, rhs = n["inputs"].get("lhs"), n["inputs"].get("rhs")
    if hp is None or hp.kind != "bool" or rhs is None or nodes[rhs]["op"] != "grad" or lhs is None \
            or nodes[lhs]["op"] != "neg" or nodes[lhs]["inputs"] != {"lhs": rhs}:
        return None
    return rhs


def torch_layout(prog: "Program") -> TorchLayout | str:
    """The pipeline's :class:`TorchLayout`, or why it has no torch.optim equivalent."""
    d = describe(prog)
    if list(d["routes"]) != ["main"]:
        return "it has more than one route"
    nodes = d["nodes"]
    lay_t = _template(nodes)
    if lay_t is not None:
        return lay_t
    if any(n.get("block") for n in nodes.values()):
        return "it has block ops"
    chain: list[str] = []
    cur = nodes.get("main/out", {}).get("inputs", {}).get("x")
    while cur is not None and nodes[cur]["kind"] == "op":
        if list(nodes[cur]["inputs"]) != ["x"]:
            return f"its node {cur} ({nodes[cur]['op']}) reads more than one input"
        chain.insert(0, cur)
        cur = nodes[cur]["inputs"]["x"]
    ops_ = [nodes[n]["op"] for n in chain]
    head = _maximize_head(nodes, cur, prog)
    arith = sum(n["kind"] == "arith" for n in nodes.values())
    if head is not None and arith == 2:
        cur = head
    elif arith:
        return "it is not a single chain of ops from grad"
    if cur is None or nodes[cur]["op"] != "grad" or len(chain) != sum(n["kind"] == "op" for n in nodes.values()):
        return "it is not a single chain of ops from grad"
    unknown = sorted({o for o in ops_ if o not in ARG_KEYS})
    if unknown:
        return f"it uses {', '.join(unknown)}, which torch.optim's Adam, AdamW, SGD and RMSprop do not have"
    core = [o for o in ops_ if o != "decay"]
    if ops_.count("decay") > 1:
        return "it decays twice"
    decay_at = ops_.index("decay") if "decay" in ops_ else None
    if core == ["adam"]:
        algorithm = "AdamW" if decay_at is not None and decay_at > ops_.index("adam") else "Adam"
    elif core in ([], ["momentum"]):
        algorithm = "SGD"
    elif core in (["rms"], ["rms", "momentum"]):
        algorithm = "RMSprop"
    else:
        return f"its ops ({' | '.join(ops_)}) are not Adam, AdamW, SGD or RMSprop"
    if algorithm != "AdamW" and decay_at not in (None, 0):
        return "its decay comes after the scale rule (decoupled weight decay), which only AdamW has"
    lay = TorchLayout(algorithm, step=algorithm != "SGD")
    if algorithm in ("Adam", "AdamW"):
        lay.flags = {"amsgrad": False}
        if "decay" in ops_:  # without a decay (weight_decay=0) AdamW's flag makes no difference
            lay.flags["decoupled_weight_decay"] = algorithm == "AdamW"
    for name in chain:
        n, op = prog.node(name), nodes[name]["op"]
        kept = set(prog.node_buffers(name, at_defaults=False))  # rms(centered=false) keeps no g_avg
        for buf, key in BUFFER_KEYS.get(op, {}).items():
            if buf in kept:
                lay.buffers[f"{name}.{buf}"] = key
        for arg, (key, idx) in ARG_KEYS[op].items():
            const = n.const.get(arg)
            expr = str(nodes[name]["args"].get(arg, ""))
            want_expr = key if idx is None else f"{key}[{idx}]"
            if arg in n.const:
                if algorithm == "RMSprop" and op == "momentum" and arg != "beta":
                    if const:  # torch's RMSprop momentum has no Nesterov and no dampening
                        return f"its momentum has {arg}={const}, which torch's RMSprop does not have"
                    continue
                if idx is None:
                    lay.fixed[key] = const
                else:
                    lay.fixed.setdefault(key, [None, None])[idx] = const
            elif expr != want_expr:
                return f"{name}'s argument {arg} is `{expr}`, not the hyperparameter {want_expr} torch has"
            elif key not in prog.hyperparams:
                return f"it has no hyperparameter {key}"
            elif algorithm == "RMSprop" and op == "momentum" and arg != "beta":
                return f"its momentum's {arg} is a hyperparameter, which torch's RMSprop does not have"
    if "betas" in lay.fixed:
        if None in lay.fixed["betas"]:
            return "its adam takes one beta from the hyperparameter betas and fixes the other"
        lay.fixed["betas"] = tuple(lay.fixed["betas"])
    # torch options the pipeline has no node for: only their no-op values
    if "decay" not in ops_:
        lay.fixed.setdefault("weight_decay", 0)
    if "momentum" not in ops_ and algorithm in ("SGD", "RMSprop"):
        lay.fixed.setdefault("momentum", 0)
        if algorithm == "SGD":
            lay.fixed.setdefault("nesterov", False)
    return lay


def is_torch_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has torch's shape (``state`` and ``param_groups``) and no ``"gradpipe"`` entry."""
    if not isinstance(sd, Mapping) or "gradpipe" in sd:
        return False
    groups, state = sd.get("param_groups"), sd.get("state")
    return isinstance(groups, list) and all(isinstance(g, Mapping) for g in groups) \
        and isinstance(state, Mapping) and all(isinstance(st, Mapping) for st in state.values())


def _what_dict(sd: Mapping[str, Any], known: frozenset[str] = frozenset()) -> tuple[str | None, str]:
    """(torch's algorithm family or None, words for the message) of a torch state dict;
    ``known``: state keys the pipeline keeps (``max_exp_avg_sq`` is then Adam's)."""
    keys = sorted({k for st in sd["state"].values() if isinstance(st, Mapping) for k in st if k != "step"})
    groups = sd["param_groups"]
    gkeys = set().union(*(set(g) for g in groups)) if groups else set()
    others = sorted({_OTHER_KEYS[k] for k in keys if k in _OTHER_KEYS and k not in known})
    if others:
        fam, like = None, f"like {', '.join(others)}"
    elif {"exp_avg", "exp_avg_sq"} & set(keys) or "betas" in gkeys:
        fam, like = "Adam", "Adam-like"
    elif "square_avg" in keys or {"alpha", "centered"} <= gkeys:
        fam, like = "RMSprop", "RMSprop-like"
    elif "momentum_buffer" in keys or {"dampening", "nesterov"} <= gkeys:
        fam, like = "SGD", "SGD-like"
    else:
        fam, like = None, "of an unknown algorithm"
    held = f"with {'/'.join(keys)} per parameter" if keys else "with no state per parameter"
    return fam, f"this is a torch.optim state dict {held} ({like})"


def _refuse(prog: "Program", message: str, hint: str) -> GradError:
    return GradError(message, prog.file_span(), hint)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) \
            and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        a = a.item()
    if isinstance(b, torch.Tensor):
        b = b.item()
    return a == b


def from_torch_state_dict(prog: "Program", sd: Mapping[str, Any]) -> dict[str, Any]:
    """A torch.optim state dict as one this pipeline saves (GradError when the algorithms differ)."""
    from .migration import state_meta
    lay = torch_layout(prog)
    fam, what = _what_dict(sd, frozenset(lay.buffers.values()) if not isinstance(lay, str) else frozenset())
    if isinstance(lay, str):
        raise _refuse(prog, f"{what}; pipeline '{prog.name}' has no torch.optim equivalent: {lay}",
                      "load it into a gradpipe.Optimizer of the same algorithm (adam, adamw, sgd, rmsprop)")
    hint = f"load it into a gradpipe.Optimizer of the same algorithm ('{prog.name}' is {lay.algorithm}-like)"
    torch_keys = set(lay.buffers.values())
    state_keys = {k for st in sd["state"].values() if isinstance(st, Mapping) for k in st if k != "step"}
    if fam != _FAMILY[lay.algorithm] or not state_keys <= torch_keys:
        extra = sorted(state_keys - torch_keys)
        raise _refuse(prog, f"{what}; pipeline '{prog.name}' keeps {lay.keeps()}"
                      + (f", not {'/'.join(extra)}" if extra and fam == _FAMILY[lay.algorithm] else ""), hint)
    groups = []
    for i, g in enumerate(sd["param_groups"]):
        g = dict(g)
        for key, want in {**lay.fixed, **lay.flags}.items():
            if key in prog.hyperparams or key not in g:
                continue
            have = g.pop(key)
            if not _same(have, want):
                raise _refuse(prog, f"{what} and {key}={have!r} in param group {i}; pipeline '{prog.name}' "
                              f"({lay.algorithm}-like) has {key}={want!r}", hint)
        if lay.algorithm in ("Adam", "AdamW") and "decoupled_weight_decay" not in prog.hyperparams:
            g.pop("decoupled_weight_decay", None)  # without a decay node (weight_decay=0), no difference
        groups.append(g)
    by_key = {v: k for k, v in lay.buffers.items()}
    params = {i: None for g in groups for i in g.get("params", [])}
    state: dict[Any, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        out = {}
        for k, v in st.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor) and v.is_complex():
                v = torch.view_as_real(v)  # gradpipe keeps a complex parameter's state in its real layout
            if k == "step":
                if lay.step:
                    out["step"] = v.detach().to(torch.float32) if isinstance(v, torch.Tensor) \
                        else torch.tensor(float(v))
            else:
                out[by_key[k]] = v
        if out or pid in params:
            state[pid] = out
    return {"state": state, "param_groups": groups,
            "gradpipe": {"format": 1, **state_meta(prog), "node_state": {}, "from_torch": lay.algorithm}}


def to_torch_state_dict(opt: "Optimizer") -> dict[str, Any]:
    """``opt``'s state dict as the torch.optim optimizer of its algorithm saves it (the buffers
    copied, so that the torch optimizer that loads it and ``opt`` do not share them)."""
    prog = opt.program
    lay = torch_layout(prog)
    if isinstance(lay, str):
        raise GradError(f"pipeline '{prog.name}' has no torch.optim equivalent: {lay}", prog.file_span(),
                        "to_torch_state_dict works for pipelines of torch's Adam, AdamW, SGD and RMSprop; "
                        "use state_dict() to save this one")
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    groups, group_of = [], {}
    for g in sd["param_groups"]:
        g = {k: v for k, v in g.items() if k != "gradpipe"}  # gradpipe's entry, carried for DCP
        for key, want in {**lay.fixed, **lay.flags}.items():
            if key not in prog.hyperparams:
                g[key] = want
        if lay.algorithm in ("Adam", "AdamW"):
            g.setdefault("decoupled_weight_decay", False)
        groups.append(g)
        for pid in g["params"]:
            group_of[pid] = g
    state = {}
    for pid, st in sd["state"].items():
        g, p = group_of[pid], params[pid]
        out = {}
        if lay.step and "step" in st:
            out["step"] = torch.as_tensor(st["step"], dtype=torch.float32).clone()
        for k, key in lay.buffers.items():
            v = st.get(k)
            if v is None or (key == "grad_avg" and not g.get("centered")) \
                    or (key == "momentum_buffer" and not g.get("momentum")):
                continue
            if p.is_complex() and not v.is_complex():
                v = torch.view_as_complex(v.contiguous())
            out[key] = v.detach().clone()  # a copy: torch's load_state_dict keeps the tensors it is given
        if out:  # torch keeps no state for a parameter of plain SGD
            state[pid] = out
    return {"state": state, "param_groups": groups}
