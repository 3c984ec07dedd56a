"""The compiled backend: a route's elementwise ops fused by ``torch.compile`` over flat buffers.

Lowering, per route:

1. **Segments.** The route's nodes, in evaluation order, are cut into maximal runs of
   *flat* nodes (ops whose math is elementwise or a ``global`` reduction, see
   ``Op.flat_ok``, and arithmetic) and single *eager* nodes (per-tensor reductions,
   shape-dependent ops, random draws, combiners, block ops). A global reduction
   of a value the run computed and reads again after it starts a new segment, so that value crosses in a flat
   buffer reused every step, not one Inductor would allocate on every call
   (``gradpipe/compiler/lowering.py``).
2. **Buckets.** In each step the route's parameters are grouped into buckets, one per
   param group (hyperparameters and step), dtype and device; a segment sees each
   bucket as one flat 1-D tensor, so the compiled graph has a fixed, small number
   of inputs however many tensors the model has (compile time does not grow with
   the number of tensors). The parameters keep their own storage (DESIGN.md section 5,
   normative: safetensors, accelerate, ``model.to()`` and hand-set gradients see
   plain torch tensors): a step gathers the bucket's gradients (and its parameters, when
   an op reads them) into flat buffers that are reused every step, runs the fused
   segments, writes the update ``u`` into another reused flat buffer, and applies
   ``p <- p - lr * u`` with one ``torch._foreach_add_`` per bucket over views of it. A
   parameter of ``SOLO_MIN`` elements or more (the ``SOLO_MAX`` largest of a route) is a
   bucket of its own: the segments read its gradient and the parameter in place, and the
   last one applies the update inside the kernel, into the parameter's own storage (one
   pass, no gather, no copy back). There is no flat parameter buffer, and no option for
   one (``docs/benchmarks.md``, "Parameter storage").
3. **State.** A flat node's buffers live in one flat tensor per bucket; the
   optimizer's per-parameter state holds *views* into it (``state[p]["main/adam.m"]``
   is a view), so ``state_dict`` keeps its layout and moves between backends. Under
   ``skip_nonfinite(updates=true)`` each flat buffer has a spare: a step reads the state and
   writes the new one into the spare, and the two change places once the step's update is
   known to be finite (``gradpipe/runtime/rollback.py``).
4. **Scalars are tensors.** Every argument that is not a compile-time constant
   (hyperparameters, ``lr``, ``step``, ``loss``) enters the compiled graph as a 0-d
   float64 tensor, so LR schedulers, changed hyperparameters and the growing step
   counter never recompile. Constants are baked into the graph, and so is a
   hyperparameter that is zero in the param group (ops branch on it, e.g.
   ``momentum(0)`` keeps no buffer, as torch's SGD), so a group value that crosses zero
   compiles one more variant. A value computed from ``step`` or ``loss`` is always a
   tensor: it never changes the math by being zero at some step.
5. **Compiled from the first step.** Ops declare their state (``Op.buffers``), so the
   backend allocates a segment's flat state before the segment first runs, and tells the ops
   which buckets start now with ``fresh`` (a 0-d bool tensor, so the first step and the
   others share one compiled function). Every step runs the same compiled code, so a run
   resumed from a checkpoint gives the same parameters bit for bit as one that never stopped.
6. **One interpreter.** A segment's function is the eager interpreter
   (``gradpipe/runtime/interpret.py``) run over the segment's nodes with a lane per bucket;
   ``torch.compile`` traces it. Nodes that are not flat run through the same interpreter
   with a lane per parameter.
7. **DTensor parameters** (FSDP2's ``fully_shard``). The fused segments run on each rank's
   shards (``to_local()``, which shares the DTensor's storage, so the update lands in it), so
   their elementwise math is the global math. Every reduction (over a tensor, its rows or
   columns, or the route) is an eager node instead (``plan_route(..., sharded=True)``), run on
   the DTensors, which reduce over the ranks; so are, as everywhere, random draws and matrix
   ops, which then run as in the eager backend, and what DTensors cannot run is the same
   ``GradError`` naming the op. Values cross between the two as shards and as DTensors sharded
   as the parameter. The views of the flat state are published as DTensors sharded as the
   parameters (``DTensor.from_local``), the layout the eager backend keeps, so ``state_dict``,
   ``get_optimizer_state_dict`` and DCP see the same state from both backends.
8. **Step plan.** Items 2 to 5 are worked out in every step of the general path
   (:meth:`CompiledRoutes.run_route`). After such a step, ``Optimizer.step`` plans the next
   steps of the same *layout* (``gradpipe/runtime/step_plan.py``): which parameters have a
   gradient, in which param groups and routes, with which environments (next step number)
   and step counters, and per route whose nodes are all in fused segments a
   :class:`_RoutePlan` (:meth:`CompiledRoutes.route_plan`): the buckets, the gather buffers and
   their per-parameter views, each segment's argument lists (flat state, ``fresh`` flags,
   output buffers), the 0-d scalars (``step``, the arguments computed from ``step`` or
   ``loss``, the group values), the views the update is applied through. A step whose layout
   key (the param groups and their parameters by identity and order, which have a gradient)
   has a plan checks that nothing the plan holds was replaced (the state dicts and their
   entries, which ``load_state_dict`` and hand edits replace; the parameters' storage and
   dtype, which ``p.data = ...`` changes; the step counters' values, re-read when another
   layout's step moved them) and follows changed group values (an LR scheduler, an lr tensor
   written in place: checked, and the 0-d tensors that read them written with ``fill_``; a
   value that crosses zero, a flipped boolean or another buffer list is a new plan). Then it
   gathers the gradients with one ``torch._foreach_copy_`` into the buffers the segments read,
   runs the non-finite check on those same buffers (one gather; inside the kernel itself where the
   step is one fused segment, see :func:`_segment_fn` and ``lowering.fused_check``), writes the per-step scalars
   in place (the step, Adam's bias corrections: evaluated in Python in float64, as before, and
   rounded to float32 on the way into the kernel), calls the compiled code, applies the
   update and counts the step with one ``add_``. Routes with eager nodes run through
   :meth:`CompiledRoutes.run_route` inside the plan. Layouts that alternate (a parameter
   without a gradient every other step) each gather the state into their own flat buffers, so
   they replace each other's plans; planning then backs off.

   The compiled code is called **without Dynamo's per-call work**. A segment's first planned
   step calls it through Dynamo, and the backend's :class:`_Recorded` notes the call: the
   compiled graph and its flat arguments, each of which is one of the plan's tensors or a
   tensor the step makes (a solo bucket's gradient and parameter). Later steps call that graph
   with those arguments (:class:`_Direct`), skipping the frame evaluation, the guards over the
   nested argument lists and ``compile_wrapper``. That is safe because the plan's key and
   checks cover what the guards check: the plan's tensors are fixed objects of fixed shapes,
   dtypes and devices, the Python values among the scalars (zeros, booleans) and the list
   lengths are part of the plan's structure, and a solo bucket's gradient is used in place
   only when it is a contiguous tensor of the bucket's dtype that does not require grad (else
   the general path takes the step). Dynamo's global state (grad mode, default dtype, thread
   count, deterministic algorithms, ...) is checked with its own ``GlobalStateGuard`` before
   each direct call; under a torch function or dispatch mode, inside ``torch.compile``d code,
   or while a graph break left more than one graph, the call goes through Dynamo. Measured
   (``docs/benchmarks.md``, "Targets"; 1 thread, a loaded machine): the whole planned Adam
   step at 100K parameters in 51 tensors takes 1.4x to 1.5x torch's fused Adam calling the
   graph directly, 2.1x to 2.2x through Dynamo, and 1.8x through Dynamo under
   ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which still enters the frame
   and evaluates the guards that tell cache entries apart. The split graph of
   :func:`_inductor_with_scalars_hoisted` is one plain callable (:class:`_Hoisted`) that keeps
   the 0-d results that read only group values (Adam's ``1 - beta``) while they are unchanged.

9. **On disk.** With ``GRADPIPE_CACHE_DIR`` set, each segment's compiled code is also kept
   as an AOTInductor package that a fresh process loads and calls without Dynamo or Inductor
   (``gradpipe/runtime/aot.py``): :class:`aot.Cached` is the segment's compiled function, and
   the ``torch.compile`` function behind it is made only when a call misses the cache. A
   package call is recorded like a Dynamo graph's, so a step plan calls it directly.

If ``torch.compile`` cannot run (no C++ compiler, an unsupported construct), the
backend warns once and runs the same segments eagerly, giving the same results.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import operator
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..compiler.guards import needed, route_guards
from ..compiler.ir import Kind, Node, RouteIR
from ..compiler.lowering import Segment as _Segment, fused_check, plan_route
from ..compiler.ops import Args
from ..compiler.program import Program
from ..compiler.scalars import leaves
from ..dsl.diagnostics import GradError
from . import aot
from .eager import DTensor, ParamLanes, RouteBatch, compute_dtype, evaluate, release_plan
from .interpret import Lanes, apply_param, apply_update, commit_cells, eval_dynamic, eval_node, structural_args

if TYPE_CHECKING:  # pragma: no cover
    from .rollback import StepRecord

__all__ = ["CompiledRoutes", "CompileFallbackWarning", "plan_route"]


#: a parameter of at least this many elements gets a bucket of its own (see ``_buckets``): a
#: gather and a copy back cost more there than one more kernel input
SOLO_MIN = 1 << 18
#: at most this many solo buckets per route and step (each adds inputs to the compiled graph)
SOLO_MAX = 8


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a pipeline; gradpipe runs it eagerly instead."""


@dataclass
class _Bucket:
    idxs: list[int]
    shapes: list[torch.Size]
    sizes: list[int]
    dtype: torch.dtype
    device: torch.device
    #: one parameter in its own storage: segments read it and the fused update writes it in place
    solo: bool = False

    @functools.cached_property
    def empty(self) -> torch.Tensor:
        """A placeholder for an output the segment does not write (a solo bucket's applied update)."""
        return torch.empty(0, dtype=self.dtype, device=self.device)

    @functools.cached_property
    def layout(self) -> tuple:
        """What the compiled segment's guards see of the bucket: its flat size, dtype, device and
        whether it is solo (two models with the same buckets share compiled code)."""
        return (sum(self.sizes), self.dtype, str(self.device), self.solo)

    @functools.cached_property
    def key(self) -> tuple:
        return (tuple(self.idxs), tuple(tuple(s) for s in self.shapes), self.dtype, str(self.device))


class _BucketLanes(Lanes):
    """The lanes of a fused segment: one per bucket, with the state, ``fresh`` flags, flat
    parameters and per-step scalars the backend prepared (this runs inside ``torch.compile``)."""

    def __init__(self, seg: _Segment, steps: list[Any], states: list[list[dict[str, torch.Tensor]]],
                 fresh: list[list[Any]], params: list[torch.Tensor | None], scalars: list[list[list[Any]]]) -> None:
        self.steps = steps
        self._index = {n.name: j for j, n in enumerate(seg.members)}
        self._states, self._fresh, self._params, self._scalars = states, fresh, params, scalars

    def args(self, node: Node) -> list[Args]:
        j = self._index[node.name]
        return [Args(node.const, **dict(zip(node.dynamic, per_bucket[j]))) for per_bucket in self._scalars]

    def states(self, node, xs):
        j = self._index[node.name]
        return self._states[j], self._fresh[j]

    def params(self, node: Node) -> list[torch.Tensor | None]:
        return self._params


def _segment_fn(seg: _Segment, gate: tuple[int, ...] = ()) -> Callable[..., list[torch.Tensor]]:
    """The function of one segment: flat inputs, flat state and scalars in; results written into
    the given output buffers, or, for the route's update of a solo bucket, applied to the parameter.
    With ``olds`` (``skip_nonfinite(updates=true)``) the state is read from ``olds`` and written into
    ``states``, and it returns per bucket a 0-d bool: whether the update is not finite.

    With ``ok`` (a 0-d bool tensor; ``gate``: the positions in ``seg.inputs`` of the gradients),
    the step's non-finite check runs inside the kernel (``lowering.fused_check``): first one
    reduction over every gradient, ``ok = all(isfinite(g))``, written into ``ok``; then the
    ops work on copies of the state, and the state and a parameter updated in place take
    ``where(ok, new, old)``, so a step with a NaN or an Inf in a gradient writes back the bits it
    read. The copies are values of the traced graph, which Inductor fuses into the same loop (no
    buffer, no extra traffic beyond the one read of the gradients)."""

    def run(inputs: list[list[torch.Tensor]], states: list[list[dict[str, torch.Tensor]]], fresh: list[list[Any]],
            params: list[torch.Tensor | None], scalars: list[list[list[Any]]], steps: list[torch.Tensor],
            outs: list[list[torch.Tensor]], apply: list[tuple[torch.Tensor, Any] | None],
            olds: list[list[dict[str, torch.Tensor]]] | None = None, ok: torch.Tensor | None = None
            ) -> list[torch.Tensor]:
        finite = None
        if ok is not None:  # the non-finite check, fused: decided before anything is written
            alls = [torch.isfinite(g).all() for i in gate for g in inputs[i] if g is not None and g.numel()]
            finite = torch.stack(alls).all() if alls else torch.ones((), dtype=torch.bool)
            ok.copy_(finite)
            real, states = states, [[{k: t.clone() for k, t in st.items()} for st in row] for row in states]
        if olds is not None:  # skip_nonfinite(updates=true): the state is written into the other buffer of
            for per_node, per_old in zip(states, olds):  # two, the old one kept (one pass: read old, write new)
                for st, old in zip(per_node, per_old):
                    for k, t in st.items():
                        t.copy_(old[k])
        vals = dict(zip(seg.inputs, inputs))
        lanes = _BucketLanes(seg, steps, states, fresh, params, scalars)
        for n in seg.members:
            vals[n.name] = eval_node(n, vals, lanes)
        # results go into buffers that live across steps: a fresh tensor the size of the
        # parameters per step would cost more (page faults) than the math itself
        flags = []
        for n, bufs in zip(seg.outputs, outs):
            for b, (buf, value) in enumerate(zip(bufs, vals[n])):
                if n == seg.final and olds is not None:  # per bucket: is the update not finite?
                    flags.append(torch.isfinite(value).all().logical_not())
                if n == seg.final and apply[b] is not None:
                    p, lr = apply[b]  # p <- p - lr * u, fused: a solo bucket, the parameter's own storage
                    if finite is not None:
                        _gated_apply(p, value, lr, finite)
                    elif lr is None:  # param = EXPR: the parameter's new value
                        apply_param(p, value)
                    else:
                        apply_update(p, value, lr)
                else:
                    buf.copy_(value)
        # state cells take their new value last, once every reader of the old one has run
        for cell, new in seg.commits:
            for st, value in zip(states[index[cell]], vals[new]):
                if "value" in st:  # (a cell no reader needs in this param group keeps no buffer)
                    st["value"].copy_(value)
        if finite is not None:  # the state takes its new value where the gradients were finite
            for row_old, row_new in zip(real, states):
                for old, new in zip(row_old, row_new):
                    for k, t in old.items():
                        t.copy_(torch.where(finite, new[k], t))
        return flags
    index = {n.name: j for j, n in enumerate(seg.members)}
    return run


def _gated_apply(p: torch.Tensor, u: torch.Tensor, lr: Any, ok: torch.Tensor) -> None:
    """:func:`~gradpipe.runtime.interpret.apply_update` (``lr`` None: ``apply_param``), written
    only where ``ok``: the same arithmetic out of place, then ``p <- where(ok, new, p)``."""
    if lr is None:
        new = u
    elif p.dtype == u.dtype:
        new = p - u * lr if isinstance(lr, torch.Tensor) else p.add(u, alpha=-lr)
    else:
        new = p.to(u.dtype) - u * lr if isinstance(lr, torch.Tensor) else p.to(u.dtype).add(u, alpha=-lr)
    p.copy_(torch.where(ok, new, p))


def _scalar_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes that compute 0-d tensors from 0-d tensors and constants only (bias corrections
    such as ``1 - b1 ** step``)."""
    def zero_d(n: torch.fx.Node) -> bool:
        v = n.meta.get("example_value")
        return isinstance(v, torch.Tensor) and v.dim() == 0
    out: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if zero_d(n):
                out.add(n)
        elif n.op in ("call_function", "call_method") and n.all_input_nodes and zero_d(n) \
                and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _inductor_with_scalars_hoisted(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """A ``torch.compile`` backend: Inductor, after moving the 0-d computations out of the graph.

    Inductor inlines scalar math into the elementwise loop that uses it, so ``b1 ** step``
    would be recomputed for every vector of a 10M-element buffer (a large share of an Adam
    step). Here the 0-d subgraph runs first, eagerly (a few tiny ops), and Inductor compiles
    the rest with its results as inputs.

    Inductor compiles here, inside Dynamo's call (its fake tensors and shape environment are
    live), which is what lets Inductor's on-disk graph cache serve a fresh process: compiled
    later, on the first real call, every process recompiled every segment ("Bypassing FX
    Graph Cache because 'No shape env'")."""
    from torch.fx.passes.split_module import split_module

    scalars = _scalar_nodes(gm)
    if not any(n.op != "placeholder" for n in scalars):
        return _Narrowed(gm, example_inputs)
    try:
        split = split_module(gm, None, lambda n: 0 if n in scalars else 1)
    except Exception:  # noqa: BLE001 - an unexpected graph shape: compile it whole
        return _Narrowed(gm, example_inputs)
    if not hasattr(split, "submod_1"):
        return _Narrowed(gm, example_inputs)
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    fake = detect_fake_mode(example_inputs)
    FakeTensorProp(split, mode=fake).propagate(*example_inputs)  # the 0-d part's outputs, as fake tensors
    call = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == "submod_1")
    split.submod_1 = _Narrowed(split.submod_1, [a.meta["val"] if isinstance(a, torch.fx.Node) else a
                                                for a in call.args], fake)
    return _Hoisted.of(split)


class _Hoisted:
    """The split graph of :func:`_inductor_with_scalars_hoisted` as one plain callable: the 0-d
    part (``pre``, run eagerly) and the compiled rest (``main``), without the split module's
    layers of ``nn.Module`` calls. ``pre``'s results are kept while its inputs are the same
    tensors at the same version (``fill_`` and ``copy_`` bump it): in a planned step, whose
    group scalars are written only when the group's values change, the 0-d math that reads only
    them (Adam's ``1 - beta``) runs once, not every step."""

    def __init__(self, split: torch.fx.GraphModule, pre_in: list[int], main_src: list[int]) -> None:
        self.split = split  # keeps the submodules alive
        self.pre = split.submod_0.forward
        self.main = split.submod_1.forward
        #: the graph arguments ``pre`` reads; per argument of ``main``, the graph argument's
        #: position, or ``~k`` for ``pre``'s result ``k``
        self.pre_in, self.main_src = pre_in, main_src
        self._kept: tuple[list[torch.Tensor], list[int], Any] | None = None

    @classmethod
    def of(cls, split: torch.fx.GraphModule) -> Any:
        """``split`` as a :class:`_Hoisted`, or ``split`` itself where its graph is not the
        expected ``pre``, ``main``, no outputs."""
        nodes = list(split.graph.nodes)
        at = {n: i for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
        calls = [n for n in nodes if n.op == "call_module"]
        if [n.target for n in calls] != ["submod_0", "submod_1"] or nodes[-1].op != "output" \
                or nodes[-1].args[0] not in ((), []) or any(a not in at for a in calls[0].args):
            return split
        pre, main = calls
        src = []
        single = False  # pre has one result, not a tuple
        for a in main.args:
            if a in at:
                src.append(at[a])
            elif a is pre:
                src.append(~0)
                single = True
            elif isinstance(a, torch.fx.Node) and a.op == "call_function" and a.args[0] is pre \
                    and isinstance(a.args[1], int):
                src.append(~a.args[1])
            else:
                return split
        if single:
            if any(i < -1 for i in src):
                return split
            split.submod_0 = _FirstOf(split.submod_0)
        return cls(split, [at[a] for a in pre.args], src)

    def __call__(self, *args: Any) -> tuple:
        ins = [args[i] for i in self.pre_in]
        kept = self._kept
        try:
            versions = [t._version for t in ins]
        except RuntimeError:  # inference-mode tensors keep no version: nothing is kept
            versions = None
        if kept is not None and versions is not None and kept[1] == versions and \
                all(map(operator.is_, ins, kept[0])):
            pre = kept[2]
        else:
            pre = self.pre(*ins)
            self._kept = (ins, versions, pre) if versions is not None else None
        self.main(*main_args(args, pre, self.main_src))
        return ()


def main_args(args: Sequence[Any], pre: Sequence[Any], main_src: Sequence[int]) -> list[Any]:
    """The arguments of :class:`_Hoisted`'s compiled part: per position in ``main_src``, a graph
    argument (``i >= 0``) or the 0-d part's result ``~i``."""
    return [args[i] if i >= 0 else pre[~i] for i in main_src]


class _FirstOf(torch.nn.Module):
    """A module of one result as one of one tuple (so that :class:`_Hoisted` indexes it)."""

    def __init__(self, sub: torch.nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, *args: Any) -> tuple:
        return (self.sub(*args),)


class _Narrowed(torch.nn.Module):
    """A graph compiled by Inductor whose 0-d float64 inputs are rounded to float32 on the way in.

    The scalars are computed in float64 (hyperparameters, ``1 - b2 ** step``), but a
    float64 scalar inside a float32 loop makes Inductor convert every element to double
    and back: in ``docs/benchmarks.md``'s storage table, a 10M-parameter Adam pass with
    ``b ** step`` in the kernel takes 1.76x torch's fused Adam with float64 scalars and
    0.98x with float32 ones (with the bias corrections computed outside the loop, the
    whole step differed by less than the noise; "Changes since the run"). So when no
    vector input is float64, the 0-d float64 inputs are rounded to float32 on the way
    in, once per step (the eager backend rounds them the same way: torch computes
    ``float32 * python_float`` in float32), with one ``torch._foreach_copy_`` into float32
    tensors kept for the purpose (one per thread: 3 us for Adam's 7 scalars, against 20 us
    for a ``.to()`` each)."""

    def __init__(self, sub: torch.fx.GraphModule, example_inputs: Sequence[Any], fake: Any = None) -> None:
        from torch._inductor.compile_fx import compile_fx

        super().__init__()
        self.narrow = _narrowable(example_inputs)
        if self.narrow:
            with fake if fake is not None else contextlib.nullcontext():
                example_inputs = _narrowed(example_inputs, self.narrow)
        self.fn = compile_fx(sub, list(example_inputs))
        self.sub = sub  # what ``aot.save`` exports, when a cache directory is set
        #: thread id -> the float32 tensors the narrowed scalars are copied into
        self._twins: dict[int, list[torch.Tensor]] = {}

    def forward(self, *args: Any) -> Any:
        if not self.narrow:
            return self.fn(*args)
        out = list(args)
        narrowed_in_place(out, self.narrow, self._twins)
        return self.fn(*out)


def narrowed_in_place(args: list[Any], idx: Sequence[int], twins: dict[int, list[torch.Tensor]]) -> None:
    """Replace ``args[i]`` for ``i`` in ``idx`` (0-d float64 tensors) by float32 tensors holding
    their values rounded, with one ``torch._foreach_copy_`` into tensors kept per thread in
    ``twins`` (:class:`_Narrowed`; ``aot.Package``, which calls the same graph from disk)."""
    if not idx:
        return
    mine = twins.get(threading.get_ident())
    if mine is None:
        mine = twins[threading.get_ident()] = [torch.empty((), dtype=torch.float32, device=args[i].device)
                                              for i in idx]
    torch._foreach_copy_(mine, [args[i] for i in idx])
    for i, t in zip(idx, mine):
        args[i] = t


def _narrowable(args: Sequence[Any]) -> tuple[int, ...]:
    """Positions of 0-d float64 inputs to round to float32: all of them, unless some
    vector input is float64 (then float64 is the computation's precision)."""
    vectors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0 and a.is_floating_point()]
    if not vectors or any(a.dtype == torch.float64 for a in vectors):
        return ()
    return tuple(i for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and a.dim() == 0 and a.dtype == torch.float64)


def _narrowed(args: Sequence[Any], idx: tuple[int, ...]) -> Sequence[Any]:
    if not idx:
        return args
    out = list(args)
    for i in idx:
        out[i] = out[i].to(torch.float32)
    return out


#: (pipeline hash, route, segment index, compiling?) -> (eager function, compiled function)
_SHARED: dict[tuple, tuple[Callable, Callable]] = {}

#: per thread, ``calls``: the list a step plan records compiled-graph calls into, or None
_RECORDING = threading.local()


class _Recorded:
    """What the backend hands Dynamo: the compiled graph, which notes each call (the graph, its
    flat arguments and its result) while a step plan records (:meth:`_Direct.capture`), so
    that the plan can later call the graph itself, without Dynamo's per-call work."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.boxed = bool(getattr(fn, "_boxed_call", False))  # Inductor's list-in calling convention

    def __call__(self, *args: Any) -> Any:
        out = self.call(args)
        calls = getattr(_RECORDING, "calls", None)
        if calls is not None:
            calls.append((self, args, out))
        return out

    def call(self, args: Sequence[Any]) -> Any:
        return self.fn(list(args)) if self.boxed else self.fn(*args)


def _recorded_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """:func:`_inductor_with_scalars_hoisted`, its result wrapped in :class:`_Recorded`."""
    return _Recorded(_inductor_with_scalars_hoisted(gm, example_inputs))


def _tensors_in(obj: Any) -> Any:
    """Every tensor in nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x)


class _Direct:
    """A segment's compiled graph, called by a step plan with the graph's flat arguments, as the
    code Dynamo generates for the segment's frame calls it, but without entering that frame and
    evaluating its guards. The plan's layout key covers what the guards check (the bucket shapes,
    dtypes and devices, the Python values among the scalars, the lengths of the argument lists,
    which tensors are the same object); the global state Dynamo guards (grad mode, default dtype,
    thread count, deterministic algorithms, ...) is checked with Dynamo's own
    ``GlobalStateGuard`` before each call, and a torch function or dispatch mode, a frame under
    ``torch.compile``, a compile in progress or a stance other than the default
    (``torch.compiler.set_stance("force_eager")``) send the call through Dynamo instead."""

    def __init__(self, graph: _Recorded, template: list[Any], slots: list[tuple[int, int]]) -> None:
        from torch._C._dynamo.guards import GlobalStateGuard
        self.graph, self.template, self.slots = graph, template, slots
        self.guard = GlobalStateGuard()  # the global state as it is now, when Dynamo's guards held

    @classmethod
    def capture(cls, calls: list[tuple[_Recorded, tuple, Any]], args: tuple, var: list[torch.Tensor]
                ) -> "_Direct | None":
        """From the calls one run of the segment through Dynamo recorded: the graph, and for each
        of its arguments the tensor the plan keeps or the position in ``var`` (the tensors made in
        each step: a solo bucket's gradient and parameter). None if that run called no compiled
        graph or more than one (a graph break), the graph returned something (Dynamo's code would
        do more than call it), or it read a tensor that is not among the segment's arguments."""
        if len(calls) != 1:
            return None
        graph, flat, out = calls[0]
        if out is not None and not (isinstance(out, (tuple, list)) and len(out) == 0):
            return None
        where = {id(t): k for k, t in enumerate(var)}
        kept = {id(t) for t in _tensors_in(args)}
        template: list[Any] = []
        slots = []
        for pos, a in enumerate(flat):
            if not isinstance(a, torch.Tensor):
                return None
            if id(a) in where:  # not kept: a step's gradient is freed with the step
                slots.append((pos, where[id(a)]))
                template.append(None)
            elif id(a) in kept:
                template.append(a)
            else:
                return None
        return cls(graph, template, slots)

    def ready(self) -> bool:
        """Whether the graph may be called directly now (see the class docstring)."""
        return self.guard.check() and not torch._C._len_torch_function_stack() and \
            not torch._C._len_torch_dispatch_stack() and _eval_frame_callback() is None and _default_stance()

    def __call__(self, var: list[torch.Tensor]) -> None:
        flat = list(self.template)
        for pos, k in self.slots:
            flat[pos] = var[k]
        self.graph.call(flat)


try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # pragma: no cover - another torch: never call a graph directly
    def _eval_frame_callback() -> Any:
        return True


def _default_stance() -> bool:
    """Whether ``torch.compiler.set_stance`` is at its default (``force_eager`` and the others are
    for Dynamo to follow)."""
    if "torch._dynamo" not in sys.modules:  # never imported: nothing can have set a stance
        return True
    from torch._dynamo import eval_frame
    stance = getattr(eval_frame, "_stance", None)
    return stance is not None and stance.stance == "default" and stance.backend is None




_LIMIT_WARNED: list[bool] = []


def _warn_on_recompile_limit() -> None:
    """Turn Dynamo's log line "hit config.recompile_limit" for a segment function into one
    :class:`CompileFallbackWarning` per process: from then on that function runs eagerly (the
    same results, slower), which must never happen silently. Installed once, as a filter on
    Dynamo's logger (it lets every record through)."""
    if _LIMIT_WARNED:
        return
    _LIMIT_WARNED.append(False)

    def note(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not _LIMIT_WARNED[0] and "recompile_limit" in text and "run_segment" in text:
            _LIMIT_WARNED[0] = True
            warnings.warn("gradpipe: a compiled pipeline segment reached torch._dynamo's recompile limit "
                          f"({torch._dynamo.config.recompile_limit}) and now runs eagerly (same results, slower); "
                          "raise torch._dynamo.config.recompile_limit, or build fewer variants (each "
                          "hyperparameter that is zero in some param groups compiles one more)",
                          CompileFallbackWarning, stacklevel=2)
        return True
    logging.getLogger("torch._dynamo.convert_frame").addFilter(note)


def _own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs per code object
    (at most ``cache_size_limit`` of them); every segment function shares one, so without
    this, the ninth segment compiled in a process would silently run uncompiled."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _shards(batch: RouteBatch) -> RouteBatch | None:
    """FSDP2: the batch of the DTensor parameters' local shards (each rank's, sharing their storage,
    so what the segments write lands in the DTensors), with the DTensors as its ``sharded``; None
    when no parameter is a DTensor. Its gradients and state are the DTensor batch's: sources are
    read through the route's lanes (on the DTensors), state entries are taken local when read."""
    if not any(isinstance(p, DTensor) for p in batch.params):
        return None
    local = RouteBatch([p.to_local() if isinstance(p, DTensor) else p for p in batch.params], batch.grads,
                       batch.envs, batch.states, batch.shared)
    local.sharded = [p if isinstance(p, DTensor) else None for p in batch.params]
    return local


def _local_like(v: Any, p: Any) -> Any:
    """A value of the route for the DTensor parameter ``p`` (None: a plain tensor) as this rank's
    part of it in a fused segment: of ``p``'s shape, its shard as ``p`` is sharded; a per-tensor
    value (a norm, a row's or a column's), the part that broadcasts against ``p``'s shard (sharded
    along the dimensions it has whole, replicated along the others)."""
    if p is None or not isinstance(v, DTensor):
        return v
    if v.placements == p.placements and v.shape == p.shape:
        return v.to_local()
    from torch.distributed.tensor import Replicate
    want = [pl if pl.is_shard() and v.dim() == p.dim() and v.shape[pl.dim] == p.shape[pl.dim] else Replicate()
            for pl in p.placements]
    return v.redistribute(p.device_mesh, want).to_local()


def _dtensor_like(t: torch.Tensor, p: Any) -> torch.Tensor:
    """This rank's part ``t`` of a value of ``p``'s shape as a DTensor sharded as ``p`` (sharing
    ``t``'s storage); ``t`` itself when ``p`` is None (a plain tensor)."""
    if p is None:
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _sharded_of(batch: RouteBatch, b: _Bucket) -> list[Any]:
    """Per parameter of the bucket, its DTensor (None for a plain tensor; see :func:`_shards`)."""
    return [batch.sharded[i] for i in b.idxs] if batch.sharded is not None else [None] * len(b.idxs)


def _expanded(per: list[torch.Tensor], b: _Bucket) -> list[torch.Tensor]:
    """The bucket's tensors of a per-parameter value, each in its parameter's shape: a per-tensor
    value (a reduction's 0-d, ``(..., R, 1)`` or ``(..., 1, C)`` result, a shape value) is expanded."""
    return [per[i] if per[i].shape == shape else per[i].expand(shape) for i, shape in zip(b.idxs, b.shapes)]


#: :func:`_scalar_kind` of an argument passed as a 0-d float64 tensor
_TENSOR = "tensor"


def _scalar_kind(node: Node, k: str, v: Any) -> Any:
    """How the compiled function takes ``node``'s argument ``k`` of value ``v`` (see
    :meth:`CompiledRoutes._scalars`): the Python value itself (a bool, or 0.0 for a zero
    group value), or :data:`_TENSOR`."""
    if isinstance(v, bool):
        return v
    if k not in node.per_step and v == 0:
        return 0.0
    return _TENSOR


@dataclass
class _Values:
    """One route's node values in one step: per parameter (``split``, what eager nodes read)
    and per bucket (``flat``, what fused segments read and write)."""

    lanes: ParamLanes
    buckets: list[_Bucket]
    n: int
    #: FSDP2: per parameter, its DTensor (``RouteBatch.sharded``): ``split`` holds DTensors, which
    #: eager nodes run on, and ``flat`` the local shards
    sharded: list[Any] | None = None
    split: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    flat: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class _SegPlan:
    """One fused segment in a step plan: its arguments, made once (they hold the plan's buffers,
    state and 0-d scalars), and where the tensors made in each step go."""

    si: int
    seg: _Segment
    #: (eager function, compiled function)
    fns: tuple[Callable, Callable]
    #: ``(inputs, states, fresh, params, scalars, steps, outs, apply)``, as :func:`_segment_fn` takes them
    args: tuple
    #: per step, ``container[index] = var[k]`` (a solo bucket's gradient or parameter)
    sets: list[tuple[list, int, int]]
    #: per step, ``apply[bucket] = (var[k], lr)``: the update applied in the kernel to a solo bucket
    applies: list[tuple[list, int, int, Any]]
    #: the compiled graph, called without Dynamo once a call through Dynamo has been recorded
    direct: _Direct | None = None
    #: whether the next call goes through Dynamo and is recorded (:meth:`_Direct.capture`)
    capture: bool = True


@dataclass
class _GroupArg:
    """A scalar argument computed from a param group's values only: refilled when they change."""

    env: dict[str, Any]
    node: Node
    key: str
    #: the names of the group values it reads
    reads: frozenset[str]
    #: how the compiled function takes it (:func:`_scalar_kind`): a change is a new plan
    kind: Any
    #: the plan's 0-d tensors that hold it (one per bucket of this environment and segment)
    slots: list[torch.Tensor] = field(default_factory=list)


class _RoutePlan:
    """A route's step worked out once per layout (:meth:`CompiledRoutes.route_plan`): its
    buckets, the gather buffers and their per-parameter views, each fused segment's argument
    lists, the 0-d scalars (written in place each step) and the apply of the update."""

    def __init__(self, label: str, buckets: list[_Bucket], params: list[torch.Tensor],
                 envs: list[dict[str, Any]]) -> None:
        self.label, self.buckets, self.params, self.envs = label, buckets, params, envs
        #: the gradients of the gathered buckets: one ``torch._foreach_copy_`` into these views
        self.gather_dst: list[torch.Tensor] = []
        self.gather_src: list[int] = []
        #: the same for the parameters, where a segment reads them: (views, parameter indices)
        self.pgathers: list[tuple[list[torch.Tensor], list[int]]] = []
        #: the gathered gradient buffers (what the non-finite check reads, with the solo gradients)
        self.check: list[torch.Tensor] = []
        #: (bucket, parameter index, dtype) of each solo bucket
        self.solo: list[tuple[int, int, torch.dtype]] = []
        #: this step's solo tensors: per solo bucket its gradient and its parameter, flat
        self.var: list[torch.Tensor] = []
        self.segs: list[_SegPlan] = []
        #: per bucket and segment, the 0-d ``step`` and its environment
        self.steps: list[tuple[torch.Tensor, dict[str, Any]]] = []
        #: per environment and node, the arguments computed from ``step`` or ``loss``: evaluated each step
        self.per_step: list[tuple[dict[str, Any], Node, tuple[str, ...], list[list[torch.Tensor]]]] = []
        self.group_args: list[_GroupArg] = []
        #: (environment, node) -> the buffers the node keeps there (``Op.buffers_for``)
        self.wanted: dict[tuple[int, str], tuple[str, ...]] = {}
        #: the lr of the in-kernel update of solo buckets: (0-d tensor or None, environment, kind)
        self.lr: list[tuple[torch.Tensor | None, dict[str, Any], Any]] = []
        #: the update of the other buckets: (how, parameters, views of the update, environment)
        self.applies: list[tuple[str, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = []
        #: where the step's non-finite check runs inside the kernel (``lowering.fused_check``): the
        #: 0-d bool it writes, false when a gradient held a NaN or an Inf (and nothing was written)
        self.ok: torch.Tensor | None = None

    def prepare(self, grads: Sequence[torch.Tensor]) -> bool:
        """Gather this step's gradients into the plan's buffers and take the solo buckets'
        gradients and parameters as flat views; False (nothing written but the plan's own
        buffers) where the plan cannot take them: a solo gradient that is not a contiguous tensor
        of the bucket's dtype, a sparse gradient (the general path says what is wrong)."""
        var = []
        for _, i, dt in self.solo:
            g, p = grads[i], self.params[i]
            if type(g) is not torch.Tensor or g.dtype is not dt or g.requires_grad or not g.is_contiguous() \
                    or not p.is_contiguous():
                return False
            var.append(g.view(-1))
            var.append(p.detach().view(-1))
        if self.gather_dst:
            try:
                torch._foreach_copy_(self.gather_dst, [grads[i] for i in self.gather_src])
            except RuntimeError:
                return False
        self.var = var
        return True

    def regroup(self, envs: dict[int, dict[str, Any]], names: set[str]) -> bool:
        """The group values ``names`` changed in the environments ``envs`` (by id): refill the
        scalars that read them; False if the change alters the compiled function's structure
        (a value crosses zero, a boolean flips, a node keeps other buffers): then a new plan."""
        for a in self.group_args:
            if id(a.env) not in envs or not (a.reads & names):
                continue
            try:
                v = eval_dynamic(a.node, a.env, (a.key,))[a.key]
                if _scalar_kind(a.node, a.key, v) != a.kind or a.node.is_op and self.wanted.get(
                        (id(a.env), a.node.name)) != _wanted(a.node, eval_dynamic(a.node, a.env)):
                    return False
            except GradError:  # the general path reports it, in its place in the step
                return False
            if a.kind is _TENSOR:
                for t in a.slots:
                    t.fill_(float(v))
        if "lr" in names:
            for slot, env, kind in self.lr:
                if id(env) not in envs:
                    continue
                if _lr_kind(env["lr"]) != kind:
                    return False
                if slot is not None:
                    slot.copy_(env["lr"]) if isinstance(env["lr"], torch.Tensor) else slot.fill_(float(env["lr"]))
        return True


def _wanted(node: Node, dynamic: dict[str, Any]) -> tuple[str, ...]:
    """The buffers ``node``'s op keeps for these arguments (``Op.buffers_for``)."""
    return tuple(b.name for b in node.impl.buffers_for(structural_args(node, dynamic)))


def _lr_kind(lr: Any) -> Any:
    """How the in-kernel update of a solo bucket takes ``lr``: a tensor of its dtype and device,
    a 0-d float64 tensor, or a zero (0.0, baked in)."""
    if isinstance(lr, torch.Tensor):
        return (lr.dtype, lr.device)
    return _TENSOR if lr != 0 else 0.0


class CompiledRoutes:
    """Runs a program's routes with fused, compiled segments (one instance per optimizer)."""

    def __init__(self, prog: Program, *, compile: bool = True) -> None:  # noqa: A002 - mirrors torch.compile
        self.prog = prog
        self.use_compile = compile
        #: route -> (its plan of segments and eager nodes, its source nodes)
        self._plans: dict[str, tuple[list[tuple[str, Any]], list[str]]] = {}
        self._fns: dict[tuple[str, int], tuple[Callable, Callable]] = {}
        #: route -> the state cells no fused segment commits (written after the route)
        self._late: dict[str, list[tuple[str, str]]] = {}
        #: (route, update, plan) -> per plan item, the values freed after it (see :meth:`_drops`)
        self._drop_plans: dict[tuple, list[tuple[str, ...]]] = {}
        #: route -> the plan of its grad_at's point and the IR it plans (see :meth:`point`)
        self._points: dict[str, tuple[list[tuple[str, Any]], RouteIR]] = {}
        #: (route, segment index, bucket key, node) -> {buffer: flat tensor}
        self._flat: dict[tuple, dict[str, torch.Tensor]] = {}
        #: (purpose, bucket key) -> a flat tensor reused every step (gathered inputs, outputs)
        self._bufs: dict[tuple, torch.Tensor] = {}
        #: (dtype, device) -> the buffer the non-finite check gathers small gradients into
        self._check_bufs: dict[tuple, torch.Tensor] = {}
        #: this step's gathered gradients: (the tensors, their buffer), read by the step's gathers
        self._checked: list[tuple[list[weakref.ref], torch.Tensor]] = []
        #: id of a buffer of ``_bufs`` -> its per-parameter views, made once
        self._split_views: dict[int, list[torch.Tensor]] = {}
        #: (bucket state key, buffer) -> [(its flat tensor, the per-parameter views handed out)], one per
        #: flat tensor the buffer has had lately (two under skip_nonfinite(updates=true): its spare)
        self._views: dict[tuple, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
        #: bucket state key -> [the node's 0-d ``fresh`` flag for the bucket, the value it holds]
        self._flags: dict[tuple, list[Any]] = {}
        #: bucket state key -> {buffer: the other flat tensor}: under skip_nonfinite(updates=true) a step
        #: writes the new state there, and the two change places once the update is known to be finite
        self._spares: dict[tuple, dict[str, torch.Tensor]] = {}
        #: layout key -> the optimizer's step plan for it (``gradpipe/runtime/step_plan.py``)
        self.step_plans: dict[tuple, Any] = {}
        #: step plans built so far (what tests count)
        self.plan_builds = 0
        #: general steps to take before planning again, and the wait after the next wasted plan
        #: (``gradpipe/runtime/step_plan.py``: layouts that alternate replace each other's plans)
        self.plan_wait = self.plan_backoff = 0
        #: the step plan whose step is being checked for non-finite gradients (see grad_buffers)
        self._active: Any = None
        #: route -> the positions of its segment's gradient inputs, where the check is fused (see :meth:`_gate`)
        self._gates: dict[str, tuple[int, ...]] = {}
        #: (route, device) -> the 0-d bool a kernel with the fused check writes its verdict into
        self._oks: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ gradients
    def grad_buffers(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gradients of ``params`` in few tensors, for one reduction each (the non-finite check):
        the gradients under ``SOLO_MIN`` elements gathered into one buffer per dtype and device
        (reused every step; one ``torch.cat`` costs less than a reduction per small tensor), and
        the parameters left over, whose ``.grad`` is read one by one. In a planned step, the plan's
        gathered gradient buffers, which the fused segments read next."""
        if self._active is not None:
            return self._active.check_tensors(self)
        small: dict[tuple, list[torch.Tensor]] = {}
        rest: list[torch.Tensor] = []
        for p in params:
            g = p.grad
            if g is not None and g.layout is torch.strided and g.numel() < SOLO_MIN and not isinstance(g, DTensor):
                small.setdefault((g.dtype, g.device), []).append(g)
            else:
                rest.append(p)
        flats = []
        for (dtype, device), gs in small.items():
            n = sum(g.numel() for g in gs)
            buf = self._check_bufs.get((dtype, device))
            if buf is None or buf.numel() != n:
                buf = self._check_bufs[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
            torch.cat([g.reshape(-1) for g in gs], out=buf)
            flats.append(buf)
        # the step that follows reads the same gradients: a bucket of exactly these reuses the buffer
        # (held weakly: zero_grad(set_to_none=True) must free the gradients)
        self._checked = [([weakref.ref(g) for g in gs], buf) for gs, buf in zip(small.values(), flats)]
        return flats, rest

    def drop_check_buffers(self) -> None:
        """Free the buffers :meth:`grad_buffers` gathers into (a step plan gathers into its own)."""
        self._check_bufs.clear()
        self._checked = []

    def _checked_buffer(self, tensors: list[torch.Tensor], b: _Bucket) -> torch.Tensor | None:
        """The buffer :meth:`grad_buffers` gathered ``tensors`` into in this step, if it did."""
        for gs, buf in self._checked:
            if buf.dtype == b.dtype and len(gs) == len(tensors) and all(g() is t for g, t in zip(gs, tensors)):
                return buf
        return None

    # ------------------------------------------------------------------ step plans
    def route_plan(self, label: str, batch: RouteBatch) -> _RoutePlan | None | bool:
        """The plan of the route's step for ``batch``'s layout (its environments are those of the
        next step), or None for a route it does not cover: eager nodes between the segments (those
        run through :meth:`run_route`), or a source other than ``grad`` and ``param``. Built after a
        step has run, so every buffer exists and is published: no argument depends on a first step
        (False where some state would start in the next step: plan again after it)."""
        prog = self.prog
        items = self._plans.get(label)
        if items is None:
            items = self._plans[label] = plan_route(prog, label=label)
        ir = prog.ir[label]
        segs = [item for kind, item in items if kind == "segment"]
        if not segs or len(segs) != len(items):
            return None
        sources: dict[str, str] = {}
        made: set[str] = set()
        for seg in segs:
            for src in seg.inputs:
                if src not in made and src not in sources:
                    n = prog.node(src)
                    if n.kind is not Kind.SOURCE or n.op not in ("grad", "param"):
                        return None
                    sources[src] = n.op
            made.update(seg.outputs)
        if ir.update not in made or any(all((c, new) not in seg.commits for seg in segs) for c, new in ir.commits):
            return None
        buckets = self._buckets(batch)
        envs = [batch.envs[b.idxs[0]] for b in buckets]
        rp = _RoutePlan(label, buckets, list(batch.params), envs)
        solo = [bi for bi, b in enumerate(buckets) if b.solo]
        rp.solo = [(bi, buckets[bi].idxs[0], buckets[bi].dtype) for bi in solo]
        var_at = {bi: 2 * k for k, bi in enumerate(solo)}  # var[2k]: the gradient, var[2k + 1]: the parameter
        gathered: set[int] = set()

        def gather_into(buf: torch.Tensor, b: _Bucket, op: str) -> torch.Tensor:
            if id(buf) not in gathered:
                gathered.add(id(buf))
                if op == "grad":
                    rp.gather_dst += self._split_views[id(buf)]
                    rp.gather_src += b.idxs
                    rp.check.append(buf)
                else:
                    rp.pgathers.append((self._split_views[id(buf)], list(b.idxs)))
            return buf
        flat: dict[str, list[Any]] = {src: [None if b.solo else gather_into(self._buffer(("in", src), b), b, op)
                                            for b in buckets] for src, op in sources.items()}
        group_args: dict[tuple, _GroupArg] = {}
        per_step: dict[tuple, tuple[dict[str, Any], Node, list[str], list[list[torch.Tensor]]]] = {}
        for si, seg in enumerate(segs):
            dynamic = [[eval_dynamic(n, env) for n in seg.members] for env in envs]
            scalars = [[self._scalars(n, d) for n, d in zip(seg.members, per)] for per in dynamic]
            prepared = [[self._bucket_state(label, si, b, n, batch, dynamic[bi][j]) for bi, b in enumerate(buckets)]
                        for j, n in enumerate(seg.members)]
            fresh = [[f for _, f in row] for row in prepared]
            if any(f.dim() or bool(f) for row in fresh for f in row):
                return False  # some state starts now: plan the step after
            states = [[st for st, _ in row] for row in prepared]
            sets: list[tuple[list, int, int]] = []
            inputs = []
            for src in seg.inputs:
                row = list(flat[src])
                if src in sources:
                    sets += [(row, bi, var_at[bi] + (sources[src] == "param")) for bi in solo]
                inputs.append(row)
            params: list[Any] = [None] * len(buckets)
            if seg.reads_param and self._needs_param(seg, dynamic):
                for bi, b in enumerate(buckets):
                    if b.solo:
                        sets.append((params, bi, var_at[bi] + 1))
                    else:
                        params[bi] = gather_into(self._buffer(("param", label), b), b, "param")
            apply: list[Any] = [None] * len(buckets)
            applies: list[tuple[list, int, int, Any]] = []
            if seg.final is not None:
                for bi in solo:
                    lr = envs[bi]["lr"]
                    kind = None if ir.writes_param else _lr_kind(lr)
                    slot = None
                    if kind is not None and kind != 0.0:
                        slot = lr.detach().clone() if isinstance(lr, torch.Tensor) else \
                            torch.tensor(float(lr), dtype=torch.float64)
                        rp.lr.append((slot, envs[bi], kind))
                    elif kind is not None:
                        rp.lr.append((None, envs[bi], kind))
                    applies.append((apply, bi, var_at[bi] + 1, slot if kind != 0.0 else 0.0))
            applied = {bi for _, bi, _, _ in applies}
            outs = [[b.empty if n == seg.final and bi in applied else self._buffer(("out", label, n), b)
                     for bi, b in enumerate(buckets)] for n in seg.outputs]
            steps = [torch.tensor(float(env["step"]), dtype=torch.float64) for env in envs]
            rp.steps += zip(steps, envs)
            for bi, env in enumerate(envs):
                for j, n in enumerate(seg.members):
                    if n.is_op:
                        rp.wanted[(id(env), n.name)] = _wanted(n, dynamic[bi][j])
                    for k, v in zip(n.dynamic, scalars[bi][j]):
                        if k in n.per_step:
                            entry = per_step.setdefault((id(env), n.name), (env, n, [], []))
                            if k not in entry[2]:
                                entry[2].append(k)
                                entry[3].append([])
                            entry[3][entry[2].index(k)].append(v)
                            continue
                        a = group_args.get((id(env), n.name, k))
                        if a is None:
                            a = group_args[(id(env), n.name, k)] = _GroupArg(
                                env, n, k, frozenset(getattr(leaf, "name", None) for leaf in leaves(n.args[k])),
                                _scalar_kind(n, k, dynamic[bi][j][k]))
                        if isinstance(v, torch.Tensor):
                            a.slots.append(v)
            for n, o in zip(seg.outputs, outs):
                flat[n] = o
            layout = tuple(b.layout for b in buckets)
            fns = self._fns.get((label, si, layout)) or self._make_fns(label, si, seg, layout)
            args = (inputs, states, fresh, params, scalars, steps, outs, apply)
            if self._gate(label, seg, layout):  # the step's non-finite check runs in this kernel
                rp.ok = self._ok(label, buckets[0].device)
                args += (None, rp.ok)
            rp.segs.append(_SegPlan(si, seg, fns, args, sets, applies))
        rp.per_step = [(env, n, tuple(keys), slots) for env, n, keys, slots in per_step.values()]
        rp.group_args = list(group_args.values())
        applied = {bi for sp in rp.segs for _, bi, _, _ in sp.applies}
        for bi, b in enumerate(buckets):
            if bi in applied:
                continue
            ps = [batch.params[i] for i in b.idxs]
            how = "each" if any(p.dtype != b.dtype for p in ps) else "copy" if ir.writes_param else "add"
            rp.applies.append((how, ps, self._pieces(flat[ir.update][bi], b), envs[bi]))
        rp.writes_param = ir.writes_param
        return rp

    def run_plan(self, rp: _RoutePlan) -> bool:
        """One step of a planned route (after :meth:`_RoutePlan.prepare`): the 0-d scalars written
        in place, the parameters gathered where a segment reads them, the fused segments, the update.
        False where the kernel's own non-finite check (``rp.ok``) found a NaN or an Inf in a
        gradient: the kernel wrote back the state and parameters it read, and nothing is applied."""
        for t, env in rp.steps:
            t.fill_(env["step"])
        for env, node, keys, slots in rp.per_step:
            values = eval_dynamic(node, env, keys)
            for k, ts in zip(keys, slots):
                v = float(values[k])
                for t in ts:
                    t.fill_(v)
        params = rp.params
        for views, idx in rp.pgathers:
            torch._foreach_copy_(views, [params[i] for i in idx])
        for sp in rp.segs:
            self._run_planned(sp, rp.var)
        rp.var = []  # the step's gradients are not held past it
        if rp.ok is not None and not rp.ok.item():
            return False
        for how, ps, views, env in rp.applies:
            lr = env["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            if how == "add":
                torch._foreach_add_(ps, views, alpha=-lr)
            elif how == "copy":
                torch._foreach_copy_(ps, views)
            else:  # fp16/bf16 parameters: the update rounded once per parameter
                for p, v in zip(ps, views):
                    apply_param(p, v) if rp.writes_param else apply_update(p, v, lr)
        return True

    def _run_planned(self, sp: _SegPlan, var: list[torch.Tensor]) -> None:
        """Run one planned segment: its compiled graph directly where a call through Dynamo was
        recorded and the global state still holds (see :class:`_Direct`), else through Dynamo
        (recording the call, the first time), or eagerly after a compile failure."""
        eager_fn, compiled_fn = sp.fns
        if sp.direct is not None and self.use_compile and sp.direct.ready():
            try:
                sp.direct(var)
                return
            except AssertionError:  # a size or stride the graph was not compiled for: Dynamo decides
                sp.direct = None
        for container, index, k in sp.sets:
            container[index] = var[k]
        for apply, bi, k, lr in sp.applies:
            apply[bi] = (var[k], lr)
        fn = compiled_fn if self.use_compile else eager_fn
        record = sp.capture and fn is compiled_fn
        calls: list = []
        if record:
            _RECORDING.calls = calls
        try:
            fn(*sp.args)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
            if fn is eager_fn:
                raise
            _RECORDING.calls = record = None
            self._fallback(e)
            eager_fn(*sp.args)
        finally:
            _RECORDING.calls = None
            for container, index, _ in sp.sets:  # the step's gradients are not held past it
                container[index] = None
        if record:
            sp.capture = False
            sp.direct = _Direct.capture(calls, sp.args, var)
        for apply, bi, _, _ in sp.applies:
            apply[bi] = None

    # ------------------------------------------------------------------ one route, one step
    def run_route(self, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]],
                  order: Sequence[str] | None = None) -> list[torch.Tensor | None]:
        return self.prepare_route(label, batch, node_states)()

    def prepare_route(self, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]],
                      record: StepRecord | None = None) -> Callable[[], list[torch.Tensor | None]]:
        """Run the route up to its update; return what applies it (``p <- p - lr * u`` for the
        buckets whose update is in a flat buffer; per parameter, the update left to the caller,
        None where applied). With ``record`` (``skip_nonfinite(updates=true)``, see
        ``gradpipe/runtime/rollback.py``) the segments leave the state as it was, writing the new
        state into spare buffers, and report whether the update is finite, and nothing is applied
        until the returned function runs (except a solo bucket's update, copied first)."""
        prog = self.prog
        local = _shards(batch)  # FSDP2: the segments run on the local shards, under a plan of their own
        key = label if local is None else f"{label}#sharded"
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_route(prog, label=label, sharded=local is not None)
        ir = prog.ir[label]
        run = batch if local is None else local
        vals = _Values(ParamLanes(prog, ir, batch, node_states), self._buckets(run), len(batch.params), run.sharded)
        applied = self._run_plan(key, plan, ir, run, vals, record)
        late = self._late.get(key)
        if late is None:  # once per route: the cells no segment commits
            late = self._late[key] = [(cell, new) for cell, new in ir.commits if not any(
                kind == "segment" and (cell, new) in item.commits for kind, item in plan)]
        if late:  # cells whose new value is computed after their segment: written now
            commit_cells(late, {new: self._to_split(new, vals) for _, new in late}, batch.states)
        if ir.update in vals.flat:  # the update came out of a fused segment: apply it here
            if record is not None and not any(kind == "segment" and item.final == ir.update for kind, item in plan):
                record.check(batch.params, self._to_split(ir.update, vals))  # (a segment's output, not its final)
            apply = functools.partial(self._apply, ir.update, vals, run, applied, ir.writes_param)
            if run.sharded is None:
                return apply
            return lambda: [u if u is None else _dtensor_like(u, p) for u, p in zip(apply(), run.sharded)]
        updates = self._to_split(ir.update, vals)
        if record is not None:
            record.check(batch.params, updates)
        return lambda: updates

    def flat_state_check(self) -> Callable[[torch.Tensor], bool]:
        """Whether a per-parameter state tensor is a view of a flat state buffer (which a fused segment
        under ``skip_nonfinite(updates=true)`` leaves as it was, writing the spare instead)."""
        flats = {id(t) for sts in (self._flat, self._spares) for st in sts.values() for t in st.values()}
        return lambda t: t._base is not None and id(t._base) in flats

    def _run_plan(self, label: str, plan: list[tuple[str, Any]], ir: RouteIR, batch: RouteBatch,
                  vals: _Values, record: StepRecord | None = None) -> set[int]:
        """Run a plan's eager nodes and fused segments in order; return the buckets whose update a
        segment applied in place."""
        applied: set[int] = set()
        guards = route_guards(self.prog, ir)
        drops = self._drops(plan, ir)
        for si, (kind, item) in enumerate(plan):
            for name in drops[si - 1] if si else ():  # values nothing from here on reads: freed
                vals.split.pop(name, None)
            if kind == "eager":
                node = ir.node(item)
                guard = guards.get(item)
                if guard is not None and not needed(guard, batch.envs):  # only a branch not taken reads it
                    vals.split[item] = [None] * vals.n
                    continue
                for src in ir.sources():  # a block's inner pipeline may read any of them
                    self._to_split(src.name, vals)
                for port, src in node.inputs.items():
                    if node.is_op and any(p.name == port and p.kind == "block" for p in node.impl.params):
                        continue  # a block's output: the block op runs its inner pipeline itself
                    self._to_split(src, vals)
                vals.split[item] = evaluate(node, vals.split, vals.lanes)  # (a GradError for what DTensors cannot run)
            else:
                applied |= self._run_segment(label, si, item, batch, vals, record)
        return applied

    def _drops(self, plan: list[tuple[str, Any]], ir: RouteIR) -> list[tuple[str, ...]]:
        """Per item of ``plan``, the per-parameter values (of eager nodes) no later item reads
        (:func:`~gradpipe.runtime.eager.release_plan` mapped onto the plan's items): a step then
        holds at once only the matrices still to be read, not every intermediate of the route."""
        key = (ir.label, ir.update, id(plan))
        out = self._drop_plans.get(key)
        if out is None:
            at = {n.name: i for i, n in enumerate(ir.nodes)}
            item_of: dict[int, int] = {}
            for k, (kind, item) in enumerate(plan):
                for name in ([item] if kind == "eager" else item.nodes):
                    item_of[at[name]] = k
            per_item: list[list[str]] = [[] for _ in plan]
            last_item = -1
            for i, names in enumerate(release_plan(self.prog, ir)):
                last_item = item_of.get(i, last_item)
                if last_item >= 0:
                    per_item[last_item].extend(names)
            out = self._drop_plans[key] = [tuple(d) for d in per_item]
        return out

    def point(self, label: str, batch: RouteBatch, node_states: dict[str, dict[str, Any]]) -> list[torch.Tensor]:
        """The point of the route's ``grad_at`` per parameter (``gradpipe/runtime/perturb.py``): its
        nodes (``RouteIR.point_nodes``, which keep no state) planned and fused like a route of their
        own, whose result is the point instead of an update; run before the closure's second call.
        The tensors are views of buffers reused every step."""
        local = _shards(batch)
        key = f"{label}#point" if local is None else f"{label}#point#sharded"
        entry = self._points.get(key)
        if entry is None:
            ir = self.prog.ir[label].point_ir()
            entry = self._points[key] = (plan_route(self.prog, label=label, ir=ir, sharded=local is not None), ir)
        plan, ir = entry
        run = batch if local is None else local
        vals = _Values(ParamLanes(self.prog, ir, batch, node_states), self._buckets(run), len(batch.params),
                       run.sharded)
        self._run_plan(key, plan, ir, run, vals)  # its functions and buffers apart from the route's
        return self._to_split(ir.update, vals)

    def _apply(self, out: str, vals: _Values, batch: RouteBatch, applied: set[int],
               writes_param: bool = False) -> list[torch.Tensor | None]:
        """``p <- p - lr * u`` for every bucket whose parameters have the compute dtype: one
        ``torch._foreach_add_`` over the parameters and views of the flat update (the same
        arithmetic as :func:`apply_update`; with ``writes_param``, ``p <- value``, one
        ``torch._foreach_copy_``); the updates of other buckets (fp16/bf16 parameters,
        rounded from float32 one by one) are returned for the caller, ``None`` where applied (here,
        or in the kernel: the buckets in ``applied``)."""
        updates: list[torch.Tensor | None] = [None] * vals.n
        for bi, (b, t) in enumerate(zip(vals.buckets, vals.flat[out])):
            if bi in applied:
                continue
            views = self._pieces(t, b)
            ps = [batch.params[i] for i in b.idxs]
            if any(p.dtype != b.dtype for p in ps):
                for i, v in zip(b.idxs, views):
                    updates[i] = v
                continue
            if writes_param:
                torch._foreach_copy_(ps, views)  # param = EXPR: p <- value
                continue
            lr = batch.envs[b.idxs[0]]["lr"]
            torch._foreach_add_(ps, views, alpha=-(lr.item() if isinstance(lr, torch.Tensor) else lr))
        return updates

    def _buckets(self, batch: RouteBatch) -> list[_Bucket]:
        """The buckets of the route's parameters in this step: one per param group, dtype and
        device, except that the largest parameters (at least ``SOLO_MIN`` elements, in the compute
        dtype and contiguous; ``SOLO_MAX`` of them at most) get a bucket each, which the fused
        segments read and update in the parameter's own storage (no gather, no copy back)."""
        groups: dict[tuple, _Bucket] = {}
        params = batch.params
        dts = [compute_dtype(p) for p in params]
        sizes = [p.numel() for p in params]
        big = [i for i, n in enumerate(sizes) if n >= SOLO_MIN]  # every step: the common case is cheap
        if big:
            big = sorted((i for i in big if params[i].is_contiguous() and params[i].dtype == dts[i]),
                         key=lambda i: -sizes[i])
        solo = set(big[:SOLO_MAX])
        for i, (p, env, dt, n) in enumerate(zip(params, batch.envs, dts, sizes)):
            key = (id(env), dt, p.device, i if i in solo else -1)
            b = groups.get(key)
            if b is None:
                b = groups[key] = _Bucket([], [], [], dt, p.device)
            b.idxs.append(i)
            b.shapes.append(p.shape)
            b.sizes.append(n)
        out = list(groups.values())
        for b in out:
            b.solo = len(b.idxs) == 1 and b.idxs[0] in solo
        return out

    def _to_flat(self, node: str, vals: _Values) -> list[torch.Tensor]:
        """``node``'s value as one flat tensor per bucket (gathered into a reused buffer)."""
        flat = vals.flat
        if node not in flat:
            per = self._to_split(node, vals)
            if vals.sharded is not None:  # DTensors: this rank's shards
                per = [_local_like(v, p) for v, p in zip(per, vals.sharded)]
            n = self.prog.node(node)
            is_grad = n.kind is Kind.SOURCE and n.op == "grad"
            out = []
            for b in vals.buckets:
                ts = _expanded(per, b)
                reuse = self._checked_buffer(ts, b) if is_grad and len(ts) > 1 else None
                out.append(reuse if reuse is not None else self._gather(("in", node), b, ts))
            flat[node] = out
        return flat[node]

    def _buffer(self, purpose: tuple, b: _Bucket) -> torch.Tensor:
        """A flat tensor for one bucket, allocated once and reused every step."""
        key = (purpose, b.key)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(sum(b.sizes), dtype=b.dtype, device=b.device)
            self._split_views[id(buf)] = [piece.view(shape) for piece, shape in zip(torch.split(buf, b.sizes),
                                                                                      b.shapes)]
        return buf

    def _pieces(self, t: torch.Tensor, b: _Bucket) -> list[torch.Tensor]:
        """The per-parameter views of the bucket's flat tensor ``t`` (made once for a reused buffer)."""
        views = self._split_views.get(id(t))  # the buffers live as long as self: their ids are theirs
        if views is not None:
            return views
        return [piece.view(shape) for piece, shape in zip(torch.split(t, b.sizes), b.shapes)]

    def _gather(self, purpose: tuple, b: _Bucket, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The bucket's tensors as one flat tensor (a view when there is one tensor of the right dtype)."""
        if len(tensors) == 1 and tensors[0].dtype == b.dtype and tensors[0].is_contiguous():
            return tensors[0].reshape(-1)
        buf = self._buffer(purpose, b)
        torch.cat([t.reshape(-1) for t in tensors], out=buf) if all(t.dtype == b.dtype for t in tensors) else \
            torch.cat([t.reshape(-1).to(b.dtype) for t in tensors], out=buf)
        return buf

    def _to_split(self, node: str, vals: _Values) -> list[torch.Tensor]:
        """``node``'s value as one tensor per parameter (views of its flat buffers when it has them)."""
        split = vals.split
        if node not in split:
            if node not in vals.flat:  # a source no segment has read
                split[node] = vals.lanes.source(vals.lanes.ir.node(node))
                return split[node]
            out: list[Any] = [None] * vals.n
            for b, t in zip(vals.buckets, vals.flat[node]):
                for i, piece in zip(b.idxs, self._pieces(t, b)):
                    out[i] = piece if vals.sharded is None else _dtensor_like(piece, vals.sharded[i])
            split[node] = out
        return split[node]

    # ------------------------------------------------------------------ segments
    def _run_segment(self, label: str, si: int, seg: _Segment, batch: RouteBatch, vals: _Values,
                     record: StepRecord | None = None) -> set[int]:
        """Run one fused segment: its outputs go into flat buffers reused every step, except the
        route's update of a solo bucket, applied in place; return the buckets so updated. With
        ``record``, the kernel reads the state and writes the new state into its spare buffers, a
        parameter it updates in place is copied first, and it flags per bucket whether the update
        is finite."""
        buckets = vals.buckets
        inputs = [self._to_flat(src, vals) for src in seg.inputs]
        envs = [batch.envs[b.idxs[0]] for b in buckets]
        dynamic = [[eval_dynamic(n, env) for n in seg.members] for env in envs]  # per bucket, per node
        scalars = [[self._scalars(n, d) for n, d in zip(seg.members, per)] for per in dynamic]
        prepared = [[self._bucket_state(label, si, b, n, batch, dynamic[bi][j]) for bi, b in enumerate(buckets)]
                    for j, n in enumerate(seg.members)]
        states = [[st for st, _ in row] for row in prepared]
        fresh = [[f for _, f in row] for row in prepared]
        reads = seg.reads_param and self._needs_param(seg, dynamic)
        params = ([self._gather(("param", label), b, [batch.params[i].detach() for i in b.idxs]) for b in buckets]
                  if reads else [None] * len(buckets))  # ops that do not read it get None
        self._one_param_view(seg, inputs, params, buckets)
        apply: list[tuple[torch.Tensor, Any] | None] = [None] * len(buckets)
        if seg.final is not None:  # the route's update: applied inside the kernel to a solo parameter
            writes_param = vals.lanes.ir.writes_param  # param = EXPR: lr None, p <- value
            for bi, (b, env) in enumerate(zip(buckets, envs)):
                if b.solo:
                    lr = env["lr"]
                    target = params[bi] if params[bi] is not None else batch.params[b.idxs[0]].detach().view(-1)
                    if writes_param:
                        apply[bi] = (target, None)
                        continue
                    apply[bi] = (target, lr.detach() if isinstance(lr, torch.Tensor) else
                                 (torch.tensor(float(lr), dtype=torch.float64) if lr != 0 else 0.0))
        steps = [torch.tensor(float(env["step"]), dtype=torch.float64) for env in envs]
        layout = tuple(b.layout for b in buckets)
        eager_fn, compiled_fn = self._fns.get((label, si, layout)) or self._make_fns(label, si, seg, layout)
        fn = compiled_fn if self.use_compile else eager_fn
        # no buffer for an update applied in the kernel (it would be the size of the parameter)
        outs = [[b.empty if n == seg.final and apply[bi] is not None else self._buffer(("out", label, n), b)
                 for bi, b in enumerate(buckets)] for n in seg.outputs]
        args: tuple = (inputs, states, fresh, params, scalars, steps, outs, apply)
        if self._gate(label, seg, layout):  # the kernel checks too (its verdict agrees with the check that just ran)
            args += (None, self._ok(label, buckets[0].device))
        if record is not None:  # the new state into the spare buffers; a parameter updated in the kernel copied
            olds, states = states, [[self._spare((label, si, b.key, n.name), st) for b, st in zip(buckets, row)]
                                    for n, row in zip(seg.members, states)]
            record.on_commit(functools.partial(self._swap, [
                ((label, si, b.key, n.name), new) for n, row in zip(seg.members, states) for b, new in zip(buckets, row)
                if new]))
            # copied before the kernel, not in it: Inductor (torch 2.13) stored the parameter's new value into a
            # copy taken inside the kernel where the segment also reads the parameter (decay, param = EXPR)
            record.save([a[0] for a in apply if a is not None])
            args = (inputs, states, fresh, params, scalars, steps, outs, apply, olds)
        try:
            flags = fn(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
            if fn is eager_fn:
                raise
            self._fallback(e)
            flags = eager_fn(*args)
        if record is not None and seg.final is not None:
            final = seg.outputs.index(seg.final)
            for bi, (b, flag) in enumerate(zip(buckets, flags)):
                record.flag([batch.params[i] for i in b.idxs], flag,
                            None if apply[bi] is not None else self._pieces(outs[final][bi], b))
        for n, o in zip(seg.outputs, outs):
            vals.flat[n] = o
        for n, per_bucket in zip(seg.nodes, states):
            for b, st in zip(buckets, per_bucket):
                self._publish(label, si, n, b, st, batch)
        return {bi for bi, a in enumerate(apply) if a is not None}

    def _spare(self, key: tuple, st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The other flat buffers of one node's state in one bucket (made once, then reused): a step
        under ``skip_nonfinite(updates=true)`` reads ``st`` and writes its new state there."""
        spare = self._spares.get(key)
        if spare is None or spare.keys() != st.keys() or any(
                spare[k].shape != t.shape or spare[k].dtype != t.dtype or spare[k] is t for k, t in st.items()):
            spare = self._spares[key] = {k: torch.empty_like(t) for k, t in st.items()}
        return spare

    def _swap(self, written: list[tuple[tuple, dict[str, torch.Tensor]]]) -> None:
        """The step's update was finite: the buffers it wrote become the state, the old ones the spares."""
        for key, new in written:
            self._spares[key], self._flat[key] = self._flat[key], new

    def _one_param_view(self, seg: _Segment, inputs: list[list[torch.Tensor]], params: list[torch.Tensor | None],
                        buckets: list[_Bucket]) -> None:
        """A solo bucket's parameter is one tensor in the segment: when the segment reads the
        ``param`` source (``param - lr * u``, Lookahead, Schedule-Free), the ops' ``params`` and the
        target of the in-kernel update are that input itself. Two views of the parameter from
        separate ``detach()`` calls, one of them written, are inputs ``torch.compile`` cannot
        trace (aliased inputs with different bases), and the segment would run eagerly."""
        src = next((j for j, name in enumerate(seg.inputs) if (n := self.prog.node(name)).kind is Kind.SOURCE
                    and n.op == "param"), None)
        if src is None:
            return
        for bi, b in enumerate(buckets):
            if b.solo:
                params[bi] = inputs[src][bi]

    @staticmethod
    def _needs_param(seg: _Segment, dynamic: list[list[dict[str, Any]]]) -> bool:
        """Whether some node of the segment reads the parameters in this step (in some bucket)."""
        for j, n in enumerate(seg.members):
            if n.is_op and n.impl.reads_param and \
                    any(n.impl.needs_param({**n.const, **per_bucket[j]}) for per_bucket in dynamic):
                return True
        return False

    def _gate(self, label: str, seg: _Segment, layout: tuple) -> tuple[int, ...]:
        """The positions in ``seg.inputs`` of the gradients that the segment's kernel checks itself
        (``lowering.fused_check``); () where the check is not fused: another plan, or buckets on more
        than one device (one flag cannot cover them)."""
        gate = self._gates.get(label)
        if gate is None:
            gate = self._gates[label] = tuple(i for i, src in enumerate(seg.inputs) if self.prog.node(src).op == "grad") \
                if fused_check(self.prog, label) else ()
        return gate if len({lay[2] for lay in layout}) == 1 else ()

    def _ok(self, label: str, device: torch.device) -> torch.Tensor:
        """The 0-d bool a kernel with the fused check writes its verdict into (made once)."""
        ok = self._oks.get((label, str(device)))
        if ok is None:
            ok = self._oks[(label, str(device))] = torch.ones((), dtype=torch.bool, device=device)
        return ok

    def _make_fns(self, label: str, si: int, seg: _Segment, layout: tuple) -> tuple[Callable, Callable]:
        """The segment's eager and compiled functions for one layout of buckets (``_Bucket.layout``).

        One compiled function per pipeline (its canonical hash), route, segment and layout, shared
        by every optimizer in the process: a second optimizer of the same model does not recompile.
        Each has a code object of its own (:func:`_own_code`), because Dynamo keeps at most
        ``recompile_limit`` (8) graphs per code object and then runs the function *uncompiled*:
        with one code object per segment, the ninth model shape a sweep or a test suite stepped
        would silently lose compilation. Within a layout, what still recompiles is a zero-valued
        hyperparameter (see :meth:`_scalars`); should that ever pass the limit,
        :func:`_warn_on_recompile_limit` says so once."""
        key = (self.prog.hash, label, si, self.use_compile, layout)
        fns = _SHARED.get(key)
        if fns is None:
            gate = self._gate(label, seg, layout)
            eager_fn = _segment_fn(seg, gate)
            compiled_fn = eager_fn
            if self.use_compile:
                tag = f"segment{si}_{len(_SHARED)}"

                def make(fn: Callable = eager_fn, tag: str = tag) -> Callable:
                    _warn_on_recompile_limit()
                    return torch.compile(_own_code(fn, tag), dynamic=False, backend=_recorded_backend)
                # made on the first call the disk cache cannot serve (``aot.py``: a process whose
                # segments all load from ``GRADPIPE_CACHE_DIR`` traces nothing)
                shape_free = tuple(lay[1:] for lay in layout)  # packages take any sizes (``aot.Package.fits``)
                plugins = aot.sources_of([n.impl for n in seg.members if n.kind is Kind.OP])
                compiled_fn = aot.Cached(make, repr((self.prog.hash, label, si, shape_free, gate, plugins)),
                                         _RECORDING)
            fns = _SHARED[key] = (eager_fn, compiled_fn)
        self._fns[(label, si, layout)] = fns
        return fns

    def _fallback(self, e: Exception) -> None:
        self.use_compile = False
        warnings.warn(f"gradpipe: torch.compile could not compile pipeline '{self.prog.name}' "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); running it eagerly, "
                      "with the same results", CompileFallbackWarning, stacklevel=4)

    @staticmethod
    def _scalars(node: Node, values: dict[str, Any]) -> list[Any]:
        """``node``'s per-step arguments as the compiled function takes them: 0-d float64 tensors
        (a new value does not recompile), except a param group's ``false``/``true`` and zero,
        which stay Python values (ops branch on them, e.g. ``momentum(0)`` keeps no buffer, as in
        the eager backend); a value computed from ``step`` or ``loss`` is always a tensor."""
        out: list[Any] = []
        for k in node.dynamic:
            v = values[k]
            kind = _scalar_kind(node, k, v)
            out.append(torch.tensor(float(v), dtype=torch.float64) if kind is _TENSOR else kind)
        return out

    # ------------------------------------------------------------------ state: flat buffers, per-parameter views
    def _bucket_state(self, label: str, si: int, b: _Bucket, node: Node, batch: RouteBatch,
                      dynamic: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
        """The node's flat state for the bucket and its ``fresh`` flag. The state is created from
        the op's declared buffers (``Op.buffers_for``) where the parameters do not hold it yet:
        before the first step, for a node new after ``load_state_dict``, or for a buffer a param
        group's new value asks for."""
        key = (label, si, b.key, node.name)
        st = self._flat.get(key)
        prefix = node.name + "."
        per = [batch.states[i] for i in b.idxs]
        sharded = _sharded_of(batch, b)
        wanted = [buf.name for buf in node.impl.buffers_for(structural_args(node, dynamic))] if node.is_op else []
        # every parameter still holds the views handed out last step: nothing replaced or removed
        # them (load_state_dict makes new tensors)
        if st is not None and all(k in st for k in wanted) and \
                all(self._published(key, k, t, [s.get(prefix + k) for s in per]) for k, t in st.items()):
            return st, self._flag(key, False, b.device)
        held = {k[len(prefix):] for s in per for k in s if k.startswith(prefix) and "." not in k[len(prefix):]}
        names = sorted(set(wanted) | {k for k in held if all(prefix + k in s for s in per)})
        if not names:  # a node that keeps no state
            self._flat[key] = {}
            return self._flat[key], self._flag(key, False, b.device)
        new = [all(prefix + k not in s for k in wanted) and bool(wanted) for s in per]
        # one flat tensor per buffer, filled a parameter at a time: the state a parameter's op
        # makes is freed before the next one's is made, so building costs one bucket's state and
        # one parameter's, not twice the bucket's (a fresh solo bucket takes its tensor as made)
        st: dict[str, torch.Tensor] = {}
        ends = list(itertools.accumulate(b.sizes, initial=0))
        for i, (s, shape) in enumerate(zip(per, b.shapes)):
            made: dict[str, torch.Tensor] | None = None
            for k in names:
                piece = s.get(prefix + k)
                if piece is not None:
                    piece = _local_like(piece, sharded[i])
                else:
                    if made is None:
                        made = node.impl.init(tuple(shape), structural_args(node, dynamic), b.dtype, b.device)
                    if len(per) == 1 and made[k].is_contiguous():
                        st[k] = made[k].reshape(-1)
                        continue
                    piece = made[k]
                if piece.numel() != b.sizes[i]:
                    raise AssertionError(f"{node.name}.{k}: a flat segment's state must have its parameter's size")
                if k not in st:
                    st[k] = torch.empty(ends[-1], dtype=piece.dtype, device=b.device)
                st[k][ends[i]:ends[i + 1]].copy_(piece.reshape(-1))
        self._flat[key] = st
        if all(new) or not any(new):
            return st, self._flag(key, all(new), b.device)
        # some parameters start now, others carry state: a mask over the bucket (recompiles once)
        return st, torch.cat([torch.full((n,), f, dtype=torch.bool, device=b.device) for f, n in zip(new, b.sizes)])

    def _flag(self, key: tuple, value: bool, device: torch.device) -> torch.Tensor:
        """The node's ``fresh`` flag for a bucket: a 0-d bool tensor of its own (the compiled
        function's inputs must not alias), kept across steps and written only when it changes."""
        entry = self._flags.get(key)
        if entry is None:
            entry = self._flags[key] = [torch.tensor(value, dtype=torch.bool, device=device), value]
        elif entry[1] != value:
            entry[0].fill_(value)
            entry[1] = value
        return entry[0]

    def _published(self, key: tuple, k: str, flat_t: torch.Tensor, held: list[torch.Tensor | None]) -> bool:
        pub = next((pub for pub in self._views.get((key, k), ()) if pub[0] is flat_t), None)
        return pub is not None and all(v is t for v, t in zip(pub[1], held))

    def _publish(self, label: str, si: int, node: str, b: _Bucket, st: dict[str, torch.Tensor],
                 batch: RouteBatch) -> None:
        """Point the optimizer's per-parameter state at views of the bucket's flat buffers."""
        key = (label, si, b.key, node)
        sharded = _sharded_of(batch, b)
        for k, t in st.items():
            pubs = self._views.setdefault((key, k), [])
            pub = next((pub for pub in pubs if pub[0] is t), None)
            if pub is None:
                # FSDP2: DTensors sharded as the parameters, as in the eager backend
                pub = (t, [_dtensor_like(piece.view(shape), p)
                           for piece, shape, p in zip(torch.split(t, b.sizes), b.shapes, sharded)])
                # the views of the state and of its spare stay; those of a replaced tensor go with it
                live = {id(x.get(k)) for x in (self._flat.get(key, {}), self._spares.get(key, {}))}
                pubs[:] = [p for p in pubs if id(p[0]) in live and p[0] is not t] + [pub]
            for i, v in zip(b.idxs, pub[1]):
                batch.states[i][f"{node}.{k}"] = v
