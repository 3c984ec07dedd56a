"""Render ``docs/ops.md``, the op reference, from the op registry.

    python -m gradpipe.docs_ops > docs/ops.md

Everything per op comes from the registry (:data:`gradpipe.compiler.ops.OPS`):
the signature and valid ranges from ``params``, the state from ``buffers`` and
``buffers_for``, the reduction from ``reduction``, the one-line summary and
the source from ``summary`` and ``reference``, and the math from the class
docstring (reStructuredText math is turned into Markdown ``$...$``). The only
hand-written parts are the introduction and :data:`NOTES`, the known
disagreements between a paper and its reference code. ``tests/test_docs.py``
checks that ``docs/ops.md`` is exactly this output, so the page cannot drift
from the code.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from typing import Any, Sequence

from .compiler.ops import BUILTIN_OPS, OPS, Op, Param
from .compiler.ops.base import REQUIRED, SeededOp
from .compiler.prims import SUMMARIES

__all__ = ["render_ops_markdown", "op_markdown", "rst_to_markdown", "NOTES", "main"]

#: Known disagreements between a paper, its reference code and gradpipe, by op.
#: Sources: the op docstrings and the papers and reference code they cite.
NOTES: dict[str, list[str]] = {
    "adam": [
        "**Epsilon placement.** `adam`, `torch.optim.Adam` and Algorithm 1 of the paper all divide "
        "by $\\sqrt{\\hat v_t} + \\epsilon$ (bias-corrected $v$). The paper's text also gives a "
        "\"more efficient\" ordering that folds both bias corrections into the step size and adds "
        "$\\hat\\epsilon$ to the *uncorrected* $\\sqrt{v_t}$; Keras' `Adam` documents its `epsilon` "
        "as that $\\hat\\epsilon$, and diffGrad's code uses that form too. It is the same update "
        "with $\\epsilon = \\hat\\epsilon / \\sqrt{1-\\beta_2^t}$, a larger effective epsilon early "
        "in training (31.6 times $\\hat\\epsilon$ at $t=1$ with $\\beta_2 = 0.999$). Scale `eps` "
        "accordingly when porting hyperparameters tuned with the folded form.",
    ],
    "diffgrad": [
        "**Aliasing bug in the original code.** `diffGrad.py` stored `state['previous_grad'] = grad`, "
        "a reference to `p.grad`, so an in-place `zero_grad()` overwrote it and the friction was "
        "$\\sigma(0) = 0.5$ from step 2 on: the published results ran, in effect, Adam at half the "
        "learning rate. `diffGrad_v2.py` fixes it with `grad.clone()`; this op stores a copy, as v2 "
        "does, so the friction responds to the change of the input.",
        "**Epsilon placement.** The authors' code (followed here) adds $\\epsilon$ to the uncorrected "
        "$\\sqrt{v_t}$ and folds the bias corrections into the step size; the paper writes "
        "$\\sqrt{\\hat v_t} + \\epsilon$. So `diffgrad` with the friction replaced by 1 equals "
        "`adam` with `eps` divided by $\\sqrt{1-\\beta_2^t}$, not `adam` with the same `eps`.",
        "**Input.** The reference code reads the gradient plus the coupled L2 term $wd\\,\\theta$; "
        "write `decay(wd) | diffgrad` for that. Under `scale(diffgrad)` later in a chain, $x$ "
        "(and so the friction) is the stream entering the op, e.g. the output of `clip_median`, "
        "not the raw gradient.",
    ],
    "aegd": [
        "**The energy update uses the learning rate.** The reference code (`txping/AEGD`) divides "
        "the energy by $1 + 2\\,\\mathrm{lr}\\,v^2$; an op cannot see `lr`, so `aegd` takes it as "
        "`eta`. Only `aegd(loss, lr)` is the published method; another `eta` decouples the energy "
        "decay from the step length.",
        "**Loss and initial energy.** The code calls the closure itself and sets $r_0 = \\sqrt{f + c}$ "
        "from the first step's loss; here the loss comes from the closure passed to `opt.step`, "
        "through the scalar `loss`. Both raise `ValueError` when $f + c \\le 0$.",
    ],
    "agc": [
        "**Which axes make a unit.** The NFNet code (JAX, `HWIO` kernels, `IO` linear weights) "
        "reduces over every axis but the last, the output axis, and treats any tensor that squeezes "
        "to one dimension as a single unit; torch stores the output axis first, so `agc` (like "
        "timm's `adaptive_clip_grad`) reduces over every axis but dim 0, and only vectors and "
        "scalars are single units. Both clip per output unit.",
        "**Clipped layers.** The paper does not clip the final linear layer; use a route to leave "
        "it out. The code guards the division with $\\max(\\lVert x_i\\rVert, 10^{-6})$, which "
        "changes nothing unless `clip * eps` is below $10^{-6}$.",
    ],
    "centralize": [
        "**Which tensors.** The authors' optimizers centralize every weight with more than one "
        "dimension by default (convolution and fully connected), which `centralize` does; their "
        "`gc_conv_only` option (4-D weights only) is `route ndim >= 4: grad | centralize | ...`. "
        "Their `SGD_GC` adds the L2 weight decay first, centralizes, then applies momentum: "
        "`grad | decay(wd) | centralize | momentum(0.9)`. The code centralizes `p.grad` in place; "
        "this op leaves its input untouched.",
    ],
    "classp": [
        "**The reference code's threshold test does not threshold.** `CLASSP.py` tests "
        "`(grad**2).any() > threshold`: `.any()` is a boolean, so for a threshold below 1 (the "
        "default 0.5) every tensor with a nonzero gradient is updated in full, and for a threshold "
        "of 1 or more nothing is ever updated; the sparsity the paper describes never happens. "
        "`threshold_mode=elementwise` (the default) is the paper's rule; `threshold_mode=tensor` "
        "reproduces the code.",
        "**The power.** The code writes `state['grad_sum'].add_(grad.abs()) ** power`, which "
        "discards the power: it accumulates $|x|$ yet divides by the $p$-th root. `classp` "
        "accumulates $|x|^p$ in both modes; the two agree for the default `power=1`.",
        "**Accumulating only what was applied.** The paper does not say whether a gradient below the "
        "threshold adds to the accumulator. `classp` adds only where the update goes through (the "
        "code, too, accumulates only inside its `if`), so weights left alone keep their full step "
        "for later tasks, as the paper's motivation asks.",
    ],
    "clip_median": [
        "**Unverified step size.** Only the paper's abstract was available. The op takes the full "
        "stochastic proximal-point step, $m \\leftarrow m + \\operatorname{clip}_\\tau(x - m)$; whether "
        "the paper's algorithm adds a step size or weighting on that update (e.g. "
        "$m + (1-\\beta)\\operatorname{clip}_\\tau(\\cdot)$), and which clipping variants it names as "
        "special cases, is not verified.",
        "**Default radius.** `tau=1.0` is gradpipe's choice (the customary `clip_grad_norm_` "
        "threshold), not a value from the paper. `tau` has the units of the gradient.",
    ],
    "clip_norm": [
        "**Threshold details differ between sources.** Pascanu et al. rescale to exactly `max` "
        "when $\\lVert x \\rVert \\ge$ `max`; `torch.nn.utils.clip_grad_norm_` (followed here) "
        "multiplies by $\\min(1, \\text{max}/(\\lVert x \\rVert + 10^{-6}))$, so a clipped norm lands "
        "slightly below `max`; optax's `clip_by_global_norm` skips clipping only when the norm is "
        "strictly below the threshold.",
    ],
    "decay": [
        "**Decoupled decay and the learning rate.** Loshchilov & Hutter multiply the decay by the "
        "schedule multiplier $\\eta_t$, not by the learning rate $\\alpha$: "
        "$\\theta \\leftarrow \\theta - \\eta_t(\\alpha\\,\\hat m/(\\sqrt{\\hat v}+\\epsilon) + \\lambda\\theta)$. "
        "`torch.optim.AdamW`, and this op after a rule (the runtime applies "
        "$\\theta \\leftarrow \\theta - \\mathrm{lr}\\cdot u$), multiply `wd` by `lr`, so the paper's "
        "$\\lambda$ corresponds to `wd` times `lr`.",
    ],
    "ema": [
        "**Debiasing default.** optax's `ema` debiases by default; this op does not (`debias=false`), "
        "matching Bloop's EMA reference, for which the scale does not matter (the projection is "
        "invariant to the scale of $r$; only `eps` sees it).",
    ],
    "grams": [
        "**Third-party implementations differ.** pytorch-optimizer's (kozistr) `Grams` 4.1.0 ends "
        "about 5% (relative) away from the official code after 60 steps: its momentum average and "
        "bias correction are not the official ones. `grams` follows the official Gunale0926/Grams "
        "code (Adam moments, $\\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)$ step size, $\\epsilon$ added to "
        "the uncorrected $\\sqrt{v}$, default $10^{-6}$).",
        "**In-place sign.** The official code takes the direction with `grad.sign_()`, which "
        "overwrites `p.grad` with its sign; code that reads the gradient after `step()` (logging, "
        "clipping statistics) sees the sign there, not here.",
        "**Weight decay.** Grams decays before the step, $\\theta \\leftarrow \\theta(1 - "
        "\\mathrm{lr}\\cdot\\mathrm{wd})$; `grad | grams | decay(wd)` applies the same update "
        "(the rule's output does not depend on $\\theta$).",
    ],
    "gravity": [
        "**Step counting.** The authors' Keras code computes $\\hat\\beta = (\\beta t + 1)/(t + 2)$ "
        "with Keras' `iterations`, which is 0 at the first step ($\\hat\\beta_1 = 1/2$); `gravity` "
        "follows it. The authors' PyTorch port and kozistr's pytorch-optimizer `Gravity` count "
        "from 1 ($\\hat\\beta_1 = (\\beta + 1)/3$), a slightly different early average.",
        "**The random start.** $V_0 \\sim \\mathcal N(0, (\\alpha/\\mathrm{lr})^2)$ uses the learning "
        "rate, which an op cannot see: `gravity` takes it as its `lr` argument (default 0.1, the "
        "paper's learning rate); write `gravity(lr=lr)` for the group's. The Keras code draws "
        "$V_0$ unseeded (`seed=None`); gradpipe seeds it and saves the generator in `state_dict`. "
        "kozistr's default learning rate is $10^{-2}$, not the paper's 0.1.",
    ],
    "momentum": [
        "**Where the learning rate sits.** Sutskever et al. write the momentum with the learning "
        "rate inside the buffer ($v \\leftarrow \\mu v - \\varepsilon g$); `torch.optim.SGD` (and this op) "
        "keep it outside ($b \\leftarrow \\beta b + g$, then $\\theta \\leftarrow \\theta - \\mathrm{lr}\\,b$). "
        "The two agree for a constant learning rate and differ when a scheduler changes it. "
        "The buffer starts as a copy of the first input, not zero, as in torch.",
    ],
    "noise": [
        "**Step counting.** The paper writes $\\sigma_t^2 = \\eta/(1+t)^\\gamma$ with $t$ from 0; "
        "gradpipe's step counter starts at 1, so $\\eta/t^\\gamma$ is the same schedule (optax "
        "`add_noise` does the same). The paper's experiments use $\\eta \\in \\{0.01, 0.3, 1.0\\}$ "
        "and $\\gamma = 0.55$.",
    ],
    "normalize": [
        "**Scope.** Normalized gradient descent (Hazan et al.) divides the whole gradient by its "
        "norm (`scope=global`); the block-normalized method (Yu et al.) divides each block, here "
        "each parameter tensor, by its own norm (`scope=tensor`, the default). Both add no "
        "$\\epsilon$ in the papers; `eps` only guards small norms.",
    ],
    "project_orthogonal": [
        "**The single-stream form is not Bloop.** Bloop projects the *auxiliary*-loss gradient "
        "against an EMA of the *main*-loss gradient and adds the result to the main gradient: "
        "$d = g_{main} + \\lambda\\,\\pi(g_{aux}; r)$. `grad | project_orthogonal(ema)` (the "
        "user's pipeline) projects one gradient against its own EMA, which removes the component "
        "along the persistent descent direction; the two-loss form is "
        "`grads.main + lam * (grads.aux | project_orthogonal(ema(grads.main)))`.",
        "**EMA weight.** Bloop's `ema` argument is the weight of the *new* gradient (0.1 in the "
        "code, 0.01 in the MNIST example); it is `1 - beta` of gradpipe's `ema`. Its ImageNet "
        "configuration passes 0.99 straight through, i.e. weight 0.99 on the new gradient. Bloop "
        "can initialise the EMA with a copy of the first gradient; gradpipe's `ema` starts at zero "
        "(Bloop's `zeros` option).",
        "**ODICE** divides by $\\max(\\lVert r\\rVert^2, 10^{-10})$ instead of adding `eps`; the "
        "results differ only when $r$ is nearly zero.",
    ],
    "rms": [
        "**Epsilon and decay conventions.** `torch.optim.RMSprop` (followed here) adds `eps` "
        "outside the square root and defaults to `alpha=0.99`; TensorFlow-style RMSprop and "
        "optax's `scale_by_rms` put `eps` inside the square root, and Hinton's lecture uses a "
        "decay of 0.9. The centered variant is from Graves (2013).",
    ],
    "trust_ratio": [
        "**LARS and LAMB write the ratio differently.** LARS scales by "
        "$\\eta\\lVert w\\rVert/(\\lVert\\nabla L\\rVert + \\beta\\lVert w\\rVert)$, with the weight "
        "decay $\\beta$ in the denominator and a trust coefficient $\\eta$; LAMB scales the Adam step "
        "plus decay, $r + \\lambda w$, by $\\phi(\\lVert w\\rVert)/\\lVert r + \\lambda w\\rVert$ with "
        "a scaling function $\\phi$. `trust_ratio` is the plain ratio (optax's "
        "`scale_by_trust_ratio`, $\\phi$ the identity); put `decay` before it for LAMB, and the "
        "trust coefficient into `lr`.",
    ],
}


# ------------------------------------------------------------------------- helpers
def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    return str(v)


def _default_text(p: Param) -> str:
    if p.default is REQUIRED:
        return "required"
    if p.kind == "choice":
        return f"`{p.default}`"
    return f"`{_num(p.default)}`"


def _valid_text(p: Param) -> str:
    if p.kind == "choice":
        return ", ".join(f"`{c}`" for c in p.choices)
    if p.kind == "bool":
        return "`true`, `false`"
    if p.kind == "signal":
        return "a signal: a source, an op, or a pipeline"
    if p.kind == "value":
        return "a signal, or a number"
    if p.kind == "any":
        return "a number, an op (a rule), or a signal"
    rng = f"`{p.range_text()}`" if p.has_range else "any number"
    if p.kind not in ("scalar", "int"):  # a kind this page does not know yet
        return f"{p.kind}" + (f" in {rng}" if p.has_range else "")
    if p.kind == "int":
        return f"whole number in {rng}, known at compile time" if p.has_range else \
            "whole number, known at compile time"
    return rng


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def signature(op: Op) -> str:
    """How a call looks: ``pcgrad(g1, g2, ..., reduction=sum)``, ``galore(rank=128, ...) { inner }``."""
    parts = []
    block = ""
    for p in op.params:
        if p.kind == "signals":
            parts.append("g1, g2, ...")
        elif p.kind == "block":
            block = f" {{ {p.name} }}"
        elif p.default is REQUIRED:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={_num(p.default)}")
    return f"{op.name}({', '.join(parts)}){block}"


def _defaults(op: Op) -> dict[str, Any]:
    return {p.name: p.default for p in op.params if p.default is not REQUIRED}


def _variants(op: Op) -> list[tuple[str, list[str]]]:
    """Buffers kept when one bool/choice argument differs from its default."""
    base = _defaults(op)
    out = []
    for p in op.params:
        if p.kind == "bool":
            values: Sequence[Any] = [not p.default] if isinstance(p.default, bool) else [True, False]
        elif p.kind == "choice":
            values = [c for c in p.choices if c != p.default]
        else:
            continue
        for v in values:
            bufs = op.buffer_names({**base, p.name: v})
            if bufs != op.buffer_names(base):
                out.append((f"{p.name}={_num(v)}", bufs))
    return out


def _reduction_variants(op: Op) -> list[tuple[str, str | None]]:
    base = _defaults(op)
    out = []
    for p in op.params:
        if p.kind != "choice":
            continue
        for v in p.choices:
            if v == p.default:
                continue
            r = op.reduction({**base, p.name: v})
            if r != op.reduction(base):
                out.append((f"{p.name}={v}", r))
    return out


def _bytes(bufs: list[str]) -> int:
    return 4 * len(bufs)


#: the matrix shape for which ops whose state is not the parameter's size report it
_EXAMPLE = (4096, 4096)


def _sized_state(op: Op) -> bool:
    """True for ops whose state is not a whole number of parameter-sized buffers (some buffer
    declares a shape of its own)."""
    return any(b.shape is not None for b in op.buffers)


def _example_bytes(op: Op) -> str:
    per = 4 * op.state_numel(_EXAMPLE, _defaults(op)) / (_EXAMPLE[0] * _EXAMPLE[1])
    return f"{per:.3g} for a {_EXAMPLE[0]}x{_EXAMPLE[1]} matrix"


def _state_short(op: Op) -> str:
    if _sized_state(op):
        return _example_bytes(op)
    text = str(_bytes(op.buffer_names(_defaults(op))))
    variants = _variants(op)
    if variants:
        text += " (" + ", ".join(f"{_bytes(b)} with `{k}`" for k, b in variants) + ")"
    return text


_SCOPE_WORDS = {"global": "global", "tensor": "per tensor", None: "elementwise"}


def _scope_short(op: Op) -> str:
    base = op.reduction(_defaults(op))
    text = _SCOPE_WORDS[base]
    alts = _reduction_variants(op)
    if alts:
        text += " (" + ", ".join(f"{_SCOPE_WORDS[r]} with `{k}`" for k, r in alts) + ")"
    return text


def _has_node_state(op: Op) -> bool:
    return type(op).node_state_dict is not Op.node_state_dict


# ------------------------------------------------------------- docstring to Markdown
_INLINE_MATH = re.compile(r":math:`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")


def _inline(text: str) -> str:
    text = _INLINE_MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)


def rst_to_markdown(doc: str) -> str:
    """Turn an op docstring (reStructuredText with ``.. math::``) into Markdown."""
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            i += 1
            equations: list[list[str]] = [[]]
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                if lines[i].strip():
                    equations[-1].append(lines[i].strip())
                elif equations[-1]:
                    equations.append([])
                i += 1
            for eq in equations:
                if eq:
                    out += ["", "$$", " ".join(eq), "$$"]
            out.append("")
            continue
        if line.startswith("Reference:"):
            line = "**Reference:**" + line[len("Reference:"):]
        out.append(_inline(line))
        i += 1
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


# ----------------------------------------------------------------------- rendering
def op_markdown(op: Op) -> str:
    """One op's section."""
    lines = [f"## {op.name}", "", f"`{signature(op)}`: {op.summary}.", ""]
    if op.params:
        lines += ["| argument | kind | default | valid values | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for p in op.params:
            lines.append(f"| `{p.name}` | {p.kind} | {_default_text(p)} | {_cell(_valid_text(p))} | "
                         f"{_cell(p.doc)} |")
        lines.append("")
    else:
        lines += ["No arguments.", ""]

    defaults = _defaults(op)
    bufs = op.buffer_names(defaults)
    docs = {b.name: b.doc for b in op.buffers}
    facts = []
    if op.buffers:
        listing = ", ".join(f"`{b.name}` ({b.doc})" if b.doc else f"`{b.name}`" for b in op.buffers)
        if _sized_state(op):
            state = f"- **State:** {listing}. With the defaults: {_example_bytes(op)}, in bytes per parameter"
        else:
            state = f"- **State:** {listing}, each the size of the parameter. With the defaults: "
            state += (", ".join(f"`{b}`" for b in bufs) if bufs else "none")
            state += f", {_bytes(bufs)} bytes per parameter in fp32"
        for k, vb in _variants(op):
            state += f"; with `{k}`: " + (", ".join(f"`{b}`" for b in vb) if vb else "none") + \
                     f", {_bytes(vb)} bytes"
        state += ". Keys in `optimizer.state[p]`: " + \
                 ", ".join(f"`<node>.{b}`" for b in docs) + "."
        facts.append(state)
    else:
        facts.append("- **State:** none (0 bytes per parameter).")
    if isinstance(op, SeededOp):
        facts.append("- **Node state:** a random generator shared by all parameters of the node, "
                     "saved in `state_dict()` under `\"gradpipe\"`; the node is never merged by CSE.")
    elif _has_node_state(op):
        facts.append("- **Node state:** values shared by all parameters of the node (not per parameter), "
                     "saved in `state_dict()` under `\"gradpipe\"`"
                     + ("." if op.mergeable else "; the node is never merged by CSE."))
    elif not op.mergeable:
        facts.append("- **CSE:** never merged with an identical node.")
    red = op.reduction(defaults)
    if red == "global":
        scope = ("- **Reduction:** `global` by default: one reduction over every tensor the route "
                 "covers in the step")
    elif red == "tensor":
        scope = "- **Reduction:** per tensor by default"
    else:
        scope = "- **Reduction:** none; elementwise, each tensor independently"
    for k, r in _reduction_variants(op):
        scope += f"; with `{k}`: " + ("none (elementwise)" if r is None else
                                      "per tensor" if r == "tensor" else "global")
    facts.append(scope + ".")
    if op.reads_param:
        facts.append("- **Reads:** the parameter values.")
    if op.is_rule:
        facts.append(f"- **Scale rule:** `scale({op.name})` is the same as `| {op.name}`.")
    if op.identity(defaults):
        facts.append(f"- **Identity:** with its defaults `{op.name}` does nothing; constant folding "
                     "removes it.")
    facts.append(f"- **Source:** {op.reference}.")
    lines += facts + [""]

    doc = type(op).__doc__
    if doc:
        lines += [rst_to_markdown(doc).rstrip(), ""]
    notes = NOTES.get(op.name)
    if notes:
        lines += ["**Paper vs. code.**", ""]
        for n in notes:
            lines += [f"- {n}"]
        lines.append("")
    return "\n".join(lines)


_INTRO = r'''# Op reference

<!-- Generated from the op registry by `python -m gradpipe.docs_ops > docs/ops.md`.
     Do not edit by hand: tests/test_docs.py fails when this file and the code disagree. -->

Every op that a `.grad` pipeline can call, generated from the registry
(`gradpipe.compiler.ops.OPS`); `gradpipe ops` prints the same list in short.
The language itself is described in [language.md](language.md).

Conventions:

- $x_t$ is what the op receives at step $t$ (its stream input; the step counter
  starts at 1), $u_t$ is what it emits. The runtime applies the pipeline's
  final $u$ as $\theta \leftarrow \theta - \mathrm{lr}\cdot u$.
- Arguments are positional in the order shown, or by name. A *scalar* argument
  is a number, a hyperparameter, or arithmetic on them (`1 - b1`, `lr * 0.1`);
  a range is checked at compile time for constants, and when the optimizer is
  built and at every step for arguments computed from hyperparameters. A
  *choice* is one word, bare or quoted (`scope=tensor`, `scope="tensor"`). A
  *signal* is a source (`param`, `grads.main`), a parenthesised pipeline
  (`(grad | sign)`), or an op, which is then applied to the same input as the
  op receiving it.
- State buffers have the shape of the op's input (the parameter's, unless the op
  says otherwise) and are kept in fp32 (in fp64 for fp64 parameters); the runtime
  creates them from the op's declaration before the op first runs on a
  parameter; "bytes per parameter" is 4 per element. In `optimizer.state[p]` a buffer is stored under
  `"<node>.<buffer>"`, e.g. `main/project_orthogonal/ema.m`.
- A `global` reduction (a norm or inner product) runs over every tensor of the
  route that has a gradient in the step, across param groups; `tensor` runs
  over each tensor separately.
- "Scale rule" marks the optimizer rules in the sense of optax's `scale_by_*`.
  The compiler accepts `scale(op)` for any op and compiles it exactly as
  `| op`, with the same node and state names.

## Adding an op

An op is one module in `gradpipe/compiler/ops/` (every module there is imported
and registers itself: there is no list to update) and one row in the op table
of the tests (`tests/op_table.py`: the op's equations written again in NumPy,
which the generic tests compare against on both backends, with state round
trips; `test_table_covers_every_op` fails, naming the op, until the row exists).
Then regenerate this page: `python -m gradpipe.docs_ops > docs/ops.md`
(`tests/test_docs.py` fails, naming the op, while it is missing here).

The module holds one class, like optax's `init` plus `update`: the signature
(`params`, with valid ranges), the state declared once (`buffers`: name, shape
relative to the input, dtype, initial value; the runtime creates it, `update`
never does), and the math, with the equations and the paper in the docstring.
Adamax (Kingma & Ba 2015, section 7.1), as torch's `Adamax` computes it:

```python
import torch
from gradpipe.compiler.ops.base import Buffer, Param, TensorOp, addcmul_s, register


@register
class Adamax(TensorOp):
    r"""Adamax: Adam with the infinity norm.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) x_t,\qquad
        u_t^{\infty} = \max(\beta_2 u^{\infty}_{t-1}, |x_t| + \epsilon),\qquad
        u_t = \frac{m_t}{(1-\beta_1^t)\, u^{\infty}_t}

    Reference: D. P. Kingma, J. Ba, "Adam", ICLR 2015 (section 7.1); torch.optim.Adamax.
    """

    name = "my_adamax"
    summary = "Adam with the infinity norm (torch.optim.Adamax)"
    reference = "Kingma & Ba 2015; torch.optim.Adamax"
    flat = True        # elementwise: the compiled backend fuses it over flat buffers
    is_rule = True     # usable as scale(my_adamax)
    params = (
        Param("b1", default=0.9, low=0.0, high=1.0, high_closed=False, doc="first-moment decay"),
        Param("b2", default=0.999, low=0.0, high=1.0, high_closed=False, doc="decay of the max"),
        Param("eps", default=1e-8, low=0.0, doc="added to |x|"),
    )
    buffers = (Buffer("m", "first moment"), Buffer("u", "exponentially weighted infinity norm"))

    def update(self, x, state, a, lane):
        m, u = state["m"], state["u"]
        m.lerp_(x, 1 - a.b1)
        u.copy_(torch.maximum(u * a.b2, x.abs() + a.eps))
        return m / ((1 - a.b1 ** lane.step) * u)
```

A `flat` op takes its non-constant arguments, the step and `lane.fresh` as 0-d
tensors in the compiled backend: use the helpers of `gradpipe/compiler/ops/base.py`
(`axpy_`, `addcmul_s`, `sqrt_s`, `is_zero`, `on_first` for a buffer whose first value
is the first input) instead of `alpha=`, `math.sqrt` and `if`. Rules on the op's use
that the signature cannot state go in its `check` hook, and rules across its scalar
arguments (`low <= high`) in `validate` (with `validates` naming the arguments): both
run when the pipeline compiles, so `gradpipe check` reports them, and `validate` runs
again for every param group and, for arguments computed from `step` or `loss`, in every
step. Capabilities other ops rely on are base classes (`Denominator`). `tests/test_docs.py` runs the example above on both
backends against `torch.optim.Adamax`.

**From another package.** A package adds ops without touching gradpipe: decorate the
class with `@gradpipe.register_op` and declare the module under the `gradpipe.ops`
entry point group in its `pyproject.toml`:

```toml
[project.entry-points."gradpipe.ops"]
myops = "myops.gradpipe_ops"
```

gradpipe loads every installed plug-in when it is imported; a plug-in that fails to
load, or that reuses an op's name, is skipped with a `PluginWarning`
(`gradpipe/compiler/ops/plugins.py`; `tests/test_plugins.py` installs one).
'''


def render_ops_markdown() -> str:
    """The whole of ``docs/ops.md``."""
    names = sorted(BUILTIN_OPS)  # plug-ins document themselves
    parts = [_INTRO, "## Summary", "",
             "| op | signature | state (bytes/param, fp32) | reduction | what it does |",
             "| --- | --- | --- | --- | --- |"]
    for name in names:
        op = OPS[name]
        parts.append(f"| [`{name}`](#{name}) | `{_cell(signature(op))}` | {_cell(_state_short(op))} | "
                     f"{_cell(_scope_short(op))} | {_cell(op.summary)} |")
    parts.append("")
    parts.extend(_primitives_markdown())
    for name in names:
        parts.append(op_markdown(OPS[name]))
    return "\n".join(parts).rstrip() + "\n"


def _primitives_markdown() -> list[str]:
    """The "Primitives" section: the math functions and operators, from ``prims.SUMMARIES``."""
    out = ["## Primitives", "",
           "Built into the language rather than ops: elementwise on signals (fused by the compiled "
           "backend), computed per step on scalars; see [the language reference](language.md#54-arithmetic).",
           "Used as a stage, a function takes the stream as its first argument: `grad | abs`, "
           "`x | clamp(-1, 1)`.",
           "The reductions (`sum`, `mean`, `norm`, `rms`, `max`, `min`, `dot`, each with a required `over=`) "
           "and the shape values (`numel`, `rows`, `cols`, `ndim`) are one number per tensor, row, column or "
           "route, which broadcasts against signals; see [reductions and shape values]"
           "(language.md#513-reductions-and-shape-values).", "",
           "| primitive | value |", "| --- | --- |"]
    out += [f"| `{_cell(form)}` | {_cell(text)} |" for form, text in SUMMARIES.items()]
    out.append("")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    sys.stdout.write(render_ops_markdown())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
