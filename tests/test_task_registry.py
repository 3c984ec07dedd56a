"""Tests for task lookup (:mod:`gradpipe.tasks.registry`): built-in names, ``module:factory``
specs, ``gradpipe.tasks`` entry points, options and the one-line errors."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from gradpipe.tasks import (
    CharLMTask,
    DigitsMultitaskTask,
    DigitsTask,
    Task,
    TaskError,
    available_tasks,
    get_task,
    run_task,
    task_options,
)
from gradpipe.tasks.registry import BUILTIN_TASKS, ENTRY_POINT_GROUP

from example_tasks import LINREG, LinearRegressionTask

BUILTINS = ["charlm", "digits", "digits-cnn", "digits-multitask", "noisy-quadratic", "quadratic", "rosenbrock",
            "tinylm"]


def task_error(spec: str, **options) -> str:
    with pytest.raises(TaskError) as info:
        get_task(spec, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_builtin_tasks() -> None:
    assert sorted(BUILTIN_TASKS) == BUILTINS
    assert set(BUILTINS) <= set(available_tasks())
    for name, cls in [("digits", DigitsTask), ("digits-multitask", DigitsMultitaskTask), ("charlm", CharLMTask)]:
        task = get_task(name)
        assert type(task) is cls and task.name == name
    assert (DigitsTask.metric, DigitsTask.higher_is_better, DigitsTask.default_steps) == ("val_accuracy", True, 200)
    assert DigitsMultitaskTask.loss_names == ("main", "aux") and DigitsMultitaskTask.metric == "val_accuracy"
    assert get_task(" digits ").name == "digits"


def test_builtin_options() -> None:
    assert get_task("digits", batch_size=32).batch_size == 32
    assert get_task("digits", batch_size="32").batch_size == 32  # command-line strings
    assert get_task("digits-multitask", aux_weight="0.25").aux_weight == 0.25
    assert task_options("digits") == {"batch_size": 128, "hidden": 64, "holdout": "val", "reserve": ()}
    assert task_options("digits-multitask") == {"batch_size": 64, "hidden": 64, "aux_weight": 1.0, "holdout": "val",
                                                "reserve": ()}
    assert "its options are batch_size, hidden, holdout" in task_error("digits", batch=3)
    assert task_error("digits", foo=1, bar=2) == \
        "task 'digits' has no option bar, foo; its options are batch_size, hidden, holdout, reserve"
    assert "batch_size must be an integer" in task_error("digits", batch_size="lots")
    assert "aux_weight must be finite and at least 0" in task_error("digits-multitask", aux_weight=-1)


def test_unknown_names() -> None:
    message = task_error("digit")
    assert message == ("unknown task 'digit': did you mean 'digits'? "
                       f"available tasks: {', '.join(available_tasks())}")
    assert "did you mean 'charlm'" in task_error("charml")
    message = task_error("imagenet")
    assert "did you mean" not in message and "available tasks: charlm, digits" in message
    assert "'package.module:factory'" in task_error("mypkg.tasks.MyTask")
    assert "task spec" in task_error("")


def test_module_factory_specs() -> None:
    task = get_task("example_tasks:LinearRegressionTask", dim="3")
    assert isinstance(task, LinearRegressionTask) and task.dim == 3
    made = get_task("example_tasks:make_linreg", dim=5)
    assert isinstance(made, LinearRegressionTask) and made.dim == 5
    assert get_task("example_tasks:LINREG") is LINREG
    assert task_options("example_tasks:LinearRegressionTask") == {"dim": 4, "batch_size": 16}
    assert task_options("example_tasks:LINREG") == {}
    result = run_task(get_task("example_tasks:LinearRegressionTask"),
                      lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=20)
    assert result.task == "linreg" and result.final_loss < result.losses[0]


@pytest.mark.parametrize("spec, options, expected", [
    ("no_such_module_xyz:Task", {}, "cannot import module 'no_such_module_xyz' for task 'no_such_module_xyz:Task': "
                                    "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("example_tasks:Nope", {}, "module 'example_tasks' has no attribute 'Nope' (task spec 'example_tasks:Nope')"),
    ("example_tasks:", {}, "task spec 'example_tasks:' must look like 'package.module:factory'"),
    (":Task", {}, "must look like 'package.module:factory'"),
    ("example_tasks:NotATask", {}, "names the class NotATask, which is not a subclass of gradpipe.tasks.Task"),
    ("example_tasks:not_a_task", {}, "task factory 'example_tasks:not_a_task' returned a str, not a gradpipe.tasks.Task"),
    ("example_tasks:broken_factory", {}, "task 'example_tasks:broken_factory' could not be built: "
                                         "RuntimeError: the dataset is missing"),
    ("example_tasks:BUILTINS_NOT_HERE", {}, "has no attribute"),
    ("example_tasks:__doc__", {}, "names a str, not a Task subclass"),
    ("example_tasks:LINREG", {"dim": 3}, "is a Task instance and takes no options, got dim"),
    ("example_tasks:make_linreg", {"width": 3}, "has no option width; its options are dim"),
    ("example_tasks:not_a_task", {"x": 1}, "has no option x; it takes no options"),
    ("example_tasks:NoName", {}, "task class NoName must set a non-empty string 'name'"),
    ("gradpipe.tasks.digits:make_mlp", {}, "returned a Sequential, not a gradpipe.tasks.Task"),
])
def test_bad_specs(spec: str, options: dict, expected: str) -> None:
    assert expected in task_error(spec, **options)


def _fake_entry_points(*eps: importlib.metadata.EntryPoint):
    def entry_points(**selection):
        assert selection == {"group": ENTRY_POINT_GROUP}
        return list(eps)
    return entry_points


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(
        _ep("linreg", "example_tasks:LinearRegressionTask"),
        _ep("broken", "no_such_module_xyz:Task"),
        _ep("digits", "example_tasks:make_linreg"),  # a built-in name wins
    ))
    assert available_tasks() == sorted(BUILTINS + ["broken", "linreg"])
    task = get_task("linreg", dim=2)
    assert isinstance(task, LinearRegressionTask) and task.dim == 2
    assert task_options("linreg") == {"dim": 4, "batch_size": 16}
    assert isinstance(get_task("digits"), DigitsTask)
    assert "did you mean 'linreg'" in task_error("linre")
    assert task_error("broken").startswith(
        "cannot load task 'broken' from entry point 'no_such_module_xyz:Task': ModuleNotFoundError")


def test_broken_metadata_does_not_hide_the_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(**selection):
        raise RuntimeError("corrupt METADATA")
    monkeypatch.setattr(importlib.metadata, "entry_points", boom)
    assert available_tasks() == BUILTINS
    assert isinstance(get_task("charlm"), Task)
