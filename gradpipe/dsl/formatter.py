"""Print a :class:`~gradpipe.dsl.ast.Module` back as canonical `.grad` text.

The canonical form is what ``gradpipe fmt`` writes and what the rest of the
package uses to derive stable names. It is defined by two properties, both
checked by the tests:

* ``parse(format_module(m)) == m`` for every module the parser can produce
  (spans and comments are not part of AST equality), and
* formatting is idempotent: ``format_source(format_module(m)) == format_module(m)``.

Layout rules:

* one statement per line, in order; each statement's comments go on their own
  lines above it (a ``""`` marker is one blank line; never two in a row), the
  module's trailing comments at the end; the text ends with exactly one newline
  (an empty module is ``""``);
* single spaces around binary operators, ``|``, ``=`` in statements, after
  commas and ``:``; none in ``k=v`` keyword arguments or ``p=1`` defaults, none
  after a unary ``-``;
* parentheses only where precedence needs them (low to high: ``|``, comparisons
  ``< <= > >= == !=`` (non-associative: an operand that is itself a comparison is
  parenthesised), ``+ -``, ``* / %``, unary ``-``, ``**`` (right-associative),
  ``x[i]``, atoms; for selectors: ``or``, ``and``, ``not``, atoms);
* a statement whose one-line form is longer than :data:`MAX_WIDTH` columns and
  whose pipeline is a chain is split before each ``|``::

      route ndim >= 2: grad
        | project_orthogonal(ema)
        | clip_median
"""

from __future__ import annotations

import math

from . import ast
from .parser import parse

__all__ = ["format_module", "format_source", "format_expr", "format_selector", "MAX_WIDTH"]

#: Lines longer than this are split before each '|' of a top-level chain.
MAX_WIDTH = 88

# expression precedence, low to high
_CHAIN, _CMP, _SUM, _PRODUCT, _UNARY, _POWER, _POSTFIX, _ATOM = range(8)
# selector precedence, low to high
_S_OR, _S_AND, _S_NOT, _S_ATOM = range(4)

_BINOP_PREC = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "%": _PRODUCT, "**": _POWER,
               **{op: _CMP for op in ("<", "<=", ">", ">=", "==", "!=")}}


# ------------------------------------------------------------------------- leaves
def _format_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot format the non-finite number {value!r}")
    text = repr(value)  # shortest text that reads back as the same float
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"  # 1e-08 -> 1e-8, 1e+20 -> 1e20
    return text


def _format_number(value: int | float) -> str:
    if isinstance(value, bool):
        raise TypeError("a Num holds an int or a float, not a bool")
    if isinstance(value, int):
        return str(value)
    return _format_float(float(value))


def _quote(text: str) -> str:
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"')
               .replace("\n", "\\n").replace("\t", "\\t"))
    return f'"{escaped}"'


def _regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


# -------------------------------------------------------------------- expressions
def _prec(expr: object) -> int:
    if isinstance(expr, ast.Chain):
        return _CHAIN
    if isinstance(expr, ast.BinOp):
        return _BINOP_PREC[expr.op]
    if isinstance(expr, ast.Neg):
        return _UNARY
    if isinstance(expr, ast.Index):
        return _POSTFIX
    return _ATOM


def _expr(expr: object, min_prec: int) -> str:
    """``expr`` as text, parenthesised if it binds less tightly than ``min_prec``."""
    if isinstance(expr, ast.Num):
        text = _format_number(expr.value)
    elif isinstance(expr, ast.Bool):
        text = "true" if expr.value else "false"
    elif isinstance(expr, ast.Str):
        text = _quote(expr.value)
    elif isinstance(expr, ast.Name):
        text = expr.dotted
    elif isinstance(expr, ast.Call):
        text = _call(expr)
    elif isinstance(expr, ast.Chain):
        # a stage is a comparison in the grammar: a nested chain keeps its parentheses
        text = " | ".join([_expr(stage, _CMP) for stage in expr.stages])
    elif isinstance(expr, ast.BinOp):
        prec = _BINOP_PREC[expr.op]
        if expr.op == "**":  # right-associative: postfix ** unary
            left, right = _expr(expr.left, _POSTFIX), _expr(expr.right, _UNARY)
        elif prec == _CMP:  # non-associative: sum op sum
            left, right = _expr(expr.left, _SUM), _expr(expr.right, _SUM)
        else:  # left-associative
            left, right = _expr(expr.left, prec), _expr(expr.right, prec + 1)
        text = f"{left} {expr.op} {right}"
    elif isinstance(expr, ast.Neg):
        text = "-" + _expr(expr.operand, _UNARY)
    elif isinstance(expr, ast.Index):
        text = f"{_expr(expr.base, _POSTFIX)}[{expr.index}]"
    elif isinstance(expr, ast.Tuple):
        items = [_expr(item, _CHAIN) for item in expr.items]
        text = f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    else:
        raise TypeError(f"not an expression: {expr!r}")
    if _prec(expr) < min_prec:
        return f"({text})"
    return text


def _call(call: ast.Call) -> str:
    parts = [_expr(a, _CHAIN) for a in call.args]
    parts += [f"{k.name}={_expr(k.value, _CHAIN)}" for k in call.kwargs]
    text = call.func.dotted
    if parts or call.block is None:
        text += "(" + ", ".join(parts) + ")"
    if call.block is not None:
        text += " { " + _expr(call.block, _CHAIN) + " }"
    return text


def format_expr(expr: ast.Expr) -> str:
    """The canonical text of an expression (no surrounding parentheses)."""
    return _expr(expr, _CHAIN)


# ---------------------------------------------------------------------- selectors
def _sel(sel: object, min_prec: int) -> str:
    if isinstance(sel, ast.Glob):
        text, prec = _quote(sel.pattern), _S_ATOM
    elif isinstance(sel, ast.Regex):
        text, prec = _regex(sel.pattern), _S_ATOM
    elif isinstance(sel, ast.ShapePred):
        text, prec = f"{sel.attr} {sel.op} {sel.value}", _S_ATOM
    elif isinstance(sel, ast.Default):
        text, prec = "default", _S_ATOM
    elif isinstance(sel, ast.SelNot):
        text, prec = "not " + _sel(sel.operand, _S_NOT), _S_NOT
    elif isinstance(sel, ast.SelAnd):
        text, prec = f"{_sel(sel.left, _S_AND)} and {_sel(sel.right, _S_NOT)}", _S_AND
    elif isinstance(sel, ast.SelOr):
        text, prec = f"{_sel(sel.left, _S_OR)} or {_sel(sel.right, _S_AND)}", _S_OR
    else:
        raise TypeError(f"not a selector: {sel!r}")
    if prec < min_prec:
        return f"({text})"
    return text


def format_selector(sel: ast.Selector) -> str:
    """The canonical text of a route selector (no surrounding parentheses)."""
    return _sel(sel, _S_OR)


# --------------------------------------------------------------------- statements
def _pipeline_lines(prefix: str, expr: ast.Expr) -> list[str]:
    """``prefix + expr`` on one line, or split before each '|' when too long."""
    line = prefix + _expr(expr, _CHAIN)
    if len(line) <= MAX_WIDTH or not isinstance(expr, ast.Chain):
        return [line]
    first, *rest = expr.stages
    return [prefix + _expr(first, _CMP)] + ["  | " + _expr(stage, _CMP) for stage in rest]


def _stmt_lines(stmt: object) -> list[str]:
    if isinstance(stmt, ast.Import):
        text = f"import {_quote(stmt.path)}"
        if stmt.alias is not None:
            text += f" as {stmt.alias}"
        return [text]
    if isinstance(stmt, ast.HParam):
        text = f"hparam {stmt.name} = {_expr(stmt.default, _CHAIN)}"
        if stmt.low is not None or stmt.high is not None:
            if stmt.low is None or stmt.high is None:
                raise ValueError(f"hparam {stmt.name}: a range needs both bounds")
            lo = "[" if stmt.low_closed else "("
            hi = "]" if stmt.high_closed else ")"
            text += f" in {lo}{_expr(stmt.low, _CHAIN)}, {_expr(stmt.high, _CHAIN)}{hi}"
        return [text]
    if isinstance(stmt, ast.Let):
        return _pipeline_lines(f"let {stmt.name} = ", stmt.value)
    if isinstance(stmt, ast.Def):
        params = []
        for p in stmt.params:
            params.append(p.name if p.default is None else f"{p.name}={_expr(p.default, _CHAIN)}")
        return _pipeline_lines(f"def {stmt.name}({', '.join(params)}) = ", stmt.body)
    if isinstance(stmt, ast.Route):
        return _pipeline_lines(f"route {format_selector(stmt.selector)}: ", stmt.body)
    if isinstance(stmt, ast.Body):
        return _pipeline_lines("", stmt.expr)
    raise TypeError(f"not a statement: {stmt!r}")


def _comment_lines(comments: tuple[str, ...], out: list[str]) -> None:
    for comment in comments:
        for line in comment.split("\n"):
            line = line.strip()
            if not line:  # a paragraph break: at most one blank line, never at the top
                if out and out[-1] != "":
                    out.append("")
                continue
            out.append(line if line.startswith("#") else "# " + line)


def format_module(module: ast.Module) -> str:
    """The canonical text of a module: ``parse(format_module(m)) == m``."""
    out: list[str] = []
    for stmt in module.stmts:
        _comment_lines(getattr(stmt, "comments", ()), out)
        out.extend(_stmt_lines(stmt))
    _comment_lines(module.trailing_comments, out)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def format_source(source: str, path: str = "<string>") -> str:
    """Parse ``source`` and return its canonical text (raises GradError if it does not parse)."""
    return format_module(parse(source, path))
