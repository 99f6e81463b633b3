"""Training objectives as pure functions of log p(x|k) for all classes.

Every objective takes ``log_px_all`` (B, K) = log p(x|k) from MixtureFlow.log_prob_all,
labels ``y`` (B,), ``log_py`` (K,) = log p(k) and the data dimension ``dim``, and returns a
scalar to minimise (a batch mean).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

__all__ = ["likelihood", "hybrid", "push_away", "make_objective", "Objective"]

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


def make_objective(name: str, beta: float = 1.0, lam: float = 0.05) -> Objective:
    """Objective from its config name: likelihood, hybrid (beta) or push_away (lam)."""
    if name == "likelihood":
        return likelihood
    if name == "hybrid":
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        return partial(hybrid, beta=beta)
    if name == "push_away":
        return partial(push_away, lam=lam)
    raise ValueError(f"Unknown objective {name!r}; use likelihood, hybrid or push_away")

