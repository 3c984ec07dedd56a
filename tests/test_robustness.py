"""Edge cases found in review: each would otherwise leak a non-GradError, corrupt
state, or update parameters it should not touch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import gradpipe


def _param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("src, message", [
    ("hparam a = (-8) ** 0.5\ngrad", "not a real number"),
    ("hparam a = 10 ** 5000 in [0, 1]\ngrad", "too large"),
    ("grad | scale(2 ** 100000)", "not a finite real number"),
    ("grad | scale(10 ** 1000)", "not a finite real number"),
    ("grad | scale(1e308 * 10)", "not a finite real number"),
])
def test_constant_arithmetic_that_is_not_a_finite_real_is_a_grad_error(src, message):
    with pytest.raises(gradpipe.GradError, match=message):
        gradpipe.compile(src)


def test_an_argument_undefined_at_some_step_is_a_grad_error_at_its_node():
    p = _param(1.0)
    opt = gradpipe.Optimizer([p], "grad | scale(1 / (step - 1))")
    p.grad = torch.ones(1, dtype=torch.float64)
    with pytest.raises(gradpipe.GradError) as e:
        opt.step()
    assert (e.value.line, e.value.column) == (1, 8)
    assert "step 1" in e.value.message


def test_a_failed_step_changes_nothing():
    p = _param(1.0, 2.0)
    opt = gradpipe.Optimizer([p], "grad | ema(beta=step / 3)", lr=0.1)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    opt.step()
    before = p.detach().clone(), opt.state[p]["step"].item(), opt.state[p]["main/ema.m"].clone()
    with pytest.raises(gradpipe.GradError, match="step 3"):
        opt.step()  # beta = 1 is outside [0, 1)
    assert torch.equal(p.detach(), before[0])
    assert opt.state[p]["step"].item() == before[1] == 2
    assert torch.equal(opt.state[p]["main/ema.m"], before[2])


def test_long_source_text_is_compiled_not_looked_up_as_a_file():
    p = _param(1.0)
    opt = gradpipe.Optimizer([p], "grad" + " | scale(1.0)" * 40)
    assert opt.program.name == "<string>"


def test_a_builtin_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "sgd").mkdir()
    monkeypatch.chdir(tmp_path)
    opt = gradpipe.Optimizer([_param(1.0)], "sgd")
    assert opt.program.path.endswith("sgd.grad")


def test_multi_loss_step_skips_parameters_no_loss_reaches():
    a, b = _param(1.0), _param(1.0)
    opt = gradpipe.Optimizer([a, b], "grad | decay(0.5)", lr=0.1)
    opt.step(losses={"main": (a * 2).sum()})
    assert b.item() == 1.0 and "step" not in opt.state[b]
    assert a.item() == pytest.approx(1.0 - 0.1 * (2.0 + 0.5))


def test_node_state_loads_when_its_arguments_read_the_loss():
    p = _param(1.0, 2.0)
    opt = gradpipe.Optimizer([p], "grad | noise(eta=0.01 * loss, seed=3)", lr=0.1)

    def closure():
        p.grad = torch.ones(2, dtype=torch.float64)
        return torch.tensor(2.0)
    opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = gradpipe.Optimizer([p], "grad | noise(eta=0.01 * loss, seed=3)", lr=0.1)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again._node_state["main/noise"]["generator"].get_state(),
                       opt._node_state["main/noise"]["generator"].get_state())


def test_ranges_of_loss_dependent_arguments_are_checked_with_the_real_loss():
    p = _param(1.0)
    opt = gradpipe.Optimizer([p], "grad | clip_norm(loss - 5)")  # compiles: the loss is not known yet

    def closure(value):
        def f():
            p.grad = torch.ones(1, dtype=torch.float64)
            return torch.tensor(value)
        return f
    opt.step(closure(6.0))
    with pytest.raises(gradpipe.GradError, match="max=-4"):
        opt.step(closure(1.0))


def test_step_counter_stays_on_the_cpu_after_loading():
    p = _param(1.0)
    opt = gradpipe.Optimizer([p], "adam")
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    again = gradpipe.Optimizer([p], "adam")
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["step"].device.type == "cpu"
    assert again.state[p]["step"] is not opt.state[p]["step"]  # loading copies, never aliases


def test_checkpoint_schema_counts_buffers_that_depend_on_hyperparameters():
    p = _param(1.0)
    sgd = gradpipe.Optimizer([p], "sgd", momentum=0.9)
    p.grad = torch.ones(1, dtype=torch.float64)
    sgd.step()
    assert "main/momentum.buf" in sgd.state[p]
    gradpipe.Optimizer([p], "momentum").load_state_dict(sgd.state_dict())  # same ops, same buffers
    with pytest.raises(gradpipe.GradError, match="another pipeline"):
        gradpipe.Optimizer([p], "grad | sign").load_state_dict(sgd.state_dict())


def test_numpy_numbers_are_accepted_as_hyperparameters():
    opt = gradpipe.Optimizer([_param(1.0)], "adam", lr=np.float32(1e-3), eps=np.float64(1e-8))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_errors_about_the_implicit_lr_point_at_the_file(tmp_path):
    f = tmp_path / "mine.grad"
    f.write_text("grad | sign\n")
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.Optimizer([_param(1.0)], str(f), lr=-1.0)
    assert e.value.path == str(f)


def test_the_caret_line_counts_only_newlines():
    with pytest.raises(gradpipe.GradError) as e:
        gradpipe.compile("\f\ngrad | adma")
    assert "grad | adma" in str(e.value)


def test_an_op_that_fails_mid_step_does_not_advance_the_step_counter():
    p = _param(1.0)
    opt = gradpipe.Optimizer([p], "grad | aegd(loss, lr)", lr=0.1)

    def closure():
        p.grad = torch.ones(1, dtype=torch.float64)
        return torch.tensor(-5.0)  # f + c <= 0: AEGD's energy is undefined
    with pytest.raises(ValueError):
        opt.step(closure)
    assert "step" not in opt.state[p]
    assert p.item() == 1.0
