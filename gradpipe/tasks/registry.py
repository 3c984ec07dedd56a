"""Finding tasks by name: built-in tasks, installed plugins and ``"package.module:factory"`` specs.

:func:`get_task` resolves a task spec, in this order:

1. ``"package.module:factory"`` (anything with a colon): ``factory`` is looked
   up in the imported module (a dotted path such as ``"mod:Outer.make"``
   works too); it is a :class:`~gradpipe.tasks.base.Task` subclass, a callable
   returning a Task, or a Task instance (which takes no options);
2. a built-in name (:data:`BUILTIN_TASKS`: ``digits``, ``digits-multitask``,
   ``charlm``, ``digits-cnn``, ``tinylm``, ``quadratic``, ``rosenbrock``,
   ``noisy-quadratic``);
3. the name of an entry point in the group ``"gradpipe.tasks"`` (a plugin
   package declares ``[project.entry-points."gradpipe.tasks"] mytask =
   "mypkg.tasks:MyTask"`` in its ``pyproject.toml``). A built-in name wins over
   an entry point of the same name.

Options are passed to the factory as keyword arguments after checking them
against its signature, so an unknown option is a :class:`TaskError` that lists
the ones the task has. Every failure is a :class:`TaskError` with a one-line
message.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from typing import Any, Callable

from .base import Task, TaskError, check_task

__all__ = ["BUILTIN_TASKS", "ENTRY_POINT_GROUP", "get_task", "available_tasks", "task_options"]

#: The entry-point group that plugin packages register their tasks in.
ENTRY_POINT_GROUP = "gradpipe.tasks"

#: Built-in task names and the ``"module:factory"`` each resolves to.
BUILTIN_TASKS: dict[str, str] = {
    "digits": "gradpipe.tasks.digits_task:DigitsTask",
    "digits-multitask": "gradpipe.tasks.digits_task:DigitsMultitaskTask",
    "charlm": "gradpipe.tasks.charlm:CharLMTask",
    "digits-cnn": "gradpipe.tasks.digits_cnn:DigitsCNNTask",
    "tinylm": "gradpipe.tasks.tinylm:TinyLMTask",
    "quadratic": "gradpipe.tasks.synthetic:QuadraticTask",
    "rosenbrock": "gradpipe.tasks.synthetic:RosenbrockTask",
    "noisy-quadratic": "gradpipe.tasks.synthetic:NoisyQuadraticTask",
}


def _entry_points() -> dict[str, Any]:
    """The installed ``gradpipe.tasks`` entry points by name (a broken metadata set gives none)."""
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - a corrupt installed distribution must not break the builtins
        return {}
    out: dict[str, Any] = {}
    for ep in eps:
        out.setdefault(ep.name, ep)
    return out


def available_tasks() -> list[str]:
    """The built-in task names and the names of installed ``gradpipe.tasks`` entry points, sorted."""
    return sorted(set(BUILTIN_TASKS) | set(_entry_points()))


def _import_factory(target: str, spec: str) -> Any:
    """The object ``"module:attr.path"`` names."""
    module_name, _, attr_path = target.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise TaskError(f"task spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
        raise TaskError(f"cannot import module {module_name!r} for task {spec!r}: "
                        f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(f"module {module_name!r} has no attribute {attr_path!r} (task spec {spec!r})") from None
    return obj


def _resolve(spec: str) -> tuple[Any, str]:
    """The factory a spec names, and a label for messages."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"a task spec is a task name or 'package.module:factory', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        return _import_factory(spec, spec), spec
    if spec in BUILTIN_TASKS:
        return _import_factory(BUILTIN_TASKS[spec], spec), spec
    eps = _entry_points()
    if spec in eps:
        try:
            return eps[spec].load(), spec
        except Exception as exc:  # noqa: BLE001
            raise TaskError(f"cannot load task {spec!r} from entry point {eps[spec].value!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    names = sorted(set(BUILTIN_TASKS) | set(eps))
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if "." in spec and not close:
        hint = "a task in your own module is named 'package.module:factory'; "
    raise TaskError(f"unknown task {spec!r}: {hint}available tasks: {', '.join(names)}")


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature
        return None


def _option_names(sig: inspect.Signature | None) -> list[str] | None:
    """The keyword options a signature accepts, or None when it takes ``**kwargs``."""
    if sig is None:
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def task_options(spec: str) -> dict[str, Any]:
    """The options of the task ``spec`` names and their defaults (``inspect.Parameter.empty``
    for a required one); ``{}`` for a Task instance or a factory taking ``**kwargs`` only."""
    factory, _ = _resolve(spec)
    if isinstance(factory, Task):
        return {}
    sig = _signature(factory)
    if sig is None:
        return {}
    return {n: p.default for n, p in sig.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def get_task(spec: str, **options: Any) -> Task:
    """The task ``spec`` names, built with ``options``.

    Args:
        spec: a built-in name (``"digits"``, ``"charlm"``, ``"quadratic"``, ...: :data:`BUILTIN_TASKS`),
            the name of a ``gradpipe.tasks`` entry point, or
            ``"package.module:factory"`` where ``factory`` is a :class:`Task`
            subclass, a callable returning a :class:`Task`, or a Task instance.
        **options: keyword arguments for the task's constructor (or factory),
            e.g. ``get_task("digits", batch_size=64)``.

    Returns:
        A checked :class:`Task` instance.

    Raises:
        TaskError: unknown name (with a did-you-mean and the list of names), a
            module that cannot be imported, a missing attribute, an option the
            task does not have, a factory that fails or returns something other
            than a Task.
    """
    factory, label = _resolve(spec)
    if isinstance(factory, Task):
        if options:
            raise TaskError(f"task {label!r} is a Task instance and takes no options, got "
                            f"{', '.join(sorted(options))}")
        return check_task(factory)
    if not callable(factory):
        raise TaskError(f"task {label!r} names a {type(factory).__name__}, not a Task subclass or a "
                        "callable that returns a Task")
    if inspect.isclass(factory) and not issubclass(factory, Task):
        raise TaskError(f"task {label!r} names the class {factory.__name__}, which is not a subclass of "
                        "gradpipe.tasks.Task")
    sig = _signature(factory)
    accepted = _option_names(sig)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            have = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
            raise TaskError(f"task {label!r} has no option {', '.join(unknown)}; {have}")
    if sig is not None:
        try:
            sig.bind(**options)
        except TypeError as exc:
            raise TaskError(f"task {label!r}: {exc}") from None
    try:
        task = factory(**options)
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - report the user's factory's failure in one line
        raise TaskError(f"task {label!r} could not be built: {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise TaskError(f"task factory {label!r} returned a {type(task).__name__}, not a gradpipe.tasks.Task")
    return check_task(task)
