"""The compiler: program structure and node names, CSE, dead nodes, constant folding,
type and scope checks, imports, routes, the program hash, explain() and drawing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch


import op_table as T  # noqa: E402

import gradpipe  # noqa: E402
from optimizer_table import BUILTIN_NAMES  # noqa: E402
from gradpipe.compiler import scalars as S  # noqa: E402

TOL = dict(rtol=1e-12, atol=1e-12)


def nodes(prog, kind=None):
    return [n for n, d in prog.graph.nodes(data=True) if kind is None or d["kind"] == kind]


def op_nodes(prog, op=None):
    return [n for n, d in prog.graph.nodes(data=True) if d["kind"] == "op" and (op is None or d["op"] == op)]


def error(src: str) -> gradpipe.GradError:
    with pytest.raises(gradpipe.GradError) as info:
        gradpipe.compile(src)
    return info.value


def assert_updates(actual, expected, tol=TOL):
    assert len(actual) == len(expected)
    for t, (us, es) in enumerate(zip(actual, expected), start=1):
        for i, (u, e) in enumerate(zip(us, es)):
            np.testing.assert_allclose(u, e, err_msg=f"step {t} tensor {i}", **tol)


def run(pipeline, grads=T.GRADS, params0=T.PARAMS0, **hp):
    params = T.make_params(params0)
    opt = gradpipe.Optimizer(params, pipeline, backend="eager", **{"lr": 1.0, **hp})
    return T.run_optimizer(opt, params, grads), opt, params


def reference(stepper_factory, grads=T.GRADS, params0=T.PARAMS0):
    return T.reference_updates(T.OpCase("ref", "", "", stepper_factory), grads, params0)


# ------------------------------------------------------------------------ node names
class TestNodeNames:
    def test_chain_names(self):
        prog = gradpipe.compile("grad | clip_norm(1) | adam")
        assert set(nodes(prog)) == {"main/grad", "main/clip_norm", "main/adam", "main/out"}
        assert prog.graph.nodes["main/adam"]["kind"] == "op"
        assert prog.graph.nodes["main/grad"]["kind"] == "source"
        assert prog.graph.nodes["main/out"]["kind"] == "output"
        assert prog.inputs("main/adam") == {"x": "main/clip_norm"}
        assert prog.graph.nodes["main/adam"]["route"] == "main"

    def test_duplicate_ops_get_numbered(self):
        prog = gradpipe.compile("grad | adam | adam")
        assert op_nodes(prog) == ["main/adam", "main/adam#2"]
        assert prog.state_buffers() == ["main/adam.m", "main/adam.v", "main/adam#2.m", "main/adam#2.v"]
        assert prog.inputs("main/adam#2") == {"x": "main/adam"}

    def test_signal_argument_nodes_nest_under_their_op(self):
        prog = gradpipe.compile("grad | project_orthogonal(ema) | clip_median | scale(diffgrad)")
        assert set(op_nodes(prog)) == {"main/project_orthogonal", "main/project_orthogonal/ema",
                                       "main/clip_median", "main/diffgrad"}
        # the signal is applied to the receiving op's own input
        assert prog.inputs("main/project_orthogonal/ema") == {"x": "main/grad"}
        assert prog.inputs("main/project_orthogonal") == {"x": "main/grad", "ref": "main/project_orthogonal/ema"}
        assert "main/project_orthogonal/ema.m" in prog.state_buffers()
        # scale(rule) is the rule itself, under the rule's name
        assert "main/diffgrad.prev" in prog.state_buffers()
        assert prog.inputs("main/diffgrad") == {"x": "main/clip_median"}

    def test_def_inlining_names(self):
        prog = gradpipe.compile("def core(b=0.9) = ema(b) | adam\ngrad | clip_norm(1) | core(0.5)")
        assert set(op_nodes(prog)) == {"main/clip_norm", "main/core/ema", "main/core/adam"}
        assert prog.graph.nodes["main/core/ema"]["args"]["beta"] == S.Const(0.5)
        assert prog.inputs("main/core/ema") == {"x": "main/clip_norm"}

    def test_let_names(self):
        prog = gradpipe.compile("let g = grad | clip_norm(1)\ng | adam")
        assert set(op_nodes(prog)) == {"main/g/clip_norm", "main/adam"}

    BASE = "hparam b1 = 0.9 in [0, 1)\nhparam b2 = 0.999 in [0, 1)\ngrad | project_orthogonal(ema) | adam(b1, b2)\n"
    EDITS = {
        "comment": "# a comment\nhparam b1 = 0.9 in [0, 1)  # first moment\nhparam b2 = 0.999 in [0, 1)\n"
                   "# the pipeline\ngrad | project_orthogonal(ema) | adam(b1, b2)  # done\n",
        "unrelated let": "hparam b1 = 0.9 in [0, 1)\nhparam b2 = 0.999 in [0, 1)\nlet spare = grad | sign | ema\n"
                         "grad | project_orthogonal(ema) | adam(b1, b2)\n",
        "reordered hparams": "hparam b2 = 0.999 in [0, 1)\nhparam b1 = 0.9 in [0, 1)\n"
                             "grad | project_orthogonal(ema) | adam(b1, b2)\n",
        "other defaults": "hparam b1 = 0.8 in [0, 1)\nhparam b2 = 0.99 in [0, 1)\n"
                          "grad | project_orthogonal(ema) | adam(b1, b2)\n",
        "multi-line layout": "hparam b1 = 0.9 in [0, 1)\nhparam b2 = 0.999 in [0, 1)\n"
                             "grad\n  | project_orthogonal(ema)\n  | adam(b1, b2)\n",
        "let for the stage": "hparam b1 = 0.9 in [0, 1)\nhparam b2 = 0.999 in [0, 1)\n"
                             "let surgery = project_orthogonal(ema)\ngrad | surgery | adam(b1, b2)\n",
    }

    @pytest.mark.parametrize("edit", list(EDITS))
    def test_state_buffer_names_survive_unrelated_edits(self, edit):
        base = gradpipe.compile(self.BASE).state_buffers()
        assert base == ["main/project_orthogonal/ema.m", "main/adam.m", "main/adam.v"]
        assert sorted(gradpipe.compile(self.EDITS[edit]).state_buffers()) == sorted(base)

    def test_inserting_a_stateless_op_keeps_names(self):
        a = gradpipe.compile("grad | ema | adam").state_buffers()
        b = gradpipe.compile("grad | clip_norm(1) | ema | sign | adam").state_buffers()
        assert a == b

    def test_state_dict_moves_across_an_unrelated_edit(self):
        params = T.make_params()
        opt = gradpipe.Optimizer(params, self.BASE, backend="eager", lr=1.0)
        T.run_optimizer(opt, params, T.GRADS[:2])
        clones = [p.detach().clone() for p in params]
        edited = gradpipe.Optimizer(clones, self.EDITS["unrelated let"], backend="eager", lr=1.0)
        # a checkpoint is a copy (torch's load_state_dict shares tensors with a live state_dict)
        edited.load_state_dict(T.deepcopy_state(opt.state_dict()))
        a = T.run_optimizer(opt, params, T.GRADS[2:])
        b = T.run_optimizer(edited, clones, T.GRADS[2:])
        assert all(np.array_equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))

    def test_optimizer_state_keys_are_the_buffer_names(self):
        _, opt, params = run("grad | project_orthogonal(ema) | adam | adam", T.GRADS[:1])
        for p in params:
            assert set(opt.state[p]) == {"step", "main/project_orthogonal/ema.m", "main/adam.m", "main/adam.v",
                                         "main/adam#2.m", "main/adam#2.v"}


# ------------------------------------------------------------------------ CSE
def _ref_shared_ema_surgery(beta=0.9):
    """let g = grad | clip_norm(1); g | add((g | ema)) | project_orthogonal((g | ema)): one EMA of g,
    updated once per step, used twice."""
    clip = T.ref_clip_norm(1.0, "global")
    ema = T.ref_ema(beta)

    def step(t, gs, ps):
        g = clip(t, gs, ps)
        e = ema(t, g, ps)
        a = [x + y for x, y in zip(g, e)]
        return T.project(a, e, "global", 1e-7)
    return step


class TestCSE:
    SHARED = "let g = grad | clip_norm(1)\ng | add((g | ema)) | project_orthogonal((g | ema))"

    def test_identical_stateful_nodes_share_one_buffer(self):
        prog = gradpipe.compile(self.SHARED)
        assert prog.merged == [("main/project_orthogonal/ema", "main/add/ema")]
        assert op_nodes(prog, "ema") == ["main/add/ema"]
        assert prog.state_buffers() == ["main/add/ema.m"]
        assert prog.inputs("main/project_orthogonal")["ref"] == "main/add/ema"
        assert prog.inputs("main/add")["s"] == "main/add/ema"
        assert "CSE: main/project_orthogonal/ema merged into main/add/ema" in prog.explain()

    def test_shared_buffer_is_updated_once_per_step(self):
        ups, opt, params = run(self.SHARED)
        assert_updates(ups, reference(_ref_shared_ema_surgery))
        assert set(opt.state[params[0]]) == {"step", "main/add/ema.m"}

    def test_bare_op_signal_on_the_same_input_merges_with_a_closed_pipeline(self):
        # add(ema) applies ema to add's input g; (g | ema) is the same node
        prog = gradpipe.compile("let g = grad | clip_norm(1)\ng | add(ema) | project_orthogonal((g | ema))")
        assert len(op_nodes(prog, "ema")) == 1
        assert prog.state_buffers() == [f"{op_nodes(prog, 'ema')[0]}.m"]
        ups, _, _ = run(prog)
        assert_updates(ups, reference(_ref_shared_ema_surgery))

    def test_closed_pipelines_on_grad_merge(self):
        prog = gradpipe.compile("grad | add((grad | ema)) | project_orthogonal((grad | ema))")
        assert len(op_nodes(prog, "ema")) == 1 and len(prog.merged) == 1

        def ref():
            ema = T.ref_ema(0.9)

            def step(t, gs, ps):
                e = ema(t, gs, ps)
                return T.project([g + x for g, x in zip(gs, e)], e)
            return step
        assert_updates(run(prog)[0], reference(ref))

    def test_same_op_on_different_inputs_is_not_merged(self):
        # ema of grad, and ema of (grad + ema(grad)): two different averages
        prog = gradpipe.compile("grad | add(ema) | project_orthogonal(ema)")
        assert prog.merged == []
        assert sorted(prog.state_buffers()) == ["main/add/ema.m", "main/project_orthogonal/ema.m"]

        def ref():
            e1, e2 = T.ref_ema(0.9), T.ref_ema(0.9)

            def step(t, gs, ps):
                a = [g + x for g, x in zip(gs, e1(t, gs, ps))]
                return T.project(a, e2(t, a, ps))
            return step
        assert_updates(run(prog)[0], reference(ref))

    def test_different_arguments_are_not_merged(self):
        prog = gradpipe.compile("grad | add((grad | ema(0.5))) | project_orthogonal((grad | ema(0.9)))")
        assert prog.merged == [] and len(op_nodes(prog, "ema")) == 2

    def test_chains_in_sequence_are_not_merged(self):
        # grad | adam | adam: the second adam reads the first, not grad
        prog = gradpipe.compile("grad | adam | adam")
        assert prog.merged == []

    def test_stateless_nodes_merge_too(self):
        prog = gradpipe.compile("grad | add((grad | sign)) | add((grad | sign))")
        assert len(op_nodes(prog, "sign")) == 1

    def test_noise_nodes_are_never_merged(self):
        prog = gradpipe.compile("grad | add((grad | noise)) | add((grad | noise))")
        assert len(op_nodes(prog, "noise")) == 2
        assert prog.merged == []
        prog = gradpipe.compile("let g = grad | clip_norm(1)\ng | add((g | noise(seed=1))) | add((g | noise(seed=1)))")
        assert len(op_nodes(prog, "noise")) == 2
        # ... but a deterministic op downstream of two noises is not merged either (different inputs)
        prog = gradpipe.compile("grad | add((grad | noise | ema)) | add((grad | noise | ema))")
        assert len(op_nodes(prog, "ema")) == 2

    def test_let_used_twice_in_one_route_is_one_node(self):
        prog = gradpipe.compile("let e = grad | ema(0.5)\ne | add(e)")
        assert op_nodes(prog, "ema") == ["main/e/ema"]

        def ref():
            ema = T.ref_ema(0.5)

            def step(t, gs, ps):
                return [2 * x for x in ema(t, gs, ps)]
            return step
        assert_updates(run(prog)[0], reference(ref))


# ------------------------------------------------------------------------ dead nodes
class TestDeadNodes:
    def test_unused_let_is_not_in_the_graph(self):
        prog = gradpipe.compile("let unused = grad | adam | ema\nlet used = grad | clip_norm(1)\nused | sign")
        assert set(nodes(prog)) == {"main/grad", "main/used/clip_norm", "main/sign", "main/out"}
        assert prog.state_buffers() == []
        assert not any("unused" in n for n in nodes(prog))

    def test_unused_def_default_signal_is_removed(self):
        prog = gradpipe.compile("def f(s=param) = adam\ngrad | f")
        assert "main/param" not in prog.graph
        assert prog.removed == ["main/param"]
        assert "dead: main/param removed" in prog.explain()

    def test_closed_let_used_in_two_routes_has_nodes_per_route(self):
        prog = gradpipe.compile("let g = grad | clip_norm(1)\nroute ndim >= 2: g | adam\nroute default: g | sign")
        assert set(op_nodes(prog)) == {"ndim>=2/g/clip_norm", "ndim>=2/adam", "default/g/clip_norm", "default/sign"}
        assert prog.graph.nodes["default/g/clip_norm"]["route"] == "default"
        # the routes share nothing: each global clip sees only its own route's tensors
        assert not set(prog.route_nodes("ndim>=2")) & set(prog.route_nodes("default"))

    def test_global_clip_in_a_let_is_per_route(self):
        prog = gradpipe.compile("let g = grad | clip_norm(1)\nroute ndim >= 2: g | scale(1.5)\nroute default: g")
        ups, opt, params = run(prog)
        assert opt.route_of(params[0]) == "ndim>=2" and opt.route_of(params[1]) == "default"

        def ref():
            def step(t, gs, ps):
                [a] = T.ref_clip_norm(1.0)(t, [gs[0]], ps)
                [b] = T.ref_clip_norm(1.0)(t, [gs[1]], ps)
                return [1.5 * a, b]
            return step
        assert_updates(ups, reference(ref))


# ------------------------------------------------------------------------ constant folding
class TestFolding:
    def test_constant_arithmetic_is_folded(self):
        prog = gradpipe.compile("grad | scale(1 - 0.5) | ema(2 * 0.25 + 0.25)")
        assert prog.graph.nodes["main/scale"]["args"]["x"] == S.Const(0.5)
        assert prog.graph.nodes["main/ema"]["args"]["beta"] == S.Const(0.75)
        assert any(f.startswith("1 - 0.5 -> 0.5") for f in prog.folded)

    def test_identities_are_removed_and_reported(self):
        prog = gradpipe.compile("grad | scale(1) | decay(0) | momentum(0) | adam | scale(2 - 1)")
        assert op_nodes(prog) == ["main/adam"]
        assert prog.inputs("main/adam") == {"x": "main/grad"}
        assert prog.inputs("main/out") == {"x": "main/adam"}
        text = "\n".join(prog.folded)
        for what in ("scale(1) is the identity", "decay(0) is the identity", "momentum(0) is the identity",
                     "scale(2 - 1) is the identity"):
            assert what in text, text
        assert "folded: decay(0) is the identity; removed" in prog.explain()

    def test_pipeline_of_identities_is_grad(self):
        prog = gradpipe.compile("grad | scale(1) | decay(0)")
        assert prog.inputs("main/out") == {"x": "main/grad"}
        T.assert_exact_updates(T.run_pipeline_params(prog), T.GRADS)

    def test_hparam_arguments_stay_symbolic(self):
        prog = gradpipe.compile("hparam wd = 0 in [0, 1]\nhparam s = 1\ngrad | decay(wd) | scale(s) | scale(1 - wd)")
        # not removed even though the defaults make them identities: a group may change them
        assert op_nodes(prog, "decay") == ["main/decay"] and len(op_nodes(prog, "scale")) == 2
        assert prog.graph.nodes["main/decay"]["args"]["wd"] == S.HP("wd")
        assert isinstance(prog.graph.nodes["main/scale#2"]["args"]["x"], S.BinS)
        assert prog.folded == []

    def test_hparam_arguments_are_evaluated_per_group_at_runtime(self):
        src = "hparam s = 2.0 in [0, 10]\nhparam b = 0.5 in [0, 1)\ngrad | ema(1 - b) | scale(s * 2)"
        a = torch.zeros(3, dtype=torch.float64)
        c = torch.zeros(2, dtype=torch.float64)
        opt = gradpipe.Optimizer([{"params": [a]}, {"params": [c], "s": 3.0, "b": 0.25}], src, lr=1.0)
        ga, gc = [np.array([1.0, -2.0, 0.5])], [np.array([0.3, 4.0])]
        steps_a = [ga, ga, ga]
        # group 0: ema(0.5) * 4; group 1: ema(0.75) * 6
        ea, ec = T.ref_ema(0.5), T.ref_ema(0.75)
        for t in (1, 2):
            a.grad, c.grad = torch.tensor(ga[0]), torch.tensor(gc[0])
            before = a.clone(), c.clone()
            opt.step()
            np.testing.assert_allclose((before[0] - a).numpy(), 4 * ea(t, ga, None)[0], **TOL)
            np.testing.assert_allclose((before[1] - c).numpy(), 6 * ec(t, gc, None)[0], **TOL)
        # changing a group's value changes the next step, with the same Program
        opt.param_groups[0]["s"] = 0.5
        before = a.clone()
        a.grad, c.grad = torch.tensor(ga[0]), torch.tensor(gc[0])
        opt.step()
        np.testing.assert_allclose((before - a).numpy(), 1.0 * ea(3, steps_a[2], None)[0], **TOL)

    def test_lr_scheduler_changes_the_step(self):
        params = T.make_params()
        opt = gradpipe.Optimizer(params, "grad | sign", lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        ups = []
        for gs in T.GRADS[:3]:
            ups += T.run_optimizer(opt, params, [gs])
            sched.step()
        for k, (us, gs) in enumerate(zip(ups, T.GRADS)):
            np.testing.assert_allclose(us[0], 0.5 ** k * np.sign(gs[0]), **TOL)

    def test_out_of_range_group_value_is_rejected(self):
        src = "hparam b = 0.5\ngrad | ema(1 - b)"
        with pytest.raises(gradpipe.GradError, match="beta"):
            gradpipe.Optimizer([torch.zeros(2)], src, b=1.5)
        opt = gradpipe.Optimizer([torch.zeros(2)], src)
        opt.param_groups[0]["b"] = -1.0
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        with pytest.raises(gradpipe.GradError, match=r"outside the valid range \[0, 1\) of 'ema'"):
            opt.step()


# ------------------------------------------------------------------------ type and scope checks
CHECKS = [
    # (source, message fragment, line, column)
    ("grad | 3", "a number cannot be a pipeline stage", 1, 8),
    ("grad | param", "a signal cannot be a pipeline stage", 1, 8),
    ("adam", "a pipeline must start from a signal", 1, 1),
    ("grad | adamm", "unknown name 'adamm'", 1, 8),
    ("grad | adamm(0.9)", "unknown op 'adamm'", 1, 8),
    ("grad | ema(1.5)", "beta=1.5 is outside the valid range [0, 1) of 'ema'", 1, 12),
    ("grad | ema(debias=1)", "must be true or false", 1, 19),
    ("grad | scale(true)", "must be a number", 1, 14),
    ("grad | clip_norm(scope=galaxy)", "'galaxy' is not a valid scope for 'clip_norm'", 1, 24),
    ("grad | clip_median(geometry=l1)", "'l1' is not a valid geometry", 1, 29),
    ("grad | project_orthogonal(0.5)", "argument 'ref' of 'project_orthogonal' must be a signal", 1, 27),
    ("grad | ema(beta=0.9, betta=0.9)", "op 'ema' has no argument 'betta'", 1, 22),
    ("grad | ema(0.9, beta=0.8)", "given twice", 1, 17),
    ("grad | sign(1)", "takes at most 0 positional arguments", 1, 13),
    ("grad | noise(seed=0.5)", "whole number", 1, 19),
    ("grad | project_orthogonal", "needs argument 'ref'", 1, 8),
    ("hparam betas = (0.9, 0.999)\ngrad | adam(betas)", "'betas' is a tuple; pick an item", 2, 13),
    ("hparam betas = (0.9, 0.999)\ngrad | adam(betas[2])", "index 2 is out of range", 2, 13),
    ("hparam flag = true\ngrad | scale(flag * 2)", "'flag' is a boolean", 2, 14),
    ("hparam b = 0.9\ngrad | b", "a number cannot be a pipeline stage", 2, 8),
    ("hparam b = 0.9\ngrad | b(1)", "'b' is a hyperparameter, not an op", 2, 8),
    ("let e = grad | ema\ngrad | e(1)", "'e' is a let binding, not an op", 2, 8),
    ("let a = b\nlet b = a\ngrad | add(a)", "defined in terms of itself", 1, 1),
    ("def f(x) = scale(x)\ngrad | f", "needs argument 'x'", 2, 8),
    ("def f(x) = x(1)\ngrad | f(ema)", "is a parameter of this pipeline, not an op", 1, 12),
    ("def f() = grad | f\ngrad | f", "is recursive", 1, 18),
    ("let grad = param\ngrad | adam", "'grad' is a built-in name", 1, 1),
    ("hparam b = 0.9\nhparam b = 0.8\ngrad | ema(b)", "'b' is already defined on line 1", 2, 1),
    ("grad | scale(1 / 0)", "division by zero", 1, 14),
    ("grad | adam\ngrad | sign", "a second pipeline", 2, 1),
    ("route ndim >= 2: grad | adam\ngrad | sign", "a pipeline next to 'route' statements", 2, 1),
    ('route "*.w": grad | adam\nroute "*.w": grad | sign', "the same selector as the route on line 1", 2, 1),
    ("route /(/: grad | adam", "invalid regular expression", 1, 7),
    ("grad | add(grads)", "'grads' needs a loss name", 1, 12),
    ("", "the file is empty", 1, 1),
    ("hparam b = 0.9", "the file defines no pipeline", 1, 1),
]


class TestChecks:
    @pytest.mark.parametrize("src,msg,line,col", CHECKS, ids=[c[1][:40] for c in CHECKS])
    def test_error(self, src, msg, line, col):
        e = error(src)
        assert isinstance(e, ValueError)
        assert msg in str(e), str(e)
        assert (e.line, e.column) == (line, col), str(e)
        assert e.path == "<string>"

    def test_did_you_mean(self):
        e = error("grad | clip_nrom(1)")
        assert "clip_norm" in (e.hint or "")
        e = error("hparam beta1 = 0.9\ngrad | ema(beat1)")
        assert "beta1" in (e.hint or "")

    def test_errors_in_two_routes_are_all_reported(self):
        e = error("route ndim >= 2: grad | adamm\nroute default: grad | ema(2)")
        text = str(e)
        assert "adamm" in text and "beta=2" in text

    def test_def_parameters_are_local(self):
        # x is visible inside f only
        e = error("def f(x=0.5) = ema(x)\ngrad | f | scale(x)")
        assert "unknown name 'x'" in str(e)

    def test_def_body_sees_its_own_file_not_the_callers_locals(self):
        prog = gradpipe.compile("hparam b = 0.3\ndef f(b=0.7) = ema(b)\ngrad | f | ema(b)")
        assert prog.graph.nodes["main/f/ema"]["args"]["beta"] == S.Const(0.7)
        assert prog.graph.nodes["main/ema"]["args"]["beta"] == S.HP("b")

    def test_signal_arguments_take_any_stream(self):
        for src in ("grad | add(param)", "grad | add((grad | sign))", "grad | add(0.5 * param)",
                    "grad | project_orthogonal(ema(0.99))", "grad | scale(param)", "grad | add(lr * param)",
                    "grad | scale(step)"):
            gradpipe.compile(src)

    def test_unknown_hyperparameter_at_construction(self):
        with pytest.raises(gradpipe.GradError, match="unknown hyperparameter 'bta'"):
            gradpipe.Optimizer([torch.zeros(2)], "hparam beta = 0.9 in [0, 1)\ngrad | ema(beta)", bta=0.5)
        with pytest.raises(gradpipe.GradError, match="outside its declared range"):
            gradpipe.Optimizer([torch.zeros(2)], "hparam beta = 0.9 in [0, 1)\ngrad | ema(beta)", beta=1.0)


# ------------------------------------------------------------------------ imports
@pytest.fixture
def libtree(tmp_path):
    (tmp_path / "gradpipe.toml").write_text("")  # the project root: imports may not leave it
    (tmp_path / "lib").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "lib" / "common.grad").write_text(
        "hparam beta = 0.8 in [0, 1)\n"
        "def smooth(b=beta) = ema(b)\n"
        "let surgery = project_orthogonal(ema)\n")
    (tmp_path / "lib" / "a.grad").write_text('import "common.grad"\ndef fa() = smooth | sign\n')
    (tmp_path / "lib" / "b.grad").write_text('import "./common.grad" as c\ndef fb() = c.smooth(0.5) | scale(2)\n')
    return tmp_path


class TestImports:
    def test_alias_access_and_relative_paths(self, libtree):
        main = libtree / "sub" / "main.grad"
        main.write_text('import "../lib/common.grad" as lib\ngrad | lib.surgery | lib.smooth(0.6)\n')
        prog = gradpipe.load(main)
        assert set(op_nodes(prog)) == {"main/project_orthogonal", "main/project_orthogonal/ema", "main/smooth/ema"}
        assert prog.graph.nodes["main/smooth/ema"]["args"]["beta"] == S.Const(0.6)

    def test_unaliased_import(self, libtree):
        main = libtree / "main.grad"
        main.write_text('import "lib/common.grad"\ngrad | surgery | smooth\n')
        prog = gradpipe.load(main)
        assert prog.graph.nodes["main/smooth/ema"]["args"]["beta"] == S.HP("beta")

    def test_import_without_suffix(self, libtree):
        main = libtree / "main.grad"
        main.write_text('import "lib/common" as lib\ngrad | lib.smooth\n')
        assert "main/smooth/ema" in gradpipe.load(main).graph

    def test_imported_hparams_become_program_hyperparameters(self, libtree):
        main = libtree / "main.grad"
        main.write_text('import "lib/common.grad" as lib\nhparam s = 2\ngrad | lib.smooth | scale(s * beta)\n')
        prog = gradpipe.load(main)
        assert set(prog.hyperparams) == {"lr", "beta", "s"}
        assert prog.hyperparams["beta"].default == 0.8
        assert "beta = 0.8 in [0, 1)" in prog.explain()
        # and an Optimizer takes them as hyperparameters / group values
        ups, _, _ = run(prog, T.GRADS[:2], beta=0.5)
        ema = T.ref_ema(0.5)
        for t, (us, gs) in enumerate(zip(ups, T.GRADS), start=1):
            for u, e in zip(us, ema(t, gs, None)):
                np.testing.assert_allclose(u, 2 * 0.5 * e, **TOL)
        with pytest.raises(gradpipe.GradError, match="outside its declared range"):
            gradpipe.Optimizer([torch.zeros(2)], prog, beta=1.0)

    def test_same_file_imported_through_two_paths(self, libtree):
        main = libtree / "sub" / "main.grad"
        main.write_text('import "../lib/common.grad" as lib\n'
                        'import "../lib/a.grad"\n'
                        'import "../lib/b.grad" as b\n'
                        'import "../sub/../lib/common.grad" as again\n'
                        "grad | lib.smooth | fa | b.fb | again.smooth(0.1) | scale(beta)\n")
        prog = gradpipe.load(main)
        assert set(prog.hyperparams) == {"lr", "beta"}
        assert {"main/smooth/ema", "main/fa/smooth/ema", "main/fb/smooth/ema"} <= set(op_nodes(prog))

    def test_import_errors(self, libtree):
        main = libtree / "main.grad"
        main.write_text('import "lib/missing.grad"\ngrad | sign\n')
        with pytest.raises(gradpipe.GradError, match="cannot find the imported file 'lib/missing.grad'"):
            gradpipe.load(main)
        (libtree / "x.grad").write_text('import "y.grad"\n')
        (libtree / "y.grad").write_text('import "x.grad"\n')
        main.write_text('import "x.grad"\ngrad | sign\n')
        with pytest.raises(gradpipe.GradError, match="import cycle"):
            gradpipe.load(main)
        main.write_text('import "lib/common.grad" as lib\ngrad | lib.smoth\n')
        with pytest.raises(gradpipe.GradError, match="unknown name 'smoth'"):
            gradpipe.load(main)
        main.write_text('import "lib/common.grad" as lib\ngrad | smooth\n')
        with pytest.raises(gradpipe.GradError, match="unknown name 'smooth'"):
            gradpipe.load(main)

    def test_conflicting_hparam_declarations(self, libtree):
        (libtree / "other.grad").write_text("hparam beta = 0.5 in [0, 1)\n")
        main = libtree / "main.grad"
        main.write_text('import "lib/common.grad" as lib\nimport "other.grad" as o\ngrad | lib.smooth\n')
        with pytest.raises(gradpipe.GradError, match="hyperparameter 'beta' is declared differently"):
            gradpipe.load(main)

    def test_hash_follows_imported_files(self, libtree):
        main = libtree / "main.grad"
        main.write_text('import "lib/common.grad" as lib\ngrad | lib.smooth\n')
        h1 = gradpipe.load(main).hash
        (libtree / "lib" / "common.grad").write_text(
            "hparam beta = 0.7 in [0, 1)\ndef smooth(b=beta) = ema(b)\n")
        assert gradpipe.load(main).hash != h1


# ------------------------------------------------------------------------ routes
def fake(name, *shape):
    return (name, torch.zeros(*shape))


PARAMS = [fake("enc.0.weight", 5, 5), fake("enc.1.weight", 20, 20), fake("enc.0.bias", 5), fake("dec.weight", 4, 4),
          fake("scale", ()), fake("dec.bias", 4), fake("emb", 100, 3)]


class TestRoutes:
    def test_labels(self):
        prog = gradpipe.compile('route "*.bias" or ndim < 2: grad | sign\n'
                                "route /^enc\\.\\d+\\.weight$/ and not numel > 100: grad | adam\n"
                                "route default: grad | momentum(0.9)\n")
        assert [r.label for r in prog.routes] == ['"*.bias"orndim<2', "/^enc\\.\\d+\\.weight$/andnotnumel>100",
                                                  "default"]
        assert prog.assign_routes(PARAMS) == [
            "/^enc\\.\\d+\\.weight$/andnotnumel>100", "default", '"*.bias"orndim<2', "default",
            '"*.bias"orndim<2', '"*.bias"orndim<2', "default"]

    def test_single_pipeline_is_route_main(self):
        prog = gradpipe.compile("grad | adam")
        assert [r.label for r in prog.routes] == ["main"]
        assert prog.assign_routes(PARAMS) == ["main"] * len(PARAMS)
        assert prog.assign_routes([(None, torch.zeros(2))]) == ["main"]

    @pytest.mark.parametrize("sel,expected", [
        ('"*.weight"', ["enc.0.weight", "enc.1.weight", "dec.weight"]),
        ('"enc.*"', ["enc.0.weight", "enc.1.weight", "enc.0.bias"]),
        ('"enc.?.bias"', ["enc.0.bias"]),
        ("/bias$/", ["enc.0.bias", "dec.bias"]),
        ("/^enc\\.1/", ["enc.1.weight"]),
        ("/w/", ["enc.0.weight", "enc.1.weight", "dec.weight"]),  # regex: search, not full match
        ("ndim == 2", ["enc.0.weight", "enc.1.weight", "dec.weight", "emb"]),
        ("ndim != 2", ["enc.0.bias", "scale", "dec.bias"]),
        ("ndim < 1", ["scale"]),
        ("ndim <= 1", ["enc.0.bias", "scale", "dec.bias"]),
        ("numel > 100", ["enc.1.weight", "emb"]),
        ("numel >= 300", ["enc.1.weight", "emb"]),
        ("numel == 1", ["scale"]),
        ('"*.bias" or ndim < 1', ["enc.0.bias", "scale", "dec.bias"]),
        ('"enc.*" and ndim >= 2', ["enc.0.weight", "enc.1.weight"]),
        ('not "enc.*"', ["dec.weight", "scale", "dec.bias", "emb"]),
        ('"enc.*" and not "*.bias"', ["enc.0.weight", "enc.1.weight"]),
        ('"scale" or "dec.*" and ndim == 1', ["scale", "dec.bias"]),  # and binds tighter than or
        ('("scale" or "dec.*") and ndim == 1', ["dec.bias"]),
        ("not not ndim == 2", ["enc.0.weight", "enc.1.weight", "dec.weight", "emb"]),
    ])
    def test_selectors(self, sel, expected):
        prog = gradpipe.compile(f"route {sel}: grad | sign\nroute default: grad | adam")
        sel_label = prog.routes[0].label
        got = [name for (name, _), label in zip(PARAMS, prog.assign_routes(PARAMS)) if label == sel_label]
        assert got == expected

    def test_overlap_is_an_error(self):
        prog = gradpipe.compile("route ndim >= 2: grad | adam\nroute numel > 50: grad | sign\nroute default: grad")
        with pytest.raises(gradpipe.GradError, match=r"2 parameter\(s\) match more than one route: enc.1.weight, emb"):
            prog.assign_routes(PARAMS)

    def test_uncovered_is_an_error(self):
        prog = gradpipe.compile("route ndim >= 2: grad | adam")
        with pytest.raises(gradpipe.GradError, match=r"3 parameter\(s\) match no route: enc.0.bias, scale, dec.bias"):
            prog.assign_routes(PARAMS)

    def test_name_selector_needs_names(self):
        prog = gradpipe.compile('route "*.bias": grad | adam\nroute default: grad')
        with pytest.raises(gradpipe.GradError, match="no names"):
            prog.assign_routes([(None, torch.zeros(3))])
        # shape predicates work without names
        prog = gradpipe.compile("route ndim >= 2: grad | adam\nroute default: grad")
        assert prog.assign_routes([(None, torch.zeros(3)), (None, torch.zeros(2, 2))]) == ["default", "ndim>=2"]

    def test_default_cannot_be_combined(self):
        e = error("route default or ndim > 1: grad | adam")
        assert "'default' cannot be combined" in str(e)

    def test_optimizer_routes_named_parameters(self):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
        opt = gradpipe.Optimizer(model.named_parameters(), 'route "*.bias": grad | sign\n'
                                 "route default: grad | scale(0.5)", lr=1.0)
        routes = {n: opt.route_of(p) for n, p in model.named_parameters()}
        assert routes == {"0.weight": "default", "0.bias": '"*.bias"', "1.weight": "default", "1.bias": '"*.bias"'}
        for p in model.parameters():
            p.grad = torch.full_like(p, -3.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        for (n, p), b in zip(model.named_parameters(), before):
            expected = 1.0 if n.endswith("bias") else 1.5
            assert torch.allclose(p - b, torch.full_like(p, expected))

    def test_route_state_names_carry_the_label(self):
        prog = gradpipe.compile("route ndim >= 2: grad | adam\nroute default: grad | ema")
        assert sorted(prog.state_buffers()) == ["default/ema.m", "ndim>=2/adam.m", "ndim>=2/adam.v"]
        assert prog.state_bytes_per_param("ndim>=2") == 8 and prog.state_bytes_per_param("default") == 4


# ------------------------------------------------------------------------ hash and canonical form
class TestHash:
    BASE = "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1) | adam(b1, 0.999)\n"
    SAME = [
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1) | adam(b1, 0.999)",
        "hparam   b1=0.9   in [ 0 , 1 )\n\n\ngrad|clip_norm( 1 )|adam(b1,0.999)\n",
        "# Adam with clipping\nhparam b1 = 0.9 in [0, 1)  # beta 1\ngrad\n  | clip_norm(1)   # clip\n"
        "  | adam(b1, 0.999)\n",
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1,) | adam(b1, 0.999,)\n",
        "\n\nhparam b1 = 0.9 in [0, 1)\r\ngrad | clip_norm(1) | adam(b1, 0.999)\r\n\n",
    ]
    DIFFERENT = [
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1) | adam(b1, 0.99)\n",
        "hparam b1 = 0.8 in [0, 1)\ngrad | clip_norm(1) | adam(b1, 0.999)\n",
        "hparam b1 = 0.9 in [0, 1]\ngrad | clip_norm(1) | adam(b1, 0.999)\n",
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(2) | adam(b1, 0.999)\n",
        "hparam b1 = 0.9 in [0, 1)\ngrad | adam(b1, 0.999) | clip_norm(1)\n",
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1) | adam(b1, 0.999) | sign\n",
        "hparam b1 = 0.9 in [0, 1)\ngrad | clip_norm(1, scope=tensor) | adam(b1, 0.999)\n",
    ]

    @pytest.mark.parametrize("src", SAME)
    def test_equal_for_equivalent_layouts(self, src):
        base = gradpipe.compile(self.BASE)
        prog = gradpipe.compile(src)
        assert prog.hash == base.hash
        assert re.fullmatch(r"[0-9a-f]{16}", prog.hash)

    def test_canonical_is_formatted_source(self):
        for src in (self.SAME[0], self.SAME[3]):
            assert gradpipe.compile(src).canonical == self.BASE
        prog = gradpipe.compile(self.SAME[1])
        assert gradpipe.compile(prog.canonical).hash == prog.hash
        assert gradpipe.compile(prog.canonical).canonical == prog.canonical

    @pytest.mark.parametrize("src", DIFFERENT)
    def test_different_for_different_pipelines(self, src):
        assert gradpipe.compile(src).hash != gradpipe.compile(self.BASE).hash

    def test_all_builtins_have_distinct_hashes(self):
        hashes = {n: gradpipe.load(n).hash for n in gradpipe.builtin_names()}
        assert len(set(hashes.values())) == len(hashes), hashes

    def test_hash_is_deterministic(self):
        assert gradpipe.load("scalpel").hash == gradpipe.load("scalpel").hash


# ------------------------------------------------------------------------ explain and drawing
def _state_bytes(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"state: (\d+) bytes per parameter", text)]


class TestExplain:
    def test_content(self):
        prog = gradpipe.compile("hparam wd = 0.01 in [0, 1]\nlet g = grad | clip_norm(1)\n"
                                "g | add((g | ema)) | project_orthogonal((g | ema)) | adam | decay(wd) | scale(1 - 0.5)"
                                " | scale(1)")
        text = prog.explain()
        assert f"(hash {prog.hash})" in text
        assert "wd = 0.01 in [0, 1]" in text
        assert "lr = 0.001" in text
        for n in nodes(prog):
            assert n in text
        assert "state: m, v (8 B/param)" in text
        assert _state_bytes(text) == [12]
        assert "main/g/clip_norm: clip_norm" in text and "(scope=global)" in text
        assert "main/project_orthogonal: project_orthogonal" in text
        assert "CSE: main/project_orthogonal/ema merged into main/add/ema" in text
        assert "folded: 1 - 0.5 -> 0.5" in text
        assert "folded: scale(1) is the identity" in text
        assert "reads: grad" in text
        assert "update u = main/scale" in text

    def test_tensor_scope_and_no_reductions(self):
        assert "reductions: none" in gradpipe.compile("grad | adam").explain()
        assert "none applied" in gradpipe.compile("grad | adam").explain()
        text = gradpipe.compile("grad | clip_norm(1, scope=tensor)").explain()
        assert "(tensor)" in text or "scope=tensor" in text

    def test_routes_are_explained_separately(self):
        text = gradpipe.compile("route ndim >= 2: grad | adam\nroute default: grad | sign").explain()
        assert "route ndim>=2:" in text and "route default:" in text
        assert _state_bytes(text) == [8, 0]

    def test_reads(self):
        text = gradpipe.compile("grad | add(0.1 * param) | scale(lr)").explain()
        assert re.search(r"reads: .*grad", text) and "param" in text.split("reads:")[1]

    @pytest.mark.parametrize("name", BUILTIN_NAMES)
    def test_every_builtin_compiles_and_runs(self, name):
        prog = gradpipe.load(name)
        text = prog.explain()
        assert f"(hash {prog.hash})" in text
        if "state for a" not in text:  # state the size of the parameter: one figure per route
            assert _state_bytes(text) == [prog.state_bytes_per_param(r.label) for r in prog.routes]
        if prog.losses or {"samples", "loss", "grad_at"} & prog.reads:
            return  # stepped with named losses, per-example gradients or a closure: test_runtime runs these
        params = T.make_params()
        # by name: a pipeline may route by name (muon_adamw: embeddings and heads to AdamW)
        opt = gradpipe.Optimizer([(f"p{i}", p) for i, p in enumerate(params)], name, backend="eager", lr=1e-2)
        ups = T.run_optimizer(opt, params, T.GRADS[:2])
        assert all(np.all(np.isfinite(u)) for us in ups for u in us)
        for p in params:
            assert set(opt.state[p]) - {"step"} <= set(prog.state_buffers())

    @pytest.mark.parametrize("name,nbytes", [("adam", 8), ("adamw", 8), ("lion", 4), ("momentum", 4),
                                               ("sgd", 0), ("rmsprop", 4), ("rprop", 8), ("asgd", 4)])
    def test_builtin_state_bytes(self, name, nbytes):
        text = gradpipe.load(name).explain()
        assert _state_bytes(text) == [nbytes], text
        assert f"state: {nbytes} bytes per parameter in fp32" in text

    def test_builtin_names(self):
        names = gradpipe.builtin_names()
        for n in ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rprop", "asgd", "lion", "scalpel"):
            assert n in names


class TestDraw:
    def test_dot(self, tmp_path):
        prog = gradpipe.load("scalpel")
        out = prog.draw(tmp_path / "g.dot")
        text = out.read_text()
        assert text.startswith("digraph")
        for n in nodes(prog):
            assert f'"{n}"' in text
        assert 'label="ref"' in text or "label=ref" in text
        assert "state: m" in text
        assert text == prog.to_dot()

    def test_svg(self, tmp_path):
        prog = gradpipe.compile("route ndim >= 2: grad | project_orthogonal(ema) | adam\nroute default: grad | sign")
        out = prog.draw(tmp_path / "g.svg")
        svg = out.read_text()
        assert "<svg" in svg
        assert "project_orthogonal/ema" in svg
        assert "route ndim&gt;=2" in svg or "route ndim>=2" in svg

    def test_unsupported_format(self, tmp_path):
        with pytest.raises(ValueError, match="unsupported picture format"):
            gradpipe.compile("grad | adam").draw(tmp_path / "g.jpg")
