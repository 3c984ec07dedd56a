"""Prose claims about commands, flags, environment variables and files are checked.

README.md and every docs/*.md page are read as Markdown (fenced code blocks and
inline code spans told apart), and:

* every ``gradpipe <subcommand> ...`` written in a code block or a code span names a
  subcommand of the CLI's parser (``gradpipe.cli.build_parser``; nothing is run), and
  every ``--flag`` (or ``-x``) written after it is an option of that subcommand; a code
  span that starts with a ``--flag`` (``--backend compiled`` in a sentence about
  ``compare``) names an option of some subcommand, or of a script in ``benchmarks/``
  (docs/ops.md is left out of this: it quotes the papers' own command lines);
* every ``GRADPIPE_*`` environment variable the docs name is read somewhere in
  ``gradpipe/`` (its name appears in the source);
* every relative link (``[text](path#anchor)``) leads to a file of the repository, and
  its anchor, if any, to a heading of that page; every repository path written in the
  docs (``docs/...``, ``gradpipe/...``, ``tests/...``, ``benchmarks/...``, ``.ci/...``,
  and ``pipelines/...`` as a whole code span) exists, and a ``tests/x.py::name`` names a
  test in that file.

A failure names the page and the line. Fast: one parse of the CLI, no subprocess.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

#: Example paths the docs use for the reader's own files: they are not in the repository.
EXAMPLE_PATHS = {
    "pipelines/mine.grad",  # language.md 9: the user's file with a typo
}

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: a command: ``gradpipe`` (possibly ``.venv/bin/gradpipe``) and a lowercase word, not
#: ``gradpipe.compile``, ``gradpipe/cli.py`` or ``gradpipe-scheduled``
_INVOCATION = re.compile(r"(?:^|(?<=[\s;&|(`$]))(?:[\w.~-]*/)?gradpipe[ \t]+([a-z][a-z0-9_-]*)(?![\w-])")
_ENV = re.compile(r"\bGRADPIPE_[A-Z0-9_]+\b")
_TOP = ("docs", "gradpipe", "tests", "benchmarks", ".ci")
_REPO_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(re.escape(t) for t in _TOP) + r")/[\w./*<>-]*(?:::\w+)?)")


@dataclass(frozen=True)
class Line:
    page: pathlib.Path
    number: int  # 1-based
    text: str
    block: str | None  # the language of the fenced block holding the line ('' if none given), or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.number}"


def page_lines(page: pathlib.Path) -> list[Line]:
    """The lines of a page, each marked with the fenced block it is in (fences left out)."""
    out: list[Line] = []
    fence: str | None = None
    lang: str | None = None
    for i, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(text)
        if m and fence is None:
            fence, lang = m.group(1), m.group(2).lower()
            continue
        if m and fence is not None and text.strip().startswith(fence[0] * len(fence)) and not m.group(2):
            fence = lang = None
            continue
        out.append(Line(page, i, text, lang if fence is not None else None))
    return out


def code_spans(text: str) -> list[str]:
    """The inline code spans of a prose line (``\\|`` in a table cell is ``|``)."""
    return [m.group(2).strip().replace("\\|", "|") for m in _SPAN.finditer(text)]


def prose_without_spans(text: str) -> str:
    return _SPAN.sub(" ", text)


# ------------------------------------------------------------------ commands and flags
@dataclass(frozen=True)
class Invocation:
    where: str
    command: str
    words: tuple[str, ...]  # what follows the subcommand, as the shell would split it

    @property
    def flags(self) -> list[str]:
        out = []
        for w in self.words:
            w = w.strip("[]")
            m = re.match(r"^(--?[A-Za-z][\w-]*)", w)
            if m:
                out.append(m.group(1))
        return out


def _words(rest: str) -> tuple[str, ...]:
    """What follows a subcommand, up to a shell comment or the next command."""
    rest = re.split(r"\s#|\s&&\s|\s\|\|\s|;|\s\|\s", " " + rest, maxsplit=1)[0]
    try:
        return tuple(shlex.split(rest))
    except ValueError:  # an unbalanced quote in a synopsis: split on blanks
        return tuple(rest.split())


def _invocations_in(text: str, where: str) -> list[Invocation]:
    out = []
    for m in _INVOCATION.finditer(text):
        after = text[m.end():]
        if after.startswith(":"):  # an error message: "gradpipe compare: unknown task ..."
            continue
        out.append(Invocation(where, m.group(1), _words(after)))
    return out


def invocations(page: pathlib.Path) -> list[Invocation]:
    """Every ``gradpipe <subcommand> ...`` of a page: in code blocks (a synopsis continued on
    lines that start with ``[`` or ``-``, or after a trailing backslash, is one command) and
    in inline code spans."""
    out: list[Invocation] = []
    lines = page_lines(page)
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.block is None:
            for span in code_spans(ln.text):
                out.extend(_invocations_in(span, ln.where))
            i += 1
            continue
        text = re.sub(r"^\s*\$\s+", "", ln.text)
        j = i + 1
        if _INVOCATION.search(text):
            while j < len(lines) and lines[j].block is not None and (
                    text.rstrip().endswith("\\") or re.match(r"^\s+[\[-]", lines[j].text)):
                text = text.rstrip().rstrip("\\") + " " + lines[j].text.strip()
                j += 1
        out.extend(_invocations_in(text, ln.where))
        i = j
    return out


@pytest.fixture(scope="module")
def subcommands():
    """``{subcommand: its option strings}`` from the CLI's own parser, built without running
    anything. Building it sets a few Prefect and MLflow defaults in ``os.environ``
    (``flows.commands.add_commands``); they are undone here."""
    import argparse

    from gradpipe.cli import build_parser
    saved = dict(os.environ)
    try:
        parser = build_parser()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1, "the CLI should have one set of subcommands"
    return {name: set(sp._option_string_actions) for name, sp in subs[0].choices.items()}


def test_the_docs_show_commands():
    """The extractor finds the commands the docs show (a guard against a scan that finds nothing)."""
    found = [inv for page in PAGES for inv in invocations(page)]
    assert len(found) >= 50, f"only {len(found)} gradpipe commands found in the docs"
    assert {inv.command for inv in found} >= {"check", "fmt", "explain", "graph", "diff", "ops", "bench",
                                               "train", "compare", "serve", "ui", "demo"}
    assert any(inv.flags for inv in found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_in_the_docs_exists(page, subcommands):
    problems = []
    for inv in invocations(page):
        if inv.command not in subcommands:
            problems.append(f"{inv.where}: 'gradpipe {inv.command}' is not a gradpipe subcommand "
                            f"(the CLI has: {', '.join(sorted(subcommands))})")
            continue
        for flag in inv.flags:
            if flag not in subcommands[inv.command]:
                known = sorted(f for f in subcommands[inv.command] if f.startswith("--") and f != "--help")
                problems.append(f"{inv.where}: 'gradpipe {inv.command}' has no option {flag} "
                                f"(it has: {', '.join(known) or 'none'})")
    assert not problems, "\n".join(problems)


def _script_options() -> set[str]:
    """The long options the scripts in benchmarks/ declare (``add_argument("--x", ...)``)."""
    out: set[str] = set()
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        out |= set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", f.read_text(encoding="utf-8")))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "ops.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_named_on_its_own_exists(page, subcommands):
    known = set().union(*subcommands.values()) | _script_options()
    problems = []
    for ln in page_lines(page):
        if ln.block is not None:
            continue
        for span in code_spans(ln.text):
            if not span.startswith("--"):
                continue
            for flag in Invocation(ln.where, "", _words(span)).flags:
                if flag.startswith("--") and flag not in known:
                    problems.append(f"{ln.where}: no gradpipe subcommand (nor script in benchmarks/) has "
                                    f"the option {flag}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ environment variables
def _source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "gradpipe").rglob("*.py")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_gradpipe_environment_variable_in_the_docs_is_read(page):
    source = _source_text()
    problems = []
    for ln in page_lines(page):
        for name in _ENV.findall(ln.text):
            if not re.search(rf"\b{name}\b", source):
                problems.append(f"{ln.where}: {name} is read nowhere in gradpipe/")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ links and paths
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for ln in page_lines(page):
        if ln.block is not None:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", ln.text)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", ln.text))
    return out


def _check_repo_path(path: str) -> str | None:
    """Why ``path`` (relative to the repository root) is not there, or None."""
    path, _, test = path.partition("::")
    path = path.rstrip(".,;:)")
    if re.search(r"[*<>]", path) or path in EXAMPLE_PATHS:  # a pattern or a placeholder
        return None
    target = ROOT / path
    if not target.exists():
        return f"{path} does not exist"
    if test:
        name = test.split("[")[0]
        if not re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\b", target.read_text(encoding="utf-8"), re.M):
            return f"{path} has no test {name}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_in_the_docs_exists(page):
    problems = []
    for ln in page_lines(page):
        if ln.block is None:
            for target in _LINK.findall(prose_without_spans(ln.text)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    problems.append(f"{ln.where}: the link to {target} leads to no file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    problems.append(f"{ln.where}: {dest.relative_to(ROOT)} has no heading #{anchor}")
            for span in code_spans(ln.text):
                if re.fullmatch(r"pipelines/[\w./-]+", span):
                    why = _check_repo_path(span)
                    if why:
                        problems.append(f"{ln.where}: {why}")
            texts = [prose_without_spans(ln.text)] + code_spans(ln.text)
        else:
            texts = [ln.text]
        for text in texts:
            for path in _REPO_PATH.findall(text):
                why = _check_repo_path(path)
                if why:
                    problems.append(f"{ln.where}: {why}")
    assert not problems, "\n".join(problems)
