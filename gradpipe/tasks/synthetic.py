"""Synthetic objectives of known difficulty: ``quadratic``, ``rosenbrock`` and ``noisy-quadratic``.

They need no data, take well under a millisecond of arithmetic per step, and
their difficulty is a formula, so they serve as fast proxy tasks for a search
and as checks that an optimizer behaves as theory says.

**The variable.** Each task minimises ``f`` over a point ``x`` in ``R^dim``
held by a :class:`SplitPoint` model as three parameters of different shapes,
so that per-tensor and matrix pipelines (Muon, Shampoo, SOAP, Adafactor) have
something of each kind to act on: ``matrix`` of shape ``(k, 2k)`` with
``k = max(1, isqrt(dim // 4))``, ``vector`` with the next ``dim - 2k^2 - 1``
coordinates and ``scalar`` of shape ``(1,)``, the last one. ``x`` is their
concatenation, ``matrix`` flattened row by row (dim 100: ``(5, 10)``, 49,
1). ``dim`` is at least 4.

**Metrics.** ``suboptimality`` ``f(x) - f*`` (the headline, lower is better)
and ``distance`` ``||x - x*||_2`` to the minimiser. The training loss of a
step is ``f(x)`` (the noisy quadratic's: a noisy, unbiased estimate of it).

**Holdout.** All three accept ``holdout="val"`` and ``"tune"`` and evaluate
the same objective under both: there is no data, so nothing can leak.

**Seeds.** The seed fixes the problem instance (the rotation and the
minimiser of ``quadratic``), the initial point and the noise, each drawn from
a :class:`torch.Generator`; the process-wide RNG is never used.

Tasks:

* ``quadratic``: ``f(x) = 1/2 (x - x*)^T A (x - x*)``, ``A = Q diag(lambda) Q^T``
  with eigenvalues log-spaced from ``1/condition`` to 1 (so ``L = 1``,
  ``mu = 1/condition``), ``Q`` a seeded random rotation (the QR factor of a
  Gaussian matrix) and ``x*``, ``x_0`` standard normal. The rotation hides the
  eigenbasis from per-coordinate methods. Known difficulty: gradient descent
  with step ``1/L`` contracts the slowest eigendirection by ``1 - 1/condition``
  per step, so ``f(x_t) - f* <= (1 - 1/condition)^{2t} (f(x_0) - f*)`` and
  needs about ``condition`` steps per factor ``e^2`` (Y. Nesterov, "Lectures
  on Convex Optimization", 2018, section 2.1.5); heavy-ball momentum needs
  about ``sqrt(condition)`` (B. T. Polyak, "Some methods of speeding up the
  convergence of iteration methods", 1964). Defaults: dim 100, condition
  1e3, 500 steps.
* ``rosenbrock``: ``f(x) = sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``
  (H. H. Rosenbrock, "An automatic method for finding the greatest or least
  value of a function", The Computer Journal 1960; the n-dimensional chained
  form), minimum ``f = 0`` at ``x* = (1, ..., 1)``, starting from the
  classic point ``(-1.2, 1, -1.2, 1, ...)`` plus seeded ``N(0, 0.1^2)``
  noise. Known difficulty: a curved, narrow valley whose curvature ranges
  from about 1 along it to several hundred across it: optimizers reach the
  valley floor fast and then crawl along it. Defaults: dim 20, 500 steps.
* ``noisy-quadratic``: the noisy quadratic model of G. Zhang, L. Li, Z. Nado
  et al., "Which Algorithmic Choices Matter at Which Batch Sizes? Insights
  From a Noisy Quadratic Model", NeurIPS 2019: ``L(x) = 1/2 sum_i h_i x_i^2``
  with ``h_i = 1/i`` and stochastic gradients ``H x + eps``,
  ``eps ~ N(0, H / batch_size)`` (gradient noise covariance proportional to
  the curvature, as near a minimum of a neural network's loss). A batch is
  ``batch_size`` examples ``z_j ~ N(0, I)``, example ``j`` has the loss
  ``1/2 x^T H x - (H^{1/2} z_j)^T x``, so per-example gradients exist (DP
  pipelines can train it) and the batch loss is an unbiased estimate of
  ``L(x)``. The metric is the noise-free loss ``L(x)`` (``f* = 0``);
  :func:`nqm_sgd_expected_loss` gives its expectation under SGD in closed
  form. Known difficulty: SGD's loss stalls at a noise floor proportional to
  ``lr / batch_size``; larger batches or a decaying step go lower.
  ``x_0`` is standard normal. Defaults: dim 100, batch 32, 500 steps.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Any, Iterator

import torch
from torch import nn

from .base import Task, TaskError, model_seed, tag_seed
from .options import float_option, holdout_option, int_option

__all__ = ["SplitPoint", "split_shapes", "SyntheticTask", "QuadraticTask", "RosenbrockTask",
           "NoisyQuadraticTask", "quadratic_problem", "rosenbrock", "nqm_sgd_expected_loss"]

_INIT_SEED_OFFSET = 0x5717_0001
_PROBLEM_SEED_OFFSET = 0x5717_0002
_NOISE_SEED_OFFSET = 0x5717_0003


def split_shapes(dim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The shapes of :class:`SplitPoint`'s ``matrix``, ``vector`` and ``scalar`` for a point in ``R^dim``."""
    k = max(1, math.isqrt(dim // 4))
    return (k, 2 * k), (dim - 2 * k * k - 1,), (1,)


class SplitPoint(nn.Module):
    """A point ``x`` in ``R^dim`` (``dim >= 4``) held as the parameters ``matrix``, ``vector``
    and ``scalar`` (shapes :func:`split_shapes`); :meth:`flat` is ``x``."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        shapes = split_shapes(x.numel())
        parts = torch.split(x.detach().clone(), [math.prod(s) for s in shapes])
        self.matrix, self.vector, self.scalar = (nn.Parameter(p.reshape(s)) for p, s in zip(parts, shapes))

    def flat(self) -> torch.Tensor:
        """``x``: the parameters concatenated, ``matrix`` row by row."""
        return torch.cat([self.matrix.reshape(-1), self.vector, self.scalar])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat`` ``(..., dim)`` cut into ``{parameter name: (..., *shape)}``, as :meth:`flat` joins them."""
        lead = flat.shape[:-1]
        sizes = [p.numel() for p in (self.matrix, self.vector, self.scalar)]
        return {n: part.reshape(*lead, *p.shape) for (n, p), part in
                zip(self.named_parameters(), torch.split(flat, sizes, dim=-1))}


def _generator(seed: int, offset: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) + offset) % (2**63))
    return gen


class SyntheticTask(Task):
    """An objective ``f`` over ``x`` in ``R^dim`` held by a :class:`SplitPoint` (see the module docstring).

    A subclass implements :meth:`initial_point`, :meth:`objective`,
    :meth:`minimiser` and, if it is stochastic, :meth:`batches` and :meth:`losses`.
    """

    metric = "suboptimality"
    higher_is_better = False
    default_steps = 500
    loss_names = ("loss",)

    def __init__(self, dim: int, holdout: str) -> None:
        self.dim = int_option(self.name, "dim", dim, low=4)
        self.holdout = holdout_option(self.name, holdout)

    def options(self) -> dict[str, Any]:
        return {"dim": self.dim, "holdout": self.holdout}

    @abc.abstractmethod
    def initial_point(self, seed: int) -> torch.Tensor:
        """``x_0`` for ``seed``, a float32 tensor of shape ``(dim,)``."""

    @abc.abstractmethod
    def objective(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """``f(x) - f*``, differentiable, for the problem instance of ``seed``."""

    @abc.abstractmethod
    def minimiser(self, seed: int) -> torch.Tensor:
        """``x*`` for the problem instance of ``seed``."""

    def make_model(self, seed: int) -> nn.Module:
        return tag_seed(SplitPoint(self.initial_point(seed)), seed)

    def batches(self, seed: int, steps: int) -> Iterator[Any]:
        """A deterministic objective has no data: ``steps`` empty batches."""
        return iter([()] * steps)

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.objective(model.flat(), model_seed(model))}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        seed = model_seed(model)
        x = model.flat().detach()
        return {"suboptimality": float(self.objective(x, seed)),
                "distance": float(torch.linalg.vector_norm(x - self.minimiser(seed)))}

    def sample_grads(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        raise TaskError(f"task {self.name!r} is a deterministic objective with no examples, so a pipeline that "
                        "reads 'samples' (e.g. dp_sgd) cannot train it; use the task noisy-quadratic")


@functools.lru_cache(maxsize=16)
def quadratic_problem(dim: int, condition: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eigenvalues, Q, x*)`` of the ``quadratic`` task for ``seed``: ``A = Q diag(eigenvalues) Q^T``,
    eigenvalues ``condition^(-i/(dim-1))``, ``i = dim-1, ..., 0`` (ascending, the last is 1), float64
    (cached; do not modify)."""
    gen = _generator(seed, _PROBLEM_SEED_OFFSET)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed: fix the signs QR leaves free
    eig = condition ** -torch.linspace(1.0, 0.0, dim, dtype=torch.float64)
    xstar = torch.randn(dim, generator=gen, dtype=torch.float64)
    return eig, q, xstar


class QuadraticTask(SyntheticTask):
    """The ill-conditioned quadratic ``1/2 (x - x*)^T A (x - x*)`` (see the module docstring).

    Options:
        dim: dimension, at least 4 (default 100).
        condition: ``L / mu``, the condition number of ``A``, at least 1 (default 1e3).
        holdout: ``"val"`` or ``"tune"``; both evaluate the same objective.
    """

    name = "quadratic"

    def __init__(self, dim: int = 100, condition: float = 1e3, holdout: str = "val") -> None:
        super().__init__(dim, holdout)
        self.condition = float_option(self.name, "condition", condition, low=1.0)

    def options(self) -> dict[str, Any]:
        return {"dim": self.dim, "condition": self.condition, "holdout": self.holdout}

    def _problem(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, x*)`` in float32."""
        _, _, xstar = quadratic_problem(self.dim, self.condition, int(seed))
        return _cached_matrix(self.dim, self.condition, int(seed)), xstar.float()

    def initial_point(self, seed: int) -> torch.Tensor:
        return torch.randn(self.dim, generator=_generator(seed, _INIT_SEED_OFFSET))

    def objective(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        a, xstar = self._problem(seed)
        d = x - xstar
        return 0.5 * torch.dot(d, a @ d)

    def minimiser(self, seed: int) -> torch.Tensor:
        return self._problem(seed)[1]


@functools.lru_cache(maxsize=16)
def _cached_matrix(dim: int, condition: float, seed: int) -> torch.Tensor:
    eig, q, _ = quadratic_problem(dim, condition, seed)
    return ((q * eig) @ q.T).float()


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """The chained Rosenbrock function ``sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``."""
    head, tail = x[:-1], x[1:]
    return (100.0 * (tail - head * head) ** 2 + (1.0 - head) ** 2).sum()


class RosenbrockTask(SyntheticTask):
    """The ``dim``-dimensional Rosenbrock function (see the module docstring).

    Options:
        dim: dimension, at least 4 (default 20).
        holdout: ``"val"`` or ``"tune"``; both evaluate the same objective.
    """

    name = "rosenbrock"

    def __init__(self, dim: int = 20, holdout: str = "val") -> None:
        super().__init__(dim, holdout)

    def initial_point(self, seed: int) -> torch.Tensor:
        classic = torch.tensor([-1.2, 1.0]).repeat(self.dim // 2 + 1)[: self.dim]
        return classic + 0.1 * torch.randn(self.dim, generator=_generator(seed, _INIT_SEED_OFFSET))

    def objective(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return rosenbrock(x)

    def minimiser(self, seed: int) -> torch.Tensor:
        return torch.ones(self.dim)


class NoisyQuadraticTask(SyntheticTask):
    """Zhang et al. (2019)'s noisy quadratic model (see the module docstring).

    A batch is ``z`` of shape ``(batch_size, dim)``; the loss is
    ``mean_j 1/2 x^T H x - (h^{1/2} * z_j) . x``, whose gradient is ``H x + eps``,
    ``eps ~ N(0, H / batch_size)``.

    Options:
        dim: dimension, at least 4 (default 100); ``h_i = 1/i``.
        batch_size: examples per step, at least 1 (default 32).
        holdout: ``"val"`` or ``"tune"``; both evaluate the same objective.
    """

    name = "noisy-quadratic"

    def __init__(self, dim: int = 100, batch_size: int = 32, holdout: str = "val") -> None:
        super().__init__(dim, holdout)
        self.batch_size = int_option(self.name, "batch_size", batch_size)

    def options(self) -> dict[str, Any]:
        return {"dim": self.dim, "batch_size": self.batch_size, "holdout": self.holdout}

    @property
    def curvature(self) -> torch.Tensor:
        """``h``: the diagonal of ``H``, ``h_i = 1/i`` for ``i = 1..dim``."""
        return 1.0 / torch.arange(1, self.dim + 1, dtype=torch.float32)

    def initial_point(self, seed: int) -> torch.Tensor:
        return torch.randn(self.dim, generator=_generator(seed, _INIT_SEED_OFFSET))

    def objective(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return 0.5 * torch.dot(self.curvature, x * x)

    def minimiser(self, seed: int) -> torch.Tensor:
        return torch.zeros(self.dim)

    def batches(self, seed: int, steps: int) -> Iterator[torch.Tensor]:
        gen = _generator(seed, _NOISE_SEED_OFFSET)
        for _ in range(steps):
            yield torch.randn(self.batch_size, self.dim, generator=gen)

    def losses(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = model.flat()
        noise = (self.curvature.sqrt() * batch).mean(0)
        return {"loss": self.objective(x, 0) - torch.dot(noise, x)}

    def sample_grads(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Example ``j``'s gradient ``H x - h^{1/2} * z_j``, per parameter."""
        h = self.curvature
        with torch.no_grad():
            return model.split(h * model.flat() - h.sqrt() * batch)


def nqm_sgd_expected_loss(h: torch.Tensor, x0: torch.Tensor, lr: float, batch_size: int, steps: int) -> float:
    """``E[L(x_t)]`` after ``t = steps`` steps of plain SGD with step ``lr`` on the noisy quadratic model.

    Coordinate ``i`` follows ``x <- (1 - lr h_i) x - lr eps_i``, ``Var(eps_i) = h_i / B``, so
    (Zhang et al. 2019, section 3) with ``r_i = (1 - lr h_i)^2``::

        E[x_{t,i}^2] = r_i^t x_{0,i}^2 + lr^2 (h_i / B) (1 - r_i^t) / (1 - r_i)

    and ``E[L(x_t)] = 1/2 sum_i h_i E[x_{t,i}^2]``. ``lr h_i`` must be in (0, 2) for every i.
    """
    h64, x64 = h.to(torch.float64), x0.to(torch.float64)
    r = (1.0 - lr * h64) ** 2
    rt = r ** steps
    second = rt * x64 ** 2 + lr ** 2 * (h64 / batch_size) * (1.0 - rt) / (1.0 - r)
    return float(0.5 * (h64 * second).sum())
