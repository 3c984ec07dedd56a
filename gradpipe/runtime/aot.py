"""Compiled segments kept on disk and loaded in a fresh process without Dynamo or Inductor.

Set ``GRADPIPE_CACHE_DIR`` to a directory and the compiled backend keeps each fused segment it
compiles on the CPU there as an AOTInductor package (a shared library and its metadata), keyed by

* the segment: the pipeline's canonical hash, the route, the segment's index, its buckets (the
  dtype and device of each, whether it is a parameter of its own), whether it checks the
  gradients itself, and the source files of plug-in ops it runs (gradpipe's own are below);
* the call: every Python value among its arguments (hyperparameters that are zero, flags),
  the dtype, device, number of dimensions, contiguity and ``requires_grad`` of every tensor,
  which arguments are the same tensor;
* the global state Dynamo's guards check and the code depends on: the thread count (Inductor
  writes it into its parallel loops), the default dtype, deterministic algorithms;
* what compiled it: torch's version, gradpipe's sources (a hash of every ``.py`` file), the
  machine, the CPU's model and flags (AOTInductor builds with ``-march=native``).

Sizes are not in the key: a package is exported with its flat buffers' sizes dynamic
(``torch.export.Dim.AUTO``), so one package serves every model whose buckets have the same
structure, and :meth:`Package.fits` checks each call's sizes against what was exported (one
symbol, one size; its range; a size the graph needed static, exactly). A later process whose
segment call has the same key loads the package with torch's C++ loader
(``torch._C._aoti.AOTIModelPackageLoader``: milliseconds) and calls it: no Dynamo frame, no
tracing, no Inductor import. Measured in ``docs/benchmarks.md`` ("First step and
compilation"): the same step time as the code compiled in-process, and the same bits.

Only CPU segments are kept: on a GPU the packages' device placement, alignment and index
width would need checks of their own that no GPU here could test, so CUDA segments compile
in every process as before. The directory holds shared libraries and pickles that gradpipe
loads and runs: point it only at a directory you trust, as you would ``TORCHINDUCTOR_CACHE_DIR``.

What is stored is what the in-process backend runs (:func:`gradpipe.runtime.compiled.
_inductor_with_scalars_hoisted`): the 0-d part of Dynamo's graph (bias corrections, ``1 - b``),
pickled as an FX graph and run eagerly; the 0-d float64 scalars rounded to float32 where the
vectors are float32; the rest exported (``torch.export``) and compiled by AOTInductor, which
writes the mutated state and outputs into the caller's buffers.

Writing a package costs an AOTInductor compile (about 9 s per segment on the 2-core machine
of ``docs/benchmarks.md``), once per key, in the process that first runs the segment, right
after its first call; so the cache is off unless the directory is set. A segment that cannot be
packaged (a graph break, a graph that returns values, an export failure) is skipped, the last
with one warning; a package that does not load or does not run is a miss, with one warning,
and the segment compiles. Each writer writes its own files, atomically (a temporary file, then
``os.replace``), and last the metadata, which names them: processes may share the directory.
``TORCH_COMPILE_DISABLE=1`` turns the cache off with the compiler."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import pickle
import platform
import sys
import threading
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import torch

#: the environment variable that names the cache directory
CACHE_ENV = "GRADPIPE_CACHE_DIR"
#: bumped when what is stored changes meaning
_FORMAT = 1

#: ``hit`` (a call served by a package), ``load`` (a package loaded), ``save`` (a package
#: written), ``skip`` (a segment that could not be packaged)
stats: Counter = Counter()

_WARNED: list[bool] = []


def cache_dir() -> pathlib.Path | None:
    """The directory ``GRADPIPE_CACHE_DIR`` names, or None (the cache is off)."""
    d = os.environ.get(CACHE_ENV)
    return pathlib.Path(d) if d else None


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """The sha256 of gradpipe's Python sources (every ``.py`` file of the package, in path order):
    what the packages' key holds of gradpipe, and what ``gradpipe.bench`` records with a run."""
    src = hashlib.sha256()
    for f in sorted(pathlib.Path(__file__).parent.parent.rglob("*.py")):
        src.update(f.read_bytes())
    return src.hexdigest()


@functools.lru_cache(maxsize=None)
def _environment() -> str:
    """What compiled a package: torch, gradpipe's sources, the machine (AOTInductor builds
    with ``-march=native``, so the CPU's model and flags, not only its vector extension)."""
    cpu = hashlib.sha256(platform.processor().encode())
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                cpu.update(line.encode())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{_FORMAT}|{torch.__version__}|{source_digest()}|{platform.machine()}|{cap}|{cpu.hexdigest()}"


def _global_state() -> str:
    """What Dynamo's global guard checks and the compiled code depends on: the thread count
    (Inductor writes it into its parallel loops), the default dtype, deterministic algorithms."""
    return f"{torch.get_num_threads()}|{torch.get_default_dtype()}|{torch.are_deterministic_algorithms_enabled()}"


def sources_of(ops: Sequence[Any]) -> str:
    """A hash of the source files of the ops (``Op`` instances) that live outside gradpipe
    (plug-ins): editing one changes the key of every segment that runs it."""
    import inspect

    home = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = set()
    for op in ops:
        cls = type(op)
        try:
            files.add(inspect.getsourcefile(cls) or "")
        except (TypeError, OSError):  # defined where no file says (a notebook): its name, at least
            h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    for f in sorted(files):
        path = pathlib.Path(f).resolve() if f else None
        if path is None or home in path.parents:
            continue
        h.update(str(path).encode())
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"?")
    return h.hexdigest()


def signature(args: Sequence[Any]) -> tuple[str, list[torch.Tensor]]:
    """The call's part of the key, and its tensors in a fixed order (depth first). A tensor's
    sizes are not in the key (a package takes any sizes it was exported for, checked by
    :meth:`Package.fits`); its dtype, device, number of dimensions, whether it is contiguous and
    requires grad, and which earlier argument it is, are."""
    leaves: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    parts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            k = seen.setdefault(id(x), len(leaves))
            leaves.append(x)
            parts.append(f"T{x.dtype}{x.device}{x.dim()}{int(x.is_contiguous())}{int(x.requires_grad)}@{k}")
        elif isinstance(x, (list, tuple)):
            parts.append("[" if isinstance(x, list) else "(")
            for y in x:
                walk(y)
            parts.append("]")
        elif isinstance(x, dict):
            parts.append("{")
            for k, y in x.items():
                parts.append(repr(k))
                walk(y)
            parts.append("}")
        elif x is None or isinstance(x, (bool, int, float, str)):
            parts.append(f"{type(x).__name__}:{x!r}")
        else:
            raise TypeError(type(x).__name__)

    walk(args)
    return ",".join(parts), leaves


class Package:
    """A loaded package: the 0-d part (or None), the compiled rest, and where each of its
    arguments comes from. ``call`` has :class:`gradpipe.runtime.compiled._Recorded`'s calling
    convention, so a step plan calls it directly as it calls a graph Dynamo compiled."""

    def __init__(self, meta: dict, pre: Callable | None, loader: Any) -> None:
        self.leaf = meta["leaf"]  # per graph argument, its position among the call's tensors
        #: per graph argument, its sizes as exported: an int, or a symbol's name (its range in
        #: ``ranges``); one symbol is one size wherever it appears
        self.shapes, self.ranges = meta["shapes"], meta["ranges"]
        self.pre_in, self.main_src, self.narrow = meta["pre_in"], meta["main_src"], meta["narrow"]
        self.pre, self.loader = pre, loader
        self._twins: dict[int, list[torch.Tensor]] = {}  # per thread, for ``narrowed_in_place``

    def fits(self, args: Sequence[torch.Tensor]) -> bool:
        """Whether the graph arguments have sizes the package was compiled for (AOTInductor's
        own input checks are off in a release build: a wrong size would be read out of bounds)."""
        sym: dict[str, int] = {}
        for a, spec in zip(args, self.shapes):
            if spec is None:
                continue
            if a.dim() != len(spec):
                return False
            for n, want in zip(a.shape, spec):
                if isinstance(want, int):
                    if n != want:
                        return False
                elif sym.setdefault(want, n) != n:
                    return False
        return all(lo <= sym.get(k, lo) <= hi for k, (lo, hi) in self.ranges.items())

    def call(self, args: Sequence[torch.Tensor]) -> tuple:
        from .compiled import main_args, narrowed_in_place
        if self.pre is not None:
            main = main_args(args, self.pre(*[args[i] for i in self.pre_in]), self.main_src)
        else:
            main = list(args)
        narrowed_in_place(main, self.narrow, self._twins)  # as in-process
        self.loader.run(main)
        return ()


def load(d: pathlib.Path, key: str) -> Package | None:
    """The package stored under ``key``, or None (absent, or it does not load). The metadata
    names the files it goes with (each writer's own), so a reader never pairs one writer's
    metadata with another's library."""
    try:
        meta_path = d / f"{key}.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        pre = None
        if meta["pre_in"] is not None:
            pre = pickle.loads((d / meta["pre"]).read_bytes())
        loader = torch._C._aoti.AOTIModelPackageLoader(str(d / meta["pt2"]), "model", False, 1, -1)
    except Exception as e:  # noqa: BLE001 - a broken or foreign package is a miss, not an error
        _warn(f"could not load compiled segment {key[:12]} from {d} ({type(e).__name__}: {e}); compiling it")
        return None
    stats["load"] += 1
    return Package(meta, pre, loader)


def _warn(text: str) -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"gradpipe: {text} (said once per process)", RuntimeWarning, stacklevel=4)


def _write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(d: pathlib.Path, key: str, graph: Any, flat: Sequence[Any], leaves: list[torch.Tensor]) -> bool:
    """Compile and store the graph one call through Dynamo ran (``graph``, a
    :class:`~gradpipe.runtime.compiled._Recorded`, with its flat arguments ``flat``); False if it
    cannot be packaged. ``leaves``: the call's tensors (:func:`signature`)."""
    from .compiled import _Hoisted, _Narrowed, main_args

    where = {id(t): i for i, t in reversed(list(enumerate(leaves)))}
    if not all(isinstance(a, torch.Tensor) and id(a) in where for a in flat):
        return False
    fn = graph.fn
    if isinstance(fn, _Hoisted):
        pre_mod, main, pre_in, main_src = fn.split.submod_0, fn.split.submod_1, fn.pre_in, fn.main_src
        example = main_args(flat, fn.pre(*[flat[i] for i in pre_in]), main_src)
    elif isinstance(fn, _Narrowed):
        pre_mod, main, pre_in, main_src, example = None, fn, None, None, list(flat)
    else:
        return False
    if not isinstance(main, _Narrowed) or not all(isinstance(a, torch.Tensor) for a in example):
        return False
    for i in main.narrow:
        example[i] = example[i].to(torch.float32)
    d.mkdir(parents=True, exist_ok=True)
    ep, shapes, ranges = _export(main.sub, example)
    # the graph arguments' sizes: what ``main`` reads of a graph argument has its exported sizes
    arg_shapes: list[Any] = [None] * len(flat)
    for j, src in enumerate(main_src if main_src is not None else range(len(flat))):
        if src >= 0:
            arg_shapes[src] = shapes[j]
    for src in (pre_in or ()):
        if arg_shapes[src] is None and flat[src].dim():
            arg_shapes[src] = list(flat[src].shape)
    stem = f"{key}.{os.getpid()}.{threading.get_ident()}"  # this writer's files: the metadata names them
    tmp = d / f".{stem}.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    os.replace(tmp, d / f"{stem}.pt2")
    if pre_mod is not None:
        _write(d / f"{stem}.pre", pickle.dumps(pre_mod))
    meta = {"leaf": [where[id(a)] for a in flat], "pre_in": pre_in, "main_src": main_src,
            "narrow": list(main.narrow), "shapes": arg_shapes, "ranges": ranges, "torch": torch.__version__,
            "pt2": f"{stem}.pt2", "pre": f"{stem}.pre"}
    _write(d / f"{key}.json", json.dumps(meta).encode())
    stats["save"] += 1
    return True


def _export(gm: torch.nn.Module, args: list[torch.Tensor]) -> tuple[Any, list[Any], dict[str, list[int]]]:
    """``gm`` exported with every size dynamic where the graph allows (``Dim.AUTO``; static
    where it does not), and per argument its sizes (int or symbol name) and each symbol's range."""
    import sympy
    from torch.export import Dim

    dyn = [{k: Dim.AUTO for k in range(a.dim())} if a.dim() else None for a in args]
    try:
        # (an FX graph module's ``forward`` takes ``*args``)
        ep = torch.export.export(gm, tuple(args), dynamic_shapes={"args": tuple(dyn)}, strict=False)
    except Exception:  # noqa: BLE001 - a graph that cannot take other sizes: these sizes only
        ep = torch.export.export(gm, tuple(args), strict=False)
    shapes: list[Any] = []
    by_name = {n.name: n for n in ep.graph.find_nodes(op="placeholder")}
    for name in ep.graph_signature.user_inputs:
        val = by_name[name].meta["val"]
        spec = []
        for n in val.shape:
            if isinstance(n, int):
                spec.append(n)
            elif isinstance(n.node.expr, sympy.Symbol):
                spec.append(str(n.node.expr))
            else:  # a size the graph derives from others: not described, so the call must match exactly
                spec.append(int(n.node.hint))
        shapes.append(spec if val.dim() else None)
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        if isinstance(sym, sympy.Symbol):
            try:
                hi = int(vr.upper)
            except Exception:  # noqa: BLE001 - torch's int_oo, sympy's oo: no upper bound
                hi = sys.maxsize
            ranges[str(sym)] = [int(vr.lower), hi]
    return ep, shapes, ranges


def _dynamo_idle() -> bool:
    """Whether a package may be called here: no torch function or dispatch mode, no frame under
    ``torch.compile``, the default stance, and grad mode off (as in ``Optimizer.step``)."""
    if torch.is_grad_enabled() or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    if os.environ.get("TORCH_COMPILE_DISABLE", "0") not in ("", "0"):  # compiling is off: so is its cache
        return False
    if "torch._dynamo" not in sys.modules:  # nothing was ever compiled in this process
        return True
    from .compiled import _default_stance, _eval_frame_callback
    return _eval_frame_callback() is None and _default_stance() and not torch._dynamo.config.disable


class Cached:
    """A segment's compiled function, served from the on-disk cache where it can be.

    ``make`` builds the ``torch.compile`` function (only when first needed: a process whose
    segments all load from disk never traces one with Dynamo). ``base``: the segment's part of the
    key. ``recording``: the thread-local a step plan records compiled-graph calls into."""

    def __init__(self, make: Callable[[], Callable], base: str, recording: threading.local) -> None:
        self.make, self.base, self.recording = make, base, recording
        self._compiled: Callable | None = None
        self._packages: dict[str, Package | None] = {}
        self._tried: set[str] = set()  # keys whose package this process tried to write

    @property
    def compiled(self) -> Callable:
        if self._compiled is None:
            self._compiled = self.make()
        return self._compiled

    def __call__(self, *args: Any) -> Any:
        d = cache_dir()
        if d is None:
            return self.compiled(*args)
        try:
            sig, leaves = signature(args)
        except TypeError:  # an argument the key cannot describe: not cached
            return self.compiled(*args)
        if any(t.device.type != "cpu" for t in leaves):  # CPU packages only (docstring)
            return self.compiled(*args)
        key = hashlib.sha256(f"{_environment()}|{_global_state()}|{self.base}|{sig}".encode()).hexdigest()[:40]
        if key not in self._packages:
            self._packages[key] = load(d, key)
        package = self._packages[key]
        flat = [leaves[i] for i in package.leaf] if package is not None else None
        if package is not None and package.fits(flat) and _dynamo_idle():
            try:
                package.call(flat)
            except Exception as e:  # noqa: BLE001 - a package that loads but does not run: compile instead
                _warn(f"a compiled segment from {d} failed ({type(e).__name__}: {str(e)[:200]}); compiling it")
                self._packages[key] = None
                self._tried.add(key)
            else:
                calls = getattr(self.recording, "calls", None)
                if calls is not None:
                    calls.append((package, flat, ()))
                stats["hit"] += 1
                return []
        outer = getattr(self.recording, "calls", None)
        mine: list = []
        self.recording.calls = mine
        breaks = _graph_breaks()
        try:
            out = self.compiled(*args)
        finally:
            self.recording.calls = outer
        if outer is not None:
            outer.extend(mine)
        if package is None and key not in self._tried:
            self._tried.add(key)
            if _graph_breaks() == breaks:  # a break may leave Python work after the graph: not packaged
                self._store(d, key, mine, leaves)
            else:
                stats["skip"] += 1
        return out

    def _store(self, d: pathlib.Path, key: str, calls: list, leaves: list[torch.Tensor]) -> None:
        """Write the package of the one graph the call ran; this process keeps calling Dynamo's (or
        a step plan's direct call of it). Called once per key per process."""
        ok = False
        if len(calls) == 1 and calls[0][2] in ((), [], None):
            try:
                ok = save(d, key, calls[0][0], calls[0][1], leaves)
            except Exception as e:  # noqa: BLE001 - the step already ran; only the cache is missed
                _warn(f"could not store a compiled segment in {d} ({type(e).__name__}: {str(e)[:200]})")
        if not ok:
            stats["skip"] += 1


def _graph_breaks() -> int:
    """Dynamo's count of graph breaks so far in this process."""
    utils = sys.modules.get("torch._dynamo.utils")
    return sum(utils.counters["graph_break"].values()) if utils is not None else 0
