"""The docs are checked against the code, so they cannot drift from it.

* Every ```grad block in docs/language.md and README.md compiles with
  :func:`gradpipe.compile`. A block preceded by an HTML comment changes that:

  - ``<!-- error -->``: it must raise :class:`gradpipe.GradError`. If the next
    fenced block is a ```text block whose first line is ``PATH:LINE:COL: error:``,
    that block is the exact error text (compiled with that PATH).
  - ``<!-- file: NAME.grad -->``: a file that later blocks of the same page import;
    it is written to a temporary folder (and must parse) instead of compiled.
  - ``<!-- fragment -->``: not checked (use sparingly).
  - ``<!-- fmt-input -->`` followed by a ```grad block marked ``<!-- fmt-output -->``:
    the second is exactly what the formatter makes of the first.
* A ```text block marked ``<!-- explain -->`` is exactly ``Program.explain()`` of the
  nearest ```grad block above it (compiled with the path its header names).
* A ```python block marked ``<!-- run -->`` runs (in a temporary folder that holds
  the page's ``file:`` blocks).
* docs/ops.md is exactly ``python -m gradpipe.docs_ops``; every op's docstring
  names a reference; the grammar summary in docs/language.md names every keyword
  of grammar.lark.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
from dataclasses import dataclass

import pytest


import gradpipe
from gradpipe.compiler.ops import OPS
from gradpipe.docs_ops import render_ops_markdown
from gradpipe.dsl.parser import parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
LANGUAGE = ROOT / "docs" / "language.md"
OPS_MD = ROOT / "docs" / "ops.md"
README = ROOT / "README.md"
PAGES = [p for p in (LANGUAGE, README) if p.exists()]

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_ERROR_HEAD = re.compile(r"^(?P<path>\S+?):\d+:\d+: error: ")


@dataclass
class Block:
    page: pathlib.Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str  # the HTML comment right above the fence ('' if none)

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def fenced_blocks(page: pathlib.Path) -> list[Block]:
    """Every fenced code block of a Markdown page, with the marker comment above it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks = m.group("ticks")
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{ticks}`*\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        marker = ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            mm = _MARKER.match(lines[j])
            if mm:
                marker = mm.group("body")
        blocks.append(Block(page, start + 1, m.group("lang").lower(), "\n".join(body) + "\n", marker))
        i += 1
    return blocks


def _all_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page)]


BLOCKS = _all_blocks()
GRAD = [b for b in BLOCKS if b.lang == "grad"]


def _files(page: pathlib.Path) -> dict[str, str]:
    out = {}
    for b in fenced_blocks(page):
        if b.lang == "grad" and b.marker.startswith("file:"):
            out[b.marker[len("file:"):].strip()] = b.text
    return out


@pytest.fixture
def page_dir(tmp_path):
    """A folder holding the ``file:`` blocks of a page; returns a writer."""
    def make(page: pathlib.Path) -> pathlib.Path:
        for name, text in _files(page).items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path
    return make


def _next_block(b: Block) -> Block | None:
    blocks = fenced_blocks(b.page)
    later = [x for x in blocks if x.line > b.line]
    return later[0] if later else None


# -------------------------------------------------------------------- grad blocks
def test_the_pages_have_examples():
    assert LANGUAGE.exists(), "docs/language.md is missing"
    assert len([b for b in GRAD if b.page == LANGUAGE]) >= 20


@pytest.mark.parametrize("block", GRAD, ids=[b.id for b in GRAD])
def test_grad_block(block: Block, page_dir):
    marker = block.marker
    folder = page_dir(block.page)
    if marker == "fragment":
        pytest.skip("marked <!-- fragment -->")
    if marker.startswith("file:"):
        parse(block.text, marker[len("file:"):].strip())
        return
    if marker == "fmt-output":
        return  # checked with its fmt-input block
    if marker == "error":
        nxt = _next_block(block)
        expected = None
        path = str(folder / "example.grad")
        if nxt is not None and nxt.lang == "text" and _ERROR_HEAD.match(nxt.text):
            expected = nxt.text.rstrip("\n")
            path = _ERROR_HEAD.match(nxt.text).group("path")
        with pytest.raises(gradpipe.GradError) as info:
            with _cwd(folder):
                gradpipe.compile(block.text, path)
        if expected is not None:
            assert str(info.value) == expected
        return
    if marker == "fmt-input":
        nxt = _next_block(block)
        assert nxt is not None and nxt.lang == "grad" and nxt.marker == "fmt-output", \
            f"{block.id}: a fmt-input block must be followed by a grad block marked fmt-output"
        assert gradpipe.format_source(block.text) == nxt.text
        return
    assert marker == "" or not re.fullmatch(r"[\w-]+", marker), f"{block.id}: unknown marker <!-- {marker} -->"
    gradpipe.compile(block.text, str(folder / "example.grad"))


@contextlib.contextmanager
def _cwd(path: pathlib.Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


EXPLAIN = [b for b in BLOCKS if b.lang == "text" and b.marker == "explain"]


@pytest.mark.parametrize("block", EXPLAIN, ids=[b.id for b in EXPLAIN])
def test_explain_block(block: Block, page_dir):
    above = [b for b in fenced_blocks(block.page) if b.lang == "grad" and b.line < block.line]
    assert above, f"{block.id}: no grad block above this explain block"
    m = re.match(r"pipeline (\S+)", block.text)
    assert m, f"{block.id}: an explain block starts with 'pipeline PATH'"
    folder = page_dir(block.page)
    with _cwd(folder):
        prog = gradpipe.compile(above[-1].text, m.group(1))
    assert prog.explain() == block.text


RUN = [b for b in BLOCKS if b.lang == "python" and b.marker == "run"]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_python_block(block: Block, page_dir):
    folder = page_dir(block.page)
    with _cwd(folder):
        exec(compile(block.text, block.id, "exec"), {"__name__": "__docs__"})


def test_markers_are_known():
    known = {"", "error", "fragment", "fmt-input", "fmt-output", "explain", "run"}
    for b in BLOCKS:
        if b.marker.startswith("file:"):
            assert b.lang == "grad", f"{b.id}: only a grad block can be a file"
            continue
        # an unrelated comment above a block is fine, but a misspelt marker is not
        if b.marker and re.fullmatch(r"[\w-]+", b.marker):
            assert b.marker in known, f"{b.id}: unknown marker <!-- {b.marker} -->"


def test_fragments_are_rare():
    fragments = [b.id for b in GRAD if b.marker == "fragment"]
    assert len(fragments) <= 3, f"too many unchecked examples: {fragments}"


# ------------------------------------------------------------------- pipelines.md
def test_pipelines_md_matches_the_pipelines():
    from gradpipe.docs_pipelines import render_pipelines_markdown
    path = ROOT / "docs" / "pipelines.md"
    assert path.read_text(encoding="utf-8") == render_pipelines_markdown(), \
        "docs/pipelines.md is stale: run python -m gradpipe.docs_pipelines > docs/pipelines.md"


# ------------------------------------------------------------------------ ops.md
def test_ops_md_matches_the_registry():
    assert OPS_MD.exists(), "docs/ops.md is missing: run python -m gradpipe.docs_ops > docs/ops.md"
    assert OPS_MD.read_text(encoding="utf-8") == render_ops_markdown(), \
        "docs/ops.md is stale: run python -m gradpipe.docs_ops > docs/ops.md"


def test_ops_md_has_a_section_per_op():
    text = render_ops_markdown()
    for name in OPS:
        assert f"\n## {name}\n" in text


def _names_a_reference(op) -> bool:
    doc = type(op).__doc__ or ""
    if re.search(r"^\s*Reference:", doc, re.M):
        return True
    # otherwise the docstring must cite one of the sources the registry names
    for part in re.split(r"[;,/]", op.reference):
        words = part.split()
        if words and words[0].strip("()") and words[0].strip("()") in doc:
            return True
    return False


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_docstring_names_a_reference(name):
    op = OPS[name]
    assert op.reference.strip(), f"op '{name}' has no reference"
    assert op.summary.strip(), f"op '{name}' has no summary"
    assert (type(op).__doc__ or "").strip(), f"op '{name}' has no docstring"
    assert _names_a_reference(op), f"the docstring of op '{name}' names no reference ({op.reference!r})"


def test_docs_ops_entry_point(capsys):
    from gradpipe import docs_ops
    assert docs_ops.main([]) == 0
    assert capsys.readouterr().out == render_ops_markdown()


# ------------------------------------------------------------------- language.md
def test_grammar_summary_names_every_keyword():
    grammar = (ROOT / "gradpipe" / "dsl" / "grammar.lark").read_text()
    keywords = set(re.findall(r'"([a-z]+)"', grammar))
    keywords |= set(re.search(r'SHAPE_ATTR:\s*(.*)', grammar).group(1).replace('"', "").split("|"))
    keywords = {k.strip() for k in keywords if k.strip()}
    assert {"import", "hparam", "let", "def", "route", "and", "or", "not", "default"} <= keywords
    ebnf = [b.text for b in fenced_blocks(LANGUAGE) if b.lang == "ebnf"]
    assert ebnf, "docs/language.md has no ```ebnf grammar summary"
    for k in sorted(keywords):
        assert re.search(rf'"{k}"', ebnf[0]), f"the grammar summary does not mention \"{k}\""


def test_language_md_links_the_op_reference():
    text = LANGUAGE.read_text(encoding="utf-8")
    assert "ops.md" in text


# ------------------------------------------------------------ ops.md: the "Adding an op" example
def _adamax_block() -> Block:
    """The ```python block of docs/ops.md ("Adding an op") that defines ``class Adamax``."""
    found = [b for b in fenced_blocks(OPS_MD) if b.lang == "python" and "class Adamax" in b.text]
    assert len(found) == 1, "docs/ops.md should hold one python block defining class Adamax"
    return found[0]


@pytest.fixture
def doc_adamax():
    """Run the docs' Adamax example, which registers op ``my_adamax``; unregister it afterwards."""
    import sys
    import types
    OPS.pop("my_adamax", None)
    block = _adamax_block()
    # a real module, as a user's own module would be: torch.compile looks the op's class up by module
    module = types.ModuleType("gradpipe_docs_adamax_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(block.text, block.id, "exec"), module.__dict__)
        assert "my_adamax" in OPS, "the example should register the op my_adamax"
        yield OPS["my_adamax"]
    finally:
        OPS.pop("my_adamax", None)
        sys.modules.pop(module.__name__, None)


_ADAMAX_HPARAMS = """\
hparam lr = 0.001 in [0, inf)
hparam b1 = 0.9 in [0, 1)
hparam b2 = 0.999 in [0, 1)
hparam eps = 1e-8 in [0, inf)

grad | my_adamax(b1, b2, eps)
"""


@pytest.mark.filterwarnings("error::gradpipe.runtime.compiled.CompileFallbackWarning")
@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("pipeline, hyper", [
    ("grad | my_adamax", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    # a large eps, so that where it is added (torch: max(b2 u, |g| + eps)) shows in the result
    (_ADAMAX_HPARAMS, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-2)),
], ids=["defaults", "hparams"])
def test_ops_md_adamax_example_matches_torch_adamax(doc_adamax, backend, pipeline, hyper):
    torch = pytest.importorskip("torch")
    assert doc_adamax.flat and doc_adamax.is_rule
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    ref.load_state_dict(ours.state_dict())
    b1, b2 = hyper["betas"]
    kw = dict(lr=hyper["lr"]) if pipeline.startswith("grad") else dict(lr=hyper["lr"], b1=b1, b2=b2,
                                                                       eps=hyper["eps"])
    opt = gradpipe.Optimizer(ours.named_parameters(), pipeline, backend=backend, **kw)
    ref_opt = torch.optim.Adamax(ref.parameters(), lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                 foreach=False)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    for step in range(1, 6):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"step {step}, {name} ({backend}): {m}")
    # the state is the example's declared buffers: m and u, each the parameter's shape
    for p, q in zip(ours.parameters(), ref.parameters()):
        st, rs = opt.state[p], ref_opt.state[q]
        (m,) = [v for k, v in st.items() if k.endswith(".m")]
        (u,) = [v for k, v in st.items() if k.endswith(".u")]
        torch.testing.assert_close(m, rs["exp_avg"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(u, rs["exp_inf"], rtol=1e-10, atol=1e-12)
