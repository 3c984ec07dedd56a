"""What an expression compiles to, before it becomes graph nodes.

* :class:`ScalarV`: a scalar expression (numbers, hyperparameters, ``lr``...).
* :class:`Word`: a bool, a string, or a bare word such as ``global``.
* :class:`Stream`: a closed signal, already a node of the graph.
* :class:`Fragment`: an open pipeline (``adam``, ``ema(0.99)``,
  ``clip_norm | adam``) that becomes nodes when applied to an input stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from ..dsl.diagnostics import Span
from .scalars import Scalar, is_bool


@dataclass(frozen=True)
class ScalarV:
    expr: Scalar
    span: Span


@dataclass(frozen=True)
class Word:
    value: str | bool
    span: Span


@dataclass(frozen=True)
class Stream:
    node: str
    span: Span


@dataclass(frozen=True)
class Fragment:
    """``apply(input_node, prefix) -> output_node``."""

    apply: Callable[[str, str], str]
    span: Span
    label: str  # what the user wrote, for messages


Value = Union[ScalarV, Word, Stream, Fragment]


def kind_name(v: Value) -> str:
    if isinstance(v, ScalarV):
        return "a boolean (a comparison)" if is_bool(v.expr) else "a number"
    if isinstance(v, Word):
        return "a boolean" if isinstance(v.value, bool) else f"the word '{v.value}'"
    if isinstance(v, Stream):
        return "a signal"
    return f"an op ('{v.label}')"
