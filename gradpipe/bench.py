"""Optimizer-step benchmarks: gradpipe's pipelines against ``torch.optim.Adam``.

``run_bench`` times ``opt.step()`` alone (gradients preset, ``time.perf_counter``
around the call) for every (size, layout, implementation) case and reports, per case:

* ``step_s``: the median step time over ``repeats`` timed steps (the first two steps and
  the warm-up steps are excluded); ``step_min_s`` is the fastest step.
* ``ratio_to_fused``: the case's median step over the median step of a torch
  ``Adam(fused=True)`` on the same parameters (each case gets fresh copies of one set of
  parameters and gradients, since the compiled backend moves the tensors it is given
  into its own flat buffers), timed in blocks right before and after the case's block
  (A-B-A), in the same process. Every implementation is timed as a
  block of back-to-back steps, as in a training loop: interleaving single steps of two
  implementations made the second one pay for waking the thread pool (up to
  milliseconds on the 2-core VM this was written on). Each (size, layout) group
  first calibrates the fused step of a quiet machine; when a case's fused blocks are
  more than 30% slower than that (other processes took the cores), the case is timed
  again, up to ``retries`` times, and the attempt with the quietest fused blocks is
  kept (``fused_spread``; ``noisy`` when even that one is over).
* ``init_s``: building the optimizer (the compiled backend moves the parameters and
  gradients into flat buffers there).
* ``step1_s``, ``step2_s``, ``first_two_s``: the first two steps. The compiled backend
  runs every step compiled (the state, declared by the ops, is allocated before a
  segment first runs), so ``step1_s`` includes the compilation and ``first_two_s`` is
  "first step including compilation". Results written before the core redesign (issue
  11; e.g. ``benchmarks/results/cpu-2026-11-23.json``) ran the first step eagerly and
  compiled on the second, which is why the sum of two steps is reported.
* ``state_bytes``: the bytes of every tensor the optimizer keeps in its state (each
  storage counted once: the compiled backend's per-parameter state are views of flat
  buffers). Exact.
* ``peak_rss_delta_bytes``: the process's peak resident memory during the case (its
  first steps and timed steps) above what it held before the optimizer was built
  (``/proc/self/status`` ``VmHWM``, reset through ``/proc/self/clear_refs``). It counts
  state and temporaries; the allocator reuses freed memory, so it is approximate,
  and ``None`` where ``/proc`` cannot do this.
* ``traffic_bytes_per_param``: the least memory traffic of one step from the
  pipeline's math: read the gradient and the parameter, write the parameter, and read
  and write every state element, ``12 + 8 * state_elements / params`` bytes in fp32
  (fused Adam: 28 B/param; the roofline model of ``docs/benchmarks.md``). A pipeline
  with a global reduction needs more than one pass, so for it this is a lower bound.
* ``roofline_pct``: ``traffic_bytes_per_param * n_params / bandwidth / step_s``, where
  ``bandwidth`` (``bandwidth_gbs``) is the streaming bandwidth measured right before
  and right after the case's timed blocks (``a += b`` in place on two 256 MB buffers,
  far larger than the caches; the better of the two, since other processes only lower
  it). The host's bandwidth drifted between about 60 and 110 GB/s over an afternoon on
  the VM this was written on, so it is measured next to each case; the run's other
  measurements (:func:`measure_bandwidth`, at the start and after every (size, layout)
  group) are in ``bandwidth_samples_gbs`` and ``run_bandwidth_gbs``. Above 100% means
  the working set fits in cache (or the bandwidth rose during the case).

Multi-loss pipelines (``pcgrad_adam``) read one gradient per named loss and compute
them inside ``step(losses=...)`` with autograd. The case feeds two linear losses
``sum_p <p, G_k>`` (gradients ``G_k``), times the step *including* its two
``autograd.grad`` calls, times those two calls alone in the same rounds, and reports
``autograd_s`` and a ratio of the difference (``includes_autograd`` is true).

Layouts: ``"1+K"`` is one large matrix holding 90% of the parameters (``(n/1000,
1000)`` when it divides) and ``K`` vectors sharing 10%; ``"model"`` is the parameter
shapes of a GPT-2-style transformer scaled to about ``n`` parameters
(:func:`gpt_shapes`).

heavyball and pytorch-optimizer are timed when importable (``heavyball.AdamW``,
``pytorch_optimizer.DiffGrad``) and reported as ``not installed`` otherwise.

``run_peers`` (``gradpipe bench --peers``) times the pipelines next to the other
implementations of their algorithms (:data:`PEERS`): torch's Adam as a for-loop, foreach,
fused and with its ``step`` under ``torch.compile``, ``torch.optim.Muon``, heavyball's
AdamW, Muon and SOAP, pytorch-optimizer's DiffGrad and Grams, each with its library's
defaults but ``lr``. Matrix optimizers (and gradpipe's ``muon`` and ``soap``,
:data:`MATRIX_PIPELINES`) are given the layout's 2-D parameters only (``given``,
``given_params``, ``given_tensors``), and their fused Adam runs over those same tensors.
A gradient a step frees (heavyball sets ``p.grad = None``) is given back, untimed, before
the next step. ``peers_markdown`` prints the table.

``device="cuda"`` runs the same cases on a GPU: every timed call is bracketed by
``torch.cuda.synchronize()``, the bandwidth is the device's, and
``peak_cuda_delta_bytes`` is the peak allocation growth (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import pathlib
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = ["PIPELINES", "SIZES", "TORCH_BASELINES", "PEERS", "PEER_PIPELINES", "PEER_COLUMNS", "MATRIX_PIPELINES",
           "run_bench", "run_peers", "peers_markdown", "check_peer_keys", "parse_size", "size_label", "gpt_shapes",
           "layout_shapes", "measure_bandwidth", "machine_info", "to_markdown", "check_targets",
           "write_json", "targets_markdown", "storage_costs", "pivot_markdown"]

#: the pipelines of the benchmark spec
PIPELINES = ("adam", "adamw", "diffgrad", "grams", "scalpel", "pcgrad_adam", "galore_adamw")
#: the spec's sizes
SIZES = ("100K", "1M", "10M", "100M")
#: ``torch.optim.Adam`` implementations
TORCH_BASELINES = ("forloop", "foreach", "fused")
#: third-party optimizers timed when their package imports: (module, class, comparable pipeline)
OTHERS = (("heavyball", "AdamW", "adamw"), ("pytorch_optimizer", "DiffGrad", "diffgrad"))

LR = 1e-3
_ITEM = 4  # fp32


# ---------------------------------------------------------------------------------- sizes and shapes
def parse_size(text: str | int) -> int:
    """``"100K"`` -> 100000, ``"1.5M"`` -> 1500000, ``"10000"`` -> 10000."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ValueError(f"not a parameter count: {text!r} (use e.g. 100K, 1M, 10M)") from None
    if value < 1:
        raise ValueError(f"a parameter count must be positive, got {text!r}")
    return int(round(value))


def size_label(n: int) -> str:
    """100000 -> ``"100K"``, 10000000 -> ``"10M"`` (exact multiples only; else the number)."""
    for unit, mult in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def gpt_shapes(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a GPT-2-style decoder with about ``n_params`` parameters.

    GPT-2's layout (Radford et al., 2019; the Hugging Face ``Conv1D`` ``(in, out)``
    convention): token and position embeddings, per layer two LayerNorms, the fused
    ``c_attn`` (d x 3d) and ``c_proj`` (d x d) attention projections and a 4x MLP, and a
    final LayerNorm; 12 tensors per layer plus 4. The depth grows with the size (2, 4, 6,
    12 layers below 1M, 10M, 100M and above), the width is chosen so the layers hold
    about 70% of the parameters, and the vocabulary takes the rest (at least 256 tokens).
    100M gives 12 layers of width 704 and a 39K vocabulary, close to GPT-2 small (124M).
    """
    n = n_params
    layers = 2 if n < 10**6 else 4 if n < 10**7 else 6 if n < 10**8 else 12
    d = max(16, int(round(math.sqrt(0.7 * n / (12 * layers)) / 16)) * 16)
    ctx = 128 if n < 10**6 else 256 if n < 10**8 else 1024
    per_layer = 12 * d * d + 13 * d
    vocab = max(256, (n - layers * per_layer - ctx * d - 2 * d) // d)
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                   (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                   (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                   (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                   (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                   (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def layout_shapes(n_params: int, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes for ``layout``: ``"1+K"`` (one large matrix, K small vectors) or ``"model"``."""
    if layout == "model":
        return gpt_shapes(n_params)
    head, _, tail = layout.partition("+")
    if head != "1" or not tail.isdigit() or int(tail) < 0:
        raise ValueError(f"unknown layout {layout!r}: use '1+K' (e.g. '1+50') or 'model'")
    k = int(tail)
    small = max(1, n_params // (10 * k)) if k else 0
    large = n_params - k * small
    if large < 1:
        raise ValueError(f"{n_params} parameters are too few for layout {layout!r}")
    big = (large // 1000, 1000) if large % 1000 == 0 and large >= 2000 else (large,)
    return [("large.weight", big)] + [(f"small.{i}.bias", (small,)) for i in range(k)]


# ---------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch and Python versions, a hash of gradpipe's Python sources, date (UTC)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from . import __version__
    from .runtime.aot import source_digest
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "gradpipe": __version__, "gradpipe_source_sha256": source_digest()[:12],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def measure_bandwidth(mbytes: int = 256, repeats: int = 10, device: str | torch.device = "cpu") -> dict[str, float]:
    """Streaming bandwidth in GB/s (1e9 B/s) on fp32 buffers of ``mbytes`` MB each on
    ``device``, far larger than the caches (CPU caches, a GPU's L2), with torch's current
    thread count (medians of ``repeats``; on CUDA each call is timed between two
    ``torch.cuda.synchronize()``):

    * ``stream_gbs``: ``a += b`` (read ``a`` and ``b``, write ``a`` in place: 12 B per
      element). An optimizer step updates its parameter and state in place and reads
      the gradient, so this is the access pattern of the roofline.
    * ``add_gbs``: ``c = a + b`` into a third buffer (12 B counted, as STREAM counts it;
      the hardware also reads ``c`` before writing it, write-allocate; McCalpin's STREAM).
    * ``copy_gbs``: ``b = a`` (8 B counted).
    """
    dev = torch.device(device)
    sync = _synchronizer(dev)
    n = mbytes * 2**20 // 4
    a, b, c = torch.rand(n, device=dev), torch.rand(n, device=dev), torch.empty(n, device=dev)
    stream = _stream_gbs((a, b), repeats, sync)
    add = _median_gbs(lambda: torch.add(a, b, out=c), 3 * 4 * n, repeats, sync)
    copy = _median_gbs(lambda: c.copy_(a), 2 * 4 * n, repeats, sync)
    return {"stream_gbs": stream, "add_gbs": add, "copy_gbs": copy, "buffer_mb": float(mbytes)}


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What makes a timer see the device's work finished: ``torch.cuda.synchronize`` on
    CUDA (kernels run asynchronously), nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def _median_gbs(fn: Callable[[], Any], moved: int, repeats: int, sync: Callable[[], None] | None = None) -> float:
    fn()
    return moved / statistics.median(_block(lambda: _timed(fn, sync), repeats, 0)) / 1e9


def _stream_gbs(bufs: tuple[torch.Tensor, torch.Tensor], repeats: int = 5,
                sync: Callable[[], None] | None = None) -> float:
    """``a += b`` in place on two large buffers: GB/s at 12 B per element."""
    a, b = bufs
    return _median_gbs(lambda: a.add_(b, alpha=1e-30), 3 * a.element_size() * a.numel(), repeats, sync)


def _rss() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, or None without /proc."""
    try:
        vals = {}
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) * 1024
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class _Case:
    library: str  # gradpipe | torch | heavyball | pytorch_optimizer
    pipeline: str  # gradpipe pipeline, or the algorithm of a baseline
    backend: str  # eager | compiled | forloop | foreach | fused | compile | the class name
    matrices: bool = False  # given only the layout's matrices (2-D parameters)

    @property
    def name(self) -> str:
        if self.library == "gradpipe":
            return f"gradpipe {self.pipeline} [{self.backend}]"
        if self.library == "torch" and self.pipeline == "adam":
            return f"torch Adam ({'torch.compile' if self.backend == 'compile' else self.backend})"
        return f"{self.library} {self.backend}"


#: gradpipe pipelines given only the layout's matrices: Muon is defined for matrices only
#: (``pipelines/muon.grad`` matches no vector), and SOAP is compared there with heavyball's
MATRIX_PIPELINES = frozenset({"muon", "soap"})
#: the gradpipe pipelines of ``gradpipe bench --peers``
PEER_PIPELINES = ("adam", "adamw", "diffgrad", "grams", "muon", "soap")
#: the peers of ``gradpipe bench --peers`` by key, in the order of the table: torch's Adams,
#: then each algorithm's other implementations (library defaults but ``lr``). Matrix
#: optimizers get the layout's 2-D parameters only, as gradpipe's muon and soap do
PEERS: dict[str, _Case] = {
    "torch_fused": _Case("torch", "adam", "fused"),
    "torch_foreach": _Case("torch", "adam", "foreach"),
    "torch_forloop": _Case("torch", "adam", "forloop"),
    "torch_compile": _Case("torch", "adam", "compile"),
    "heavyball_adamw": _Case("heavyball", "adamw", "AdamW"),
    "pytorch_optimizer_diffgrad": _Case("pytorch_optimizer", "diffgrad", "DiffGrad"),
    "pytorch_optimizer_grams": _Case("pytorch_optimizer", "grams", "Grams"),
    "torch_muon": _Case("torch", "muon", "Muon", matrices=True),
    "heavyball_muon": _Case("heavyball", "muon", "Muon", matrices=True),
    "heavyball_soap": _Case("heavyball", "soap", "SOAP", matrices=True),
}


def _gradpipe_case(pipeline: str, backend: str) -> _Case:
    return _Case("gradpipe", pipeline, backend, matrices=pipeline in MATRIX_PIPELINES)


def _cases(pipelines: Sequence[str], backends: Sequence[str], baselines: Sequence[str],
           others: bool) -> list[_Case]:
    out = [_Case("torch", "adam", b) for b in baselines]
    out += [_gradpipe_case(p, b) for p in pipelines for b in backends]
    if others:
        out += [_Case(mod, algo, cls) for mod, cls, algo in OTHERS]
    return out


def check_peer_keys(keys: Iterable[str]) -> None:
    """``ValueError`` naming the first key that is not in :data:`PEERS`."""
    unknown = [k for k in keys if k not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)}")


def _peer_cases(pipelines: Sequence[str], backends: Sequence[str], peers: Sequence[str] | None = None) -> list[_Case]:
    """The peers named (every one of :data:`PEERS` when ``None``; an unknown key is a
    ``ValueError``) and the gradpipe pipelines, each after the peers of its algorithm."""
    keys = list(PEERS) if peers is None else list(peers)
    check_peer_keys(keys)
    chosen = [PEERS[k] for k in PEERS if k in keys]
    ours = [_gradpipe_case(p, b) for p in pipelines for b in backends]
    out = [c for c in chosen if c.library == "torch" and c.pipeline == "adam"]
    for algo in dict.fromkeys([c.pipeline for c in chosen] + [c.pipeline for c in ours]):
        out += [c for c in chosen if c.pipeline == algo and c not in out]
        out += [c for c in ours if c.pipeline == algo]
    return out


def _make_optimizer(case: _Case, named: list[tuple[str, torch.Tensor]]) -> torch.optim.Optimizer:
    params = [p for _, p in named]
    if case.library == "gradpipe":
        from .runtime.optimizer import Optimizer
        return Optimizer(named, case.pipeline, backend=case.backend, lr=LR)
    if case.library == "torch" and case.pipeline == "adam":
        if case.backend == "compile":
            return _compiled_adam(params)
        kw = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[case.backend]
        return torch.optim.Adam(params, lr=LR, **kw)
    module = torch.optim if case.library == "torch" else importlib.import_module(case.library)
    return getattr(module, case.backend)(params, lr=LR)


def _compiled_adam(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (its default implementation) whose ``step`` runs a function
    calling the original ``opt.step()`` under ``torch.compile(fullgraph=False)``, torch's
    recipe (the tutorial "Compiling the optimizer with torch.compile"). Its first steps
    compile (and recompile once the state exists): the warm-up before the timed steps."""
    opt = torch.optim.Adam(params, lr=LR)
    plain = opt.step
    opt.step = torch.compile(lambda: plain(), fullgraph=False)  # type: ignore[method-assign]
    return opt


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, each storage once."""
    seen: dict[int, int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[s.data_ptr() if s.nbytes() else id(v)] = s.nbytes()
        elif isinstance(v, Mapping):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    visit(list(opt.state.values()))
    visit(getattr(opt, "_node_state", {}))
    return sum(seen.values())


def _traffic_bytes(case: _Case, opt: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]]) -> float | None:
    """Least bytes one step moves, from the math (``lowering.least_traffic``, what ``explain``
    states): 4 B per gradient read, 8 for the parameter, 8 per state element (fp32)."""
    n = sum(p.numel() for _, p in named)
    if case.pipeline == "adam" and case.library == "torch":
        return 28.0 * n
    if case.library != "gradpipe":
        return None
    from .compiler.lowering import least_traffic
    prog = opt.program  # type: ignore[attr-defined]
    return sum(least_traffic(prog, opt.route_of(p), tuple(p.shape), _ITEM) * p.numel()  # type: ignore[attr-defined]
               for _, p in named)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _linear_losses(named: list[tuple[str, torch.Tensor]], dirs: Sequence[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"main": sum_p <p, G1_p>, "aux": sum_p <p, G2_p>}``: gradients exactly ``G1``, ``G2``."""
    with torch.enable_grad():
        return {k: torch.stack([(p * g).sum() for (_, p), g in zip(named, gs)]).sum()
                for k, gs in zip(("main", "aux"), dirs)}


def _timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds ``fn()`` takes; with ``sync`` (CUDA) the device's queued work is finished
    before the clock starts and waited for before it stops."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def _block(fn: Callable[[], float], n: int, warmup: int, deadline: float | None = None) -> list[float]:
    """``warmup`` untimed calls, then up to ``n`` timed ones (at least 3 before ``deadline`` stops them)."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(n):
        out.append(fn())
        if deadline is not None and len(out) >= 3 and time.perf_counter() > deadline:
            break
    return out


_Master = list[tuple[str, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Timing:
    """How a run times its cases (the keyword arguments of :func:`run_bench`)."""

    repeats: int | None = None
    warmup: int = 2
    max_case_s: float = 120.0
    retries: int = 2
    max_spread: float = 1.3
    retry_sleep_s: float = 1.0
    bandwidth_mb: int = 256
    seed: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def sync(self) -> Callable[[], None] | None:
        return _synchronizer(self.device)


def _fresh(master: Sequence[tuple[str, torch.Tensor, torch.Tensor]]
           ) -> tuple[list[tuple[str, torch.Tensor]], torch.optim.Optimizer]:
    """Copies of the parameters with their gradients set, and a torch fused Adam over them."""
    named = []
    for name, p, g in master:
        q = p.clone().requires_grad_()
        q.grad = g.clone()
        named.append((name, q))
    base = torch.optim.Adam([q for _, q in named], lr=LR, fused=True)
    base.step()
    return named, base


def _stepper(step: Callable[[], Any], grads: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
             sync: Callable[[], None] | None) -> Callable[[], float]:
    """``step`` timed, after giving back, untimed, every gradient a step freed (heavyball
    sets ``p.grad = None`` in its step; the next step, or the fused Adam timed around
    the case, would skip those parameters)."""
    def timed() -> float:
        for p, g in grads:
            if p.grad is None:
                p.grad = g
        return _timed(step, sync)
    return timed


def _calibrate(master: _Master, repeats: int, t: _Timing) -> float:
    """The fused-Adam step time of a quiet machine on fresh copies of ``master``: block
    medians until two in a row agree within 10% (at most ``retries + 2`` blocks); the smallest."""
    _, base = _fresh(master)
    step = _stepper(base.step, (), t.sync)
    meds = [statistics.median(_block(step, repeats, 2))]
    for _ in range(t.retries + 1):
        meds.append(statistics.median(_block(step, repeats, 1)))
        if max(meds[-2:]) / min(meds[-2:]) <= 1.1:
            break
        time.sleep(t.retry_sleep_s)
    return min(meds)


def _auto_repeats(n: int) -> int:
    return 20 if n <= 2 * 10**6 else 7 if n <= 2 * 10**7 else 3


def _step_fns(opt: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]],
              dirs: Sequence[list[torch.Tensor]] | None, multi: bool, sync: Callable[[], None] | None
              ) -> tuple[Callable[[], float], Callable[[], float] | None]:
    """The timed step and, for a multi-loss pipeline, its two ``autograd.grad`` calls timed alone."""
    if not multi:
        return _stepper(opt.step, [(p, p.grad) for _, p in named], sync), None
    if dirs is None:
        raise RuntimeError("internal: multi-loss case without loss directions")
    params = [p for _, p in named]

    def step() -> float:
        losses = _linear_losses(named, dirs)  # the forward pass, not timed
        return _timed(lambda: opt.step(losses=losses), sync)  # type: ignore[call-arg]

    def autograd_only() -> float:
        losses = _linear_losses(named, dirs)
        return _timed(lambda: (torch.autograd.grad(losses["main"], params, retain_graph=True),
                               torch.autograd.grad(losses["aux"], params)), sync)
    return step, autograd_only


def _attempts(step: Callable[[], float], base_step: Callable[[], float], autograd_only: Callable[[], float] | None,
              repeats: int, t: _Timing, ref: list[float]) -> tuple[float, list[float], list[float], list[float], int]:
    """Blocks of fused Adam, the case, its autograd calls, fused Adam again, until the fused
    blocks are within ``max_spread`` of the quiet step ``ref[0]`` (lowered when a block is
    faster) or the retries or ``max_case_s`` run out; the quietest attempt's
    ``(spread, fused times, step times, autograd times)`` and the number of attempts."""
    t_case = time.perf_counter()
    attempts = []
    for attempt in range(1 + t.retries):
        before = _block(base_step, repeats, 1)
        times = _block(step, repeats, t.warmup if attempt == 0 else 1,
                       deadline=time.perf_counter() + t.max_case_s / (1 + t.retries))
        auto_times = _block(autograd_only, len(times), 1) if autograd_only is not None else []
        after = _block(base_step, repeats, 1)
        mb, ma = statistics.median(before), statistics.median(after)
        ref[0] = min(ref[0], mb, ma)
        spread = max(mb, ma) / ref[0]
        attempts.append((spread, before + after, times, auto_times))
        if spread <= t.max_spread or time.perf_counter() - t_case > t.max_case_s:
            break
        time.sleep(t.retry_sleep_s)  # let a burst of other work pass
    return (*min(attempts, key=lambda a: a[0]), len(attempts))


def _memory_mark(device: torch.device) -> tuple[tuple[int, int] | None, bool, int | None]:
    """Before a case: the resident set, whether its peak could be reset, and on CUDA the
    allocated bytes (the device's peak statistics reset)."""
    rss0 = _rss()
    peak_ok = rss0 is not None and _reset_peak()
    if device.type != "cuda":
        return rss0, peak_ok, None
    torch.cuda.reset_peak_memory_stats(device)
    return rss0, peak_ok, torch.cuda.memory_allocated(device)


def _memory_peaks(mark: tuple[tuple[int, int] | None, bool, int | None], device: torch.device
                  ) -> tuple[int | None, int | None]:
    """Peak resident-set growth and peak CUDA allocation growth since :func:`_memory_mark`."""
    rss0, peak_ok, cuda0 = mark
    rss1 = _rss()
    host = (rss1[1] - rss0[0]) if peak_ok and rss0 and rss1 else None
    dev = torch.cuda.max_memory_allocated(device) - cuda0 if cuda0 is not None else None
    return host, dev


def _run_case(case: _Case, named: list[tuple[str, torch.Tensor]], base: torch.optim.Optimizer,
              dirs: Sequence[list[torch.Tensor]] | None, repeats: int, t: _Timing,
              stream: tuple[torch.Tensor, torch.Tensor], ref: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"impl": case.name, "library": case.library, "pipeline": case.pipeline,
                           "backend": case.backend, "status": "ok", "error": None}
    if case.backend in ("compiled", "compile"):
        from torch import _dynamo
        _dynamo.reset()  # a fresh compilation per case (and no growing recompile cache)
    mark = _memory_mark(t.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        opt = _make_optimizer(case, named)
        init_s = time.perf_counter() - t0
        multi = case.library == "gradpipe" and bool(opt.program.losses)  # type: ignore[attr-defined]
        step, autograd_only = _step_fns(opt, named, dirs, multi, t.sync)
        base_step = _stepper(base.step, [(p, p.grad) for _, p in named], t.sync)
        step1 = step()
        step2 = step()
        bw_before = _stream_gbs(stream, sync=t.sync)
        spread, base_times, times, auto_times, attempts = _attempts(step, base_step, autograd_only, repeats, t, ref)
        peak_host, peak_dev = _memory_peaks(mark, t.device)
        bandwidth = max(bw_before, _stream_gbs(stream, sync=t.sync))  # other processes only ever lower it
    fallback = [str(w.message) for w in caught if type(w.message).__name__ == "CompileFallbackWarning"]
    n = sum(p.numel() for _, p in named)
    step_s = statistics.median(times)
    net = max(step_s - statistics.median(auto_times), 1e-9) if multi else step_s
    fused_s = statistics.median(base_times)
    traffic = _traffic_bytes(case, opt, named)
    roof_s = traffic / (bandwidth * 1e9) if traffic is not None and bandwidth > 0 else None
    state = _state_bytes(opt)
    row.update(repeats=len(times), step_s=step_s, step_min_s=min(times), step_times_s=times,
               fused_step_s=fused_s, ratio_to_fused=net / fused_s,
               init_s=init_s, step1_s=step1, step2_s=step2, first_two_s=step1 + step2,
               state_bytes=state, state_bytes_per_param=state / n,
               peak_rss_delta_bytes=peak_host, peak_cuda_delta_bytes=peak_dev,
               traffic_bytes_per_param=traffic / n if traffic is not None else None,
               roofline_s=roof_s, roofline_pct=100.0 * roof_s / net if roof_s is not None and net > 0 else None,
               bandwidth_gbs=bandwidth,
               includes_autograd=multi, autograd_s=statistics.median(auto_times) if multi else None,
               compile_fallback=fallback[0] if fallback else None, attempts=attempts,
               fused_spread=spread, noisy=spread > t.max_spread)
    return row


def _empty_row(case: _Case, status: str, error: str | None) -> dict[str, Any]:
    keys = ("repeats", "step_s", "step_min_s", "step_times_s", "fused_step_s", "ratio_to_fused", "init_s", "step1_s",
            "step2_s", "first_two_s", "state_bytes", "state_bytes_per_param", "peak_rss_delta_bytes",
            "peak_cuda_delta_bytes", "traffic_bytes_per_param", "roofline_s", "roofline_pct", "bandwidth_gbs",
            "autograd_s", "compile_fallback", "attempts", "fused_spread", "noisy")
    return {"impl": case.name, "library": case.library, "pipeline": case.pipeline, "backend": case.backend,
            "status": status, "error": error, "includes_autograd": False, **dict.fromkeys(keys)}


def _available(case: _Case) -> tuple[bool, str | None]:
    """Whether the case can run here, and the row's status when it cannot: ``not installed``
    (the package does not import) or ``no <name> in this version``."""
    if case.library == "gradpipe":
        return True, None
    if case.library == "torch":
        owner, name = ((torch, "compile") if case.backend == "compile" else
                       (torch.optim, "Adam" if case.pipeline == "adam" else case.backend))
        return (True, None) if hasattr(owner, name) else (False, f"no {name} in torch {torch.__version__}")
    try:
        mod = importlib.import_module(case.library)
    except ImportError:
        return False, "not installed"
    if not hasattr(mod, case.backend):
        return False, f"no {case.backend} in this version"
    return True, None


# ---------------------------------------------------------------------------------- the run
def _master(shapes: list[tuple[str, tuple[int, ...]]], t: _Timing, needs_dirs: bool
            ) -> tuple[_Master, list[list[torch.Tensor]] | None]:
    """Parameters and gradients drawn from ``seed`` (on the CPU, then moved to the run's
    device), and for multi-loss cases the two loss directions (the gradients and a second draw)."""
    g = torch.Generator().manual_seed(t.seed)
    master = [(name, torch.randn(shape, generator=g).to(t.device), torch.randn(shape, generator=g).to(t.device))
              for name, shape in shapes]
    dirs = ([[gr for _, _, gr in master], [torch.randn(p.shape, generator=g).to(t.device) for _, p, _ in master]]
            if needs_dirs else None)
    return master, dirs


def _case_row(case: _Case, master: _Master, dirs: list[list[torch.Tensor]] | None, repeats: int, t: _Timing,
              stream: tuple[torch.Tensor, torch.Tensor], refs: dict[bool, list[float]]) -> dict[str, Any]:
    """One case's row on its own copies of the parameters (all of them, or the matrices
    for a matrix optimizer: its ratio is to fused Adam on those same matrices)."""
    subset = [m for m in master if m[1].dim() == 2] if case.matrices else master
    given = {"given": "matrices" if case.matrices else "all", "given_params": sum(p.numel() for _, p, _ in subset),
             "given_tensors": len(subset)}
    ok, why = _available(case)
    if not ok or not subset:
        return {**_empty_row(case, why or "no matrices in this layout", None), **given}
    if case.matrices not in refs:
        refs[case.matrices] = [_calibrate(subset, repeats, t)]
    named, base = _fresh(subset)  # each case its own tensors: optimizers may adopt them
    try:
        row = _run_case(case, named, base, None if case.matrices else dirs, repeats, t, stream, refs[case.matrices])
    except Exception as e:  # noqa: BLE001 - a failing case is a result, not the end of the run
        row = _empty_row(case, "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return {**row, **given}


def _run_group(cases: Sequence[_Case], n: int, layout: str, t: _Timing,
               progress: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """Every case at one (size, layout); the quiet fused step is calibrated per parameter set."""
    needs_dirs = any(c.library == "gradpipe" and c.pipeline == "pcgrad_adam" for c in cases)
    master, dirs = _master(layout_shapes(n, layout), t, needs_dirs)
    total = sum(p.numel() for _, p, _ in master)
    reps = t.repeats if t.repeats is not None else _auto_repeats(total)
    nbw = t.bandwidth_mb * 2**20 // 4
    stream = (torch.rand(nbw, device=t.device), torch.rand(nbw, device=t.device))  # measured around every case
    refs: dict[bool, list[float]] = {}
    rows = []
    for case in cases:
        row = {"size": size_label(n), "n_params": total, "layout": layout, "n_tensors": len(master),
               "threads": torch.get_num_threads(), "device": t.device.type,
               **_case_row(case, master, dirs, reps, t, stream, refs)}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def _run(cases: Sequence[_Case], sizes: Iterable[str | int], layouts: Sequence[str], threads: int | None,
         t: _Timing, out_json: str | os.PathLike[str] | None, config: dict[str, Any],
         progress: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """Every (size, layout) group, the streaming bandwidth at the start and after each group,
    the run's best bandwidth on every row; the JSON when ``out_json`` is given."""
    ns = [parse_size(s) for s in sizes]
    machine = machine_info()  # before the run: the source hash of the code that is timed
    rows: list[dict[str, Any]] = []
    with _threads(threads):
        bws = [measure_bandwidth(t.bandwidth_mb, device=t.device)]
        for n in ns:
            for layout in layouts:
                rows += _run_group(cases, n, layout, t, progress)
                bws.append(measure_bandwidth(t.bandwidth_mb, device=t.device))
    best = max([bw["stream_gbs"] for bw in bws] + [r["bandwidth_gbs"] for r in rows if r.get("bandwidth_gbs")])
    for row in rows:
        row.update(run_bandwidth_gbs=best, bandwidth_samples_gbs=[round(bw["stream_gbs"], 2) for bw in bws])
    if out_json is not None:
        write_json(out_json, rows, {"measurements": bws, "best_gbs": best},
                   {"sizes": ns, "layouts": list(layouts), "repeats": t.repeats, "threads": threads,
                    "warmup": t.warmup, "device": t.device.type, **config}, machine=machine)
    return rows


def run_bench(sizes: Iterable[str | int] = SIZES, pipelines: Sequence[str] = PIPELINES,
              backends: Sequence[str] = ("eager", "compiled"), layouts: Sequence[str] = ("1+50",),
              repeats: int | None = None, threads: int | None = 2, out_json: str | os.PathLike[str] | None = None,
              *, baselines: Sequence[str] = TORCH_BASELINES, others: bool = True, warmup: int = 2,
              max_case_s: float = 120.0, bandwidth_mb: int = 256, seed: int = 0, retries: int = 2,
              max_spread: float = 1.3, retry_sleep_s: float = 1.0, device: str | torch.device = "cpu",
              progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Time one optimizer step of every case; the rows as a list of dicts (see the module docstring).

    Args:
        sizes: parameter counts (``"100K"``, ``"1M"``, ints).
        pipelines: gradpipe pipeline names (or `.grad` paths); those of
            :data:`MATRIX_PIPELINES` are given the layout's matrices only.
        backends: gradpipe backends to time each pipeline with.
        layouts: ``"1+K"`` and/or ``"model"``.
        repeats: timed steps per case (the median is reported); ``None``: 20 up to 2M
            parameters, 7 up to 20M, 3 above.
        threads: torch threads for the run (restored afterwards); ``None`` keeps torch's.
        out_json: also write ``{"machine", "bandwidth", "config", "results"}`` there.
        baselines: ``torch.optim.Adam`` variants timed as cases (``forloop``, ``foreach``,
            ``fused``); the fused one is always timed alongside every case for the ratio.
        others: also time heavyball and pytorch-optimizer (rows say ``not installed``
            when they do not import).
        warmup: untimed steps after the first two.
        max_case_s: stop a case's timed steps after this many seconds (at least 3 are timed).
        retries, max_spread: when a fused-Adam block before or after a case is more than
            ``max_spread`` times slower than the group's calibrated quiet fused step (other
            processes took the cores), time the case again, up to ``retries`` more times,
            and keep the attempt with the quietest blocks (``fused_spread``; ``noisy``
            when even that one is over), pausing ``retry_sleep_s`` between attempts.
        bandwidth_mb: buffer size of the bandwidth measurement.
        device: where the parameters live (``"cpu"``, ``"cuda"``); on CUDA every timed call
            is bracketed by ``torch.cuda.synchronize()`` and ``peak_cuda_delta_bytes`` is
            the peak allocation growth.
        progress: called with each row as it is finished.
    """
    t = _Timing(repeats, warmup, max_case_s, retries, max_spread, retry_sleep_s, bandwidth_mb, seed,
                torch.device(device))
    config = {"pipelines": list(pipelines), "backends": list(backends), "baselines": list(baselines), "peers": None}
    return _run(_cases(pipelines, backends, baselines, others), sizes, layouts, threads, t, out_json, config,
                progress)


def run_peers(sizes: Iterable[str | int] = ("1M",), pipelines: Sequence[str] = PEER_PIPELINES,
              backends: Sequence[str] = ("compiled",), layouts: Sequence[str] = ("1+50",),
              repeats: int | None = None, threads: int | None = 2, out_json: str | os.PathLike[str] | None = None,
              *, peers: Sequence[str] | None = None, warmup: int = 2, max_case_s: float = 120.0,
              bandwidth_mb: int = 256, seed: int = 0, retries: int = 2, max_spread: float = 1.3,
              retry_sleep_s: float = 1.0, device: str | torch.device = "cpu",
              progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """gradpipe's pipelines next to the other implementations of their algorithms
    (:data:`PEERS`: torch's Adam as a for-loop, foreach, fused and under ``torch.compile``,
    torch's Muon, heavyball's AdamW, Muon and SOAP, pytorch-optimizer's DiffGrad and Grams),
    timed as :func:`run_bench` times its cases (same rows, same keyword arguments), each
    as a ratio to torch fused Adam on the same parameters in the same process. Matrix
    optimizers (``given == "matrices"``) get the layout's 2-D parameters only, and their
    fused Adam runs over those. ``peers``: keys of :data:`PEERS` (default: all); a peer
    whose package does not import is a ``not installed`` row. ``ValueError`` on an
    unknown key."""
    cases = _peer_cases(pipelines, backends, peers)
    t = _Timing(repeats, warmup, max_case_s, retries, max_spread, retry_sleep_s, bandwidth_mb, seed,
                torch.device(device))
    config = {"pipelines": list(pipelines), "backends": list(backends), "baselines": [],
              "peers": list(peers) if peers is not None else list(PEERS)}
    return _run(cases, sizes, layouts, threads, t, out_json, config, progress)


_B1, _B2, _EPS = 0.9, 0.999, 1e-8


def _adam_update(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                 u: torch.Tensor) -> None:
    """Adam's moments in place and its update written into ``u`` (Kingma & Ba, 2015):
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``u = c1 m / (c2 sqrt(v) + eps)``
    with the bias corrections ``c1 = 1/(1-b1^t)``, ``c2 = 1/sqrt(1-b2^t)`` computed outside."""
    m.mul_(_B1).add_(g, alpha=1 - _B1)
    v.mul_(_B2).addcmul_(g, g, value=1 - _B2)
    u.copy_(m * c1 / (v.sqrt() * c2 + _EPS))


def _adam_in_place(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c1: torch.Tensor,
                   c2: torch.Tensor, lr: torch.Tensor) -> None:
    """One Adam step with the parameter updated in the same pass: ``p -= lr u``."""
    m.mul_(_B1).add_(g, alpha=1 - _B1)
    v.mul_(_B2).addcmul_(g, g, value=1 - _B2)
    p.sub_(lr * (m * c1 / (v.sqrt() * c2 + _EPS)))


def _adam_in_place_pow(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
                       lr: torch.Tensor) -> None:
    """The same step with the bias corrections written in the kernel as ``1 - b^step``."""
    m.mul_(_B1).add_(g, alpha=1 - _B1)
    v.mul_(_B2).addcmul_(g, g, value=1 - _B2)
    p.sub_(lr * ((m / (1 - _B1 ** step)) / ((v / (1 - _B2 ** step)).sqrt() + _EPS)))


def storage_costs(n_params: int | str = "10M", layout: str = "1+50", repeats: int = 25,
                  threads: int | None = 2, rounds: int = 5) -> dict[str, float]:
    """What the compiled backend's flat-bucket storage costs, part by part (seconds: the
    best of ``rounds`` block medians per part, the parts interleaved round by round).

    When the parameters and gradients are separate tensors (the compiled backend's
    fallback when its flat buffers are unlinked, e.g. gradients from
    ``step(losses=...)``), a step gathers the gradients into a flat buffer
    (``gather_s``: ``torch.cat`` into a buffer reused every step; ``gather_alloc_s``: into
    a fresh one, which pays the page faults of new memory), runs the fused kernel that
    reads ``g, m, v`` and writes ``m, v`` and the update ``u`` (``kernel_s``), and applies
    ``p -= lr u`` tensor by tensor (``apply_s``). ``ideal_s`` is the single pass of the
    performance model, which the backend runs when the parameters and gradients are
    views of its flat buffers: one compiled kernel that reads ``p, g, m, v`` and writes
    ``p, m, v`` in place (28 B/param), with the scalars (bias corrections, ``lr``) as 0-d
    float64 tensors computed outside the kernel, as the backend passes them.
    ``ideal_pow_s`` writes the bias corrections inside the kernel as ``1 - b**step`` with
    a float64 ``step``: Inductor then evaluates a float64 ``pow`` per element;
    ``ideal_pow_f32_s`` is that with float32 scalars. ``fused_s`` is
    ``torch.optim.Adam(fused=True)`` over the separate tensors, ``compile_s`` the
    compilation of the four kernels.
    """
    n = parse_size(n_params)
    with _threads(threads):
        shapes = layout_shapes(n, layout)
        g0 = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g0) for _, s in shapes]
        grads = [torch.randn(s, generator=g0) for _, s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        fused = torch.optim.Adam(params, lr=LR, fused=True)
        fused.step()
        total = sum(p.numel() for p in params)
        sizes = [p.numel() for p in params]
        m, v, u, gbuf = torch.zeros(total), torch.zeros(total), torch.zeros(total), torch.zeros(total)
        fp, fg = torch.cat([p.reshape(-1) for p in params]), torch.cat([g.reshape(-1) for g in grads])
        f64 = dict(dtype=torch.float64)
        step, lr = torch.tensor(3.0, **f64), torch.tensor(LR, **f64)
        c1, c2 = 1 / (1 - _B1 ** step), 1 / (1 - _B2 ** step).sqrt()
        step32, lr32 = step.float(), lr.float()
        from torch import _dynamo
        _dynamo.reset()
        kernel = torch.compile(_adam_update, dynamic=False)
        ideal = torch.compile(_adam_in_place, dynamic=False)
        ideal_pow = torch.compile(_adam_in_place_pow, dynamic=False)
        t0 = time.perf_counter()
        kernel(fg, m, v, c1, c2, u)
        ideal(fp, fg, m, v, c1, c2, lr)
        ideal_pow(fp, fg, m, v, step, lr)
        ideal_pow(fp, fg, m, v, step32, lr32)
        compile_s = time.perf_counter() - t0
        views = [piece.view(p.shape) for piece, p in zip(torch.split(u, sizes), params)]

        def apply() -> None:
            for p, d in zip(params, views):
                p.add_(d, alpha=-LR)

        out = {"n_params": float(total), "n_tensors": float(len(params)), "compile_s": compile_s}
        parts: list[tuple[str, Callable[[], Any]]] = [
            ("fused_s", fused.step),
            ("gather_s", lambda: torch.cat([g.reshape(-1) for g in grads], out=gbuf)),
            ("gather_alloc_s", lambda: torch.cat([g.reshape(-1) for g in grads])),
            ("kernel_s", lambda: kernel(fg, m, v, c1, c2, u)), ("apply_s", apply),
            ("ideal_s", lambda: ideal(fp, fg, m, v, c1, c2, lr)),
            ("ideal_pow_s", lambda: ideal_pow(fp, fg, m, v, step, lr)),
            ("ideal_pow_f32_s", lambda: ideal_pow(fp, fg, m, v, step32, lr32))]
        # rounds of one block per part; each part's best round median (the host's memory
        # bandwidth changed level every few seconds where this was written)
        best: dict[str, float] = {}
        for _ in range(rounds):
            for key, fn in parts:
                med = statistics.median(_block(lambda: _timed(fn), max(1, repeats // rounds), 1))
                best[key] = min(best.get(key, math.inf), med)
        out.update(best)
        out["gather_kernel_apply_s"] = out["gather_s"] + out["kernel_s"] + out["apply_s"]
        return out


def write_json(path: str | os.PathLike[str], rows: list[dict[str, Any]], bandwidth: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
               machine: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write the rows with the machine (:func:`machine_info` now, unless given), the
    bandwidth measurements, the configuration and any ``extra`` top-level entries."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": dict(machine) if machine is not None else machine_info(), "bandwidth": dict(bandwidth or {}), "config": dict(config or {}), "results": rows,
           **dict(extra or {})}
    p.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return p


# ---------------------------------------------------------------------------------- reports
def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], list[Mapping[str, Any]]]:
    """The rows by (parameter count, layout), in run order."""
    groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["n_params"], r["layout"]), []).append(r)
    return groups


def _label(r: Mapping[str, Any]) -> str:
    """The implementation with its footnote marks."""
    return (r["impl"] + (" ¹" if r.get("includes_autograd") else "") + (" ²" if r.get("compile_fallback") else "")
            + (" ³" if r.get("noisy") else "") + (" ⁴" if r.get("given") == "matrices" else ""))


def _status(r: Mapping[str, Any]) -> str:
    """Why a row has no measurement (``not installed``, ``error: ...``), table-safe."""
    return (r["status"] + (f": {r['error']}" if r.get("error") else "")).replace("|", "/")


def _notes(rs: Sequence[Mapping[str, Any]]) -> str:
    """The footnotes the rows use, as a paragraph (empty when none)."""
    notes = []
    if any(r.get("includes_autograd") for r in rs):
        notes.append("¹ step includes two `autograd.grad` calls (multi-loss); the ratio and roofline use "
                     "the step minus those calls timed alone")
    if any(r.get("compile_fallback") for r in rs):
        notes.append("² torch.compile failed; the backend ran eagerly")
    if any(r.get("noisy") for r in rs):
        notes.append("³ noisy: in every attempt the fused-Adam blocks around the case were more than "
                     "30% slower than the quiet fused step (other processes used the cores)")
    if any(r.get("given") == "matrices" for r in rs):
        notes.append("⁴ a matrix optimizer, given only the layout's 2-D parameters; its ratio is to fused "
                     "Adam on those same parameters")
    return "\n" + "; ".join(notes) + "\n" if notes else ""


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown table per (size, layout): step time, ratio to torch fused Adam, % of
    roofline, first two steps, state and peak memory."""
    out: list[str] = []
    for (n, layout), rs in _groups(rows).items():
        r0 = rs[0]
        out.append(f"**{r0['size']} parameters** ({n:,}), layout `{layout}` ({r0['n_tensors']} tensors), "
                   f"{r0['threads']} threads\n")
        out.append("| implementation | step (median) | vs fused Adam | % roofline | B/param | stream GB/s | "
                   "build + 2 steps | state MB | peak RSS MB |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rs:
            if r["status"] != "ok":
                out.append(f"| {r['impl']} | {_status(r)} | | | | | | | |")
                continue
            peak = r.get("peak_rss_delta_bytes")
            out.append(f"| {_label(r)} | {_fmt_time(r['step_s'])} | {r['ratio_to_fused']:.2f}x | "
                       f"{_fmt(r.get('roofline_pct'), '.0f', '%')} | {_fmt(r.get('traffic_bytes_per_param'), '.0f')} | "
                       f"{_fmt(r.get('bandwidth_gbs'), '.0f')} | "
                       f"{_fmt_time(_startup(r))} | {r['state_bytes'] / 2**20:.1f} | "
                       f"{_fmt(None if peak is None else peak / 2**20, '.0f')} |")
        out.append(_notes(rs))
    return "\n".join(out).rstrip() + "\n"


#: the columns of :func:`peers_markdown`
PEER_COLUMNS = ("implementation", "parameters", "step (median)", "vs fused Adam", "% roofline", "B/param",
                "stream GB/s", "build + 2 steps", "state MB")


def peers_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A :func:`run_peers` run as one Markdown table per (size, layout): each
    implementation, the parameters it was given, its median step, its ratio to torch fused
    Adam on those parameters, % of its roofline (gradpipe pipelines and torch's Adam, from
    the B/param of their math; no model for the other libraries), the streaming bandwidth
    measured around it, building plus two steps (compilation) and its state."""
    out: list[str] = []
    for (n, layout), rs in _groups(rows).items():
        r0 = rs[0]
        bws = [r["bandwidth_gbs"] for r in rs if r.get("bandwidth_gbs")]
        bw = f"{min(bws):.0f} to {max(bws):.0f} GB/s" if bws else "not measured"
        out.append(f"**{r0['size']} parameters** ({n:,}), layout `{layout}` ({r0['n_tensors']} tensors), "
                   f"{r0.get('device', 'cpu')}, {r0['threads']} threads; streaming bandwidth (`a += b`) "
                   f"measured around the cases: {bw} (each row's roofline uses its own)\n")
        out.append("| " + " | ".join(PEER_COLUMNS) + " |")
        out.append("| --- | --- |" + " ---: |" * (len(PEER_COLUMNS) - 2))
        for r in rs:
            given = "all" if r.get("given") != "matrices" else f"matrices: {r['given_tensors']}, {r['given_params']:,}"
            if r["status"] != "ok":
                out.append(f"| {r['impl']} | {given} | {_status(r)} |" + " |" * (len(PEER_COLUMNS) - 3))
                continue
            out.append(f"| {_label(r)} | {given} | {_fmt_time(r['step_s'])} | {r['ratio_to_fused']:.2f}x | "
                       f"{_fmt(r.get('roofline_pct'), '.0f', '%')} | {_fmt(r.get('traffic_bytes_per_param'), '.0f')} | "
                       f"{_fmt(r.get('bandwidth_gbs'), '.0f')} | {_fmt_time(_startup(r))} | "
                       f"{r['state_bytes'] / 2**20:.1f} |")
        out.append(_notes(rs))
    return "\n".join(out).rstrip() + "\n"


def pivot_markdown(rows: Sequence[Mapping[str, Any]], layout: str = "1+50", field: str = "ratio_to_fused",
                   fmt: str = "{:.2f}x") -> str:
    """One value per implementation (rows) and size (columns) for one layout, as Markdown;
    ``field`` may also be ``"startup_s"`` (building the optimizer plus two steps)."""
    rs = [r for r in rows if r["layout"] == layout]
    sizes = sorted({(r["n_params"], r["size"]) for r in rs})
    impls = list(dict.fromkeys(r["impl"] for r in rs))
    cell: dict[tuple[str, str], str] = {}
    for r in rs:
        if r["status"] != "ok":
            cell[(r["impl"], r["size"])] = r["status"]
            continue
        v = _startup(r) if field == "startup_s" else r.get(field)
        cell[(r["impl"], r["size"])] = "-" if v is None else fmt.format(v) + (" ³" if r.get("noisy") else "")
    lines = ["| implementation | " + " | ".join(f"{label} ({n:,})" for n, label in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]
    for impl in impls:
        vals = [cell.get((impl, label), "") for _, label in sizes]
        if all(v in ("not installed", "") for v in vals):
            continue
        lines.append(f"| {impl} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _startup(r: Mapping[str, Any]) -> float:
    """Building the optimizer plus its first two steps (the compiled backend compiles in the second)."""
    return (r.get("init_s") or 0.0) + r["first_two_s"]


def _find(rows: Sequence[Mapping[str, Any]], pipeline: str, backend: str, size: str | None = None,
          layout: str = "1+50", library: str = "gradpipe") -> list[Mapping[str, Any]]:
    return [r for r in rows if r["library"] == library and r["pipeline"] == pipeline and r["backend"] == backend
            and r["layout"] == layout and (size is None or r["size"] == size)]


def check_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's CPU step-time targets against the measurements (layout ``1+50``): ``target``,
    ``measured``, ``met`` (``None`` where the run has no matching case). The first-step targets
    (a fresh process, with and without a warm cache) are ``benchmarks/first_step.py``'s, not a
    step benchmark's."""
    out: list[dict[str, Any]] = []

    def ratio_target(text: str, pipeline: str, size: str | None, limit: float) -> None:
        rs = [r for r in _find(rows, pipeline, "compiled", size) if r["status"] == "ok"]
        if not rs:
            out.append({"target": text, "measured": "not measured", "met": None})
            return
        worst = max(rs, key=lambda r: r["ratio_to_fused"])
        where = ", ".join(f"{r['ratio_to_fused']:.2f}x at {r['size']}" for r in rs)
        out.append({"target": text, "measured": where, "met": worst["ratio_to_fused"] <= limit})

    ratio_target("adam (compiled) <= 1.0x torch fused Adam at 10M params", "adam", "10M", 1.0)
    ratio_target("adam (compiled) <= 1.0x torch fused Adam at 100M params", "adam", "100M", 1.0)
    ratio_target("adam (compiled) <= 0.3x torch fused Adam at 100K params in 51 tensors", "adam", "100K", 0.3)
    ratio_target("diffgrad (compiled) <= 1.3x torch fused Adam (every size)", "diffgrad", None, 1.3)
    ratio_target("scalpel (compiled) <= 2.0x torch fused Adam (every size)", "scalpel", None, 2.0)
    comp = {r["size"]: r for r in _find(rows, "scalpel", "compiled") if r["status"] == "ok"}
    eag = {r["size"]: r for r in _find(rows, "scalpel", "eager") if r["status"] == "ok"}
    both = [s for s in comp if s in eag]
    if both:
        speed = {s: eag[s]["step_s"] / comp[s]["step_s"] for s in both}
        out.append({"target": "scalpel compiled >= 8x faster than eager (every size)",
                    "measured": ", ".join(f"{v:.1f}x at {s}" for s, v in speed.items()),
                    "met": min(speed.values()) >= 8})
    else:
        out.append({"target": "scalpel compiled >= 8x faster than eager", "measured": "not measured", "met": None})
    return out


def targets_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`check_targets` as a Markdown table."""
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for t in check_targets(rows):
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"
