"""Training objectives as pure functions of log p(x|k) for all classes.

Every objective takes ``log_px_all`` (B, K) = log p(x|k) from MixtureFlow.log_prob_all,
labels ``y`` (B,), ``log_py`` (K,) = log p(k) and the data dimension ``dim``, and returns a
scalar to minimise (a batch mean). `Likelihood`, `Hybrid(beta)` and `PushAway(lam)` are the
same functions as typed, frozen values a TrainConfig holds (a tagged dict in JSON).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

__all__ = ["likelihood", "hybrid", "push_away", "Objective", "Likelihood", "Hybrid", "PushAway", "TrainingObjective"]

Objective = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def _conditional(log_px_all: Tensor, y: Tensor) -> Tensor:
    return log_px_all.gather(1, y[:, None]).squeeze(1)  # (B,)


def likelihood(log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int) -> Tensor:
    """Maximum likelihood: -E[log p(x|y)] / D (nats per dimension)."""
    return -_conditional(log_px_all, y).mean() / dim


def hybrid(log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int, beta: float = 1.0) -> Tensor:
    """-E[log p(x|y)] / D + beta * CE(p(y|x), y), p(y|x) = softmax_k(log p(x|k) + log p(k)).

    The data term is per dimension while the label contributes one term, so beta near D
    gives p(y|x) real weight (IB-INN, Ardizzone et al. 2020).
    """
    ce = F.cross_entropy(log_px_all + log_py, y)
    return likelihood(log_px_all, y, log_py, dim) + beta * ce


def push_away(log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int, lam: float = 0.05) -> Tensor:
    """The original student's loss: -log p(x|y) + lam * sum_{y' != y} log p(x|y') (batch mean, nats).

    Unbounded below: the second term rewards driving other classes' densities to -inf,
    kept verbatim so the failure can be reproduced.
    """
    own = _conditional(log_px_all, y)
    others = log_px_all.sum(1) - own
    return (-own + lam * others).mean()


@dataclass(frozen=True)
class Likelihood:
    """Maximum likelihood, -E[log p(x|y)] / D (see `likelihood`)."""

    kind: ClassVar[str] = "likelihood"

    def __call__(self, log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int) -> Tensor:
        return likelihood(log_px_all, y, log_py, dim)


@dataclass(frozen=True)
class Hybrid:
    """-E[log p(x|y)] / D + beta * CE(p(y|x), y) (see `hybrid`)."""

    kind: ClassVar[str] = "hybrid"
    beta: float = 1.0  # weight of the cross-entropy against the per-dimension NLL; near D gives p(y|x) real weight

    def __post_init__(self) -> None:
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be finite and >= 0, got {self.beta}")

    def __call__(self, log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int) -> Tensor:
        return hybrid(log_px_all, y, log_py, dim, self.beta)


@dataclass(frozen=True)
class PushAway:
    """The original student's loss -log p(x|y) + lam * sum_{y' != y} log p(x|y') (see `push_away`)."""

    kind: ClassVar[str] = "push_away"
    lam: float = 0.05  # weight of the other classes' log-densities

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise ValueError(f"lam must be finite, got {self.lam}")

    def __call__(self, log_px_all: Tensor, y: Tensor, log_py: Tensor, dim: int) -> Tensor:
        return push_away(log_px_all, y, log_py, dim, self.lam)


TrainingObjective = Likelihood | Hybrid | PushAway  # the objectives a TrainConfig can hold
