"""``group_scale``: SGG, per-cluster learning-rate scales on an inner pipeline's update."""

from __future__ import annotations

import torch

from ...dsl.diagnostics import GradError
from .base import REQUIRED, Buffer, InnerNode, NodeCtx, Op, Param, find_inner, register

__all__ = ["kmeans_1d", "GroupScale"]

#: Lloyd iterations of the 1-D k-means (it stops earlier once the assignment is stable)
KMEANS_ITERS = 10
#: floor of a cluster's mean in the scale mu_bar / max(mu_c, eps)
_EPS = 1e-8


def _sorted_kmeans(xs: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, list[int]]:
    """Lloyd's algorithm on sorted values ``xs``: the centres (ascending) and the cluster
    boundaries in ``xs`` (cluster j is ``xs[edges[j]:edges[j+1]]``) for those centres."""
    n = xs.numel()
    init = torch.tensor([(2 * j + 1) * n // (2 * k) for j in range(k)], device=xs.device)
    centres = xs[init]
    bounds: list[int] | None = None
    for _ in range(iters):
        # nearest centre: x goes to j when mid_{j-1} < x <= mid_j, so cluster j is a run of xs
        b = torch.searchsorted(xs, (centres[:-1] + centres[1:]) / 2, right=True).tolist()
        if b == bounds:
            break  # the assignment repeats, so do the centres: a fixed point
        bounds = b
        edges = [0, *b, n]
        new = centres.clone()
        for j in range(k):
            if edges[j + 1] > edges[j]:
                new[j] = xs[edges[j]:edges[j + 1]].mean()  # an empty cluster keeps its centre
        centres = torch.sort(new).values
    final = torch.searchsorted(xs, (centres[:-1] + centres[1:]) / 2, right=True).tolist()
    return centres, [0, *final, n]


def kmeans_1d(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    r"""1-D k-means of the entries of ``x``: ``(centres, labels)``.

    Initial centres are quantiles of the sorted values :math:`x_{(0)} \le \dots \le x_{(n-1)}`,
    :math:`c_j = x_{(\lfloor (2j+1) n / 2k \rfloor)}`; then at most ``iters`` Lloyd
    iterations (assign each value to its nearest centre, move each centre to the mean of
    its values; an empty cluster keeps its centre), stopping early at a fixed point. The
    centres are sorted ascending, so cluster 0 holds the smallest values, and ``labels``
    (``x``'s shape, int64) assigns every entry to its nearest final centre (a value exactly
    half-way goes to the lower one). Deterministic: no random initialisation.
    """
    flat = x.reshape(-1)
    xs = torch.sort(flat).values
    centres, _ = _sorted_kmeans(xs, k, iters)
    labels = torch.bucketize(flat, (centres[:-1] + centres[1:]) / 2, right=False)
    return centres, labels.reshape(x.shape)


def _moment_node(ctx: NodeCtx) -> InnerNode:
    node = find_inner(ctx, buffer="m")
    if node is None:  # pragma: no cover - check_block refuses such a pipeline when it compiles
        raise RuntimeError("group_scale: no inner op keeps 'm'")
    return node


def _clusters(shape: tuple[int, ...], a) -> tuple[int, ...]:
    return (int(a.get("k", 3)),)


def _check_first_moment(inner: list[Op]) -> tuple[str, str] | None:
    if any(o.declares("m") for o in inner):
        return None
    names = ", ".join(o.name for o in inner) or "no op"
    return (f"'group_scale' clusters its inner pipeline's first moment 'm', but the inner pipeline ({names}) "
            "keeps none", "put an op with a first moment inside: group_scale(k=3) { adam }")


@register
class GroupScale(Op):
    r"""SGG: scale an inner pipeline's update per cluster of its first-moment magnitudes.

    The inner pipeline (an Adam-like op) gives :math:`u^{in}_t`. Every ``interval``
    steps (:math:`t \bmod R = 0`, first at :math:`t = R`), per tensor, the magnitudes
    :math:`x = |m_t|` of the inner op's first moment (after this step's update) are
    clustered into ``k`` groups by a deterministic 1-D k-means (``kmeans_1d``: centres
    started at the quantiles :math:`(2j+1)/2k`, at most 10 Lloyd iterations, centres sorted
    ascending so that cluster 0 holds the smallest values), and with
    :math:`\bar\mu = \mathrm{mean}(x)` and :math:`\bar x_c` the mean of cluster
    :math:`c` (:math:`\bar\mu` if it is empty):

    .. math::
        \mu_c \leftarrow d_\mu \mu_c + (1-d_\mu)\, \bar x_c,\qquad
        s_c \leftarrow \mathrm{clip}\Big(d_s s_c + (1-d_s)\frac{\bar\mu}{\max(\mu_c, 10^{-8})},
        \ \mathrm{low}, \mathrm{high}\Big)

    Every step: :math:`u_t = u^{in}_t \odot s_{\ell}` with :math:`\ell` each entry's
    label from the last clustering. State per tensor: ``labels`` (int16, the tensor's
    size; all 0 until the first clustering), ``means`` :math:`\mu` and ``scales``
    :math:`s` (k numbers each, starting at 1). Clusters with small :math:`|m|` get
    larger steps (up to ``high``). Every tensor is clustered, vectors included, as in
    the code. Without an inner op that keeps ``m`` the pipeline does not compile.

    This follows the code, ``AdamWSGG`` "version 2" (OpenToMe
    ``opentome/optimizer/sgg/adamw_sgg.py``), not the paper's text:

    * :math:`\mu` starts at **1**, not at data. With decays near 1 and :math:`|m|`
      of order 1e-4, the first clustering gives :math:`\mu_c \approx d_\mu`, so
      :math:`\bar\mu/\mu_c \approx \bar\mu \ll 1` and each clustering shrinks every
      :math:`s_c` by about :math:`d_s`: in practice a slow global learning-rate decay
      (:math:`d_s^{t/R}`, down to ``low``) rather than a per-cluster calibration, until
      :math:`\mu` has forgotten its start (:math:`\sim 1/(1-d_\mu)` clusterings).
    * The code clusters with scikit-learn's ``MiniBatchKMeans.partial_fit`` (one
      mini-batch step from a k-means++ seed, ``random_state=42``), whose cluster
      indices are arbitrary and whose clusters are not converged; this op's k-means
      is a deterministic torch one with sorted centres, so its labels are not the
      code's (the scale maths given the labels is the same).
    * The paper describes scaling by a median of deviation to the average (MDA); the
      code uses :math:`\bar\mu/\mu_c` as above, which is what is implemented.
    * The code's "AdamW" adds L2 weight decay to the gradient (coupled,
      ``g + wd p``); ``group_scale { adam } | decay(wd)`` is decoupled. Write
      ``add(wd * param) | group_scale { adam }`` for the code's form.
    * The statistic is :math:`|m|` (the first moment), not the second moment that
      the README mentions. The code's EMA of the cluster centres is never used and
      is left out.

    Reference: S. Li, J. Tian, Z. Wang, X. Jin, Z. Liu, W. Zhang, D. Xu, "Taming LLMs by
    Scaling Learning Rates with Gradient Grouping", arXiv:2506.01049, 2025 (ScalingOpt/SGG;
    code in Westlake-AI/OpenToMe, defaults k=3, interval 500, decays 0.999, clip [0.1, 10]).
    """

    name = "group_scale"
    summary = "SGG: every interval steps cluster |m| of the inner op per tensor; scale its update per cluster"
    reference = "Li et al. 2025 (SGG; Westlake-AI/OpenToMe AdamWSGG v2)"
    params = (
        Param("k", kind="int", default=3, low=1, high=32767, doc="clusters per tensor"),
        Param("interval", kind="int", default=500, low=1, doc="steps between clusterings (R)"),
        Param("decay_means", default=0.999, low=0.0, high=1.0, doc="EMA decay of the cluster means mu"),
        Param("decay_scale", default=0.999, low=0.0, high=1.0, doc="EMA decay of the cluster scales s"),
        Param("low", default=0.1, low=0.0, doc="smallest scale"),
        Param("high", default=10.0, low=0.0, doc="largest scale"),
        Param("inner", kind="block", default=REQUIRED, doc="the pipeline whose update is scaled (keeps m)"),
    )
    buffers = (Buffer("labels", "cluster of each entry (int16, the parameter's size)", dtype=torch.int16),
               Buffer("means", "EMA of each cluster's mean |m| (k numbers)", shape=_clusters, init=1.0),
               Buffer("scales", "scale of each cluster (k numbers)", shape=_clusters, init=1.0))

    def check_block(self, inner):
        return _check_first_moment(inner)

    def apply(self, ctx: NodeCtx) -> list[torch.Tensor]:
        _moment_node(ctx)  # fail on the first step, not at the first clustering
        news = ctx.inner(list(ctx.x))
        node = _moment_node(ctx)  # after the run: its state exists and holds this step
        out = []
        for i, (n, st, a, t) in enumerate(zip(news, ctx.states, ctx.args, ctx.steps)):
            k = int(a.k)
            if t % int(a.interval) == 0 and n.numel() > 0:
                m = node.buffer(i, "m")
                if m is None or m.shape != n.shape:
                    raise GradError(f"'group_scale' needs the first moment of '{node.op.name}' at the parameter's "
                                    f"shape {tuple(n.shape)}, got {None if m is None else tuple(m.shape)}", None,
                                    "put the op that keeps m directly inside group_scale { ... }")
                self._recluster(m.abs(), st, a, k)
            out.append(n * st["scales"][st["labels"].long()])
        return out

    validates = ("low", "high")

    def validate(self, args):
        if args["low"] > args["high"]:
            return (f"group_scale needs low <= high, got low={args['low']:g} and high={args['high']:g}",
                    "the scales are clipped to [low, high]")
        return None

    @staticmethod
    def _recluster(x: torch.Tensor, st: dict[str, torch.Tensor], a, k: int) -> None:
        """k-means on ``x`` = |m|, then the EMA of the cluster means and the clipped scales."""
        flat = x.reshape(-1)
        xs = torch.sort(flat).values
        centres, edges = _sorted_kmeans(xs, k, KMEANS_ITERS)
        labels = torch.bucketize(flat, (centres[:-1] + centres[1:]) / 2, right=False)
        st["labels"].copy_(labels.reshape(x.shape))
        centre = flat.mean()
        cur = torch.stack([xs[edges[j]:edges[j + 1]].mean() if edges[j + 1] > edges[j] else centre
                           for j in range(k)])
        means, scales = st["means"], st["scales"]
        means.mul_(a.decay_means).add_(cur.to(means.dtype), alpha=1 - a.decay_means)
        raw = centre / means.clamp(min=_EPS)
        scales.mul_(a.decay_scale).add_(raw, alpha=1 - a.decay_scale).clamp_(a.low, a.high)
