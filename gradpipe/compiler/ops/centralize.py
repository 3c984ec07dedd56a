"""``centralize``: gradient centralization (Yong et al., 2020)."""

from __future__ import annotations

from .base import TensorOp, register


@register
class Centralize(TensorOp):
    r"""Subtract the mean over every dimension but the first.

    .. math::
        u_{i,\ldots} = x_{i,\ldots} - \operatorname{mean}_{j,\ldots}\, x_{i,j,\ldots}
        \quad (\text{tensors with two or more dimensions}),\qquad u = x \quad (\text{otherwise})

    Dimension 0 is the output unit in torch's layouts (``Linear`` weights are
    ``out x in``, ``Conv2d`` weights ``out x in x kh x kw``), so every output
    unit's weight gradient gets zero mean. Biases and other vectors (and
    scalars) pass through unchanged. The authors' code centralizes both
    convolution and fully connected weights by default (what this op does);
    its ``gc_conv_only`` variant, convolution weights only, is a route:
    ``route ndim >= 4: grad | centralize | ...``.

    Reference: H. Yong, J. Huang, X. Hua, L. Zhang, "Gradient Centralization:
    A New Optimization Technique for Deep Neural Networks", ECCV 2020
    (arXiv:2004.01461); Yonghongwei/Gradient-Centralization.
    """

    name = "centralize"
    summary = "subtract the mean over all dims but dim 0 (tensors with ndim > 1)"
    reference = "Yong et al. 2020, arXiv:2004.01461"

    def reduction(self, args):
        return "tensor"

    def update(self, x, state, a, lane):
        if x.dim() <= 1:
            return x
        return x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
