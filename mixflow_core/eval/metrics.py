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

from ..flows.model import MixtureFlow

__all__ = ["over_dataset", "log_likelihood_table", "accuracy", "bits_per_dim", "expected_calibration_error", "confusion_matrix", "evaluate",
           "stochastic_dequantisation"]


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


def stochastic_dequantisation(model: MixtureFlow) -> bool:
    """Whether log p(x|k) draws uniform dequantisation noise u (else it is deterministic in x)."""
    return bool(getattr(model.preprocess, "dequantize", False))


def _exact_eval_logdet(model: MixtureFlow) -> bool:
    from ..flows.iresnet import ResidualBlock
    from ..flows.logdet import Exact

    return all(isinstance(m.eval_logdet, Exact) for m in model.modules() if isinstance(m, ResidualBlock))


def log_likelihood_table(
    model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu", draws: int = 1,
) -> tuple[Tensor, Tensor]:
    """(log p(x|k) (N, K), labels (N,)) over a dataset, in eval mode.

    draws = S > 1 averages over S dequantisation draws u_s in probability:
    log p(x|k) ~ log (1/S) sum_s p_model(x + u_s | k), the importance-weighted bound of Flow++
    (Ho et al. 2019): still a lower bound on the log-probability of the discrete x, tighter than
    one draw, and far less noisy for classification. It needs an exact eval log-det (a noisy
    estimate inside the average would bias it upward), so S > 1 with a series estimator raises.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if draws == 1 or not stochastic_dequantisation(model):
        return over_dataset(model, data, model.log_prob_all, batch_size, device)
    if not _exact_eval_logdet(model):
        raise ValueError(f"draws={draws} needs an exact evaluation log-det (ModelConfig(eval_logdet=Exact()), "
                         "--set model.eval_logdet=exact); "
                         "with a stochastic estimator use draws=1")

    def averaged(x: Tensor) -> Tensor:
        tables = torch.stack([model.log_prob_all(x) for _ in range(draws)])  # (S, B, K)
        return torch.logsumexp(tables, 0) - math.log(draws)

    return over_dataset(model, data, averaged, batch_size, device)


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


def evaluate(
    model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu", draws: int = 1,
) -> dict:
    """All metrics of a dataset from one (N, K) table of log p(x|k), as a JSON-ready dict.

    Args:
        model: the mixture flow (evaluated in eval mode, then returned to its mode).
        data: a dataset of (x, y) pairs.
        batch_size, device: how the table is computed.
        draws: dequantisation draws averaged per image (see log_likelihood_table).

    Returns:
        {"n", "draws", "accuracy", "bpd_conditional", "bpd_marginal", "ece", "confusion"}.

    Example:
        >>> from mixflow_core import MLP, ModelConfig, build_model
        >>> from mixflow_core.data import DataConfig, load_data
        >>> digits = load_data(DataConfig("digits"))
        >>> model = build_model((64,), 10, 17, ModelConfig(arch=MLP(hidden=(16,), n_blocks=1)))
        >>> m = evaluate(model, digits.test)  # untrained: about chance, about log2(17) = 4.09 bits/dim or worse
        >>> m["n"], sorted(m)
        (360, ['accuracy', 'bpd_conditional', 'bpd_marginal', 'confusion', 'draws', 'ece', 'n'])
    """
    table, y = log_likelihood_table(model, data, batch_size, device, draws)
    log_py = model.prior.log_class_probs.detach().cpu().to(table.dtype)
    return {
        "n": len(y),
        "draws": draws if stochastic_dequantisation(model) else 1,
        "accuracy": accuracy(table, y, log_py),
        "bpd_conditional": bits_per_dim(table, y, log_py, model.dim),
        "bpd_marginal": bits_per_dim(table, None, log_py, model.dim),
        "ece": expected_calibration_error(table, y, log_py),
        "confusion": confusion_matrix(table, y, log_py).tolist(),
    }
