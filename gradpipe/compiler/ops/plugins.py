"""Loading the op library: gradpipe's own op modules, and ops from other packages.

:func:`load_builtin_ops` imports every module of ``gradpipe/compiler/ops`` (each registers
its op; there is no list of modules to keep). This module and that one are the only places
in the compiler that import modules by name (``tests/test_hostile_input.py`` holds the
compiler to that): the names come from gradpipe's own package folder and from the entry
points of installed packages, never from a `.grad` file.

Ops from other packages: :func:`register_op` and the ``gradpipe.ops`` entry point group.

A package adds ops to gradpipe's library the way pytest plug-ins add fixtures: it
declares an entry point in the ``gradpipe.ops`` group, in its ``pyproject.toml``::

    [project.entry-points."gradpipe.ops"]
    myops = "myops.gradpipe_ops"

The entry point names a module (importing it registers its ops, each class decorated
with ``@gradpipe.register_op``) or an :class:`~gradpipe.compiler.ops.base.Op` subclass.
gradpipe loads every such plug-in when it is imported, so a ``.grad`` file can use the
ops of any installed plug-in by name. A plug-in that fails to load, or that reuses the
name of an op already registered, is skipped with a :class:`PluginWarning` naming it:
it never breaks gradpipe itself. ``docs/ops.md`` ("Adding an op") shows a whole plug-in.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import warnings
from importlib import metadata
from types import ModuleType
from typing import Any

from .base import OPS, Op, register

__all__ = ["PLUGIN_GROUP", "PluginWarning", "PluginError", "register_op", "load_builtin_ops", "load_plugins",
           "loaded_plugins"]

#: the entry point group gradpipe reads op plug-ins from
PLUGIN_GROUP = "gradpipe.ops"

_LOADED: dict[str, list[str]] = {}


class PluginWarning(UserWarning):
    """An op plug-in could not be loaded (it is skipped)."""


class PluginError(ValueError):
    """An op class that cannot be registered (no name, a name already taken, not an Op)."""


def register_op(cls: type[Op]) -> type[Op]:
    """Class decorator: add a user-defined op to gradpipe's library, usable by name in `.grad`
    files. The class is a subclass of ``gradpipe.compiler.ops.Op`` or ``TensorOp`` with a
    ``name``, ``params``, ``buffers`` and the math, like the built-in ops
    (``gradpipe/compiler/ops/ema.py`` is a short example)."""
    if not (inspect.isclass(cls) and issubclass(cls, Op)):
        raise PluginError(f"register_op expects an Op subclass, got {cls!r}")
    try:
        return register(cls)
    except ValueError as e:
        raise PluginError(str(e)) from None


def load_builtin_ops() -> None:
    """Import every module of ``gradpipe.compiler.ops`` (helper modules such as ``lowrank``
    register nothing; modules whose name starts with ``_`` are skipped)."""
    package = __name__.rpartition(".")[0]
    folder = str(pathlib.Path(__file__).parent)
    for info in sorted(pkgutil.iter_modules([folder]), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def _entry_points() -> list[Any]:
    try:
        return list(metadata.entry_points(group=PLUGIN_GROUP))
    except Exception:  # noqa: BLE001 - a broken installation must not stop gradpipe from importing
        return []


def load_plugins() -> dict[str, list[str]]:
    """Load every ``gradpipe.ops`` entry point not loaded yet; return ``{entry point: [op names]}``
    for all plug-ins loaded so far."""
    for ep in _entry_points():
        key = f"{ep.name} = {ep.value}"
        if key in _LOADED:
            continue
        before = set(OPS)
        try:
            obj = ep.load()
            if inspect.isclass(obj):
                register_op(obj)
            elif not isinstance(obj, ModuleType):
                raise PluginError(f"the entry point names {obj!r}, not a module or an Op subclass")
        except Exception as e:  # noqa: BLE001 - any failure of someone else's package is reported, not raised
            for name in set(OPS) - before:  # nothing half-registered
                del OPS[name]
            warnings.warn(f"gradpipe: the op plug-in '{key}' was not loaded: {type(e).__name__}: {e}",
                          PluginWarning, stacklevel=2)
            _LOADED[key] = []
            continue
        _LOADED[key] = sorted(set(OPS) - before)
    return {k: list(v) for k, v in _LOADED.items()}


def loaded_plugins() -> dict[str, list[str]]:
    """The plug-ins loaded so far and the ops each registered."""
    return {k: list(v) for k, v in _LOADED.items()}
