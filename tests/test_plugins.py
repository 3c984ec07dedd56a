"""Op plug-ins: ops from other packages (``gradpipe.register_op``, the ``gradpipe.ops`` entry points).

A plug-in is "installed" the way ``importlib.metadata`` sees an installed distribution: a
folder on ``sys.path`` holding the package and its ``<name>-<version>.dist-info`` with
``METADATA`` and ``entry_points.txt``. gradpipe runs in a subprocess with that folder on
``PYTHONPATH`` (plug-ins load when gradpipe is imported, so the test process itself, which
imported gradpipe long ago, cannot see them), and the subprocess reports back as JSON.

* a plug-in module whose op is decorated with ``@gradpipe.register_op`` (the documented
  form), and an entry point that names an undecorated ``Op`` subclass, give ops a `.grad`
  file can use: the numbers of a few steps on both backends are the op's equations computed
  here by hand, ``gradpipe check`` accepts a file using them and range-checks their arguments;
* a plug-in that fails on import, one that reuses a built-in op's name, and an entry point
  that names neither a module nor an op are skipped with a ``PluginWarning`` naming them,
  leave nothing half-registered, and gradpipe still works (``adam`` is still torch's Adam);
* ``gradpipe.register_op`` in-process: a new op is usable at once; a non-op, a nameless op
  or a taken name is a ``PluginError``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gradpipe
from gradpipe.cli import main
from gradpipe.compiler.ops import BUILTIN_OPS, OPS, Buffer, Param, PluginError, TensorOp
from gradpipe.compiler.ops.plugins import PLUGIN_GROUP

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ installing a plug-in
def install(root: pathlib.Path, dist: str, files: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write the distribution ``dist`` (version 0.1) into ``root``: its files (paths relative to
    ``root``) and a dist-info whose ``entry_points.txt`` declares ``entry_points`` in gradpipe's group."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
    lines = [f"[{PLUGIN_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def env_with(root: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO)])
    env["PYTHONWARNINGS"] = "default"
    return env


#: the start of every child: import gradpipe recording every warning its import raises
_PRELUDE = """\
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gradpipe
import torch
torch.set_num_threads(1)
from gradpipe.compiler.ops import OPS
from gradpipe.compiler.ops.plugins import PluginWarning, loaded_plugins
out = {"warnings": [[w.category.__name__, str(w.message)] for w in caught
                    if issubclass(w.category, PluginWarning)],
       "plugins": loaded_plugins()}
"""


def run_child(root: pathlib.Path, body: str, *args: str) -> dict:
    """Run ``_PRELUDE + body`` (which fills the dict ``out``) with ``root`` installed; return ``out``."""
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env_with(root), capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, f"the child failed:\n{proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, f"the child printed no result:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(line[-1][len("RESULT "):])


# ------------------------------------------------------------------ a working plug-in
DEMO_INIT = '''\
    """gp_demo_ops: a tiny gradpipe op plug-in (used by gradpipe's tests)."""
    import torch

    import gradpipe
    from gradpipe.compiler.ops import Buffer, Param, TensorOp


    @gradpipe.register_op
    class LeakySign(TensorOp):
        r"""Sign of a leaky sum of the inputs, plus a share of the sum that fades with the step.

        .. math::
            a_t = \\rho\\, a_{t-1} + x_t,\\qquad u_t = \\operatorname{sign}(a_t) + \\alpha\\, a_t / t

        ``a`` starts at zero. Reference: gradpipe's tests/test_plugins.py.
        """

        name = "leaky_sign"
        summary = "sign(a) + alpha a / t of a leaky sum a = rho a + x"
        reference = "tests/test_plugins.py"
        flat = True
        params = (
            Param("rho", default=0.5, low=0.0, high=1.0, high_closed=False, doc="leak of the sum"),
            Param("alpha", default=0.1, low=0.0, doc="weight of the sum"),
        )
        buffers = (Buffer("acc", "the leaky sum"),)

        def update(self, x, state, a, lane):
            acc = state["acc"]
            acc.mul_(a.rho).add_(x)
            return torch.sign(acc) + acc * (a.alpha / lane.step)
'''

#: not decorated: the entry point names the class itself
DEMO_EXTRA = '''\
    from gradpipe.compiler.ops import Param, TensorOp


    class Shrink(TensorOp):
        r"""Multiply by a constant factor: :math:`u = c\\, x`. Reference: tests/test_plugins.py."""

        name = "shrink_demo"
        summary = "c x"
        reference = "tests/test_plugins.py"
        flat = True
        params = (Param("c", default=0.5, low=0.0, doc="the factor"),)

        def update(self, x, state, a, lane):
            return x * a.c
'''

DEMO_SOURCE = """\
hparam lr = 0.1 in [0, inf)
hparam rho = 0.5 in [0, 1)

grad | leaky_sign(rho, alpha=0.2) | shrink_demo(0.5)
"""

SHAPES = {"0.weight": (2, 3), "0.bias": (2,)}
STEPS = 4
LR, RHO, ALPHA, C = 0.05, 0.7, 0.2, 0.5


def _by_hand(init: dict, grads: list[dict]) -> dict:
    """The plug-in's equations, step by step, in float64 NumPy."""
    p = {k: np.array(v, dtype=np.float64) for k, v in init.items()}
    acc = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads, start=1):
        for k in p:
            acc[k] = RHO * acc[k] + np.array(g[k])
            u = C * (np.sign(acc[k]) + ALPHA * acc[k] / t)
            p[k] = p[k] - LR * u
    return p


_STEPS_CHILD = """\
payload = json.loads(sys.argv[1])
out["registered"] = {n: type(OPS[n]).__module__ for n in ("leaky_sign", "shrink_demo") if n in OPS}
out["results"], out["state"] = {}, {}
for backend in payload["backends"]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(payload["init"][name], dtype=torch.float64))
    opt = gradpipe.Optimizer(model.named_parameters(), payload["file"], backend=backend, lr=payload["lr"],
                             rho=payload["rho"])
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("always")
        for g in payload["grads"]:
            opt.zero_grad()
            loss = sum((p * torch.tensor(g[name], dtype=torch.float64)).sum()
                       for name, p in model.named_parameters())
            loss.backward()
            opt.step()
    out.setdefault("fallbacks", []).extend(str(w.message) for w in during
                                           if type(w.message).__name__ == "CompileFallbackWarning")
    out["results"][backend] = {name: p.detach().tolist() for name, p in model.named_parameters()}
    out["state"][backend] = sorted(k for p in model.parameters() for k in opt.state[p])
"""


def test_installed_plugin_ops_run_on_both_backends_and_check_accepts_them(tmp_path):
    root = tmp_path / "site"
    install(root, "gp_demo_ops", {"gp_demo_ops/__init__.py": DEMO_INIT, "gp_demo_ops/extra.py": DEMO_EXTRA},
            {"demo": "gp_demo_ops", "shrink": "gp_demo_ops.extra:Shrink"})
    good = tmp_path / "uses_plugin.grad"
    good.write_text(DEMO_SOURCE)
    bad = tmp_path / "misuses_plugin.grad"
    bad.write_text("grad | leaky_sign(rho=1.5)\n")

    # without the plug-in, the ops do not exist (so what follows comes from the plug-in)
    with pytest.raises(gradpipe.GradError, match="unknown op 'leaky_sign'"):
        gradpipe.load(good)

    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).tolist() for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).tolist() for k, s in SHAPES.items()} for _ in range(STEPS)]
    payload = {"init": init, "grads": grads, "file": str(good), "lr": LR, "rho": RHO,
               "backends": ["eager", "compiled"]}
    out = run_child(root, _STEPS_CHILD, json.dumps(payload))

    assert out["warnings"] == []
    assert out["plugins"] == {"demo = gp_demo_ops": ["leaky_sign"],
                              "shrink = gp_demo_ops.extra:Shrink": ["shrink_demo"]}
    assert out["registered"] == {"leaky_sign": "gp_demo_ops", "shrink_demo": "gp_demo_ops.extra"}
    assert out["fallbacks"] == [], "the compiled backend fell back to eager for the plug-in's op"
    want = _by_hand(init, grads)
    for backend in ("eager", "compiled"):
        got = out["results"][backend]
        for k in SHAPES:
            np.testing.assert_allclose(np.array(got[k]), want[k], rtol=1e-12, atol=1e-12,
                                       err_msg=f"{backend} {k}")
        # the declared buffer is the optimizer's state, under the node's name
        assert any(k.endswith(".acc") for k in out["state"][backend]), out["state"][backend]
        assert "step" in out["state"][backend]

    # `gradpipe check` in that environment: the file that uses the ops passes, and the plug-in's
    # signature (its valid ranges) is checked like a built-in op's
    proc = subprocess.run([sys.executable, "-m", "gradpipe", "check", str(good), str(bad)], env=env_with(root),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{bad}:1:" in proc.stderr and "rho=1.5 is outside the valid range [0, 1) of 'leaky_sign'" \
        in proc.stderr, proc.stderr
    assert str(good) not in proc.stderr
    assert "1 of 2 file(s) have errors" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gradpipe", "check", str(good)], env=env_with(root),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: 1 file(s) checked" in proc.stdout


# ------------------------------------------------------------------ plug-ins that are skipped
#: after the import: gradpipe still works, and its adam is still torch's Adam
_STILL_WORKS = """\
torch.manual_seed(0)
a = torch.nn.Linear(3, 2)
b = torch.nn.Linear(3, 2)
b.load_state_dict(a.state_dict())
ours = gradpipe.Optimizer(a.named_parameters(), "adam", backend="eager", lr=0.01)
ref = torch.optim.Adam(b.parameters(), lr=0.01)
x = torch.randn(5, 3)
for _ in range(3):
    for m, o in ((a, ours), (b, ref)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
out["adam_diff"] = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
out["adam_module"] = type(OPS["adam"]).__module__
out["ops"] = sorted(OPS)
from gradpipe.compiler.ops import BUILTIN_OPS
out["builtin"] = sorted(BUILTIN_OPS)
"""


def _assert_skipped(out: dict, key: str, *fragments: str) -> None:
    """Exactly one PluginWarning, naming the entry point ``key`` and saying why; nothing of it registered."""
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "PluginWarning"
    assert f"'{key}'" in message, message
    for f in fragments:
        assert f in message, message
    assert out["plugins"] == {key: []}
    assert out["adam_module"] == "gradpipe.compiler.ops.adam"
    assert out["adam_diff"] < 1e-6
    assert out["ops"] == out["builtin"] == sorted(BUILTIN_OPS), \
        "the skipped plug-in left ops behind (or gradpipe lost some of its own)"


def test_plugin_that_fails_on_import_is_skipped_with_a_warning(tmp_path):
    install(tmp_path, "gp_broken_ops", {"gp_broken_ops/__init__.py": '''\
        import gradpipe
        from gradpipe.compiler.ops import Param, TensorOp


        @gradpipe.register_op
        class HalfDone(TensorOp):
            """Registered before the module fails. Reference: tests/test_plugins.py."""
            name = "half_done"
            def update(self, x, state, a, lane):
                return x


        raise RuntimeError("gp_broken_ops refuses to load")
        '''}, {"broken": "gp_broken_ops"})
    out = run_child(tmp_path, _STILL_WORKS)
    _assert_skipped(out, "broken = gp_broken_ops", "RuntimeError", "gp_broken_ops refuses to load")
    assert "half_done" not in out["ops"]


def test_plugin_reusing_a_builtin_op_name_is_skipped_and_adam_is_unchanged(tmp_path):
    install(tmp_path, "gp_clash_ops", {"gp_clash_ops/__init__.py": '''\
        import gradpipe
        from gradpipe.compiler.ops import TensorOp


        @gradpipe.register_op
        class NotAdam(TensorOp):
            """An op that takes a built-in op's name. Reference: tests/test_plugins.py."""
            name = "adam"
            def update(self, x, state, a, lane):
                return 0 * x
        '''}, {"clash": "gp_clash_ops"})
    out = run_child(tmp_path, _STILL_WORKS)
    _assert_skipped(out, "clash = gp_clash_ops", "PluginError", "'adam' is registered twice")


def test_entry_point_naming_neither_a_module_nor_an_op_is_skipped(tmp_path):
    install(tmp_path, "gp_odd_ops", {"gp_odd_ops/__init__.py": "VALUE = 3\n"}, {"odd": "gp_odd_ops:VALUE"})
    out = run_child(tmp_path, _STILL_WORKS)
    _assert_skipped(out, "odd = gp_odd_ops:VALUE", "not a module or an Op subclass")


# ------------------------------------------------------------------ register_op in-process
@pytest.fixture
def scratch_ops():
    """Ops registered by the test are removed afterwards, so no other test sees them."""
    before = set(OPS)
    yield
    for name in set(OPS) - before:
        del OPS[name]


def _twice_class():
    class Twice(TensorOp):
        r"""Multiply by k and count the steps in a buffer: :math:`u = k x`, :math:`n_t = n_{t-1} + 1`.

        Reference: tests/test_plugins.py."""

        name = "test_plugins_twice"
        summary = "k x"
        reference = "tests/test_plugins.py"
        params = (Param("k", default=2.0, low=0.0, doc="the factor"),)
        buffers = (Buffer("n", "steps seen"),)

        def update(self, x, state, a, lane):
            state["n"].add_(1)
            return x * a.k
    return Twice


def test_register_op_in_process(scratch_ops, capsys):
    cls = _twice_class()
    assert gradpipe.register_op(cls) is cls
    assert gradpipe.register_op(cls) is cls  # the same class again (a module imported twice) is fine
    assert isinstance(OPS["test_plugins_twice"], cls)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = gradpipe.Optimizer(model.named_parameters(), "grad | test_plugins_twice(3)", backend="eager", lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * 3 * g)
        (key,) = [k for k in opt.state[p] if k.endswith(".n")]
        assert torch.equal(opt.state[p][key], torch.ones_like(p))

    # the compiler checks its signature like a built-in op's, and `gradpipe ops` lists it
    with pytest.raises(gradpipe.GradError, match=r"k=-1 is outside the valid range"):
        gradpipe.compile("grad | test_plugins_twice(-1)")
    assert main(["ops"]) == 0
    assert "test_plugins_twice(k=2.0)" in capsys.readouterr().out


def test_register_op_rejects_what_is_not_an_op(scratch_ops):
    before = dict(OPS)
    for thing in (int, "adam", OPS["adam"], lambda x: x, object):
        with pytest.raises(PluginError, match="expects an Op subclass"):
            gradpipe.register_op(thing)
    assert issubclass(PluginError, ValueError)

    class Nameless(TensorOp):
        """No name. Reference: tests/test_plugins.py."""

    class BadName(TensorOp):
        """A name that is not an identifier. Reference: tests/test_plugins.py."""
        name = "two words"

    for cls in (Nameless, BadName):
        with pytest.raises(PluginError, match="needs a name that is an identifier"):
            gradpipe.register_op(cls)
    assert OPS == before


def test_register_op_rejects_a_builtin_name(scratch_ops):
    adam = OPS["adam"]

    class MyAdam(TensorOp):
        """Takes adam's name. Reference: tests/test_plugins.py."""
        name = "adam"

        def update(self, x, state, a, lane):
            return x

    with pytest.raises(PluginError, match="'adam' is registered twice"):
        gradpipe.register_op(MyAdam)
    assert OPS["adam"] is adam
    assert [type(n.impl) for n in gradpipe.compile("grad | adam").nodes() if n.is_op] == [type(adam)]
