"""The canonical formatter: exact examples plus round-trip and idempotence properties."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradpipe.dsl.ast import (
    BinOp, Body, Bool, Call, Chain, Def, DefParam, Default, Glob, HParam, Import, Index, Kwarg,
    Let, Mode, State, Module, Name, Neg, Num, Regex, Route, SelAnd, SelNot, SelOr, ShapePred, Str, Tuple,
)
from gradpipe.dsl.diagnostics import GradError
from gradpipe.dsl.formatter import MAX_WIDTH, format_expr, format_module, format_selector, format_source
from gradpipe.dsl.parser import parse


def N(*parts: str) -> Name:
    return Name(tuple(parts))


def fmt_expr(src: str) -> str:
    (stmt,) = parse(src).stmts
    return format_expr(stmt.expr)


def strict(node):
    """A structural key of an AST that, unlike ``==``, tells Num(1) from Num(1.0)."""
    if isinstance(node, tuple):
        return tuple(strict(x) for x in node)
    if dataclasses.is_dataclass(node):
        out = [type(node).__name__]
        for f in dataclasses.fields(node):
            if f.name in ("span", "comments", "path", "source", "trailing_comments"):
                continue
            out.append(strict(getattr(node, f.name)))
        return tuple(out)
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return (type(node).__name__, node)
    return node


def assert_round_trip(module: Module) -> str:
    text = format_module(module)
    again = parse(text)
    assert again == module, text
    assert strict(again) == strict(module), text
    assert format_module(again) == text, text  # idempotent
    return text


# ------------------------------------------------------------------- exact examples
@pytest.mark.parametrize("src,out", [
    # spacing
    ("grad|sign", "grad | sign"),
    ("f( x ,k = v )", "f(x, k=v)"),
    ("1-b1", "1 - b1"),
    ("wd*param", "wd * param"),
    ("2**3", "2 ** 3"),
    ("- x", "-x"),
    ("a.b . c", "a.b.c"),
    # parentheses only where needed
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a + (b * c)", "a + b * c"),
    ("(a + b) * c", "(a + b) * c"),
    ("a / (b * c)", "a / (b * c)"),
    ("(((x)))", "x"),
    ("-2 ** 2", "-2 ** 2"),
    ("-(2 ** 2)", "-2 ** 2"),
    ("(-2) ** 2", "(-2) ** 2"),
    ("2 ** -1", "2 ** -1"),
    ("2 ** (-1)", "2 ** -1"),
    ("a ** b ** c", "a ** b ** c"),
    ("a ** (b ** c)", "a ** b ** c"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("a ** (b * c)", "a ** (b * c)"),
    ("a - -b", "a - -b"),
    ("a * (-b)", "a * -b"),
    ("-(a + b)", "-(a + b)"),
    ("- - x", "--x"),
    ("(-x)[0]", "(-x)[0]"),
    ("-(x[0])", "-x[0]"),
    ("(a + b)[1]", "(a + b)[1]"),
    ("(x)[0][1]", "x[0][1]"),
    ("(a | b)[0]", "(a | b)[0]"),
    ("(x[0]) ** 2", "x[0] ** 2"),
    # chains
    ("grad | (grad | sign)", "grad | (grad | sign)"),
    ("(grad | sign) | x", "(grad | sign) | x"),
    ("(grad | sign)", "grad | sign"),
    ("f((grad | sign))", "f(grad | sign)"),
    ("f(k=(a | b))", "f(k=a | b)"),
    ("a + 1 | b", "a + 1 | b"),
    ("(a | b) + 1", "(a | b) + 1"),
    # calls
    ("f()", "f()"),
    ("f(1,)", "f(1)"),
    ("f{x}", "f { x }"),
    ("f(){x}", "f { x }"),
    ("f(1){x|y}", "f(1) { x | y }"),
    ("f(k=1){x}", "f(k=1) { x }"),
    ("lib.f(a, b, k=v)", "lib.f(a, b, k=v)"),
    ("f { x }[0]", "f { x }[0]"),
    # literals
    ("(1,)", "(1,)"),
    ("(1, 2,)", "(1, 2)"),
    ("true", "true"),
    ("false", "false"),
    ('"a\\"b\\\\c\\nd\\te"', '"a\\"b\\\\c\\nd\\te"'),
    ('"tab\there"', '"tab\\there"'),
    ('"\\q"', '"\\\\q"'),
])
def test_canonical_expressions(src, out):
    assert fmt_expr(src) == out
    assert fmt_expr(out) == out


@pytest.mark.parametrize("src,out", [
    ("007", "7"),
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ("1.", "1.0"),
    ("1.0", "1.0"),
    (".5", "0.5"),
    ("0.10", "0.1"),
    ("1e-08", "1e-8"),
    ("1e-8", "1e-8"),
    ("1E+20", "1e20"),
    ("1e20", "1e20"),
    ("1e3", "1000.0"),
    ("2.50e2", "250.0"),
    ("1e16", "1e16"),
    ("1.5e300", "1.5e300"),
    ("0.1e-3", "0.0001"),
    ("1.5e-5", "1.5e-5"),
    ("5e-324", "5e-324"),
    ("0.0", "0.0"),
])
def test_canonical_numbers(src, out):
    assert fmt_expr(src) == out
    value = parse(src).stmts[0].expr.value
    assert type(parse(out).stmts[0].expr.value) is type(value)


def test_number_edge_cases():
    assert format_expr(Num(1.0)) == "1.0"
    assert format_expr(Num(1e-8)) == "1e-8"
    assert format_expr(Num(0.1 + 0.2)) == "0.30000000000000004"
    with pytest.raises(ValueError):
        format_expr(Num(float("inf")))
    with pytest.raises(ValueError):
        format_expr(Num(float("nan")))


def test_strings_are_escaped():
    assert format_expr(Str('say "hi"\\\n\t')) == r'"say \"hi\"\\\n\t"'
    assert format_expr(Str("")) == '""'
    assert format_expr(Str("#not a comment")) == '"#not a comment"'


@pytest.mark.parametrize("src,out", [
    ('"*.bias"', '"*.bias"'),
    (r"/\.bias$/", r"/\.bias$/"),
    (r"/a\/b/", r"/a\/b/"),
    ("ndim>=2", "ndim >= 2"),
    ("numel<10", "numel < 10"),
    ("default", "default"),
    ('"*.bias" or not /re/ and numel < 10', '"*.bias" or not /re/ and numel < 10'),
    ('("a" or "b") and not ("c" and "d")', '("a" or "b") and not ("c" and "d")'),
    ('("a" or "b") or "c"', '"a" or "b" or "c"'),
    ('"a" or ("b" or "c")', '"a" or ("b" or "c")'),
    ('"a" and ("b" and "c")', '"a" and ("b" and "c")'),
    ('"a" or ("b" and "c")', '"a" or "b" and "c"'),
    ('not ("a")', 'not "a"'),
    ("not not default", "not not default"),
    ('not ("a" or "b")', 'not ("a" or "b")'),
])
def test_canonical_selectors(src, out):
    (route,) = parse(f"route {src}: grad").stmts
    assert format_selector(route.selector) == out


def test_format_selector_and_expr_on_constructed_nodes():
    assert format_selector(SelAnd(SelOr(Glob("a"), Regex("x/y")), SelNot(ShapePred("ndim", "==", 1)))) == \
        r'("a" or /x\/y/) and not ndim == 1'
    assert format_expr(Call(N("f"))) == "f()"
    assert format_expr(Call(N("f"), block=N("x"))) == "f { x }"
    assert format_expr(Chain((N("a"), Chain((N("b"), N("c")))))) == "a | (b | c)"
    assert format_expr(Index(Neg(N("x")), 0)) == "(-x)[0]"
    assert format_expr(Tuple((Num(0.9), Num(0.999)))) == "(0.9, 0.999)"
    assert format_expr(Tuple((Num(1),))) == "(1,)"


@pytest.mark.parametrize("src,out", [
    ('import   "x.grad"  as  y', 'import "x.grad" as y'),
    ('import "x.grad"', 'import "x.grad"'),
    ("hparam b1=0.9 in [0,1)", "hparam b1 = 0.9 in [0, 1)"),
    ("hparam b1=0.9 in (0,1]", "hparam b1 = 0.9 in (0, 1]"),
    ("hparam lr=1e-3", "hparam lr = 0.001"),
    ("hparam betas=(0.9,0.999)", "hparam betas = (0.9, 0.999)"),
    ("let x=1", "let x = 1"),
    ("def f(a,b=1)=a*b", "def f(a, b=1) = a * b"),
    ("def f()=grad", "def f() = grad"),
    ("route ndim>=2:grad|sign", "route ndim >= 2: grad | sign"),
    ("grad|adam(b1=0.9)", "grad | adam(b1=0.9)"),
])
def test_canonical_statements(src, out):
    assert format_source(src) == out + "\n"


def test_module_layout_and_comments():
    src = (
        "\n\n"
        "# header\n"
        "\n\n\n"
        "import \"lib.grad\" as lib   # inline comment\n"
        "hparam b1=0.9 in [0,1)\n"
        "\n"
        "\n"
        "let m = grad\n"
        "  # between stages\n"
        "  | ema(b1)\n"
        "route default:   m\n"
        "\n"
        "# trailing\n"
        "\n\n"
        "# more trailing   \n"
        "\n\n"
    )
    out = (
        "# header\n"
        "\n"
        "# inline comment\n"
        "import \"lib.grad\" as lib\n"
        "hparam b1 = 0.9 in [0, 1)\n"
        "\n"
        "# between stages\n"
        "let m = grad | ema(b1)\n"
        "route default: m\n"
        "\n"
        "# trailing\n"
        "\n"
        "# more trailing\n"
    )
    assert format_source(src) == out
    assert format_source(out) == out


def test_empty_modules():
    assert format_source("") == ""
    assert format_source("\n\n  \n") == ""
    assert format_module(Module(())) == ""
    assert format_source("\n# just a comment\n\n\n# another\n") == "# just a comment\n\n# another\n"


def test_constructed_comments_are_normalised():
    m = Module((Let("x", Num(1), comments=("", "# a", "", "", "b")), Body(N("x"), comments=("",))),
               trailing_comments=("", "", "# end", ""))
    assert format_module(m) == "# a\n\n# b\nlet x = 1\n\nx\n\n# end\n"


def test_hash_in_regex_and_string_is_not_a_comment():
    src = 'route /a#b/ or "#c": f("#d")  # real\n'
    assert format_source(src) == '# real\nroute /a#b/ or "#c": f("#d")\n'


def test_long_chains_are_split():
    stages = ["project_orthogonal(ema(0.95))", "clip_median(window=100)", "scale_by_rms(eps=1e-8)",
              "momentum(0.9, nesterov=true)"]
    src = "route ndim >= 2 and not \"*.bias\": grad | " + " | ".join(stages)
    out = format_source(src)
    assert out == (
        "route ndim >= 2 and not \"*.bias\": grad\n"
        "  | project_orthogonal(ema(0.95))\n"
        "  | clip_median(window=100)\n"
        "  | scale_by_rms(eps=1e-8)\n"
        "  | momentum(0.9, nesterov=true)\n"
    )
    assert format_source(out) == out
    assert parse(out) == parse(src)
    for prefix in ("", "let p = ", "def p(x, k=2) = "):
        out = format_source(prefix + "grad | " + " | ".join(stages))
        assert out.splitlines()[0] == prefix + "grad"
        assert out.splitlines()[1:] == ["  | " + s for s in stages]
        assert format_source(out) == out


def test_split_threshold_is_88_columns():
    def body(width: int) -> str:  # "grad | " + a name: exactly `width` columns
        return "grad | " + "x" * (width - len("grad | "))
    assert MAX_WIDTH == 88
    assert format_source(body(88)) == body(88) + "\n"
    assert format_source(body(89)) == "grad\n  | " + "x" * 82 + "\n"


def test_nested_and_parenthesised_stages_when_split():
    src = "grad | (aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb) | cccccccccccccccc + 1"
    out = format_source(src)
    assert out == ("grad\n"
                   "  | (aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb)\n"
                   "  | cccccccccccccccc + 1\n")
    assert parse(out) == parse(src)


def test_long_lines_that_are_not_chains_are_broken_after_commas_and_operators():
    # (these stayed on one line before the formatter learnt to break them)
    long_call = "f(" + ", ".join(f"argument_{i}" for i in range(12)) + ")"
    assert format_source(long_call) == (
        "f(argument_0, argument_1, argument_2, argument_3, argument_4, argument_5, argument_6,\n"
        "    argument_7, argument_8, argument_9, argument_10, argument_11)\n")
    long_hparam = "hparam x = " + " + ".join(["1000000"] * 12) + " in [0, 1]"
    assert format_source(long_hparam) == (
        "hparam x = 1000000 + 1000000 + 1000000 + 1000000 + 1000000 + 1000000 + 1000000 +\n"
        "    1000000 + 1000000 + 1000000 + 1000000 + 1000000 in [0, 1]\n")
    for src in (long_call, long_hparam):
        assert parse(format_source(src)) == parse(src)


def test_format_source_reports_errors_and_path():
    with pytest.raises(GradError) as info:
        format_source("let = 1", "bad.grad")
    assert info.value.path == "bad.grad"


# ------------------------------------------------------------ random-AST strategies
KEYWORDS = {"import", "hparam", "let", "state", "then", "def", "route", "in", "as", "and", "or", "not", "default",
            "true", "false", "ndim", "numel"}

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in KEYWORDS)
long_names = st.one_of(names, st.from_regex(r"[a-z_][a-z0-9_]{10,30}", fullmatch=True).filter(
    lambda s: s not in KEYWORDS))
# text with the characters that need escaping, and a few odd ones (CR, form feed,
# line/paragraph separators) that must not confuse line counting
TEXT_ALPHABET = st.sampled_from(list("ab #/*.|()[]{}\"\\\n\t\r\x0c\u2028\u00e9\u4e2d"))
texts = st.text(TEXT_ALPHABET, max_size=8)
comment_texts = st.text(st.sampled_from(list("ab #/|\"\\\t\r\x0c\u2028\u00e9")), max_size=10)


def _regex_piece():
    plain = st.sampled_from(list("ab.*$^#\"/()[]| "))
    escaped = st.sampled_from(list("ab.d\\\"#")).map(lambda c: "\\" + c)
    return st.one_of(plain, escaped)


regex_patterns = st.lists(_regex_piece(), min_size=1, max_size=6).map("".join)

ints = st.integers(min_value=0, max_value=10**30)
floats = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).map(abs)
numbers = st.one_of(ints, floats).map(Num)
dotted = st.lists(long_names, min_size=1, max_size=3).map(lambda ps: Name(tuple(ps)))

# the shape values: ``numel`` and ``ndim`` are also route-selector words (SHAPE_ATTR), names in expressions
shape_values = st.sampled_from(["numel", "rows", "cols", "ndim"]).map(lambda n: Name((n,)))
leaves = st.one_of(numbers, st.booleans().map(Bool), texts.map(Str), dotted, shape_values)


def _kwargs(children):
    return st.lists(st.tuples(names, children), max_size=2, unique_by=lambda kv: kv[0]).map(
        lambda kvs: tuple(Kwarg(k, v) for k, v in kvs))


def _extend(children):
    return st.one_of(
        st.builds(Call, dotted, st.lists(children, max_size=2).map(tuple), _kwargs(children),
                  st.none() | children),
        st.builds(BinOp, st.sampled_from(["+", "-", "*", "/", "%", "**", "<", "<=", ">", ">=", "==", "!="]),
                  children, children),
        st.builds(Neg, children),
        st.lists(children, min_size=2, max_size=4).map(lambda xs: Chain(tuple(xs))),
        st.builds(Index, children, st.integers(min_value=0, max_value=12)),
        # long ones, which the formatter breaks over lines: many terms, many arguments
        st.builds(_fold, children, st.lists(st.tuples(st.sampled_from(["+", "-", "*", "/", "%"]), children),
                                            min_size=2, max_size=6)),
        st.builds(Call, dotted, st.lists(children, min_size=3, max_size=6).map(tuple), _kwargs(children),
                  st.none()),
        # reductions: one or two operands (none: a stage) and a scope, ``mean(x, over=tensor)``
        st.builds(lambda f, xs, scope: Call(Name((f,)), tuple(xs), (Kwarg("over", Name((scope,))),)),
                  st.sampled_from(["sum", "mean", "norm", "rms", "max", "min", "dot"]),
                  st.lists(children, max_size=2), st.sampled_from(["tensor", "global", "rows", "cols"])),
    )


def _fold(first, rest):
    """``first op1 x1 op2 x2 ...`` as the left-associative tree the parser makes of it."""
    for op, operand in rest:
        first = BinOp(op, first, operand)
    return first


exprs = st.recursive(leaves, _extend, max_leaves=12)
tuples = st.lists(exprs, min_size=1, max_size=3).map(lambda xs: Tuple(tuple(xs)))

sel_leaves = st.one_of(
    texts.map(Glob),
    regex_patterns.map(Regex),
    st.builds(ShapePred, st.sampled_from(["ndim", "numel"]),
              st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), st.integers(0, 10**6)),
    st.just(Default()),
)
selectors = st.recursive(
    sel_leaves,
    lambda c: st.one_of(st.builds(SelAnd, c, c), st.builds(SelOr, c, c), st.builds(SelNot, c)),
    max_leaves=8,
)

comments = st.lists(st.one_of(st.just(""), comment_texts.map(lambda t: "#" + t)), max_size=3).map(tuple)


@st.composite
def hparams(draw):
    default = draw(st.one_of(exprs, tuples))
    if draw(st.booleans()):
        return HParam(draw(names), default, comments=draw(comments))
    return HParam(draw(names), default, draw(exprs), draw(exprs), draw(st.booleans()),
                  draw(st.booleans()), comments=draw(comments))


statements = st.one_of(
    st.builds(Import, texts, st.none() | names, comments=comments),
    hparams(),
    st.builds(Let, names, exprs, comments=comments),
    st.builds(State, names, exprs, exprs, comments=comments),
    st.builds(Def, long_names,
              st.lists(st.builds(DefParam, names, st.none() | exprs), max_size=3).map(tuple),
              exprs, comments=comments),
    st.builds(Route, selectors, exprs, comments=comments, param=st.booleans()),
    st.builds(Body, exprs, comments=comments, param=st.booleans()),
    st.builds(Mode, st.sampled_from(["eval", "train"]), exprs, comments=comments),
)
modules = st.builds(Module, st.lists(statements, max_size=4).map(tuple),
                    trailing_comments=comments)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(modules)
def test_random_modules_round_trip(module):
    """(a) parse(format_module(m)) == m and (b) formatting is idempotent."""
    assert_round_trip(module)


@FAST
@given(exprs)
def test_random_expressions_round_trip(e):
    text = format_expr(e)
    (stmt,) = parse(text).stmts
    assert strict(stmt.expr) == strict(e), text
    assert format_expr(stmt.expr) == text


@FAST
@given(selectors)
def test_random_selectors_round_trip(s):
    text = format_selector(s)
    (stmt,) = parse(f"route {text}: grad").stmts
    assert stmt.selector == s, text
    assert format_selector(stmt.selector) == text


# ----------------------------------------------------- random *text* (layout noise)
class Noisy:
    """Writes an AST as valid but non-canonical text: odd spacing, redundant
    parentheses, line breaks where the grammar allows them, comments, blank
    lines, trailing commas and alternative number spellings."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)  # one draw per example keeps the test fast

    def chance(self, p: float = 0.25) -> bool:
        return self.rnd.random() < p

    def choice(self, options):
        return self.rnd.choice(options)

    def sp(self, required: bool = False) -> str:
        return self.choice([" ", "  ", "\t"] if required else ["", "", " ", "  ", "\t"])

    def brk(self, newline_ok: bool) -> str:
        """Whitespace between tokens; newlines (and comments) only where they cannot end a statement."""
        if newline_ok and self.chance(0.2):
            comment = "# " + self.choice(["x", "a|b", "(", "#", "\"", "\\"]) if self.chance(0.5) else ""
            return self.sp() + comment + "\n" + self.choice(["", "\n", "\n\n"]) + self.sp()
        return self.sp()

    def num(self, v) -> str:
        if isinstance(v, int):
            return self.choice(["", "0", "00"]) + str(v)
        forms = [repr(v), f"{v:.17e}", f"{v:.17E}", f"{v:.17e}".replace("e", "0e", 1)]
        if v.is_integer() and v < 1e15:
            forms.append(f"{int(v)}.")
        if 0 < v < 1 and repr(v).startswith("0."):
            forms.append(repr(v)[1:])
        return self.choice(forms)

    def string(self, s: str) -> str:
        if self.chance(0.5):  # a raw tab is as good as '\t'
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        return format_expr(Str(s))

    def expr(self, e, nl: bool, prec: int = 0) -> str:
        """``nl``: inside brackets (newlines allowed anywhere)."""
        text = self._expr(e, nl, prec)
        if self.chance(0.1):  # a redundant pair of parentheses never changes the AST
            return "(" + self.brk(True) + self._expr(e, True, 0) + self.brk(True) + ")"
        return text

    def _expr(self, e, nl, prec):
        from gradpipe.dsl import formatter as F
        need = F._prec(e) < prec
        inner_nl = nl or need
        if isinstance(e, Num):
            t = self.num(e.value)
        elif isinstance(e, Bool):
            t = "true" if e.value else "false"
        elif isinstance(e, Str):
            t = self.string(e.value)
        elif isinstance(e, Name):
            t = e.dotted
        elif isinstance(e, Call):
            parts = [self.brk(True) + self.expr(a, True) + self.brk(True) for a in e.args]
            parts += [self.brk(True) + k.name + self.sp() + "=" + self.brk(True) + self.expr(k.value, True)
                      + self.brk(True) for k in e.kwargs]
            t = e.func.dotted
            if parts or e.block is None or self.chance(0.3):
                trailing = "," if parts and self.chance(0.3) else ""
                t += self.sp() + "(" + ",".join(parts) + trailing + self.brk(True) + ")"
            if e.block is not None:
                t += self.sp() + "{" + self.brk(True) + self.expr(e.block, True) + self.brk(True) + "}"
        elif isinstance(e, Chain):
            out = self.expr(e.stages[0], inner_nl, F._SUM)
            for stage in e.stages[1:]:
                if not inner_nl and self.chance(0.3):  # the next line starts with '|'
                    out += self.sp() + "\n" + ("  # between\n" if self.chance(0.5) else "") + self.sp() + "|"
                else:
                    out += self.sp() + "|"
                out += self.brk(True) + self.expr(stage, inner_nl, F._SUM)
            t = out
        elif isinstance(e, BinOp):
            p = F._BINOP_PREC[e.op]
            lp, rp = (F._POSTFIX, F._UNARY) if e.op == "**" else (p + 1, p + 1) if p == F._CMP else (p, p + 1)
            t = (self.expr(e.left, inner_nl, lp) + self.brk(inner_nl) + e.op + self.brk(True)
                 + self.expr(e.right, inner_nl, rp))
        elif isinstance(e, Neg):
            t = "-" + self.brk(True) + self.expr(e.operand, inner_nl, F._UNARY)
        elif isinstance(e, Index):
            t = self.expr(e.base, inner_nl, F._POSTFIX) + self.sp() + "[" + self.brk(True) + \
                self.choice(["", "0"]) + str(e.index) + self.brk(True) + "]"
        elif isinstance(e, Tuple):
            items = [self.brk(True) + self.expr(i, True) + self.brk(True) for i in e.items]
            trailing = "," if len(items) == 1 or self.chance(0.3) else ""
            t = "(" + ",".join(items) + trailing + self.brk(True) + ")"
        else:
            raise TypeError(e)
        return "(" + self.brk(True) + t + self.brk(True) + ")" if need else t

    def sel(self, s, prec: int = 0) -> str:
        from gradpipe.dsl import formatter as F
        mine = {SelOr: F._S_OR, SelAnd: F._S_AND, SelNot: F._S_NOT}.get(type(s), F._S_ATOM)
        sp, brk = self.sp, self.brk
        # a newline may follow 'or', 'and', 'not' (never precede them)
        if isinstance(s, SelOr):
            t = self.sel(s.left, F._S_OR) + sp(True) + "or" + brk(True) + sp(True) + self.sel(s.right, F._S_AND)
        elif isinstance(s, SelAnd):
            t = self.sel(s.left, F._S_AND) + sp(True) + "and" + brk(True) + sp(True) + self.sel(s.right, F._S_NOT)
        elif isinstance(s, SelNot):
            t = "not" + sp(True) + brk(True) + self.sel(s.operand, F._S_NOT)
        elif isinstance(s, Glob):
            t = self.string(s.pattern)
        elif isinstance(s, ShapePred):
            t = f"{s.attr}{sp()}{s.op}{sp()}{s.value}"
        else:
            t = format_selector(s)
        if mine < prec or self.chance(0.1):
            return "(" + brk(True) + t + brk(True) + ")"
        return t

    def stmt(self, s) -> str:
        sp, brk = self.sp, self.brk
        if isinstance(s, Import):
            t = "import" + sp(True) + self.string(s.path)
            if s.alias is not None:
                t += sp(True) + "as" + sp(True) + s.alias
        elif isinstance(s, HParam):
            t = "hparam" + sp(True) + s.name + sp() + "=" + brk(True) + self.expr(s.default, False)
            if s.low is not None:
                t += sp(True) + "in" + brk(True) + ("[" if s.low_closed else "(") + brk(True)
                t += self.expr(s.low, True) + brk(True) + "," + brk(True) + self.expr(s.high, True)
                t += brk(True) + ("]" if s.high_closed else ")")
        elif isinstance(s, Let):
            t = "let" + sp(True) + s.name + sp() + "=" + brk(True) + self.expr(s.value, False)
        elif isinstance(s, State):
            t = ("state" + sp(True) + s.name + sp() + "=" + brk(True) + self.expr(s.init, False) + sp(True) + "then"
                 + brk(True) + self.expr(s.update, False))
        elif isinstance(s, Def):
            params = [brk(True) + p.name + ("" if p.default is None else
                                            sp() + "=" + brk(True) + self.expr(p.default, True)) + brk(True)
                      for p in s.params]
            trailing = "," if params and self.chance(0.3) else ""
            t = ("def" + sp(True) + s.name + sp() + "(" + ",".join(params) + trailing + brk(True) + ")" + sp()
                 + "=" + brk(True) + self.expr(s.body, False))
        elif isinstance(s, Route):
            t = "route" + sp(True) + self.sel(s.selector) + sp() + ":" + brk(True)
            t += ("param" + sp() + "=" + brk(True) if s.param else "") + self.expr(s.body, False)
        elif isinstance(s, Mode):
            t = s.mode + sp() + ":" + brk(True) + "param" + sp() + "=" + brk(True) + self.expr(s.expr, False)
        else:
            t = ("param" + sp() + "=" + brk(True) if s.param else "") + self.expr(s.expr, False)
        return t

    def module(self, m: Module) -> str:
        out = self.choice(["", "\n", "\n\n", "# head\n", "  \n"])
        for s in m.stmts:
            out += self.sp() + self.stmt(s) + self.sp()
            if self.chance(0.3):
                out += "# after"
            out += self.choice(["\n", "\r\n", "\n\n", "\n  \n", "\n# c\n"])
        return out + self.choice(["", "# end", "\n# end\n"])


@FAST
@given(modules, st.integers(min_value=0, max_value=2**32))
def test_noisy_text_parses_to_the_same_ast_and_formats_canonically(module, seed):
    """For text that parses, format(parse(text)) re-parses to an equal AST."""
    text = Noisy(seed).module(module)
    parsed = parse(text)
    assert strict(parsed) == strict(module), text
    formatted = format_module(parsed)
    assert strict(parse(formatted)) == strict(parsed), (text, formatted)
    assert format_source(formatted) == formatted


TOKENS = ["grad", "x.y", "f", "1", "2.5", "1e-3", '"s"', "true", "|", "+", "-", "*", "/", "**",
          "(", ")", "[0]", ",", "k=", "{", "}", "\n", "  ", "# c\n", "\n  |", "route", "default", ":",
          "let", "v", "=", "not", "and", "or", "ndim", ">=", "hparam", "in", "[", "]", "def", "import",
          "<", "==", "!=", "%", "max", "where"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join))
def test_token_soup_parses_or_fails_cleanly(text):
    """Arbitrary token sequences: parse either fails with a GradError or round-trips."""
    try:
        module = parse(text)
    except GradError:
        return
    formatted = format_module(module)
    assert strict(parse(formatted)) == strict(module), (text, formatted)
    assert format_source(formatted) == formatted



# ------------------------------------------------- breaking long non-chain statements
import gradpipe  # noqa: E402

HPARAMS = ("hparam lr = 0.001\nhparam weight_decay = 0.01\nhparam momentum_coefficient = 0.9\n"
           "hparam gradient_noise_scale = 0.1\n")


def assert_broken_well(src: str) -> str:
    """Formats ``src``: every line fits (or is one token), idempotent, same AST, same hash."""
    out = format_source(src)
    for line in out.splitlines():
        assert len(line) <= MAX_WIDTH or " " not in line.strip(), out
    assert format_source(out) == out
    assert parse(out) == parse(src)
    assert gradpipe.compile(out).hash == gradpipe.compile(src).hash
    return out


def test_long_arithmetic_let_is_broken_after_its_lowest_operators():
    terms = ["lr * grad * momentum_coefficient", "weight_decay * param * momentum_coefficient",
             "gradient_noise_scale * grad * grad", "lr * weight_decay * param",
             "momentum_coefficient * grad"]
    let = "let update = " + " + ".join(terms)
    assert len(let) > 170
    out = assert_broken_well(HPARAMS + let + "\ngrad | scale(lr)\n")
    assert out == HPARAMS + (
        "let update = lr * grad * momentum_coefficient +\n"
        "    weight_decay * param * momentum_coefficient + gradient_noise_scale * grad * grad +\n"
        "    lr * weight_decay * param + momentum_coefficient * grad\n"
        "grad | scale(lr)\n")


def test_long_comparison_inside_where_is_broken():
    src = HPARAMS + (
        "let safe = where(grad * momentum_coefficient * weight_decay > momentum_coefficient * weight_decay"
        " * gradient_noise_scale * lr * param, grad * lr, lr * weight_decay * grad)\n"
        "grad | scale(lr)\n")
    out = assert_broken_well(src)
    assert out == HPARAMS + (
        "let safe = where(grad * momentum_coefficient * weight_decay >\n"
        "        momentum_coefficient * weight_decay * gradient_noise_scale * lr * param,\n"
        "    grad * lr,\n"
        "    lr * weight_decay * grad)\n"
        "grad | scale(lr)\n")
    # a comparison at the top level breaks after its operator
    cmp = "let c = " + " + ".join(f"term_number_{i}" for i in range(5)) + " < " + \
        " * ".join(f"factor_number_{i}" for i in range(4))
    assert format_source(cmp) == (
        "let c = term_number_0 + term_number_1 + term_number_2 + term_number_3 + term_number_4 <\n"
        "    factor_number_0 * factor_number_1 * factor_number_2 * factor_number_3\n")


def test_long_call_argument_lists_are_broken_after_commas():
    src = HPARAMS + ("grad | clip_norm(1, scope=tensor) | scale(clamp(lr * momentum_coefficient * weight_decay, "
                     "gradient_noise_scale * weight_decay, momentum_coefficient + gradient_noise_scale))\n")
    out = format_source(src)
    # a chain statement is split before each '|' and its stages stay whole
    assert out.splitlines()[-1].startswith("  | scale(clamp(")
    let = HPARAMS + ("let s = clamp(lr * momentum_coefficient * weight_decay, gradient_noise_scale * weight_decay, "
                     "momentum_coefficient + gradient_noise_scale)\ngrad | scale(s)\n")
    out = assert_broken_well(let)
    assert out == HPARAMS + (
        "let s = clamp(lr * momentum_coefficient * weight_decay,\n"
        "    gradient_noise_scale * weight_decay, momentum_coefficient + gradient_noise_scale)\n"
        "grad | scale(s)\n")


def test_nested_pieces_break_recursively_and_keep_brackets_and_chains():
    y = "let y = (" + " + ".join(f"very_long_name_{i}" for i in range(8)) + ") * (" + \
        " - ".join(f"other_long_name_{i}" for i in range(8)) + ")"
    assert format_source(y) == (
        "let y = (very_long_name_0 + very_long_name_1 + very_long_name_2 + very_long_name_3 +\n"
        "        very_long_name_4 + very_long_name_5 + very_long_name_6 + very_long_name_7) *\n"
        "    (other_long_name_0 - other_long_name_1 - other_long_name_2 - other_long_name_3 -\n"
        "        other_long_name_4 - other_long_name_5 - other_long_name_6 - other_long_name_7)\n")
    z = "let z = f(k=(aaaaaaaaaaaaaaaaaaaaa | bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb | cccccccccccccccccccccccccc), j=1)"
    assert format_source(z) == (
        "let z = f(k=aaaaaaaaaaaaaaaaaaaaa\n"
        "      | bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n"
        "      | cccccccccccccccccccccccccc,\n"
        "    j=1)\n")
    block = "route default: f(a, b) { " + " + ".join(f"xxxxxxxxxxx{i}" for i in range(10)) + " }"
    assert format_source(block) == (
        "route default: f(a, b) { xxxxxxxxxxx0 + xxxxxxxxxxx1 + xxxxxxxxxxx2 + xxxxxxxxxxx3 +\n"
        "    xxxxxxxxxxx4 + xxxxxxxxxxx5 + xxxxxxxxxxx6 + xxxxxxxxxxx7 + xxxxxxxxxxx8 +\n"
        "    xxxxxxxxxxx9 }\n")
    power = "let p = " + " ** ".join(f"exponent_tower_{i}" for i in range(6))
    assert format_source(power) == (
        "let p = exponent_tower_0 ** exponent_tower_1 ** exponent_tower_2 ** exponent_tower_3 **\n"
        "    exponent_tower_4 ** exponent_tower_5\n")
    for src in (y, z, block, power):
        assert parse(format_source(src)) == parse(src)
        assert format_source(format_source(src)) == format_source(src)


def test_a_token_longer_than_the_limit_stays_whole_and_comments_stay_above():
    name = "n" * 100
    out = format_source(f"# note\nlet x = {name} + {name} - 2\n")
    assert out == f"# note\nlet x = {name} +\n    {name} -\n    2\n"
    assert format_source(out) == out
    # a comment between broken lines moves above the statement, like any other
    assert format_source("let x = aaaa +  # why\n    bbbb\n") == "# why\nlet x = aaaa + bbbb\n"


# every atom here is at most 31 columns: every line must fit
_short_atoms = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,30}", fullmatch=True).filter(lambda s: s not in KEYWORDS)
    .map(lambda s: Name((s,))),
    st.integers(0, 10**9).map(Num),
)
wide_exprs = st.recursive(
    _short_atoms,
    lambda c: st.one_of(
        st.builds(_fold, c, st.lists(st.tuples(st.sampled_from(["+", "-", "*", "/", "%"]), c),
                                     min_size=1, max_size=8)),
        st.builds(BinOp, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), c, c),
        st.builds(Call, st.sampled_from([N("where"), N("clamp"), N("lib", "f")]),
                  st.lists(c, min_size=1, max_size=6).map(tuple)),
        st.builds(Neg, c),
        st.builds(Index, c, st.integers(0, 3)),
    ),
    max_leaves=24,
)


@FAST
@given(wide_exprs, st.sampled_from(["let x = ", "", "def f(a, b=1) = ", "route ndim >= 2: ", "state s = 0 then ",
                                    "param = ", "route ndim >= 2: param = ", "eval: param = "]))
def test_random_long_expressions_are_broken_to_fit(e, prefix):
    stmt = parse(prefix + "0").stmts[0]
    field = {Let: "value", Body: "expr", Def: "body", Route: "body", State: "update", Mode: "expr"}[type(stmt)]
    module = Module((dataclasses.replace(stmt, **{field: e}),))
    text = assert_round_trip(module)
    assert max(len(line) for line in text.splitlines()) <= MAX_WIDTH, text
