"""The op library. One module per op; every module of this package registers itself.

Importing this package imports each of its modules (``plugins.load_builtin_ops``:
there is no list to keep). The op plug-ins that installed packages declare under the
``gradpipe.ops`` entry point group (see :func:`load_plugins`) are loaded by
``gradpipe/__init__.py`` once the ``gradpipe`` package is whole, so that a plug-in
module can ``import gradpipe`` and decorate its ops with ``@gradpipe.register_op``.
``docs/ops.md`` is generated from the registry (``python -m gradpipe.docs_ops``).
"""

from __future__ import annotations

from .base import (INTERNAL_OPS, OPS, Args, Buffer, CheckView, Denominator, InnerNode, Lane, MacroOp, NodeCtx, Op, Param,
                   Rewrite, SeededOp, TensorOp, op_impl, register)
from .plugins import PLUGIN_GROUP, PluginError, load_builtin_ops, load_plugins, register_op

load_builtin_ops()
#: the names of the ops that ship with gradpipe (plug-ins come after)
BUILTIN_OPS: frozenset[str] = frozenset(OPS)

__all__ = ["OPS", "INTERNAL_OPS", "op_impl", "BUILTIN_OPS", "Op", "TensorOp", "SeededOp", "MacroOp", "Param", "Buffer", "Args", "Lane",
           "NodeCtx", "InnerNode", "Denominator", "CheckView", "Rewrite", "register", "register_op",
           "load_plugins", "load_builtin_ops", "PLUGIN_GROUP", "PluginError"]
