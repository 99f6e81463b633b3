"""Evaluation metrics computed from log p(x|k) for every class (MixtureFlow.log_prob_all).

All metrics derive from one (N, K) table, so a dataset is encoded once:
accuracy (Bayes' rule), conditional bits/dim -log2 p(x|y)/D, marginal bits/dim
-log2 sum_k p(x|k) p(k) / D, expected calibration error of p(y|x), confusion matrix.

Calibration: `reliability_bins` (accuracy against confidence, the reliability diagram and the
ECE), and temperature scaling p_T(k|x) = softmax((log p(x|k) + log p(k)) / T) with T fitted on
validation data (`fit_temperature`, `apply_temperature`). Every function that reads the table
also takes log posteriors or logits directly (log_py None): softmax is invariant to a per-row shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..flows.model import MixtureFlow

__all__ = ["over_dataset", "log_likelihood_table", "accuracy", "bits_per_dim", "expected_calibration_error", "confusion_matrix", "evaluate",
           "stochastic_dequantisation", "evaluate_with_table", "reliability_bins", "TEMPERATURE_BOUNDS", "fit_temperature",
           "apply_temperature"]


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
    if not model.exact_logdet:
        raise ValueError(f"draws={draws} needs an exact evaluation log-det (a coupling backbone, or an i-ResNet with "
                         "ModelConfig(eval_logdet=Exact()), --set model.eval_logdet=exact); "
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


def _log_joint(log_px_all: Tensor, log_py: Tensor | None, y: Tensor | None = None, finite: bool = True) -> Tensor:
    """log p(x|k) + log p(k) (or the logits as given, log_py None) in float64 on the CPU, shapes checked.

    finite: also refuse NaN, +inf and all -inf rows (-inf where a class is impossible is fine).
    """
    if not isinstance(log_px_all, Tensor) or log_px_all.ndim != 2 or log_px_all.shape[0] == 0 or log_px_all.shape[1] < 2:
        shape = tuple(log_px_all.shape) if isinstance(log_px_all, Tensor) else type(log_px_all).__name__
        raise ValueError(f"need an (N, K) table of log p(x|k) or logits with N >= 1 and K >= 2, got {shape}")
    n, k = log_px_all.shape
    if y is not None and (not isinstance(y, Tensor) or tuple(y.shape) != (n,)):
        raise ValueError(f"labels must have shape ({n},) to match the ({n}, {k}) table, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if y is not None and (y.dtype.is_floating_point or y.dtype == torch.bool or int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels must be integer classes 0..{k - 1}")
    z = log_px_all.detach().double().cpu()
    if log_py is not None:
        if not isinstance(log_py, Tensor) or tuple(log_py.shape) != (k,):
            raise ValueError(f"log_py must have shape ({k},) to match the ({n}, {k}) table, got "
                             f"{tuple(log_py.shape) if isinstance(log_py, Tensor) else type(log_py).__name__}")
        z = z + log_py.detach().double().cpu()
    if finite and (torch.isnan(z).any() or (z == math.inf).any() or not torch.isfinite(z).any(1).all()):
        raise ValueError("the table must be finite (or -inf where a class is impossible, not in a whole row)")
    return z


def reliability_bins(log_px_all: Tensor, y: Tensor, log_py: Tensor | None = None, n_bins: int = 15) -> dict:
    """Accuracy against confidence max_k p(k|x) in equal-width bins of [0, 1]: the reliability diagram and the ECE.

    Bin b holds confidences in [b/n_bins, (b+1)/n_bins) (confidence 1 falls in the last bin).
    ECE = sum_b counts_b / N |accuracy_b - confidence_b|; `expected_calibration_error` is this "ece".

    Args:
        log_px_all: (N, K) log p(x|k), or log posteriors / logits when log_py is None.
        y: (N,) true labels.
        log_py: (K,) log p(k), added to log_px_all; None when log_px_all already holds log posteriors or logits.
        n_bins: number of equal-width confidence bins.

    Returns:
        JSON-ready {"n_bins", "n", "edges" (n_bins + 1), "counts", "accuracy", "confidence" (None for an empty
        bin), "ece"}: per bin the number of examples, the fraction predicted right, the mean confidence.

    Raises:
        ValueError: shapes that do not match, labels outside 0..K-1, n_bins < 1.

    Example:
        >>> import torch
        >>> log_post = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.7, 0.3]]).log()  # p(k|x), log
        >>> b = reliability_bins(log_post, torch.tensor([0, 1, 0, 0]), n_bins=5)  # gaps 0.4 (bin 4), 0.3 (bin 3)
        >>> b["counts"], b["accuracy"][2:], round(b["ece"], 6)
        ([0, 0, 0, 2, 2], [None, 1.0, 0.5], 0.35)
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    probs = torch.softmax(_log_joint(log_px_all, log_py, y, finite=False), dim=1)  # a NaN row falls in no bin
    conf, pred = probs.max(1)
    correct = (pred == y.cpu()).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    counts, acc, mean_conf = [], [], []
    for b in range(n_bins):
        mask = bins == b
        counts.append(int(mask.sum()))
        if mask.any():
            a, c = correct[mask].mean(), conf[mask].mean()
            ece += mask.double().mean() * (a - c).abs()
            acc.append(float(a))
            mean_conf.append(float(c))
        else:
            acc.append(None)
            mean_conf.append(None)
    return {"n_bins": n_bins, "n": len(conf), "edges": [b / n_bins for b in range(n_bins + 1)], "counts": counts,
            "accuracy": acc, "confidence": mean_conf, "ece": float(ece)}


def expected_calibration_error(log_px_all: Tensor, y: Tensor, log_py: Tensor | None = None, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width confidence bins of max_k p(k|x) (reliability_bins)."""
    return reliability_bins(log_px_all, y, log_py, n_bins)["ece"]


def _temperature_nll_grad(z: Tensor, y: Tensor, beta: float) -> float:
    """d/d beta of mean_i -log softmax(beta z_i)[y_i] = mean_i (E_p[z_i] - z_i,y_i): nondecreasing in beta."""
    p = torch.softmax(beta * z, dim=1)
    expected = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(1)  # 0 * -inf counts as 0
    return float((expected - z.gather(1, y[:, None]).squeeze(1)).mean())


TEMPERATURE_BOUNDS = (1e-3, 1e4)  # fit_temperature's default search interval (T_min, T_max)


def fit_temperature(log_px_all: Tensor, y: Tensor, log_py: Tensor | None = None,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T > 0 minimising the NLL of softmax((log p(x|k) + log p(k)) / T) on (x, y), e.g. validation.

    The NLL is convex in 1/T (a mean of logsumexp of linear functions, minus a linear one), so its
    derivative in 1/T is nondecreasing: bisection on it (in log T) finds the minimiser to about 1e-12
    relative. When the minimiser lies outside `bounds` (e.g. every example right with a margin, where the
    NLL falls as T -> 0), the nearer bound is returned. Only the argmax-preserving rescaling is fitted,
    so accuracy never changes.

    Args:
        log_px_all: (N, K) log p(x|k), or logits / log posteriors when log_py is None.
        y: (N,) true labels.
        log_py: (K,) log p(k), added before dividing by T; None when log_px_all already includes it.
        bounds: (T_min, T_max), 0 < T_min < T_max.

    Returns:
        T as a float (T > 1 softens over-confident posteriors, T < 1 sharpens them).

    Raises:
        ValueError: shapes that do not match, labels outside 0..K-1, a non-finite table, bad bounds.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> logits = 3 * torch.randn(20000, 4, generator=gen, dtype=torch.float64)
        >>> y = torch.multinomial(torch.softmax(logits / 2, 1), 1, generator=gen).squeeze(1)  # truly T = 2
        >>> round(fit_temperature(logits, y), 1)
        2.0
    """
    lo, hi = bounds
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"bounds must be 0 < T_min < T_max < inf, got {bounds!r}")
    z = _log_joint(log_px_all, log_py, y)
    z = z - z.max(1, keepdim=True).values  # the rows' shift changes neither the softmax nor the gradient
    y = y.cpu().long()
    log_beta_lo, log_beta_hi = -math.log(hi), -math.log(lo)  # beta = 1 / T
    if _temperature_nll_grad(z, y, math.exp(log_beta_lo)) >= 0:
        return hi  # the NLL rises with 1/T already at T_max
    if _temperature_nll_grad(z, y, math.exp(log_beta_hi)) <= 0:
        return lo  # still falling at T_min
    for _ in range(200):
        mid = 0.5 * (log_beta_lo + log_beta_hi)
        if _temperature_nll_grad(z, y, math.exp(mid)) > 0:
            log_beta_hi = mid
        else:
            log_beta_lo = mid
        if log_beta_hi - log_beta_lo < 1e-12:
            break
    return math.exp(-0.5 * (log_beta_lo + log_beta_hi))


def apply_temperature(log_px_all: Tensor, temperature: float, log_py: Tensor | None = None) -> Tensor:
    """Calibrated log posteriors log softmax((log p(x|k) + log p(k)) / T), (N, K) float64.

    The result is a table of log posteriors: pass it with log_py None to reliability_bins,
    expected_calibration_error or fit_temperature. The argmax, hence accuracy, is that of T = 1.

    Args:
        log_px_all: (N, K) log p(x|k), or logits / log posteriors when log_py is None.
        temperature: T > 0 (fit_temperature on validation data); T = 1 is Bayes' rule unchanged.
        log_py: (K,) log p(k), added before dividing by T; None when log_px_all already includes it.

    Returns:
        (N, K) float64 log p_T(k|x) on the CPU; each row's exp sums to 1.

    Raises:
        ValueError: T not a finite positive number, shapes that do not match, a non-finite table.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return torch.log_softmax(_log_joint(log_px_all, log_py) / float(temperature), dim=1)


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
    return evaluate_with_table(model, data, batch_size, device, draws)[0]


def evaluate_with_table(
    model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu", draws: int = 1,
) -> tuple[dict, Tensor, Tensor]:
    """(evaluate's metrics, the (N, K) table of log p(x|k) they come from, the labels (N,)), one pass."""
    table, y = log_likelihood_table(model, data, batch_size, device, draws)
    log_py = model.prior.log_class_probs.detach().cpu().to(table.dtype)
    metrics = {
        "n": len(y),
        "draws": draws if stochastic_dequantisation(model) else 1,
        "accuracy": accuracy(table, y, log_py),
        "bpd_conditional": bits_per_dim(table, y, log_py, model.dim),
        "bpd_marginal": bits_per_dim(table, None, log_py, model.dim),
        "ece": expected_calibration_error(table, y, log_py),
        "confusion": confusion_matrix(table, y, log_py).tolist(),
    }
    return metrics, table, y
