"""Non-finite steps: the check that runs before every optimizer step, and its counters.

A step whose gradients hold a NaN or an Inf is skipped by default: nothing changes, not
the parameters, not a state buffer, not the step counter, not an op's random generator.
The pipeline states the policy with a policy op (``gradpipe/compiler/ops/nonfinite.py``):

* ``skip_nonfinite(max_consecutive=N)`` (the default, with ``N = 10``): skip, count, and
  raise :class:`NonFiniteError` when more than ``N`` steps in a row were skipped;
* ``allow_nonfinite``: no check, as ``torch.optim`` (NaN and Inf reach the state).

With ``skip_nonfinite(updates=true)``, a step whose update is not finite (the pipeline's own
arithmetic, from finite gradients) is undone and counted the same way, once the routes have
run and before any update is applied (``gradpipe/runtime/rollback.py``).

The check reads every gradient tensor the step hands the pipeline (``grad``,
``grads.<loss>``, ``samples``) and, when the pipeline reads it, the loss, once each: on
the CPU one ``aminmax`` per tensor (a NaN propagates into the min and the max, an Inf
is one of them), over the flat gradient buffer of the compiled backend where the step's
gradients are that buffer, and inside the fused kernel where a planned compiled step is one
kernel (``lowering.fused_check``; :meth:`NonFiniteGuard.found` counts what it finds); on a GPU one fused launch per list of tensors
(``torch._amp_foreach_non_finite_check_and_unscale_`` with a unit scale, the kernel
``torch.amp.GradScaler`` uses). Then one host synchronisation per device reads the
result. DTensor gradients (FSDP2) are checked on each rank's shards, and the ranks agree
with one all-reduce per device mesh dimension, so all of them skip the same steps. The
semantics follow optax's ``apply_if_finite`` (skip, keep the inner state, count
consecutive failures) and ``torch.amp.GradScaler`` (skip ``optimizer.step()``), except
that exceeding the limit raises instead of applying the non-finite update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from ..compiler.ops.nonfinite import DEFAULT_MAX_CONSECUTIVE, NonFinitePolicy
from ..compiler.program import Program
from .eager import DTensor

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import Optimizer

__all__ = ["NonFiniteError", "NonFinitePolicy", "NonFiniteGuard", "policy_of", "any_nonfinite", "nonfinite_flags",
           "param_names",
           "DEFAULT_MAX_CONSECUTIVE"]


class NonFiniteError(FloatingPointError):
    """More optimizer steps in a row had NaN or Inf gradients than the pipeline's
    ``skip_nonfinite(max_consecutive=...)`` allows (10 by default).

    The parameters and the optimizer state are those after the last finite step: no
    skipped step changed them. Attributes: ``step`` (the step number that could not be
    taken), ``consecutive`` (skipped steps in a row, this one included), ``max_consecutive``,
    ``total`` (skipped steps in the run so far) and ``params`` (the parameters, by name where
    the optimizer was built from ``named_parameters()``, whose gradients were not finite in
    this step, each with the source: ``grad``, ``grads.<loss>``, ``samples``).


    With ``skip_nonfinite(updates=true)``, a step whose gradients were finite but whose update
    was not (the pipeline's own arithmetic) counts too; ``update`` is then true and ``params``
    names the parameters whose update was not finite, each with the source ``update``.
    """

    def __init__(self, step: int, consecutive: int, max_consecutive: float, total: int,
                 params: Sequence[str] = (), loss: float | None = None, update: bool = False) -> None:
        self.step, self.consecutive, self.max_consecutive = int(step), int(consecutive), float(max_consecutive)
        self.total, self.params, self.loss, self.update = int(total), list(params), loss, bool(update)
        limit = int(max_consecutive) if math.isfinite(max_consecutive) else max_consecutive
        shown = ", ".join(self.params[:10]) + (f" and {len(self.params) - 10} more" if len(self.params) > 10 else "")
        if self.update:
            super().__init__(
                f"step {self.step}: the pipeline's update is not finite (NaN or Inf) for {shown or 'a parameter'}, "
                f"from finite gradients; {self.consecutive} skipped steps in a row, more than "
                f"skip_nonfinite(max_consecutive={limit}, updates=true) allows ({self.total} skipped in this run). "
                "The parameters and the optimizer state are those after the last finite step.\n"
                "hint: look for a division by zero, a log or a square root of a negative number, or an overflow in "
                "the pipeline's arithmetic or its hyperparameters, or raise the limit: "
                "grad | skip_nonfinite(max_consecutive=..., updates=true) | ...")
            return
        what = []
        if self.params:
            what.append(f"non-finite gradients (NaN or Inf) in {shown}")
        if loss is not None and not math.isfinite(loss):
            what.append(f"loss {loss}")
        super().__init__(
            f"step {self.step}: {'; '.join(what) or 'non-finite gradients (NaN or Inf)'}; {self.consecutive} such "
            f"steps in a row, more than skip_nonfinite(max_consecutive={limit}) allows ({self.total} skipped in "
            "this run). The parameters and the optimizer state are those after the last finite step.\n"
            "hint: lower the learning rate, look for a log, a division or an overflow in the loss, or raise the "
            "limit: grad | skip_nonfinite(max_consecutive=...) | ...")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Dask workers)
        return (type(self), (self.step, self.consecutive, self.max_consecutive, self.total, self.params, self.loss,
                             self.update))


def policy_of(prog: Program) -> NonFinitePolicy:
    """The pipeline's policy, as the compiler worked it out (``Program.nonfinite``): from its
    ``skip_nonfinite`` / ``allow_nonfinite`` nodes, or the default ``skip_nonfinite(max_consecutive=10)``."""
    return prog.nonfinite


def any_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` holds a NaN or an Inf: one ``aminmax`` per tensor on the CPU,
    one fused GradScaler launch per device elsewhere, and one host synchronisation per device.
    DTensors (FSDP2) are checked on each rank's shards, and the answer is then agreed over their
    device meshes (:func:`_agreed`), so every rank skips the same steps."""
    plain = [t for t in tensors if not isinstance(t, DTensor)]
    flag = _local_nonfinite(plain)
    if len(plain) < len(tensors):
        flag = _agreed([t for t in tensors if isinstance(t, DTensor)], flag)
    return flag


def _agreed(dtensors: Sequence[torch.Tensor], flag: bool) -> bool:
    """Whether a shard of ``dtensors`` on any rank of their meshes holds a NaN or an Inf, or
    ``flag`` holds on any of those ranks: this rank's shards checked, then one all-reduce (max) per
    mesh dimension, in place of the two a DTensor's ``aminmax`` costs per tensor."""
    import torch.distributed as dist
    meshes: dict[Any, list[torch.Tensor]] = {}
    for t in dtensors:
        meshes.setdefault(t.device_mesh, []).append(t.to_local())
    for mesh, shards in meshes.items():
        found = torch.tensor([float(flag or _local_nonfinite(shards))], device=mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        flag = bool(found.item())
    return flag


def _local_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether one of ``tensors`` (plain tensors) holds a NaN or an Inf: :func:`nonfinite_flags`,
    read with one host synchronisation per device."""
    return any(bool(f.item()) for f in nonfinite_flags(tensors))


def nonfinite_flags(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per device of ``tensors``, a 0-d tensor on it that is nonzero where one of them holds a NaN
    or an Inf (:func:`any_nonfinite` without the host synchronisation)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t)
    flags = []
    for device, ts in by_device.items():
        if device.type == "cpu":
            # min and max of each tensor in one vectorised pass (NaN propagates into both; an Inf
            # is one of them): 0.9 ms for 10M floats on 2 CPU threads, where GradScaler's kernel,
            # which also rewrites the values, took 8 ms and isfinite().all() 68 ms
            ends = torch.stack([torch.stack(torch.aminmax(t)).to(torch.float32) for t in ts])
            flags.append(torch.isfinite(ends).all().logical_not())
            continue
        found = torch.zeros(1, dtype=torch.float32, device=device)
        try:  # GPU: one fused launch for the whole list
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones(1, dtype=torch.float32,
                                                                                   device=device))
        except (RuntimeError, NotImplementedError, AttributeError):  # a device or dtype the kernel lacks
            found = torch.stack([torch.isfinite(t).all() for t in ts]).logical_not().any().to(torch.float32)
        flags.append(found)
    return flags


class NonFiniteGuard:
    """The policy and the counters of one optimizer (see :func:`policy_of`).

    ``total`` counts skipped steps in the run, ``consecutive`` the skipped steps since the last
    finite one, ``last_skipped`` whether the last ``step()`` call was skipped; all three are
    saved in ``state_dict()["gradpipe"]["nonfinite"]``.
    """

    def __init__(self, policy: NonFinitePolicy) -> None:
        self.policy = policy
        self.total = 0
        self.consecutive = 0
        self.last_skipped = False

    # ------------------------------------------------------------------ the check
    def skip(self, opt: "Optimizer", params: Sequence[torch.Tensor],
             named_grads: Mapping[str, Mapping[torch.Tensor, torch.Tensor]] | None,
             by_sample: Mapping[torch.Tensor, torch.Tensor] | None, loss_value: float | None) -> bool:
        """Check this step's inputs before anything runs (``loss_value``: the loss when the pipeline
        reads it, else None). True: skip the step (counted); raises :class:`NonFiniteError` past
        the limit. False: take it (the consecutive count restarts, unless the update is still to
        be checked: ``skip_nonfinite(updates=true)``, then :meth:`taken` or :meth:`skip_update`)."""
        if not self.policy.check or not params:  # no gradient this step: nothing to count
            return False
        bad = (loss_value is not None and not math.isfinite(loss_value)) or \
            any_nonfinite(self._tensors(opt, params, named_grads, by_sample))
        if not bad:
            if not self.policy.updates:
                self.taken()
            return False
        self._count(opt, params, lambda: self._culprits(opt, params, named_grads, by_sample), loss_value)
        return True

    def found(self, opt: "Optimizer", params: Sequence[torch.Tensor]) -> None:
        """Count a step whose gradients the fused kernel found not finite (its check ran inside the
        kernel, which wrote nothing: ``lowering.fused_check``); raises :class:`NonFiniteError`
        past the limit."""
        self._count(opt, params, lambda: self._culprits(opt, params, None, None), None)

    def taken(self) -> None:
        """The step was taken: the consecutive count restarts."""
        self.consecutive = 0
        self.last_skipped = False

    def skip_update(self, opt: "Optimizer", params: Sequence[torch.Tensor], culprits: list[str]) -> None:
        """Count a step undone for a non-finite update (``culprits``: ``name (update)`` per
        parameter); raises :class:`NonFiniteError` past the limit."""
        self._count(opt, params, lambda: culprits, None, update=True)

    def _count(self, opt: "Optimizer", params: Sequence[torch.Tensor], culprits: Callable[[], list[str]],
               loss_value: float | None, update: bool = False) -> None:
        self.total += 1
        self.consecutive += 1
        self.last_skipped = True
        if self.consecutive > self.policy.max_consecutive:
            raise NonFiniteError(_step_number(opt, params), self.consecutive, self.policy.max_consecutive,
                                 self.total, culprits(), loss_value, update)

    @staticmethod
    def _sources(opt: "Optimizer", params: Sequence[torch.Tensor],
                 named_grads: Mapping[str, Mapping[torch.Tensor, torch.Tensor]] | None,
                 by_sample: Mapping[torch.Tensor, torch.Tensor] | None
                 ) -> list[tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The gradient tensors the pipeline reads this step: (source, [(parameter, tensor)])."""
        prog = opt.program
        out = []
        if named_grads is not None and "grad_at" in named_grads:  # the gradients at the point (runtime/perturb.py)
            return [("grad_at", [(p, named_grads["grad_at"][p]) for p in params])]
        if named_grads is not None:
            for name in sorted(prog.losses):
                per = named_grads[f"grads.{name}"]
                out.append((f"grads.{name}", [(p, per[p]) for p in params if p in per]))
            if "grad" in prog.reads:
                out.append(("grad", [(p, named_grads["grad"][p]) for p in params]))
        elif by_sample is not None:
            if "samples" in prog.reads:
                out.append(("samples", [(p, by_sample[p]) for p in params]))
            if "grad" in prog.reads:  # p.grad when set, else the mean of the (checked) samples
                out.append(("grad", [(p, p.grad) for p in params if opt._has_grad(p)]))
        elif "grad" in prog.reads:
            out.append(("grad", [(p, p.grad) for p in params]))
        return out

    def _tensors(self, opt: "Optimizer", params: Sequence[torch.Tensor],
                 named_grads: Mapping[str, Mapping[torch.Tensor, torch.Tensor]] | None,
                 by_sample: Mapping[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for source, pairs in self._sources(opt, params, named_grads, by_sample):
            if source == "grad" and named_grads is None and opt._compiled is not None:
                flats, rest = opt._compiled.grad_buffers([p for p, _ in pairs])
                out += flats + [p.grad for p in rest]
            else:
                out += [t for _, t in pairs]
        return out

    def _culprits(self, opt: "Optimizer", params: Sequence[torch.Tensor],
                  named_grads: Mapping[str, Mapping[torch.Tensor, torch.Tensor]] | None,
                  by_sample: Mapping[torch.Tensor, torch.Tensor] | None) -> list[str]:
        """``name (source)`` for every gradient that is not finite (the slow path, on the error only)."""
        who = param_names(opt)
        out = []
        for source, pairs in self._sources(opt, params, named_grads, by_sample):
            for p, t in pairs:
                if not bool(torch.isfinite(t).all()):
                    out.append(f"{who(p)} ({source})")
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive, "last_step_skipped": self.last_skipped}

    def load_state_dict(self, saved: Mapping[str, Any] | None) -> None:
        """Restore the counters (a state dict saved before they existed restores zeros)."""
        saved = saved or {}
        self.total = int(saved.get("total", 0))
        self.consecutive = int(saved.get("consecutive", 0))
        self.last_skipped = bool(saved.get("last_step_skipped", False))


def param_names(opt: "Optimizer") -> Callable[[torch.Tensor], str]:
    """How an error names a parameter: its name from ``named_parameters``, else its position and shape."""
    names = {p: name for name, p in opt._named() if name is not None}
    index = {p: i for i, (_, p) in enumerate(opt._named())}
    return lambda p: names.get(p) or f"parameter {index.get(p, '?')} of shape {tuple(p.shape)}"


def _step_number(opt: "Optimizer", params: Sequence[torch.Tensor]) -> int:
    """The step number the pipeline would have seen (the largest among the step's parameters)."""
    steps = [int(opt.state[p]["step"].item()) for p in params if "step" in opt.state.get(p, {})]
    return max(steps, default=0) + 1
