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
  whose pipeline is a chain is split before each ``|`` (the stages themselves
  stay whole)::

      route ndim >= 2: grad
        | project_orthogonal(ema)
        | clip_median

* any other statement longer than :data:`MAX_WIDTH` is broken after the binary
  operators of its lowest-precedence level (``a * b +`` / ``c * d``), filling
  each line as far as it goes; continuation lines are indented 4 columns more
  than the line the broken expression starts on. A piece that still does not
  fit is broken the same way, one level down: a call or tuple after the commas
  inside its parentheses, a block inside its braces, a parenthesised
  expression inside its parentheses, a chain inside brackets before each
  ``|``. A single token longer than the limit stays whole. Every break is one
  the parser reads as a continuation (after an operator or a comma, inside
  brackets, before a ``|``), so the text parses back to the same module::

      let update = lr * grad_scale * momentum_coefficient + weight_decay * param +
          noise_multiplier * sigma * gaussian_noise
"""

from __future__ import annotations

import math

from . import ast
from .parser import parse

__all__ = ["format_module", "format_source", "format_expr", "format_selector", "MAX_WIDTH"]

#: Lines longer than this are split (see the module docstring for where).
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


# ------------------------------------------------------------------ line breaking
_INDENT = "    "


def _fits(text: str) -> bool:
    return len(text) <= MAX_WIDTH


def _broken(expr: object, min_prec: int, head: str, base: str, tail: str) -> list[str]:
    """``head + expr + tail`` as lines no longer than MAX_WIDTH where the expression allows.

    ``head`` is the text before the expression on its first line, ``tail`` the
    text after it on its last line; ``base`` is the indentation of the line the
    expression starts on (its continuation lines get 4 more columns). Every
    break is a legal continuation: after a binary operator or a comma, inside
    brackets, or before a '|'.
    """
    flat = head + _expr(expr, min_prec) + tail
    if _fits(flat):
        return [flat]
    if _prec(expr) < min_prec:  # break inside the parentheses
        return _broken(expr, _CHAIN, head + "(", base, ")" + tail)
    if isinstance(expr, ast.BinOp):
        return _fill(head, _operands(expr), base + _INDENT, tail)
    if isinstance(expr, ast.Call):
        return _call_lines(expr, head, base, tail)
    if isinstance(expr, ast.Tuple):
        items = [("", item, _CHAIN, ",") for item in expr.items]
        items[-1] = ("", expr.items[-1], _CHAIN, ",)" if len(items) == 1 else ")")
        return _fill(head + "(", items, base + _INDENT, tail)
    if isinstance(expr, ast.Neg):
        return _broken(expr.operand, _UNARY, head + "-", base, tail)
    if isinstance(expr, ast.Index):
        return _broken(expr.base, _POSTFIX, head, base, f"[{expr.index}]" + tail)
    if isinstance(expr, ast.Chain):  # one stage a line, the next lines starting with '|'
        stage_base = base + _INDENT
        stages = expr.stages
        lines = _broken(stages[0], _CMP, head, stage_base, "")
        for i, stage in enumerate(stages[1:], 1):
            lines += _broken(stage, _CMP, base + "  | ", stage_base, tail if i == len(stages) - 1 else "")
        return lines
    return [flat]  # an atom: nothing to break


def _operands(expr: ast.BinOp) -> list[tuple[str, object, int, str]]:
    """The operands of ``expr``'s precedence level as :func:`_fill` items: (lead, operand,
    min_prec, trail), the trail being the operator that follows the operand."""
    prec = _BINOP_PREC[expr.op]
    if expr.op == "**":  # right-associative: postfix ** postfix ** ... ** unary
        items: list[tuple[str, object, int, str]] = []
        node: object = expr
        while isinstance(node, ast.BinOp) and node.op == "**":
            items.append(("", node.left, _POSTFIX, " **"))
            node = node.right
        return items + [("", node, _UNARY, "")]
    if prec == _CMP:  # non-associative: sum op sum
        return [("", expr.left, _SUM, " " + expr.op), ("", expr.right, _SUM, "")]
    rights: list[tuple[str, object]] = []  # left-associative: walk down the left spine
    node = expr
    while isinstance(node, ast.BinOp) and _BINOP_PREC[node.op] == prec:
        rights.append((node.op, node.right))
        node = node.left
    rights.reverse()
    items = [("", node, prec, " " + rights[0][0])]
    for i, (_, right) in enumerate(rights):
        items.append(("", right, prec + 1, " " + rights[i + 1][0] if i + 1 < len(rights) else ""))
    return items


def _fill(head: str, items: list[tuple[str, object, int, str]], cont: str, tail: str) -> list[str]:
    """Items (lead, expr, min_prec, trail) one after another, as many on a line as fit,
    ``tail`` after the last one.

    The first item goes on the ``head`` line; a new line starts with ``cont``.
    An item that does not fit even on a line of its own is broken itself, and
    the item after it starts a new line.
    """
    lines: list[str] = []
    cur = head
    after_broken = False
    for i, (lead, expr, min_prec, trail) in enumerate(items):
        if i == len(items) - 1:
            trail += tail
        text = lead + _expr(expr, min_prec) + trail
        if i == 0:
            if _fits(cur + text):
                cur += text
                continue
        elif not after_broken and _fits(cur + " " + text):
            cur += " " + text
            continue
        else:
            lines.append(cur)
            cur = cont
            if _fits(cur + text):
                cur += text
                continue
        *done, cur = _broken(expr, min_prec, cur + lead, cont, trail)
        lines += done
        after_broken = bool(done)
    lines.append(cur)
    return lines


def _call_lines(call: ast.Call, head: str, base: str, tail: str) -> list[str]:
    """A call that does not fit: its arguments broken after commas, then its block inside the braces."""
    items = [("", a, _CHAIN, ",") for a in call.args]
    items += [(f"{k.name}=", k.value, _CHAIN, ",") for k in call.kwargs]
    if not items:
        if call.block is None:  # f(): nothing to break
            return [head + _expr(call, _ATOM) + tail]
        return _broken(call.block, _CHAIN, head + call.func.dotted + " { ", base, " }" + tail)
    lead, expr, min_prec, _ = items[-1]
    items[-1] = (lead, expr, min_prec, ")")
    if call.block is None:
        return _fill(head + call.func.dotted + "(", items, base + _INDENT, tail)
    *lines, last = _fill(head + call.func.dotted + "(", items, base + _INDENT, "")
    block = " { " + _expr(call.block, _CHAIN) + " }"
    if _fits(last + block + tail):
        return lines + [last + block + tail]
    return lines + _broken(call.block, _CHAIN, last + " { ", base, " }" + tail)


# --------------------------------------------------------------------- statements
def _pipeline_lines(prefix: str, expr: ast.Expr) -> list[str]:
    """``prefix + expr`` on one line, or split when too long: a chain before each '|',
    anything else after operators and commas (see :func:`_broken`)."""
    line = prefix + _expr(expr, _CHAIN)
    if _fits(line):
        return [line]
    if not isinstance(expr, ast.Chain):
        return _broken(expr, _CHAIN, prefix, "", "")
    first, *rest = expr.stages
    return [prefix + _expr(first, _CMP)] + ["  | " + _expr(stage, _CMP) for stage in rest]


def _stmt_lines(stmt: object) -> list[str]:
    if isinstance(stmt, ast.Import):
        text = f"import {_quote(stmt.path)}"
        if stmt.alias is not None:
            text += f" as {stmt.alias}"
        return [text]
    if isinstance(stmt, ast.HParam):
        head, rng = f"hparam {stmt.name} = ", ""
        if stmt.low is not None or stmt.high is not None:
            if stmt.low is None or stmt.high is None:
                raise ValueError(f"hparam {stmt.name}: a range needs both bounds")
            lo = "[" if stmt.low_closed else "("
            hi = "]" if stmt.high_closed else ")"
            rng = f" in {lo}{_expr(stmt.low, _CHAIN)}, {_expr(stmt.high, _CHAIN)}{hi}"
        return _broken(stmt.default, _CHAIN, head, "", rng)
    if isinstance(stmt, ast.Let):
        return _pipeline_lines(f"let {stmt.name} = ", stmt.value)
    if isinstance(stmt, ast.State):
        return _pipeline_lines(f"state {stmt.name} = {_expr(stmt.init, _CHAIN)} then ", stmt.update)
    if isinstance(stmt, ast.Def):
        params = []
        for p in stmt.params:
            params.append(p.name if p.default is None else f"{p.name}={_expr(p.default, _CHAIN)}")
        return _pipeline_lines(f"def {stmt.name}({', '.join(params)}) = ", stmt.body)
    if isinstance(stmt, ast.Route):
        return _pipeline_lines(f"route {format_selector(stmt.selector)}: " + ("param = " if stmt.param else ""),
                               stmt.body)
    if isinstance(stmt, ast.Body):
        return _pipeline_lines("param = " if stmt.param else "", stmt.expr)
    if isinstance(stmt, ast.Mode):
        return _pipeline_lines(f"{stmt.mode}: param = ", stmt.expr)
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
