"""Source locations and the one error type users see for a bad `.grad` file.

Every problem in a pipeline, from a typo to an out-of-range hyperparameter, is
reported as a :class:`GradError` whose text is::

    path:line:col: message
      <the source line>
      <a caret under the column>
    hint: <a suggestion>
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Span", "GradError", "Diagnostic", "did_you_mean", "printable"]

# Control characters (C0 but tab, DEL, C1), bidirectional embeddings, overrides and
# isolates, and line/paragraph separators. A hostile file could otherwise send
# terminal escape sequences, or reorder the displayed text, through an error message.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every character that could control a terminal or reorder the line
    replaced by U+FFFD (one character for one, so caret columns stay right)."""
    return _UNPRINTABLE.sub("\ufffd", text)


@functools.lru_cache(maxsize=8)
def _lines(source: str) -> tuple[str, ...]:
    """The lines of a source text (only '\\n' ends a line, as for the lexer), split once per
    text: a file with thousands of errors renders each of them without splitting it again."""
    return tuple(source.split("\n"))


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
        lines = _lines(self.source)
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
        out = [f"{printable(s.path)}:{s.line}:{s.column}: error: {printable(self.message)}"]
        line = s.source_line()
        if line is not None:
            shown = printable(line.expandtabs(1))
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
            out.append(f"hint: {printable(self.hint)}")
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


#: Above this many plausible candidates a hint compares only names with the same first letter,
#: and gives up if there are still more: a file with thousands of names and thousands of
#: typos would otherwise cost their product in string comparisons.
MAX_SUGGESTION_CANDIDATES = 300


@functools.lru_cache(maxsize=16)
def _by_initial_and_length(candidates: tuple[str, ...]) -> dict[tuple[str, int], tuple[str, ...]]:
    """Candidates grouped by (lower-case first letter, length); built once per candidate list."""
    groups: dict[tuple[str, int], list[str]] = {}
    for c in set(candidates):
        groups.setdefault((c[:1].lower(), len(c)), []).append(c)
    return {k: tuple(v) for k, v in groups.items()}


#: Names longer than this get no suggestion (a typo is in a name someone types).
MAX_SUGGESTION_LENGTH = 64


def max_edits(length: int) -> int:
    """How many edits a suggestion may be away from a name of ``length`` characters:
    1 up to 4 characters, 2 up to 8, 3 beyond. (So ``max`` is never answered ``ema``,
    two edits away, and a name unlike every candidate gets no suggestion.)"""
    return 1 if length <= 4 else 2 if length <= 8 else 3


def edit_distance(a: str, b: str, limit: int) -> int:
    """The optimal-string-alignment distance between ``a`` and ``b`` (insertions, deletions,
    substitutions and swaps of two adjacent characters, each 1), or ``limit + 1`` when it
    exceeds ``limit``. Only a band of width ``2 * limit + 1`` is computed: O(len(a) * limit)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    big = limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [big] * (len(b) + 1)
        cur[0] = i
        for j in range(max(1, i - limit), min(len(b), i + limit) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = min(v, big)
        if min(cur) > limit:
            return big
        prev2, prev = prev, cur
    return min(prev[len(b)], big)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt name, or None when no candidate is close.

    A candidate is close when it is at most :func:`max_edits` edits away, ignoring case
    (:func:`edit_distance`); the closest come first, at most three. Only candidates whose
    length is within that many characters are compared. The candidates are grouped once
    per list (cached), so thousands of typos against thousands of names stay cheap."""
    n = len(name)
    if n == 0 or n > MAX_SUGGESTION_LENGTH:
        return None
    limit = max_edits(n)
    groups = _by_initial_and_length(tuple(candidates))
    near = [(initial, names) for (initial, length), names in groups.items() if abs(length - n) <= limit]
    if sum(len(names) for _, names in near) > MAX_SUGGESTION_CANDIDATES:  # counted before any list is built
        first = name[:1].lower()
        near = [(initial, names) for initial, names in near if initial == first]
        if sum(len(names) for _, names in near) > MAX_SUGGESTION_CANDIDATES:
            return None
    pool = [c for _, names in near for c in names]
    lowered = name.lower()
    scored = sorted((edit_distance(lowered, c.lower(), limit), c) for c in pool if c != name)
    matches = [c for d, c in scored if d <= limit][:3]
    if not matches:
        return None
    if len(matches) == 1:
        return f"did you mean '{matches[0]}'?"
    return "did you mean one of " + ", ".join(f"'{m}'" for m in matches) + "?"
