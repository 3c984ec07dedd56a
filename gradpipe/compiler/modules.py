"""Module environments: the definitions of one `.grad` file and its imports.

A :class:`ModuleEnv` holds a file's hyperparameters, ``let`` bindings, ``def``
pipelines, import aliases and body (a single pipeline or routes). Imports are
resolved relative to the importing file; cycles are reported with the chain
of files.

A `.grad` file is untrusted input (docs/security.md): an import may name only a
``.grad`` file inside the *project root* of the top-level file (see
:func:`project_root`), and a program imports at most :data:`MAX_IMPORTED_FILES`
files, nested at most :data:`MAX_IMPORT_DEPTH` deep.
"""

from __future__ import annotations

import math
import numbers
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ..dsl import ast
from ..dsl.diagnostics import GradError, Span
from ..dsl.parser import parse, read_source
from .ranges import RangeMixin
from .scalars import check_finite, fold

__all__ = ["HyperParam", "ModuleEnv", "load_module_tree", "const_value", "project_root",
           "ROOT_MARKERS", "MAX_IMPORT_DEPTH", "MAX_IMPORTED_FILES"]

#: A folder holding one of these is a project root: imports never leave it.
ROOT_MARKERS = ("gradpipe.toml", "pyproject.toml", ".git")
#: Longest chain of imports (a file that imports a file that imports ...).
MAX_IMPORT_DEPTH = 16
#: Most distinct files one program may import (each is parsed once).
MAX_IMPORTED_FILES = 64


@dataclass(frozen=True)
class HyperParam(RangeMixin):
    """A declared hyperparameter: ``hparam b1 = 0.9 in [0, 1)``.

    ``default`` is a number, a bool, or a tuple of numbers (``betas``). The
    range applies to a number and to every item of a tuple.
    """

    name: str
    default: Any
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True
    span: Span = field(default=Span(), compare=False)
    declared: bool = True

    @property
    def kind(self) -> str:
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, tuple):
            return "tuple"
        return "scalar"

    def check(self, value: Any, origin: str) -> Any:
        """Validate a value for this hyperparameter (from ``origin``); return it normalised."""
        kind = self.kind
        where = self.span
        if kind == "bool":
            if not isinstance(value, bool):
                raise GradError(f"hyperparameter '{self.name}' is a boolean, but {origin} gives {value!r}", where,
                                "use True or False")
            return value
        if kind == "tuple":
            if isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, tuple) or len(value) != len(self.default) or \
                    not all(_is_number(v) for v in value):
                raise GradError(f"hyperparameter '{self.name}' is a tuple of {len(self.default)} numbers, "
                                f"but {origin} gives {value!r}", where)
            items = value
        else:
            if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
                value = value.item()
            if not _is_number(value):
                raise GradError(f"hyperparameter '{self.name}' is a number, but {origin} gives {value!r}", where)
            if not isinstance(value, (int, float)):  # numpy and other Real types
                value = float(value)
            items = (value,)
        for v in items:
            if not self.in_range(v):
                raise GradError(f"{self.name}={_show(value)} ({origin}) is outside its declared range "
                                f"{self.range_text()}", where,
                                f"choose a value in {self.range_text()}")
        return value


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _show(v: Any) -> str:
    return repr(v)


def const_value(e: ast.Expr) -> Any:
    """Evaluate a constant expression (a hyperparameter default or range bound)."""
    if isinstance(e, ast.Num):
        try:
            check_finite(e.value)
        except OverflowError:
            raise GradError("the number is too large", e.span) from None
        return e.value
    if isinstance(e, ast.Bool):
        return e.value
    if isinstance(e, ast.Name) and e.parts == ("inf",):
        return math.inf
    if isinstance(e, ast.Neg):
        v = const_value(e.operand)
        if isinstance(v, (bool, tuple)):
            raise GradError("'-' needs a number", e.span)
        return -v
    if isinstance(e, ast.BinOp) and e.op in ("<", "<=", ">", ">=", "==", "!="):
        raise GradError("a hyperparameter's default and range cannot be a comparison", e.span,
                        "write true or false, or compare in the pipeline: where(x > 0, a, b)")
    if isinstance(e, ast.BinOp):
        a, b = const_value(e.left), const_value(e.right)
        if not (_is_number(a) and _is_number(b)):
            raise GradError(f"'{e.op}' needs numbers", e.span)
        try:
            return fold(e.op, a, b)
        except ZeroDivisionError:
            raise GradError("'%' by zero" if e.op == "%" else "division by zero", e.span) from None
        except (OverflowError, ValueError) as err:
            if e.op == "%":
                raise GradError(str(err), e.span, "'%' is the remainder of whole numbers, e.g. 7 % 3") from None
            raise GradError(f"{err}: a hyperparameter is a finite real number", e.span) from None
    if isinstance(e, ast.Tuple):
        items = tuple(const_value(i) for i in e.items)
        if not all(_is_number(i) for i in items):
            raise GradError("a tuple holds numbers only", e.span)
        return items
    raise GradError("a hyperparameter's default and range must be constants", e.span,
                    "write a number, true/false, or a tuple such as (0.9, 0.999)")


@dataclass
class ModuleEnv:
    module: ast.Module
    path: str
    hparams: dict[str, HyperParam] = field(default_factory=dict)
    lets: dict[str, ast.Let] = field(default_factory=dict)
    #: ``state`` cells, by name (a name space shared with lets and defs)
    states: dict[str, ast.State] = field(default_factory=dict)
    defs: dict[str, ast.Def] = field(default_factory=dict)
    aliases: dict[str, "ModuleEnv"] = field(default_factory=dict)
    #: names brought in unqualified by ``import "x.grad"`` -> the env defining them
    imported: dict[str, "ModuleEnv"] = field(default_factory=dict)
    body: ast.Body | None = None
    routes: list[ast.Route] = field(default_factory=list)
    #: ``eval: param = ...`` and ``train: param = ...``, by mode
    modes: dict[str, ast.Mode] = field(default_factory=dict)

    def directory(self) -> pathlib.Path:
        if self.path.startswith("<"):
            return pathlib.Path.cwd()
        return pathlib.Path(self.path).resolve().parent


RESERVED = {"grad", "param", "grads", "samples", "lr", "step", "loss", "inf", "true", "false"}
#: keys torch.optim keeps in every param group besides the hyperparameters: a hyperparameter
#: of these names would be overwritten by the group's parameters
GROUP_KEYS = {"params", "param_names"}


def _collect(env: ModuleEnv, errors: list[GradError]) -> None:
    seen: dict[str, Span] = {}

    def claim(name: str, span: Span, hparam: bool = False) -> bool:
        if name in RESERVED and not (hparam and name == "lr"):
            errors.append(GradError(f"'{name}' is a built-in name and cannot be redefined", span,
                                    "choose another name"))
            return False
        if hparam and name in GROUP_KEYS:
            errors.append(GradError(f"'{name}' is the key of a param group's parameters in torch.optim; "
                                    "a hyperparameter cannot have that name", span, "choose another name"))
            return False
        if name in seen:
            errors.append(GradError(f"'{name}' is already defined on line {seen[name].line}", span,
                                    "rename one of the two definitions"))
            return False
        seen[name] = span
        return True

    for s in env.module.stmts:
        try:
            if isinstance(s, ast.HParam):
                if not claim(s.name, s.span, hparam=True):
                    continue
                default = const_value(s.default)
                low = const_value(s.low) if s.low is not None else -math.inf
                high = const_value(s.high) if s.high is not None else math.inf
                if isinstance(default, tuple) and not default:
                    raise GradError("a tuple hyperparameter needs at least one item", s.default.span)
                if s.name == "lr" and not _is_number(default):  # every step computes p - lr * u
                    what = "a tuple" if isinstance(default, tuple) else "a boolean"
                    raise GradError(f"the learning rate 'lr' must be a number, not {what}", s.default.span,
                                    "write e.g. 'hparam lr = 0.001 in [0, inf)'")
                for b, node in ((low, s.low), (high, s.high)):
                    if node is not None and not _is_number(b):
                        raise GradError("a range bound must be a number", node.span)
                if s.low is not None and isinstance(default, bool):
                    raise GradError(f"boolean hyperparameter '{s.name}' cannot have a range", s.low.span)
                if low > high:
                    raise GradError(f"empty range: {low:g} > {high:g}", s.low.span if s.low else s.span)
                hp = HyperParam(s.name, default, low, high, s.low_closed, s.high_closed, s.span)
                items = default if isinstance(default, tuple) else (default,)
                if not isinstance(default, bool):
                    for v in items:
                        if not hp.in_range(v):
                            raise GradError(f"default {s.name}={default!r} is outside its declared range "
                                            f"{hp.range_text()}", s.default.span,
                                            f"choose a default in {hp.range_text()}")
                env.hparams[s.name] = hp
            elif isinstance(s, ast.Let):
                if claim(s.name, s.span):
                    env.lets[s.name] = s
            elif isinstance(s, ast.State):
                if claim(s.name, s.span):
                    env.states[s.name] = s
            elif isinstance(s, ast.Def):
                if claim(s.name, s.span):
                    names = [p.name for p in s.params]
                    for i, p in enumerate(s.params):
                        if p.name in names[:i]:
                            raise GradError(f"parameter '{p.name}' appears twice", p.span)
                    defaults_started = False
                    for p in s.params:
                        if p.default is not None:
                            defaults_started = True
                        elif defaults_started:
                            raise GradError(f"parameter '{p.name}' without a default follows one with a default",
                                            p.span, "give it a default or move it first")
                    env.defs[s.name] = s
            elif isinstance(s, ast.Mode):
                if s.mode in env.modes:
                    raise GradError(f"a second '{s.mode}:' sequence; the first is on line "
                                    f"{env.modes[s.mode].span.line}", s.span, "a file has one of each")
                env.modes[s.mode] = s
            elif isinstance(s, ast.Body):
                if env.body is not None and (s.param or env.body.param):
                    raise GradError(f"a second pipeline; the first is on line {env.body.span.line}", s.span,
                                    "a file gives the parameter's new value ('param = ...') or its update "
                                    "u once; use 'let' to name parts, or 'route' for different parameters")
                if env.body is not None:
                    raise GradError(f"a second pipeline; the first is on line {env.body.span.line}", s.span,
                                    "a file has one pipeline; use 'let' to name parts, or 'route' to give "
                                    "parameters different pipelines")
                if env.routes:
                    raise GradError("a pipeline next to 'route' statements", s.span,
                                    "write it as 'route default: ...'")
                env.body = s
            elif isinstance(s, ast.Route):
                if env.body is not None:
                    raise GradError("'route' next to a pipeline for all parameters", s.span,
                                    "write that pipeline as 'route default: ...'")
                env.routes.append(s)
        except GradError as e:
            errors.append(e)


def _builtin_dir() -> pathlib.Path:
    """gradpipe's own pipeline folder (``program.builtin_dir``; repeated here to avoid an import cycle)."""
    return (pathlib.Path(__file__).resolve().parent.parent / "_pipelines").resolve()


def _has_marker(folder: pathlib.Path) -> bool:
    for m in ROOT_MARKERS:
        try:
            if (folder / m).exists():
                return True
        except OSError:  # an unreadable folder is not a project root
            continue
    return False


def project_root(start: str | pathlib.Path) -> pathlib.Path:
    """The folder that imports of a program whose top-level file is in ``start`` must stay inside.

    It is the nearest folder at or above ``start`` (resolved: symlinks followed)
    that holds a ``gradpipe.toml``, ``pyproject.toml`` or ``.git``; if there is
    none, ``start`` itself. gradpipe's own pipelines (loaded by name) have their
    folder as root. For source text compiled with ``gradpipe.compile``, ``start``
    is the current directory.
    """
    start = pathlib.Path(start).resolve()
    builtin = _builtin_dir()
    if start == builtin or builtin in start.parents:
        return builtin
    for folder in (start, *start.parents):
        if _has_marker(folder):
            return folder
    return start


def load_module_tree(source: str, path: str, *, root: str | pathlib.Path | None = None,
                     _stack: tuple[str, ...] = (), _cache: dict[str, ModuleEnv] | None = None) -> ModuleEnv:
    """Parse ``source`` and every file it imports; raise one GradError with every problem.

    ``root``: the folder imports must stay inside; by default :func:`project_root`
    of the file's folder (of the current directory for ``<string>`` paths).
    """
    module = parse(source, path)
    imports = [s for s in module.stmts if isinstance(s, ast.Import)]
    top = None
    if imports:  # a file without imports never looks at the file system
        try:
            top = pathlib.Path(root).resolve() if root is not None else \
                project_root(ModuleEnv(module, path).directory())
        except OSError as e:  # e.g. the current directory was deleted
            raise GradError(f"cannot find the folder imports are relative to: {e.strerror or e}",
                            imports[0].span) from None
    return _load(module, path, _stack, {} if _cache is None else _cache, top)


def _is_absolute(text: str) -> bool:
    """A path that does not depend on the importing file's folder, on any platform."""
    return text.startswith(("/", "\\")) or bool(pathlib.PureWindowsPath(text).drive) or text.startswith("~")


def _inside(path: pathlib.Path, root: pathlib.Path) -> bool:
    return path == root or root in path.parents


def _resolve_import(env: ModuleEnv, s: ast.Import, root: pathlib.Path | None) -> pathlib.Path:
    """The file an import names (resolved), or a GradError at the import."""
    assert root is not None  # load_module_tree finds it when a file has imports
    where = f"the project root {root}"
    if _is_absolute(s.path):
        raise GradError(f"import path '{s.path}' is absolute", s.span,
                        f"write it relative to this file's folder; imports stay inside {where}")
    try:
        target = env.directory() / s.path
        if target.suffix != ".grad" and not target.exists():
            target = target.with_name(target.name + ".grad")
        resolved = target.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a symlink loop
        raise GradError(f"cannot resolve the import '{s.path}': {getattr(e, 'strerror', None) or e}",
                        s.span) from None
    if not _inside(resolved, root):
        raise GradError(f"import '{s.path}' resolves outside {where}", s.span,
                        "imports stay inside the nearest folder with a gradpipe.toml, pyproject.toml or .git "
                        "above the main file; move the file there, or add a gradpipe.toml to a folder that "
                        "holds both")
    if resolved.suffix != ".grad":
        raise GradError(f"import '{s.path}' does not name a .grad file", s.span,
                        "only .grad files can be imported")
    return resolved


def _load(module: ast.Module, path: str, stack: tuple[str, ...], cache: dict[str, ModuleEnv],
          root: pathlib.Path | None) -> ModuleEnv:
    env = ModuleEnv(module, path)
    errors: list[GradError] = []
    _collect(env, errors)
    key = str(pathlib.Path(path).resolve()) if not path.startswith("<") else path
    stack = stack + (key,)
    for s in module.stmts:
        if not isinstance(s, ast.Import):
            continue
        try:
            target = _resolve_import(env, s, root)
        except GradError as e:
            errors.append(e)
            continue
        tkey = str(target)
        if tkey in stack:
            cycle = " -> ".join(pathlib.Path(p).name for p in stack[stack.index(tkey):] + (tkey,))
            errors.append(GradError(f"import cycle: {cycle}", s.span, "move the shared definitions to a third file"))
            continue
        if not target.exists():
            errors.append(GradError(f"cannot find the imported file '{s.path}'", s.span,
                                    f"paths are relative to the importing file's folder ({env.directory()})"))
            continue
        if not target.is_file():
            errors.append(GradError(f"import '{s.path}' names a directory, not a .grad file", s.span))
            continue
        if tkey not in cache:
            if len(stack) > MAX_IMPORT_DEPTH:
                errors.append(GradError(f"imports are nested more than {MAX_IMPORT_DEPTH} files deep", s.span,
                                        "import the shared file from the top-level file instead"))
                continue
            # files finished (in the cache) plus files still loading (on the stack, but the top one)
            if len(cache) + len(stack) - 1 >= MAX_IMPORTED_FILES:
                errors.append(GradError(f"the program imports more than {MAX_IMPORTED_FILES} files", s.span,
                                        "merge some of them"))
                continue
        try:
            if tkey in cache:
                sub = cache[tkey]
            else:
                text = read_source(target)
                sub = _load(parse(text, str(target)), str(target), stack, cache, root)
                cache[tkey] = sub
        except GradError as e:
            errors.append(e)
            continue
        if s.alias:
            if s.alias in env.aliases or s.alias in env.lets or s.alias in env.defs or s.alias in env.hparams \
                    or s.alias in env.states:
                errors.append(GradError(f"'{s.alias}' is already defined", s.span, "choose another alias"))
                continue
            env.aliases[s.alias] = sub
        else:
            for name in list(sub.lets) + list(sub.states) + list(sub.defs):
                if name in env.lets or name in env.defs or name in env.hparams or name in env.imported \
                        or name in env.states:
                    errors.append(GradError(f"import brings in '{name}', which is already defined", s.span,
                                            f'import it under a name: import "{s.path}" as lib'))
                else:
                    env.imported[name] = sub
    if errors:
        raise GradError.combine(errors)
    return env


def all_hparams(env: ModuleEnv) -> dict[str, HyperParam]:
    """The hyperparameters of a file and everything it imports (imported ones first)."""
    out: dict[str, HyperParam] = {}
    seen: set[int] = set()

    def visit(e: ModuleEnv) -> None:
        if id(e) in seen:
            return
        seen.add(id(e))
        subs = list(e.aliases.values()) + list({id(v): v for v in e.imported.values()}.values())
        for sub in subs:
            visit(sub)
        for name, hp in e.hparams.items():
            prev = out.get(name)
            if prev is not None and (prev.default, prev.low, prev.high) != (hp.default, hp.low, hp.high):
                raise GradError(f"hyperparameter '{name}' is declared differently in {prev.span.path}:"
                                f"{prev.span.line}", hp.span, "declare it once, or give both the same default and range")
            out[name] = hp
    visit(env)
    return out
