"""PyTorch Lightning and the Hugging Face ``Trainer`` take ``gradpipe.Optimizer`` as they take
torch's optimizers (docs/works_with.md; the page's examples run in tests/test_works_with.py).

Each run is checked against the same run with torch's optimizer (Lightning: ``adam`` against
``torch.optim.Adam``; Trainer: ``adamw`` against ``torch.optim.AdamW``), and a run resumed from the
framework's own checkpoint (the optimizer's ``state_dict()`` inside, loaded with
``load_state_dict``) ends bit for bit where the uninterrupted run ends. Both backends; the
compiled one once per framework (torch.compile costs seconds per model shape). The models are
tiny and float64, so the tolerance against torch is that of the other parity tests.
"""

from __future__ import annotations

import logging
import pathlib

import pytest
import torch

import gradpipe

LR = 1e-2
#: float64 models, so that the comparison with torch's optimizer is tight: the two differ by rounding
#: (float32 runs differ by up to about 3e-6 after 8 steps of the BERT model: rounding, amplified by Adam)
DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-12

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- PyTorch Lightning
LIGHTNING_STEPS, LIGHTNING_SAVE = 10, 4


def _lightning_fit(make_opt, root: pathlib.Path, scheduler: bool, ckpt_path: str | None = None):
    """A LightningModule whose configure_optimizers returns ``make_opt(module)`` (with a StepLR
    stepped per step, as a scheduler dict, when ``scheduler``), fitted LIGHTNING_STEPS steps; a
    ModelCheckpoint keeps the checkpoint of every LIGHTNING_SAVE steps. Each step's batch comes
    from the step number, so a resumed run sees the batches the uninterrupted one sees (Lightning
    restarts a plain DataLoader's epoch when it resumes mid-epoch, whatever the optimizer)."""
    import lightning as L

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DTYPE)

        def training_step(self, batch, batch_idx):
            g = torch.Generator().manual_seed(self.global_step)
            x, y = torch.randn(8, 4, generator=g, dtype=DTYPE), torch.randn(8, 1, generator=g, dtype=DTYPE)
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = make_opt(self)
            if not scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0 if ckpt_path is None else 1)  # a resumed run's own weights are overwritten
    module = Regressor()
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=LIGHTNING_SAVE, save_top_k=-1)
    trainer = L.Trainer(max_steps=LIGHTNING_STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=True, callbacks=[every], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=8)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == LIGHTNING_STEPS
    return module, trainer


#: the runs with torch's optimizer, shared by the backends: (framework, scheduler) -> parameters
_TORCH_RUNS: dict[tuple[str, bool], list[torch.Tensor]] = {}


def _lightning_torch(scheduler: bool, root: pathlib.Path) -> list[torch.Tensor]:
    if ("lightning", scheduler) not in _TORCH_RUNS:
        module, _ = _lightning_fit(lambda m: torch.optim.Adam(m.parameters(), lr=LR), root, scheduler)
        _TORCH_RUNS["lightning", scheduler] = _params(module)
    return _TORCH_RUNS["lightning", scheduler]


@pytest.mark.parametrize("backend, scheduler", [("eager", False), ("eager", True), ("compiled", True)])
def test_lightning_trains_as_with_torch_adam_and_resumes_from_its_checkpoint(backend, scheduler, tmp_path) -> None:
    pytest.importorskip("lightning")
    want = _lightning_torch(scheduler, tmp_path / "torch")

    def make(m):
        return gradpipe.Optimizer(m.named_parameters(), "adam", lr=LR, backend=backend)

    module, trainer = _lightning_fit(make, tmp_path / "run", scheduler)
    opt = trainer.optimizers[0]
    assert isinstance(opt, gradpipe.Optimizer) and opt.backend == backend
    assert module.net[0].weight.dtype == DTYPE  # Lightning's default precision leaves the dtype alone
    got = _params(module)
    _close(got, want)
    if scheduler:
        assert opt.param_groups[0]["lr"] == LR * 0.5 ** (LIGHTNING_STEPS // 3)

    ckpt = tmp_path / "run" / f"epoch=0-step={LIGHTNING_SAVE}.ckpt"
    resumed, trainer = _lightning_fit(make, tmp_path / "resumed", scheduler, ckpt_path=str(ckpt))
    for p, q in zip(_params(resumed), got):
        assert torch.equal(p, q)
    assert float(trainer.optimizers[0].state[resumed.net[0].weight]["step"]) == LIGHTNING_STEPS


# --------------------------------------------------------------------------- Hugging Face Trainer
HF_STEPS, HF_SAVE = 8, 4


@pytest.fixture
def hf_env(monkeypatch):
    """No network, telemetry, trackers or progress bars (the Trainer writes under tmp_path)."""
    pytest.importorskip("transformers")
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                 "WANDB_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    import transformers
    transformers.logging.set_verbosity_error()


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(DTYPE)


def _hf_data() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": int(torch.randint(0, 2, (), generator=g))}
            for _ in range(32)]


def _hf_train(out: pathlib.Path, make_opt=None, resume: str | None = None, **trainer_kw):
    """A tiny BERT classifier trained HF_STEPS steps by a Trainer (a checkpoint every HF_SAVE),
    with ``optimizers=(make_opt(model), get_linear_schedule_with_warmup(...))``, or with
    ``trainer_kw`` (optimizer_cls_and_kwargs) when ``make_opt`` is None."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup
    model = _bert()
    if make_opt is not None:
        opt = make_opt(model)
        trainer_kw["optimizers"] = (opt, get_linear_schedule_with_warmup(opt, 2, HF_STEPS))
    args = TrainingArguments(output_dir=str(out), max_steps=HF_STEPS, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=HF_SAVE, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                             weight_decay=0.1)  # for the optimizer the Trainer builds
    trainer = Trainer(model=model, args=args, train_dataset=_hf_data(), **trainer_kw)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == HF_STEPS
    return model, trainer


def _hf_torch(out: pathlib.Path) -> list[torch.Tensor]:
    if ("hf", True) not in _TORCH_RUNS:
        model, _ = _hf_train(out, lambda m: torch.optim.AdamW(m.parameters(), lr=LR))
        _TORCH_RUNS["hf", True] = _params(model)
    return _TORCH_RUNS["hf", True]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_hf_trainer_trains_as_with_torch_adamw_and_resumes_from_its_checkpoint(backend, hf_env, tmp_path) -> None:
    want = _hf_torch(tmp_path / "torch")

    def make(m):
        return gradpipe.Optimizer(m.named_parameters(), "adamw", lr=LR, backend=backend)

    model, trainer = _hf_train(tmp_path / "run", make)
    opt = trainer.optimizer.optimizer  # the Trainer wraps it in accelerate's AcceleratedOptimizer
    assert isinstance(opt, gradpipe.Optimizer) and opt.backend == backend
    got = _params(model)
    _close(got, want)
    saved = torch.load(tmp_path / "run" / f"checkpoint-{HF_SAVE}" / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["decoupled_weight_decay"] is True  # as torch.optim.AdamW saves it

    resumed, trainer = _hf_train(tmp_path / "resumed", make, resume=str(tmp_path / "run" / f"checkpoint-{HF_SAVE}"))
    for p, q in zip(_params(resumed), got):
        assert torch.equal(p, q)


def test_hf_trainer_builds_gradpipe_from_optimizer_cls_and_kwargs(hf_env, tmp_path) -> None:
    """The Trainer builds the optimizer on its decay / no-decay param groups (weight_decay from
    its arguments, 0 for biases and LayerNorm) and schedules it itself."""
    kw = {"lr": LR}
    model, trainer = _hf_train(tmp_path / "ours", optimizer_cls_and_kwargs=(
        gradpipe.Optimizer, {"pipeline": "adamw", "backend": "eager", **kw}))
    ref, _ = _hf_train(tmp_path / "torch", optimizer_cls_and_kwargs=(torch.optim.AdamW, kw))
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
    _close(_params(model), _params(ref))
