"""Fuzzing the parser, the compiler and the formatter with hostile text.

Two generators, both Hypothesis strategies (so failures shrink):

* :func:`programs` writes *plausible* programs from the grammar and the op
  table: real op names with their real argument names, hyperparameters with
  ranges, ``let``/``def``/``route``/``import`` statements, numbers in and out of
  range, odd layout. Many compile; the rest fail in the compiler's checks.
* :func:`mutants` takes a shipped pipeline (``pipelines/*.grad``) and damages
  it: deletes, duplicates or swaps tokens and lines, inserts random characters
  (brackets, quotes, control characters, non-ASCII) and truncates.

Every case goes through :func:`check_source`, the oracle:

* ``gradpipe.compile`` returns a Program or raises a :class:`GradError`;
  nothing else may escape. Every diagnostic of the error points inside the
  text (line and column in range) and renders with its source line and a
  caret under the column.
* ``format_source`` accepts every text that parses; formatting is
  idempotent, never changes whether the text compiles, and a formatted program
  compiles to the same hash.

``benchmarks/fuzz_nightly.py`` runs the same strategies and oracle with random
seeds for a given number of minutes and saves what fails as ``.grad`` files.
"""

from __future__ import annotations

import pathlib
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradpipe
from gradpipe import GradError
from gradpipe.compiler.ops import OPS
from gradpipe.compiler.prims import FUNCTIONS as MATH_FUNCTIONS
from gradpipe.dsl.diagnostics import printable
from gradpipe.dsl.parser import parse

PATH = "fuzz.grad"
REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = {p.name: p.read_text() for p in sorted((REPO / "pipelines").glob("*.grad"))}

# Derandomized (the same cases on every run, so CI is stable), no example
# database (nothing written next to the tests), no per-example deadline
# (a loaded CI machine is slow, not wrong).
CI = dict(deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])


# ------------------------------------------------------------------ the oracle
class OracleFailure(AssertionError):
    """The text broke a guarantee (the message says which)."""


def _lines(text: str) -> list[str]:
    return text.split("\n")  # as the lexer counts: only '\n' ends a line


_CARET = re.compile(r"^ +\^+$")


def check_error(err: BaseException, text: str, path: str = PATH) -> None:
    """``err`` is a GradError whose every diagnostic is inside ``text`` and renders a caret."""
    if not isinstance(err, GradError):
        raise OracleFailure(f"{type(err).__name__} escaped: {err!r}") from err
    lines = _lines(text)
    if not err.diagnostics:
        raise OracleFailure("a GradError without diagnostics")
    for d in err.diagnostics:
        s = d.span
        where = f"{s.path}:{s.line}:{s.column} {d.message!r}"
        if s.path != path:
            raise OracleFailure(f"the error names another file than the one compiled: {where}")
        if not 1 <= s.line <= len(lines):
            raise OracleFailure(f"line out of range (the text has {len(lines)}): {where}")
        if not 1 <= s.column <= len(lines[s.line - 1]) + 1:
            raise OracleFailure(f"column out of range (line {s.line} has {len(lines[s.line - 1])} "
                                f"characters): {where}")
        if s.source is None:
            raise OracleFailure(f"the error carries no source text, so it shows no caret: {where}")
        rendered = d.render().split("\n")
        if rendered[0] != f"{printable(path)}:{s.line}:{s.column}: error: {printable(d.message)}":
            raise OracleFailure(f"the first line is not 'path:line:col: error: message': {rendered[0]!r}")
        if len(rendered) < 3 or not _CARET.match(rendered[2]):
            raise OracleFailure(f"no caret line under the source line: {rendered!r}")
        if any(printable(r) != r for r in rendered):
            raise OracleFailure(f"the rendering holds control characters: {rendered!r}")
    if not str(err).startswith(f"{printable(path)}:"):
        raise OracleFailure("str(error) does not start with the path")


def _compile(text: str):
    """A Program, or the GradError (checked); anything else fails the oracle."""
    try:
        return gradpipe.compile(text, path=PATH)
    except Exception as e:  # noqa: BLE001 - the point is to catch what escapes
        check_error(e, text)
        return e


def _parses(text: str) -> bool:
    try:
        parse(text, PATH)
    except GradError:
        return False
    except Exception as e:  # noqa: BLE001
        raise OracleFailure(f"{type(e).__name__} escaped the parser: {e!r}") from e
    return True


def check_source(text: str) -> str:
    """Run the oracle on one text; returns 'compiled', 'rejected' (compile error) or 'syntax'."""
    result = _compile(text)
    compiled = not isinstance(result, BaseException)
    if not _parses(text):
        if compiled:
            raise OracleFailure("compile() accepted a text that parse() rejects")
        try:
            gradpipe.format_source(text, path=PATH)
        except Exception as e:  # noqa: BLE001
            check_error(e, text)
            return "syntax"
        raise OracleFailure("format_source() accepted a text that does not parse")
    try:
        formatted = gradpipe.format_source(text, path=PATH)
    except Exception as e:  # noqa: BLE001
        raise OracleFailure(f"format_source() failed on a text that parses: {e!r}") from e
    again = gradpipe.format_source(formatted, path=PATH)
    if again != formatted:
        raise OracleFailure(f"formatting is not idempotent:\n{formatted!r}\n{again!r}")
    result2 = _compile(formatted)
    if compiled != (not isinstance(result2, BaseException)):
        raise OracleFailure(f"formatting changed whether the text compiles:\n{formatted}\n{result!r}\n{result2!r}")
    if compiled and result2.hash != result.hash:
        raise OracleFailure(f"formatting changed the program's hash:\n{formatted}")
    return "compiled" if compiled else "rejected"


# ------------------------------------------------------------------ plausible programs
HPARAMS = ["b1", "b2", "beta", "tau", "wd", "eps", "lam", "betas", "flag"]
LETS = ["r", "smooth", "rule"]
DEFS = ["f", "core", "surgery"]
SOURCES = ["grad", "param", "grads.main", "grads.aux", "samples"]
SCALAR_SOURCES = ["lr", "step", "loss"]
NUMBERS = ["0", "1", "2", "0.9", "0.999", ".5", "1.", "1e-3", "1e-8", "3E+2", "128", "0.25",
           "1e308", "1e999", "99999999999999999999999", "007", "0.0", "inf"]
OP_NAMES = sorted(OPS)
COMPARISONS = [" < ", " <= ", " > ", " >= ", " == ", " != ", "=="]


@st.composite
def scalars(draw, depth: int = 2):
    """A number-valued expression: literals, hyperparameters, lr/step/loss, arithmetic."""
    leaf = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(HPARAMS + SCALAR_SOURCES),
                     st.sampled_from(["betas[0]", "betas[1]", "betas[2]", "b1[0]"]))
    if depth <= 0 or draw(st.integers(0, 3)) > 0:
        return draw(leaf)
    kind = draw(st.sampled_from(["bin", "neg", "paren", "fn", "where"]))
    if kind == "neg":
        return "-" + draw(scalars(depth - 1))
    if kind == "paren":
        return "(" + draw(scalars(depth - 1)) + ")"
    if kind == "fn":  # a math function of scalars (or a signal: then a misuse to refuse)
        fn, arity = draw(st.sampled_from(sorted(MATH_FUNCTIONS.items())))
        n = draw(st.sampled_from([arity, arity, arity - 1, arity + 1]))
        return f"{fn}(" + ", ".join(draw(st.one_of(scalars(depth - 1), st.just("grad"))) for _ in range(n)) + ")"
    if kind == "where":  # often with a comparison, sometimes with a number where a boolean goes
        cond = draw(scalars(depth - 1)) + draw(st.sampled_from(COMPARISONS)) + draw(scalars(depth - 1))
        if draw(st.integers(0, 4)) == 0:
            cond = draw(scalars(depth - 1))
        return f"where({cond}, {draw(scalars(depth - 1))}, {draw(scalars(depth - 1))})"
    op = draw(st.sampled_from(["+", "-", "*", "/", "**", "%", "%"] + list(COMPARISONS)))
    return draw(scalars(depth - 1)) + f" {op} " + draw(scalars(depth - 1))


@st.composite
def calls(draw, depth: int = 2):
    """An op call with arguments drawn from the op's own parameters (or a def/let name)."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(LETS + DEFS + [f"{d}(0.9)" for d in DEFS] + ["lib.smooth", "lib.core(0.5)"]))
    op = OPS[draw(st.sampled_from(OP_NAMES))]
    params = list(op.params)
    args: list[str] = []
    positional = draw(st.booleans())
    block = None
    for p in params:
        if not draw(st.booleans()) and p.kind not in ("signals",):
            continue
        if p.kind in ("scalar", "value", "any"):
            v = draw(scalars(depth))
            if p.kind != "scalar" and depth > 0 and draw(st.integers(0, 3)) == 0:
                v = draw(st.one_of(st.sampled_from(SOURCES), calls(depth - 1)))
        elif p.kind == "int":
            v = draw(st.sampled_from(["0", "1", "2", "3", "10", "200", "-1", "2.5", "k"]))
        elif p.kind == "bool":
            v = draw(st.sampled_from(["true", "false", "flag", "1", "yes"]))
        elif p.kind == "choice":
            v = draw(st.sampled_from(list(p.choices) + ['"' + (p.choices or ("x",))[0] + '"', "nope", '"tensor"']))
        elif p.kind == "signal":
            v = draw(st.one_of(st.sampled_from(SOURCES), calls(max(depth - 1, 0)),
                               st.just("(grad | sign)")))
        elif p.kind == "signals":
            k = draw(st.integers(0, 3))
            args.extend(draw(st.sampled_from(SOURCES[2:] + ["grad", "g"])) for _ in range(k))
            continue
        elif p.kind == "block":
            if depth > 0:
                block = draw(chains(depth - 1, start=False))
            continue
        else:  # pragma: no cover - a new kind: still fuzz it
            v = draw(scalars(0))
        args.append(v if positional and (not args or "=" not in args[-1]) else f"{p.name}={v}")
    if draw(st.integers(0, 7)) == 0:
        args.append(draw(st.sampled_from(["bogus=1", "1", "b1=0.5", "scope=global"])))
    text = op.name
    if args or draw(st.booleans()):
        text += "(" + ", ".join(args) + draw(st.sampled_from(["", "", ","])) + ")"
    if block is not None or draw(st.integers(0, 15)) == 0:
        text += " { " + (block or "adam") + " }"
    return text


@st.composite
def math_stages(draw, depth: int = 2):
    """A math function as a stage (``abs``, ``max(1e-3)``, ``clamp(-1, 1)``), a full call on
    signals (``where(grad > 0, grad, 0)``: a signal, refused as a stage), or a comparison."""
    fn, arity = draw(st.sampled_from(sorted(MATH_FUNCTIONS.items())))
    kind = draw(st.sampled_from(["stage", "stage", "full", "cmp"]))
    operand = st.one_of(scalars(max(depth - 1, 0)), st.sampled_from(SOURCES[:2] + ["(grad > 0)", "(step % 2 == 0)"]))
    if kind == "cmp":
        return draw(st.sampled_from(SOURCES[:2] + ["1"])) + draw(st.sampled_from(COMPARISONS)) + draw(scalars(0))
    n = arity - 1 if kind == "stage" else arity
    if n == 0 and draw(st.booleans()):
        return fn
    return f"{fn}(" + ", ".join(draw(operand) for _ in range(n)) + ")"


@st.composite
def chains(draw, depth: int = 2, start: bool = True):
    """``source | stage | ...`` (or, with ``start=False``, stages only)."""
    stages = draw(st.lists(st.one_of(calls(depth), calls(depth), math_stages(depth)), min_size=1, max_size=4))
    if start:
        head = draw(st.sampled_from(SOURCES + ["(grad | sign)", "grads.main + grads.aux"]))
        stages = [head] + stages
    sep = draw(st.sampled_from([" | ", " | ", "|", "\n  | "]))
    text = sep.join(stages)
    if depth > 0 and draw(st.integers(0, 6)) == 0:
        text = draw(st.sampled_from(["0.5 * ", "-", "2 * "])) + "(" + text + ")"
    return text


@st.composite
def selectors(draw, depth: int = 2):
    atom = st.one_of(
        st.sampled_from(['"*.bias"', '"*.weight"', '"layer.*"', '"*"', '""']),
        st.sampled_from([r"/norm\./", r"/^enc/", "/[/", "/(a|b)/", r"/\d+/"]),
        st.builds(lambda a, c, n: f"{a} {c} {n}", st.sampled_from(["ndim", "numel"]),
                  st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), st.sampled_from(["0", "1", "2", "1000"])),
    )
    if depth <= 0 or draw(st.integers(0, 2)) > 0:
        return draw(atom)
    kind = draw(st.sampled_from(["and", "or", "not", "paren"]))
    if kind == "not":
        return "not " + draw(selectors(depth - 1))
    if kind == "paren":
        return "(" + draw(selectors(depth - 1)) + ")"
    return draw(selectors(depth - 1)) + f" {kind} " + draw(selectors(depth - 1))


@st.composite
def statements(draw):
    kind = draw(st.sampled_from(["hparam", "hparam", "let", "state", "def", "import", "comment", "blank"]))
    if kind == "hparam":
        name = draw(st.sampled_from(HPARAMS + ["lr", "grad"]))
        if name == "betas":
            default = draw(st.sampled_from(["(0.9, 0.999)", "(0.9,)", "()", "(0.9, 2)"]))
        elif name == "flag":
            default = draw(st.sampled_from(["true", "false"]))
        else:
            default = draw(scalars(1))
        text = f"hparam {name} = {default}"
        if draw(st.booleans()):
            lo, hi = draw(st.sampled_from(["[", "("])), draw(st.sampled_from(["]", ")"]))
            text += f" in {lo}{draw(scalars(0))}, {draw(st.sampled_from(['1', 'inf', '0', '1e9']))}{hi}"
        return text
    if kind == "let":
        value = draw(st.one_of(calls(1), chains(1), chains(1, start=False), scalars(1)))
        return f"let {draw(st.sampled_from(LETS))} = {value}"
    if kind == "state":
        init = draw(st.one_of(scalars(1), st.sampled_from(["grad", "param", "ema", "grad > 0"])))
        update = draw(st.one_of(calls(1), chains(1), scalars(1), st.sampled_from(
            ["s + grad", "max(s, grad * grad)", "where(step % 2 == 0, 0, s + grad)", "previous(s)", "s | ema"])))
        return f"state {draw(st.sampled_from(['s', 'acc'] + LETS))} = {init} then {update}"
    if kind == "def":
        params = draw(st.lists(st.sampled_from(["x", "beta=0.9", "tau=1.0", "rule=adam", "s=param"]),
                               max_size=3, unique=True))
        body = draw(st.one_of(calls(1), chains(1, start=False), chains(1)))
        return f"def {draw(st.sampled_from(DEFS))}({', '.join(params)}) = {body}"
    if kind == "import":
        target = draw(st.sampled_from(['"lib.grad"', '"nope.grad"', '"../x.grad"', '"/etc/passwd"', '""']))
        return f"import {target}" + draw(st.sampled_from(["", " as lib"]))
    if kind == "comment":
        return "# " + draw(st.text(st.sampled_from(list("ab |()#\"é中\t")), max_size=12))
    return ""


# ------------------------------------------------------------------ programs that mostly compile
_VALID_HPARAMS = {"b1": "hparam b1 = 0.9 in [0, 1)", "tau": "hparam tau = 1.0 in (0, inf)",
                  "wd": "hparam wd = 0.01 in [0, inf)", "betas": "hparam betas = (0.9, 0.999) in [0, 1)",
                  "flag": "hparam flag = false"}


def _num(v) -> str:
    return "inf" if v == float("inf") else repr(v)


def _in_range(p) -> list[str]:
    """Values inside a parameter's valid range (its default first)."""
    from gradpipe.compiler.ops.base import REQUIRED
    out = []
    if p.default is not REQUIRED and not isinstance(p.default, (bool, str)):
        out.append(_num(p.default))
    lo = p.low if p.low != -float("inf") else 0.0
    hi = p.high if p.high != float("inf") else lo + 4
    out.append(_num(round((lo + hi) / 2, 3) if p.kind != "int" else int((lo + hi) // 2) or 1))
    return out


@st.composite
def valid_calls(draw, hparams: tuple[str, ...], depth: int = 1):
    """An op call whose every argument is of the right kind and in its range."""
    ok = [n for n, o in OPS.items() if not any(p.kind in ("signals",) for p in o.params)
          and n not in ("aegd", "dp_clip", "dp_noise", "project_out", "woodbury_fisher")]
    op = OPS[draw(st.sampled_from(sorted(ok)))]
    args, block = [], None
    for p in op.params:
        required = p.kind in ("signal", "block", "value", "any") and p.default is _required()
        if not required and draw(st.integers(0, 2)) > 0:
            continue
        if p.kind == "block":
            block = draw(valid_chain(hparams, depth - 1, start=False)) if depth > 0 else "adam"
            continue
        if p.kind in ("signal", "value", "any"):
            v = draw(st.sampled_from(["param", "(grad | sign)", "ema(0.99)", "ema"] +
                                     (["0.5", "2"] if p.kind != "signal" else [])))
        elif p.kind == "bool":
            v = draw(st.sampled_from(["true", "false"] + (["flag"] if "flag" in hparams else [])))
        elif p.kind == "choice":
            v = draw(st.sampled_from(list(p.choices)))
        else:
            choices = _in_range(p)
            if p.kind == "scalar" and 0 <= p.low and p.high >= 1:
                choices += [h for h in ("b1", "betas[0]", "betas[1]") if h.split("[")[0] in hparams]
                if p.high == float("inf"):
                    choices += [h for h in ("wd", "tau", "2 * lr", "1 / step") if h.split(" ")[-1] in hparams
                                or h in ("2 * lr", "1 / step")]
            v = draw(st.sampled_from(choices))
        args.append(f"{p.name}={v}")
    text = op.name + (f"({', '.join(args)})" if args or draw(st.booleans()) else "")
    return text + (f" {{ {block} }}" if block else "")


def _required():
    from gradpipe.compiler.ops.base import REQUIRED
    return REQUIRED


@st.composite
def valid_chain(draw, hparams: tuple[str, ...], depth: int = 1, start: bool = True, names: tuple[str, ...] = ()):
    stages = draw(st.lists(st.one_of(valid_calls(hparams, depth), *( [st.sampled_from(names)] if names else [])),
                           min_size=1, max_size=4))
    if start:
        stages = [draw(st.sampled_from(["grad", "grad", "param"]))] + stages
    return draw(st.sampled_from([" | ", "|", "\n  | "])).join(stages)


@st.composite
def valid_programs(draw):
    """Hyperparameters, lets and defs that the pipeline uses, then a pipeline or routes."""
    hp = tuple(draw(st.lists(st.sampled_from(sorted(_VALID_HPARAMS)), unique=True, max_size=4)))
    lines = [_VALID_HPARAMS[h] for h in hp]
    names: list[str] = []
    if draw(st.booleans()):
        lines.append(f"let rule = {draw(valid_chain(hp, 1, start=False))}")
        names.append("rule")
    if draw(st.booleans()):
        lines.append(f"def core(beta=0.9) = ema(beta) | {draw(valid_chain(hp, 0, start=False))}")
        names += ["core", "core(0.5)", "core(beta=0.99)"]
    if draw(st.booleans()):
        lines.append("# " + draw(st.sampled_from(["a comment", "x | y", "(", '"'])))
    if draw(st.booleans()):
        lines.append(draw(valid_chain(hp, 1, names=tuple(names))))
    else:
        sels = draw(st.lists(st.sampled_from(['"*.bias"', "ndim >= 2", 'ndim < 2 and not "*.bias"',
                                               r"/norm\./", 'numel <= 16 or "x.*"']), min_size=1, max_size=3,
                             unique=True))
        lines += [f"route {sel}: {draw(valid_chain(hp, 1, names=tuple(names)))}" for sel in sels]
        if draw(st.booleans()):
            lines.append(f"route default: {draw(valid_chain(hp, 0))}")
    return "\n".join(lines) + "\n"


@st.composite
def wild_programs(draw):
    """A whole file: definitions, then one pipeline or routes (or, now and then, both or none)."""
    lines = draw(st.lists(statements(), max_size=5))
    shape = draw(st.sampled_from(["body", "body", "routes", "routes", "both", "none", "param"]))
    if shape in ("body", "both"):
        lines.append(draw(chains(2)))
    if shape == "param":  # the parameter's new value, with eval and train sequences now and then
        lines.append(f"param = {draw(st.one_of(chains(1), scalars(1)))}")
        for mode in draw(st.lists(st.sampled_from(["eval", "train"]), max_size=2)):
            lines.append(f"{mode}: param = {draw(st.one_of(scalars(1), st.sampled_from(['param', 's', 'grad'])))}")
    if shape in ("routes", "both"):
        for _ in range(draw(st.integers(1, 3))):
            lines.append(f"route {draw(selectors())}: {draw(chains(1))}")
        if draw(st.booleans()):
            lines.append(f"route default: {draw(chains(1))}")
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    end = draw(st.sampled_from(["\n", "\n", "", "\r\n", "\n\n"]))
    return end.join(lines) + end


def programs():
    """Programs that mostly compile, and wild ones that mostly do not."""
    return st.one_of(valid_programs(), wild_programs())


# ------------------------------------------------------------------ mutations of shipped pipelines
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/|[A-Za-z_][A-Za-z_0-9]*|\d+\.?\d*(?:[eE][+-]?\d+)?'
                    r"|\*\*|[<>=!]=|#[^\n]*|\n|[ \t]+|.", re.S)
ODD_CHARS = list("()[]{}|,=+-*/:.#\"'\\;`$@!?<>&^%~") + [
    "\n", "\r", "\t", "\x0b", "\x0c", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029",
    "\u202e", "\u2066", "\u200b", "\ufeff", "\ufffd", "é", "中", "😀", "\U0010ffff", "ǅ", "ﬁ",
] + list(string.ascii_letters[:6] + string.digits[:4])
TOKENS = ["grad", "param", "adam", "route", "default", "let", "def", "hparam", "import", "in", "as",
          "and", "or", "not", "ndim", "numel", "true", "false", "inf", "lr", "step", "loss", "|", "(",
          ")", "{", "}", "[", "]", ",", "=", ":", "**", "-", "1e999", "0", '"*.bias"', "/x/", "grads.main",
          "eval", "train"]


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def mutate(text: str, ops: list[tuple[str, int, int, str]]) -> str:
    """Apply ``ops`` (kind, position, second position, payload) to ``text``; positions wrap."""
    for kind, i, j, payload in ops:
        toks = tokenize(text)
        if kind in ("insert_char", "replace_char", "delete_char", "truncate"):
            n = len(text)
            k = i % (n + 1)
            if kind == "insert_char":
                text = text[:k] + payload + text[k:]
            elif kind == "replace_char" and n:
                text = text[:k % n] + payload + text[k % n + 1:]
            elif kind == "delete_char" and n:
                text = text[:k % n] + text[k % n + 1:]
            elif kind == "truncate":
                text = text[:k]
            continue
        if kind in ("delete_line", "dup_line", "swap_lines"):
            lines = text.split("\n")
            a, b = i % len(lines), j % len(lines)
            if kind == "delete_line":
                del lines[a]
            elif kind == "dup_line":
                lines.insert(a, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
            continue
        if not toks:
            toks = [""]
        a, b = i % len(toks), j % len(toks)
        if kind == "delete_token":
            del toks[a]
        elif kind == "dup_token":
            toks.insert(a, toks[a])
        elif kind == "swap_tokens":
            toks[a], toks[b] = toks[b], toks[a]
        elif kind == "insert_token":
            toks.insert(a, payload)
        elif kind == "replace_token":
            toks[a] = payload
        text = "".join(toks)
    return text


MUTATIONS = ["insert_char", "replace_char", "delete_char", "truncate", "delete_line", "dup_line", "swap_lines",
             "delete_token", "dup_token", "swap_tokens", "insert_token", "replace_token"]


@st.composite
def mutation_ops(draw, max_ops: int = 4):
    out = []
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(MUTATIONS))
        if kind in ("insert_char", "replace_char"):
            payload = draw(st.one_of(st.sampled_from(ODD_CHARS), st.characters(codec="utf-8")))
        elif kind in ("insert_token", "replace_token"):
            payload = draw(st.sampled_from(TOKENS)) + draw(st.sampled_from(["", " "]))
        else:
            payload = ""
        out.append((kind, draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)), payload))
    return out


@st.composite
def mutants(draw, max_ops: int = 4):
    """A shipped pipeline with a few random mutations."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    return mutate(SHIPPED[name], draw(mutation_ops(max_ops)))


@st.composite
def mutated_programs(draw):
    """A generated program with a few random mutations (grammar-aware, then broken)."""
    return mutate(draw(programs()), draw(mutation_ops(3)))


@st.composite
def nested_definitions(draw, max_chain: int = 6, max_unary: int = 20):
    """Definitions built from the previous ones: ``let v3 = v1 | v2``, ``def v2() = ---v1``.

    Each level may use one or two earlier names and put a run of unary minus in
    front, so the expansion can grow deep (a chain) or wide (two uses per level);
    the compiler must bound both with a GradError, never a RecursionError or
    exponential work."""
    n = draw(st.integers(1, max_chain))
    kind = draw(st.sampled_from(["let", "def"]))
    scalar = draw(st.booleans())
    head = (lambda i: f"let v{i} =") if kind == "let" else (lambda i: f"def v{i}() =")
    lines = [f"{head(0)} {'1' if scalar else 'sign'}"]
    for i in range(1, n + 1):
        refs = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=2))
        neg = "-" * draw(st.integers(0, max_unary))
        if scalar:
            body = " + ".join(f"{neg}v{r}" for r in refs)
        else:
            body = " | ".join(f"v{r}" for r in refs)
            if neg:
                body = f"scale({neg}1) | {body}"
        lines.append(f"{head(i)} {body}")
    lines.append(f"grad | scale(v{n})" if scalar else f"grad | v{n}")
    return "\n".join(lines) + "\n"


# Raw character soup: the full Unicode range (surrogates are excluded by Hypothesis:
# a str with a lone surrogate cannot come from a UTF-8 file).
soup = st.lists(st.one_of(st.sampled_from(ODD_CHARS + TOKENS), st.characters()), max_size=40).map("".join)

#: name -> strategy; the nightly script runs every one of them.
STRATEGIES = {"programs": programs(), "mutants": mutants(), "mutated_programs": mutated_programs(), "soup": soup,
              "nested": nested_definitions(max_chain=40, max_unary=180)}


# ------------------------------------------------------------------ the CI tests (a few thousand cases)
def test_every_shipped_pipeline_passes_the_oracle():
    assert len(SHIPPED) >= 20
    for name, text in SHIPPED.items():
        assert check_source(text) == "compiled", name


@settings(max_examples=400, **CI)
@given(programs())
def test_generated_programs(text):
    check_source(text)


@settings(max_examples=1000, **CI)
@given(mutants())
def test_mutated_shipped_pipelines(text):
    check_source(text)


@settings(max_examples=250, **CI)
@given(mutated_programs())
def test_mutated_generated_programs(text):
    check_source(text)


@settings(max_examples=400, **CI)
@given(soup)
def test_character_soup(text):
    check_source(text)


@settings(max_examples=150, **CI)
@given(nested_definitions())
def test_nested_definitions(text):
    """Small sizes here; the nightly script runs up to 40 levels with runs of 180 '-'."""
    check_source(text)


def test_the_generators_reach_every_outcome():
    """The strategies are not degenerate: some cases compile, some are rejected by the
    compiler and some by the parser (derandomized, so this is stable)."""
    seen: dict[str, set[str]] = {}

    @settings(max_examples=150, **CI)
    @given(st.sampled_from(["programs", "mutants"]).flatmap(lambda k: st.tuples(st.just(k), STRATEGIES[k])))
    def collect(case):
        kind, text = case
        seen.setdefault(kind, set()).add(check_source(text))

    collect()
    assert seen["programs"] >= {"compiled", "rejected"}
    assert seen["mutants"] >= {"compiled", "rejected", "syntax"}


@pytest.mark.parametrize("text", [
    "grad | adam(\u2028",                    # a separator that str.splitlines() would count as a line
    "grad | adam(\x0b\x0c\x1c",
    "grad | adam\r",
    "grad |\r\n",
    "\ufeffgrad | adam",
    "grad | adam \x1b[31m",
    "route \"\x1b]0;title\x07\": grad\nroute default: grad",
    "import \"\x1b[2J.grad\"\ngrad",
    "grad | adam # \u202e comment",
    "grad | sign\n" + "(" * 70,
    "",
    "\n\n\n",
])
def test_awkward_texts(text):
    check_source(text)


def test_the_oracle_catches_what_it_should():
    """The oracle itself: a non-GradError, a position outside the text, or a missing
    caret are failures."""
    from gradpipe.dsl.diagnostics import Span
    with pytest.raises(OracleFailure, match="KeyError escaped"):
        check_error(KeyError("x"), "grad")
    with pytest.raises(OracleFailure, match="line out of range"):
        check_error(GradError("m", Span(3, 1, 3, 2, PATH, "grad")), "grad")
    with pytest.raises(OracleFailure, match="column out of range"):
        check_error(GradError("m", Span(1, 9, 1, 10, PATH, "grad")), "grad")
    with pytest.raises(OracleFailure, match="no source text"):
        check_error(GradError("m", Span(1, 1, 1, 2, PATH, None)), "grad")
    with pytest.raises(OracleFailure, match="another file"):
        check_error(GradError("m", Span(1, 1, 1, 2, "<string>", "grad")), "grad")
    check_error(GradError("m", Span(1, 5, 1, 6, PATH, "grad")), "grad")  # just past the end: fine


def test_mutate_is_deterministic_and_covers_every_kind():
    text = SHIPPED["adamw.grad"]
    for kind in MUTATIONS:
        a = mutate(text, [(kind, 123, 45, "X")])
        assert a == mutate(text, [(kind, 123, 45, "X")])
    assert mutate("grad | adam", [("truncate", 4, 0, "")]) == "grad"
    assert mutate("grad | adam", [("swap_tokens", 0, 4, "")]) == "adam | grad"
    assert "".join(tokenize(text)) == text
