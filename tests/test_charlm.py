"""Tests for the ``charlm`` task: corpus, vocabulary and split, model, determinism, learning."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

import gradpipe
from gradpipe.tasks import CharLMTask, EvalRecord, TaskError, get_task, run_task
from gradpipe.tasks.charlm import CORPUS_MODULES, MIN_COUNT, CharMLP, load_corpus, windows


def test_corpus_vocabulary_and_split() -> None:
    corpus = load_corpus()
    assert corpus is load_corpus()  # cached
    assert corpus.modules == CORPUS_MODULES == tuple(sorted(CORPUS_MODULES))
    texts = [pathlib.Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in CORPUS_MODULES]
    full = "".join(texts)
    n = corpus.train.numel() + corpus.val.numel()
    assert n == len(full) and 100_000 < n < 1_000_000
    assert corpus.train.numel() == round(0.9 * n)  # contiguous 90/10 split
    # vocabulary: id 0 is the unknown character, then the frequent characters in sorted order
    assert corpus.chars[0] == "\x00" and list(corpus.chars[1:]) == sorted(corpus.chars[1:])
    assert 60 <= corpus.vocab_size <= 120
    for c in "abcxyzABC0123 \n()[]{}:_=.'\"#":
        assert c in corpus.chars
    counts = {c: full.count(c) for c in set(full)}
    assert all(counts[c] >= MIN_COUNT for c in corpus.chars[1:])
    rare = {c for c, k in counts.items() if k < MIN_COUNT}
    ids = torch.cat([corpus.train, corpus.val])
    assert int((ids == 0).sum()) == sum(counts[c] for c in rare)
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < corpus.vocab_size
    # the ids spell the text (rare characters as the unknown one)
    expected = "".join(c if c not in rare else "\x00" for c in full)
    assert corpus.decode(corpus.train[:500]) == expected[:500]
    assert corpus.decode(corpus.val[-500:]) == expected[-500:]
    assert torch.equal(corpus.encode(full[1000:1400]), ids[1000:1400])


def test_windows_and_batches() -> None:
    ids = torch.arange(100)
    x, y = windows(ids, torch.tensor([5, 40, 99]), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [35, 36, 37, 38, 39], [94, 95, 96, 97, 98]]
    assert y.tolist() == [5, 40, 99]
    task = CharLMTask(batch_size=8, context=12)
    batches = list(task.batches(seed=0, steps=3))
    assert len(batches) == 3
    train = load_corpus().train
    for x, y in batches:
        assert x.shape == (8, 12) and y.shape == (8,) and x.dtype == torch.int64
        for row, target in zip(x, y):  # every window is a contiguous slice of the training text
            hits = (train.unfold(0, 13, 1) == torch.cat([row, target.reshape(1)])).all(dim=1)
            assert bool(hits.any())
    again = list(task.batches(seed=0, steps=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = next(iter(task.batches(seed=1, steps=1)))
    assert not torch.equal(other[0], batches[0][0])


def test_model_and_eval_set() -> None:
    task = CharLMTask()
    state = torch.get_rng_state()
    m1, m2, m3 = task.make_model(0), task.make_model(0), task.make_model(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(m1, CharMLP)
    assert [n for n, _ in m1.named_parameters()] == ["embed.weight", "hidden.weight", "hidden.bias",
                                                    "out.weight", "out.bias"]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(m1.embed.weight, m3.embed.weight)
    v = load_corpus().vocab_size
    assert m1.embed.weight.shape == (v, 16) and m1.hidden.weight.shape == (128, 32 * 16)
    assert float(m1.embed.weight.detach().std()) == pytest.approx(1.0, abs=0.1)
    x, y = task.eval_set()
    assert x.shape == (2048, 32) and y.shape == (2048,)
    assert torch.equal(x, CharLMTask().eval_set()[0])  # fixed, the same for every task and seed
    metrics = task.evaluate(m1)
    assert set(metrics) == {"val_loss", "val_bpc", "val_accuracy"}
    # an untrained model predicts nearly uniformly: about ln(vocab) nats per character
    assert metrics["val_loss"] == pytest.approx(math.log(v), abs=0.3)
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert CharLMTask(eval_windows=100).eval_set()[0].shape == (100, 32)


def test_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    make = lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)  # noqa: E731
    a = run_task(CharLMTask(), make, steps=20, seed=0)
    b = run_task(CharLMTask(), make, steps=20, seed=0)
    c = run_task(CharLMTask(), make, steps=20, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.losses == b.losses and a.metrics == b.metrics
    assert a.losses != c.losses


@pytest.mark.parametrize("name, make", [
    ("adam", lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)),
    ("sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.3)),
    ("gradpipe adam", lambda m: gradpipe.Optimizer(m.named_parameters(), "adam", backend="eager", lr=3e-3)),
])
def test_validation_loss_falls(name: str, make) -> None:
    task = CharLMTask()
    initial = task.evaluate(task.make_model(0))["val_loss"]
    evals: list[EvalRecord] = []
    result = run_task(task, make, steps=150, seed=0, eval_every=50, on_eval=evals.append)
    curve = [initial] + [e.metrics["val_loss"] for e in evals]
    assert all(b < a for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < initial - 1.2, curve  # from ~4.55 nats (uniform) to well under 3.4
    assert result.metrics["val_accuracy"] > 0.25
    assert result.final_loss < result.losses[0] - 1.2


def test_sample_grads_average_to_the_batch_gradient() -> None:
    task = CharLMTask(batch_size=6, context=8, hidden=16)
    model = task.make_model(0)
    batch = next(iter(task.batches(0, 1)))
    per = task.sample_grads(model, batch)
    loss = task.losses(model, batch)["loss"]
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    assert set(per) == set(grads)
    for n, g in grads.items():
        assert per[n].shape == (6, *g.shape)
        torch.testing.assert_close(per[n].mean(0), g, rtol=1e-5, atol=1e-6)


def test_options() -> None:
    task = get_task("charlm", batch_size="32", context=8)
    assert isinstance(task, CharLMTask) and task.batch_size == 32 and task.context == 8
    assert task.options() == {"batch_size": 32, "context": 8, "embed": 16, "hidden": 128, "eval_windows": 2048,
                              "holdout": "val"}
    assert (task.name, task.metric, task.higher_is_better, task.loss_names) == ("charlm", "val_loss", False, ("loss",))
    for bad in ({"context": 0}, {"batch_size": "many"}, {"hidden": 2.5}):
        with pytest.raises(TaskError):
            CharLMTask(**bad)
    with pytest.raises(TaskError, match="context must be less than"):
        CharLMTask(context=10**7).make_model(0)


def test_missing_sources_are_a_task_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradpipe.tasks.charlm as charlm

    monkeypatch.setattr(charlm, "_source", lambda module: None)
    charlm.load_corpus.cache_clear()
    try:
        with pytest.raises(TaskError, match="needs the source files .* none of them"):
            charlm.load_corpus()
    finally:
        monkeypatch.undo()
        charlm.load_corpus.cache_clear()
    assert charlm.load_corpus().vocab_size > 60
