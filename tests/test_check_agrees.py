"""``gradpipe check`` rejects exactly what building the optimizer rejects.

``gradpipe check FILE`` compiles the file (``check_file``: ``gradpipe.load`` for a pipeline);
``gradpipe.Optimizer(params, FILE)`` compiles it too and then does what only it can: set up
param groups (torch's, with the hyperparameters' defaults), route the concrete parameters, take
the call's hyperparameter values. So a file that check accepts must give an optimizer, and a
file it rejects must fail to, with the same error at the same ``path:line:col`` -- except for
what depends on the concrete model (parameters matching no route, several routes, or having no
names) or on the call's arguments (``Optimizer(..., b=1.5)``), which no file check can know;
and except for a library file (definitions, no pipeline), which check checks as a library and
the optimizer refuses (tests/test_cli_library.py).

* (a) one bad file per way ``Optimizer(...)`` can reject a file: every ``GradError`` of
  ``gradpipe/compiler/program.py``, ``modules.py``, ``binder.py``, ``build.py``, ``passes.py``
  and the op hooks (``check``: the non-finite policies; ``infer_args``: ``dp_noise``;
  ``check_block``: ``wavelet``, ``group_scale``; the blocks' rules in ``build.py``) that does not
  depend on the model or the call. For each, the CLI's report is the optimizer's error, text
  for text, on both backends, at the position written in the case.
* The exceptions, shown: routing the concrete model, and call-time hyperparameters.
* (b) a few hundred mutants of the shipped pipelines (deterministic, seeded): ``load`` raises
  a GradError iff ``Optimizer`` construction does (on a model whose every parameter some
  route covers, routing errors set aside), and then the same one; anything but a GradError
  from either is a bug.
* (c) beyond construction: a file check accepts can take a step. Known gaps are
  ``xfail(strict=True)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import re

import pytest
import torch

import gradpipe
from gradpipe import GradError
from gradpipe.cli import main
from gradpipe.compiler.ops import OPS
from gradpipe.compiler.program import builtin_dir
from gradpipe.runtime.optimizer import BACKENDS

REPO = pathlib.Path(__file__).resolve().parents[1]


class Net(torch.nn.Module):
    """A 2-D weight and a 1-D bias, named ``net.0.weight`` and ``net.0.bias``: every shipped
    pipeline's routes (``ndim >= 2`` and ``default``) cover both."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 2))


def build(path: pathlib.Path, backend: str = "eager", **hyper):
    return gradpipe.Optimizer(Net().named_parameters(), str(path), backend=backend, **hyper)


def check_cli(capsys, path: pathlib.Path) -> tuple[int, str, str]:
    rc = main(["check", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


# ====================================================================== (a) one file per error path
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    source: str
    line: int
    column: int
    message: str  # a fragment of the first diagnostic's message
    files: tuple[tuple[str, str], ...] = ()  # other files next to it (imports)
    where: str = ""  # the file the error is in, when another than the case's own


CASES = [
    # --- the non-finite policy (compiler/ops/nonfinite.py: policy_of, _Policy.check)
    Case("two_routes_two_policies",
         "route ndim >= 2: grad | skip_nonfinite(3) | adam\nroute default: grad | allow_nonfinite | sign\n",
         2, 23, "two different non-finite policies"),
    Case("one_chain_two_policies", "grad | skip_nonfinite(3) | allow_nonfinite | adam\n",
         1, 28, "two different non-finite policies"),
    Case("skip_nonfinite_in_a_block", "grad | galore(rank=2) { skip_nonfinite | adam }\n",
         1, 25, "'skip_nonfinite' is a policy of the whole step; it cannot sit inside a { ... } block"),
    Case("allow_nonfinite_in_a_block", "grad | wavelet { allow_nonfinite | adam }\n",
         1, 18, "'allow_nonfinite' is a policy of the whole step"),
    Case("policy_as_a_block_argument", "grad | error_feedback(compressor=skip_nonfinite)\n",
         1, 34, "'skip_nonfinite' is a policy of the whole step"),
    Case("skip_nonfinite_updates_from_a_hyperparameter", "hparam u = true\ngrad | skip_nonfinite(updates=u) | adam\n",
         2, 8, "updates of 'skip_nonfinite' must be written true or false"),
    Case("two_routes_two_update_policies",
         "route ndim >= 2: grad | skip_nonfinite(updates=true) | adam\nroute default: grad | skip_nonfinite | sign\n",
         2, 23, "two different non-finite policies"),
    Case("skip_nonfinite_not_whole", "grad | skip_nonfinite(2.5) | adam\n",
         1, 8, "max_consecutive of 'skip_nonfinite' must be a whole number or inf"),
    Case("skip_nonfinite_from_a_hyperparameter", "hparam n = 3\ngrad | skip_nonfinite(n) | adam\n",
         2, 8, "known when the pipeline compiles"),
    # --- valid ranges of arguments computed from hyperparameters' defaults (Program.check_group)
    Case("hparam_default_outside_the_ops_range", "hparam b = 1.5\ngrad | ema(b)\n",
         2, 12, "beta=1.5 (from the hyperparameters' defaults) is outside the valid range [0, 1) of 'ema'"),
    Case("computed_argument_outside_the_range", "hparam b = 0.5\ngrad | ema(2 * b + 0.1)\n",
         2, 12, "beta=1.1 (from the hyperparameters' defaults) is outside the valid range"),
    Case("argument_that_cannot_be_computed", "hparam b = 0\ngrad | ema(1 / b)\n",
         2, 12, "argument 'beta' of 'ema' cannot be computed from the hyperparameters' defaults"),
    # --- hyperparameter declarations (compiler/modules.py)
    Case("default_outside_its_declared_range", "hparam b = 2 in [0, 1]\ngrad | ema(b)\n",
         1, 12, "default b=2 is outside its declared range [0, 1]"),
    Case("empty_declared_range", "hparam b = 0.5 in [1, 0]\ngrad | ema(b)\n", 1, 20, "empty range: 1 > 0"),
    Case("builtin_name_redefined", "hparam grad = 1\ngrad | adam\n",
         1, 1, "'grad' is a built-in name and cannot be redefined"),
    Case("name_defined_twice", "hparam b = 0.9\nlet b = grad\ngrad | ema(b)\n",
         2, 1, "'b' is already defined on line 1"),
    # torch keeps the group's parameters under these keys: Optimizer(...) used to fail with a TypeError
    Case("hparam_named_params", "hparam params = 0.5\ngrad | ema(params)\n",
         1, 1, "'params' is the key of a param group's parameters in torch.optim"),
    Case("hparam_named_param_names", "hparam param_names = 0.5\ngrad | adam\n",
         1, 1, "'param_names' is the key of a param group's parameters"),
    Case("lr_is_a_tuple", "hparam lr = (0.1, 0.2)\ngrad | adam\n",
         1, 13, "the learning rate 'lr' must be a number, not a tuple"),
    Case("lr_is_a_boolean", "hparam lr = true\ngrad | adam\n",
         1, 13, "the learning rate 'lr' must be a number, not a boolean"),
    Case("missing_import", 'import "nothere.grad"\ngrad | adam\n', 1, 1, "cannot find the imported file"),
    Case("error_in_an_imported_file", 'import "lib.grad" as lib\ngrad | lib.rule\n', 1, 29, "unknown name 'adma'",
         files=(("lib.grad", "let rule = clip_norm(1.0) | adma\n"),), where="lib.grad"),
    # --- the file's shape (compiler/program.py, modules.py)
    Case("empty_file", "", 1, 1, "the file is empty"),
    Case("two_pipelines", "grad | adam\ngrad | sign\n", 2, 1, "a second pipeline; the first is on line 1"),
    Case("same_selector_twice",
         "route ndim >= 2: grad | adam\nroute ndim >= 2: grad | sign\nroute default: grad | sign\n",
         2, 1, "the same selector as the route on line 1"),
    Case("invalid_regex_selector", "route /a(/: grad | adam\nroute default: grad | sign\n",
         1, 7, "invalid regular expression"),
    Case("default_combined_with_a_selector", "route default or ndim >= 2: grad | adam\n",
         1, 7, "'default' cannot be combined with other selectors"),
    Case("syntax_error", "grad | | adam\n", 1, 8, "unexpected '|'"),
    # --- names and calls (compiler/build.py, binder.py)
    Case("unknown_name", "grad | ema(bta)\n", 1, 12, "unknown name 'bta'"),
    Case("unknown_op", "grad | adma\n", 1, 8, "unknown name 'adma'"),
    Case("mistake_in_an_unused_let", "let bad = grad | adma\ngrad | adam\n", 1, 18, "unknown name 'adma'"),
    Case("let_defined_by_itself", "let a = a | sign\ngrad | adam\n", 1, 1, "'a' is defined in terms of itself"),
    Case("recursive_def", "def f(x=1) = f(x)\ngrad | f\n", 1, 14, "pipeline 'f' is recursive"),
    Case("pipeline_not_from_a_signal", "adam | sign\n", 1, 1, "a pipeline must start from a signal"),
    Case("number_as_a_stage", "grad | 3\n", 1, 8, "a number cannot be a pipeline stage"),
    Case("signal_as_a_stage", "grad | param\n", 1, 8, "a signal cannot be a pipeline stage"),
    Case("combiner_as_a_stage", "grad | pcgrad(grads.a, grads.b)\n", 1, 8, "'pcgrad' combines the signals"),
    Case("too_many_positional_arguments", "grad | ema(0.9, true, 3)\n", 1, 23, "takes at most 2 positional"),
    Case("unknown_keyword", "grad | ema(gamma=0.9)\n", 1, 12, "op 'ema' has no argument 'gamma'"),
    Case("argument_given_twice", "grad | ema(0.9, beta=0.8)\n", 1, 17, "argument 'beta' is given twice"),
    Case("missing_argument", "grad | aegd\n", 1, 8, "op 'aegd' needs argument 'f'"),
    Case("constant_outside_the_range", "grad | ema(1.5)\n", 1, 12, "beta=1.5 is outside the valid range [0, 1)"),
    Case("int_argument_not_whole", "grad | galore(rank=2.5) { adam }\n", 1, 20, "must be a whole number"),
    Case("unknown_choice", "grad | clip_norm(scope=nope)\n", 1, 24, "'nope' is not a valid scope for 'clip_norm'"),
    Case("number_for_a_bool", "grad | ema(debias=1)\n", 1, 19, "must be true or false, got a number"),
    Case("boolean_for_a_number", "hparam f = true\ngrad | ema(f)\n", 2, 12, "'f' is a boolean, but 'beta'"),
    Case("tuple_for_a_number", "hparam betas = (0.9, 0.99)\ngrad | ema(betas)\n", 2, 12, "'betas' is a tuple"),
    Case("index_out_of_range", "hparam betas = (0.9, 0.999)\ngrad | adam(betas[2])\n",
         2, 13, "index 2 is out of range: 'betas' has 2 items"),
    Case("index_of_a_number", "hparam b = 0.9\ngrad | ema(b[0])\n", 2, 12, "'b' is not a tuple"),
    Case("division_by_zero", "grad | scale(1 / 0)\n", 1, 14, "division by zero"),
    # --- blocks (build.py _build_block/_check_block, the ops' check_block)
    Case("op_without_a_block_given_one", "grad | adam { sign }\n", 1, 15, "op 'adam' takes no { ... } block"),
    Case("block_op_without_its_block", "grad | galore(rank=2)\n", 1, 8, "op 'galore' needs argument 'inner'"),
    Case("block_that_is_not_a_pipeline", "grad | galore(rank=2) { 3 }\n", 1, 25, "must be a pipeline of ops"),
    Case("block_reading_a_source", "grad | galore(rank=2) { adam | add(grad) }\n",
         1, 36, "the { ... } pipeline of 'galore' cannot read 'grad'"),
    Case("parameter_reader_in_a_projecting_block", "grad | galore(rank=2) { decay(0.1) | adam }\n",
         1, 25, "'decay' reads the parameters, but the { ... } pipeline of 'galore'"),
    # --- rules across arguments (Op.validate; program.rule_checks)
    Case("group_scale_low_above_high", "grad | group_scale(low=5, high=1, interval=1) { adam }\n",
         1, 8, "group_scale needs low <= high, got low=5 and high=1"),
    Case("group_scale_low_above_high_from_a_default",
         "hparam lo = 5\ngrad | group_scale(low=lo, high=1, interval=1) { adam }\n",
         2, 8, "group_scale needs low <= high, got low=5 and high=1 (from the hyperparameters' defaults)"),
    Case("gcond_t_crit_above_t_main", "gcond(grads.a, grads.b, t_crit=0.5) | adam\n",
         1, 1, "gcond needs t_crit <= t_main <= t_weak"),
    Case("gcond_zero_weights", "gcond(grads.a, grads.b, w_stability=0, w_strength=0) | adam\n",
         1, 1, "gcond needs w_stability + w_strength > 0"),
    Case("wavelet_block_without_a_denominator", "grad | wavelet { sign }\n",
         1, 18, "'wavelet' scales the detail coefficients by its inner pipeline's denominator"),
    Case("group_scale_block_without_a_first_moment", "grad | group_scale(k=2) { sign }\n",
         1, 27, "'group_scale' clusters its inner pipeline's first moment 'm'"),
    # --- per-example gradients (passes.check_per_sample, dp_noise.infer_args)
    Case("dp_noise_without_a_sensitivity", "samples | dp_noise(1.0)\n",
         1, 11, "dp_noise needs the sensitivity of one example's gradient"),
    Case("dp_clip_on_the_gradient", "grad | dp_clip(1.0)\n", 1, 8, "'dp_clip' works on per-example gradients"),
    Case("per_example_gradients_into_adam", "samples | adam\n", 1, 11, "'adam' cannot take per-example gradients"),
    Case("per_example_result", "samples | dp_clip(1.0)\n",
         1, 1, "the pipeline's result cannot take per-example gradients"),
]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_reports_what_the_optimizer_raises(case: Case, tmp_path, capsys):
    path = tmp_path / f"{case.id}.grad"
    path.write_text(case.source)
    for name, text in case.files:
        (tmp_path / name).write_text(text)
    where = str(tmp_path / case.where) if case.where else str(path)

    rc, out, err = check_cli(capsys, path)
    assert rc == 1, f"check accepted it:\n{out}{err}"
    head = err.splitlines()[0]
    assert head.startswith(f"{where}:{case.line}:{case.column}: error: "), head
    assert case.message in head, head
    assert err.endswith("1 of 1 file(s) have errors\n")
    assert "Traceback" not in err

    for backend in BACKENDS:
        with pytest.raises(GradError) as info:
            build(path, backend)
        e = info.value
        assert (e.path, e.line, e.column) == (where, case.line, case.column), str(e)
        # the CLI prints the optimizer's error, every diagnostic and hint of it, and the count
        assert err == f"{e}\n1 of 1 file(s) have errors\n"


def test_a_missing_file(tmp_path, capsys):
    path = tmp_path / "gone.grad"
    rc, _, err = check_cli(capsys, path)
    assert rc == 1
    with pytest.raises(GradError) as info:
        build(path)
    assert err == f"{info.value}\n1 of 1 file(s) have errors\n"
    assert err.startswith(f"{path}:1:1: error: ")


def test_a_path_whose_folder_holds_brackets_is_a_path(tmp_path, capsys):
    """``Optimizer(params, "runs (2)/x.grad")`` loads the file, as ``gradpipe check`` does (it used to
    compile the path itself as pipeline text: '(' and '=' marked a text as source)."""
    folder = tmp_path / "runs (2) lr=0.1"
    folder.mkdir()
    good, bad = folder / "good.grad", folder / "bad.grad"
    good.write_text("grad | adam\n")
    bad.write_text("grad | ema(1.5)\n")
    assert check_cli(capsys, good)[0] == 0
    assert build(good).program.name == "good"
    rc, _, err = check_cli(capsys, bad)
    assert rc == 1
    with pytest.raises(GradError) as info:
        build(bad)
    assert err == f"{info.value}\n1 of 1 file(s) have errors\n"


# ---------------------------------------------------------------------- the three exceptions
def test_a_library_file_is_checked_by_check_and_refused_by_the_optimizer(tmp_path, capsys):
    path = tmp_path / "no_pipeline.grad"
    path.write_text("hparam b = 0.9\n")
    rc, out, err = check_cli(capsys, path)
    assert (rc, err) == (0, ""), err
    assert "library" in out
    with pytest.raises(GradError, match="the file defines no pipeline") as info:
        build(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 1, 1)
    assert "library" in str(info.value) and "import" in str(info.value)


@pytest.mark.parametrize("source, params, message", [
    ("route ndim >= 2: grad | adam\n", "named", "1 parameter(s) match no route: net.0.bias"),
    ("route ndim >= 2: grad | adam\nroute /net/: grad | sign\n", "named",
     "parameter(s) match more than one route"),
    ("route /weight/: grad | adam\nroute default: grad | sign\n", "unnamed",
     "this route selects parameters by name, but the parameters have no names"),
], ids=["no_route", "two_routes", "no_names"])
def test_routing_the_concrete_model_is_the_optimizers_alone(source, params, message, tmp_path, capsys):
    path = tmp_path / "routes.grad"
    path.write_text(source)
    assert check_cli(capsys, path)[0] == 0
    model = Net()
    with pytest.raises(GradError, match=re.escape(message)) as info:
        gradpipe.Optimizer(model.named_parameters() if params == "named" else model.parameters(), str(path),
                           backend="eager")
    assert info.value.path == str(path) and info.value.line >= 1


def test_call_time_hyperparameters_are_the_optimizers_alone(tmp_path, capsys):
    path = tmp_path / "hyper.grad"
    path.write_text("hparam b = 0.5 in [0, inf)\ngrad | ema(b)\n")
    assert check_cli(capsys, path)[0] == 0
    with pytest.raises(GradError, match=r"beta=1\.5 \(from param group 0\) is outside the valid range") as info:
        build(path, b=1.5)
    assert (info.value.line, info.value.column) == (2, 12)
    with pytest.raises(GradError, match="unknown hyperparameter 'c'"):
        build(path, c=1.0)


def test_call_time_hyperparameters_meet_the_rules_across_arguments(tmp_path, capsys):
    """A rule across arguments (``low <= high``) holds for every param group, not only the defaults."""
    path = tmp_path / "rule.grad"
    path.write_text("hparam lo = 0.5 in [0, inf)\ngrad | group_scale(low=lo, high=1, interval=1) { adam }\n")
    assert check_cli(capsys, path)[0] == 0
    with pytest.raises(GradError, match=r"group_scale needs low <= high, got low=3 and high=1 "
                                        r"\(from param group 0\)") as info:
        build(path, lo=3.0)
    assert (info.value.line, info.value.column) == (2, 8)


# ====================================================================== (b) mutants of the shipped pipelines
def _shipped() -> dict[str, str]:
    """The shipped pipelines (``pipelines/`` and the built-ins), one entry per distinct text."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for folder in (REPO / "pipelines", builtin_dir()):
        for p in sorted(folder.glob("*.grad")):
            text = p.read_text()
            if text not in seen:
                seen.add(text)
                out[p.stem if p.stem not in out else f"{p.stem}_builtin"] = text
    return out


SHIPPED = _shipped()
OP_NAMES = sorted(OPS)
_TOKEN = re.compile(r"#[^\n]*|\"[^\"\n]*\"|/[^/\n ]+/|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+|[A-Za-z_]\w*|==|!=|<=|>=|\S")
BAD_NUMBERS = ["-1", "1.5", "2", "0", "1e9", "2.5", "-0.5", "1e400", "0.0001", "inf"]
POLICIES = ["skip_nonfinite", "skip_nonfinite(3)", "skip_nonfinite(2.5)", "skip_nonfinite(-1)",
            "skip_nonfinite(inf)", "allow_nonfinite", "skip_nonfinite(max_consecutive=0)"]
NEW_NAMES = ["params", "param_names", "lr", "grad", "step", "adam", "b_new"]
MUTANTS_PER_FILE = 16


def _tokens(text: str) -> list[re.Match]:
    return [m for m in _TOKEN.finditer(text) if not m.group().startswith("#")]


def _replace(text: str, m: re.Match, new: str) -> str:
    return text[:m.start()] + new + text[m.end():]


def mutate(text: str, rng: random.Random) -> tuple[str, str]:
    """One mutant of ``text``: (what was done, the new text)."""
    toks = _tokens(text)
    kind = rng.choice(["delete", "duplicate", "swap", "op_name", "number", "policy_in_block", "policy_in_chain",
                       "two_policies", "rename_hparam", "hparam_default", "drop_line"])
    numbers = [m for m in toks if re.fullmatch(r"[\d.]+(?:[eE][+-]?\d+)?", m.group())]
    ops = [m for m in toks if m.group() in OPS]
    hparams = re.findall(r"^hparam (\w+)", text, re.M)
    pipes = [m for m in toks if m.group() == "|"]
    if kind == "delete" and toks:
        m = rng.choice(toks)
        return f"delete {m.group()!r}", _replace(text, m, "")
    if kind == "duplicate" and toks:
        m = rng.choice(toks)
        return f"duplicate {m.group()!r}", _replace(text, m, m.group() + " " + m.group())
    if kind == "swap" and len(toks) > 1:
        i = rng.randrange(len(toks) - 1)
        a, b = toks[i], toks[i + 1]
        return (f"swap {a.group()!r} {b.group()!r}",
                text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():])
    if kind == "op_name" and ops:
        m, new = rng.choice(ops), rng.choice(OP_NAMES)
        return f"op {m.group()} -> {new}", _replace(text, m, new)
    if kind == "number" and numbers:
        m, new = rng.choice(numbers), rng.choice(BAD_NUMBERS)
        return f"number {m.group()} -> {new}", _replace(text, m, new)
    if kind == "policy_in_block" and "{" in text:
        at = rng.choice([i for i, c in enumerate(text) if c == "{"]) + 1
        pol = rng.choice(POLICIES)
        return f"{pol} into a block", text[:at] + f" {pol} |" + text[at:]
    if kind in ("policy_in_chain", "policy_in_block") and pipes:
        m, pol = rng.choice(pipes), rng.choice(POLICIES)
        return f"{pol} into the chain", _replace(text, m, f"| {pol} |")
    if kind == "two_policies" and len(pipes) >= 1:
        a, b = rng.sample(POLICIES, 2)
        m = rng.choice(pipes)
        text = _replace(text, m, f"| {a} |")
        m = rng.choice([x for x in _tokens(text) if x.group() == "|"])
        return f"{a} and {b}", _replace(text, m, f"| {b} |")
    if kind == "rename_hparam" and hparams:
        old, new = rng.choice(hparams), rng.choice(NEW_NAMES)
        return f"rename {old} -> {new}", re.sub(rf"\b{old}\b", new, text)
    if kind == "hparam_default" and hparams:
        name = rng.choice(hparams)
        new = rng.choice(BAD_NUMBERS + ["(1.5, 0.9)", "(0.9, 2)", "true", "(0.9,)"])
        return (f"default {name} = {new}",
                re.sub(rf"^(hparam {name} = )(\([^)]*\)|\S+)", lambda m: m.group(1) + new, text, flags=re.M))
    lines = text.split("\n")
    code = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")]
    i = rng.choice(code)
    return f"drop line {i + 1}", "\n".join(lines[:i] + lines[i + 1:])


#: errors that depend on the parameters an optimizer is built for, which `gradpipe check` cannot
#: know: which route takes them, and whether their shapes fit the matrix functions there
_ROUTING = ("match no route", "match more than one route", "the parameters have no names", ": parameter(s) ")


def _outcome(path: pathlib.Path):
    """(check's GradError or None, the optimizer's GradError or None, the optimizer's other exception)."""
    try:
        gradpipe.load(path)
        checked = None
    except GradError as e:
        checked = e
    try:
        build(path)
        return checked, None, None
    except GradError as e:
        return checked, e, None
    except Exception as e:  # noqa: BLE001 - a product bug, reported below
        return checked, None, e


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_mutants_are_rejected_alike(name, tmp_path):
    text = SHIPPED[name]
    problems: list[str] = []
    counts = {"accepted": 0, "rejected": 0, "routing": 0}
    for i in range(MUTANTS_PER_FILE):
        rng = random.Random(f"{name}:{i}")
        what, src = mutate(text, rng)
        path = tmp_path / f"{name}_{i}.grad"
        path.write_text(src)
        checked, raised, other = _outcome(path)
        label = f"{path.name} ({what})"
        if other is not None:
            problems.append(f"{label}: Optimizer raised {type(other).__name__}: {other}\n--- source:\n{src}")
        elif checked is None and raised is not None:
            if any(r in raised.message for r in _ROUTING):
                counts["routing"] += 1
                continue
            problems.append(f"{label}: check accepted it, the Optimizer raised\n{raised}\n--- source:\n{src}")
        elif checked is not None and raised is None:
            problems.append(f"{label}: check rejected it, the Optimizer accepted it\n{checked}\n--- source:\n{src}")
        elif checked is not None and str(checked) != str(raised):
            problems.append(f"{label}: different errors\ncheck: {checked}\nOptimizer: {raised}\n--- source:\n{src}")
        else:
            counts["accepted" if checked is None else "rejected"] += 1
    assert not problems, "\n\n".join(problems)
    assert counts["rejected"] >= 1, f"no mutant of {name} was rejected: the generator does nothing ({counts})"


def test_the_mutants_cover_the_cases():
    """The generator makes every kind of mutant, most of them rejected, some accepted."""
    kinds: set[str] = set()
    for name, text in SHIPPED.items():
        for i in range(MUTANTS_PER_FILE):
            what, src = mutate(text, random.Random(f"{name}:{i}"))
            kinds.add(what.split()[0])
            assert src != text or what.startswith(("swap", "op", "number", "rename", "default")), what
    assert len(SHIPPED) >= 20
    assert {"delete", "duplicate", "swap", "op", "number", "drop", "rename", "default"} <= kinds, kinds
    assert any(k.startswith("skip_nonfinite") or k.startswith("allow_nonfinite") for k in kinds), kinds


# ====================================================================== (c) beyond construction: the first step
def _first_step(source: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "step.grad"
    path.write_text(source)
    gradpipe.load(path)  # check accepts it
    model = Net()
    opt = gradpipe.Optimizer(model.named_parameters(), str(path), backend="eager")
    x = torch.randn(4, 3)
    if "grads." in source:
        opt.step(losses={"a": model.net(x).sum(), "b": model.net(x).pow(2).sum()})
    else:
        model.net(x).sum().backward()
        opt.step()


@pytest.mark.parametrize("source", [
    "grad | group_scale(low=0.1, high=10, interval=1) { adam }\n",
    "gcond(grads.a, grads.b) | adam\n",
], ids=["group_scale", "gcond"])
def test_what_check_accepts_takes_its_first_step(source, tmp_path):
    _first_step(source, tmp_path)
