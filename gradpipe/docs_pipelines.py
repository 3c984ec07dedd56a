"""Generate ``docs/pipelines.md``, the catalogue of the built-in pipelines, from the files.

    python -m gradpipe.docs_pipelines > docs/pipelines.md

For every file of ``pipelines/``: what it is (its header's first line), its
hyperparameters, the state it keeps per parameter at the defaults, and what the
compiled backend makes of each route (fused segments, and the nodes it runs one by
one, which are the reductions per tensor and the ops that need the whole tensor).
``tests/test_docs.py`` fails when the file and this output differ.
"""

from __future__ import annotations

import re

from .compiler.lowering import per_tensor_values, plan_route, route_cost
from .compiler.program import Program, builtin_names, load

#: what each group of pipelines follows, in the order the catalogue lists them
GROUPS: dict[str, tuple[str, ...]] = {
    "torch.optim (torch 2.13), with torch's hyperparameter names, defaults and options": (
        "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "asgd", "nadam", "radam", "rmsprop",
        "rprop", "sgd", "momentum", "nesterov"),
    "Modern elementwise optimizers, each against pytorch-optimizer or its paper's equations": (
        "ademamix", "adabelief", "adan", "cautious_adamw", "grokfast_ema", "lamb", "lars", "lion",
        "mars_adamw", "orthograd", "prodigy", "signum", "accumulate_adamw"),
    "Two-gradient methods: the gradient at another point, through the step's closure": ("sam_sgd", "asam_sgd",
                                                                                         "sam_adamw"),
}

INTRO = """\
# The built-in pipelines

<!-- Generated from pipelines/ by `python -m gradpipe.docs_pipelines > docs/pipelines.md`.
     Do not edit by hand: tests/test_docs.py fails when this file and the code disagree. -->

Every file of `pipelines/` is loadable by name (`gradpipe.Optimizer(model.parameters(),
"nadam", lr=2e-3)`) and is plain `.grad` source over the op library and the language's
primitives: no optimizer below is a Python class. Each file's header cites what it
follows and lists every difference.

**torch.optim.** Every algorithm of torch 2.13's `torch.optim` is here but two: `LBFGS`
(a line search that calls the closure many times per step and keeps a history of
whole-model vectors: not a per-parameter pipeline) and `SparseAdam` (sparse gradients, which
gradpipe refuses with a clear error, as `torch.optim.Adam` does). `muon` is
`torch.optim.Muon` (matrices only, as torch's; `muon_adamw` routes the rest of a model to
AdamW; `tests/test_muon.py`). The parity tests hold each pipeline to
`torch.optim` to a relative 1e-9 in float64 over 50 steps on both backends, for every
option (`tests/test_torch_optim_a.py`, `tests/test_torch_optim_b.py`,
`tests/test_adafactor.py`), and for every configuration of torch's own OptimizerInfo
database (`tests/test_optimizer_info.py`).

**Options cost nothing when off.** An option written as `where(amsgrad, ...)` keeps its
state only in the param groups where it is on: a state cell read only under a false
boolean keeps no buffer (docs/language.md 4.7), so `adam`'s state at the defaults is
torch's 8 bytes per parameter.

**Primitives or built-in ops.** Adam written from two state cells and elementwise math
compiles to the plan of the built-in `adam` op (one fused segment, 28 bytes per
parameter per step, 8 bytes of state) and matches it to 1e-12 in float64
(`tests/test_state.py`); docs/benchmarks.md has the timing. The built-in Python ops
(`adam`, `ema`, `rms`, `momentum`, ...) stay: the pipelines above use them where they
are the whole formula, the seed papers' pipelines and user files name them, and state
dicts of torch.optim map onto their buffers.

**Op by op.** The compiled backend fuses each route's elementwise work into segments;
a node runs by itself (between segments) only when its math needs a whole tensor before
the next element can be computed: a reduction per tensor, row or column (`trust_ratio`
in `lamb` and `lars`, `norm`/`dot`/`rms` in `orthograd`, `cautious_adamw` and
`adafactor`, `normalize` in `mars_adamw`) and arithmetic on such per-tensor values. The
table lists them per route.

**Two gradients.** `sam_sgd`, `asam_sgd` and `sam_adamw` (SAM and ASAM, as davda54/sam) take the
gradient at a perturbed point with `grad_at(param + e)` (docs/language.md 5.14), so they
are stepped with a closure, `opt.step(closure)`, which the step calls twice. The point is
computed before the closure's second call (on the compiled backend, one fused segment of
its own); the plan in the table is what runs after it. The tests hold them to davda54/sam to 1e-9 in float64 on both backends, and to
pytorch-optimizer's `SAM` to 1e-5 (it sums the squared norms in float32; `tests/test_sam.py`).
"""


def _header(prog: Program) -> str:
    """The header comment's first sentence."""
    words: list[str] = []
    for line in prog.source.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    m = re.search(r"(?<![A-Z])(?<!et al)\.(\s|$)", text)  # a full stop, not an initial's
    if m:
        text = text[:m.start() + 1]
    if len(text) > 160:
        text = text[:text.rindex(" ", 0, 157)] + " ..."
    return text.replace("|", "\\|")


def _hyperparams(prog: Program) -> str:
    return ", ".join(f"`{n}`" for n in prog.hyperparams if n != "lr" or prog.hyperparams[n].declared)


def _plan(prog: Program) -> str:
    parts = []
    for label in prog.ir:
        cost = route_cost(prog, label)
        eager = [n.rsplit("/", 1)[-1] for kind, n in plan_route(prog, label=label) if kind == "eager"]
        text = f"{cost.segments} fused segment{'s' if cost.segments != 1 else ''}, {cost.bytes_per_param} B"
        if eager:
            text += "; by itself: " + ", ".join(f"`{n}`" for n in eager)
        parts.append(text if len(prog.ir) == 1 else f"{label}: {text}")
    return "<br>".join(parts)


def _state(prog: Program) -> str:
    """Bytes of fp32 state per parameter, per route; a state cell per tensor, row or column
    (Adafactor's) is a few numbers per tensor, shown as such."""
    out = []
    for label, ir in prog.ir.items():
        small = per_tensor_values(ir.nodes)
        full = sum(len(prog.node_buffers(n.name)) for n in ir.all_nodes() if n.name not in small)
        few = sum(len(prog.node_buffers(n)) for n in small if prog.node(n).is_op)
        out.append(f"{4 * full}" + (f" + {few} per row/column" if few else ""))
    return " / ".join(out)


def _row(name: str) -> str:
    prog = load(name)
    return f"| `{name}` | {_header(prog)} | {_hyperparams(prog)} | {_state(prog)} | {_plan(prog)} |"


def render_pipelines_markdown() -> str:
    names = builtin_names()
    out = [INTRO]
    groups = dict(GROUPS)
    groups["The seed papers' methods and the rest"] = tuple(
        n for n in names if not any(n in g for g in GROUPS.values()))
    for title, members in groups.items():
        out.append(f"## {title}\n")
        out.append("| pipeline | what | hyperparameters | state (fp32 B/param, per route) "
                   "| compiled plan per route (fp32 bytes read and written per parameter per step) |")
        out.append("| --- | --- | --- | --- | --- |")
        for name in members:
            if name in names:
                out.append(_row(name))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_pipelines_markdown(), end="")
