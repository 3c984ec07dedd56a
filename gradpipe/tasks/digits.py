"""The ``digits`` task: a small MLP on scikit-learn's bundled digits dataset.

The data is :func:`sklearn.datasets.load_digits` (1797 greyscale 8x8 images of
the digits 0-9, shipped inside scikit-learn, so nothing is downloaded). Pixels
(0..16) are scaled to [0, 1] and the images are flattened to 64 features.

Everything is seeded: the stratified train/validation split, the model's
initial weights and the minibatch order. Two calls of :func:`train` with the
same seed and the same optimizer give bit-identical losses on CPU with the
same number of torch threads (a different ``torch.get_num_threads()`` can change
the last bits of the matmul sums), and the process-wide torch RNG is neither
read nor changed.

Example::

    import torch
    from gradpipe.tasks.digits import train

    result = train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), steps=200)
    print(result.initial_loss, result.final_loss, result.val_accuracy)
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NUM_FEATURES",
    "NUM_CLASSES",
    "DigitsData",
    "TrainResult",
    "load_digits_split",
    "load_digits_holdout",
    "minibatches",
    "make_mlp",
    "train",
]

#: Input size: 8x8 pixels, flattened.
NUM_FEATURES = 64
#: Output size: the digits 0-9.
NUM_CLASSES = 10

# Offsets that decorrelate the per-purpose generators derived from one seed.
_BATCH_SEED_OFFSET = 0x5EED_BA7C
_TUNE_SEED_OFFSET = 0x7E4E_0D16


@dataclass(frozen=True)
class DigitsData:
    """A train/validation split of the digits dataset.

    Attributes:
        x_train: ``(n_train, 64)`` features in [0, 1].
        y_train: ``(n_train,)`` int64 class labels in 0..9.
        x_val: ``(n_val, 64)`` features in [0, 1].
        y_val: ``(n_val,)`` int64 class labels in 0..9.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class TrainResult:
    """What one :func:`train` run measured.

    Attributes:
        losses: the training (minibatch) cross-entropy at every step, taken
            before that step's update; ``len(losses) == steps``.
        initial_loss: ``losses[0]``, the loss of the untrained model on the
            first minibatch (the same for every optimizer at a given seed).
        final_loss: mean of the last 10 training losses (fewer if fewer steps).
        val_loss: cross-entropy of the trained model on the validation set.
        val_accuracy: fraction of validation images classified correctly.
        seconds: wall time of the training loop (optimizer construction, data
            loading and the final evaluation are not included).
    """

    losses: list[float] = field(repr=False)
    initial_loss: float
    final_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled dataset as float64 features in [0, 1] and int64 labels (cached)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=16)
def _split_indices(seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation indices for ``seed`` (cached, read-only)."""
    from sklearn.model_selection import train_test_split

    _, y = _raw_digits()
    idx = np.arange(len(y))
    train_idx, val_idx = train_test_split(
        idx, test_size=val_fraction, random_state=seed, shuffle=True, stratify=y
    )
    train_idx = np.sort(train_idx)
    val_idx = np.sort(val_idx)
    train_idx.setflags(write=False)
    val_idx.setflags(write=False)
    return train_idx, val_idx


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.2, dtype: torch.dtype = torch.float32
) -> DigitsData:
    """Load the digits dataset and split it into training and validation sets.

    The split is stratified by class and fixed by ``seed`` (same seed, same
    split, on any machine). With the default ``val_fraction`` there are 1437
    training and 360 validation images. Fresh tensors are returned on every
    call, so callers may modify them freely.

    Args:
        seed: seed for the split.
        val_fraction: fraction of the 1797 images held out, in (0, 1).
        dtype: floating dtype of the feature tensors.

    Returns:
        A :class:`DigitsData` with features of shape ``(n, 64)`` in [0, 1]
        and int64 labels of shape ``(n,)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    x, y = _raw_digits()
    train_idx, val_idx = _split_indices(int(seed), float(val_fraction))
    return DigitsData(
        x_train=torch.tensor(x[train_idx], dtype=dtype),
        y_train=torch.tensor(y[train_idx], dtype=torch.int64),
        x_val=torch.tensor(x[val_idx], dtype=dtype),
        y_val=torch.tensor(y[val_idx], dtype=torch.int64),
    )


def _reserved(reserve: tuple[int, ...]) -> np.ndarray:
    """The sorted dataset indices in the validation split of any seed in ``reserve``."""
    parts = [_split_indices(int(s), 0.2)[1] for s in reserve]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _tune_indices(seed: int, reserve: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The positions, within seed's training split, of the part trained on and of the tuning
    part that ``holdout="tune"`` holds out: a stratified fifth, seeded (cached, read-only).

    The images in the validation split of a seed in ``reserve`` are dropped first, from both
    parts: the split is re-drawn per seed, so without this the tuning runs would train and
    choose on the images the reporting seeds validate on. ``reserve=()`` drops nothing (the
    positions are those of every release before the option).
    """
    from sklearn.model_selection import train_test_split

    from .options import TUNE_FRACTION

    _, y = _raw_digits()
    train_idx, _ = _split_indices(seed, 0.2)
    pos = np.arange(len(train_idx))
    if reserve:
        pos = pos[~np.isin(train_idx, _reserved(reserve))]
    counts = np.bincount(y[train_idx[pos]], minlength=NUM_CLASSES)
    if counts.min() < 2 or len(pos) * TUNE_FRACTION < NUM_CLASSES:
        raise ValueError(f"reserve={reserve!r} leaves {len(pos)} training images of seed {seed} "
                         f"(the fewest of a class: {counts.min()}), too few to hold out a stratified fifth")
    fit, tune = train_test_split(pos, test_size=TUNE_FRACTION, random_state=(seed + _TUNE_SEED_OFFSET) % 2**32,
                                 shuffle=True, stratify=y[train_idx[pos]])
    fit, tune = np.sort(fit), np.sort(tune)
    fit.setflags(write=False)
    tune.setflags(write=False)
    return fit, tune


def load_digits_holdout(seed: int = 0, holdout: str = "val", reserve: tuple[int, ...] = ()) -> DigitsData:
    """The data a task trains and evaluates on for its ``holdout`` option.

    ``"val"``: :func:`load_digits_split` (1437 training, 360 validation images).
    ``"tune"``: the training split of ``seed`` cut, stratified by class and
    seeded by ``seed``, into 1149 images to train on (``x_train``) and 288
    held-out tuning images (``x_val``); ``seed``'s validation images are not read.
    The split is re-drawn per seed, so ``seed``'s training split holds other
    seeds' validation images: ``reserve`` (seeds) drops every image in the
    validation split of a seed in it from both parts before the fifth is cut
    (with ``reserve=(0, 1, 2)`` and seed 10000, 732 images are left: 585 to
    train on and 147 to tune on). ``reserve`` is for ``"tune"`` only.

    Raises:
        ValueError: an unknown ``holdout``, ``reserve`` with ``"val"``, or a
            ``reserve`` that leaves too few images to cut a stratified fifth.
    """
    reserve = tuple(sorted({int(s) for s in reserve}))
    if holdout == "val":
        if reserve:
            raise ValueError(f"reserve is for holdout='tune' (validation runs read their own split), got {reserve!r}")
        return load_digits_split(seed)
    if holdout != "tune":
        raise ValueError(f"holdout must be 'val' or 'tune', got {holdout!r}")
    x, y = _raw_digits()
    train_idx, _ = _split_indices(int(seed), 0.2)
    fit, tune = _tune_indices(int(seed), reserve)
    return DigitsData(
        x_train=torch.tensor(x[train_idx[fit]], dtype=torch.float32),
        y_train=torch.tensor(y[train_idx[fit]], dtype=torch.int64),
        x_val=torch.tensor(x[train_idx[tune]], dtype=torch.float32),
        y_val=torch.tensor(y[train_idx[tune]], dtype=torch.int64),
    )


def make_mlp(seed: int = 0, hidden: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the task's model: ``Linear(64, hidden) -> Tanh -> Linear(hidden, 10)``.

    Weights use PyTorch's default ``nn.Linear`` initialisation drawn under
    ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so the
    global RNG state is left as it was. Parameters are created in float32 and
    then cast, so a float64 model starts from the same weights as a float32 one
    (up to rounding).

    Parameter names (as seen by ``named_parameters()``) are ``0.weight``,
    ``0.bias``, ``2.weight``, ``2.bias``.

    Args:
        seed: seed for the initial weights.
        hidden: width of the hidden layer.
        dtype: floating dtype of the parameters.

    Returns:
        An ``nn.Sequential`` in training mode.
    """
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden),
            nn.Tanh(),
            nn.Linear(hidden, NUM_CLASSES),
        )
    return model.to(dtype)


def minibatches(n_train: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The index tensors of ``steps`` minibatches: each pass over the ``n_train`` examples is a
    fresh permutation from a generator seeded by ``seed``, cut into ``batch_size`` chunks (the
    incomplete last chunk is dropped, so every batch has the same size)."""
    if not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be in 1..{n_train}, got {batch_size!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed + _BATCH_SEED_OFFSET) % (2**63))
    per_epoch = n_train // batch_size
    return _batches(gen, n_train, batch_size, per_epoch, steps)


def _batches(gen: torch.Generator, n: int, size: int, per_epoch: int, steps: int) -> Iterator[torch.Tensor]:
    perm = torch.empty(0, dtype=torch.int64)
    for step in range(steps):
        b = step % per_epoch
        if b == 0:
            perm = torch.randperm(n, generator=gen)
        yield perm[b * size:(b + 1) * size]


def train(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    steps: int = 200,
    batch_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
    """Train :func:`make_mlp` on the digits task with the given optimizer.

    ``seed`` fixes the data split, the initial weights and the minibatch order,
    so every optimizer sees the same model and the same batches. Minibatches
    come from a seeded :class:`torch.Generator`: each pass over the training
    set is a fresh permutation cut into ``batch_size`` chunks (the incomplete
    last chunk is dropped, so every batch has the same size). Each step is::

        opt.zero_grad(); loss = F.cross_entropy(model(xb), yb); loss.backward(); opt.step()

    (a gradpipe pipeline that reads ``samples`` is stepped with
    ``opt.step(samples=per_sample_grads(model, F.cross_entropy, xb, yb))`` instead,
    one that reads ``loss`` with ``opt.step(lambda: loss)``, and one whose
    ``opt.needs_closure`` (``grad_at``, SAM) with a closure that recomputes the loss
    and its gradient on the same batch).

    Args:
        make_optimizer: called once with the fresh model; returns the optimizer
            to train it with (e.g. ``lambda m: torch.optim.SGD(m.parameters(), lr=0.1)``).
        steps: number of optimizer steps (at least 1).
        batch_size: minibatch size, 1 to the training-set size (1437 by default).
        seed: seed for the split, initial weights and batch order.
        dtype: floating dtype of the data and model.

    Returns:
        A :class:`TrainResult`. Losses may be ``nan``/``inf`` if the optimizer
        diverges; training is not stopped early.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    data = load_digits_split(seed, dtype=dtype)
    batches = minibatches(data.x_train.shape[0], batch_size, steps, seed)

    model = make_mlp(seed, dtype=dtype)
    model.train()
    opt = make_optimizer(model)
    x_train, y_train = data.x_train, data.y_train

    step_losses: list[torch.Tensor] = []
    # a gradpipe pipeline that reads per-example gradients (DP-SGD) gets them instead of .grad
    reads = getattr(getattr(opt, "program", None), "reads", ())
    per_example = "samples" in reads
    reads_loss = "loss" in reads
    needs_closure = bool(getattr(opt, "needs_closure", False))
    if per_example:
        from ..runtime.per_sample import per_sample_grads
    start = time.perf_counter()
    for idx in batches:
        xb = x_train.index_select(0, idx)
        yb = y_train.index_select(0, idx)
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        if reads_loss:  # the pipeline needs the loss value (e.g. aegd): step with a closure
            loss.backward()
            opt.step(lambda: loss)
        elif per_example:
            opt.step(samples=per_sample_grads(model, F.cross_entropy, xb, yb))
        elif needs_closure:  # grad_at (SAM): the step calls the closure twice, the second time at the point
            opt.step(_closure(model, opt, xb, yb))
        else:
            loss.backward()
            opt.step()
        step_losses.append(loss.detach())
    seconds = time.perf_counter() - start

    losses = [float(v) for v in torch.stack(step_losses).tolist()]
    if getattr(opt, "has_eval", False):  # Schedule-Free: evaluate at the point its eval() gives
        opt.eval()
    model.eval()
    with torch.no_grad():
        logits = model(data.x_val)
        val_loss = float(F.cross_entropy(logits, data.y_val))
        val_accuracy = float((logits.argmax(dim=1) == data.y_val).to(torch.float64).mean())
    tail = losses[-10:]
    return TrainResult(
        losses=losses,
        initial_loss=losses[0],
        final_loss=math.fsum(tail) / len(tail),
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        seconds=seconds,
    )


def _closure(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor
             ) -> Callable[[], torch.Tensor]:
    """The closure of a step: zero the gradients, the loss on the batch, its backward pass."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss
    return closure
