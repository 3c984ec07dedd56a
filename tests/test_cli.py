"""The ``gradpipe`` command line, in-process (``gradpipe.cli.main``) and as a real process.

A mistake in a `.grad` file must come out as ``path:line:col: error: ...`` lines and
exit status 1, never as a Python traceback. (``gradpipe demo`` is tested elsewhere.)
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest


import gradpipe
from gradpipe.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BROKEN = ("route default: grad | adam\n"
          "route /b[/: grad | sign\n"
          "route /a(/: grad | adma\n")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it: (exit status, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse exits for --version, usage errors
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


def console_script() -> str:
    here = pathlib.Path(sys.executable).parent / ("gradpipe.exe" if os.name == "nt" else "gradpipe")
    if here.exists():
        return str(here)
    found = shutil.which("gradpipe")
    if found is None:
        pytest.skip("the gradpipe console script is not installed")
    return found


def run_process(argv: list[str], *, cwd: pathlib.Path | None = None, stdin: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def broken_dir(tmp_path):
    d = tmp_path / "pipes"
    d.mkdir()
    (d / "good.grad").write_text("grad | adam\n")
    (d / "broken.grad").write_text(BROKEN)
    return d


def diag_heads(text: str) -> list[str]:
    """``path:line:col`` of every ``error:`` line."""
    return re.findall(r"^(\S+:\d+:\d+): error: ", text, flags=re.M)


# ------------------------------------------------------------------------ check
def test_check_shipped_pipelines_exits_0(capsys):
    rc, out, err = run_main(capsys, "check", str(PIPELINES))
    assert rc == 0, err
    n = len(list(PIPELINES.glob("*.grad")))
    assert f"{n} file(s) checked" in out
    assert err == ""


def test_check_builtin_name(capsys):
    rc, out, _ = run_main(capsys, "check", "scalpel")
    assert rc == 0 and "1 file(s) checked" in out


def test_check_a_dir_with_one_broken_file_prints_every_diagnostic(capsys, broken_dir):
    rc, out, err = run_main(capsys, "check", str(broken_dir))
    assert rc == 1
    broken = broken_dir / "broken.grad"
    assert diag_heads(err) == [f"{broken}:2:7", f"{broken}:3:7"]
    assert "invalid regular expression" in err
    assert "  route /b[/: grad | sign\n        ^" in err
    assert "1 of 2 file(s) have errors" in err
    assert "Traceback" not in err and "Traceback" not in out


def test_check_reports_each_broken_file(capsys, tmp_path):
    (tmp_path / "a.grad").write_text("grad | adma\n")
    (tmp_path / "b.grad").write_text("grad | adam(b1=1.5)\n")
    (tmp_path / "c.grad").write_bytes(b"grad\x00")
    (tmp_path / "d.grad").write_bytes("# caf\u00e9\n".encode("latin-1"))
    (tmp_path / "e.grad").write_text("")
    rc, out, err = run_main(capsys, "check", str(tmp_path))
    assert rc == 1
    heads = diag_heads(err)
    assert heads == [f"{tmp_path / 'a.grad'}:1:8", f"{tmp_path / 'b.grad'}:1:16", f"{tmp_path / 'c.grad'}:1:1",
                     f"{tmp_path / 'd.grad'}:1:6", f"{tmp_path / 'e.grad'}:1:1"], err
    assert "did you mean 'adam'?" in err
    assert "5 of 5 file(s) have errors" in err
    assert "Traceback" not in err


def test_check_missing_path_and_unknown_name(capsys, tmp_path):
    rc, _, err = run_main(capsys, "check", str(tmp_path / "nope.grad"), "adma")
    assert rc == 1
    assert f"{tmp_path / 'nope.grad'}:1:1: error: no such file" in err
    assert "adma:1:1: error:" in err and "did you mean" in err
    assert "Traceback" not in err


def test_check_import_cycle(capsys, tmp_path):
    (tmp_path / "a.grad").write_text('import "b.grad"\ngrad | adam\n')
    (tmp_path / "b.grad").write_text('import "a.grad"\nlet s = sign\n')
    rc, _, err = run_main(capsys, "check", str(tmp_path / "a.grad"))
    assert rc == 1
    assert "import cycle: a.grad -> b.grad -> a.grad" in err


# ------------------------------------------------------------------------ fmt
def test_fmt_check_then_fmt_then_check_again(capsys, tmp_path):
    f = tmp_path / "u.grad"
    f.write_text("grad|adam( 0.9 )|clip_norm(1,scope=tensor)\n")
    rc, out, _ = run_main(capsys, "fmt", "--check", str(f))
    assert rc == 1 and f"would reformat {f}" in out
    assert f.read_text() == "grad|adam( 0.9 )|clip_norm(1,scope=tensor)\n"  # --check changes nothing

    rc, out, _ = run_main(capsys, "fmt", "--check", "--diff", str(f))
    assert rc == 1 and "+grad | adam(0.9)" in out

    rc, out, _ = run_main(capsys, "fmt", str(f))
    assert rc == 0 and f"reformatted {f}" in out
    assert f.read_text() == gradpipe.format_source("grad|adam( 0.9 )|clip_norm(1,scope=tensor)\n")

    rc, out, _ = run_main(capsys, "fmt", "--check", str(f))
    assert rc == 0 and "already formatted" in out


def test_fmt_check_on_a_directory(capsys, tmp_path):
    (tmp_path / "ok.grad").write_text(gradpipe.format_source("grad | adam\n"))
    (tmp_path / "messy.grad").write_text("grad|sign\n")
    rc, out, _ = run_main(capsys, "fmt", "--check", str(tmp_path))
    assert rc == 1
    assert "messy.grad" in out and "ok.grad" not in out


def test_fmt_check_passes_on_the_shipped_pipelines(capsys):
    # the design's CI step: `gradpipe fmt --check pipelines/`
    rc, out, err = run_main(capsys, "fmt", "--check", str(PIPELINES))
    assert rc == 0, out + err


def test_fmt_stdin(capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("grad|adam( 0.9 )\n"))
    rc, out, _ = run_main(capsys, "fmt", "-")
    assert rc == 0
    assert out == "grad | adam(0.9)\n"


def test_fmt_stdin_syntax_error(capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("grad | adam(0.9\n"))
    rc, out, err = run_main(capsys, "fmt", "-")
    assert rc == 1 and out == ""
    assert diag_heads(err) == ["<stdin>:1:16"]
    assert "Traceback" not in err


def test_fmt_reports_bad_files_and_keeps_going(capsys, tmp_path):
    (tmp_path / "bad.grad").write_text("grad | adam(\n")
    (tmp_path / "bin.grad").write_bytes(b"\x00\x01")
    (tmp_path / "messy.grad").write_text("grad|sign\n")
    rc, out, err = run_main(capsys, "fmt", str(tmp_path))
    assert rc == 1
    assert f"{tmp_path / 'bad.grad'}:" in err and f"{tmp_path / 'bin.grad'}:1:1:" in err
    assert (tmp_path / "messy.grad").read_text() == "grad | sign\n"
    assert (tmp_path / "bad.grad").read_text() == "grad | adam(\n"  # never rewritten
    assert "Traceback" not in err


def test_fmt_missing_file(capsys, tmp_path):
    rc, _, err = run_main(capsys, "fmt", str(tmp_path / "nope.grad"))
    assert rc == 1 and "nope.grad" in err and "Traceback" not in err


# ------------------------------------------------------------------------ explain
def test_explain_scalpel(capsys):
    rc, out, err = run_main(capsys, "explain", "scalpel")
    assert rc == 0, err
    prog = gradpipe.load("scalpel")
    for node in ("main/grad", "main/project_orthogonal/ema", "main/project_orthogonal", "main/clip_median",
                 "main/diffgrad", "main/out"):
        assert re.search(rf"^\s+{re.escape(node)}\s", out, flags=re.M), node
    nbytes = prog.state_bytes_per_param("main")
    assert nbytes == 4 * len(prog.state_buffers()) == 20  # ema.m, clip_median.m, diffgrad.m/v/prev
    assert f"state: {nbytes} bytes per parameter" in out
    assert "reductions:" in out
    reductions = out.split("reductions:")[1].split("\n\n")[0]
    assert re.search(r"^\s+main/project_orthogonal: .*\bglobal\b", reductions, flags=re.M), reductions
    assert re.search(r"^\s+main/clip_median: .*\bglobal\b", reductions, flags=re.M), reductions
    assert "main/diffgrad:" not in reductions
    assert prog.hash in out


def test_explain_a_file_with_per_tensor_reduction(capsys, tmp_path):
    f = tmp_path / "c.grad"
    f.write_text("grad | clip_norm(1, scope=tensor) | sign\n")
    rc, out, _ = run_main(capsys, "explain", str(f))
    assert rc == 0
    reductions = out.split("reductions:")[1].split("\n\n")[0]
    assert re.search(r"^\s+main/clip_norm: .*\btensor\b", reductions, flags=re.M), reductions
    assert "global" not in reductions
    assert "state: 0 bytes per parameter" in out


def test_explain_shows_the_cse_merge(capsys, tmp_path):
    f = tmp_path / "cse.grad"
    f.write_text("grad | project_orthogonal(ema) | add((grad | ema))\n")
    rc, out, _ = run_main(capsys, "explain", str(f))
    assert rc == 0
    assert re.search(r"CSE: main/add/ema merged into main/project_orthogonal/ema", out), out
    assert "state: 4 bytes per parameter" in out  # one ema buffer, not two


def test_explain_shows_the_cse_merge_of_two_lets(capsys, tmp_path):
    f = tmp_path / "cse2.grad"
    f.write_text("let m = grad | ema\nlet n = grad | ema\ngrad | add(m) | add(n)\n")
    rc, out, _ = run_main(capsys, "explain", str(f))
    assert rc == 0
    assert "CSE: main/n/ema merged into main/m/ema" in out


def test_explain_broken_file_is_a_diagnostic(capsys, tmp_path):
    f = tmp_path / "bad.grad"
    f.write_text("grad | adma\n")
    rc, out, err = run_main(capsys, "explain", str(f))
    assert rc == 1 and out == ""
    assert diag_heads(err) == [f"{f}:1:8"] and "Traceback" not in err


# ------------------------------------------------------------------------ graph
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_graph_dot(capsys, tmp_path):
    out_file = tmp_path / "x.dot"
    rc, out, err = run_main(capsys, "graph", "scalpel", "-o", str(out_file))
    assert rc == 0, err
    text = out_file.read_text()
    assert text.lstrip().startswith("digraph")
    assert "main/project_orthogonal/ema" in text and text.rstrip().endswith("}")
    import pydot
    assert pydot.graph_from_dot_data(text)


def test_graph_svg(capsys, tmp_path):
    out_file = tmp_path / "x.svg"
    rc, out, err = run_main(capsys, "graph", "scalpel", "-o", str(out_file))
    assert rc == 0, err
    text = out_file.read_text()
    assert "<svg" in text and "</svg>" in text
    assert "main/clip_median" in text
    import xml.dom.minidom
    xml.dom.minidom.parseString(text)  # well-formed


def test_graph_png(capsys, tmp_path):
    out_file = tmp_path / "x.png"
    rc, out, err = run_main(capsys, "graph", "scalpel", "-o", str(out_file))
    assert rc == 0, err
    data = out_file.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert b"IEND" in data[-16:]


def test_graph_unsupported_format(capsys, tmp_path):
    rc, _, err = run_main(capsys, "graph", "scalpel", "-o", str(tmp_path / "x.jpg"))
    assert rc == 1 and ".jpg" in err and "Traceback" not in err


def test_graph_into_a_missing_folder_is_an_error_not_a_traceback(capsys, tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "x.dot"
    try:
        rc, _, err = run_main(capsys, "graph", "scalpel", "-o", str(target))
    except OSError as e:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"gradpipe graph raised {type(e).__name__}: {e}")
    assert rc == 1 and "Traceback" not in err


def test_graph_broken_file(capsys, broken_dir, tmp_path):
    rc, _, err = run_main(capsys, "graph", str(broken_dir / "broken.grad"), "-o", str(tmp_path / "y.dot"))
    assert rc == 1
    assert len(diag_heads(err)) == 2
    assert not (tmp_path / "y.dot").exists()


# ------------------------------------------------------------------------ ops, version, usage
def test_ops_lists_every_op(capsys):
    from gradpipe.compiler.ops import OPS
    rc, out, _ = run_main(capsys, "ops")
    assert rc == 0
    listed = re.findall(r"^([a-z_][a-z_0-9]*)\(", out, flags=re.M)
    assert listed == sorted(OPS)
    for name in ("adam", "add", "clip_median", "clip_norm", "clip_value", "decay", "diffgrad", "ema", "lion",
                 "momentum", "noise", "project_orthogonal", "rms", "scale", "sign"):
        assert name in listed
    assert "adam(b1=0.9, b2=0.999, eps=1e-08)" in out or "adam(b1=0.9, b2=0.999, eps=1e-8)" in out
    for name in OPS:
        assert OPS[name].summary in out


def test_ops_lists_the_math_functions_after_the_ops(capsys):
    from gradpipe.compiler.prims import FUNCTIONS, SUMMARIES
    rc, out, _ = run_main(capsys, "ops")
    assert rc == 0
    ops_part, math_part = out.split("math functions and operators")
    for name in FUNCTIONS:
        assert f"  {name}(" in math_part
    for summary in SUMMARIES.values():
        assert summary in math_part


def test_version(capsys):
    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"gradpipe {gradpipe.__version__}"


def test_unknown_subcommand_exits_2(capsys):
    rc, out, err = run_main(capsys, "frobnicate")
    assert rc == 2
    assert "invalid choice" in err and "Traceback" not in err


def test_no_subcommand_exits_2(capsys):
    rc, _, err = run_main(capsys)
    assert rc == 2 and "usage:" in err


def test_missing_argument_exits_2(capsys):
    rc, _, err = run_main(capsys, "explain")
    assert rc == 2 and "usage:" in err


def test_help_lists_the_commands(capsys):
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0
    for cmd in ("check", "fmt", "explain", "graph", "ops"):
        assert cmd in out


# ------------------------------------------------------------------------ as real processes
@pytest.mark.slow
def test_python_dash_m_check_pipelines():
    res = run_process([sys.executable, "-m", "gradpipe", "check", str(PIPELINES)])
    assert res.returncode == 0, res.stderr
    assert "file(s) checked" in res.stdout


@pytest.mark.slow
def test_console_script_check_broken_dir_has_no_traceback(broken_dir):
    res = run_process([console_script(), "check", str(broken_dir)])
    assert res.returncode == 1
    assert diag_heads(res.stderr) == [f"{broken_dir / 'broken.grad'}:2:7", f"{broken_dir / 'broken.grad'}:3:7"]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_console_script_fmt_stdin_and_version(tmp_path):
    exe = console_script()
    res = run_process([exe, "fmt", "-"], stdin="grad|adam( 0.9 )\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "grad | adam(0.9)\n"
    res = run_process([exe, "fmt", "-"], stdin="grad | 'x'\n")
    assert res.returncode == 1 and "<stdin>:1:8: error:" in res.stderr and "Traceback" not in res.stderr
    res = run_process([exe, "--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"gradpipe {gradpipe.__version__}"
