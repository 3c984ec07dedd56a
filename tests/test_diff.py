"""``gradpipe.compiler.diff`` and ``gradpipe diff A B``: the structural difference of two pipelines."""

from __future__ import annotations

import functools
import json
import pathlib

from hypothesis import given, settings, strategies as st

import gradpipe
from gradpipe.cli import main
from gradpipe.compiler.diff import describe, diff_against_baseline, diff_programs

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(str(p) for p in (REPO / "pipelines").glob("*.grad"))

ADAM = ("hparam lr = 1e-3 in [0, inf)\n"
        "hparam betas = (0.9, 0.999) in [0, 1)\n"
        "grad | adam(betas[0], betas[1]) | decay(0.01)\n")


@functools.lru_cache(maxsize=None)
def _load(path: str) -> gradpipe.Program:
    return gradpipe.load(path)


def _diff(a: str, b: str):
    return diff_programs(gradpipe.compile(a, "a.grad"), gradpipe.compile(b, "b.grad"))


# ------------------------------------------------------------------------ typical edits
def test_inserting_an_op():
    d = _diff(ADAM, ADAM.replace("grad | adam", "grad | clip_norm(1.0) | adam"))
    assert d.nodes_added == {"main/clip_norm": "clip_norm(max=1.0, scope=global) <- main/grad"}
    assert not d.nodes_removed and not d.hyperparams_added and not d.buffers_added
    assert [c.text() for c in d.nodes_changed["main/adam"]] == ["input x: main/grad -> main/clip_norm"]
    assert d.buffers_kept == ["main/adam.m", "main/adam.v"] and d.related
    assert d.to_text() == (
        "--- a.grad  (hash {})\n"
        "+++ b.grad  (hash {})\n"
        "nodes:\n"
        "  + main/clip_norm  clip_norm(max=1.0, scope=global) <- main/grad\n"
        "  ~ main/adam       input x: main/grad -> main/clip_norm\n"
        "related: yes (state in common: main/adam)\n").format(d.a_hash, d.b_hash)


def test_removing_a_stateful_op():
    d = _diff("grad | project_orthogonal(ema) | clip_median | scale(diffgrad)\n",
              "grad | project_orthogonal(ema) | scale(diffgrad)\n")
    assert set(d.nodes_removed) == {"main/clip_median"}
    assert d.buffers_removed == ["main/clip_median.m"]
    assert d.buffers_kept == ["main/diffgrad.m", "main/diffgrad.v", "main/diffgrad.prev",
                              "main/project_orthogonal/ema.m"]
    text = d.to_text()
    assert "  - main/clip_median  clip_median(tau=1.0, geometry=l2, scope=global, reset=false)" in text
    assert "state (what a checkpoint of a carries into b):\n  - main/clip_median.m\n  = 4 buffer(s) kept" in text


def test_changed_arguments_and_hyperparameters():
    edited = ADAM.replace("1e-3 in [0, inf)", "3e-4 in (0, 1]").replace("decay(0.01)", "decay(0.1)")
    d = _diff(ADAM, edited + "hparam eps = 1e-8 in [0, inf)\n")
    assert [c.text() for c in d.nodes_changed["main/decay"]] == ["arg wd: 0.01 -> 0.1"]
    assert [c.text() for c in d.hyperparams_changed["lr"]] == ["default: 0.001 -> 0.0003",
                                                               "range: [0, inf) -> (0, 1]"]
    assert d.hyperparams_added == {"eps": "= 1e-08 in [0, inf)"}
    assert d.buffers_kept == ["main/adam.m", "main/adam.v"] and not d.buffers_added
    assert "  ~ lr   default: 0.001 -> 0.0003\n  ~      range: [0, inf) -> (0, 1]\n" in d.to_text()


def test_routes_added_removed_and_reordered():
    a = 'route ndim >= 2: grad | adam\nroute "*.bias": grad | sign\nroute default: grad\n'
    b = 'route "*.bias": grad | sign\nroute ndim >= 2: grad | adam\nroute ndim == 0: grad | lion\n'
    d = _diff(a, b)
    assert d.routes_added == ["ndim==0"] and d.routes_removed == ["default"]
    assert d.route_order.text() == 'route order: ndim>=2, "*.bias" -> "*.bias", ndim>=2'
    assert "ndim==0/lion" in d.nodes_added and "default/grad" in d.nodes_removed
    assert d.buffers_added == ["ndim==0/lion.m"] and d.buffers_kept == ["ndim>=2/adam.m", "ndim>=2/adam.v"]


def test_changed_buffers_reset_a_node():
    d = _diff("grad | rms(0.99, 1e-8, true)\n", "grad | rms(0.99, 1e-8, false)\n")
    assert d.buffers_reset == {"main/rms": "buffers v,g_avg -> v"}
    assert d.buffers_removed == ["main/rms.v", "main/rms.g_avg"] and d.buffers_added == ["main/rms.v"]
    assert d.related  # the node keeps state on both sides
    assert "  ~ main/rms: starts afresh (buffers v,g_avg -> v)" in d.to_text()


def test_unrelated_pipelines():
    d = diff_programs(_load("adam"), _load("lion"))
    assert not d.related and d.relation == "no node keeps state in both"
    assert d.to_text().endswith("related: no (no node keeps state in both)\n")
    assert diff_programs(gradpipe.compile("grad | sign"), gradpipe.compile("grad | clip_norm(1)")).related


def test_comments_and_layout_are_not_differences():
    a = gradpipe.compile(ADAM, "a.grad")
    b = gradpipe.compile("# a comment\n" + ADAM.replace("grad | adam", "grad\n  | adam") + "let unused = sign\n",
                         "b.grad")
    d = diff_programs(a, b)
    assert a.hash != b.hash and d.is_empty
    assert d.to_text().endswith("no structural difference (the sources differ only in what does not change "
                                "the pipeline: comments, layout, unused definitions)\n")


def test_to_dict_is_json_and_mirrors_the_reverse_diff():
    a, b = _load("scalpel"), _load("diffgrad")
    ab, ba = diff_programs(a, b).to_dict(), diff_programs(b, a).to_dict()
    assert json.loads(json.dumps(ab)) == ab
    assert ab["nodes"]["added"].keys() == ba["nodes"]["removed"].keys()
    assert ab["state"]["added"] == ba["state"]["removed"] and ab["state"]["kept"] == ba["state"]["kept"]


def test_diff_against_baseline():
    text, data = diff_against_baseline(_load("adam"), {"adamw": _load("adamw"), "adam again": _load("adam")})
    assert text.startswith("== adamw against the baseline adam ==\n--- adam  (hash ")
    assert "== adam again against the baseline adam ==" in text and "no structural difference" in text
    assert data["baseline"] == "adam" and set(data["pipelines"]) == {"adamw", "adam again"}
    assert data["pipelines"]["adam again"]["is_empty"] and not data["pipelines"]["adamw"]["is_empty"]
    json.dumps(data)


# ------------------------------------------------------------------------ properties over the shipped pipelines
@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SHIPPED))
def test_a_pipeline_has_no_difference_from_itself(path):
    prog = _load(path)
    d = diff_programs(prog, prog)
    assert d.is_empty and d.related
    assert d.buffers_kept == [f"{n}.{b}" for n, s in describe(prog)["state"].items() for b in s["buffers"]]
    assert diff_programs(prog, gradpipe.compile(prog.canonical, prog.path)).is_empty  # its canonical form


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SHIPPED), st.sampled_from(SHIPPED))
def test_diff_is_antisymmetric(pa, pb):
    a, b = _load(pa), _load(pb)
    ab, ba = diff_programs(a, b), diff_programs(b, a)
    assert ab.nodes_added == ba.nodes_removed and ab.nodes_removed == ba.nodes_added
    assert ab.buffers_added == ba.buffers_removed and ab.buffers_kept == ba.buffers_kept
    assert ab.related == ba.related and ab.is_empty == ba.is_empty == (pa == pb or ab.is_empty)


# ------------------------------------------------------------------------ the command line
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_same_pipeline_exits_0(capsys):
    rc, out, err = _run(capsys, "diff", "adam", str(REPO / "pipelines" / "adam.grad"))
    assert rc == 0 and "no structural difference" in out and err == ""


def test_cli_different_pipelines_exit_1(capsys, tmp_path):
    f = tmp_path / "mine.grad"
    f.write_text("grad | clip_norm(1.0) | adam\n")
    rc, out, _ = _run(capsys, "diff", "adam", str(f))
    assert rc == 1
    assert out.splitlines()[:2] == [f"--- adam  (hash {_load('adam').hash})",
                                    f"+++ {f}  (hash {gradpipe.load(f).hash})"]
    assert "  + main/clip_norm" in out
    rc, out, _ = _run(capsys, "diff", "--json", "adam", str(f))
    assert rc == 1 and json.loads(out)["nodes"]["added"]["main/clip_norm"].startswith("clip_norm(")


def test_cli_errors_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.grad"
    bad.write_text("grad | adma\n")
    rc, out, err = _run(capsys, "diff", "adam", str(bad))
    assert rc == 2 and out == ""
    assert f"{bad}:1:8: error: " in err and "did you mean 'adam'?" in err
    rc, _, err = _run(capsys, "diff", "adma", "adam")
    assert rc == 2 and "no pipeline file or built-in pipeline named 'adma'" in err
