"""Evaluation metrics computed from log p(x|k) for every class (MixtureFlow.log_prob_all).

All metrics derive from one (N, K) table, so a dataset is encoded once:
accuracy (Bayes' rule), conditional bits/dim -log2 p(x|y)/D, marginal bits/dim
-log2 sum_k p(x|k) p(k) / D, expected calibration error of p(y|x), confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .model import MixtureFlow

__all__ = ["over_dataset", "log_likelihood_table", "accuracy", "bits_per_dim", "expected_calibration_error", "confusion_matrix", "evaluate"]


@torch.no_grad()
def over_dataset(
    model: MixtureFlow, data: Dataset, fn: Callable[[Tensor], Tensor], batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """(fn(x) concatenated over the dataset on the CPU, labels (N,)), with the model in eval mode."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        outputs.append(fn(x.to(device)).cpu())  # integer levels are cast by the model
        labels.append(y)
    model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def log_likelihood_table(model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(log p(x|k) (N, K), labels (N,)) over a dataset, in eval mode."""
    return over_dataset(model, data, model.log_prob_all, batch_size, device)


def accuracy(log_px_all: Tensor, y: Tensor, log_py: Tensor) -> float:
    return float(((log_px_all + log_py).argmax(1) == y).double().mean())


def bits_per_dim(log_px_all: Tensor, y: Tensor | None, log_py: Tensor, dim: int) -> float:
    """Mean conditional (y given) or marginal (y None) bits per dimension."""
    if y is None:
        log_p = torch.logsumexp(log_px_all + log_py, dim=1)
    else:
        log_p = log_px_all.gather(1, y[:, None]).squeeze(1)
    return float(-log_p.double().mean() / (dim * math.log(2.0)))


def expected_calibration_error(log_px_all: Tensor, y: Tensor, log_py: Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width confidence bins of max_k p(k|x)."""
    probs = torch.softmax((log_px_all + log_py).double(), dim=1)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.double().mean() * (correct[mask].mean() - conf[mask].mean()).abs()
    return float(ece)


def confusion_matrix(log_px_all: Tensor, y: Tensor, log_py: Tensor) -> Tensor:
    """(K, K) counts, rows = true class, columns = predicted class."""
    k = log_px_all.shape[1]
    pred = (log_px_all + log_py).argmax(1)
    return torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def evaluate(model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu") -> dict:
    """All metrics of a dataset as a JSON-ready dict."""
    table, y = log_likelihood_table(model, data, batch_size, device)
    log_py = model.prior.log_class_probs.detach().cpu().to(table.dtype)
    return {
        "n": len(y),
        "accuracy": accuracy(table, y, log_py),
        "bpd_conditional": bits_per_dim(table, y, log_py, model.dim),
        "bpd_marginal": bits_per_dim(table, None, log_py, model.dim),
        "ece": expected_calibration_error(table, y, log_py),
        "confusion": confusion_matrix(table, y, log_py).tolist(),
    }
