"""gradpipe: optimizers written as pipelines of gradient transforms.

    opt = gradpipe.Optimizer(model.named_parameters(), "pipelines/scalpel.grad", lr=1e-3)

Public API: :func:`compile`, :func:`load`, :func:`check_file` (a pipeline or a :class:`Library`), :class:`Program`, :class:`Optimizer`,
:class:`GradError`, :func:`format_source`, :class:`NonFiniteError`, :func:`register_op`
(ops from other packages, also through the ``gradpipe.ops`` entry point group).
"""

from .compiler.ops import register_op
from .compiler.ops.project_out import gpm_basis
from .compiler.program import Library, Program, builtin_names, check_file, compile, load
from .dsl.diagnostics import GradError
from .dsl.formatter import format_source
from .runtime.nonfinite import NonFiniteError
from .runtime.optimizer import Optimizer
from .runtime.per_sample import per_sample_grads

__version__ = "0.1.0"

# Op plug-ins (the ``gradpipe.ops`` entry points) load last, once this package is whole: a
# plug-in module runs ``import gradpipe`` and decorates its ops with ``@gradpipe.register_op``,
# which a plug-in loaded while ``gradpipe`` was half-imported could not reach.
from .compiler.ops import load_plugins as _load_plugins  # noqa: E402

_load_plugins()

__all__ = ["Optimizer", "Program", "Library", "GradError", "NonFiniteError", "compile", "load", "check_file",
           "format_source", "builtin_names", "per_sample_grads", "gpm_basis", "register_op", "__version__"]
