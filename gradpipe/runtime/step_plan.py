"""The step plan of the compiled backend: what a step works out once per layout and reuses.

After a step of the general path (``Optimizer.step``), the compiled backend plans the next
steps of the same layout: which parameters have a gradient, in which routes and param groups,
their per-parameter environments (with the next step number), the step counters, and for each
route whose nodes all run in fused segments a :class:`~gradpipe.runtime.compiled._RoutePlan`
(buckets, gather buffers, argument lists, 0-d scalars). A planned step then checks that the
plan still holds, gathers the gradients (one ``torch._foreach_copy_`` into the buffers the
fused segments read), runs the non-finite check on those buffers (or lets the kernel run it,
where the step is one fused segment: ``lowering.fused_check``), writes the per-step scalars
in place, runs the segments and applies the update. ``gradpipe/runtime/compiled.py``'s module
docstring ("Step plan") says what the plan covers and how a planned step calls the compiled code.
"""

from __future__ import annotations

import math
import operator
from itertools import repeat
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..compiler.binder import reads_step
from ..dsl.diagnostics import GradError
from .eager import RouteBatch

if TYPE_CHECKING:  # pragma: no cover
    from .compiled import CompiledRoutes, _RoutePlan
    from .optimizer import Optimizer

__all__ = ["StepPlan", "planned_step", "plan_next_step", "counter_mask"]

#: step plans kept per optimizer (one per layout)
MAX_PLANS = 8
#: the most general steps to wait before planning again after plans were replaced before they
#: ran (the wait doubles each time, and ends when a plan runs twice)
MAX_BACKOFF = 64
#: what ``CompiledRoutes.step_plans`` holds for a layout whose gradients did not fit its plan (a
#: solo bucket's gradient that is not contiguous, a sparse gradient): the general path takes its steps
UNFIT = None

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_PTR = torch.Tensor.data_ptr


def counter_mask(flat: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """1 at the places ``idx`` of a counter set's flat tensor, 0 elsewhere: adding it counts a step
    of those parameters (``Optimizer._count_step``)."""
    mask = torch.zeros_like(flat)
    mask[list(idx)] = 1
    return mask


def _key(groups: Sequence[dict[str, Any]], params: Sequence[torch.Tensor], grads: Sequence[Any]) -> tuple:
    """The layout key: the param groups and their parameters (by identity, in order) and which
    parameters have a gradient."""
    return tuple(map(id, groups)), tuple(map(id, params)), tuple(map(operator.is_, grads, repeat(None)))


def _snapshot(v: Any) -> Any:
    """A param group value as a plan compares it: a tensor by its dtype, device and values (an
    lr tensor changed in place is a change), a number with its type (``0``, ``0.0`` and ``False``
    differ)."""
    if isinstance(v, torch.Tensor):
        return torch.Tensor, v.dtype, v.device, v.tolist()
    if isinstance(v, (tuple, list)):
        return (type(v), *map(_snapshot, v))
    return type(v), v


def _reads_step(prog: Any) -> bool:
    """Whether some range check or rule of the program reads ``step`` or ``loss``."""
    return any(reads_step(rc.expr) for rc in prog.range_checks) or \
        any(any(reads_step(e) for _, e in rule.exprs) for rule in prog.rule_checks)


class _Route:
    """One route of a step plan: its parameters, states and environments, its step counters,
    and its :class:`_RoutePlan` (None: the route runs through ``CompiledRoutes.run_route``)."""

    def __init__(self, label: str, items: list[tuple[torch.Tensor, dict[str, Any]]], states: list[dict[str, Any]],
                 envs: list[dict[str, Any]], pos: list[int], counters: tuple[torch.Tensor, list[int] | None],
                 plan: _RoutePlan | None) -> None:
        self.label, self.items, self.states, self.envs, self.pos, self.plan = label, items, states, envs, pos, plan
        self.params = [p for p, _ in items]
        #: the counter set holding the parameters' step counters, their places in it, and what
        #: counting a step adds (1, or a mask where the set also holds parameters of another layout)
        self.counter, at = counters
        self.at = list(range(len(self.params))) if at is None else at
        self.count: Any = 1 if at is None else counter_mask(self.counter, at)
        #: the counters' values the plan's environments were made for (another layout's step, a
        #: counter written in place: the environments are made again from the values)
        self.expect = self.counter.clone()
        self.grads: list[torch.Tensor] = []

    def resync(self) -> bool:
        """The environments' step numbers from the counters' values; False where parameters that
        share an environment no longer share a count (the step's buckets change: a new plan)."""
        values = self.counter.tolist()
        done: dict[int, float] = {}
        for env, i in zip(self.envs, self.at):
            if done.setdefault(id(env), values[i]) != values[i]:
                return False
        for env in {id(e): e for e in self.envs}.values():
            env["step"] = int(done[id(env)]) + 1
        self.expect.copy_(self.counter)
        return True


class StepPlan:
    """One optimizer's step for one layout (see the module docstring)."""

    def __init__(self, opt: "Optimizer", key: tuple, routes: list[_Route]) -> None:
        prog = opt.program
        self.key, self.routes = key, routes
        #: planned steps taken
        self.runs = 0
        self.state = opt.state
        self.stepped = [p for r in routes for p in r.params]
        # the parameters' storage and dtype: ``p.data = ...`` (``model.to()``, ``.half()``) changes them
        self.ptrs = list(map(_PTR, self.stepped))
        self.dtypes = list(map(_DTYPE, self.stepped))
        # the optimizer's state dict, entry by entry (``opt.state[p] = {}`` is a change)
        self.state_keys = list(opt.state)
        self.state_values = list(opt.state.values())
        # what the plan holds of each state dict: every entry where a route plan keeps views of
        # its flat state, the step counter elsewhere (eager nodes may replace their buffers)
        self.e_dicts: list[dict[str, Any]] = []
        self.e_keys: list[str] = []
        self.e_objs: list[Any] = []
        for r in routes:
            for st in r.states:
                for k, v in (st.items() if r.plan is not None else [("step", st.get("step"))]):
                    self.e_dicts.append(st)
                    self.e_keys.append(k)
                    self.e_objs.append(v)
        self.names = tuple(prog.hyperparams) + (() if "lr" in prog.hyperparams else ("lr",))
        self.sigs = [self._sig(g) for g in opt.param_groups]
        #: id(group) -> its environments (one per route and step count)
        self.envs_of: dict[int, dict[int, dict[str, Any]]] = {}
        for r in routes:
            for (_, group), env in zip(r.items, r.envs):
                self.envs_of.setdefault(id(group), {})[id(env)] = env
        self.envs = [env for envs in self.envs_of.values() for env in envs.values()]
        self.step_checks = _reads_step(prog)
        #: whether the step's non-finite check runs inside the kernel (one route, planned, ``ok`` set)
        self.fused = len(routes) == 1 and routes[0].plan is not None and routes[0].plan.ok is not None

    def _sig(self, group: dict[str, Any]) -> tuple:
        return tuple(map(_snapshot, map(group.__getitem__, self.names)))

    # ------------------------------------------------------------------ is it still the layout?
    def holds(self, opt: "Optimizer") -> bool:
        """Whether nothing the plan holds was replaced: the state dicts, their entries (buffers,
        counters; ``load_state_dict`` and hand edits make new ones), the counters' values, the
        parameters' storage (a new dtype or device is a new storage) and dtypes."""
        st = opt.state
        return st is self.state and len(st) == len(self.state_keys) \
            and all(map(operator.is_, st, self.state_keys)) and all(map(operator.is_, st.values(), self.state_values)) \
            and all(map(operator.is_, map(dict.get, self.e_dicts, self.e_keys), self.e_objs)) \
            and list(map(_PTR, self.stepped)) == self.ptrs and list(map(_DTYPE, self.stepped)) == self.dtypes \
            and all(torch.equal(r.counter, r.expect) or r.resync() for r in self.routes)

    def regroup(self, opt: "Optimizer") -> bool:
        """Follow changed param group values (an LR scheduler, a hand edit, an lr tensor changed in
        place): check them as the general path does, update the environments and refill the 0-d
        scalars that read them; False if the change alters a compiled function's structure."""
        for gi, group in enumerate(opt.param_groups):
            sig = self._sig(group)
            old = self.sigs[gi]
            if sig == old:
                continue
            opt.program.check_group(group, "a param group")
            names = {k for k, a, b in zip(self.names, sig, old) if a != b}
            envs = self.envs_of.get(id(group), {})
            for env in envs.values():
                env.update({k: group[k] for k in names})
            if not all(r.plan is None or r.plan.regroup(envs, names) for r in self.routes):
                return False
            self.sigs[gi] = sig
        return True

    # ------------------------------------------------------------------ the step
    def check_tensors(self, compiled: "CompiledRoutes") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What the non-finite check reads (``CompiledRoutes.grad_buffers``): the gathered gradient
        buffers, and the parameters whose ``.grad`` it reads itself (solo buckets); the routes
        without a plan gather theirs as the general path does."""
        flats: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []
        others: list[torch.Tensor] = []
        for r in self.routes:
            if r.plan is None:
                others += r.params
                continue
            flats += r.plan.check
            rest += [r.params[i] for _, i, _ in r.plan.solo]
        if others:
            compiled._active = None
            more, left = compiled.grad_buffers(others)
            flats += more
            rest += left
        return flats, rest

    def run(self, opt: "Optimizer", grads: list[Any], loss_value: float | None) -> bool:
        """The planned step; False (nothing written) where a gradient does not fit the plan."""
        for r in self.routes:
            r.grads = list(map(grads.__getitem__, r.pos))
            if r.plan is not None and not r.plan.prepare(r.grads):
                return False
        compiled = opt._compiled
        # the check inside the kernel (one route, one fused segment: lowering.fused_check); a loss that is
        # not finite is the check's before the kernel
        fused = self.fused and (loss_value is None or math.isfinite(loss_value))
        if not fused and self._skipped(opt, loss_value):
            return True
        try:
            for env in self.envs:
                env["loss"] = loss_value
                if self.step_checks:
                    opt.program.check_step_ranges(env)
        except GradError:  # a step the check would have skipped raises nothing, as on the general path
            if fused and self._skipped(opt, loss_value):
                return True
            compiled.step_plans.pop(self.key, None)
            raise
        try:
            for r in self.routes:
                if r.plan is not None:
                    if not compiled.run_plan(r.plan):  # the kernel found a NaN or an Inf and wrote nothing
                        r.grads = []
                        opt._nonfinite.found(opt, self.stepped)
                        return True
                else:
                    updates = compiled.run_route(r.label, RouteBatch(r.params, {"grad": r.grads}, r.envs, r.states),
                                                 opt._node_state, opt._orders[r.label])
                    opt._apply_updates(r.label, r.params, updates, r.items)
                r.counter.add_(r.count)
                r.expect.add_(r.count)
                r.grads = []
        except BaseException:
            compiled.step_plans.pop(self.key, None)  # the next step takes the general path
            raise
        if fused:
            opt._nonfinite.taken()
        for env in self.envs:
            env["step"] += 1
        return True

    def _skipped(self, opt: "Optimizer", loss_value: float | None) -> bool:
        """The non-finite check before the kernels, over the plan's gathered gradient buffers: True
        (counted) where the step is skipped."""
        compiled = opt._compiled
        compiled._active = self
        try:
            return opt._nonfinite.skip(opt, self.stepped, None, None, loss_value)
        finally:
            compiled._active = None


def planned_step(opt: "Optimizer", loss_value: float | None) -> bool:
    """Run this step from its plan, if the optimizer has one for the layout and it still holds;
    False: the general path takes the step (and plans the next)."""
    compiled = opt._compiled
    if not compiled.step_plans or torch.compiler.is_compiling():
        return False
    groups = opt.param_groups
    params = [p for g in groups for p in g["params"]]
    grads = list(map(_GRAD, params))
    key = _key(groups, params, grads)
    plan = compiled.step_plans.get(key)
    if plan is None:  # none yet, or a layout whose gradients do not fit a plan (UNFIT)
        return False
    if not plan.holds(opt) or not plan.regroup(opt):
        del compiled.step_plans[key]
        if not plan.runs:  # replaced before it ran (layouts that alternate: each re-gathers the state)
            compiled.plan_backoff = min(2 * compiled.plan_backoff + 1, MAX_BACKOFF)
            compiled.plan_wait = compiled.plan_backoff
        return False
    if plan.run(opt, grads, loss_value):
        plan.runs += 1
        if plan.runs == 2:
            compiled.plan_backoff = 0
        return True
    compiled.step_plans[key] = UNFIT  # not planned again until the plans are cleared
    return False


def plan_next_step(opt: "Optimizer", by_route: dict[str, list[tuple[torch.Tensor, dict[str, Any]]]],
                   loss_value: float | None) -> StepPlan | None:
    """After a step of the general path (``by_route``: its parameters by route), plan the next
    step of the same layout; None where it cannot be planned now (a step range that fails at the
    next step, a counter that is not shared, state that starts now): the next step plans again."""
    compiled = opt._compiled
    if not by_route or torch.compiler.is_compiling():
        return None
    groups = opt.param_groups
    params = [p for g in groups for p in g["params"]]
    pos = {id(p): i for i, p in enumerate(params)}
    key = _key(groups, params, list(map(_GRAD, params)))
    if key in compiled.step_plans:  # UNFIT
        return None
    if compiled.plan_wait:
        compiled.plan_wait -= 1
        return None
    routes = []
    try:
        for label, items in by_route.items():
            ps = [p for p, _ in items]
            states = [opt.state[p] for p in ps]
            counters = opt._covering_counters(ps, states)
            if counters is None:
                return None
            envs = opt._route_envs(items, loss_value)  # the next step's: the counters were just counted
            rp = compiled.route_plan(label, RouteBatch(ps, {"grad": [p.grad for p in ps]}, envs, states))
            if rp is False:
                return None
            routes.append(_Route(label, items, states, envs, [pos[id(p)] for p in ps], counters, rp))
    except GradError:
        return None
    plan = StepPlan(opt, key, routes)
    if all(r.plan is not None for r in routes):  # the plan's buffers hold the gradients the check reads:
        compiled.drop_check_buffers()           # the general path's are freed (made again if it runs)
    if len(compiled.step_plans) >= MAX_PLANS:
        compiled.step_plans.clear()
    compiled.step_plans[key] = plan
    compiled.plan_builds += 1
    return plan
