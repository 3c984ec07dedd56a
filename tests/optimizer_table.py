"""One table of optimizers that drives the generic optimizer tests.

In the spirit of torch's ``OptimizerInfo`` database: each :class:`OptCase`
names a gradpipe pipeline with its hyperparameters and the reference
``torch.optim`` optimizer (class and keyword arguments) that the pipeline
must reproduce exactly. ``test_equivalence.py`` runs both side by side in
float64; ``test_runtime.py`` uses :data:`BUILTIN_NAMES` for the generic
runtime checks (state_dict round trips).

Lion has no torch class, so :class:`RefLion` is a small float64 reference
written from the paper (Chen et al., "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675, Algorithm 2), not from gradpipe's op.

``state_map`` maps a gradpipe state key (``"<node>.<buffer>"``) to the
reference optimizer's state key for the buffers that mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


import gradpipe

__all__ = ["OptCase", "CASES", "BUILTIN_NAMES", "RefLion", "case_ids"]


class RefLion(torch.optim.Optimizer):
    r"""Lion, Algorithm 2 of arXiv:2302.06675, computed in float64.

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t

        \theta_t = \theta_{t-1} - \eta_t(\operatorname{sign}(c_t) + \lambda\theta_{t-1})

        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    ``m`` starts at zero. State key: ``exp_avg``.
    """

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(torch.float64)
                theta = p.detach().to(torch.float64)
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(theta)
                m = st["exp_avg"]
                c = b1 * m + (1 - b1) * g
                theta = theta - lr * (torch.sign(c) + wd * theta)
                st["exp_avg"] = b2 * m + (1 - b2) * g
                p.copy_(theta.to(p.dtype))
        return loss


_ADAM_STATE = {"main/exp_avg/ema.m": "exp_avg", "main/exp_avg_sq/ema.m": "exp_avg_sq"}
_MOM_STATE = {"main/momentum.buf": "momentum_buffer"}


@dataclass(frozen=True)
class OptCase:
    """One row: a gradpipe pipeline and the torch optimizer it must equal.

    pipeline: built-in name; hp: keyword arguments to ``gradpipe.Optimizer``;
    ref_cls/ref_kwargs: the reference; state_map: gradpipe state key ->
    reference state key; group2: hyperparameters of a second param group in
    the two-group test (same names on both sides); one_cycle: whether the case
    suits ``OneCycleLR`` (which cycles ``momentum`` or ``betas[0]``).
    """

    id: str
    pipeline: str
    hp: dict[str, Any]
    ref_cls: type
    ref_kwargs: dict[str, Any]
    state_map: dict[str, str] = field(default_factory=dict)
    group2: dict[str, Any] = field(default_factory=dict)
    one_cycle: bool = False


CASES: list[OptCase] = [
    # ---------------------------------------------------------------- SGD family
    OptCase("sgd", "sgd", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1),
            group2=dict(lr=0.03)),
    OptCase("sgd-wd-momentum-dampening", "sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            state_map=_MOM_STATE, group2=dict(lr=0.02, momentum=0.5, dampening=0.0, weight_decay=0.1),
            one_cycle=True),
    OptCase("momentum", "momentum", dict(lr=0.05), torch.optim.SGD, dict(lr=0.05, momentum=0.9),
            state_map=_MOM_STATE, group2=dict(lr=0.01, momentum=0.8)),
    OptCase("nesterov", "nesterov", dict(lr=0.05), torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True),
            state_map=_MOM_STATE, group2=dict(lr=0.02, momentum=0.7)),
    OptCase("nesterov-wd", "nesterov", dict(lr=0.05, weight_decay=1e-2), torch.optim.SGD,
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            state_map=_MOM_STATE, group2=dict(lr=0.02, weight_decay=0.0)),
    # ---------------------------------------------------------------- Adam family
    OptCase("adam", "adam", dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2),
            state_map=_ADAM_STATE, group2=dict(lr=3e-3, betas=(0.85, 0.995)), one_cycle=True),
    OptCase("adam-betas-eps-wd", "adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
            torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
            state_map=_ADAM_STATE, group2=dict(lr=5e-3, eps=1e-4, weight_decay=0.0)),
    OptCase("adamw", "adamw", dict(lr=1e-2), torch.optim.AdamW, dict(lr=1e-2),  # torch default wd 0.01
            state_map=_ADAM_STATE, group2=dict(lr=2e-3, weight_decay=0.05)),
    OptCase("adamw-wd0.1", "adamw", dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW,
            dict(lr=1e-2, weight_decay=0.1),
            state_map=_ADAM_STATE, group2=dict(lr=2e-3, betas=(0.9, 0.9))),
    # ---------------------------------------------------------------- RMSprop
    OptCase("rmsprop", "rmsprop", dict(lr=1e-2), torch.optim.RMSprop, dict(lr=1e-2),
            state_map={"main/rms.v": "square_avg"}, group2=dict(lr=1e-3, alpha=0.9)),
    OptCase("rmsprop-momentum-centered-wd-alpha", "rmsprop",
            dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2, alpha=0.9),
            torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2, alpha=0.9),
            state_map={"main/rms.v": "square_avg", "main/rms.g_avg": "grad_avg", **_MOM_STATE},
            group2=dict(lr=3e-3, momentum=0.5, alpha=0.95, weight_decay=0.0)),
    # ---------------------------------------------------------------- Lion (paper reference)
    OptCase("lion", "lion", dict(lr=1e-3), RefLion, dict(lr=1e-3),
            state_map={"main/lion.m": "exp_avg"}, group2=dict(lr=3e-4, betas=(0.95, 0.98))),
    OptCase("lion-wd", "lion", dict(lr=1e-3, weight_decay=0.1), RefLion, dict(lr=1e-3, weight_decay=0.1),
            state_map={"main/lion.m": "exp_avg"}, group2=dict(lr=5e-4, weight_decay=1.0)),
]

#: pipelines for matrices only, as torch.optim.Muon (a vector matches no route): the generic
#: tests over whole models leave them out; tests/test_muon.py runs them (muon_adamw, which
#: routes the same Muon to a model's matrices, is in the generic tests)
MATRICES_ONLY = frozenset({"muon"})
#: every pipeline that ships with gradpipe, loadable by name, that takes every parameter of a model
BUILTIN_NAMES: list[str] = [n for n in gradpipe.builtin_names() if n not in MATRICES_ONLY]


def case_ids(cases: list[OptCase]) -> list[str]:
    return [c.id for c in cases]
