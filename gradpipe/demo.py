"""The demo's learning rates: one per shipped pipeline, tuned on the ``digits`` task.

``gradpipe demo`` (:func:`gradpipe.flows.commands.cmd_demo`) compares the
pipelines with these; ``tests/test_seed_pipelines.py`` trains every pipeline
with them. A pipeline given as a path is looked up by its file stem
(``pipelines/scalpel.grad`` -> ``scalpel``).
"""

from __future__ import annotations

import pathlib

__all__ = ["LR", "DEFAULT_LR", "lr_for"]

#: Learning rate per pipeline. A pipeline given as a path is looked up by its
#: file stem (``pipelines/scalpel.grad`` -> ``scalpel``).
LR: dict[str, float] = {
    "sgd": 0.1,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adam": 1e-2,
    "adamw": 1e-2,
    "rmsprop": 1e-2,
    "lion": 1e-3,
    "diffgrad": 1e-2,
    "scalpel": 1e-3,
    "grams": 1e-2,
    "bloop_adam": 1e-2,
    "pcgrad_adam": 1e-2,
    "gcond": 1e-2,
    "samgs_adam": 1e-2,
    "galore_adamw": 1e-2,
    "coap_adamw": 1e-2,
    "natural_galore_adamw": 0.05,
    "gwt_adam": 1e-2,
    "sgg_adamw": 1e-2,
    "noisy_sgd": 0.1,
    "dp_sgd": 1.0,
    "econtrol_sgd": 0.1,
    "aegd": 0.1,
    "gravity": 0.1,
    "rprop": 1e-2,
    "asgd": 0.1,
    "signum": 1e-2,
    "adabelief": 1e-2,
    "adan": 1e-2,
    "lamb": 1e-2,
    "lars": 3.0,
    "ademamix": 1e-2,
    "mars_adamw": 1e-2,
    "grokfast_ema": 1e-2,
    "accumulate_adamw": 1e-2,
    "prodigy": 1.0,
    "adamax": 1e-2,
    "nadam": 1e-2,
    "radam": 1e-2,
    "adagrad": 0.05,
    "adadelta": 1.0,
    "muon": 0.02,
    "muon_adamw": 1e-2,
    "shampoo": 0.1,
    "schedulefree_adamw": 1e-2,
    "schedulefree_sgd": 1.0,
    "lookahead_adam": 1e-2,
    "sam_sgd": 0.05,
    "asam_sgd": 0.05,
    "sam_adamw": 1e-2,
}
#: Learning rate for a pipeline not in :data:`LR`.
DEFAULT_LR = 1e-2


def lr_for(pipeline: str) -> float:
    """The demo's learning rate for ``pipeline`` (a builtin name or a ``.grad`` path)."""
    if pipeline in LR:
        return LR[pipeline]
    stem = pathlib.PurePath(pipeline).stem if pipeline.endswith(".grad") else pipeline
    return LR.get(stem, DEFAULT_LR)
