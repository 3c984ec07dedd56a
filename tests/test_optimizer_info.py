"""gradpipe against torch's own optimizer configurations (torch's OptimizerInfo database).

The installed torch ships ``torch.testing._internal.common_optimizers.optim_db``:
for each algorithm, ``optim_inputs_func(device, dtype)`` lists the constructor
configurations torch's own tests run. For every configuration of Adam, AdamW,
SGD, RMSprop, Adamax, NAdam, RAdam, Adagrad and Adadelta (the CPU list and the extra
configurations torch defines only for CUDA), the built-in pipeline of the same name (lowercased), built with the
same keyword arguments, either

- follows the ``torch.optim`` class to rtol 1e-9 / atol 1e-12 in float64 over
  20 steps (eager backend for every configuration, the compiled backend for one
  configuration of the algorithms in COMPILED), or
- is refused at construction with a ``ValueError`` / ``GradError`` that names an
  option listed in :data:`SKIP`, the table that docs/language.md §11 renders
  ("torch's own optimizer configurations"; a test below keeps the two in step).

Any other outcome fails. torch runs with float64 as its default dtype here: NAdam keeps its
``mu_product`` in the default dtype, and a float32 one is ~1e-8 off in float64 (the pipeline
keeps it in the parameter's dtype). ``common_optimizers`` imports torch's test utilities,
which need the ``expecttest`` package: a test dependency (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
import warnings

import pytest
import torch

import gradpipe

_cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
with warnings.catch_warnings():  # the import adds warning filters: keep them out of the session
    from torch.testing._internal.common_optimizers import optim_db
if _cache_dir is None:  # ... and sets this variable
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "language.md"

STEPS = 20
RTOL, ATOL = 1e-9, 1e-12

from optim_algorithms import ALGORITHMS  # noqa: E402  (shared with test_optimizer_behaviour.py)

# (option, value) -> why gradpipe's built-in pipeline refuses a configuration that sets it.
# docs/language.md renders this table; test_skip_table_in_docs keeps the two in step.
SKIP: dict[tuple[str, object], str] = {
    ("capturable", True): "CUDA graph capture: torch defines these configurations only for CUDA devices, "
                          "and gradpipe accepts `capturable` only at torch's default (`False`)",
}

# one configuration per algorithm on the compiled backend for some (torch.compile is slow: one model shape for all)
# (the other algorithms run compiled in tests/test_torch_optim_a.py, with every option on)
COMPILED = {("Adam", "nonzero weight_decay"), ("AdamW", "nonzero weight_decay"),
            ("SGD", "nesterov"), ("RMSprop", "momentum"), ("NAdam", "decoupled_weight_decay")}


def _configs():
    """(algorithm, torch class, desc, kwargs, cuda_only) for every configuration torch defines."""
    out = []
    for info in optim_db:
        algo = info.optim_cls.__name__
        if algo not in ALGORITHMS:
            continue
        seen = set()
        for device in ("cpu", "cuda"):  # the CUDA list adds the `capturable` configurations
            for inp in info.optim_inputs_func(device=device, dtype=torch.float64):
                if inp.desc in seen:
                    continue
                seen.add(inp.desc)
                assert inp.params is None, f"{algo}-{inp.desc}: param groups given by torch; handle them here"
                out.append((algo, info.optim_cls, inp.desc, inp.kwargs, device == "cuda"))
    return out


CONFIGS = _configs()


def _refusals(kwargs: dict) -> list[tuple[str, object]]:
    return [(k, v) for k, v in kwargs.items() if isinstance(v, bool) and (k, v) in SKIP]


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, 8, 3, generator=gen, dtype=torch.float64)
    return x, y


X, Y = _data()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3).double()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    for t in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[t]), Y[t]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _kwargs(kwargs: dict) -> dict:
    """A fresh copy: tensor hyperparameters (``lr=torch.tensor(...)``) are not shared between the two runs."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in kwargs.items()}


_PARAMS = [pytest.param(algo, cls, desc, kw, cuda, "eager", id=f"{algo}-{desc}")
           for algo, cls, desc, kw, cuda in CONFIGS]
_PARAMS += [pytest.param(algo, cls, desc, kw, cuda, "compiled", id=f"{algo}-{desc}-compiled")
            for algo, cls, desc, kw, cuda in CONFIGS if (algo, desc) in COMPILED and not _refusals(kw)]


def test_every_algorithm_has_configurations():
    algos = {c[0] for c in CONFIGS}
    assert algos == set(ALGORITHMS), algos
    for algo, desc in COMPILED:
        assert any(c[0] == algo and c[2] == desc for c in CONFIGS), (algo, desc)


@pytest.mark.parametrize("algo, cls, desc, kwargs, cuda_only, backend", _PARAMS)
def test_torch_configuration(algo, cls, desc, kwargs, cuda_only, backend):
    name = ALGORITHMS[algo]
    refused = _refusals(kwargs)
    model = _model()
    if refused:
        with pytest.raises((ValueError, gradpipe.GradError)) as info:
            gradpipe.Optimizer(model.parameters(), name, backend=backend, **_kwargs(kwargs))
        named = [(k, v) for k, v in refused if f"{k}={v!r}" in str(info.value)]
        assert named, f"refused for another reason than {refused}: {info.value}"
        pytest.skip("; ".join(f"{k}={v!r}: {SKIP[k, v]}" for k, v in named))
    assert not cuda_only, f"{algo}-{desc}: a CUDA-only configuration was accepted; add its reason to SKIP"
    ref_model = copy.deepcopy(model)
    got = _train(model, gradpipe.Optimizer(model.parameters(), name, backend=backend, **_kwargs(kwargs)))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # NAdam keeps mu_product in the default dtype (float32: ~1e-8 off)
    try:
        want = _train(ref_model, cls(ref_model.parameters(), **_kwargs(kwargs)))
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def _docs_section() -> str:
    text = DOCS.read_text()
    start = text.index("**torch's own optimizer configurations.**")
    return text[start:text.index("\n## 12.", start)]


def test_skip_table_in_docs():
    """Every SKIP row appears in the docs' table, and the table has no other rows."""
    section = _docs_section()
    rows = re.findall(r"^\| `(\w+)=(\w+)` \| (.+?) \|$", section, re.M)
    documented = {(k, {"True": True, "False": False}.get(v, v)): reason for k, v, reason in rows}
    assert documented == SKIP


def _outcome_rows() -> list[str]:
    """The docs' table of configurations: one row per algorithm."""
    rows = []
    for algo in ALGORITHMS:
        mine = [c for c in CONFIGS if c[0] == algo]
        follows = ", ".join(f"`{d}`" for _, _, d, kw, _ in mine if not _refusals(kw))
        refused = [f"`{d}`" + (" (CUDA only)" if cuda else "") for _, _, d, kw, cuda in mine if _refusals(kw)]
        rows.append(f"| `{algo}` | {follows} | {', '.join(refused) or '-'} |")
    return rows


def test_configurations_in_docs():
    """The docs name every configuration torch defines, with its outcome."""
    section = _docs_section()
    for row in _outcome_rows():
        assert row in section.splitlines(), f"not in docs/language.md:\n{row}"
