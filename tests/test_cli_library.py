"""``gradpipe check`` on library files, and ``gradpipe fmt --diff``.

* A library file (only ``import``, ``hparam``, ``let`` and ``def`` lines, imported by
  pipeline files) checks clean when its definitions are valid, and its mistakes come out
  as ``path:line:col: error: ...``; ``gradpipe.load`` and ``Optimizer`` still refuse it.
* ``gradpipe fmt --diff`` prints the unified diff and writes nothing: exit 0 when every
  file is formatted, 1 when a diff was printed. ``--check --diff`` behaves as before.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import subprocess
import sys
import pathlib

import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.cli import build_parser, main
from gradpipe.compiler.program import Library, Program, check_file

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE = ("# base.grad: shared building blocks\n"
        "hparam b1 = 0.9 in [0, 1)\n"
        "\n"
        "let smooth = ema(b1)\n"
        "def surgery(beta=0.9) = project_orthogonal(ema(beta)) | clip_median\n")
#: a library that imports a library, under an alias
MID = ('import "base.grad" as base\n'
       "\n"
       "let both = base.smooth | base.surgery(0.99)\n"
       "def scaled(k=2) = base.smooth | clip_norm(k)\n"
       "def needs(beta) = ema(beta) | sign\n")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


def heads(text: str) -> list[str]:
    """``path:line:col`` of every ``error:`` line."""
    return re.findall(r"^(\S+:\d+:\d+): error: ", text, flags=re.M)


@pytest.fixture
def project(tmp_path) -> pathlib.Path:
    """A project: two libraries (one importing the other) and two pipelines importing them."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / "gradpipe.toml").write_text("")
    (d / "base.grad").write_text(BASE)
    (d / "mid.grad").write_text(MID)
    (d / "plain.grad").write_text('import "base.grad"\n\ngrad | surgery | smooth | adam(b1)\n')
    (d / "both.grad").write_text('import "mid.grad"\n\ngrad | both | scaled(1) | needs(0.5) | adam\n')
    return d


# ====================================================================== check: libraries
def test_check_a_library_file_alone(capsys, project):
    rc, out, err = run_main(capsys, "check", str(project / "base.grad"))
    assert (rc, err) == (0, "")
    assert out == "ok: 1 file(s) checked (1 of them library file(s))\n"


def test_check_a_library_that_imports_a_library(capsys, project):
    rc, out, err = run_main(capsys, "check", str(project / "mid.grad"))
    assert (rc, err) == (0, ""), err
    assert "ok: 1 file(s) checked" in out


def test_check_a_project_with_libraries_and_pipelines(capsys, project):
    rc, out, err = run_main(capsys, "check", str(project))
    assert (rc, err) == (0, ""), err
    assert out == "ok: 4 file(s) checked (2 of them library file(s))\n"


def test_check_file_gives_a_library_or_a_program(project):
    lib = check_file(project / "base.grad")
    assert isinstance(lib, Library)
    assert (lib.name, lib.lets, lib.defs, lib.imports) == ("base", ["smooth"], ["surgery"], [])
    assert list(lib.hyperparams) == ["b1"]  # no implicit lr: a library declares what it declares
    mid = check_file(str(project / "mid.grad"))
    assert isinstance(mid, Library)
    assert (mid.lets, mid.defs, mid.imports) == (["both"], ["scaled", "needs"], ["base.grad"])
    assert list(mid.hyperparams) == ["b1"]  # imported hyperparameters count
    assert isinstance(check_file(project / "both.grad"), Program)
    assert isinstance(check_file("adam"), Program)  # a built-in name


@pytest.mark.parametrize("source, line, column, message", [
    # a def nothing calls, with defaults: compiled with them
    ("let ok = ema(0.9)\ndef unused(beta=0.9) = ema(beta) | adma\n", 2, 36, "unknown name 'adma'"),
    ("def unused(beta=0.9) = ema(beta) | clip_norm(scope=nope)\n", 1, 52, "'nope' is not a valid scope"),
    # an op's valid range, a constant: known without a pipeline
    ("let bad = ema(1.5)\n", 1, 15, "beta=1.5 is outside the valid range [0, 1) of 'ema'"),
    ("hparam b = 0.9\nlet s = ema(b) | sgin\n", 2, 18, "unknown name 'sgin'"),
    ("let s = lib.smooth\n", 1, 9, "unknown module 'lib'"),
    ("let a = b\nlet b = a\n", 1, 1, "defined in terms of itself"),
    ("hparam b = 2 in [0, 1]\nlet s = ema(0.9)\n", 1, 12, "default b=2 is outside its declared range"),
], ids=["unused_def", "choice_argument", "let_range", "let_unknown_op", "unknown_alias", "let_cycle",
        "hparam_range"])
def test_check_reports_an_error_in_a_library_at_its_position(capsys, tmp_path, source, line, column, message):
    path = tmp_path / "lib.grad"
    path.write_text(source)
    rc, out, err = run_main(capsys, "check", str(path))
    assert rc == 1 and out == ""
    assert heads(err)[0] == f"{path}:{line}:{column}", err
    assert message in err.splitlines()[0], err
    assert err.endswith("1 of 1 file(s) have errors\n")
    assert "Traceback" not in err
    with pytest.raises(GradError) as info:
        check_file(path)
    assert err == f"{info.value}\n1 of 1 file(s) have errors\n"


def test_every_error_of_a_library_is_reported(capsys, tmp_path):
    path = tmp_path / "lib.grad"
    path.write_text("let a = grad | adma\ndef f(beta=0.9) = ema(beta) | sgin\nlet c = ema(b9)\n")
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1
    assert sorted(heads(err)) == [f"{path}:1:16", f"{path}:2:31", f"{path}:3:13"], err


def test_an_error_in_an_unused_def_of_a_library_in_a_project(capsys, project):
    """The pipeline importing the library does not call the broken def: it checks clean, the
    library does not, and the error points into the library."""
    (project / "base.grad").write_text(BASE + "def spare(tau=1.0) = ema(0.5) | clip_norm(tau) | adma\n")
    rc, out, err = run_main(capsys, "check", str(project))
    assert rc == 1
    assert heads(err) == [f"{project / 'base.grad'}:6:50"], err
    assert "unknown name 'adma'" in err
    assert err.endswith("1 of 4 file(s) have errors\n")


def test_an_error_in_a_library_that_imports_a_library(capsys, project):
    (project / "mid.grad").write_text(MID + "def broken(k=1) = base.smoth | clip_norm(k)\n")
    rc, _, err = run_main(capsys, "check", str(project / "mid.grad"))
    assert rc == 1
    assert heads(err) == [f"{project / 'mid.grad'}:6:19"], err
    assert "smoth" in err and "smooth" in err  # the hint names the library's let


def test_a_library_importing_a_missing_file_is_an_error(capsys, tmp_path):
    (tmp_path / "gradpipe.toml").write_text("")
    path = tmp_path / "lib.grad"
    path.write_text('import "gone.grad"\nlet s = ema(0.9)\n')
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1 and heads(err) == [f"{path}:1:1"] and "cannot find the imported file" in err


@pytest.mark.parametrize("source", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_an_empty_file_is_still_an_error(capsys, tmp_path, source):
    path = tmp_path / "empty.grad"
    path.write_text(source)
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1 and heads(err) == [f"{path}:1:1"] and "the file is empty" in err
    with pytest.raises(GradError, match="the file is empty"):
        check_file(path)


def test_load_and_the_optimizer_refuse_a_library_with_a_hint(project):
    path = project / "base.grad"
    for make in (lambda: gradpipe.load(path),
                 lambda: gradpipe.Optimizer([torch.nn.Parameter(torch.zeros(2))], str(path))):
        with pytest.raises(GradError) as info:
            make()
        e = info.value
        assert (e.path, e.line, e.column) == (str(path), 1, 1)
        assert e.message == "the file defines no pipeline"
        text = str(e)
        assert "library" in text and "'import'" in text and "grad | adam" in text
    with pytest.raises(GradError, match="defines no pipeline"):
        gradpipe.compile("let s = ema(0.9)\n")


def test_a_built_in_name_and_a_library_together(capsys, project):
    rc, out, err = run_main(capsys, "check", "adam", str(project / "base.grad"))
    assert (rc, err) == (0, "")
    assert out == "ok: 2 file(s) checked (1 of them library file(s))\n"


def test_check_help_mentions_libraries(capsys):
    rc, out, _ = run_main(capsys, "check", "--help")
    assert rc == 0 and "library" in out


def test_console_script_checks_a_project_with_a_library(project):
    exe = pathlib.Path(sys.executable).parent / "gradpipe"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gradpipe"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(argv + ["check", str(project)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "ok: 4 file(s) checked" in res.stdout and "Traceback" not in res.stderr


# ====================================================================== fmt --diff
UGLY = "grad|adam( 0.9 )|clip_norm(1,scope=tensor)\n"
PRETTY = "grad | adam(0.9) | clip_norm(1, scope=tensor)\n"
OLD_NS = 1_000_000_000 * 10**9  # 2001-09-09: any write would move the mtime


def _aged(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def _expected_diff(path: pathlib.Path, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path),
                                        f"{path} (formatted)"))


def test_the_formatter_agrees_with_the_fixture():
    assert gradpipe.format_source(UGLY) == PRETTY


def test_fmt_diff_prints_the_diff_and_writes_nothing(capsys, tmp_path):
    f = _aged(tmp_path / "ugly.grad", UGLY)
    before = f.read_bytes()
    rc, out, err = run_main(capsys, "fmt", "--diff", str(f))
    assert rc == 1
    assert out == _expected_diff(f, UGLY, PRETTY)  # only the diff on stdout
    assert out.startswith(f"--- {f}\n+++ {f} (formatted)\n@@ ")
    assert "-grad|adam( 0.9 )" in out and "+grad | adam(0.9)" in out
    assert err == f"would reformat {f}\n"
    assert f.read_bytes() == before
    assert f.stat().st_mtime_ns == OLD_NS


def test_fmt_diff_on_a_formatted_file_exits_0_and_prints_no_diff(capsys, tmp_path):
    f = _aged(tmp_path / "pretty.grad", PRETTY)
    rc, out, err = run_main(capsys, "fmt", "--diff", str(f))
    assert (rc, out) == (0, "")
    assert err == "1 file(s) already formatted\n"
    assert f.read_bytes() == PRETTY.encode() and f.stat().st_mtime_ns == OLD_NS


def test_fmt_diff_on_a_folder(capsys, tmp_path):
    ugly = _aged(tmp_path / "a.grad", UGLY)
    pretty = _aged(tmp_path / "b.grad", PRETTY)
    (tmp_path / "sub").mkdir()
    ugly2 = _aged(tmp_path / "sub" / "c.grad", "let x = ema( 0.9 )\ngrad|x|adam\n")
    rc, out, err = run_main(capsys, "fmt", "--diff", str(tmp_path))
    assert rc == 1
    assert out == _expected_diff(ugly, UGLY, PRETTY) + \
        _expected_diff(ugly2, "let x = ema( 0.9 )\ngrad|x|adam\n", "let x = ema(0.9)\ngrad | x | adam\n")
    assert str(pretty) not in out
    assert err == f"would reformat {ugly}\nwould reformat {ugly2}\n"
    for f in (ugly, pretty, ugly2):
        assert f.stat().st_mtime_ns == OLD_NS
    assert ugly.read_text() == UGLY and ugly2.read_text() == "let x = ema( 0.9 )\ngrad|x|adam\n"


def test_fmt_diff_with_a_broken_file_reports_it_and_writes_nothing(capsys, tmp_path):
    bad = _aged(tmp_path / "bad.grad", "grad | adam(0.9\n")
    ugly = _aged(tmp_path / "ugly.grad", UGLY)
    rc, out, err = run_main(capsys, "fmt", "--diff", str(tmp_path))
    assert rc == 1
    assert out == _expected_diff(ugly, UGLY, PRETTY)
    assert heads(err) == [f"{bad}:1:16"]
    assert bad.stat().st_mtime_ns == ugly.stat().st_mtime_ns == OLD_NS


def test_fmt_check_diff_keeps_its_behaviour(capsys, tmp_path):
    f = _aged(tmp_path / "ugly.grad", UGLY)
    rc, out, err = run_main(capsys, "fmt", "--check", "--diff", str(f))
    assert (rc, err) == (1, "")
    assert out == f"would reformat {f}\n" + _expected_diff(f, UGLY, PRETTY)
    assert f.read_text() == UGLY and f.stat().st_mtime_ns == OLD_NS
    g = _aged(tmp_path / "pretty.grad", PRETTY)
    rc, out, err = run_main(capsys, "fmt", "--check", "--diff", str(g))
    assert (rc, out, err) == (0, "1 file(s) already formatted\n", "")


def test_fmt_without_flags_still_rewrites(capsys, tmp_path):
    f = _aged(tmp_path / "ugly.grad", UGLY)
    rc, out, _ = run_main(capsys, "fmt", str(f))
    assert (rc, out) == (0, f"reformatted {f}\n")
    assert f.read_text() == PRETTY and f.stat().st_mtime_ns != OLD_NS


def test_fmt_diff_on_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(UGLY))
    rc, out, _ = run_main(capsys, "fmt", "--diff", "-")
    assert rc == 1 and out == _expected_diff(pathlib.Path("<stdin>"), UGLY, PRETTY)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PRETTY))
    rc, out, _ = run_main(capsys, "fmt", "--diff", "-")
    assert (rc, out) == (0, "")
    monkeypatch.setattr(sys, "stdin", io.StringIO(UGLY))
    rc, out, _ = run_main(capsys, "fmt", "--check", "-")
    assert (rc, out) == (1, "would reformat <stdin>\n")


def test_fmt_help_states_the_exit_status_of_diff():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["fmt"].format_help().split())
    assert "exit 1 if a file would change, 0 if none would" in help_text
    assert "black --diff exits 0 unless --check" in help_text


# ====================================================================== compare / serve over a folder
def test_a_folder_with_libraries_lists_its_pipelines_only(project):
    """``gradpipe compare DIR`` and ``gradpipe serve DIR`` train the folder's pipelines: its
    library files are checked, not trained (they have no pipeline to build an optimizer from)."""
    from gradpipe.flows.checks import check_serve, grad_files
    assert [pathlib.Path(f).name for f in grad_files(project)] == ["both.grad", "plain.grad"]
    assert check_serve(project, "0 3 * * *") == project.resolve()


def test_a_broken_library_in_a_folder_stops_the_comparison(project):
    from gradpipe.flows.checks import grad_files
    (project / "base.grad").write_text(BASE.replace("adam", "adma", 1) if "adam" in BASE else BASE + "let bad = adma\n")
    with pytest.raises(GradError, match="base.grad"):
        grad_files(project)


def test_fmt_diff_of_a_file_without_a_final_newline_is_a_patch_that_applies(capsys, tmp_path):
    import shutil
    f = tmp_path / "nonl.grad"
    f.write_text("grad|adam")
    rc, out, _ = run_main(capsys, "fmt", "--diff", str(f))
    assert rc == 1 and "\\ No newline at end of file\n" in out
    if shutil.which("patch"):
        patched = subprocess.run(["patch", "-o", "-", str(f)], input=out, capture_output=True, text=True)
        assert patched.returncode == 0, patched.stderr
        assert patched.stdout == "grad | adam\n"
    assert f.read_text() == "grad|adam"


# ====================================================================== rules across arguments in definitions
@pytest.mark.parametrize("source, line, column", [
    ("let bad = grad | group_scale(low=2, high=1) { adam }\n", 1, 18),
    ("def f(x=1) = grad | group_scale(low=x, high=0.5) { adam }\n", 1, 21),
    ("hparam lo = 2\nlet bad = grad | group_scale(low=lo, high=1) { adam }\n", 2, 18),
    ("let bad = grad | group_scale(low=2, high=1) { adam }\ngrad | adam\n", 1, 18),
], ids=["library_let", "library_def", "library_hparam_default", "unused_let_of_a_pipeline"])
def test_a_rule_across_arguments_is_checked_in_a_definition_no_pipeline_uses(capsys, tmp_path, source, line,
                                                                            column):
    f = tmp_path / "defs.grad"
    f.write_text(source)
    rc, _, err = run_main(capsys, "check", str(f))
    assert rc == 1
    assert f"{f}:{line}:{column}: error: group_scale needs low <= high" in err
