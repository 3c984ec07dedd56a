"""``state``: the node of a state cell declared in the language (``state vmax = 0 then ...``).

Not an op a `.grad` file calls by name: the compiler makes one for every ``state``
statement and every ``previous(x)`` (see ``docs/language.md``, "State cells"), and keeps
it out of the op library (:data:`~gradpipe.compiler.ops.base.INTERNAL_OPS`).
"""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, internal


@internal
class Cell(TensorOp):
    r"""A state cell: one tensor per parameter, kept across steps.

    .. math::
        c_0 = \text{init},\qquad \text{read}_t = c_{t-1},\qquad c_t = f(c_{t-1}, \ldots)

    ``keep`` says when a reader needs the cell (the compiler works it out from the ``where``
    branches that read it): where it is false for a param group, the cell keeps no buffer.

    The node's value in a step is the cell's value *before* the step (``init`` in the
    node's first step on a parameter: a number, or the signal on ``x`` in that step). The
    new value ``c_t`` is the value of another node of the route, which the runtime writes
    into the cell once the route has been evaluated (a *commit*, ``RouteIR.commits``), so
    every reader in the step sees the same value. A step skipped for a non-finite gradient
    commits nothing.
    """

    name = "state"
    summary = "a state cell (a `state` statement or `previous(x)`)"
    reference = "gradpipe"
    params = (
        Param("init", kind="value", default=None, doc="the initial value (None: the signal on x)"),
        Param("keep", kind="bool", default=True,
              doc="whether a reader needs the cell in this param group (false: no buffer, value 0)"),
    )
    buffers = (Buffer("value", "the cell's value after the last step"),)
    flat = True
    #: two cells are two pieces of state even when they start alike (their updates differ)
    mergeable = False

    def buffers_for(self, args):
        return () if args.get("keep", True) is False else self.buffers

    def update(self, x, state, a, lane):
        buf = state.get("value")
        if buf is None:  # no reader needs it in this param group (``keep`` is false)
            return torch.zeros_like(x)
        init = a.init
        fresh = lane.fresh
        if fresh is True:
            return buf.copy_(x) if init is None else buf.fill_(init)
        if fresh is False:
            return buf
        first = x if init is None else torch.as_tensor(init, dtype=buf.dtype, device=buf.device)
        return torch.where(fresh, first, buf)


__all__ = ["Cell"]
