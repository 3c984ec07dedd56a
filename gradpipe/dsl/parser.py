"""Parse `.grad` text into a :class:`~gradpipe.dsl.ast.Module`.

The grammar lives in ``grammar.lark`` (LALR(1)). A small post-lexer decides
where a newline ends a statement, so pipelines can span lines::

    grad
      | project_orthogonal(ema)
      | clip_median

Anything wrong with the text becomes a :class:`GradError` with a location;
pathological input (binary data, huge files, thousands of nested brackets) is
rejected up front so no RecursionError or MemoryError can escape.
"""

from __future__ import annotations

import functools
import math
import re
import pathlib
from typing import Iterator

import lark
from lark import Lark, Token, Transformer, v_args
from lark.lark import PostLex

from . import ast
from .diagnostics import GradError, Span

__all__ = ["parse", "parse_file", "read_source", "MAX_SOURCE_BYTES", "MAX_NESTING", "MAX_DEPTH"]

#: Larger files are refused: an optimizer definition is a few lines, and a
#: bounded size bounds parse time and memory.
MAX_SOURCE_BYTES = 1_000_000
#: Deeper bracket nesting is refused; it keeps every later pass well inside
#: Python's recursion limit.
MAX_NESTING = 64
#: Deeper syntax trees (e.g. ``1+1+...+1`` with hundreds of terms, or long
#: runs of ``-``/``not``) are refused for the same reason.
MAX_DEPTH = 200

#: Bidirectional embeddings, overrides and isolates ("Trojan Source", CVE-2021-42574):
#: in a comment or a string they can make a file read differently from what it means.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}
# A newline after one of these does not end the statement.
_CONTINUE_AFTER = {"VBAR", "PLUS", "MINUS", "STAR", "SLASH", "PERCENT", "POW", "CMP", "EQUAL", "COMMA",
                   "COLON", "AND", "OR", "NOT", "IN", "THEN"}


class _AlwaysAccept(PostLex):
    """The shared, stateless part of the post-lexer: lex newlines and comments in every parser state.

    The per-parse work happens in :class:`_Continuations`, which reads the
    token stream of one parse (see :func:`_parse_tree`).
    """

    always_accept = ("_NL", "COMMENT")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        return stream


class _Continuations:
    """One parse's post-lexer: drops newline tokens that do not end a statement,
    and takes the COMMENT tokens out of the stream into :attr:`comments`.

    The decision never looks at a later token (the contextual lexer lexes each
    token in the parser state left by the previous one), only at the raw text:
    a newline whose next non-blank, non-comment line starts with '|' continues
    the chain.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.comments: list[Token] = []

    def _next_line_starts_with_bar(self, pos: int) -> bool:
        src, n = self.source, len(self.source)
        while pos < n:
            ch = src[pos]
            if ch in " \t\f\r\n":
                pos += 1
            elif ch == "#":
                nl = src.find("\n", pos)
                pos = n if nl < 0 else nl
            else:
                return ch == "|"
        return False

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        prev_type: str | None = None
        for tok in stream:
            if tok.type == "COMMENT":
                self.comments.append(tok)
                continue
            if tok.type == "_NL":
                if (depth > 0 or prev_type in _CONTINUE_AFTER or prev_type in (None, "_NL")
                        or self._next_line_starts_with_bar(tok.end_pos)):
                    continue
            elif tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(0, depth - 1)
            prev_type = tok.type
            yield tok


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    """The LALR parser, built once; it holds no per-parse state, so threads share it.

    (Lark builds each parser state's scanner on first use; with no lexer
    callbacks that is idempotent, so two threads racing there only build it twice.)
    """
    grammar = (pathlib.Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=_AlwaysAccept(),
                propagate_positions=True, maybe_placeholders=True)


def _parse_tree(source: str) -> tuple[lark.Tree, list[Token]]:
    """Parse ``source`` into a Lark tree and its COMMENT tokens (raises Lark's errors).

    Lark's own parse loop would read the shared post-lexer; this one feeds the
    parser through a :class:`_Continuations` made for this parse alone.
    """
    interactive = _parser().parse_interactive(source)
    continuations = _Continuations(source)
    feed = interactive.parser_state.feed_token
    last: Token | None = None
    for last in continuations.process(interactive.lexer_thread.lex(interactive.parser_state)):
        feed(last)
    return interactive.feed_eof(last), continuations.comments


_TOKEN_WORDS = {
    "VBAR": "'|'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "COLON": "':'",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "PERCENT": "'%'", "POW": "'**'", "DOT": "'.'",
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "REGEX": "a /regex/", "CMP": "a comparison", "SHAPE_ATTR": "'ndim' or 'numel'",
    "_NL": "a new line", "$END": "the end of the file",
}


def _describe(types: set[str]) -> str:
    """The expected terminals in words; a keyword's terminal is named after it ('ROUTE' is 'route')."""
    types = types - {"COMMENT"}  # a comment is always allowed, never needed
    if len(types) > 1:
        types = types - {"_NL"}
    words = sorted({_TOKEN_WORDS.get(t, repr(t.lower()) if t.isupper() else t) for t in types})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _span_of(meta_or_tok, path: str, source: str) -> Span:
    line = getattr(meta_or_tok, "line", None) or 1
    col = getattr(meta_or_tok, "column", None) or 1
    end_line = getattr(meta_or_tok, "end_line", None) or line
    end_col = getattr(meta_or_tok, "end_column", None) or col + 1
    return Span(line, col, end_line, end_col, path, source)


def _unescape(s: str) -> str:
    body = s[1:-1]
    out, i = [], 0
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], "\\" + body[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _short(text: str) -> str:
    return text if len(text) <= 24 else text[:20] + "..."


def _to_int(text: str, span: Span) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise GradError(f"the number {_short(text)} has too many digits ({len(text):,})", span) from None


class _ToAst(Transformer):
    def __init__(self, path: str, source: str) -> None:
        super().__init__()
        self.path, self.source = path, source

    def _sp(self, meta) -> Span:
        return _span_of(meta, self.path, self.source)

    # statements ----------------------------------------------------------------
    @v_args(meta=True)
    def start(self, meta, items):
        return [i for i in items if i is not None]

    @v_args(meta=True)
    def import_stmt(self, meta, items):
        path_tok, alias = items
        return ast.Import(_unescape(path_tok), str(alias) if alias is not None else None, span=self._sp(meta))

    @v_args(meta=True)
    def hparam_stmt(self, meta, items):
        name, default, rng = items
        if rng is None:
            return ast.HParam(str(name), default, span=self._sp(meta))
        lo_closed, low, high, hi_closed = rng
        return ast.HParam(str(name), default, low, high, lo_closed, hi_closed, span=self._sp(meta))

    def hrange(self, items):
        return tuple(items)

    def closed(self, _):
        return True

    def open(self, _):
        return False

    @v_args(meta=True)
    def let_stmt(self, meta, items):
        return ast.Let(str(items[0]), items[1], span=self._sp(meta))

    @v_args(meta=True)
    def state_stmt(self, meta, items):
        return ast.State(str(items[0]), items[1], items[2], span=self._sp(meta))

    @v_args(meta=True)
    def def_stmt(self, meta, items):
        name, *params, body = items
        return ast.Def(str(name), tuple(p for p in params if p is not None), body, span=self._sp(meta))

    @v_args(meta=True)
    def def_param(self, meta, items):
        return ast.DefParam(str(items[0]), items[1], span=self._sp(meta))

    @v_args(meta=True)
    def route_stmt(self, meta, items):
        return ast.Route(items[0], items[1], span=self._sp(meta))

    @v_args(meta=True)
    def body_stmt(self, meta, items):
        return ast.Body(items[0], span=self._sp(meta))

    def _param_target(self, tok) -> None:
        """``NAME = ...`` as a statement: only ``param`` is assigned."""
        if str(tok) != "param":
            raise GradError(f"'{tok} = ...' assigns to '{tok}', but a statement can only assign 'param' "
                            "(the parameter's new value)", _span_of(tok, self.path, self.source),
                            f"to name a value, write 'let {tok} = ...'; for the new parameter, 'param = ...'")

    @v_args(meta=True)
    def param_stmt(self, meta, items):
        self._param_target(items[0])
        return ast.Body(items[1], span=self._sp(meta), param=True)

    @v_args(meta=True)
    def route_param_stmt(self, meta, items):
        self._param_target(items[1])
        return ast.Route(items[0], items[2], span=self._sp(meta), param=True)

    @v_args(meta=True)
    def mode_stmt(self, meta, items):
        mode, target, expr = items
        if str(mode) not in ("eval", "train"):
            raise GradError(f"'{mode}:' is not a statement", _span_of(mode, self.path, self.source),
                            "the sequences of Optimizer.eval() and .train() are written "
                            "'eval: param = ...' and 'train: param = ...'")
        self._param_target(target)
        return ast.Mode(str(mode), expr, span=self._sp(meta))

    # selectors -----------------------------------------------------------------
    @v_args(meta=True)
    def sel_or(self, meta, items):
        return ast.SelOr(items[0], items[1], span=self._sp(meta))

    @v_args(meta=True)
    def sel_and(self, meta, items):
        return ast.SelAnd(items[0], items[1], span=self._sp(meta))

    @v_args(meta=True)
    def sel_not(self, meta, items):
        return ast.SelNot(items[0], span=self._sp(meta))

    @v_args(meta=True)
    def glob(self, meta, items):
        return ast.Glob(_unescape(items[0]), span=self._sp(meta))

    @v_args(meta=True)
    def regex(self, meta, items):
        return ast.Regex(str(items[0])[1:-1].replace("\\/", "/"), span=self._sp(meta))

    @v_args(meta=True)
    def shape_pred(self, meta, items):
        return ast.ShapePred(str(items[0]), str(items[1]), _to_int(str(items[2]), self._sp(meta)),
                             span=self._sp(meta))

    @v_args(meta=True)
    def default(self, meta, items):
        return ast.Default(span=self._sp(meta))

    # expressions -----------------------------------------------------------------
    @v_args(meta=True)
    def chain(self, meta, items):
        return ast.Chain(tuple(items), span=self._sp(meta))

    def _bin(op):  # noqa: N805
        @v_args(meta=True)
        def f(self, meta, items):
            return ast.BinOp(op, items[0], items[1], span=self._sp(meta))
        return f

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    mod = _bin("%")
    pow = _bin("**")

    @v_args(meta=True)
    def compare(self, meta, items):
        return ast.BinOp(str(items[1]), items[0], items[2], span=self._sp(meta))

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(items[0], span=self._sp(meta))

    @v_args(meta=True)
    def index(self, meta, items):
        return ast.Index(items[0], _to_int(str(items[1]), self._sp(meta)), span=self._sp(meta))

    @v_args(meta=True)
    def number(self, meta, items):
        text = str(items[0])
        value: int | float
        if any(c in text for c in ".eE"):
            value = float(text)
            if not math.isfinite(value):
                raise GradError(f"the number {_short(text)} is too large", self._sp(meta),
                                "the largest number is about 1.8e308")
        else:
            value = _to_int(text, self._sp(meta))
        return ast.Num(value, span=self._sp(meta))

    @v_args(meta=True)
    def true(self, meta, items):
        return ast.Bool(True, span=self._sp(meta))

    @v_args(meta=True)
    def false(self, meta, items):
        return ast.Bool(False, span=self._sp(meta))

    @v_args(meta=True)
    def string(self, meta, items):
        return ast.Str(_unescape(items[0]), span=self._sp(meta))

    @v_args(meta=True)
    def tuple(self, meta, items):
        return ast.Tuple(tuple(i for i in items if i is not None), span=self._sp(meta))

    @v_args(meta=True)
    def dotted(self, meta, items):
        return ast.Name(tuple(str(i) for i in items), span=self._sp(meta))

    @v_args(meta=True)
    def call(self, meta, items):
        func, *rest = items
        block = None
        if rest and isinstance(rest[-1], _Block):
            block = rest.pop().expr
        args, kwargs = [], []
        for a in rest:
            if a is None:
                continue
            if isinstance(a, ast.Kwarg):
                kwargs.append(a)
            else:
                if kwargs:
                    raise GradError("a positional argument cannot follow a keyword argument",
                                    _span_of(_meta_of(a), self.path, self.source),
                                    "write the positional arguments first")
                args.append(a)
        seen: set[str] = set()
        for k in kwargs:
            if k.name in seen:
                raise GradError(f"argument '{k.name}' is given twice", k.span, "remove one of them")
            seen.add(k.name)
        return ast.Call(func, tuple(args), tuple(kwargs), block, span=self._sp(meta))

    def block(self, items):
        return _Block(items[0])

    @v_args(meta=True)
    def kwarg(self, meta, items):
        return ast.Kwarg(str(items[0]), items[1], span=self._sp(meta))


class _Block:
    def __init__(self, expr) -> None:
        self.expr = expr


def _meta_of(node):
    return node.span


def _precheck(source: str, path: str) -> None:
    """Reject input that no grammar should see: NUL bytes, huge files, deep nesting."""
    if len(source) > MAX_SOURCE_BYTES:
        raise GradError(f"file is too large ({len(source):,} characters; the limit is {MAX_SOURCE_BYTES:,})",
                        Span(1, 1, 1, 2, path, None),
                        "a pipeline is a few lines of text; is this the right file?")
    nul = source.find("\x00")
    if nul >= 0:
        line, col = _line_col(source, nul)
        raise GradError("file contains binary data (a NUL byte)", Span(line, col, line, col + 1, path, source),
                        "a .grad file is UTF-8 text")
    bidi = _BIDI.search(source)
    if bidi is not None:
        line, col = _line_col(source, bidi.start())
        raise GradError(f"file contains a Unicode bidirectional control character "
                        f"(U+{ord(bidi.group()):04X})", Span(line, col, line, col + 1, path, source),
                        "it can make the text display differently from how it is read; remove it")
    depth = 0
    for ch, line, col in _brackets(source):
        if ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                raise GradError(f"brackets are nested more than {MAX_NESTING} deep",
                                Span(line, col, line, col + 1, path, source),
                                "split the expression with 'let' bindings")
        else:
            depth = max(0, depth - 1)


def _line_col(source: str, pos: int) -> tuple[int, int]:
    """1-based line and column of offset ``pos`` (only '\\n' ends a line, as for the lexer)."""
    return source.count("\n", 0, pos) + 1, pos - (source.rfind("\n", 0, pos) + 1) + 1


def _brackets(source: str) -> Iterator[tuple[str, int, int]]:
    """Every bracket outside strings and comments, with its 1-based line and column."""
    line, col = 1, 0
    in_str = in_comment = escaped = False
    for ch in source:
        col += 1
        if ch == "\n":
            line, col, in_comment, in_str, escaped = line + 1, 0, False, False, False
            continue
        if in_comment:
            continue
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == "#":
            in_comment = True
        elif ch == '"':
            in_str = True
        elif ch in "([{)]}":
            yield ch, line, col


def _open_brackets(source: str) -> list[tuple[str, int, int]]:
    """The brackets still open at the end of ``source``, outermost first: (bracket, line, column)."""
    stack: list[tuple[str, int, int]] = []
    for ch, line, col in _brackets(source):
        if ch in "([{":
            stack.append((ch, line, col))
        elif stack:
            stack.pop()
    return stack


def _unclosed_before(source: str, pos: int) -> tuple[str, int, int] | None:
    """The innermost bracket still open at ``pos`` that the rest of the file never closes:
    (bracket, line, column), or None. (A bracket closed later, as in a call split over lines
    with a mistake inside, is not the problem.)"""
    before = _open_brackets(source[:pos])
    if not before or before[-1] not in _open_brackets(source):
        return None
    return before[-1]


def _end_span(path: str, source: str) -> Span:
    """Just after the last character of the last non-empty-ending line (lines end at '\\n' only,
    as the lexer counts them; a final newline does not start a line of its own)."""
    lines = source.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    last = lines[-1].rstrip("\r")
    return Span(len(lines), len(last) + 1, len(lines), len(last) + 2, path, source)


def _syntax_error(e: lark.exceptions.LarkError, path: str, source: str) -> GradError:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        span = Span(e.line, e.column, e.line, e.column + 1, path, source)
        ch = source[e.pos_in_stream] if 0 <= e.pos_in_stream < len(source) else "?"
        hint = None
        if ch == "'":
            hint = 'strings use double quotes: "..."'
        elif ch == ";":
            hint = "statements end at the end of the line; no ';' is needed"
        elif e.allowed:
            hint = f"expected {_describe(set(e.allowed))}"
        return GradError(f"unexpected character {ch!r}", span, hint)
    if isinstance(e, lark.exceptions.UnexpectedEOF):
        return GradError("unexpected end of file", _end_span(path, source), f"expected {_describe(set(e.expected))}")
    if isinstance(e, lark.exceptions.UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            span = _end_span(path, source)
            hint = f"expected {_describe(set(e.expected))}"
            # newlines inside brackets are skipped, so an unclosed bracket shows up here
            openers = [o for c, o in (("RPAR", "'('"), ("RSQB", "'['"), ("RBRACE", "'{'")) if c in e.expected]
            if openers:
                what = f"a {openers[0]}" if len(openers) == 1 else "a bracket"
                hint = f"{what} is not closed; {hint}"
            return GradError("unexpected end of file", span, hint)
        line = tok.line or 1
        col = tok.column or 1
        if tok.type == "_NL":  # report the end of the unfinished line
            span = Span(line, col, line, col + 1, path, source)
            what = "end of line"
        else:
            span = Span(line, col, tok.end_line or line, tok.end_column or col + 1, path, source)
            what = repr(str(tok))
        hint = f"expected {_describe(set(e.expected))}"
        if tok.type == "CMP" and "CMP" not in e.expected and "PLUS" in e.expected:  # after 'a < b
            hint = ("comparisons do not chain ('a < b < c' means nothing): compare two values, and put "
                    "parentheses around a comparison used as an operand; " + hint)
        opener = _unclosed_before(source, tok.start_pos if tok.start_pos is not None else 0)
        if opener is not None and opener[1] < line:
            hint = f"the '{opener[0]}' on line {opener[1]}, column {opener[2]} is not closed; " + hint
        elif tok.type == "_NL" and "RPAR" in e.expected:
            hint = "a '(' is not closed; " + hint
        return GradError(f"unexpected {what}", span, hint)
    return GradError(f"syntax error: {e}", Span(1, 1, 1, 2, path, source))


def parse(source: str, path: str = "<string>") -> ast.Module:
    """Parse ``source`` into a Module, or raise :class:`GradError`."""
    if not isinstance(source, str):
        raise TypeError(f"parse() expects str, got {type(source).__name__}")
    _precheck(source, path)
    try:
        tree, comment_toks = _parse_tree(source)
    except lark.exceptions.LarkError as e:
        raise _syntax_error(e, path, source) from None
    _check_depth(tree, path, source)
    try:
        stmts = _ToAst(path, source).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, GradError):
            raise e.orig_exc from None
        raise
    comments = {tok.line: str(tok).rstrip() for tok in comment_toks}
    stmts, trailing = _attach_comments(stmts, source, comments)
    return ast.Module(tuple(stmts), path=path, source=source, trailing_comments=trailing)


def _check_depth(tree: lark.Tree, path: str, source: str) -> None:
    """Refuse syntax trees deeper than MAX_DEPTH (iteratively, before any recursive pass)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise GradError(f"the expression is nested more than {MAX_DEPTH} levels deep",
                            _span_of(node.meta, path, source),
                            "split the expression with 'let' bindings")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, lark.Tree))


def _attach_comments(stmts: list, source: str,
                     comments: dict[int, str]) -> tuple[list, tuple[str, ...]]:
    """Give each statement the comments that precede it or sit inside its lines.

    ``comments`` maps a line number to the comment on that line, as the lexer
    found it (so a '#' inside a string or a /regex/ is never a comment).
    A blank line in front of a statement is kept as an empty-string marker so
    the formatter can preserve paragraph breaks.
    """
    import dataclasses
    # Lines as the lexer counts them: only '\n' ends a line.
    lines = source.split("\n")
    blank: set[int] = set()
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            blank.add(i)
    out = []
    prev_end = 0
    for s in stmts:
        start, end = s.span.line, s.span.end_line
        attached: list[str] = []
        for ln in range(prev_end + 1, end + 1):
            if ln in blank and ln < start and attached != [""] and (attached or out):
                if not attached or attached[-1] != "":
                    attached.append("")
            if ln in comments:
                attached.append(comments[ln])
        # a comment on the last line of the statement stays a trailing comment
        out.append(dataclasses.replace(s, comments=tuple(attached)))
        prev_end = end
    trailing: list[str] = []
    for ln in range(prev_end + 1, len(lines) + 1):
        if ln in blank and trailing and trailing[-1] != "":
            trailing.append("")
        if ln in comments:
            if ln - 1 in blank and out and not trailing:
                trailing.append("")
            trailing.append(comments[ln])
    while trailing and trailing[-1] == "":
        trailing.pop()
    return out, tuple(trailing)


def read_source(path: str | pathlib.Path) -> str:
    """Read a `.grad` file as UTF-8 text; every failure is a GradError."""
    p = pathlib.Path(path)
    where = Span(1, 1, 1, 2, str(path), None)
    try:
        if p.is_dir():
            raise GradError(f"'{path}' is a directory, not a .grad file", where)
        size = p.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise GradError(f"file is too large ({size:,} bytes; the limit is {MAX_SOURCE_BYTES:,})", where,
                            "a pipeline is a few lines of text; is this the right file?")
        data = p.read_bytes()
    except FileNotFoundError:
        raise GradError(f"no such file: '{path}'", where, "check the path (it is relative to the current directory)") from None
    except PermissionError:
        raise GradError(f"cannot read '{path}': permission denied", where) from None
    except OSError as e:
        raise GradError(f"cannot read '{path}': {e.strerror or e}", where) from None
    if b"\x00" in data:
        raise GradError("file contains binary data (a NUL byte)", where, "a .grad file is UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise GradError("file is not valid UTF-8 text", Span(line, col, line, col + 1, str(path), None),
                        "a .grad file is UTF-8 text") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def parse_file(path: str | pathlib.Path) -> ast.Module:
    """Read and parse a `.grad` file."""
    return parse(read_source(path), str(path))
