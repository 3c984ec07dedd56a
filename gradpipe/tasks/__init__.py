"""Small, fast, deterministic training tasks for trying out optimizers.

Each task trains a small model on data shipped with an installed package (no
downloads) or minimises a synthetic objective, so a run takes seconds on a
laptop CPU (``tinylm``, a transformer, under a minute) and gives the same
numbers every time for a given seed.

Tasks (``gradpipe.tasks.get_task(name)``):
    ``digits`` (:class:`DigitsTask`, :mod:`gradpipe.tasks.digits`): a 64-64-10
        MLP on scikit-learn's 8x8 digits; metric ``val_accuracy``.
    ``digits-multitask`` (:class:`DigitsMultitaskTask`,
        :mod:`gradpipe.tasks.digits_multitask`): the same digits with a shared
        trunk and two heads (digit and parity), two named losses ``main`` and
        ``aux`` for multi-loss pipelines; metric ``val_accuracy``.
    ``charlm`` (:class:`CharLMTask`, :mod:`gradpipe.tasks.charlm`): a
        character-level language model of Python standard-library source;
        metric ``val_loss`` (nats per character).
    ``digits-cnn`` (:class:`DigitsCNNTask`, :mod:`gradpipe.tasks.digits_cnn`):
        a small conv net on the same 8x8 digits; metric ``val_accuracy``.
    ``tinylm`` (:class:`TinyLMTask`, :mod:`gradpipe.tasks.tinylm`): a tiny
        decoder-only transformer on charlm's text; metric ``val_loss``.
    ``quadratic``, ``rosenbrock``, ``noisy-quadratic``
        (:mod:`gradpipe.tasks.synthetic`): objectives of known difficulty (an
        ill-conditioned quadratic, Rosenbrock's valley, Zhang et al.'s noisy
        quadratic model), hundreds of steps a second; metric ``suboptimality``.

Every built-in task takes the option ``holdout``: ``"val"`` (the default)
evaluates on the validation split, ``"tune"`` on a seeded fifth of the
training split that it then does not train on (:mod:`gradpipe.tasks.options`).
The digits tasks, whose split is drawn per seed, also take ``reserve``: seeds
whose validation images ``"tune"`` leaves out of both parts.

Any task is trained with :func:`run_task`::

    import gradpipe
    from gradpipe.tasks import get_task, run_task

    result = run_task(get_task("charlm"),
                      lambda m: gradpipe.Optimizer(m.named_parameters(), "adam", lr=3e-3),
                      steps=200, seed=0, on_step=print)
    print(result.metrics)

**Your own task.** Subclass :class:`Task`: set ``name``, ``metric``,
``higher_is_better``, ``default_steps`` and ``loss_names``, and implement
``make_model(seed)``, ``batches(seed, steps)`` (exactly ``steps`` batches),
``losses(model, batch)`` (a dict of scalar tensors keyed by ``loss_names``)
and ``evaluate(model)`` (a dict of floats that includes ``metric``); add
``sample_grads(model, batch)`` for DP pipelines that read ``samples``. The
constructor's keyword arguments are the task's options. Draw randomness from
``torch.Generator`` objects seeded from ``seed``, not from the global RNG::

    # mypkg/tasks.py
    class MyTask(gradpipe.tasks.Task):
        name = "mytask"
        metric = "val_loss"
        higher_is_better = False
        default_steps = 300
        loss_names = ("loss",)

        def __init__(self, width: int = 32): ...
        ...

Then name it ``mypkg.tasks:MyTask`` (``gradpipe train --task mypkg.tasks:MyTask``,
or ``get_task("mypkg.tasks:MyTask", width=64)``; a function returning a Task
works too), or register it under a short name with an entry point in your
package's ``pyproject.toml``::

    [project.entry-points."gradpipe.tasks"]
    mytask = "mypkg.tasks:MyTask"

and use ``--task mytask``.
"""

from __future__ import annotations

from .base import Checkpoint, Diverged, EvalRecord, StepRecord, Task, TaskError, TaskResult, check_task, run_task
from .charlm import CharLMTask
from .digits import DigitsData, TrainResult, load_digits_split, make_mlp, train
from .digits_multitask import MultiTaskModel, MultiTaskResult, make_multitask_model, train_multitask
from .digits_cnn import DigitsCNNTask
from .digits_task import DigitsMultitaskTask, DigitsTask
from .registry import available_tasks, get_task, task_options
from .synthetic import NoisyQuadraticTask, QuadraticTask, RosenbrockTask
from .tinylm import TinyLMTask

__all__ = ["DigitsData", "TrainResult", "load_digits_split", "make_mlp", "train",
           "MultiTaskModel", "MultiTaskResult", "make_multitask_model", "train_multitask",
           "Task", "TaskError", "TaskResult", "StepRecord", "EvalRecord", "Diverged", "run_task", "check_task",
           "Checkpoint",
           "get_task", "available_tasks", "task_options",
           "DigitsTask", "DigitsMultitaskTask", "CharLMTask", "DigitsCNNTask", "TinyLMTask",
           "QuadraticTask", "RosenbrockTask", "NoisyQuadraticTask"]
