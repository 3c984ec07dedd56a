"""``samgs``: Similarity-Aware Momentum Gradient Surgery (SAM-GS)."""

from __future__ import annotations

import math

import torch

from .base import Buffer, NodeCtx, Op, Param, register


@register
class SAMGS(Op):
    r"""SAM-GS: equalise task gradients of very different sizes, else modulate them by their momentum.

    For tasks :math:`k = 1..K` with gradients :math:`g_k`, global vectors over the
    *shared* tensors of the route (those every loss reaches), norms
    :math:`n_k = \lVert g_k\rVert`, the gradient magnitude similarity

    .. math::
        \mathrm{GMS}_{ij} = \frac{2\, n_i n_j}{n_i^2 + n_j^2} \in [0, 1],\qquad
        \bar s = \operatorname{mean}_{i<j} \mathrm{GMS}_{ij}

    and, with the step :math:`t` of the node (from 1), per-task momenta and one
    scalar second moment, both updated in every step:

    .. math::
        m_k \leftarrow b_1 m_k + (1-b_1)\, g_k,\qquad
        v \leftarrow b_2 v + (1-b_2)(1-\bar s)^2 + 10^{-8},\qquad
        \hat m_k = \frac{m_k}{1-b_1^t},\quad \hat v = \frac{v}{1-b_2^t}

    the shared tensors get

    .. math::
        u = K \cdot \begin{cases}
          \sum_k \dfrac{g_k}{n_k}\, \operatorname{mean}_j n_j & \bar s < \gamma \text{ (equalise)} \\
          \sum_k \dfrac{g_k \odot \lvert \hat m_k\rvert}{\sqrt{\hat v}} & \text{otherwise (modulate)}
        \end{cases}

    (the factor :math:`K` is the code's "to match the sum loss"). A tensor that
    some loss does not reach (a task's own head) gets the plain sum
    :math:`\sum_k g_k`, as in the reference, where task-specific parameters keep
    the summed ``.grad`` of the per-task backward passes; its momenta stay zero.
    :math:`m_k` starts at 0, :math:`v` at 0 (``v`` and ``t`` are node state, saved in
    ``state_dict``).

    Scale: the modulate branch is not scale-invariant: it grows like
    :math:`\lVert g\rVert^2` divided by the RMS of :math:`1-\bar s` over recent
    steps. The ``+1e-8`` each step keeps :math:`\hat v \ge 10^{-6}`; at equal norms
    (:math:`\bar s = 1`) :math:`\hat v = 10^{-6}` exactly at every step, so
    :math:`u = 1000\, K \sum_k g_k \odot \lvert \hat m_k\rvert`.
    The reference repository clips the shared gradient to global norm 1
    (``clip_grad_norm_(shared, 1.0)``) after this op in every experiment, which
    hides that scale: this op does not clip; write ``samgs(...) | clip_norm(1.0)``
    to reproduce it (the reference clips the shared parameters only: put the task
    heads on another route, e.g. ``grads.a + grads.b``, to leave them unclipped).

    Follows the ``SAMGS`` class of the reference code (not its MTRL variant, which
    hard-codes :math:`b_1 = b_2 = \gamma = 0.9`, tests ``any`` pair instead of the
    mean and drops the factor :math:`K`). Defaults are the class's
    (``gamma=0.1``); the repository's experiment configurations use ``gamma=0.7``. Norms and
    scalars are computed in double precision. The only departure: where the code
    divides 0 by 0 (a task whose shared gradient is exactly zero), this op takes
    :math:`g_k / n_k = 0` and :math:`\mathrm{GMS} = 1` for two zero gradients,
    instead of producing NaN.

    Reference: T. Borsani, A. Rosani, G. Nicosia, G. Di Fatta, "Gradient
    Similarity Surgery in Multi-Task Deep Learning", arXiv:2506.06130 (2025); code
    ThomBors/samgs ``methods/weight_methods.py``.
    """

    name = "samgs"
    summary = "equalise task gradients of dissimilar norms, else scale by |momentum|/sqrt(v); times K"
    reference = "Borsani et al. 2025 (SAM-GS), arXiv:2506.06130"
    has_node_state = True
    params = (
        Param("tasks", kind="signals", doc="the task gradients, e.g. grads.a, grads.b"),
        Param("b1", default=0.9, low=0.0, high=1.0, high_closed=False, doc="decay of the per-task momenta"),
        Param("b2", default=0.99, low=0.0, high=1.0, high_closed=False,
              doc="decay of the second moment of 1 - similarity"),
        Param("gamma", default=0.1, low=0.0, high=1.0,
              doc="mean similarity below which the gradients are equalised (the repo's configs: 0.7)"),
    )
    buffers = (Buffer("m<k>", "task k's momentum, one per task"),)

    def reduction(self, args):
        return "global"

    def buffers_for(self, args):
        (m,) = self.buffers
        return tuple(Buffer(f"m{k}", m.doc) for k in range(int(args.get("tasks", 2))))

    def init_node_state(self, args):
        return {"v": torch.zeros((), dtype=torch.float64), "t": 0}

    def node_state_dict(self, node_state):
        return {"v": node_state["v"].detach().clone(), "t": int(node_state["t"])}

    def load_node_state_dict(self, node_state, saved):
        node_state["v"] = torch.as_tensor(saved["v"], dtype=torch.float64).detach().clone().cpu()
        node_state["t"] = int(saved["t"])

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        tasks = ctx.signals
        if not tasks[0]:
            return []
        a = ctx.args[0]
        k_tasks, n = len(tasks), len(tasks[0])
        out: list[torch.Tensor | None] = [None] * n
        shared = [i for i in range(n) if ctx.is_shared(i)]
        for i in range(n):
            if not ctx.is_shared(i):  # a task head: the plain sum, as the summed .grad of the reference
                total = tasks[0][i].clone()
                for k in range(1, k_tasks):
                    total.add_(tasks[k][i])
                out[i] = total
        if not shared:
            return out  # type: ignore[return-value]

        sq = None
        for i in shared:
            v = torch.stack([torch.sum(tasks[k][i] * tasks[k][i]) for k in range(k_tasks)]).to(torch.float64)
            sq = v if sq is None else sq + v
        assert sq is not None
        norms = [math.sqrt(s) for s in sq.tolist()]
        sims = []
        for i in range(k_tasks):
            for j in range(i + 1, k_tasks):
                den = norms[i] ** 2 + norms[j] ** 2
                sims.append(2.0 * (norms[i] * norms[j]) / den if den > 0 else 1.0)
        sbar = sum(sims) / len(sims)

        ns = ctx.node_state
        ns["t"] += 1
        t = ns["t"]
        b1, b2 = float(a.b1), float(a.b2)
        v = b2 * float(ns["v"]) + ((1.0 - b2) * (1.0 - sbar) ** 2) + 1e-8
        ns["v"] = torch.tensor(v, dtype=torch.float64)
        for i in shared:
            for k in range(k_tasks):
                ctx.states[i][f"m{k}"].mul_(b1).add_(tasks[k][i], alpha=1.0 - b1)
        debias1 = 1.0 - b1 ** t
        vhat = v / (1.0 - b2 ** t)
        equalise = sbar < a.gamma
        mean_norm = sum(norms) / k_tasks
        root = math.sqrt(vhat)
        for i in shared:
            total = None
            for k in range(k_tasks):
                g = tasks[k][i]
                if equalise:
                    term = g / norms[k] * mean_norm if norms[k] > 0 else torch.zeros_like(g)
                else:
                    term = g * (ctx.states[i][f"m{k}"] / debias1).abs() / root
                total = term if total is None else total + term
            assert total is not None
            out[i] = total * k_tasks
        return out  # type: ignore[return-value]
