"""Source locations and the one error type users see for a bad `.grad` file.

Every problem in a pipeline, from a typo to an out-of-range hyperparameter, is
reported as a :class:`GradError` whose text is::

    path:line:col: message
      <the source line>
      <a caret under the column>
    hint: <a suggestion>
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Span", "GradError", "Diagnostic", "did_you_mean"]


@dataclass(frozen=True)
class Span:
    """A 1-based position range in a source file."""

    line: int = 1
    column: int = 1
    end_line: int = 1
    end_column: int = 1
    path: str = "<string>"
    source: str | None = None

    def source_line(self) -> str | None:
        if self.source is None:
            return None
        lines = self.source.split("\n")  # the lexer counts only \n as a line break
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1].rstrip("\r")
        return None

    def __repr__(self) -> str:  # keep AST reprs short
        return f"Span({self.path}:{self.line}:{self.column})"


@dataclass(frozen=True)
class Diagnostic:
    """One located message; :class:`GradError` carries one or more."""

    message: str
    span: Span
    hint: str | None = None

    def render(self) -> str:
        s = self.span
        out = [f"{s.path}:{s.line}:{s.column}: error: {self.message}"]
        line = s.source_line()
        if line is not None:
            shown = line.expandtabs(1)
            if len(shown) > 200:  # do not flood the terminal with a 10 MB line
                start = max(0, s.column - 100)
                shown = shown[start:start + 200]
                caret_col = s.column - start
            else:
                caret_col = s.column
            width = 1
            if s.end_line == s.line and s.end_column > s.column:
                width = min(s.end_column - s.column, max(1, len(shown) - caret_col + 1))
            out.append("  " + shown)
            out.append("  " + " " * (caret_col - 1) + "^" * max(1, width))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


class GradError(ValueError):
    """A problem in a user's `.grad` pipeline.

    Attributes:
        path, line, column: where the (first) problem is, 1-based.
        diagnostics: every problem found, in source order.
    """

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 *, diagnostics: Sequence[Diagnostic] | None = None) -> None:
        if diagnostics is None:
            diagnostics = [Diagnostic(message, span or Span(), hint)]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        first = self.diagnostics[0]
        self.message = first.message
        self.hint = first.hint
        self.span = first.span
        self.path = first.span.path
        self.line = first.span.line
        self.column = first.span.column
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @classmethod
    def combine(cls, errors: Iterable["GradError"]) -> "GradError":
        unique: dict[tuple, Diagnostic] = {}
        for e in errors:
            for d in e.diagnostics:
                unique.setdefault((d.span.path, d.span.line, d.span.column, d.message), d)
        diags = sorted(unique.values(), key=lambda d: (d.span.path, d.span.line, d.span.column))
        return cls("", diagnostics=diags)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt name, or None."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not matches:
        return None
    if len(matches) == 1:
        return f"did you mean '{matches[0]}'?"
    return "did you mean one of " + ", ".join(f"'{m}'" for m in matches) + "?"
