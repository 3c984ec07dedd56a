"""Undoing a step whose update is not finite: ``skip_nonfinite(updates=true)``.

The gradient check (``gradpipe/runtime/nonfinite.py``) runs before any op, so a skipped
step has nothing to undo. A non-finite *update* is known only once the routes have run,
and the ops write their state in place while they run. So a step under
``skip_nonfinite(updates=true)`` goes:

1. :class:`StepRecord` keeps what the step may write, before it writes it: each stepped
   parameter's state dict (its entries, so entries the step adds or replaces can be put
   back), a copy of every state tensor with its own storage (the eager backend's buffers,
   the compiled backend's eager nodes), and every node's node state (random generators,
   ``gcond``'s and ``samgs``'s histories) through the op's ``node_state_dict``. The step
   counters are not copied: they are counted only once the step is taken.
2. The routes run. On the compiled backend each fused segment reads its flat state and
   writes the new state into a second set of flat buffers (its spares), in the same pass,
   so the old state stays as it was; a parameter the kernel updates in place (a solo
   bucket) is copied just before the kernel (:meth:`StepRecord.save`). The segment that
   computes the update also computes, in the same kernel, whether it is finite
   (:meth:`StepRecord.flag`). Updates that come out of eager nodes are kept to be checked
   (:meth:`StepRecord.check`).
3. :meth:`StepRecord.bad` reads every flag and checks the kept updates (one host
   synchronisation per device, as the gradient check). No parameter has been written yet,
   except the solo ones the kernel wrote, which were copied.
4. Finite: :meth:`StepRecord.commit` makes the buffers the segments wrote the state (the old
   ones become the spares, so ``opt.state[p]`` holds views of the other set after each
   taken step), the step counters advance and the updates are applied. Not finite:
   :meth:`StepRecord.restore` puts every copy back (one ``torch._foreach_copy_``), every
   state dict's entries (the views of the old flat state among them) and every node
   state, and the step is counted as a skipped step.

The copies and the spares live in buffers made once and reused every step
(:class:`SavedCopies`, ``CompiledRoutes._spare``). Writing the new state next to the old
one costs the compiled kernel no extra read or write (``docs/reliability.md`` has what it
costs in time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .nonfinite import nonfinite_flags, param_names

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import Optimizer

__all__ = ["StepRecord", "SavedCopies"]


class SavedCopies:
    """Copies of tensors, in buffers kept across steps: a tensor copied in one step is copied
    into the same buffer in the next (found by its storage, so a new view of a parameter finds
    it too; the buffers a step no longer uses are dropped at the start of the step after)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._last: dict[tuple, torch.Tensor] = {}

    def begin(self) -> None:
        """A new step: the buffers of the last one are reused by the tensors this one copies again."""
        self._last, self._bufs = self._bufs, {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        try:
            where: Any = t.data_ptr()
        except RuntimeError:  # a tensor without storage of its own (a DTensor): by identity
            where = id(t)
        return (where, tuple(t.shape), t.dtype, t.device)

    def copy(self, tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(tensor, its copy)`` for each of ``tensors``, copied now with one ``_foreach_copy_``."""
        pairs = []
        for t in tensors:
            key = self._key(t)
            buf = self._bufs.get(key)
            if buf is None:
                buf = self._last.get(key)
                if buf is None:
                    buf = torch.empty_like(t, memory_format=torch.contiguous_format)
                self._bufs[key] = buf
            pairs.append((t, buf))
        if pairs:
            torch._foreach_copy_([c for _, c in pairs], [t for t, _ in pairs])
        return pairs


class StepRecord:
    """What one step checked for a non-finite update may write (see the module docstring).

    ``exclude(t)``: whether the state tensor ``t`` needs no copy here (a view of the compiled
    backend's flat state, which its segment leaves as it was and writes into the spares)."""

    def __init__(self, opt: "Optimizer", params: Sequence[torch.Tensor], saved: SavedCopies,
                 exclude: Callable[[torch.Tensor], bool] | None = None) -> None:
        self._opt = opt
        #: per stepped parameter, its state dict's entries (None: the parameter had no state)
        self._dicts = [(p, dict(opt.state[p]) if p in opt.state else None) for p in params]
        own = {id(v): v for _, d in self._dicts if d for k, v in d.items()
               if k != "step" and isinstance(v, torch.Tensor) and not (exclude is not None and exclude(v))}
        #: (tensor, its copy): put back by :meth:`restore`
        self._saved = saved
        saved.begin()
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = saved.copy(list(own.values()))
        self._node_state = {name: opt.program.node(name).impl.node_state_dict(st)
                            for name, st in opt._node_state.items()}
        self._commits: list[Callable[[], None]] = []
        #: (parameters, their updates or None, a 0-d bool flag or None): what :meth:`bad` reads
        self._checks: list[tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None]] = []

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Something to do once the step is known to be taken (the compiled backend's swap of its
        state buffers), before the updates are applied."""
        self._commits.append(fn)

    def commit(self) -> None:
        """The update is finite: the step is taken."""
        for fn in self._commits:
            fn()

    def save(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` now (one ``_foreach_copy_``), to be put back by :meth:`restore`."""
        if tensors:
            self.copies.extend(self._saved.copy(tensors))

    def flag(self, params: Sequence[torch.Tensor], flag: torch.Tensor,
             updates: Sequence[torch.Tensor] | None = None) -> None:
        """A fused kernel's finding for ``params`` (True: their update is not finite); ``updates``:
        their updates where they were written out (to name the culprits), else None."""
        self._checks.append((list(params), list(updates) if updates is not None else None, flag))

    def check(self, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor | None]) -> None:
        """Updates to check (per parameter; None: applied elsewhere and flagged there)."""
        kept = [(p, u) for p, u in zip(params, updates) if u is not None]
        if kept:
            self._checks.append(([p for p, _ in kept], [u for _, u in kept], None))

    def bad(self) -> bool:
        """Whether some update of the step is not finite: the kernels' flags and the kept updates,
        read with one host synchronisation per device."""
        flags = [f for _, _, f in self._checks if f is not None]
        flags += nonfinite_flags([u for _, us, f in self._checks if f is None for u in us or ()])
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for f in flags:
            by_device.setdefault(f.device, []).append(f.reshape(()).to(torch.bool))
        return any(bool(torch.stack(fs).any().item()) for fs in by_device.values())

    def culprits(self) -> list[str]:
        """``name (update)`` for every parameter whose update is not finite (the slow path, on
        the error only; read before :meth:`restore`)."""
        who = param_names(self._opt)
        out = []
        for params, updates, flag in self._checks:
            if updates is not None:
                bad = [not bool(torch.isfinite(u).all()) for u in updates]
            else:
                bad = [bool(flag)] * len(params)
            for p, b in zip(params, bad):
                if b:
                    out.append(f"{who(p)} (update)")
        return out

    def restore(self) -> None:
        """Undo the step: every copy back, every state dict's entries and every node state as before."""
        if self.copies:
            torch._foreach_copy_([t for t, _ in self.copies], [c for _, c in self.copies])
        state = self._opt.state
        for p, entries in self._dicts:
            if entries is None:
                state.pop(p, None)
                continue
            st = state[p]
            for k in [k for k in st if k not in entries]:
                del st[k]
            st.update(entries)
        opt = self._opt
        for name in [n for n in opt._node_state if n not in self._node_state]:
            del opt._node_state[name]
        for name, saved in self._node_state.items():
            opt.program.node(name).impl.load_node_state_dict(opt._node_state[name], saved)
