"""The ``digits_multitask`` task: one trunk, two heads, two losses on the digits.

This is the task for gradpipe's multi-loss pipelines (those reading
``grads.main`` and ``grads.aux``). The data is the ``digits`` task's
(:func:`gradpipe.tasks.digits.load_digits_split`: scikit-learn's bundled 8x8
digits, nothing downloaded). The model is a shared trunk ``Linear(64, hidden)
-> Tanh`` followed by two linear heads on the same hidden features:

* ``main``: 10-way digit classification, ``L_main = CE(main_head(h), y)``;
* ``aux``: the digit's parity (even/odd), ``L_aux = CE(aux_head(h), y mod 2)``.

**Why parity.** Parity is a function of the digit, so a perfect digit
classifier implies a perfect parity classifier, but the aux head is *linear* in
the shared features ``h``: to make parity linearly separable the aux loss pulls
together images that look nothing alike (1 with 3, 0 with 4, 2 with 6) and
apart images that look alike (3 from 8, 5 from 6, 4 from 9), while the main
loss needs all ten classes separated. The two losses therefore agree on the
broad direction but compete for the trunk's 64 features. Measured over the
default Adam run (lr 1e-2, seeds 0-2), the cosine between ``grads.main`` and
``grads.aux`` on the trunk parameters averages only 0.27 to 0.30 and is
negative on 5% to 14% of the steps, and training with ``aux_weight=1`` instead
of 0 lowers the main head's validation accuracy slightly (0.975 to 0.972, mean
of seeds 0-4). That is the partial conflict that methods which project the
auxiliary gradient against the main one are meant for, e.g. Bloop,
``d = g_main + lam * pi(g_aux; ema(g_main))`` (P. Ablin, J. Liu, S. Kaur et
al., "Careful with that Scalpel: Improving Gradient Surgery with an EMA",
ICML 2024); in gradpipe::

    grads.main + lam * (grads.aux | project_orthogonal(ema(grads.main)))

("digit >= 5" behaves much the same; parity was chosen because its groups are
the more visually mixed.)

Each step minimises ``L = L_main + aux_weight * L_aux``. With a
``gradpipe.Optimizer`` whose pipeline reads ``grads.<name>``, the two terms are
passed as named losses, ``opt.step(losses={"main": L_main, "aux": aux_weight *
L_aux})`` (gradpipe differentiates each one; ``grad`` is their sum); with any
other optimizer (``torch.optim``, or a gradpipe pipeline that reads only
``grad``) the step is ``L.backward(); opt.step()``. Both give the optimizer the
same total gradient.

As in the ``digits`` task everything is seeded (split, initial weights,
minibatch order), two runs with the same seed and optimizer give bit-identical
losses on CPU with the same number of torch threads, and the process-wide torch
RNG is neither read nor changed.

Example::

    import gradpipe
    from gradpipe.tasks.digits_multitask import train_multitask

    r = train_multitask(lambda m: gradpipe.Optimizer(
        m.named_parameters(), "grads.main + grads.aux | adam", lr=1e-2))
    print(r.initial_loss, r.final_loss, r.val_accuracy, r.val_aux_accuracy)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.optimizer import Optimizer
from .digits import NUM_CLASSES, NUM_FEATURES, load_digits_split, minibatches

__all__ = [
    "NUM_AUX_CLASSES",
    "MultiTaskModel",
    "MultiTaskResult",
    "aux_labels",
    "make_multitask_model",
    "train_multitask",
]

#: Output size of the auxiliary head: even (0) or odd (1).
NUM_AUX_CLASSES = 2


def aux_labels(y: torch.Tensor) -> torch.Tensor:
    """The auxiliary targets: the digit's parity, ``y mod 2`` (0 even, 1 odd), as int64."""
    return torch.remainder(y, 2).to(torch.int64)


class MultiTaskModel(nn.Module):
    """A shared trunk with a digit head and a parity head.

    ``h = tanh(W0 x + b0)``; ``forward(x)`` returns ``(main_head(h), aux_head(h))``
    with shapes ``(n, 10)`` and ``(n, 2)``.

    Attributes:
        trunk: ``nn.Sequential(Linear(64, hidden), Tanh())`` (parameters ``trunk.0.*``).
        main_head: ``Linear(hidden, 10)``, the digit logits.
        aux_head: ``Linear(hidden, 2)``, the parity logits.
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.Tanh())
        self.main_head = nn.Linear(hidden, NUM_CLASSES)
        self.aux_head = nn.Linear(hidden, NUM_AUX_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.main_head(h), self.aux_head(h)


@dataclass
class MultiTaskResult:
    """What one :func:`train_multitask` run measured.

    Attributes:
        losses: the main (digit) minibatch cross-entropy at every step, taken
            before that step's update; ``len(losses) == steps``.
        aux_losses: the auxiliary (parity) minibatch cross-entropy at every
            step, *unweighted* (``aux_weight`` is not applied).
        initial_loss: ``losses[0]``, the untrained model's main loss on the
            first minibatch (the same for every optimizer at a given seed).
        final_loss: mean of the last 10 main losses (fewer if fewer steps).
        initial_aux_loss: ``aux_losses[0]``.
        final_aux_loss: mean of the last 10 auxiliary losses.
        val_loss: main cross-entropy of the trained model on the validation set.
        val_accuracy: fraction of validation digits the main head gets right.
        val_aux_loss: auxiliary cross-entropy on the validation set.
        val_aux_accuracy: fraction of validation parities the aux head gets right.
        seconds: wall time of the training loop (optimizer construction, data
            loading and the final evaluation are not included).
    """

    losses: list[float] = field(repr=False)
    aux_losses: list[float] = field(repr=False)
    initial_loss: float
    final_loss: float
    initial_aux_loss: float
    final_aux_loss: float
    val_loss: float
    val_accuracy: float
    val_aux_loss: float
    val_aux_accuracy: float
    seconds: float


def make_multitask_model(seed: int = 0, hidden: int = 64,
                         dtype: torch.dtype = torch.float32) -> MultiTaskModel:
    """Build the task's model: a ``Linear(64, hidden) -> Tanh`` trunk, a 10-way and a 2-way head.

    Weights use PyTorch's default ``nn.Linear`` initialisation drawn under
    ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so the
    global RNG state is left as it was; they are created in float32 and then
    cast, as in :func:`gradpipe.tasks.digits.make_mlp`. Parameter names are
    ``trunk.0.weight``, ``trunk.0.bias``, ``main_head.weight``,
    ``main_head.bias``, ``aux_head.weight``, ``aux_head.bias``.

    Args:
        seed: seed for the initial weights.
        hidden: width of the shared hidden layer.
        dtype: floating dtype of the parameters.

    Returns:
        A :class:`MultiTaskModel` in training mode.
    """
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiTaskModel(hidden)
    return model.to(dtype)


def _uses_named_losses(opt: Any) -> bool:
    """Whether ``opt`` is a gradpipe Optimizer whose pipeline reads ``grads.<name>``."""
    return isinstance(opt, Optimizer) and bool(opt.program.losses)


def train_multitask(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    steps: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    aux_weight: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> MultiTaskResult:
    """Train :func:`make_multitask_model` on digits (main) and parity (aux).

    ``seed`` fixes the data split, the initial weights and the minibatch order,
    as in :func:`gradpipe.tasks.digits.train` (a fresh seeded permutation per
    pass, cut into ``batch_size`` chunks, the incomplete last one dropped).
    Each step computes ``L_main = CE(main_logits, y)`` and ``L_aux =
    CE(aux_logits, y mod 2)`` on the minibatch and then either::

        opt.step(losses={"main": L_main, "aux": aux_weight * L_aux})

    when ``opt`` is a :class:`gradpipe.Optimizer` whose pipeline reads named
    losses (``grads.main``, ``grads.aux``; a pipeline that reads only one of
    them still gets both), or otherwise::

        (L_main + aux_weight * L_aux).backward(); opt.step()

    with ``opt.zero_grad()`` before each step in both cases.

    Args:
        make_optimizer: called once with the fresh model; returns the optimizer
            (``torch.optim`` or :class:`gradpipe.Optimizer`; use
            ``model.named_parameters()`` to route pipelines by name).
        steps: number of optimizer steps (at least 1).
        batch_size: minibatch size, 1 to the training-set size (1437).
        seed: seed for the split, initial weights and batch order.
        aux_weight: weight of the auxiliary loss, finite and at least 0.
        dtype: floating dtype of the data and model.

    Returns:
        A :class:`MultiTaskResult`. Losses may be ``nan``/``inf`` if the
        optimizer diverges; training is not stopped early.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    aux_weight = float(aux_weight)
    if not (math.isfinite(aux_weight) and aux_weight >= 0.0):
        raise ValueError(f"aux_weight must be finite and at least 0, got {aux_weight!r}")
    data = load_digits_split(seed, dtype=dtype)
    batches = minibatches(data.x_train.shape[0], batch_size, steps, seed)

    model = make_multitask_model(seed, dtype=dtype)
    model.train()
    opt = make_optimizer(model)
    named = _uses_named_losses(opt)

    x_train, y_train = data.x_train, data.y_train
    a_train = aux_labels(y_train)

    main_losses: list[torch.Tensor] = []
    aux_losses: list[torch.Tensor] = []
    start = time.perf_counter()
    for idx in batches:
        xb = x_train.index_select(0, idx)
        yb = y_train.index_select(0, idx)
        ab = a_train.index_select(0, idx)
        opt.zero_grad()
        main_logits, aux_logits = model(xb)
        l_main = F.cross_entropy(main_logits, yb)
        l_aux = F.cross_entropy(aux_logits, ab)
        if named:
            opt.step(losses={"main": l_main, "aux": aux_weight * l_aux})
        else:
            (l_main + aux_weight * l_aux).backward()
            opt.step()
        main_losses.append(l_main.detach())
        aux_losses.append(l_aux.detach())
    seconds = time.perf_counter() - start

    losses = [float(v) for v in torch.stack(main_losses).tolist()]
    aux = [float(v) for v in torch.stack(aux_losses).tolist()]
    if getattr(opt, "has_eval", False):  # Schedule-Free: evaluate at the point its eval() gives
        opt.eval()
    model.eval()
    with torch.no_grad():
        main_logits, aux_logits = model(data.x_val)
        a_val = aux_labels(data.y_val)
        val_loss = float(F.cross_entropy(main_logits, data.y_val))
        val_accuracy = float((main_logits.argmax(dim=1) == data.y_val).to(torch.float64).mean())
        val_aux_loss = float(F.cross_entropy(aux_logits, a_val))
        val_aux_accuracy = float((aux_logits.argmax(dim=1) == a_val).to(torch.float64).mean())
    tail, aux_tail = losses[-10:], aux[-10:]
    return MultiTaskResult(
        losses=losses,
        aux_losses=aux,
        initial_loss=losses[0],
        final_loss=math.fsum(tail) / len(tail),
        initial_aux_loss=aux[0],
        final_aux_loss=math.fsum(aux_tail) / len(aux_tail),
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        val_aux_loss=val_aux_loss,
        val_aux_accuracy=val_aux_accuracy,
        seconds=seconds,
    )
