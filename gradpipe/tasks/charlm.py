"""The ``charlm`` task: a character-level language model of Python source code.

**Data.** The source files of a fixed, sorted list of pure-Python standard
library modules (:data:`CORPUS_MODULES`: ``argparse``, ``calendar``,
``difflib``, ``heapq``, ``json.decoder``, ``json.encoder``, ``shlex``,
``string``, ``textwrap``; about 300 KB), found with
:func:`importlib.util.find_spec`, so every Python installation has the data
and nothing is downloaded. The texts are concatenated in that order. The
vocabulary is the sorted set of characters that occur at least
:data:`MIN_COUNT` times; every rarer character maps to one unknown id (0).
The first 90% of the characters are the training text, the last 10% the
validation text (a contiguous split, so no window straddles both). The corpus
is the one of the running Python version: numbers are comparable between runs
on the same installation, not across Python versions.

**Model** (Y. Bengio, R. Ducharme, P. Vincent and C. Jauvin, "A Neural
Probabilistic Language Model", JMLR 2003, without the direct connections):
the previous ``context`` characters ``c_1..c_n`` are embedded,
concatenated and passed through one tanh layer,

    h = tanh(W [E c_1; ...; E c_n] + b),    p(next | c) = softmax(U h + d),

and trained with the cross-entropy of the next character (nats per
character). Defaults: ``context`` 32, embedding 16, hidden 128, batch 64: about
80k parameters, a few milliseconds per step on a laptop CPU.

**Batches.** Each training batch is ``batch_size`` windows at positions drawn
uniformly (with a :class:`torch.Generator` seeded from the run's seed) from
the training text: ``x`` is ``(batch_size, context)`` character ids, ``y`` the
id that follows each window.

**Evaluation.** A fixed subset of ``eval_windows`` validation windows (2048
by default, chosen once by a generator with a fixed seed, the same for every
run seed, so runs are compared on the same text) gives ``val_loss`` (nats per
character, the headline metric, lower is better), ``val_bpc``
(``val_loss / ln 2``, bits per character) and ``val_accuracy`` (top-1
next-character accuracy).

**Holdout.** ``holdout="tune"`` (for tuning hyperparameters without reading
the validation text) cuts the training text into :data:`TUNE_BLOCKS` equal
blocks and holds out a fifth of them, chosen by a generator seeded from the
run's seed: training windows are drawn only from the other blocks and
:meth:`CharLMTask.evaluate` scores ``eval_windows`` windows that lie wholly in
the held-out blocks, under the same metric names. No window touches both
parts.

Everything is seeded, the initial weights are drawn from a generator (the
process-wide torch RNG is never used), and two runs with the same seed give
bit-identical losses on CPU with the same number of torch threads.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, TaskError, model_seed
from .init import reset_default, seeded
from .options import TUNE_FRACTION, holdout_option, int_option

__all__ = ["CORPUS_MODULES", "MIN_COUNT", "VAL_FRACTION", "TUNE_BLOCKS", "CharCorpus", "CharMLP", "CharLMTask",
           "load_corpus", "windows", "window_ends", "tune_mask", "next_token_loss"]

#: The standard-library modules whose source is the corpus, in the order they are concatenated.
CORPUS_MODULES: tuple[str, ...] = ("argparse", "calendar", "difflib", "heapq", "json.decoder",
                                   "json.encoder", "shlex", "string", "textwrap")
#: A character that occurs fewer times in the corpus maps to the unknown id 0.
MIN_COUNT = 10
#: The last this fraction of the corpus is the validation text.
VAL_FRACTION = 0.1
#: ``holdout="tune"`` cuts the training text into this many blocks and holds out a seeded fifth of them.
TUNE_BLOCKS = 20
#: Fewer characters than this (every source missing) is an error.
_MIN_CORPUS_CHARS = 20_000

_BATCH_SEED_OFFSET = 0xC4A2_1B7E
_INIT_SEED_OFFSET = 0x1217_0C4A
_EVAL_SEED = 0xE7A1_5EED
_TUNE_SEED_OFFSET = 0x70E5_B10C


@dataclass(frozen=True)
class CharCorpus:
    """The encoded corpus.

    Attributes:
        chars: the vocabulary: ``chars[i]`` is the character of id ``i``; ``chars[0]`` is
            ``"\\x00"``, the unknown id that every rare character maps to.
        train: int64 ids of the training text (the first 90%).
        val: int64 ids of the validation text (the last 10%).
        modules: the modules whose source was read, in order.
    """

    chars: str
    train: torch.Tensor
    val: torch.Tensor
    modules: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text`` (unknown characters to 0)."""
        index = {c: i for i, c in enumerate(self.chars) if i}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of ``ids`` (the unknown id shows as ``"\\x00"``)."""
        return "".join(self.chars[int(i)] for i in ids.reshape(-1).tolist())


def _source(module: str) -> str | None:
    """The source text of a pure-Python module, or None when it has no readable ``.py`` file."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return None  # frozen, built in, or shipped without sources
    try:
        return pathlib.Path(origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@functools.lru_cache(maxsize=1)
def load_corpus() -> CharCorpus:
    """Read and encode the corpus (cached; the tensors are shared, do not modify them).

    Raises:
        TaskError: none of :data:`CORPUS_MODULES` has a readable source file
            (a Python installed without its ``.py`` sources), or they hold
            too little text.
    """
    texts, found = [], []
    for module in CORPUS_MODULES:
        text = _source(module)
        if text is not None:
            texts.append(text)
            found.append(module)
    corpus = "".join(texts)
    if len(corpus) < _MIN_CORPUS_CHARS:
        raise TaskError(f"task 'charlm' needs the source files of the standard-library modules "
                        f"{', '.join(CORPUS_MODULES)}, but this Python has "
                        f"{'only ' + ', '.join(found) if found else 'none of them'} "
                        f"({len(corpus)} characters)")
    counts = Counter(corpus)
    chars = "\x00" + "".join(sorted(c for c, n in counts.items() if n >= MIN_COUNT and c != "\x00"))
    index = {c: i for i, c in enumerate(chars) if i}
    ids = torch.tensor([index.get(c, 0) for c in corpus], dtype=torch.int64)
    n_train = int(round(len(corpus) * (1.0 - VAL_FRACTION)))
    return CharCorpus(chars=chars, train=ids[:n_train].clone(), val=ids[n_train:].clone(), modules=tuple(found))


def windows(ids: torch.Tensor, positions: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``x[j] = ids[positions[j] - context : positions[j]]`` and ``y[j] = ids[positions[j]]``."""
    offsets = torch.arange(-context, 0, dtype=torch.int64)
    return ids[positions.unsqueeze(1) + offsets], ids[positions]


def window_ends(allowed: torch.Tensor, context: int) -> torch.Tensor:
    """The positions ``p >= context`` whose whole window ``ids[p - context : p + 1]`` (the
    context and the character predicted after it) lies where the bool mask ``allowed`` is True."""
    inside = torch.cat([torch.zeros(1, dtype=torch.int64), allowed.to(torch.int64).cumsum(0)])
    p = torch.arange(context, allowed.numel(), dtype=torch.int64)
    return p[inside[p + 1] - inside[p - context] == context + 1]


@functools.lru_cache(maxsize=8)
def tune_mask(n: int, seed: int) -> torch.Tensor:
    """True on the characters of an ``n``-character training text that ``holdout="tune"``
    holds out: :data:`TUNE_BLOCKS` equal blocks, a fifth of them chosen by a generator seeded
    from ``seed`` (cached; do not modify)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) + _TUNE_SEED_OFFSET) % (2**63))
    held = torch.randperm(TUNE_BLOCKS, generator=gen)[:round(TUNE_BLOCKS * TUNE_FRACTION)]
    return torch.isin(torch.arange(n, dtype=torch.int64) * TUNE_BLOCKS // n, held)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``logits`` ``(..., vocab)`` against ``targets`` ``(...)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class CharMLP(nn.Module):
    """Bengio et al. (2003)'s neural language model: ``softmax(U tanh(W [E c_1; ..; E c_n] + b) + d)``.

    ``forward(x)`` maps ``(B, context)`` character ids to ``(B, vocab)`` next-character logits.
    Parameter names: ``embed.weight``, ``hidden.weight``, ``hidden.bias``, ``out.weight``, ``out.bias``.
    """

    def __init__(self, vocab: int, context: int, embed: int, hidden: int) -> None:
        super().__init__()
        # skip_init: no draws from the global RNG; reset_parameters() draws from a generator
        self.embed = nn.utils.skip_init(nn.Embedding, vocab, embed)
        self.hidden = nn.utils.skip_init(nn.Linear, context * embed, hidden)
        self.out = nn.utils.skip_init(nn.Linear, hidden, vocab)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default initialisation (``N(0, 1)`` embeddings; ``nn.Linear``'s
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` weights and biases), drawn from ``generator``."""
        reset_default(self, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x).flatten(start_dim=-2)
        return self.out(torch.tanh(self.hidden(e)))


class CharLMTask(Task):
    """Next-character prediction on Python standard-library source (see the module docstring).

    Options:
        batch_size: windows per minibatch (default 64).
        context: characters the model sees before the one it predicts (default 32).
        embed: embedding width per character (default 16).
        hidden: width of the tanh layer (default 128).
        eval_windows: validation windows scored by :meth:`evaluate` (default 2048).
        holdout: ``"val"`` or ``"tune"`` (see the module docstring).
    """

    name = "charlm"
    metric = "val_loss"
    higher_is_better = False
    default_steps = 200
    loss_names = ("loss",)

    def __init__(self, batch_size: int = 64, context: int = 32, embed: int = 16, hidden: int = 128,
                 eval_windows: int = 2048, holdout: str = "val") -> None:
        self.batch_size = int_option(self.name, "batch_size", batch_size)
        self.context = int_option(self.name, "context", context)
        self.embed = int_option(self.name, "embed", embed)
        self.hidden = int_option(self.name, "hidden", hidden)
        self.eval_windows = int_option(self.name, "eval_windows", eval_windows)
        self.holdout = holdout_option(self.name, holdout)

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "context": self.context, "embed": self.embed,
                "hidden": self.hidden, "eval_windows": self.eval_windows, "holdout": self.holdout}

    @property
    def corpus(self) -> CharCorpus:
        """The encoded corpus (:func:`load_corpus`)."""
        corpus = load_corpus()
        for part, ids in (("validation", corpus.val), ("training", corpus.train)):
            if ids.numel() <= self.context:
                raise TaskError(f"task {self.name!r}: option context must be less than the {part} text's "
                                f"{ids.numel()} characters, got {self.context}")
        return corpus

    def make_model(self, seed: int) -> nn.Module:
        return seeded(CharMLP(self.corpus.vocab_size, self.context, self.embed, self.hidden), seed,
                      _INIT_SEED_OFFSET)

    def pair(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The example ``(x, y)`` of each window end in ``positions``: :func:`windows`, the
        context and the one character after it (a subclass predicting more overrides this)."""
        return windows(ids, positions, self.context)

    def _train_ends(self, seed: int) -> torch.Tensor | None:
        """The window ends training may draw from with ``holdout="tune"`` (None: any)."""
        if self.holdout == "val":
            return None
        train = self.corpus.train
        ends = window_ends(~tune_mask(train.numel(), int(seed)), self.context)
        if ends.numel() == 0:
            raise TaskError(f"task {self.name!r}: option context {self.context} is too long for "
                            f"holdout='tune' (blocks of {train.numel() // TUNE_BLOCKS} characters)")
        return ends

    def batches(self, seed: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = self.corpus.train
        ends = self._train_ends(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed((int(seed) + _BATCH_SEED_OFFSET) % (2**63))
        return self._batches(train, gen, steps, ends)

    def _batches(self, train: torch.Tensor, gen: torch.Generator, steps: int,
                 ends: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            if ends is None:
                pos = torch.randint(self.context, train.numel(), (self.batch_size,), generator=gen)
            else:
                pos = ends[torch.randint(ends.numel(), (self.batch_size,), generator=gen)]
            yield self.pair(train, pos)

    def losses(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": next_token_loss(model(x), y)}

    def eval_set(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows ``(x, y)`` that :meth:`evaluate` scores: ``min(eval_windows, available)``
        distinct positions, in text order, chosen by a generator with a fixed seed. With
        ``holdout="val"`` they are validation windows, the same for every run ``seed``; with
        ``"tune"``, windows in the training blocks that ``seed`` holds out."""
        if self.holdout == "val":
            ids = self.corpus.val
            ends = torch.arange(self.context, ids.numel(), dtype=torch.int64)
        else:
            ids = self.corpus.train
            ends = window_ends(tune_mask(ids.numel(), int(seed)), self.context)
        return self.pair(ids, _pick(ends, self.eval_windows))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.eval_set(model_seed(model))
        with torch.no_grad():
            logits = model(x)
            loss = float(next_token_loss(logits, y))
            accuracy = float((logits.argmax(dim=-1) == y).to(torch.float64).mean())
        return {"val_loss": loss, "val_bpc": loss / math.log(2.0), "val_accuracy": accuracy}

    def sample_grads(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ..runtime.per_sample import per_sample_grads

        x, y = batch
        return per_sample_grads(model, next_token_loss, x, y)


def _pick(ends: torch.Tensor, count: int) -> torch.Tensor:
    """``min(count, len(ends))`` of ``ends``, drawn by a generator with a fixed seed, sorted."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_EVAL_SEED)
    return ends[torch.randperm(ends.numel(), generator=gen)[:count].sort().values]
