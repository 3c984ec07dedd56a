"""The ``tinylm`` task: a tiny decoder-only transformer language model of Python source.

**Problem.** Next-character prediction on the ``charlm`` task's corpus: the
source of a fixed list of standard-library modules read from the running
Python (:func:`gradpipe.tasks.charlm.load_corpus`; nothing downloaded), its
character vocabulary (95 ids on Python 3.11) and its contiguous 90/10 split into
training and validation text. Where ``charlm`` is an MLP over a fixed window,
this is the model family optimizers for language models are tuned on: layer
norms, attention and embeddings, whose gradients are heavy-tailed and
badly scaled across parameters, where adaptive methods are known to help (J.
Zhang, S. P. Karimireddy, A. Veit et al., "Why are Adaptive Methods Good for
Attention Models?", NeurIPS 2020). Measured at the defaults (seed 0, 500
steps): Adam at lr 3e-3 reaches a ``val_loss`` of 1.80, SGD with momentum 0.9
at lr 0.3 1.90, plain SGD at lr 0.1 2.50 (the untrained model: 4.4).

**Model** (a GPT-style pre-norm decoder: A. Vaswani, N. Shazeer, N. Parmar et
al., "Attention Is All You Need", NeurIPS 2017; A. Radford, J. Wu, R. Child et
al., "Language Models are Unsupervised Multitask Learners", 2019)::

    h_0 = E[x] + P[0..T-1]
    h <- h + W_o Attn_causal(LN(h))          (``heads`` heads of width d/heads)
    h <- h + W_2 GELU(W_1 LN(h))              (width 4d)
    logits = U LN(h)

``layers`` blocks, no dropout, no weight tying. Defaults: d = 64, 4 heads, 2
layers, context 32: 114k parameters with 95 characters. Every layer has
PyTorch's default initialisation (:func:`gradpipe.tasks.init.reset_default`),
drawn from a generator seeded by the run's seed.

**Training.** Each batch is ``batch_size`` (64) windows of ``context + 1``
characters at seeded random positions of the training text; the loss is the
mean cross-entropy of every next character in the window (``context`` targets
per window). Default 500 steps.

**Metrics.** On ``eval_windows`` (256) fixed validation windows, every position
scored: ``val_loss`` (nats per character, the headline, lower is better),
``val_bpc`` (bits per character) and ``val_accuracy`` (top-1). The
``holdout="tune"`` option holds out a seeded fifth of the training text as in
``charlm`` and scores windows there instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import TaskError
from .charlm import CharLMTask
from .init import seeded
from .options import holdout_option, int_option

__all__ = ["TinyTransformer", "TinyLMTask"]

_INIT_SEED_OFFSET = 0x71A7_5EED


class _Block(nn.Module):
    """One pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.utils.skip_init(nn.Linear, d, 3 * d)
        self.proj = nn.utils.skip_init(nn.Linear, d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.utils.skip_init(nn.Linear, d, 4 * d)
        self.out = nn.utils.skip_init(nn.Linear, 4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(h)).split(d, dim=-1))
        # softmax(q k^T / sqrt(d_head)) v, each position attending to itself and those before it;
        # written out (not F.scaled_dot_product_attention, which vmap runs one example at a time)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        a = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyTransformer(nn.Module):
    """A decoder-only transformer: ``forward(x)`` maps ``(B, T)`` ids, ``T <= context``, to
    ``(B, T, vocab)`` logits of the character after each position (see the module docstring).

    Parameter names: ``embed.weight``, ``pos.weight``, ``blocks.<i>.{ln1,qkv,proj,ln2,fc,out}.*``,
    ``ln.weight``, ``ln.bias``, ``head.weight``, ``head.bias``.
    """

    def __init__(self, vocab: int, context: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.utils.skip_init(nn.Embedding, vocab, d)
        self.pos = nn.utils.skip_init(nn.Embedding, context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.utils.skip_init(nn.Linear, d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos.weight[: x.shape[-1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


class TinyLMTask(CharLMTask):
    """Next-character prediction with :class:`TinyTransformer` (see the module docstring).

    The corpus, batch positions, evaluation windows and ``holdout`` option are
    :class:`~gradpipe.tasks.charlm.CharLMTask`'s; an example is ``context + 1``
    characters, ``x`` the first ``context`` and ``y`` the last ``context``.

    Options:
        batch_size: windows per minibatch (default 64).
        context: characters per window (default 32).
        d_model: width of the residual stream (default 64).
        heads: attention heads, dividing ``d_model`` (default 4).
        layers: transformer blocks (default 2).
        eval_windows: validation windows scored by :meth:`evaluate` (default 256).
        holdout: ``"val"`` or ``"tune"`` (:mod:`gradpipe.tasks.options`).
    """

    name = "tinylm"  # metric val_loss, one loss: CharLMTask's
    default_steps = 500

    def __init__(self, batch_size: int = 64, context: int = 32, d_model: int = 64, heads: int = 4,
                 layers: int = 2, eval_windows: int = 256, holdout: str = "val") -> None:
        self.batch_size = int_option(self.name, "batch_size", batch_size)
        self.context = int_option(self.name, "context", context)
        self.d_model = int_option(self.name, "d_model", d_model)
        self.heads = int_option(self.name, "heads", heads)
        self.layers = int_option(self.name, "layers", layers)
        self.eval_windows = int_option(self.name, "eval_windows", eval_windows)
        self.holdout = holdout_option(self.name, holdout)
        if self.d_model % self.heads:
            raise TaskError(f"task {self.name!r}: option heads must divide d_model {self.d_model}, got {self.heads}")

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "context": self.context, "d_model": self.d_model,
                "heads": self.heads, "layers": self.layers, "eval_windows": self.eval_windows,
                "holdout": self.holdout}

    def make_model(self, seed: int) -> nn.Module:
        model = TinyTransformer(self.corpus.vocab_size, self.context, self.d_model, self.heads, self.layers)
        return seeded(model, seed, _INIT_SEED_OFFSET)

    def pair(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x[j] = ids[p_j - context : p_j]`` and ``y[j] = ids[p_j - context + 1 : p_j + 1]``:
        each window's characters and, position by position, the character after each."""
        offsets = torch.arange(-self.context, 1, dtype=torch.int64)
        w = ids[positions.unsqueeze(1) + offsets]
        return w[:, :-1], w[:, 1:]
