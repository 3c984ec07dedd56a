"""Small, fast, deterministic training tasks for trying out optimizers.

Each task trains a tiny model on data shipped with an installed package (no
downloads), so a run takes well under a second on a laptop CPU and gives the
same numbers every time for a given seed.

Tasks:
    :mod:`gradpipe.tasks.digits`: a 64-64-10 MLP on scikit-learn's 8x8 digits.
    :mod:`gradpipe.tasks.digits_multitask`: the same digits with a shared trunk
        and two heads (digit and parity), for multi-loss pipelines.
"""

from __future__ import annotations

from .digits import DigitsData, TrainResult, load_digits_split, make_mlp, train
from .digits_multitask import MultiTaskModel, MultiTaskResult, make_multitask_model, train_multitask

__all__ = ["DigitsData", "TrainResult", "load_digits_split", "make_mlp", "train",
           "MultiTaskModel", "MultiTaskResult", "make_multitask_model", "train_multitask"]
