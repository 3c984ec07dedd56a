"""A `.grad` file is untrusted input (docs/security.md): what it can and cannot do.

* Imports resolve only to ``.grad`` files inside the importing program's
  project root; ``../`` escapes, symlinks out of the root, absolute paths and
  other kinds of file are GradErrors at the import.
* Size is bounded: the file, the nesting of brackets and expressions, the depth
  and number of imports. None of them can reach a RecursionError or take
  more than linear time in the parser.
* Compiling never executes code: no eval/exec/pickle/dynamic import in the
  compiler's sources, and Python in a pipeline's strings does nothing.
* Servers gradpipe starts listen on 127.0.0.1 unless asked otherwise.
"""

from __future__ import annotations

import ast as pyast
import cProfile
import gc
import inspect
import pathlib
import pstats
import sys
import threading

import pytest

import gradpipe
from gradpipe import GradError
from gradpipe.compiler import modules
from gradpipe.compiler.build import MAX_EXPANDED_DEPTH, NODE_BUDGET
from gradpipe.compiler.modules import MAX_IMPORT_DEPTH, MAX_IMPORTED_FILES, project_root
from gradpipe.compiler.program import builtin_dir, builtin_names
from gradpipe.dsl import parser as P
from gradpipe.dsl.parser import MAX_DEPTH, MAX_NESTING, MAX_SOURCE_BYTES, parse

from test_fuzz import check_error

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_error(path) -> GradError:
    with pytest.raises(GradError) as info:
        gradpipe.load(path)
    return info.value


def compile_error(src: str, path: str = "hostile.grad") -> GradError:
    with pytest.raises(GradError) as info:
        gradpipe.compile(src, path=path)
    check_error(info.value, src, path)
    return info.value


@pytest.fixture
def project(tmp_path):
    """``tmp_path/proj`` is a project (it holds gradpipe.toml); ``tmp_path/outside`` is not in it."""
    proj = tmp_path / "proj"
    (proj / "pipes" / "sub").mkdir(parents=True)
    (proj / "lib").mkdir()
    (proj / "gradpipe.toml").write_text("")
    (proj / "lib" / "blocks.grad").write_text("let smooth = ema(0.9)\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.grad").write_text("let smooth = sign\n")
    (tmp_path / "outside" / "secret.txt").write_text("password\n")
    return proj


def ops_of(prog) -> list[str]:
    return sorted(d["op"] for _, d in prog.graph.nodes(data=True) if d["kind"] == "op")


def _main(folder: pathlib.Path, import_line: str, name: str = "main.grad") -> pathlib.Path:
    f = folder / name
    f.write_text(f"# a pipeline\n{import_line}\ngrad | adam\n")
    return f


# ------------------------------------------------------------------ the project root
@pytest.mark.parametrize("marker", ["gradpipe.toml", "pyproject.toml", ".git"])
def test_the_project_root_is_the_nearest_folder_with_a_marker(tmp_path, marker):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    target = tmp_path / "a" / marker
    target.mkdir() if marker == ".git" else target.write_text("")
    assert project_root(deep) == tmp_path / "a"
    (tmp_path / "a" / "b" / "gradpipe.toml").write_text("")  # a nearer one wins
    assert project_root(deep) == tmp_path / "a" / "b"


def test_without_a_marker_the_root_is_the_top_level_files_folder(tmp_path):
    assert not any((p / m).exists() for p in (tmp_path, *tmp_path.parents) for m in modules.ROOT_MARKERS)
    assert project_root(tmp_path) == tmp_path.resolve()


def test_the_root_of_gradpipes_own_pipelines_is_their_folder():
    assert project_root(builtin_dir()) == builtin_dir()
    assert project_root(REPO / "tests") == REPO  # this checkout: pyproject.toml


def test_builtin_pipelines_load_by_name():
    for name in builtin_names():
        assert gradpipe.load(name).routes, name


def test_imports_inside_the_root_work_through_dot_dot(project):
    main = _main(project / "pipes" / "sub", 'import "../../lib/blocks.grad" as lib')
    main.write_text(main.read_text().replace("grad | adam", "grad | lib.smooth | adam"))
    assert ops_of(gradpipe.load(main)) == ["adam", "ema"]


@pytest.mark.parametrize("spec", ["../../outside/evil.grad", "../../outside/evil", "../../outside/missing.grad",
                                  "../../../../../../../../../../etc/passwd", "lib/../../outside/evil.grad"])
def test_an_import_that_leaves_the_root_is_an_error_at_the_import(project, spec):
    main = _main(project / "pipes", f'import "{spec}"') if not spec.startswith("lib/") else \
        _main(project, f'import "{spec}"')
    err = load_error(main)
    assert (err.line, err.column) == (2, 1)
    assert err.path == str(main)
    assert "resolves outside the project root" in err.message and str(project) in err.message
    assert "gradpipe.toml" in err.hint
    assert "  import " in str(err) and "\n  ^^^" in str(err)


def test_the_error_does_not_say_whether_a_file_outside_exists(project):
    a = load_error(_main(project, 'import "../outside/evil.grad"', "a.grad"))
    b = load_error(_main(project, 'import "../outside/nothing.grad"', "b.grad"))
    assert a.message.replace("evil", "X") == b.message.replace("nothing", "X")


@pytest.mark.parametrize("spec", ["/etc/passwd", "/tmp/x.grad", "//server/share/x.grad", "\\\\server\\share\\x.grad",
                                  "C:/x.grad", "c:x.grad", "~/x.grad", "~root/x.grad"])
def test_an_absolute_import_is_an_error(project, spec):
    err = load_error(_main(project, f'import "{spec}"'.replace("\\", "\\\\")))
    assert (err.line, err.column) == (2, 1)
    assert "is absolute" in err.message and "relative to this file's folder" in err.hint


def test_an_absolute_import_inside_the_root_is_still_an_error(project):
    err = load_error(_main(project, f'import "{project / "lib" / "blocks.grad"}"'))
    assert "is absolute" in err.message


def test_a_symlink_out_of_the_root_is_an_error(project, tmp_path):
    (project / "lib" / "link.grad").symlink_to(tmp_path / "outside" / "evil.grad")
    (project / "linked_dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    for spec in ("lib/link.grad", "linked_dir/evil.grad"):
        err = load_error(_main(project, f'import "{spec}"'))
        assert "resolves outside the project root" in err.message, spec


def test_a_symlink_inside_the_root_is_fine(project):
    (project / "pipes" / "alias.grad").symlink_to(project / "lib" / "blocks.grad")
    main = project / "pipes" / "main.grad"
    main.write_text('import "alias.grad"\ngrad | smooth\n')
    assert ops_of(gradpipe.load(main)) == ["ema"]


def test_the_root_follows_a_symlinked_top_level_file(project, tmp_path):
    """Imports are relative to the real file; the root is found from there too."""
    real = _main(tmp_path / "outside", 'import "evil.grad"', "real.grad")
    (project / "pipes" / "link.grad").symlink_to(real)
    assert gradpipe.load(project / "pipes" / "link.grad").routes  # outside/ is the real file's own root


@pytest.mark.parametrize("setup, spec, message", [
    (lambda p: (p / "notes.txt").write_text("grad\n"), "notes.txt", "does not name a .grad file"),
    (lambda p: (p / "noext").write_text("grad\n"), "noext", "does not name a .grad file"),
    (lambda p: (p / "x.grad").symlink_to(p / "secret.txt"), "x.grad", "does not name a .grad file"),
    (lambda p: (p / "dir.grad").mkdir(), "dir.grad", "names a directory"),
    (lambda p: None, "", "does not name a .grad file"),
    (lambda p: None, ".", "does not name a .grad file"),
])
def test_only_grad_files_can_be_imported(project, setup, spec, message):
    (project / "secret.txt").write_text("password\n")
    setup(project)
    err = load_error(_main(project, f'import "{spec}"'))
    assert (err.line, err.column) == (2, 1)
    assert message in err.message
    assert "password" not in str(err)


def test_source_text_imports_resolve_in_the_current_directorys_project(project, monkeypatch):
    monkeypatch.chdir(project / "pipes")
    prog = gradpipe.compile('import "../lib/blocks.grad"\ngrad | smooth\n')
    assert ops_of(prog) == ["ema"]
    with pytest.raises(GradError, match="outside the project root"):
        gradpipe.compile('import "../../outside/evil.grad"\ngrad\n')


def test_a_vanished_current_directory_is_a_grad_error_at_the_import(monkeypatch):
    def gone(cls=None):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(pathlib.Path, "cwd", classmethod(gone))
    assert gradpipe.compile("grad | adam").routes  # no import: the file system is not consulted
    err = compile_error('# lib\nimport "x.grad"\ngrad\n', path="<string>")
    assert (err.line, err.column) == (2, 1) and "cannot find the folder" in err.message


def test_an_explicit_root_narrows_imports(project):
    src = 'import "../lib/blocks.grad"\ngrad | smooth\n'
    path = str(project / "pipes" / "main.grad")
    assert modules.load_module_tree(src, path).imported
    with pytest.raises(GradError, match="outside the project root"):
        modules.load_module_tree(src, path, root=project / "pipes")


def test_an_imported_file_cannot_escape_either(project):
    (project / "lib" / "hop.grad").write_text('import "../../outside/evil.grad"\n')
    err = load_error(_main(project, 'import "lib/hop.grad"'))
    assert err.path.endswith("hop.grad") and "outside the project root" in err.message


# ------------------------------------------------------------------ import limits
def _chain(folder: pathlib.Path, n: int) -> pathlib.Path:
    """f0 imports f1 imports ... f{n}: a chain of n imports."""
    for i in range(n + 1):
        nxt = f'import "f{i + 1}.grad"\n' if i < n else ""
        (folder / f"f{i}.grad").write_text(nxt + f"let v{i} = sign\n" + ("grad | v0\n" if i == 0 else ""))
    return folder / "f0.grad"


def test_imports_nest_at_most_the_limit(project):
    assert gradpipe.load(_chain(project / "pipes", MAX_IMPORT_DEPTH)).routes
    err = load_error(_chain(project / "lib", MAX_IMPORT_DEPTH + 1))
    assert f"nested more than {MAX_IMPORT_DEPTH} files deep" in err.message
    assert err.path.endswith(f"f{MAX_IMPORT_DEPTH}.grad") and (err.line, err.column) == (1, 1)


def test_a_program_imports_at_most_the_limit(project):
    for i in range(MAX_IMPORTED_FILES + 1):
        (project / "lib" / f"m{i}.grad").write_text(f"let v{i} = sign\n")
    ok = "".join(f'import "lib/m{i}.grad"\n' for i in range(MAX_IMPORTED_FILES))
    (project / "ok.grad").write_text(ok + "grad | v0\n")
    assert gradpipe.load(project / "ok.grad").routes
    (project / "many.grad").write_text(ok + f'import "lib/m{MAX_IMPORTED_FILES}.grad"\ngrad | v0\n')
    err = load_error(project / "many.grad")
    assert f"imports more than {MAX_IMPORTED_FILES} files" in err.message
    assert (err.line, err.column) == (MAX_IMPORTED_FILES + 1, 1)


def test_a_diamond_of_imports_is_loaded_once(project):
    (project / "lib" / "a.grad").write_text('import "blocks.grad" as b\n')
    (project / "lib" / "c.grad").write_text('import "blocks.grad" as b\n')
    main = project / "main.grad"
    main.write_text('import "lib/a.grad" as a\nimport "lib/c.grad" as c\ngrad | a.b.smooth | c.b.smooth\n')
    assert gradpipe.load(main).routes


# ------------------------------------------------------------------ size and nesting bounds
def test_a_file_at_the_size_limit_compiles_and_one_character_more_is_refused(tmp_path):
    body = "grad | adam\n"
    line = "# " + "x" * 97 + "\n"
    lines, rest = divmod(MAX_SOURCE_BYTES - len(body), len(line))
    src = "#" * (rest - 1) + "\n" + line * lines + body if rest else line * lines + body
    assert len(src) == MAX_SOURCE_BYTES
    assert gradpipe.compile(src).routes
    with pytest.raises(GradError) as info:
        gradpipe.compile(src + " ", path="big.grad")
    err = info.value
    assert (err.line, err.column) == (1, 1)
    assert f"{MAX_SOURCE_BYTES:,}" in err.message
    f = tmp_path / "big.grad"
    f.write_text(src + " ")
    assert f"{MAX_SOURCE_BYTES:,}" in load_error(f).message


@pytest.mark.parametrize("opener, closer", [("(", ")"), ("[", "]"), ("{", "}"), ("([{", "}])")])
def test_ten_thousand_nested_brackets_are_a_grad_error(opener, closer):
    n = 10_000 // len(opener)
    for src in ("grad | scale(" + opener * n + "1" + closer * n + ")\n",
                "grad | scale(" + opener * n + "\n",
                "route " + opener * n + "ndim < 2" + closer * n + ": grad\n"):
        err = compile_error(src)
        assert f"nested more than {MAX_NESTING} deep" in err.message or "unexpected" in err.message
        assert err.line == 1


N_DEEP = 10_000  # ten times Python's default recursion limit


@pytest.mark.parametrize("src", [
    "grad | scale(" + "-" * N_DEEP + "1)\n",
    "grad | scale(" + "+".join(["1"] * N_DEEP) + ")\n",
    "grad | scale(" + "**".join(["2"] * N_DEEP) + ")\n",
    "hparam b = (1, 2)\ngrad | scale(b" + "[0]" * N_DEEP + ")\n",
    "route " + "not " * N_DEEP + "ndim < 2: grad\nroute default: grad\n",
    "route " + " or ".join(['"a"'] * N_DEEP) + ": grad\nroute default: grad\n",
    "hparam a = " + "-" * N_DEEP + "1\ngrad\n",
])
def test_deep_expressions_are_bounded_without_recursion(src):
    """Lark's LALR parser is iterative and the depth check runs before any recursive pass:
    the deepest trees are a GradError, never a RecursionError."""
    err = compile_error(src)
    assert f"nested more than {MAX_DEPTH} levels deep" in err.message


def test_the_parser_does_not_recurse_with_the_input(monkeypatch):
    """Parse under a recursion limit far below the nesting the input holds."""
    src = "grad | scale(" + "-" * 5_000 + "1)\n"
    parse("grad")  # build the parser first
    depth = len(inspect.stack(0))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 150)
    try:
        with pytest.raises(GradError, match="nested more than"):
            parse(src)
    finally:
        sys.setrecursionlimit(old)


def test_the_deepest_accepted_expression_compiles_and_formats():
    """Just below the depth limit everything downstream (compiler, formatter, hash) copes."""
    for n in range(MAX_DEPTH, 0, -1):
        src = "grad | scale(" + "-" * n + "1)\n"
        try:
            parse(src)
        except GradError:
            continue
        break
    assert n > MAX_DEPTH // 2
    prog = gradpipe.compile(src)
    formatted = gradpipe.format_source(src)
    assert gradpipe.compile(formatted).hash == prog.hash


def test_long_flat_constructs_are_fine():
    """Long is not deep: a 2,000-stage chain, 2,000 arguments, a 2,000-item tuple."""
    assert gradpipe.compile("grad" + " | sign" * 2000).routes
    err = compile_error("grad | adam(" + ", ".join(["0.5"] * 2000) + ")\n")
    assert "at most 3 positional arguments" in err.message
    assert gradpipe.compile("hparam t = (" + ", ".join(["0.5"] * 2000) + ")\ngrad | scale(t[1999])\n").routes


# ------------------------------------------------------------------ expansion (lets and defs built from each other)
def test_definitions_that_nest_deep_expressions_are_a_grad_error():
    """Depths add up across lets; the builder's own limit stops them, at the node that crossed it."""
    src = "let v0 = 1\n" + "".join(f"let v{i} = " + "-" * 150 + f"v{i - 1}\n" for i in range(1, 21))
    err = compile_error(src + "grad | scale(v20)\n")
    assert f"more than {MAX_EXPANDED_DEPTH} levels deep" in err.message
    assert str(MAX_EXPANDED_DEPTH) in err.hint and err.line > 1


def test_deep_definitions_of_defs_and_scalars_are_grad_errors():
    """The same with defs, with deep expressions of signals, and with lets used one after
    another (each stays shallow, the scalar expression they build does not)."""
    defs = "def v0() = 1\n" + "".join(f"def v{i}() = " + "-" * 150 + f"v{i - 1}\n" for i in range(1, 21))
    signals = "let v0 = sign\n" + "".join(f"let v{i} = " + "-" * 150 + f"v{i - 1}\n" for i in range(1, 21))
    hp = ("hparam b = 1\nlet v0 = b\n" + "".join(f"let v{i} = " + "-" * 150 + f"v{i - 1}\n" for i in range(1, 21))
          + "grad | scale(" + " + ".join(f"v{i}" for i in range(21)) + ")\n")
    for src in (defs + "grad | scale(v20)\n", signals + "grad | v20\n", hp):
        err = compile_error(src)
        assert "levels deep" in err.message  # the expanded depth, or (signals) how deep pipelines apply


def test_just_below_the_expanded_depth_compiles():
    per = 100
    n = MAX_EXPANDED_DEPTH // per - 1
    src = "let v0 = 1\n" + "".join(f"let v{i} = " + "-" * per + f"v{i - 1}\n" for i in range(1, n + 1))
    assert gradpipe.compile(src + f"grad | scale(v{n})\n").routes


def test_a_recursion_error_is_a_grad_error_at_1_1(monkeypatch, tmp_path):
    """The last line of defence: whatever recursion is left unbounded ends in a GradError."""
    from gradpipe.compiler import program

    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(program, "compile_env", boom)
    err = compile_error("grad | adam\n")
    assert (err.line, err.column) == (1, 1) and "recursion limit" in err.message
    f = tmp_path / "deep.grad"
    f.write_text("grad | adam\n")
    err = load_error(f)
    assert (err.line, err.column) == (1, 1) and "recursion limit" in err.message


@pytest.mark.parametrize("combine", ["|", "+"])
def test_definitions_that_double_at_every_level_are_a_grad_error(combine):
    """``v1 | v1`` doubles at every line: refused at the definition that blew the budget.
    ``v1 + v1`` too, although CSE would merge the copies: the budget counts work before CSE."""
    src = "let v0 = sign\n" + "".join(f"let v{i} = v{i - 1} {combine} v{i - 1}\n" for i in range(1, 31))
    err = compile_error(src + "grad | v30\n")
    assert err.line <= 31
    assert "expands to more than" in err.message and "NODE_BUDGET" in err.hint


def test_defs_and_scalars_that_double_at_every_level_are_a_grad_error():
    defs = "def v0() = sign\n" + "".join(f"def v{i}() = v{i - 1} | v{i - 1}\n" for i in range(1, 31))
    no_nodes = "def v0() = 1\n" + "".join(f"def v{i}() = v{i - 1} + v{i - 1}\n" for i in range(1, 31))
    identities = "let v0 = scale(1)\n" + "".join(f"let v{i} = v{i - 1} | v{i - 1}\n" for i in range(1, 31))
    scalars = "hparam b = 1\nlet v0 = b\n" + "".join(f"let v{i} = v{i - 1} + v{i - 1}\n" for i in range(1, 31))
    for src in (defs + "grad | v30\n", no_nodes + "grad | scale(v30)\n", identities + "grad | v30\n",
                scalars + "grad | scale(v30)\n"):
        err = compile_error(src)
        assert "expands to more than" in err.message


def test_unused_doubling_definitions_are_a_grad_error_too():
    """``gradpipe check`` expands unused definitions as well: the same budget applies."""
    src = "let v0 = sign\n" + "".join(f"let v{i} = v{i - 1} | v{i - 1}\n" for i in range(1, 31))
    err = compile_error(src + "grad | adam\n")
    assert "expands to more than" in err.message and err.line <= 31


def test_the_budget_grows_with_the_program():
    """Doubling to 2**k nodes is fine while the budget covers it."""
    base = "let v0 = sign\n" + "".join(f"let v{i} = v{i - 1} | v{i - 1}\n" for i in range(1, 11))
    assert gradpipe.compile(base + "grad | v10\n").routes  # 1,024 nodes


def test_shipped_pipelines_are_far_inside_the_budget(monkeypatch):
    """Every shipped pipeline compiles on 2% of the smallest budget (CSE is not needed for that;
    the largest, soap, expands to 138 nodes before CSE, 1.4%)."""
    from gradpipe.compiler import build
    monkeypatch.setattr(build, "NODE_BUDGET", NODE_BUDGET // 50)
    monkeypatch.setattr(build, "NODE_BUDGET_PER_AST_NODE", 0)
    files = sorted((REPO / "pipelines").glob("*.grad")) + sorted(builtin_dir().glob("*.grad"))
    assert files
    for f in files:
        assert gradpipe.load(f).routes, f


# ------------------------------------------------------------------ linear time
def bulk_program(lines: int) -> str:
    """A realistic, compiling file of ``lines`` lines: groups of a comment, a hyperparameter,
    a let, a def and a route, then a default route."""
    out: list[str] = []
    i = 0
    while len(out) < lines - 1:
        out += [f"# group {i}", f"hparam b{i} = 0.9 in [0, 1)", f"let s{i} = ema(b{i}) | sign",
                f"def f{i}(tau=1.0) = clip_norm(tau) | s{i}", f'route "p{i}.*": grad | f{i}(2.0) | adam(b{i})']
        i += 1
    return "\n".join(out[:lines - 1] + ["route default: grad | sign"]) + "\n"


def bulk_errors(lines: int) -> str:
    """A file of ``lines`` lines with an error on every one: misspelt names (each gets a
    "did you mean" search over every name of the file), out-of-range arguments, unknown ops."""
    kinds = [lambda i: f"let x{i} = adma{i % 7}", lambda i: f"let z{i} = ema(beta=2)",
             lambda i: f"def f{i}() = clip_nrom(1.0)", lambda i: f"let y{i} = sgin | sign"]
    return "\n".join(kinds[i % 4](i) for i in range(lines - 1)) + "\ngrad | adam\n"


def _compile_and_render(src: str) -> object:
    """Compile ``src`` and render its errors; the Program or the GradError."""
    try:
        return gradpipe.compile(src)
    except GradError as e:
        str(e)
        return e


def _clear_input_caches() -> None:
    """Empty the compiler's caches of per-input results (``functools`` caches of functions that
    take arguments, e.g. a source's lines, a file's names grouped for "did you mean"), so that a
    count never depends on what this process compiled before. Built-once caches without
    arguments (the parser) stay: they are set-up, not the cost of a file."""
    for name, module in list(sys.modules.items()):
        if not name.startswith(("gradpipe.dsl", "gradpipe.compiler")):
            continue
        for obj in list(vars(module).values()):
            wrapped = getattr(obj, "__wrapped__", None)
            if callable(getattr(obj, "cache_clear", None)) and wrapped is not None:
                if inspect.signature(wrapped).parameters:
                    obj.cache_clear()


def _calls(src: str) -> tuple[int, object]:
    """Function calls (Python functions and builtins, as counted by ``cProfile``) made to compile
    ``src`` and render its errors, and the Program or the GradError.

    A count of work, not a clock: the same code and input give the same count on an idle or a
    loaded machine. Input-keyed caches are emptied first and the cyclic GC is off while counting
    (collections could run ``__del__`` methods or weakref callbacks at unpredictable points)."""
    _clear_input_caches()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    profile = cProfile.Profile()
    try:
        profile.enable()
        try:
            out = _compile_and_render(src)
        finally:
            profile.disable()
    finally:
        if was_enabled:
            gc.enable()
    return pstats.Stats(profile).total_calls, out


def _growth(make, small_size: int, big_size: int) -> tuple[float, int, int, object]:
    """``(calls for big / calls for small, calls for small, calls for big, big's result)``,
    after one uncounted compile of the small input (lazily built parser tables and op
    registries are set-up, paid once per process, not work that grows with the file)."""
    small, big = make(small_size), make(big_size)
    _compile_and_render(small)
    n_small, _ = _calls(small)
    n_big, out = _calls(big)
    return n_big / n_small, n_small, n_big, out


@pytest.mark.slow
@pytest.mark.parametrize("make", [bulk_program, bulk_errors])
def test_compiling_ten_thousand_lines_takes_linear_time(make):
    """A complexity check, not a speed check: compiling (and rendering the errors of) 10x the
    lines may make at most 25x the function calls; a quadratic pass would make about 100x.
    Calls, counted by ``cProfile``, are deterministic for a given input, so a loaded machine
    cannot fail this (timing it did). The blind spot: quadratic work with no call in its inner
    loop (``x in some_list``, a comprehension's filter) is not counted."""
    assert make(10_000).count("\n") == 10_000
    ratio, n_small, n_big, out = _growth(make, 1_000, 10_000)
    if make is bulk_program:
        assert len(out.routes) == 2_000 and len(out.hyperparams) == 2_001
    else:
        assert len(out.diagnostics) > 9_000
    assert ratio < 25, f"10k lines made {ratio:.1f}x the calls of 1k lines ({n_big:,} vs {n_small:,})"


def nested_lets(lines: int) -> str:
    """The fuzzer's ``nested`` case: each let folds a deep constant and applies the one before
    (``let l{i} = scale(-----…1) | l{i-1}``), 190 levels a line."""
    body = "".join(f"let l{i} = scale(" + "-" * 190 + f"1) | l{i - 1}\n" for i in range(1, lines))
    return "let l0 = sign\n" + body + f"grad | l{lines - 1}\n"


def test_nested_lets_of_deep_constants_take_linear_time():
    """Folding logs only the largest folded expression and formats it when read, and the check
    of unused definitions expands each let once: 150 lines (about 30 kB; once over ten minutes)
    may make at most 25x the function calls of 15 (a quadratic compiler would make 100x).
    Counted, not timed (see :func:`_calls`)."""
    assert len(nested_lets(150)) > 25_000
    ratio, n_small, n_big, out = _growth(nested_lets, 15, 150)
    assert isinstance(out, GradError)  # the chain of lets is longer than the let-chain limit
    assert "nested let bindings" in str(out)
    assert ratio < 25, f"150 lines made {ratio:.1f}x the calls of 15 ({n_big:,} vs {n_small:,})"


def test_the_folding_log_keeps_the_largest_folded_expression():
    prog = gradpipe.compile("grad | scale(" + "-" * 191 + "1) | ema(2 * 0.25 + 0.25)\n")
    assert len(prog.folded) == 2, prog.folded
    assert prog.folded[1].startswith("2 * 0.25 + 0.25 -> 0.75")


# ------------------------------------------------------------------ no code execution
#: Calls that run code or load objects, by name.
_BANNED_CALLS = {"eval", "exec", "compile", "__import__", "breakpoint", "execfile", "input"}
#: Modules that deserialize code or objects, or load modules by name.
_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "importlib",
                   "runpy", "code", "codeop", "imp", "ctypes", "pydoc"}
#: Modules that start processes: allowed only where listed, with the reason.
_PROCESS_MODULES = {"subprocess", "os.system", "multiprocessing", "pty"}
ALLOWED = {
    # `gradpipe graph` renders the graph with Graphviz: a fixed argv found by shutil.which
    # (no shell), the dot text on stdin, every label quoted by draw._q. Only an explicit
    # `Program.draw(...)` / `gradpipe graph` gets here, never compiling.
    ("compiler/draw.py", "subprocess"),
    # The op library's loader imports gradpipe's own op modules (names from the package folder)
    # and the `gradpipe.ops` entry points of installed packages, when gradpipe is imported;
    # never a name from a .grad file.
    ("compiler/ops/plugins.py", "importlib"),
}


def _compiler_sources() -> list[pathlib.Path]:
    root = REPO / "gradpipe"
    files = sorted((root / "dsl").rglob("*.py")) + sorted((root / "compiler").rglob("*.py"))
    assert len(files) > 20
    return files


def _findings(path: pathlib.Path, rel: str | None = None) -> list[str]:
    tree = pyast.parse(path.read_text(), str(path))
    rel = rel or path.relative_to(REPO / "gradpipe").as_posix()
    own_defs = {n.name for n in tree.body if isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef))}
    found: list[str] = []
    for node in pyast.walk(tree):
        if isinstance(node, pyast.Call):
            f = node.func
            if isinstance(f, pyast.Name) and f.id in _BANNED_CALLS and f.id not in own_defs:
                found.append(f"{rel}:{node.lineno}: calls {f.id}()")
            if isinstance(f, pyast.Attribute) and f.attr in ("import_module", "system", "popen", "load",
                                                               "loads") and \
                    isinstance(f.value, pyast.Name) and f.value.id in ("importlib", "os", "pickle", "marshal",
                                                                        "torch", "yaml", "json5") and \
                    (rel, f.value.id) not in ALLOWED:
                found.append(f"{rel}:{node.lineno}: calls {f.value.id}.{f.attr}()")
            if isinstance(f, pyast.Name) and f.id in ("getattr", "setattr", "delattr") and len(node.args) >= 2 \
                    and not isinstance(node.args[1], pyast.Constant) and (rel, "getattr") not in ALLOWED_GETATTR:
                found.append(f"{rel}:{node.lineno}: {f.id}() with a computed name")
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, pyast.Import) else [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in _BANNED_MODULES and (rel, top) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno}: imports {name}")
                elif top in _PROCESS_MODULES and (rel, top) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno}: imports {name}")
        elif isinstance(node, pyast.Attribute) and node.attr in ("__globals__", "__code__", "__builtins__",
                                                                  "__subclasses__"):
            found.append(f"{rel}:{node.lineno}: reads .{node.attr}")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


#: getattr with a computed name, where the name never comes from pipeline text.
ALLOWED_GETATTR = {
    # ast.walk/children iterate a dataclass's own field names (from its definition)
    ("dsl/ast.py", "getattr"),
    # the structure hash reads a scalar expression's dataclass fields (names from its definition)
    ("compiler/structure.py", "getattr"),
}


def test_the_compiler_never_executes_code():
    """No eval/exec/compile/__import__, no pickle/marshal/importlib, no process start
    (but the allowed ones) in gradpipe/dsl and gradpipe/compiler."""
    found = [f for p in _compiler_sources() for f in _findings(p)]
    assert found == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\nimport importlib\nfrom subprocess import run\n"
                     "x = eval('1')\nimportlib.import_module(x)\ngetattr(x, x)\nf.__globals__\n"
                     "def compile(s): return s\ncompile('ok')\n")
    found = _findings(probe, "dsl/probe.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports pickle", "imports importlib", "imports subprocess", "calls eval()",
        "calls importlib.import_module()", "getattr() with a computed name", "reads .__globals__"], found
    assert _findings(probe, "compiler/draw.py")[2:3] == ["compiler/draw.py:4: calls eval()"]


def test_lark_does_not_load_a_pickled_grammar_cache():
    """Lark can cache the parser as a pickle in a temporary folder; gradpipe builds it from the grammar."""
    assert not P._parser().options.cache


_HOSTILE = [
    'route "__import__(\'os\').system(\'touch PWNED\')": grad\nroute default: grad',
    "route /(?{system('touch PWNED')})/: grad\nroute default: grad",
    'grad | clip_norm(scope="__import__(\'os\').system(\'touch PWNED\')")',
    "grad | scale(__import__)",
    "let eval = sign\nlet exec = sign\nlet __builtins__ = sign\ngrad | eval | exec | __builtins__",
    "def __init__(self=param) = add(self)\ngrad | __init__",
    "grad | __class__.__subclasses__",
    "grad | os.system",
    'import "os"\ngrad',
    'import "pickle.grad" as p\ngrad | p.loads',
    'hparam x = 1 in [0, 1]\ngrad | scale(x.__class__)',
    'grad | adam # ; import os; os.system("touch PWNED")',
    '"""\nimport os\n"""\ngrad',
    "grad | galore(rank=2) { __import__ }",
    "route \"*\" and ndim > 99999999999999999999999999: grad\nroute default: grad",
]


@pytest.fixture(scope="module")
def audit():
    """Records the audited events (sys.addaudithook) this thread raises while ``recording``."""
    state = {"on": False, "events": [], "thread": threading.get_ident()}

    def hook(event, args):
        if state["on"] and threading.get_ident() == state["thread"]:
            state["events"].append((event, repr(args)[:200]))
    sys.addaudithook(hook)  # cannot be removed: it does nothing unless "on"
    return state


_DANGER = ("exec", "compile", "import", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "subprocess.Popen", "pickle.find_class", "marshal.load", "marshal.loads", "ctypes.dlopen",
           "socket.connect", "socket.bind", "urllib.Request", "os.remove", "os.rename", "shutil.rmtree")


@pytest.mark.parametrize("src", _HOSTILE)
def test_python_in_a_pipeline_does_nothing(src, tmp_path, monkeypatch, audit):
    """Compiling, formatting and explaining hostile text raise no audited event that runs
    code, imports, starts a process, opens a socket or a non-.grad file."""
    monkeypatch.chdir(tmp_path)

    def everything():
        try:
            prog = gradpipe.compile(src, path="hostile.grad")
            prog.explain()
            prog.to_dot()
        except GradError as e:
            check_error(e, src, "hostile.grad")
            str(e)
        try:
            gradpipe.format_source(src)
        except GradError:
            pass

    everything()  # the first run may import lazily-loaded modules of gradpipe itself
    audit["events"].clear()
    audit["on"] = True
    try:
        everything()
    finally:
        audit["on"] = False
    bad = [(e, a) for e, a in audit["events"] if e in _DANGER or (e == "open" and ".grad" not in a)]
    assert bad == []
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------ rendering hostile text
def test_error_messages_cannot_send_terminal_escapes():
    src = 'import "\x1b]0;pwned\x07\x1b[2J.grad"\ngrad | adam \x1b[31m'
    err = compile_error(src)
    text = str(err)
    assert "\x1b" not in text and "\x07" not in text
    assert "\ufffd" in text


def test_bidirectional_controls_are_refused():
    src = 'route "*.bias\u202e": grad\nroute default: grad  # \u2066 \n'
    err = compile_error(src)
    assert (err.line, err.column) == (1, 14)
    assert "U+202E" in err.message and "bidirectional" in err.message


def test_a_nul_byte_error_shows_its_line():
    err = compile_error("grad | adam\ngr\x00ad\n")
    assert (err.line, err.column) == (2, 3)
    assert "  gr\ufffdad\n    ^" in str(err)


# ------------------------------------------------------------------ servers bind 127.0.0.1
def test_the_mlflow_ui_binds_127_0_0_1_by_default():
    from gradpipe.cli import build_parser
    from gradpipe.flows import ui
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    assert ui.DEFAULT_HOST == "127.0.0.1"
    for fn in (ui.ui_command, ui.start_ui, ui.run_ui):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn.__name__
    argv = ui.ui_command("sqlite:////tmp/x/mlruns.db")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_every_host_default_in_the_flows_is_loopback():
    """Any function of gradpipe.flows with a ``host`` parameter defaults it to 127.0.0.1."""
    import importlib
    import pkgutil
    import gradpipe.flows as flows
    seen = 0
    for info in pkgutil.iter_modules(flows.__path__):
        if info.name == "screenshot":  # a browser helper for docs, not a server
            continue
        mod = importlib.import_module(f"gradpipe.flows.{info.name}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__:
                continue
            p = inspect.signature(fn).parameters.get("host")
            if p is not None and p.default is not inspect.Parameter.empty:
                assert p.default in ("127.0.0.1", None), f"{mod.__name__}.{name} host={p.default!r}"
                seen += 1
    assert seen >= 4


def test_gradpipe_serve_starts_its_prefect_server_on_127_0_0_1(tmp_path, monkeypatch):
    from gradpipe.cli import build_parser
    from gradpipe.flows import commands, schedule, server
    calls = {}

    class FakeServer:
        api_url = "http://127.0.0.1:1/api"

        def stop(self):
            calls["stopped"] = True

    def fake_start(home, **kwargs):
        calls.update(kwargs, home=home)
        return FakeServer()

    assert inspect.signature(server.start_prefect_server).parameters["host"].default == "127.0.0.1"
    monkeypatch.setattr(server, "start_prefect_server", fake_start)
    monkeypatch.setattr(schedule, "serve", lambda *a, **k: None)
    monkeypatch.setenv("PREFECT_API_URL", "x")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    folder = tmp_path / "pipes"
    folder.mkdir()
    (folder / "mine.grad").write_text("grad | sign\n")
    args = build_parser().parse_args(["serve", str(folder), "--cron", "0 3 * * *"])
    assert commands.cmd_serve(args) == 0
    assert calls.get("host", "127.0.0.1") == "127.0.0.1" and calls["stopped"]


def test_prefect_server_command_line_binds_the_given_host(tmp_path, monkeypatch):
    from gradpipe.flows import server
    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(cmd, **kwargs):
        seen["cmd"] = cmd
        raise Stop
    monkeypatch.setattr(server.subprocess, "Popen", fake_popen)
    with pytest.raises(Stop):
        server.start_prefect_server(tmp_path, port=1)
    assert seen["cmd"][seen["cmd"].index("--host") + 1] == "127.0.0.1"


@pytest.mark.slow
def test_the_dask_local_cluster_listens_on_127_0_0_1():
    """``--runner dask`` without ``--address`` starts a LocalCluster with the runner's
    cluster_kwargs; its scheduler (and so its workers) listen on loopback."""
    from distributed import LocalCluster
    from gradpipe.flows.comparison import make_runner
    runner = make_runner("dask", workers=2)
    kwargs = dict(runner.cluster_kwargs)
    assert kwargs.get("host") in (None, "127.0.0.1")
    assert kwargs.get("dashboard_address") is None  # no dashboard at all
    assert kwargs["scheduler_kwargs"]["dashboard_address"].startswith("127.0.0.1:")  # its HTTP API
    kwargs["n_workers"] = 0  # the scheduler alone is enough to see where it listens
    with LocalCluster(**kwargs) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:"), cluster.scheduler_address
        http = cluster.scheduler.http_server  # health and metrics: loopback, on a free port
        assert http.address == "127.0.0.1" and http.port != 8787, (http.address, http.port)


def test_tracking_stores_are_local_files_by_default(tmp_path, monkeypatch):
    from gradpipe.flows import tracking
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None)
    assert uri.startswith("sqlite:///") and str(tmp_path) in uri

