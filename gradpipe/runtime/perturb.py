"""Gradients at another point: the runtime of ``grad_at(point)`` (SAM, ASAM).

A pipeline that reads ``grad_at(point)`` needs the gradient of the loss at a point other
than the parameters, so it is stepped with a closure, ``opt.step(closure)``, which the
step calls twice (``docs/language.md``, "Gradients at another point"):

1. the closure, as for every torch optimizer: the loss and the gradient at the parameters;
2. the non-finite check of those gradients (a skipped step stops here);
3. each route's point, from its nodes (``RouteIR.point_nodes``: no state, so nothing changes),
   op by op on the eager backend, fused on the compiled one (``CompiledRoutes.point``);
4. every parameter of those routes saved, then set to its point, every ``.grad`` set to None,
   and the closure called again, with ``opt.at_point`` true (a closure may, say, leave
   BatchNorm's running statistics alone then): the gradients it leaves are ``grad_at``'s value (zeros for
   a parameter it does not reach; a ValueError if it reaches none, a closure that does not
   call ``backward()``);
5. in a ``finally``, every parameter restored bit for bit from its saved copy and every ``.grad``
   to the first gradient: a closure that raises leaves the parameters and gradients as they were;
6. the non-finite check of the perturbed gradients (a NaN or an Inf skips the step: nothing
   written, counted as any skipped step);
7. then the routes run as usual, ``grad_at`` reading the perturbed gradients.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from ..dsl.diagnostics import GradError
from .eager import RouteBatch, eval_point

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import Optimizer

__all__ = ["check_closure", "perturbed_grads"]


def check_closure(opt: "Optimizer", closure: Callable[[], Any] | None, losses: Any, samples: Any) -> None:
    """Refuse, before anything changes, a step of a ``grad_at`` pipeline that cannot compute the
    gradient at the point: no closure (a GradError at the ``grad_at`` call), named losses or
    per-example gradients, or a parameter listed twice."""
    if closure is None:
        node = next(opt.program.node(ir.grad_at) for ir in opt.program.ir.values() if ir.grad_at is not None)
        raise GradError("the pipeline takes the gradient at another point (grad_at), which needs a second forward "
                        "and backward pass: step() needs a closure", node.span,
                        "call opt.step(closure) with a closure that zeroes the gradients, computes the loss, "
                        "calls backward() and returns the loss (as torch.optim.LBFGS takes it)")
    if losses is not None or samples is not None:
        raise ValueError("a pipeline that reads grad_at(...) is stepped with opt.step(closure) only, "
                         "not with losses= or samples=")
    if opt._duplicates:
        raise ValueError("a pipeline that reads grad_at(...) cannot step a parameter listed twice in the param "
                         "groups: list each parameter once")


def perturbed_grads(opt: "Optimizer", by_route: Mapping[str, Sequence[tuple[torch.Tensor, dict[str, Any]]]],
                    closure: Callable[[], Any], loss_value: float | None) -> dict[torch.Tensor, torch.Tensor] | None:
    """Per parameter of the routes that read ``grad_at``, the gradient at the route's point (steps
    3 to 6 of the module docstring); None when the step is skipped for a non-finite one."""
    from .optimizer import _real
    prog = opt.program
    points: dict[torch.Tensor, torch.Tensor] = {}
    for label, items in by_route.items():
        if prog.ir[label].grad_at is None:
            continue
        params = [p for p, _ in items]
        batch = RouteBatch([_real(p) for p in params], {"grad": [_real(p.grad) for p in params]},
                           opt._route_envs(items, loss_value), [{} for _ in params])  # the point keeps no state
        evaluate = opt._compiled.point if opt._compiled is not None else partial(eval_point, prog)
        points.update(zip(params, evaluate(label, batch, opt._node_state)))
    if not points:  # no parameter of a grad_at route has a gradient in this step: nothing moves
        return {}
    everything = [p for group in opt.param_groups for p in group["params"]]
    first = [p.grad for p in everything]
    saved = [(p, p.detach().clone()) for p in points]
    try:
        for p, point in points.items():
            _real(p).copy_(point)
        for p in everything:
            p.grad = None
        opt.at_point = True
        with torch.enable_grad():
            closure()
        if all(p.grad is None for p in points):
            raise ValueError("grad_at: the closure's second call left no gradient on the parameters: the closure "
                             "must compute the loss and call backward() (step() calls it at the point), not "
                             "return a loss computed before")
        out = {p: p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in points}
    finally:
        opt.at_point = False
        for p, old in saved:
            p.copy_(old)
        for p, g in zip(everything, first):
            p.grad = g
    if opt._nonfinite.skip(opt, list(out), {"grad_at": {p: _real(g) for p, g in out.items()}}, None, None):
        return None
    return out
