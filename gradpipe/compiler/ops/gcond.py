"""``gcond``: Gradient Conductor, arbitrated projection of conflicting task gradients with momentum."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Buffer, NodeCtx, Op, Param, register

_HALF_PI = math.pi / 2.0


@register
class GCond(Op):
    r"""GCond: resolve the worst conflicting pair of task gradients, again and again, then smooth.

    Inputs are the task gradients :math:`g_1..g_K` (``K >= 2``), each a global
    vector over every tensor of the route: a tensor that a loss does not reach
    holds zeros in that task's vector, as in the reference code, which flattens
    all trainable parameters into one vector and has no shared/task-specific split
    (so task heads take part in the inner products and the projections). One step:

    **Norm EMAs** (node state, :math:`E_k = 1` initially), on the raw norms:
    :math:`E_k \leftarrow \max(\beta_E E_k + (1-\beta_E)\lVert g_k\rVert,\ \epsilon)`.
    **Norm cap** (``norm_cap``, off by default): if :math:`\lVert g_k\rVert > C`,
    :math:`g_k \leftarrow g_k\, C / (\lVert g_k\rVert + \epsilon)`.

    **Conflict loop**, at most ``max_iters`` iterations (0 means :math:`2K`) in
    total. Among the pairs :math:`i<j` whose squared norms are both at least
    :math:`\epsilon` (so a task with :math:`\lVert g\rVert < 10^{-4}` never takes
    part), pick the one with the smallest cosine
    :math:`c = \langle g_i,g_j\rangle / (\sqrt{\lVert g_i\rVert^2\lVert g_j\rVert^2}+\epsilon)`,
    scanning pairs in order with a strict ``<`` (the first minimum wins); stop when
    no pair has :math:`c < t_{weak}`. The pair's winner :math:`w` and loser
    :math:`l` come from the arbitrator (below); the winner is appended to the
    dominance history (when ``dominance_window > 0``). The effective angle of
    :math:`c` (clamped to :math:`[-1, 1]`)

    .. math::
        \alpha = \begin{cases}
          \tfrac{\pi}{2}\,(1 - \mathrm{clip}_{[0,1]}(\tfrac{c - t_{main}}{t_{weak} - t_{main} + \epsilon}))
            & c \ge t_{main} \text{ (weak zone)} \\
          \tfrac{\pi}{2} + \tfrac{\pi}{2}\,(\tfrac{c - t_{main}}{t_{crit} - t_{main} + \epsilon})^{p}
            & t_{crit} < c < t_{main} \text{ (main zone)} \\
          \pi & c \le t_{crit} \text{ (critical zone)}
        \end{cases}

    gives :math:`s_w = \sin\alpha`, :math:`s_l = \sin\min(\alpha, \pi/2)`, and with
    :math:`d = \langle g_i, g_j\rangle` both move at once:

    .. math::
        g_w \leftarrow g_w - s_w \frac{d}{\lVert g_l\rVert^2 + \epsilon}\, g_l,\qquad
        g_l \leftarrow g_l - s_l \frac{d}{\lVert g_w\rVert^2 + \epsilon}\, g_w

    The weak zone is a symmetric partial projection (:math:`s_w = s_l`, from 1 at
    :math:`t_{main}` to 0 at :math:`t_{weak}`); the main zone projects the loser fully
    and the winner partly; the critical zone is PCGrad on the loser only
    (:math:`s_w = \sin\pi \approx 10^{-16}`). The conflicts of one step are
    resolved one after the other, the search redone after each.

    **Sum and momentum**: :math:`G = \sum_k g_k` (the projected task gradients),
    :math:`m \leftarrow \beta m + (1-\beta) G` (:math:`m_0 = 0`), output
    :math:`u = m / (1 - \beta^t)`, :math:`t` counting the node's steps. The
    projected :math:`g_k` are kept (``prev<k>``) for the next step's stability.

    **Arbitrator.** If the history holds ``dominance_window`` entries that are all
    task :math:`i` (and not all :math:`j`), :math:`i` *loses* this conflict; likewise
    for :math:`j`. Otherwise each side scores
    :math:`0.8\max(0, \mathrm{stab}_k) + 0.2\,\mathrm{str}_k` (weights
    ``w_stability``, ``w_strength``) with
    :math:`\mathrm{stab}_k = \langle g_k, p_k\rangle / (\lVert g_k\rVert\lVert p_k\rVert + \epsilon)`,
    :math:`p_k` the previous step's projected :math:`g_k`
    (0 at the first step), :math:`r_k = \lVert g_k\rVert / (E_k + \epsilon)` and
    :math:`\mathrm{str}_k = r_k / (r_i + r_j + \epsilon)`; :math:`j` wins only with a
    strictly larger score (ties go to the earlier task). Norms are those of the
    current, possibly already projected, gradients.

    This follows the reference code (``GradientConductor`` with
    ``use_smooth_logic=True``, ``stochastic_accumulation=False``,
    ``accumulation_steps=1``, so its per-task accumulators are exactly the input
    gradients; include the loss weights :math:`\lambda_k` upstream). Defaults are the
    code's. Where the README, the paper and the code disagree, this op does what the
    code does:

    - dominance: the README and a code comment say a dominant task *wins*
      automatically; the code (and the paper's text) make it *lose*;
    - the dominance window counts conflict resolutions (loop iterations, up to
      :math:`2K` per step, including weak-zone ones), not optimizer steps as the
      README says;
    - ``beta`` (``momentum_beta``) defaults to 0.85 as in the code; the README
      example and the paper's runs use 0.9 (and ``max_iters=3``,
      ``dominance_window=0``);
    - the README's "winner takes all" critical zone (loser zeroed) and the paper
      flowchart's "no action" weak zone describe the legacy 4-zone path; the smooth
      path above PCGrads the loser and projects both sides in the weak zone;
    - the README's thresholds (-0.75, -0.5, 0) are not the code defaults (-0.8, -0.5, 0);
    - the norm EMA is updated before the cap, on the uncapped norm, from 1.0;
    - the stability term uses the previous step's *post-projection* gradient;
    - the paper's table gives :math:`s_w = 0` in the critical zone; the code's
      :math:`\sin\pi` is about :math:`-8.7\cdot 10^{-8}` in fp32 (here about
      :math:`10^{-16}`: scalars are computed in double precision).

    Differences from the reference code: per-task gradients, prev buffers and the
    momentum are kept in the compute dtype (fp32, or fp64 for fp64 parameters)
    instead of bf16, and inner products are accumulated in fp64; the Lion/LARS
    output mode (``use_lion``), ``return_raw_grad``, gradient accumulation, DDP
    synchronisation and the model's eval mode during the gradient computation are not
    part of this op. The README/paper follow it with AdamW with :math:`\beta_1 = 0`
    (``gcond(...) | adam(0, 0.95)``). After a critical or exactly orthogonalising
    resolution the residual cosine is a tiny negative number (from :math:`\epsilon`
    and rounding), so the loop usually runs on to ``max_iters`` with near-no-op
    updates that still append to the history, as in the code.

    Reference: E. A. Limarenko, A. Studenikina, S. Illarionova, M. Sharaev, "GCond:
    Gradient Conflict Resolution via Accumulation-Based Stabilization for Large-Scale
    Multi-Task Learning", IEEE Access 2026 (DOI 10.1109/ACCESS.2026.3673372); code
    AlevLab-dev/GCond ``grad_conductor.py``.
    """

    name = "gcond"
    summary = "arbitrated, angle-scaled projection of conflicting task gradients, sum, debiased momentum"
    reference = "Limarenko et al. 2026 (GCond); AlevLab-dev/GCond"
    has_node_state = True
    params = (
        Param("tasks", kind="signals", doc="the task gradients, e.g. grads.a, grads.b"),
        Param("beta", default=0.85, low=0.0, high=1.0, high_closed=False,
              doc="momentum of the combined gradient (momentum_beta; README/paper use 0.9)"),
        Param("t_crit", default=-0.8, low=-1.0, high=1.0, doc="cosine at or below which the conflict is critical"),
        Param("t_main", default=-0.5, low=-1.0, high=1.0, doc="cosine below which the conflict is a main one"),
        Param("t_weak", default=0.0, low=-1.0, high=1.0, doc="cosine below which two tasks conflict"),
        Param("w_stability", default=0.8, low=0.0, doc="weight of the stability score"),
        Param("w_strength", default=0.2, low=0.0, doc="weight of the strength score"),
        Param("remap_power", default=2.0, low=0.0, low_closed=False, doc="power p of the main-zone angle map"),
        Param("norm_ema_beta", default=0.95, low=0.0, high=1.0, high_closed=False,
              doc="decay of the per-task norm EMAs"),
        Param("dominance_window", kind="int", default=3, low=0,
              doc="resolutions one task must win in a row to be forced to lose (0: off)"),
        Param("max_iters", kind="int", default=0, low=0, doc="conflict resolutions per step (0: 2K)"),
        Param("norm_cap", default=math.inf, low=0.0, low_closed=False,
              doc="cap on each task gradient's norm (inf: none)"),
        Param("eps", default=1e-8, low=0.0, doc="added to denominators; squared norms below it skip a task"),
    )
    buffers = (
        Buffer("prev<k>", "task k's gradient after the previous step's projections, one per task"),
        Buffer("m", "momentum of the combined gradient"),
    )

    def reduction(self, args):
        return "global"

    def buffers_for(self, args):
        prev, m = self.buffers
        return tuple(Buffer(f"prev{k}", prev.doc) for k in range(int(args.get("tasks", 2)))) + (m,)

    def init_node_state(self, args):
        k = int(getattr(args, "tasks", 2))
        return {"ema": [1.0] * k, "history": [], "t": 0}

    def node_state_dict(self, node_state):
        return {"ema": [float(e) for e in node_state["ema"]], "history": [int(h) for h in node_state["history"]],
                "t": int(node_state["t"])}

    validates = ("t_crit", "t_main", "t_weak", "w_stability", "w_strength")

    def validate(self, args):
        if not args["t_crit"] <= args["t_main"] <= args["t_weak"]:
            return (f"gcond needs t_crit <= t_main <= t_weak, got {args['t_crit']:g}, {args['t_main']:g}, "
                    f"{args['t_weak']:g}", "the zones are nested: critical below main below weak")
        if not args["w_stability"] + args["w_strength"] > 0:
            return ("gcond needs w_stability + w_strength > 0", "give one of the two weights a positive value")
        return None

    def load_node_state_dict(self, node_state, saved):
        node_state["ema"] = [float(e) for e in saved["ema"]]
        node_state["history"] = [int(h) for h in saved["history"]]
        node_state["t"] = int(saved["t"])

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        tasks = ctx.signals
        if not tasks[0]:
            return []
        a = ctx.args[0]
        k_tasks, n = len(tasks), len(tasks[0])
        t_crit, t_main, t_weak = float(a.t_crit), float(a.t_main), float(a.t_weak)
        eps, window = float(a.eps), int(a.dominance_window)
        ns = ctx.node_state
        ema: list[float] = ns["ema"]
        history: list[int] = ns["history"]

        # one (K, *shape) copy per tensor: row k is task k's gradient (the inputs stay untouched)
        stacked = [torch.stack([tasks[k][i] for k in range(k_tasks)]) for i in range(n)]
        prevs = [[st[f"prev{k}"] for k in range(k_tasks)] for st in ctx.states]

        gram = _gram(stacked, k_tasks)
        for k in range(k_tasks):  # 1. norm EMAs on the raw norms
            ema[k] = max(a.norm_ema_beta * ema[k] + (1.0 - a.norm_ema_beta) * math.sqrt(gram[k][k]), eps)
        if math.isfinite(a.norm_cap):  # 2. norm cap
            capped = False
            for k in range(k_tasks):
                norm = math.sqrt(gram[k][k])
                if norm > a.norm_cap:
                    coef = a.norm_cap / (norm + eps)
                    for x in stacked:
                        x[k].mul_(coef)
                    capped = True
            if capped:
                gram = _gram(stacked, k_tasks)

        prev_sq: list[float] = []  # ||prev_k||^2, computed when a score first needs it
        for it in range(int(a.max_iters) or 2 * k_tasks):  # 3. conflict loop
            if it:
                gram = _gram(stacked, k_tasks)
            lowest, pair = t_weak, None
            for i in range(k_tasks):
                for j in range(i + 1, k_tasks):
                    ni2, nj2 = gram[i][i], gram[j][j]
                    if ni2 < eps or nj2 < eps:
                        continue
                    cos = gram[i][j] / (math.sqrt(ni2 * nj2) + eps)
                    if cos < lowest:
                        lowest, pair = cos, (i, j)
            if pair is None:
                break
            i, j = pair
            dot = gram[i][j]
            winner = _dominance(i, j, history, window)
            if winner is None:
                if not prev_sq:
                    prev_sq = _prev_norms_sq(prevs, k_tasks)
                winner = _score_winner(i, j, gram, _prev_dots(stacked, prevs, (i, j)), prev_sq, ema, a)
            loser = j if winner == i else i
            if window > 0:
                history.append(winner)
                del history[:-window]
            alpha = _effective_alpha(lowest, t_crit, t_main, t_weak, float(a.remap_power), eps)
            s_w, s_l = math.sin(alpha), math.sin(min(alpha, _HALF_PI))
            coef_w = -s_w * (dot / (gram[loser][loser] + eps))
            coef_l = -s_l * (dot / (gram[winner][winner] + eps))
            for x in stacked:
                for_w = x[loser].mul(coef_w)
                for_l = x[winner].mul(coef_l)
                x[winner].add_(for_w)
                x[loser].add_(for_l)

        ns["t"] += 1  # 4. sum, momentum, bias correction
        beta = float(a.beta)
        debias = 1.0 - beta ** ns["t"]
        out = []
        for x, st, prev in zip(stacked, ctx.states, prevs):
            total = x[0].clone()
            for k in range(1, k_tasks):
                total.add_(x[k])
            m = st["m"]
            m.mul_(beta).add_(total, alpha=1.0 - beta)
            out.append(m / debias)
            for k in range(k_tasks):
                prev[k].copy_(x[k])
        return out


def _dominance(i: int, j: int, history: list[int], window: int) -> int | None:
    """The winner forced by the dominance rule: a task that won the last ``window``
    resolutions loses this one (the reference code's behaviour); None when it does not apply."""
    full = window > 0 and len(history) == window
    i_dom = full and history.count(i) == window
    j_dom = full and history.count(j) == window
    if i_dom and not j_dom:
        return j
    if j_dom and not i_dom:
        return i
    return None


def _score_winner(i: int, j: int, gram: list[list[float]], prev_dots: list[float], prev_sq: list[float],
                  ema: list[float], a: Any) -> int:
    """The arbitrator's hybrid score: stability (cosine with the previous projected gradient)
    and strength (norm over its EMA, shared between the two); ties go to ``i``."""
    eps = float(a.eps)
    norm_i, norm_j = math.sqrt(gram[i][i]), math.sqrt(gram[j][j])
    stab_i = prev_dots[0] / (norm_i * math.sqrt(prev_sq[i]) + eps)
    stab_j = prev_dots[1] / (norm_j * math.sqrt(prev_sq[j]) + eps)
    scaled_i, scaled_j = norm_i / (ema[i] + eps), norm_j / (ema[j] + eps)
    total = scaled_i + scaled_j
    score_i = a.w_stability * max(stab_i, 0.0) + a.w_strength * (scaled_i / (total + eps))
    score_j = a.w_stability * max(stab_j, 0.0) + a.w_strength * (scaled_j / (total + eps))
    return j if score_j > score_i else i


def _effective_alpha(cos: float, t_crit: float, t_main: float, t_weak: float, power: float, eps: float) -> float:
    """GCond's remapped conflict angle for a cosine (``_get_effective_alpha``)."""
    c = min(max(cos, -1.0), 1.0)
    if c >= t_main:
        t = min(max((c - t_main) / (t_weak - t_main + eps), 0.0), 1.0)
        return _HALF_PI * (1.0 - t)
    if c > t_crit:
        t = (c - t_main) / (t_crit - t_main + eps)
        return _HALF_PI + _HALF_PI * t ** power
    return math.pi


def _gram(stacked: list[torch.Tensor], k: int) -> list[list[float]]:
    """The K x K inner products of the task gradients over every tensor, accumulated in fp64."""
    total = None
    for x in stacked:
        flat = x.reshape(k, -1)
        g = (flat @ flat.T).to(torch.float64)
        total = g if total is None else total + g
    assert total is not None
    return total.tolist()


def _prev_dots(stacked: list[torch.Tensor], prevs: list[list[torch.Tensor]], ks: tuple[int, ...]) -> list[float]:
    """<g_k, prev_k> over every tensor for the tasks ``ks``."""
    total = None
    for x, prev in zip(stacked, prevs):
        v = torch.stack([torch.sum(x[k] * prev[k]) for k in ks]).to(torch.float64)
        total = v if total is None else total + v
    assert total is not None
    return total.tolist()


def _prev_norms_sq(prevs: list[list[torch.Tensor]], k: int) -> list[float]:
    """||prev_k||^2 over every tensor, per task."""
    total = None
    for prev in prevs:
        v = torch.stack([torch.sum(prev[t] * prev[t]) for t in range(k)]).to(torch.float64)
        total = v if total is None else total + v
    assert total is not None
    return total.tolist()
