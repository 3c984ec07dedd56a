"""The op library. One module per op; importing this package registers them all.

See ``docs/ops.md`` for the table of ops with their math and sources.
"""

from .base import OPS, Buffer, NodeCtx, Op, Param, TensorOp, get_op, register

_load_all = True  # marker imported by base.get_op

from . import (  # noqa: E402,F401  (registration side effects)
    adam, add, clip_median, clip_norm, clip_value, decay, diffgrad, ema, lion, momentum, noise,
    project_orthogonal, rms, scale, sign,
    aegd, agc, centralize, classp, grams, gravity, normalize, trust_ratio,
    bloop, dp, error_feedback, galore, pcgrad, project_out, topk,
    coap, woodbury_fisher,
    gcond, samgs,
    group_scale, wavelet,
    nonfinite,
)

__all__ = ["OPS", "Op", "TensorOp", "Param", "Buffer", "NodeCtx", "register", "get_op"]
