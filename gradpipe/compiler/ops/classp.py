"""``classp``: CLASSP's thresholded AdaGrad-like step (Ludwig, 2024)."""

from __future__ import annotations

import torch

from .base import Buffer, Param, TensorOp, register


@register
class CLASSP(TensorOp):
    r"""CLASSP: update a weight only where the input is large, with a step that decays with use.

    .. math::
        \mu_t = [\,x_t^2 > \tau\,]\ \text{(elementwise mode)},\qquad
        \mu_t = [\,\operatorname{any}(x_t \ne 0) > \tau\,]\ \text{(tensor mode)}

        S_t = S_{t-1} + \mu_t \odot |x_t|^p,\qquad
        u_t = \mu_t \odot \frac{x_t}{(S_t + \epsilon)^{1/p}}

    with :math:`\tau` the ``threshold``, :math:`p` the ``power`` and :math:`S_0 = 0`.
    The accumulator is a generalised AdaGrad sum ("adjustment suppression":
    weights that were updated often get smaller steps); the mask is the
    threshold on the gradient ("sparsity promotion": a weight moves only when
    its gradient matters). :math:`S` grows only where the mask lets the update
    through, so a weight whose gradients stay below the threshold keeps its
    full step for later tasks; the reference code also accumulates only when
    it updates. The paper's learning rate (0.2 in the code) is the runtime's
    ``lr``.

    ``threshold_mode=elementwise`` (the default) is the method as the paper
    describes it. ``threshold_mode=tensor`` reproduces the reference code's
    test ``(grad**2).any() > threshold``: ``.any()`` is a boolean, so the
    test is :math:`1 > \tau` when any entry of the tensor is nonzero and
    :math:`0 > \tau` otherwise. With a threshold below 1 (the default 0.5)
    every tensor with a nonzero gradient is updated in full, i.e. no
    thresholding at all; with a threshold of 1 or more nothing is ever
    updated. The reference code also drops the power when accumulating
    (``state['grad_sum'].add_(grad.abs()) ** power`` discards the power), so
    it computes :math:`S \mathrel{+}= |x|` while still taking the
    :math:`p`-th root; both modes here accumulate :math:`|x|^p`, which
    agrees with the code for the default ``power=1``.

    Reference: O. Ludwig, "CLASSP: a Biologically-Inspired Approach to
    Continual Learning through Adjustment Suppression and Sparsity
    Promotion", arXiv (2024); oswaldoludwig/CLASSP ``CLASSP.py``.
    """

    name = "classp"
    flat = True
    summary = "x / (S + eps)^(1/p) where x^2 > threshold, else 0; S += |x|^p where updated"
    reference = "Ludwig 2024 (CLASSP); oswaldoludwig/CLASSP CLASSP.py"
    is_rule = True
    params = (
        Param("threshold", default=0.5, low=0.0, doc="an entry moves only where x^2 > threshold"),
        Param("eps", default=1e-5, low=0.0, doc="added to the accumulator"),
        Param("power", default=1.0, low=0.0, low_closed=False,
              doc="p: S accumulates |x|^p, the step divides by its p-th root"),
        Param("threshold_mode", kind="choice", default="elementwise", choices=("elementwise", "tensor"),
              doc="elementwise test (the paper), or the reference code's per-tensor test"),
    )
    buffers = (Buffer("s", "accumulated |x|^power"),)

    def reduction(self, args):
        return "tensor" if args.get("threshold_mode", "elementwise") == "tensor" else None


    def update(self, x, state, a, lane):
        s = state["s"]
        if a.threshold_mode == "tensor":
            passed = float(bool((x ** 2).any())) > a.threshold
            if not passed:
                return torch.zeros_like(x)
            s.add_(x.abs().pow_(a.power))
            return x / (s + a.eps).pow_(1.0 / a.power)
        mask = (x * x) > a.threshold
        s.add_(torch.where(mask, x.abs().pow_(a.power), torch.zeros_like(x)))
        return torch.where(mask, x / (s + a.eps).pow_(1.0 / a.power), torch.zeros_like(x))
