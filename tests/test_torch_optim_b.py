"""The torch.optim pipelines of issue 12 item 5, part B, against torch.optim (torch 2.13).

``sgd`` and ``rmsprop`` (with ``maximize``), ``rprop`` and ``asgd``: one table of rows
(pipeline, torch class, keyword arguments) that sets every option of every pipeline (each
boolean on, non-default numbers, the combinations torch's own OptimizerInfo tests run), each
followed on the eager backend for 50 steps in float64 to 1e-9 relative
(:func:`torch_parity.follow`), and a few rows per pipeline on the compiled backend. Then the
state: rprop's cells and asgd's averaged iterate against torch's state, and the options that
are off keep no buffer.

torch's ASGD keeps ``eta`` and ``mu`` as 0-d tensors of its default scalar dtype (float32
unless torch's default dtype is float64); the asgd rows run torch with float64 as its
default dtype, so that its scalars are float64 like gradpipe's (the pipeline's header).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import gradpipe
from torch_parity import follow, run_pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

SGD, RMSprop, Rprop, ASGD = torch.optim.SGD, torch.optim.RMSprop, torch.optim.Rprop, torch.optim.ASGD

#: (pipeline, torch class, kwargs): every option of every pipeline, alone and combined
ROWS = [
    ("sgd", SGD, dict(lr=0.01, maximize=True)),
    ("sgd", SGD, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("sgd", SGD, dict(lr=0.01, momentum=0.9)),
    ("sgd", SGD, dict(lr=0.01, momentum=0.9, dampening=0.5, maximize=True)),
    ("sgd", SGD, dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("sgd", SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("rmsprop", RMSprop, dict(maximize=True)),
    ("rmsprop", RMSprop, dict(lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.1, maximize=True)),
    ("rmsprop", RMSprop, dict(centered=True, maximize=True)),
    ("rmsprop", RMSprop, dict(momentum=0.9, maximize=True)),
    ("rmsprop", RMSprop, dict(alpha=0.95, centered=True, momentum=0.5, weight_decay=0.1, maximize=True)),
    ("rprop", Rprop, dict()),
    ("rprop", Rprop, dict(lr=2e-4)),
    ("rprop", Rprop, dict(etas=(0.5, 1.5))),
    ("rprop", Rprop, dict(etas=(0.3, 1.1))),
    ("rprop", Rprop, dict(step_sizes=(2e-6, 100))),
    ("rprop", Rprop, dict(lr=0.02, step_sizes=(1e-3, 0.05))),  # both clamps engage
    ("rprop", Rprop, dict(maximize=True)),
    ("rprop", Rprop, dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True)),
    ("asgd", ASGD, dict()),
    ("asgd", ASGD, dict(lr=0.02)),
    ("asgd", ASGD, dict(lambd=0.1)),
    ("asgd", ASGD, dict(lambd=0.1, alpha=0.5)),
    ("asgd", ASGD, dict(lambd=0.1, alpha=1.0)),
    ("asgd", ASGD, dict(t0=100)),
    ("asgd", ASGD, dict(t0=10)),  # the averaging starts inside the 50 steps
    ("asgd", ASGD, dict(t0=0)),
    ("asgd", ASGD, dict(t0=-5, lambd=0.1)),  # mu < 1 from the second step
    ("asgd", ASGD, dict(weight_decay=0.1)),
    ("asgd", ASGD, dict(maximize=True)),
    ("asgd", ASGD, dict(weight_decay=0.1, maximize=True)),
    ("asgd", ASGD, dict(lr=0.02, lambd=0.01, alpha=0.5, t0=10, weight_decay=0.1, maximize=True)),
]
#: the rows also run on the compiled backend (one compile each: the last row of each pipeline)
COMPILED = {max(i for i, r in enumerate(ROWS) if r[0] == name) for name in ("sgd", "rmsprop", "rprop", "asgd")}

_PARAMS = [pytest.param(*r, "eager", id=f"{r[0]}-{i}-eager") for i, r in enumerate(ROWS)]
_PARAMS += [pytest.param(*ROWS[i], "compiled", id=f"{ROWS[i][0]}-{i}-compiled") for i in sorted(COMPILED)]


@contextlib.contextmanager
def _torch_scalars(pipeline: str):
    """torch's ASGD keeps eta and mu in torch's default dtype: float64 here (the module docstring)."""
    if pipeline != "asgd":
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_rows_set_every_option():
    """Every hyperparameter each pipeline declares is set away from its default by some row."""
    for name in ("sgd", "rmsprop", "rprop", "asgd"):
        prog = gradpipe.load(name)
        set_ = {k for n, _, kw in ROWS if n == name for k in kw}
        assert set(prog.hyperparams) <= set_, (name, set(prog.hyperparams) - set_)


@pytest.mark.parametrize("pipeline, cls, kwargs, backend", _PARAMS)
def test_follows_torch(pipeline, cls, kwargs, backend):
    with _torch_scalars(pipeline):
        diff = follow(pipeline, cls, kwargs, backend, steps=50)
    assert diff <= 1e-9, f"{pipeline} {kwargs} ({backend}): relative difference {diff:.3g}"


def _state_pairs(pipeline, cls, kwargs, keys, steps=50):
    """(gradpipe's buffer, torch's state) for each parameter and each (gradpipe key, torch key)."""
    with _torch_scalars(pipeline):
        opt, ref, ours, theirs = run_pair(pipeline, cls, kwargs, "eager", steps)
    for a, b in zip(ours, theirs):
        assert set(opt.state[a]) == {"step", *keys}
        for mine, torch_key in keys.items():
            yield opt.state[a][mine], ref.state[b][torch_key]


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.02, step_sizes=(1e-3, 0.05), maximize=True)])
def test_rprop_state_is_torchs(kwargs):
    """The cells `prev` and `step_size` hold torch's `prev` and `step_size`."""
    for mine, theirs in _state_pairs("rprop", Rprop, kwargs,
                                     {"main/prev.value": "prev", "main/step_size.value": "step_size"}):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(t0=10), dict(t0=-5, lambd=0.1, weight_decay=0.1, maximize=True)])
def test_asgd_averaged_iterate_is_torchs(kwargs):
    """The cell `ax` holds torch's `ax`: the parameters themselves while mu is 1, their average after t0."""
    for mine, theirs in _state_pairs("asgd", ASGD, kwargs, {"main/ax.value": "ax"}):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pipeline, kwargs, keys", [
    ("sgd", dict(), set()),                                   # torch's SGD keeps nothing either
    ("sgd", dict(maximize=True), set()),
    ("sgd", dict(momentum=0.9), {"main/momentum.buf"}),
    ("rmsprop", dict(maximize=True), {"main/rms.v"}),
    ("rmsprop", dict(centered=True, momentum=0.9), {"main/rms.v", "main/rms.g_avg", "main/momentum.buf"}),
    ("rprop", dict(maximize=True), {"main/prev.value", "main/step_size.value"}),
    ("asgd", dict(maximize=True, weight_decay=0.1), {"main/ax.value"}),
])
def test_options_that_are_off_keep_no_buffer(pipeline, kwargs, keys):
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    opt = gradpipe.Optimizer([p], pipeline, backend="eager", **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[p]) - {"step"} == keys
