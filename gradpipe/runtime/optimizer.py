"""``gradpipe.Optimizer``: a ``torch.optim.Optimizer`` that runs a `.grad` pipeline."""

from __future__ import annotations

import os
import pathlib
from collections import OrderedDict, defaultdict
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..compiler.ops import Args
from ..compiler.program import Program, builtin_names, compile as compile_source, load
from ..compiler.ir import Kind
from ..dsl.diagnostics import GradError, did_you_mean
from .compiled import CompiledRoutes
from .eager import DTensor, RouteBatch, run_route
from .interpret import apply_param, apply_update, compute_dtype
from .nonfinite import NonFiniteGuard
from .perturb import check_closure, perturbed_grads
from .rollback import SavedCopies, StepRecord
from .step_plan import counter_mask, plan_next_step, planned_step

__all__ = ["Optimizer", "as_program", "BACKENDS", "TORCH_OPTIONS"]

#: ``eager``: the reference interpreter, op by op; ``compiled``: elementwise ops fused by
#: ``torch.compile`` over flat buffers (``gradpipe/runtime/compiled.py``)
BACKENDS = ("eager", "compiled")

_STATE_FORMAT = 1

#: torch.optim's constructor options (Adam, AdamW, SGD, RMSprop in torch 2.13) that change
#: nothing at these values. gradpipe accepts them at these values (as keyword arguments and in
#: param groups) and refuses any other value, unless the pipeline declares a hyperparameter of
#: that name (then it is that hyperparameter). ``foreach``/``fused`` also accept ``False``.
TORCH_OPTIONS: dict[str, Any] = {
    "foreach": None, "fused": None, "capturable": False, "differentiable": False, "maximize": False,
    "amsgrad": False, "decoupled_weight_decay": False, "nesterov": False, "centered": False,
}
#: the options every torch optimizer of those keeps in its param groups: gradpipe keeps them
#: too (at their defaults), so code that reads ``group["maximize"]`` works
GROUP_OPTIONS = ("maximize", "foreach", "capturable", "differentiable", "fused")

_OPTION_HINTS = {
    "maximize": "write it in the pipeline (negate the gradient first, e.g. `grad | scale(-1) | ...`), "
                "or declare `hparam maximize` and use it",
    "amsgrad": "write it in the pipeline (keep the running maximum of the second moment), "
               "or declare `hparam amsgrad` and use it",
    "decoupled_weight_decay": "use the 'adam' pipeline, which declares it ('adamw' is Adam with it true), "
                              "or write the decay in the pipeline",
    "nesterov": "write it in the pipeline, or declare `hparam nesterov` and use it",
    "centered": "write it in the pipeline (rms(centered=true)), or declare `hparam centered` and use it",
    "capturable": "gradpipe steps are not CUDA-graph capturable: leave capturable=False",
    "differentiable": "gradpipe steps are not differentiable: leave differentiable=False",
}


#: options that choose torch's kernels, never the math: any value is accepted (gradpipe picks its own)
KERNEL_OPTIONS = ("foreach", "fused")
#: options a state dict saved on a GPU may hold that change nothing once loaded here (torch too
#: loads a capturable=True dict into an optimizer that is not)
LOADABLE_OPTIONS = ("capturable", "differentiable")

#: torch.optim's hyperparameter names (torch 2.13's optimizers) and, for some, the value at which
#: torch's optimizers do nothing with them. In a param group of a pipeline that does not declare
#: one, another value is refused as an unknown hyperparameter: kept as metadata it would change
#: nothing, silently (a "decay / no_decay" group split on a pipeline without weight_decay)
TORCH_HYPERPARAMS: dict[str, Any] = {
    "weight_decay": 0, "momentum": 0, "dampening": 0, "lr_decay": 0, "initial_accumulator_value": 0,
    "betas": None, "eps": None, "alpha": None, "rho": None, "lambd": None, "momentum_decay": None,
    "etas": None, "step_sizes": None, "t0": None,
}


#: torch.optim options whose value is a word, each translated to the boolean hyperparameter a
#: pipeline declares for it: ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` is
#: ``match_rms_adamw=True`` in ``pipelines/muon.grad``
TORCH_CHOICES: dict[str, tuple[str, dict[Any, bool], str]] = {
    "adjust_lr_fn": ("match_rms_adamw", {None: False, "original": False, "match_rms_adamw": True},
                     "Adjust learning rate function {!r} is not supported"),
}


def translate_torch_choices(prog: Program, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with torch's word options (:data:`TORCH_CHOICES`) as the boolean hyperparameters
    the pipeline declares for them; torch's ValueError for a word torch does not know."""
    for k, (hp, words, message) in TORCH_CHOICES.items():
        if k in values and k not in prog.hyperparams and hp in prog.hyperparams:
            v = values.pop(k)
            if not isinstance(v, (str, type(None))) or v not in words:
                raise ValueError(message.format(v))
            values[hp] = words[v]
    return values


def torch_options(prog: Program) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch's options (:data:`TORCH_OPTIONS`) that ``prog`` does not declare, at the values where
    they change nothing for it, and those its param groups keep, at those values: the
    :data:`GROUP_OPTIONS`, and the keys of the torch.optim algorithm ``prog`` is, where it is one
    (``gradpipe/runtime/torch_state.py``): the ``adamw`` pipeline is torch's AdamW, so its groups
    hold ``decoupled_weight_decay=True``, as AdamW's do, and ``False`` (Adam's L2 decay) is refused."""
    from .torch_state import torch_layout
    lay = torch_layout(prog)
    implied = {} if isinstance(lay, str) else {k: v for k, v in lay.flags.items() if k in TORCH_OPTIONS}
    noop = {k: implied.get(k, v) for k, v in TORCH_OPTIONS.items() if k not in prog.hyperparams}
    kept = {k: noop[k] for k in (*GROUP_OPTIONS, *implied) if k in noop}
    return noop, kept


def _is_noop_option(name: str, value: Any, default: Any, loading: bool = False) -> bool:
    if name in KERNEL_OPTIONS or loading and name in LOADABLE_OPTIONS:
        return value is None or isinstance(value, bool)
    if default is None:
        return value is None or value is False
    if default is True:
        return value is True
    return value is False or (type(value) in (int, float) and value == 0)


def check_torch_options(prog: Program, values: Mapping[str, Any], origin: str, loading: bool = False) -> None:
    """Refuse a torch.optim option (``maximize=True``, ``capturable=True``, ...) at a value that
    would change what torch does, and a torch.optim hyperparameter (``weight_decay=0.1``) at a
    value that would do something, where the pipeline declares no hyperparameter of that name.
    ``loading``: the values come from a saved state dict (``capturable=True`` is then harmless)."""
    noop = torch_options(prog)[0]
    for k, v in values.items():
        if k in prog.hyperparams:
            continue
        if k in TORCH_OPTIONS and not _is_noop_option(k, v, noop[k], loading):
            has = (f"does not implement torch.optim's '{k}' option; gradpipe accepts it only at torch's "
                   f"default ({noop[k]!r}), where it changes nothing" if noop[k] is TORCH_OPTIONS[k] else
                   f"is the torch.optim algorithm with {k}={noop[k]!r} and accepts only that value")
            raise ValueError(f"{k}={v!r} (in {origin}): '{prog.name}' {has}. To get it, {_OPTION_HINTS[k]}")
        if k in TORCH_HYPERPARAMS and not (TORCH_HYPERPARAMS[k] is not None and type(v) in (int, float)
                                           and v == TORCH_HYPERPARAMS[k]):
            prog.check_hyperparams({k: v}, origin)  # the "unknown hyperparameter" GradError, with its hint


#: compiled Programs by (source, path): a copied or unpickled Optimizer rebuilds its Program
_PROGRAMS: dict[tuple[str, str], Program] = {}


def _program_from_source(source: str, path: str, want_hash: str) -> Program:
    key = (source, path)
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = compile_source(source, path)
        if len(_PROGRAMS) >= 32:
            _PROGRAMS.clear()
        _PROGRAMS[key] = prog
    if prog.hash != want_hash:
        raise ValueError(f"the pipeline '{prog.name}' compiles to hash {prog.hash} here, but the copied "
                         f"optimizer ran hash {want_hash} (another gradpipe version, or changed imports)")
    return prog


def as_program(pipeline: Program | str | pathlib.Path) -> Program:
    """A Program from a Program, a `.grad` path, a built-in name, or pipeline source text."""
    if isinstance(pipeline, Program):
        return pipeline
    if isinstance(pipeline, pathlib.Path):
        return load(pipeline)
    if not isinstance(pipeline, str):
        raise TypeError(f"pipeline must be a Program, a path, a built-in name or source text, "
                        f"not {type(pipeline).__name__}")
    text = pipeline.strip()
    if text.endswith(".grad") and "\n" not in text and _is_file(text):
        return load(text)  # a file, even in a folder whose name holds '(' or '=' ("runs (2)/adam.grad")
    if any(c in text for c in "|(=\n#"):
        return compile_source(pipeline)  # source text: no file or built-in name contains these
    if text in builtin_names() and not _is_file(text):
        return load(text)
    if text.endswith(".grad") or _is_file(text):
        return load(text)
    return compile_source(pipeline)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as a real view with a last dimension of 2 (``torch.view_as_real``, no
    copy: the update written into it is written into the parameter); others as they are."""
    if not t.is_complex():
        return t
    return torch.view_as_real(t.resolve_conj() if t.is_conj() else t)


def _is_file(text: str) -> bool:
    try:
        return pathlib.Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        return False


class Optimizer(torch.optim.Optimizer):
    """A torch optimizer whose update rule is a gradpipe pipeline.

    Args:
        params: what ``torch.optim`` accepts: an iterable of tensors, of
            ``(name, tensor)`` pairs (``model.named_parameters()``, needed to
            route by name), or of param-group dicts.
        pipeline: a :class:`~gradpipe.Program`, a path to a `.grad` file, a
            built-in pipeline name (``"adam"``), or pipeline source text.
        backend: ``"compiled"`` (the default): the pipeline's elementwise work fused by
            ``torch.compile`` over flat buffers (the state, and the gradients gathered
            each step; the parameters keep their own storage, see
            ``gradpipe/runtime/compiled.py``); or
            ``"eager"``, the reference interpreter, op by op. ``None`` reads the
            ``GRADPIPE_BACKEND`` environment variable (default ``compiled``). Both step DTensor
            parameters (FSDP2's ``fully_shard``), keeping the state as DTensors sharded as the
            parameters: the compiled backend fuses each rank's shards, and runs reductions over a
            tensor or over the route on the DTensors (``docs/works_with.md``, "FSDP2").
        **hyperparams: values for the pipeline's declared hyperparameters
            (``lr``, ``betas``, ...); they become the param groups' defaults, so
            LR schedulers and per-group overrides work as in torch. torch's options
            (``foreach``, ``fused``, ``capturable``, ``differentiable``, ``maximize``,
            ``amsgrad``, ...) are accepted at the values where they change nothing
            (:data:`TORCH_OPTIONS`), unless the pipeline declares a hyperparameter of that name.

    A param group may hold keys of its own (``"name": "encoder"``): any key that is not
    ``lr``, a declared hyperparameter or one of torch's options is kept as metadata, unless
    it looks like a misspelt hyperparameter (a did-you-mean ``GradError``). ``copy.deepcopy``
    and ``pickle`` work (the pipeline is compiled again from its source); complex parameters
    are stepped as their real and imaginary parts, as in torch.

    Each step applies ``p <- p - lr * u`` with ``u`` the pipeline's output for
    ``p``. State lives in ``self.state[p]`` under ``"<node>.<buffer>"`` names
    that come from the pipeline's structure, plus ``"step"``. Parameters in
    fp16/bf16 keep fp32 state and math.

    A step whose gradients hold NaN or Inf changes nothing and is counted
    (``nonfinite_steps``, ``consecutive_nonfinite``, ``last_step_skipped``); more
    than 10 in a row raise :class:`gradpipe.NonFiniteError`. The pipeline can
    say otherwise with ``skip_nonfinite(max_consecutive=N)`` or ``allow_nonfinite``, and
    with ``skip_nonfinite(updates=true)`` a step whose update is NaN or Inf is undone and
    counted too (``docs/language.md`` 5.12, ``gradpipe/runtime/nonfinite.py``).

    Example::

        opt = gradpipe.Optimizer(model.named_parameters(), "adamw", lr=3e-4)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Any], pipeline: Program | str | pathlib.Path = "adam", *,
                 backend: str | None = None, **hyperparams: Any) -> None:
        if backend is None:
            backend = os.environ.get("GRADPIPE_BACKEND", "compiled")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.program = as_program(pipeline)
        self.backend = backend
        self._compiled = CompiledRoutes(self.program) if backend == "compiled" else None
        self._nonfinite = NonFiniteGuard(self.program.nonfinite)  # skip_nonfinite / allow_nonfinite
        prog = self.program
        hyperparams = translate_torch_choices(prog, dict(hyperparams))
        check_torch_options(prog, hyperparams, "Optimizer(...)")
        values = prog.check_hyperparams({k: v for k, v in hyperparams.items()
                                         if k not in TORCH_OPTIONS or k in prog.hyperparams}, "Optimizer(...)")
        # torch's options that its optimizers keep in every param group, at their no-op values
        defaults = {**torch_options(prog)[1],
                    **{k: v for k, v in hyperparams.items() if k in TORCH_OPTIONS and k not in prog.hyperparams},
                    **prog.defaults(), **values}
        self._node_state: dict[str, dict[str, Any]] = {}
        self._routes: dict[torch.Tensor, str] = {}
        #: ids of the parameters of one route's step -> (flat counters, their 0-d views)
        self._counters: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        #: the copies a step under skip_nonfinite(updates=true) keeps (runtime/rollback.py)
        self._saved = SavedCopies()
        super().__init__(params, defaults)
        self._assign_routes()
        self._orders = {r.label: prog.route_nodes(r.label) for r in prog.routes}

    # ------------------------------------------------------------------ groups and routes
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        prog = self.program
        index = len(self.param_groups)
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        # keys the pipeline declares (and lr) are hyperparameters; torch's option names are
        # checked (no-op values only); any other key is the user's metadata ("name": "encoder"),
        # kept as it is, unless it looks like a misspelt hyperparameter
        param_group.update(translate_torch_choices(prog, {k: param_group.pop(k) for k in TORCH_CHOICES
                                                          if k in param_group}))
        extra = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        check_torch_options(prog, extra, f"param group {index}")
        for k in extra:
            if k not in prog.hyperparams and k not in TORCH_OPTIONS and did_you_mean(k, prog.hyperparams):
                prog.check_hyperparams({k: extra[k]}, f"param group {index}")  # the did-you-mean GradError
        checked = prog.check_hyperparams({k: v for k, v in extra.items() if k in prog.hyperparams},
                                         f"param group {index}")
        param_group.update(checked)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            prog.check_group(group, f"param group {index}")
            if hasattr(self, "_orders"):  # added after construction
                self._assign_routes()
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _named(self) -> list[tuple[str | None, torch.Tensor]]:
        out = []
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                out.append((names[i] if names else None, p))
        return out

    def _assign_routes(self) -> None:
        named = self._named()
        labels = self.program.assign_routes(named)
        self.program.check_shapes(named, labels)
        self._routes = {p: label for (_, p), label in zip(named, labels)}
        #: whether some parameter is listed twice (torch warns; both step it twice, see step())
        self._duplicates = len({id(p) for _, p in named}) != len(named)
        #: whether some parameter is complex (stepped as its real view, see _real)
        self._complex = any(p.is_complex() for _, p in named)
        if self._complex:
            self._refuse_complex_factoring(named)
        #: whether steps that read only ``p.grad`` run from step plans (``gradpipe/runtime/step_plan.py``)
        prog = self.program
        # (not under skip_nonfinite(updates=true), whose steps keep a record to undo, nor for FSDP2's
        # DTensors, whose segments run on each rank's shards: both take the general path)
        self._plannable = self._compiled is not None and not self._duplicates and not self._complex and \
            not prog.losses and "samples" not in prog.reads and not self.needs_closure and \
            not prog.nonfinite.updates and not any(isinstance(p, DTensor) for _, p in named)
        if self._compiled is not None:
            self._compiled.step_plans.clear()

    def _refuse_complex_factoring(self, named: list[tuple[str | None, torch.Tensor]]) -> None:
        """A complex parameter runs as its real view, whose last dimension holds the real and
        imaginary parts: a reduction over its rows or columns (Adafactor's factored moment)
        would mix them, so it is refused, as torch.optim.Adafactor refuses complex parameters."""
        for name, p in named:
            if not p.is_complex():
                continue
            for n in self.program.ir[self._routes[p]].all_nodes():
                if n.kind is Kind.ARITH and n.const.get("over") in ("rows", "cols"):
                    raise GradError(f"{'parameter ' + repr(name) if name else 'a parameter'} is complex, and its "
                                    f"route reduces over {n.const['over']} ('{n.op}')", n.span,
                                    "a complex parameter runs as its real view (real and imaginary parts in a last "
                                    "dimension of 2), which rows and columns would mix: route complex parameters "
                                    "to a pipeline without rows/cols reductions")

    def _param_label(self, p: torch.Tensor) -> str:
        """How an error names ``p``: its name from ``named_parameters``, else its position."""
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return f"parameter '{names[i]}'" if names else f"parameter number {i} of param group {gi}"
        return "a parameter"

    def route_of(self, p: torch.Tensor) -> str:
        """The label of the route that updates ``p``."""
        return self._routes[p]

    # ------------------------------------------------------------------ non-finite steps
    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped so far because a gradient held NaN or Inf, or (``skip_nonfinite(updates=true)``)
        the update did (kept in ``state_dict``)."""
        return self._nonfinite.total

    @property
    def consecutive_nonfinite(self) -> int:
        """Skipped steps since the last finite one; past ``skip_nonfinite(max_consecutive=...)``
        (10 by default) ``step()`` raises ``gradpipe.NonFiniteError``."""
        return self._nonfinite.consecutive

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped for a non-finite gradient or update (nothing changed)."""
        return self._nonfinite.last_skipped

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             losses: Mapping[str, torch.Tensor] | None = None,
             samples: Mapping[Any, torch.Tensor] | None = None) -> Any:
        """One optimizer step.

        Args:
            closure: re-evaluates the model and returns the loss (needed when the
                pipeline reads ``loss``, and when it reads ``grad_at``: then it is called
                twice, the second time with the parameters at the point, see
                :attr:`needs_closure`; the step returns the first call's loss).
            losses: for multi-loss pipelines, the named losses, e.g.
                ``opt.step(losses={"main": l1, "aux": l2})``. gradpipe computes one
                gradient per loss with autograd (``grads.main``, ``grads.aux``) and
                ``grad`` is their sum. Call it instead of ``backward()``.
            samples: for pipelines that read ``samples`` (DP-SGD), one gradient per
                example for each parameter, ``(B, *p.shape)``, keyed by parameter
                name (from ``named_parameters``) or by the tensor; e.g.
                ``opt.step(samples=gradpipe.per_sample_grads(model, loss_fn, x, y))``.
                ``grad`` is then their mean unless ``p.grad`` is set.
        """
        self._check_train_mode()
        if self.needs_closure:
            check_closure(self, closure, losses, samples)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prog = self.program
        named_grads, shared_of = self._loss_grads(losses) if losses is not None else (None, None)
        if prog.losses and named_grads is None:
            raise ValueError(f"the pipeline reads {', '.join('grads.' + n for n in sorted(prog.losses))}: "
                             "call opt.step(losses={...}) with those named losses")
        if loss is None and losses is not None:
            loss = sum(losses.values())
        by_sample = self._sample_grads(samples) if samples is not None else None
        if "samples" in prog.reads and by_sample is None:
            raise ValueError("the pipeline reads 'samples' (per-example gradients): call "
                             "opt.step(samples=gradpipe.per_sample_grads(model, loss_fn, inputs, targets))")
        if "loss" in prog.reads:
            if loss is None:
                raise ValueError("the pipeline reads 'loss': pass a closure that returns the loss to step(), "
                                 "or use step(losses={...})")
            loss_value = float(loss)
        else:
            loss_value = None  # float(loss) would synchronise with the device for nothing
        plannable = self._plannable and named_grads is None and by_sample is None
        if plannable and planned_step(self, loss_value):  # the layout of an earlier step: its plan
            return loss
        # A parameter listed twice (torch warns when the group is added) is stepped twice, as
        # torch.optim does: each repeat goes into a later pass, which sees the state the earlier left.
        passes: list[dict[str, list[tuple[torch.Tensor, dict[str, Any]]]]] = [defaultdict(list)]
        seen: dict[torch.Tensor, int] = {}
        for group in self.param_groups:
            prog.check_group(group, "a param group")
            present = self._grads_present(group["params"]) if named_grads is None and by_sample is None else None
            for j, p in enumerate(group["params"]):
                if named_grads is not None:
                    if p not in named_grads["grad"]:
                        continue
                elif by_sample is not None:
                    if p not in by_sample:
                        continue
                elif not present[j]:
                    continue
                elif p.grad.is_sparse:
                    raise RuntimeError(f"{self._param_label(p)} has a sparse gradient (nn.Embedding(sparse=True) "
                                       "or nn.EmbeddingBag(sparse=True)?), and gradpipe does not support sparse "
                                       "gradients: build that module with sparse=False, or give that parameter "
                                       "to torch.optim.SparseAdam")
                if not self._duplicates:
                    passes[0][self._routes[p]].append((p, group))
                    continue
                k = seen[p] = seen.get(p, -1) + 1
                if k == len(passes):
                    passes.append(defaultdict(list))
                passes[k][self._routes[p]].append((p, group))
        by_route = passes[0]
        # A gradient with NaN or Inf skips the whole step before anything runs (the pipeline's
        # skip_nonfinite policy, the default; runtime/nonfinite.py), or raises past its limit.
        checked = named_grads
        if self._complex:  # the check reads complex gradients as their real views (aminmax has no complex)
            if by_sample is not None:
                raise ValueError("step(samples=...) does not support complex parameters")
            plain = named_grads or {"grad": {p: p.grad for items in by_route.values() for p, _ in items}}
            checked = {k: {p: _real(g) for p, g in v.items()} for k, v in plain.items()}
        stepped_params = [p for items in by_route.values() for p, _ in items]
        if self._nonfinite.skip(self, stepped_params, checked, by_sample, loss_value):
            return loss
        perturbed = None
        if self.needs_closure:  # grad_at(point): the closure's second call, at the points (runtime/perturb.py)
            perturbed = perturbed_grads(self, by_route, closure, loss_value)
            if perturbed is None:  # a non-finite gradient at the point: skipped, nothing written
                return loss
        # skip_nonfinite(updates=true): keep what the step writes, check the updates before applying
        # any, and undo the step if one is not finite (runtime/rollback.py)
        record = self._step_record(stepped_params, passes)
        pending: list[tuple[list[torch.Tensor], list[dict[str, Any]], Callable[[], list[Any]], list[torch.Tensor],
                            Sequence[tuple[torch.Tensor, dict[str, Any]]], bool]] = []
        for by_route in passes:
            # Build every environment and check it before any state changes: a step that
            # fails leaves parameters, state and step counters as they were.
            plans = [(label, items, self._route_envs(items, loss_value)) for label, items in by_route.items()]
            for label, items, envs in plans:
                params = [p for p, _ in items]
                states = [self.state[p] for p in params]
                if named_grads is not None:
                    grads = {k: [v[p] for p in params] for k, v in named_grads.items()}
                elif by_sample is not None:
                    grads = {"samples": [by_sample[p] for p in params],
                             "grad": [p.grad if self._has_grad(p) else by_sample[p].mean(0) for p in params]}
                else:
                    grads = {"grad": [p.grad for p in params]}
                if perturbed is not None and prog.ir[label].grad_at is not None:
                    grads["grad_at"] = [perturbed[p] for p in params]
                shared = [shared_of[p] for p in params] if shared_of is not None else None
                stepped = params
                if self._complex:  # complex parameters run as their real and imaginary parts, as in torch
                    stepped = [_real(p) for p in params]
                    grads = {k: [_real(g) for g in v] for k, v in grads.items()}
                batch = RouteBatch(stepped, grads, envs, states, shared)
                if self._compiled is not None:
                    finish = self._compiled.prepare_route(label, batch, self._node_state, record)
                else:
                    updates = run_route(prog, label, batch, self._node_state, self._orders[label])
                    if record is not None:
                        record.check(stepped, updates)
                    finish = partial(list, updates)
                pending.append((label, params, states, finish, stepped, items))
                if record is None:
                    self._finish_route(*pending.pop())
        if record is not None:
            if record.bad():  # a non-finite update: undo the step (what the kernels wrote is put back), count it
                culprits = record.culprits()
                record.restore()
                self._nonfinite.skip_update(self, stepped_params, culprits)
                return loss
            record.commit()
            self._nonfinite.taken()
            for item in pending:
                self._finish_route(*item)
        if plannable:  # the next step of this layout runs from a plan
            plan_next_step(self, passes[0], loss_value)
        return loss

    def _step_record(self, params: Sequence[torch.Tensor], passes: Sequence[Any]) -> StepRecord | None:
        """Under ``skip_nonfinite(updates=true)``, a record of what this step may write (None otherwise,
        or when no parameter has a gradient); a parameter listed twice is refused."""
        policy = self._nonfinite.policy
        if not (policy.check and policy.updates and params):
            return None
        if len(passes) > 1:
            raise ValueError("skip_nonfinite(updates=true) cannot step a parameter listed twice in the param groups "
                             "(its second step would read the first one's update before it is checked): list each "
                             "parameter once")
        exclude = self._compiled.flat_state_check() if self._compiled is not None else None
        return StepRecord(self, params, self._saved, exclude)

    def _finish_route(self, label: str, params: list[torch.Tensor], states: list[dict[str, Any]],
                      finish: Callable[[], list[Any]], stepped: list[torch.Tensor],
                      items: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Count the step of one route's parameters and apply its updates (``finish`` applies what
        the compiled backend applies itself)."""
        updates = finish()
        self._count_step(params, states)  # the ops read the step from the environment
        self._apply_updates(label, stepped, updates, items)

    def _apply_updates(self, label: str, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor | None],
                       items: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """``p <- p - lr * u`` (or ``p <- u`` for ``param = EXPR``) for each update a route returned
        (None: the compiled backend applied it in place); ``p`` may be a complex one's real view."""
        writes_param = self.program.ir[label].writes_param
        for p, u, (_, group) in zip(params, updates, items):
            if u is None:
                continue
            if writes_param:
                apply_param(p, u)
                continue
            lr = group["lr"]
            apply_update(p, u, lr.item() if isinstance(lr, torch.Tensor) else lr)

    def _route_envs(self, items: Sequence[tuple[torch.Tensor, dict[str, Any]]], loss_value: float | None
                    ) -> list[dict[str, Any]]:
        """Per parameter of one route's step, its environment: the hyperparameters of its group,
        ``lr``, ``step`` and ``loss`` (one dict per distinct group and step), checked for the
        ranges that depend on the step."""
        prog = self.program
        envs, shared = [], {}
        for (p, group), done in zip(items, self._steps_done([p for p, _ in items])):
            step = done + 1
            env = shared.get((id(group), step))
            if env is None:
                env = {k: group[k] for k in prog.hyperparams}
                env.update(lr=group["lr"], step=step, loss=loss_value)
                prog.check_step_ranges(env)
                shared[(id(group), step)] = env
            envs.append(env)
        return envs

    #: True while ``step()`` calls the closure with the parameters at a ``grad_at`` point (its
    #: second call), False otherwise: a closure can leave BatchNorm's running statistics alone
    #: then, as davda54/sam's example does for SAM's second pass
    at_point: bool = False

    @property
    def needs_closure(self) -> bool:
        """Whether ``step()`` needs a closure, which it calls twice: the pipeline takes the gradient
        at another point (``grad_at``, SAM). A training loop passes one, as it does for
        ``torch.optim.LBFGS``: ``opt.step(closure)``."""
        return "grad_at" in self.program.reads

    def set_basis(self, param: torch.Tensor | str, basis: torch.Tensor) -> None:
        """Give ``param`` the protected input-space basis ``basis`` (``in × k``, orthonormal
        columns) of every ``project_out`` node on its route; it is saved in ``state_dict``.
        ``param`` is the tensor or its name from ``named_parameters``."""
        if isinstance(param, str):
            found = [p for name, p in self._named() if name == param]
            if not found:
                raise ValueError(f"no parameter named {param!r}")
            param = found[0]
        if param not in self._routes:
            raise ValueError("set_basis: the tensor is not a parameter of this optimizer")
        from ..compiler.ops.project_out import ProjectOut
        nodes = [n for n in self.program.ir[self._routes[param]].all_nodes()
                 if n.is_op and isinstance(n.impl, ProjectOut)]
        if not nodes:
            raise ValueError("the route of this parameter has no project_out node")
        checked = ProjectOut.basis_for(param, basis)
        for n in nodes:
            self.state[param][f"{n.name}.basis"] = checked.clone()

    def _sample_grads(self, samples: Mapping[Any, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Per-example gradients by parameter tensor, checked against the parameters' shapes."""
        by_name = {name: p for name, p in self._named() if name is not None}
        known = {p for _, p in self._named()}
        out: dict[torch.Tensor, torch.Tensor] = {}
        for key, g in samples.items():
            p = by_name.get(key) if isinstance(key, str) else key
            if p is None or p not in known:
                what = repr(key) if isinstance(key, str) else "a tensor"
                raise ValueError(f"step(samples=...) has {what}, which is not a parameter of this optimizer"
                                 + ("" if by_name else " (build it from model.named_parameters() to use names)"))
            if g.dim() != p.dim() + 1 or tuple(g.shape[1:]) != tuple(p.shape):
                raise ValueError(f"per-example gradients of a parameter of shape {tuple(p.shape)} must have "
                                 f"shape (B, {', '.join(map(str, p.shape))}), got {tuple(g.shape)}")
            out[p] = g.detach()
        return out

    # Step counters. Each parameter's ``state[p]["step"]`` is a 0-d float32 tensor, as in
    # torch.optim; here the counters of the parameters a route steps together are 0-d views of
    # one tensor, so reading them is one ``tolist()`` and counting a step one ``add_``, not one
    # tensor op per parameter. A step of some of a set's parameters (the others without a
    # gradient) counts them in the set with one masked ``add_``, so that the set, which the step
    # plan of the other layout holds, stays. Anything that replaces a counter (load_state_dict,
    # a parameter joining the set) is seen by identity, and the set is rebuilt from the values.
    _MAX_COUNTER_SETS = 8

    def _counter_set(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]] | None = None
                     ) -> torch.Tensor | None:
        """The flat tensor holding the counters of exactly ``params``, if they still hold its views."""
        entry = self._counters.get(tuple(map(id, params)))
        if entry is None:
            return None
        flat, views = entry
        states = states if states is not None else [self.state.get(p, {}) for p in params]
        return flat if all(st.get("step") is v for st, v in zip(states, views)) else None

    def _covering_counters(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]]
                           ) -> tuple[torch.Tensor, list[int] | None] | None:
        """A counter set whose views ``params`` hold: its flat tensor, and the places of ``params``
        in it (None when the set is exactly ``params``)."""
        flat = self._counter_set(params, states)
        if flat is not None:
            return flat, None
        for key, (flat, views) in self._counters.items():
            if len(key) > len(params):
                at = {k: i for i, k in enumerate(key)}
                idx = [at.get(id(p), -1) for p in params]
                if all(st.get("step") is views[i] for st, i in zip(states, idx) if i >= 0) and min(idx) >= 0:
                    return flat, idx
        return None

    def _count_step(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]]) -> None:
        """Add one to the step counter of every parameter of ``params`` (creating it at 0)."""
        covering = self._covering_counters(params, states)
        if covering is not None:
            flat, idx = covering
            flat.add_(1) if idx is None else flat.add_(counter_mask(flat, idx))
            return
        done = self._steps_done(params)
        flat = torch.tensor([d + 1 for d in done], dtype=torch.float32)
        views = list(flat.unbind(0))
        for st, v in zip(states, views):
            st["step"] = v
        if len(self._counters) >= self._MAX_COUNTER_SETS:
            self._counters.clear()
        self._counters[tuple(map(id, params))] = (flat, views)

    def _steps_done(self, params: Sequence[torch.Tensor]) -> list[int]:
        """The step counter of each parameter (0 before its first step), read in one call."""
        flat = self._counter_set(params)
        if flat is not None:
            return [int(v) for v in flat.tolist()]
        held = [self.state[p].get("step") if p in self.state else None for p in params]
        counters = [t for t in held if isinstance(t, torch.Tensor)]
        first = counters[0] if counters else None
        if len(counters) > 1 and all(t.dim() == 0 and t.dtype == first.dtype and t.device == first.device
                                     for t in counters):
            values = iter(torch.stack(counters).tolist())
        else:
            values = iter(float(t) for t in counters)
        return [int(next(values)) if isinstance(t, torch.Tensor) else int(t or 0) for t in held]

    @staticmethod
    def _grads_present(params: Sequence[torch.Tensor]) -> list[bool]:
        """Whether each parameter has a gradient this step: ``p.grad is not None``, torch's rule
        (both backends leave ``.grad`` to autograd and the user)."""
        return [p.grad is not None for p in params]

    def _has_grad(self, p: torch.Tensor) -> bool:
        """:meth:`_grads_present` of one parameter."""
        return self._grads_present((p,))[0]

    def _loss_grads(self, losses: Mapping[str, torch.Tensor]
                    ) -> tuple[dict[str, dict[torch.Tensor, torch.Tensor]], dict[torch.Tensor, bool]]:
        """One gradient per named loss (``grads.<name>``) and their sum (``grad``); and per
        parameter, whether every loss the pipeline reads reaches it (a loss that does not
        reach a parameter gives it a zero gradient)."""
        missing = sorted(set(self.program.losses) - set(losses))
        if missing:
            raise ValueError(f"the pipeline reads grads.{', grads.'.join(missing)}, but step(losses=...) has only "
                             f"{', '.join(losses) or 'no losses'}")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        out: dict[str, dict[torch.Tensor, torch.Tensor]] = {}
        total: dict[torch.Tensor, torch.Tensor] = {}
        names = list(losses)
        raw: dict[str, tuple[torch.Tensor | None, ...]] = {}
        with torch.enable_grad():
            for i, name in enumerate(names):
                raw[name] = torch.autograd.grad(losses[name], params, retain_graph=i < len(names) - 1,
                                                allow_unused=True)
        # a parameter no loss reaches is skipped, like a parameter whose .grad is None
        used = [j for j, p in enumerate(params) if any(raw[n][j] is not None for n in names)]
        for name in names:
            per = {}
            for j in used:
                p, gp = params[j], raw[name][j]
                gp = torch.zeros_like(p) if gp is None else gp.detach()
                per[p] = gp
                total[p] = total[p] + gp if p in total else gp.clone()
            out[f"grads.{name}"] = per
        out["grad"] = total
        read = [n for n in names if n in self.program.losses] or names
        shared_of = {params[j]: all(raw[n][j] is not None for n in read) for j in used}
        return out, shared_of

    # ------------------------------------------------------------------ eval and train sequences
    #: "train" or "eval": which of the pipeline's sequences the parameters hold (docs/language.md 4.9)
    _mode: str = "train"

    @property
    def has_eval(self) -> bool:
        """Whether the pipeline has ``eval:`` and ``train:`` sequences (Schedule-Free): then call
        :meth:`eval` before evaluating or saving the model, and :meth:`train` before stepping again."""
        return bool(self.program.modes)

    @property
    def mode(self) -> str:
        """``"train"`` (the parameters are where steps are taken; the start) or ``"eval"``."""
        return self._mode

    @property
    def eval(self) -> Callable[[], "Optimizer"]:
        """``opt.eval()`` writes the pipeline's ``eval:`` sequence into the parameters (Schedule-Free's
        ``x``, the point to evaluate), as ``schedulefree``'s ``optimizer.eval()``; a no-op in eval
        mode; ``step()`` is refused until :meth:`train`. Only a pipeline with sequences has it: for
        the others ``opt.eval`` is an AttributeError that says so (and ``hasattr(opt, "eval")`` is
        false, so tools that switch an optimizer when it can, such as Hugging Face's Trainer, leave
        them alone)."""
        self._need_modes("eval")
        return self._eval

    @property
    def train(self) -> Callable[..., "Optimizer"]:
        """``opt.train()`` writes the pipeline's ``train:`` sequence into the parameters (Schedule-Free's
        ``y``), undoing :meth:`eval`; a no-op in train mode (``train(False)`` is :meth:`eval`). Only a
        pipeline with sequences has it (see :attr:`eval`)."""
        self._need_modes("train")
        return self._train

    def _need_modes(self, mode: str) -> None:
        if not self.program.modes:
            raise AttributeError(
                f"Optimizer.{mode}(): the pipeline '{self.program.name}' has no '{mode}:' sequence; a pipeline "
                "that keeps a separate point to evaluate (Schedule-Free) gives the parameter's new value "
                "('param = ...') and adds 'eval: param = ...' and 'train: param = ...' lines "
                "(docs/language.md 4.9); other pipelines need no eval() or train()")

    @torch.no_grad()
    def _eval(self) -> "Optimizer":
        return self._switch("eval")

    @torch.no_grad()
    def _train(self, mode: bool = True) -> "Optimizer":
        return self._switch("train" if mode else "eval")

    def _switch(self, mode: str) -> "Optimizer":
        from .modes import mode_values
        seq = self.program.modes[mode]
        if self._mode == mode:
            return self
        items = [(p, group, self._routes[p], self.state.get(p, {}))
                 for group in self.param_groups for p in group["params"]]
        seen: set[int] = set()
        writes = []
        for p, v in mode_values(seq, items):  # every value first: an error writes nothing
            if id(p) not in seen:
                seen.add(id(p))
                writes.append((p, v))
        for p, v in writes:
            p.copy_(v)
        self._mode = mode
        return self

    def _check_train_mode(self) -> None:
        if self._mode != "train":
            raise RuntimeError(f"Optimizer.step() in eval mode: the parameters hold the pipeline "
                               f"'{self.program.name}''s eval sequence; call opt.train() before stepping "
                               "(as schedulefree's optimizers require)")

    # ------------------------------------------------------------------ state
    def _saved_node_state(self) -> dict[str, Any]:
        node_state = {}
        for node, st in self._node_state.items():
            n = self.program.find_node(node)
            if n is not None and n.is_op:
                saved = n.impl.node_state_dict(st)
                if saved:
                    node_state[node] = saved
        return node_state

    def state_dict(self) -> dict[str, Any]:
        """As torch's, plus a ``"gradpipe"`` entry (the pipeline's identity, node state and the
        non-finite counters), also held, less the structural description, by the first param
        group under ``"gradpipe"``: ``torch.distributed.checkpoint`` keeps only ``state`` and
        ``param_groups``, so a DCP checkpoint carries it there (``docs/works_with.md``).
        ``register_state_dict_pre_hook`` hooks run first, as in torch; ``register_state_dict_post_hook``
        hooks see the whole state dict, ``"gradpipe"`` included, and may return a replacement."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()  # runs the pre-hooks
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        from .migration import state_meta
        meta = sd["gradpipe"] = {"format": _STATE_FORMAT, **state_meta(self.program),
                                 "node_state": self._saved_node_state()}
        meta["nonfinite"] = self._nonfinite.state_dict()
        if self.program.modes:
            meta["mode"] = self._mode
        if sd["param_groups"]:  # DCP keeps only "state" and "param_groups": migration.saved_meta
            sd["param_groups"][0]["gradpipe"] = {k: v for k, v in meta.items() if k != "structure"}
        for hook in list(post_hooks.values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    #: what the last ``load_state_dict`` did (a :class:`~gradpipe.runtime.migration.StateMigration`)
    last_migration: Any = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this pipeline, or by an edited version of it.

        Buffers whose node keeps its name, op and buffer list are loaded (each checked
        against its parameter's shape); buffers of new nodes are created by their op in
        the next step; buffers of nodes the edit removed are dropped. Anything other
        than a plain load raises a ``StateMigrationWarning``, and ``self.last_migration``
        holds the report. A state dict of an unrelated pipeline (no node keeps state in
        both) is a ``GradError``. A ``torch.optim`` state dict of the same algorithm (Adam,
        AdamW, SGD, RMSprop) loads too. See ``gradpipe/runtime/migration.py``."""
        from .migration import load_state, saved_meta
        # as torch: the pre-hooks see (a shallow copy of) the state dict and may replace it, the
        # post-hooks run once everything is loaded (state, node state and counters included)
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        # torch casts floating state to the parameter's dtype, which would round fp32 state of
        # bf16 parameters; load_state loads the groups through torch and the state itself, keeping dtypes.
        if self._compiled is not None:
            self._compiled.step_plans.clear()  # new state: the next step plans again
        self.last_migration = load_state(self, state_dict, self._load_groups)
        meta = saved_meta(state_dict) or {}
        self._nonfinite.load_state_dict(meta.get("nonfinite"))  # counters of skipped steps
        self._mode = meta.get("mode", "train") if self.program.modes else "train"  # eval/train sequence
        kept = torch_options(self.program)[1]
        for group in self.param_groups:  # a state dict saved before gradpipe kept torch's option keys
            for k, v in kept.items():
                group.setdefault(k, v)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def to_torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state dict as the ``torch.optim`` optimizer of the same algorithm
        (Adam, AdamW, SGD, RMSprop) saves it, for its ``load_state_dict``; a ``GradError`` for a
        pipeline with no torch.optim equivalent. See ``gradpipe/runtime/torch_state.py``."""
        from .torch_state import to_torch_state_dict
        return to_torch_state_dict(self)

    def _load_groups(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` for the param groups, without the hooks (run around the whole load)."""
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks

    def __repr__(self) -> str:
        """torch's (each param group's hyperparameters), with the pipeline and the backend named first."""
        head, sep, rest = super().__repr__().partition(" (\n")
        return f"{head}{sep}Pipeline: {self.program.name}\nBackend: {self.backend}\n{rest}"

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's part (defaults, state, param groups;
        hooks are not kept, as in torch) and the pipeline by its source, since the compiled
        Program (networkx graph, frozen IR) and the compiled functions do not pickle;
        :meth:`__setstate__` rebuilds them."""
        prog = self.program
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups,
                "_gradpipe": {"source": prog.source, "path": prog.path, "hash": prog.hash, "backend": self.backend,
                              "use_compile": self._compiled.use_compile if self._compiled is not None else None,
                              "node_state": self._saved_node_state(), "nonfinite": self._nonfinite.state_dict(),
                              "mode": self._mode}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        gp = state.pop("_gradpipe", None)
        super().__setstate__(state)  # also what torch's load_state_dict calls, with state and groups only
        if gp is None:
            return
        prog = self.program = _program_from_source(gp["source"], gp["path"], gp["hash"])
        self.backend = gp["backend"]
        self._compiled = CompiledRoutes(prog) if self.backend == "compiled" else None
        if self._compiled is not None and gp.get("use_compile") is False:
            self._compiled.use_compile = False
        self._nonfinite = NonFiniteGuard(prog.nonfinite)
        self._nonfinite.load_state_dict(gp["nonfinite"])
        self._mode = gp.get("mode", "train")
        self._node_state = {}
        for node, saved in gp["node_state"].items():
            n = prog.node(node)
            ns = self._node_state[node] = n.impl.init_node_state(Args(n.const))
            n.impl.load_node_state_dict(ns, saved)
        self._counters = {}
        self._saved = SavedCopies()
        self._warned_capturable_if_run_uncaptured = True
        self._assign_routes()
        self._orders = {r.label: prog.route_nodes(r.label) for r in prog.routes}
