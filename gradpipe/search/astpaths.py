"""Addressing and rewriting nodes of an immutable `.grad` AST by path.

A path is a tuple of steps ``(field, index)``: the dataclass field to follow and, for a
tuple field, the item's index (None otherwise). Rewriting rebuilds the nodes along the path
with :func:`dataclasses.replace`, so the original module is never changed and everything
off the path (comments included) is shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from ..dsl import ast

__all__ = ["Path", "walk_paths", "get_at", "replace_at", "PIPELINE_STMTS", "size"]

Path = tuple[tuple[str, "int | None"], ...]

#: statements whose expressions mutations may rewrite (not hparam defaults, imports,
#: ``eval:``/``train:`` sequences)
PIPELINE_STMTS = (ast.Let, ast.State, ast.Def, ast.Route, ast.Body)

_SKIP = frozenset({"span", "comments", "source", "path", "trailing_comments"})


def _children(node: Any) -> Iterator[tuple[str, int | None, Any]]:
    for f in dataclasses.fields(node):
        if f.name in _SKIP:
            continue
        v = getattr(node, f.name)
        if isinstance(v, tuple):
            for i, x in enumerate(v):
                if dataclasses.is_dataclass(x):
                    yield f.name, i, x
        elif dataclasses.is_dataclass(v):
            yield f.name, None, v


def walk_paths(module: ast.Module) -> Iterator[tuple[Path, Any]]:
    """Every node below the pipeline statements of ``module`` (:data:`PIPELINE_STMTS`),
    with its path from the module, parents before children, in source order."""
    for i, stmt in enumerate(module.stmts):
        if not isinstance(stmt, PIPELINE_STMTS):
            continue
        stack: list[tuple[Path, Any]] = [((("stmts", i),), stmt)]
        while stack:
            path, node = stack.pop()
            yield path, node
            stack.extend(reversed([(path + ((f, j),), c) for f, j, c in _children(node)]))


def get_at(root: Any, path: Path) -> Any:
    node = root
    for f, j in path:
        node = getattr(node, f)
        if j is not None:
            node = node[j]
    return node


def replace_at(root: Any, path: Path, new: Any) -> Any:
    """``root`` with the node at ``path`` replaced by ``new``."""
    if not path:
        return new
    (f, j), rest = path[0], path[1:]
    child = getattr(root, f)
    if j is None:
        return dataclasses.replace(root, **{f: replace_at(child, rest, new)})
    items = list(child)
    items[j] = replace_at(items[j], rest, new)
    return dataclasses.replace(root, **{f: tuple(items)})


def size(module: ast.Module) -> int:
    """The number of AST nodes of the module's statements (how big a program is)."""
    return sum(1 for _ in ast.walk(module))
