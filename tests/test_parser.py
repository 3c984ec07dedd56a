"""Targeted tests of the `.grad` parser: every construct, layout, comments, errors."""

from __future__ import annotations

import sys
import threading

import pytest


from gradpipe.dsl import ast
from gradpipe.dsl.ast import (
    BinOp, Body, Bool, Call, Chain, Def, DefParam, Default, Glob, HParam, Import, Index, Kwarg,
    Let, Module, Name, Neg, Num, Regex, Route, SelAnd, SelNot, SelOr, ShapePred, Str, Tuple,
)
from gradpipe.dsl.diagnostics import GradError
from gradpipe.dsl.parser import _TOKEN_WORDS, MAX_SOURCE_BYTES, _describe, _parser, parse, parse_file, read_source


def N(*parts: str) -> Name:
    return Name(tuple(parts))


def expr(src: str):
    """The expression of a one-statement body."""
    m = parse(src)
    assert len(m.stmts) == 1 and isinstance(m.stmts[0], Body), m.stmts
    return m.stmts[0].expr


def sel(src: str):
    m = parse(f"route {src}: grad")
    return m.stmts[0].selector


def error(src: str) -> GradError:
    with pytest.raises(GradError) as info:
        parse(src)
    return info.value


# ------------------------------------------------------------------------ statements
class TestStatements:
    def test_import(self):
        assert parse('import "lib/common.grad"').stmts == (Import("lib/common.grad"),)
        assert parse('import "lib/common.grad" as lib').stmts == (Import("lib/common.grad", "lib"),)

    def test_hparam_without_range(self):
        assert parse("hparam lr = 0.001").stmts == (HParam("lr", Num(0.001)),)

    @pytest.mark.parametrize("lo,hi,lo_closed,hi_closed", [
        ("[", "]", True, True), ("[", ")", True, False), ("(", "]", False, True), ("(", ")", False, False),
    ])
    def test_hparam_ranges(self, lo, hi, lo_closed, hi_closed):
        m = parse(f"hparam b1 = 0.9 in {lo}0, 1{hi}")
        assert m.stmts == (HParam("b1", Num(0.9), Num(0), Num(1), lo_closed, hi_closed),)

    def test_hparam_tuple_default_and_expression_bounds(self):
        m = parse("hparam betas = (0.9, 0.999)\nhparam k = 2 in [1, 2 ** 10]")
        assert m.stmts == (
            HParam("betas", Tuple((Num(0.9), Num(0.999)))),
            HParam("k", Num(2), Num(1), BinOp("**", Num(2), Num(10))),
        )

    def test_let(self):
        assert parse("let m = grad | ema(0.9)").stmts == (
            Let("m", Chain((N("grad"), Call(N("ema"), (Num(0.9),))))),)

    def test_def(self):
        assert parse("def f() = grad").stmts == (Def("f", (), N("grad")),)
        assert parse("def scaled(x, k=2,) = x * k").stmts == (
            Def("scaled", (DefParam("x"), DefParam("k", Num(2))), BinOp("*", N("x"), N("k"))),)

    def test_route_and_body(self):
        m = parse("route ndim >= 2: grad | sign\nroute default: grad")
        assert m.stmts == (
            Route(ShapePred("ndim", ">=", 2), Chain((N("grad"), N("sign")))),
            Route(Default(), N("grad")),
        )
        assert parse("grad | adam").stmts == (Body(Chain((N("grad"), N("adam")))),)

    def test_statement_spans(self):
        m = parse("\nlet x = 1\n  route default: x")
        assert (m.stmts[0].span.line, m.stmts[0].span.column) == (2, 1)
        assert (m.stmts[1].span.line, m.stmts[1].span.column) == (3, 3)
        assert m.stmts[1].span.path == "<string>"

    def test_module_keeps_path_and_source(self):
        m = parse("grad\n", "opt.grad")
        assert m.path == "opt.grad" and m.source == "grad\n"
        assert m.stmts[0].span.path == "opt.grad"


# ------------------------------------------------------------------------ selectors
class TestSelectors:
    def test_atoms(self):
        assert sel('"*.bias"') == Glob("*.bias")
        assert sel(r"/\.bias$/") == Regex(r"\.bias$")
        assert sel(r"/a\/b/") == Regex("a/b")  # '\/' is how a regex spells '/'
        assert sel("default") == Default()

    @pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
    def test_shape_predicates(self, op):
        assert sel(f"numel {op} 1000") == ShapePred("numel", op, 1000)

    def test_precedence(self):
        a, b, c = Glob("a"), Glob("b"), Glob("c")
        assert sel('"a" or "b" and not "c"') == SelOr(a, SelAnd(b, SelNot(c)))
        assert sel('not "a" and "b" or "c"') == SelOr(SelAnd(SelNot(a), b), c)
        assert sel('"a" or "b" or "c"') == SelOr(SelOr(a, b), c)
        assert sel('"a" and "b" and "c"') == SelAnd(SelAnd(a, b), c)
        assert sel('("a" or "b") and "c"') == SelAnd(SelOr(a, b), c)
        assert sel('"a" or ("b" or "c")') == SelOr(a, SelOr(b, c))
        assert sel('not not "a"') == SelNot(SelNot(a))
        assert sel('not ("a" or "b")') == SelNot(SelOr(a, b))

    def test_hash_inside_regex_or_glob_is_not_a_comment(self):
        m = parse('route /a#b/ or "c#d": grad  # real')
        assert m.stmts[0].selector == SelOr(Regex("a#b"), Glob("c#d"))
        assert m.stmts[0].comments == ("# real",)


# ---------------------------------------------------------------------- expressions
class TestExpressions:
    @pytest.mark.parametrize("text,value", [
        ("0", 0), ("42", 42), ("1.5", 1.5), (".5", 0.5), ("1.", 1.0), ("1e3", 1000.0),
        ("1E-3", 0.001), ("2.5e+2", 250.0), ("123456789012345678901234567890", 123456789012345678901234567890),
    ])
    def test_numbers(self, text, value):
        e = expr(text)
        assert e == Num(value) and type(e.value) is type(value)

    def test_literals(self):
        assert expr("true") == Bool(True)
        assert expr("false") == Bool(False)
        assert expr(r'"a\"b\\c\nd\te"') == Str('a"b\\c\nd\te')
        assert expr(r'"\q"') == Str("\\q")  # an unknown escape is kept as written
        assert expr('""') == Str("")

    def test_names(self):
        assert expr("grad") == N("grad")
        assert expr("grads.main") == N("grads", "main")
        assert expr("lib.sub.helper") == N("lib", "sub", "helper")

    def test_calls(self):
        assert expr("f()") == Call(N("f"))
        assert expr("f(1, x, k=2, j=y)") == Call(N("f"), (Num(1), N("x")),
                                                (Kwarg("k", Num(2)), Kwarg("j", N("y"))))
        assert expr("f(1,)") == Call(N("f"), (Num(1),))
        assert expr("lib.f(x)") == Call(N("lib", "f"), (N("x"),))
        assert expr("f { grad | sign }") == Call(N("f"), block=Chain((N("grad"), N("sign"))))
        assert expr("f(2) { g }") == Call(N("f"), (Num(2),), block=N("g"))
        assert expr("f(k=1) { g }") == Call(N("f"), (), (Kwarg("k", Num(1)),), N("g"))
        assert expr("f(grad | sign)") == Call(N("f"), (Chain((N("grad"), N("sign"))),))

    def test_arithmetic_precedence_and_associativity(self):
        a, b, c = N("a"), N("b"), N("c")
        assert expr("a + b * c") == BinOp("+", a, BinOp("*", b, c))
        assert expr("(a + b) * c") == BinOp("*", BinOp("+", a, b), c)
        assert expr("a - b - c") == BinOp("-", BinOp("-", a, b), c)
        assert expr("a - (b - c)") == BinOp("-", a, BinOp("-", b, c))
        assert expr("a / b * c") == BinOp("*", BinOp("/", a, b), c)
        assert expr("a ** b ** c") == BinOp("**", a, BinOp("**", b, c))
        assert expr("(a ** b) ** c") == BinOp("**", BinOp("**", a, b), c)
        assert expr("1 - b1") == BinOp("-", Num(1), N("b1"))

    def test_unary_minus(self):
        assert expr("-x") == Neg(N("x"))
        assert expr("--x") == Neg(Neg(N("x")))
        assert expr("-2 ** 2") == Neg(BinOp("**", Num(2), Num(2)))  # like Python
        assert expr("(-2) ** 2") == BinOp("**", Neg(Num(2)), Num(2))
        assert expr("2 ** -1") == BinOp("**", Num(2), Neg(Num(1)))
        assert expr("a - -b") == BinOp("-", N("a"), Neg(N("b")))
        assert expr("a * -b") == BinOp("*", N("a"), Neg(N("b")))
        assert expr("-a * b") == BinOp("*", Neg(N("a")), N("b"))
        assert expr("-x[0]") == Neg(Index(N("x"), 0))

    def test_index(self):
        assert expr("betas[0]") == Index(N("betas"), 0)
        assert expr("x[0][12]") == Index(Index(N("x"), 0), 12)
        assert expr("f(x)[1]") == Index(Call(N("f"), (N("x"),)), 1)
        assert expr("(a + b)[0]") == Index(BinOp("+", N("a"), N("b")), 0)
        assert expr("x[1] ** 2") == BinOp("**", Index(N("x"), 1), Num(2))

    def test_tuples(self):
        assert expr("(1, 2)") == Tuple((Num(1), Num(2)))
        assert expr("(1, 2,)") == Tuple((Num(1), Num(2)))
        assert expr("(1,)") == Tuple((Num(1),))
        assert expr("(1)") == Num(1)  # parentheses alone make no tuple

    def test_chains(self):
        a, b, c = N("a"), N("b"), N("c")
        assert expr("a | b | c") == Chain((a, b, c))
        assert expr("a | (b | c)") == Chain((a, Chain((b, c))))
        assert expr("(a | b) | c") == Chain((Chain((a, b)), c))
        assert expr("a + 1 | b * 2") == Chain((BinOp("+", a, Num(1)), BinOp("*", b, Num(2))))

    def test_comparisons_and_modulo(self):
        a, b, c = N("a"), N("b"), N("c")
        for op in ("<", "<=", ">", ">=", "==", "!="):
            assert expr(f"a {op} b") == BinOp(op, a, b)
        # below + -, above |; % binds like * and /
        assert expr("a + 1 < b * 2") == BinOp("<", BinOp("+", a, Num(1)), BinOp("*", b, Num(2)))
        assert expr("a | b > 0") == Chain((a, BinOp(">", b, Num(0))))
        assert expr("step % 2 == 0") == BinOp("==", BinOp("%", N("step"), Num(2)), Num(0))
        assert expr("a * b % c") == BinOp("%", BinOp("*", a, b), c)
        assert expr("a % b ** c") == BinOp("%", a, BinOp("**", b, c))
        assert expr("(a < b) == c") == BinOp("==", BinOp("<", a, b), c)
        assert expr("a==b") == BinOp("==", a, b)
        assert expr("f(k=a == b)") == Call(N("f"), (), (Kwarg("k", BinOp("==", a, b)),))
        assert expr("a <\n b") == BinOp("<", a, b)  # a newline after an operator continues the line

    @pytest.mark.parametrize("src", ["a < b < c", "a == b != c", "a < b <= c | d"])
    def test_comparisons_do_not_chain(self, src):
        with pytest.raises(GradError) as e:
            parse(src)
        assert "comparisons do not chain" in e.value.hint and e.value.line == 1

    def test_route_selectors_keep_their_comparisons(self):
        m = parse("route ndim >= 2 and numel<10: grad | where(grad >= 0, ndim, numel)\nroute default: grad")
        assert m.stmts[0].selector == SelAnd(ShapePred("ndim", ">=", 2), ShapePred("numel", "<", 10))
        assert m.stmts[0].body == Chain((N("grad"), Call(N("where"), (BinOp(">=", N("grad"), Num(0)),
                                                                      N("ndim"), N("numel")))))

    def test_every_node_is_reached_by_walk(self):
        e = expr("f(a, k=-b[0]) { c | d }")
        kinds = {type(n).__name__ for n in ast.walk(e)}
        assert kinds == {"Call", "Name", "Kwarg", "Neg", "Index", "Chain"}


# ------------------------------------------------------------------------- layout
class TestLayout:
    def test_multiline_chain_with_comments_between_stages(self):
        src = (
            "# the optimizer\n"
            "grad\n"
            "  # orthogonalise first\n"
            "  | project_orthogonal(ema)\n"
            "\n"
            "  # then clip\n"
            "  | clip_median\n"
        )
        m = parse(src)
        assert m.stmts == (Body(Chain((N("grad"), Call(N("project_orthogonal"), (N("ema"),)),
                                       N("clip_median")))),)
        assert m.stmts[0].comments == ("# the optimizer", "# orthogonalise first", "# then clip")
        assert m.trailing_comments == ()

    def test_trailing_bar_continues_the_line(self):
        assert parse("route default: grad |\n  sign |\n  adam").stmts == (
            Route(Default(), Chain((N("grad"), N("sign"), N("adam")))),)

    def test_newlines_inside_brackets_and_after_operators(self):
        m = parse("let x = f(\n  1,\n  k=2\n)\nlet y = 1 +\n  2\nlet z =\n  3")
        assert m.stmts == (
            Let("x", Call(N("f"), (Num(1),), (Kwarg("k", Num(2)),))),
            Let("y", BinOp("+", Num(1), Num(2))),
            Let("z", Num(3)),
        )

    def test_multiline_selector(self):
        m = parse('route "a" or\n  "b" and\n  not "c":\n  grad')
        assert m.stmts[0].selector == SelOr(Glob("a"), SelAnd(Glob("b"), SelNot(Glob("c"))))

    def test_crlf_and_blank_lines(self):
        m = parse("let a = 1\r\n\r\n\r\nlet b = 2\r\n")
        assert m.stmts == (Let("a", Num(1)), Let("b", Num(2)))
        assert m.stmts[1].comments == ("",)

    def test_comments_and_blank_markers(self):
        src = (
            "# header\n"
            "\n"
            "import \"x.grad\"  # why\n"
            "let a = 1\n"
            "\n"
            "\n"
            "# about b\n"
            "let b = 2\n"
            "\n"
            "# the end\n"
        )
        m = parse(src)
        assert [s.comments for s in m.stmts] == [("# header", "", "# why"), (), ("", "# about b")]
        assert m.trailing_comments == ("", "# the end")

    def test_hash_in_string_is_not_a_comment(self):
        m = parse('f("#x", "\\\\")  # c\nlet y = 1')
        assert m.stmts[0].expr == Call(N("f"), (Str("#x"), Str("\\")))
        assert m.stmts[0].comments == ("# c",)
        assert m.stmts[1].comments == ()

    def test_empty_and_comment_only_sources(self):
        assert parse("") == Module(())
        assert parse("").stmts == ()
        assert parse("\n\n   \n").stmts == ()
        m = parse("# only a comment\n\n# and another\n")
        assert m.stmts == () and m.trailing_comments == ("# only a comment", "", "# and another")


# -------------------------------------------------------------------------- errors
class TestSyntaxErrors:
    @pytest.mark.parametrize("src,line,column,message", [
        ("x = 1", 1, 1, "'x = ...' assigns to 'x', but a statement can only assign 'param' (the parameter's new value)"),
        ("route default: x = 1", 1, 16, "'x = ...' assigns to 'x', but a statement can only assign 'param' "
                                        "(the parameter's new value)"),
        ("ev: param = 1", 1, 1, "'ev:' is not a statement"),
        ("let = 1", 1, 5, "unexpected '='"),
        ("route ndim >= 2 grad", 1, 17, "unexpected 'grad'"),
        ("grad |\n| sign", 2, 1, "unexpected '|'"),
        ("let x = 1\n  let x = 1 2", 2, 13, "unexpected '2'"),
        ("f(x))", 1, 5, "unexpected ')'"),
        ("route: grad", 1, 6, "unexpected ':'"),
        ("grad @ x", 1, 6, "unexpected character '@'"),
        ("let x = 1 +", 1, 12, "unexpected end of file"),
        ("f(k=1, 2)", 1, 8, "a positional argument cannot follow a keyword argument"),
        ("f(k=1, k=2)", 1, 8, "argument 'k' is given twice"),
    ])
    def test_location(self, src, line, column, message):
        e = error(src)
        assert (e.line, e.column, e.message) == (line, column, message)
        assert e.path == "<string>"
        assert f"<string>:{line}:{column}: error: {message}" in str(e)

    def test_unterminated_paren(self):
        e = error("grad | f(x,\n  y")
        assert (e.line, e.column, e.message) == (2, 4, "unexpected end of file")
        assert "'(' is not closed" in e.hint
        e = error("f(x\n\nlet y = 1")  # the newlines are inside the '(' ...
        assert (e.line, e.column) == (3, 1)
        assert error("f { x").hint.startswith("a '{' is not closed")

    def test_single_quotes_hint(self):
        e = error("route default: f('adam')")
        assert (e.line, e.column) == (1, 18)
        assert e.hint == 'strings use double quotes: "..."'

    def test_semicolon_hint(self):
        assert "no ';' is needed" in error("grad;").hint

    def test_deeply_nested_parentheses(self):
        e = error("(" * 1000 + "x" + ")" * 1000)  # a GradError, not a RecursionError
        assert "nested" in e.message and (e.line, e.column) == (1, 65)
        e = error("f(" * 1000 + "x" + ")" * 1000)
        assert "nested" in e.message

    def test_brackets_in_strings_do_not_count_as_nesting(self):
        deep = "(" * 100
        assert expr(f'f("{deep}", "\\"{deep}")') == Call(N("f"), (Str(deep), Str('"' + deep)))
        assert "nested" in error('"\\"" ' + "f(" * 1000 + ")" * 1000).message

    @pytest.mark.parametrize("src", [
        "+".join(["1"] * 2000),
        "-" * 2000 + "x",
        "2" + " ** 2" * 2000,
        "route " + "not " * 2000 + "default: grad",
        "x" + "[0]" * 2000,
    ])
    def test_deeply_nested_operators(self, src):
        assert "nested" in error(src).message  # a GradError, not a RecursionError

    def test_numbers_out_of_range(self):
        e = error("let x = 1e999")
        assert (e.line, e.column) == (1, 9) and "too large" in e.message
        assert "too many digits" in error("9" * 5000).message
        assert "too many digits" in error("x[" + "9" * 5000 + "]").message

    def test_nul_byte(self):
        e = error("let x = 1\nlet\x00 y = 2")
        assert (e.line, e.column) == (2, 4)
        assert "NUL" in e.message

    def test_source_too_large(self):
        e = error("#" * (MAX_SOURCE_BYTES + 1))
        assert "too large" in e.message

    def test_not_a_string(self):
        with pytest.raises(TypeError):
            parse(b"grad")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- files
class TestFiles:
    def test_parse_file(self, tmp_path):
        p = tmp_path / "opt.grad"
        p.write_text("# adam\nhparam lr = 0.001\ngrad | adam(lr)\n")
        m = parse_file(p)
        assert m.path == str(p)
        assert m.stmts == (HParam("lr", Num(0.001)), Body(Chain((N("grad"), Call(N("adam"), (N("lr"),))))))
        assert m.stmts[1].span.path == str(p)

    def test_file_over_the_size_limit(self, tmp_path):
        p = tmp_path / "huge.grad"
        p.write_bytes(b"grad | sign\n" * (10 * 1024 * 1024 // 12))  # ~10 MB
        for fn in (parse_file, read_source):
            with pytest.raises(GradError) as info:
                fn(p)
            assert "too large" in info.value.message
            assert info.value.path == str(p)

    def test_missing_file(self, tmp_path):
        with pytest.raises(GradError) as info:
            parse_file(tmp_path / "nope.grad")
        assert "no such file" in info.value.message

    def test_directory(self, tmp_path):
        with pytest.raises(GradError) as info:
            read_source(tmp_path)
        assert "directory" in info.value.message

    def test_empty_file(self, tmp_path):
        p = tmp_path / "empty.grad"
        p.write_bytes(b"")
        m = parse_file(p)
        assert isinstance(m, Module) and m.stmts == () and m.trailing_comments == ()

    def test_invalid_utf8(self, tmp_path):
        p = tmp_path / "bad.grad"
        p.write_bytes(b"let x = 1\nlet \xff = 2\n")
        with pytest.raises(GradError) as info:
            parse_file(p)
        e = info.value
        assert "UTF-8" in e.message and (e.line, e.column) == (2, 5)

    def test_nul_byte_in_file(self, tmp_path):
        p = tmp_path / "bin.grad"
        p.write_bytes(b"grad\x00")
        with pytest.raises(GradError) as info:
            parse_file(p)
        assert "NUL" in info.value.message

    def test_byte_order_mark_is_dropped(self, tmp_path):
        p = tmp_path / "bom.grad"
        p.write_bytes("\ufeffgrad | sign\n".encode())
        assert parse_file(p).stmts == (Body(Chain((N("grad"), N("sign")))),)


# ------------------------------------------------------------------------ internals
def _threaded_source(i: int) -> str:
    """A file of its own for thread ``i``: comments, and chains broken over lines at other offsets."""
    lines = [f"# optimizer {i}", f"hparam lr = 0.00{i + 1} in [0, 1)  # step size", ""]
    for j in range(i % 4 + 2):
        lines += [f"let s{j} = grad  # stage {j}",
                  " " * (i % 3 + 1) + f"| ema({j}.5)",
                  "  # between the stages",
                  f"  | scale(2 ** {i + j})", ""]
    lines += [f'route "layer{i}.*" or ndim >= {i % 3}:',
              "  s0",
              "  | clip(" + ", ".join(str(k) for k in range(i + 1)) + ",",
              f"         x={i})  # clipped",
              "route default: s1 | sign",
              f"# the end of {i}"]
    return "\n".join(lines) + "\n"


def _snapshot(m: Module) -> tuple:
    """All that a parse yields, including what AST equality leaves out (spans, comments)."""
    return (m.stmts, tuple(s.comments for s in m.stmts), m.trailing_comments,
            tuple((type(n).__name__, n.span) for s in m.stmts for n in ast.walk(s)))


class TestParserInternals:
    def test_every_terminal_is_named(self):
        """The grammar names every terminal: none is left to Lark's made-up '__ANON_n' (or '__IGNORE_n')."""
        names = [t.name for t in _parser().terminals]
        assert "POW" in names
        assert not [n for n in names if n.startswith("__")], names

    def test_every_terminal_has_words(self):
        """An expected-token hint never shows a terminal's name: a keyword shows its text, the rest _TOKEN_WORDS."""
        for t in _parser().terminals:
            if t.name in ("COMMENT", "WS"):
                continue
            assert _describe({t.name}) in (_TOKEN_WORDS.get(t.name), repr(t.pattern.value)), t.name
        assert "'**'" in error("grad sign").hint

    def test_threads_parse_at_once(self):
        """Threads parsing different files at once get exactly what a lone parse gets.

        The parser used to keep each parse's text and comments on the one
        post-lexer that every parse shares (behind a lock); without the lock
        this test failed: a thread decided where its statements end by reading
        another file's text, and its comments went to whichever parse reset the
        list last. A tiny switch interval makes the threads interleave inside
        each parse.
        """
        sources = [_threaded_source(i) for i in range(8)]
        expected = [_snapshot(parse(s)) for s in sources]
        assert all(len(e[0]) > 4 and any(e[1]) and e[2] for e in expected)  # comments, chains, routes
        results: list[list[object]] = [[] for _ in sources]
        barrier = threading.Barrier(len(sources))

        def work(i: int) -> None:
            barrier.wait()
            for _ in range(50):
                try:
                    results[i].append(_snapshot(parse(sources[i])))
                except Exception as e:  # noqa: BLE001 - compared below, like a result
                    results[i].append(e)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sources))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
        wrong = [(i, got) for i, runs in enumerate(results) for got in runs if got != expected[i]]
        assert [len(runs) for runs in results] == [50] * len(sources)
        assert not wrong, f"{len(wrong)} of {50 * len(sources)} parses differ, e.g. thread {wrong[0][0]}: {wrong[0][1]!r:.300}"


@pytest.mark.parametrize("source, says_unclosed", [
    ("grad | where(grad >\n  , 1, 0)\n", False),   # the '(' is closed later: the mistake is inside
    ("grad | adam(b1=\n)\n", False),
    ("grad | adam(b1=0.9,\n | sign\n", True),        # never closed
    ("grad | adam(\n\nlet x = 1\n", True),
])
def test_an_unclosed_bracket_is_named_only_when_the_file_never_closes_it(source, says_unclosed):
    with pytest.raises(GradError) as e:
        parse(source)
    assert ("is not closed" in (e.value.hint or "")) is says_unclosed
