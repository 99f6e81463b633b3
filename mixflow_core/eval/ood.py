"""Out-of-distribution (OOD) detection by density: what a generative classifier offers beyond accuracy.

A mixture flow gives log p(x|k) for every class (metrics.log_likelihood_table) and log p(k)
(model.prior.log_class_probs), so each input gets several scores of "how in-distribution" it is:

- ``log_px``: the marginal log p(x) = logsumexp_k [log p(x|k) + log p(k)] (nats);
- ``neg_bpd``: minus the marginal bits/dim, log p(x) / (D ln 2) (the same ranking as log_px, in the report's unit);
- ``max_log_px_y``: max_y log p(x|y), the best class-conditional density;
- ``max_posterior``: max_y p(y|x), the discriminative-style confidence (also the sklearn classifiers' score);
- ``typicality``: -| -log p(x) - H |, H the mean of -log p(x) on (a sample of) training data: Nalisnick et
  al. (2019)'s typicality test applied per input (|-log p(x) - H| larger = more OOD), negated.

**Convention: every score is oriented so that HIGHER = MORE IN-DISTRIBUTION** (negated where needed), and
AUROC / AUPR treat the in-distribution inputs as the positive class: AUROC 1 = every in-distribution input
scores above every OOD input, 0.5 = chance, 0 = perfectly inverted (the score prefers the OOD set, the
famous failure of likelihoods on e.g. SVHN vs CIFAR). AUPR's chance level is the positive fraction
n_in / (n_in + n_ood), not 0.5.

The same density scores come from the per-class Gaussian baseline in logit space (baselines.gaussian_tables:
gaussian_test_table's Gaussian on any inputs), and max_posterior from sklearn classifiers
(baselines.sklearn_max_posteriors: logistic regression, RBF-SVC through the calibrated wrapper the baselines
use, QDA). The OOD sets themselves (uniform noise, blur, contrast inversion, flips, another data set
resampled) are data transforms: eval.ood_sets.

This module: the scores, AUROC / AUPR, the rows and their Markdown table, and the orchestration (ood_scores,
ood_table) that scores every model on every set.

Example:
    >>> auroc_aupr([2.0, 3.0, 4.0], [0.0, 1.0])  # in-distribution scores all higher: perfect
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..data import Splits
from ..flows.config import ModelConfig
from ..flows.model import MixtureFlow
from .baselines import (
    GAUSSIAN_METHOD, SKLEARN_MAX_TRAIN, check_sklearn_methods, gaussian_tables, sklearn_max_posteriors,
)
from .metrics import log_likelihood_table
from .ood_sets import check_levels, random_subset
from .tables import markdown_table

__all__ = [
    "SCORES", "SCORE_DESCRIPTIONS", "IN_DISTRIBUTION", "FLOW_METHOD", "density_scores", "typicality_score",
    "auroc_aupr", "ood_rows", "markdown_ood_table", "flow_log_likelihoods", "flow_scores", "gaussian_scores",
    "ood_scores", "ood_table",
]

log = logging.getLogger(__name__)

SCORES = ("log_px", "neg_bpd", "max_log_px_y", "max_posterior", "typicality")
SCORE_DESCRIPTIONS: Mapping[str, str] = {
    "log_px": "marginal log p(x) (nats)",
    "neg_bpd": "-bits/dim of the marginal p(x)",
    "max_log_px_y": "max_y log p(x|y)",
    "max_posterior": "max_y p(y|x)",
    "typicality": "-|-log p(x) - mean train -log p(x)|",
}
IN_DISTRIBUTION = "in-distribution"  # the key of the in-distribution (test) scores in flow_scores & co.
FLOW_METHOD = "mixture flow"


# -- scores --------------------------------------------------------------------------------------------
def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown OOD scores {unknown}; choose from {list(SCORES)}")
    if not names:
        raise ValueError(f"name at least one OOD score of {list(SCORES)}")
    return tuple(names)


def typicality_score(nll: Any, train_mean_nll: float) -> np.ndarray:
    """-| nll - H |: Nalisnick et al. (2019)'s typicality per input, oriented higher = more in-distribution.

    Args:
        nll: -log p(x) per input (N,), in any unit (nats, bits/dim) as long as H is in the same.
        train_mean_nll: H, the mean of -log p(x) on (a sample of) training data (an estimate of the entropy).

    Returns:
        (N,) float64 scores <= 0, equal to 0 exactly at nll = H: an input far from the typical set (in either
        direction: much less likely *or much more likely* than training data) scores low.

    Example:
        >>> typicality_score([1.0, 2.0, 4.0], 2.0).tolist()
        [-1.0, -0.0, -2.0]
    """
    if not math.isfinite(train_mean_nll):
        raise ValueError(f"the training mean of -log p(x) must be finite, got {train_mean_nll}")
    return -np.abs(np.asarray(nll, dtype=np.float64) - float(train_mean_nll))


def density_scores(
    table: Tensor, log_py: Tensor, dim: int, train_mean_nll: float | None = None, names: Sequence[str] = SCORES,
) -> dict[str, np.ndarray]:
    """The OOD scores of inputs from their (N, K) table of log p(x|k), each oriented higher = in-distribution.

    Args:
        table: (N, K) log p(x|k) (metrics.log_likelihood_table, or a baseline's table).
        log_py: (K,) log p(k).
        dim: D, the number of dimensions per input (for bits/dim).
        train_mean_nll: mean -log p(x) (nats) of training data, needed for "typicality" (None: left out of
            the default names; asked for by name it raises).
        names: which of SCORES to return.

    Returns:
        {name: (N,) float64 numpy array}: log_px = logsumexp_k(log p(x|k) + log p(k)), neg_bpd = log_px /
        (D ln 2), max_log_px_y = max_k log p(x|k), max_posterior = max_k p(k|x), typicality =
        -| -log_px - train_mean_nll |.

    Example:
        >>> import torch
        >>> table, log_py = torch.tensor([[0.0, -50.0], [-10.0, -10.0]]), torch.log(torch.tensor([0.5, 0.5]))
        >>> s = density_scores(table, log_py, dim=1, names=("max_log_px_y", "max_posterior"))
        >>> s["max_log_px_y"].tolist(), s["max_posterior"].round(3).tolist()
        ([0.0, -10.0], [1.0, 0.5])
    """
    default = names is SCORES
    names = _check_names(names)
    if default and train_mean_nll is None:
        names = tuple(n for n in names if n != "typicality")
    if "typicality" in names and train_mean_nll is None:
        raise ValueError("the typicality score needs train_mean_nll (mean -log p(x) on training data)")
    table = torch.as_tensor(table).detach().cpu().double()
    log_py = torch.as_tensor(log_py).detach().cpu().double()
    if table.dim() != 2 or log_py.shape != (table.shape[1],):
        raise ValueError(f"need an (N, K) table and (K,) log p(k), got {tuple(table.shape)} and {tuple(log_py.shape)}")
    joint = table + log_py
    log_px = torch.logsumexp(joint, 1)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "log_px":
            out[name] = log_px.numpy()
        elif name == "neg_bpd":
            out[name] = (log_px / (dim * math.log(2.0))).numpy()
        elif name == "max_log_px_y":
            out[name] = table.max(1).values.numpy()
        elif name == "max_posterior":
            out[name] = torch.softmax(joint, 1).max(1).values.numpy()
        else:
            out[name] = typicality_score(-log_px.numpy(), train_mean_nll)
    return out


def _scores_1d(s: Any, what: str) -> np.ndarray:
    a = np.asarray(s.detach().cpu() if isinstance(s, Tensor) else s, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array of scores, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{what} contains NaN scores ({int(np.isnan(a).sum())} of {len(a)})")
    return a


def auroc_aupr(scores_in: Any, scores_ood: Any) -> tuple[float, float]:
    """(AUROC, AUPR) of telling in-distribution from OOD inputs by a score, in-distribution = positive class.

    sklearn.metrics.roc_auc_score and average_precision_score on labels 1 (in) / 0 (OOD). Both depend only
    on the order of the scores, so they are computed on ranks (ties kept): +-inf scores (a density that
    underflows) are valid; NaN raises.

    Args:
        scores_in: (n_in,) scores of in-distribution inputs, higher = more in-distribution.
        scores_ood: (n_ood,) scores of OOD inputs.

    Returns:
        AUROC (0.5 = chance, 1 = perfect) and AUPR (chance = n_in / (n_in + n_ood), 1 = perfect).

    Example:
        >>> auroc_aupr([1.0, 2.0], [1.5, 0.0])
        (0.75, 0.8333333333333333)
    """
    from scipy.stats import rankdata
    from sklearn.metrics import average_precision_score, roc_auc_score

    a, b = _scores_1d(scores_in, "in-distribution scores"), _scores_1d(scores_ood, "OOD scores")
    labels = np.r_[np.ones(len(a)), np.zeros(len(b))]
    ranks = rankdata(np.r_[a, b])  # average ranks: order and ties as the scores, finite
    return float(roc_auc_score(labels, ranks)), float(average_precision_score(labels, ranks))


def ood_rows(model: str, scores: Mapping[str, Mapping[str, Any]], in_key: str = IN_DISTRIBUTION) -> list[dict]:
    """Rows {"model", "score", "ood_set", "auroc", "aupr", "n_in", "n_ood"}, one per score and OOD set.

    Args:
        model: the model's name in the rows.
        scores: {set name: {score name: (N,) scores}} with the in-distribution set under `in_key`
            (flow_scores, gaussian_scores); every other set is an OOD set scored against it.
        in_key: the in-distribution set's key.

    Returns:
        The rows, score by score (in the in-distribution dict's order), OOD sets in their order.
    """
    if in_key not in scores:
        raise ValueError(f"no in-distribution scores (key {in_key!r}) among {list(scores)}")
    rows = []
    for score, s_in in scores[in_key].items():
        for name, by_score in scores.items():
            if name == in_key:
                continue
            if score not in by_score:
                raise ValueError(f"OOD set {name!r} has no {score!r} scores")
            auroc, aupr = auroc_aupr(s_in, by_score[score])
            rows.append({"model": model, "score": score, "ood_set": name, "auroc": auroc, "aupr": aupr,
                         "n_in": len(s_in), "n_ood": len(by_score[score])})
    return rows


def markdown_ood_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The OOD rows as Markdown: one line per (model, score), one column per OOD set, cells "AUROC / AUPR".

    In-distribution is the positive class (AUROC 0.5 = chance); each set's header gives its size and AUPR's
    chance level n_in / (n_in + n_ood); — where a model has no such score and set.

    Example:
        >>> print(markdown_ood_table([{"model": "m", "score": "log_px", "ood_set": "noise", "auroc": 1.0,
        ...                            "aupr": 0.99, "n_in": 30, "n_ood": 10}]))
        | model | score | noise (n = 10; AUPR chance 0.750) |
        |---|---|---|
        | m | log_px | 1.000 / 0.990 |
    """
    sets: list[str] = []
    lines_of: dict[tuple[str, str], dict[str, str]] = {}
    n_ood: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r["ood_set"] not in sets:
            sets.append(r["ood_set"])
            n_ood[r["ood_set"]] = (r["n_ood"], r["n_in"] / (r["n_in"] + r["n_ood"]))
        lines_of.setdefault((r["model"], r["score"]), {})[r["ood_set"]] = f"{r['auroc']:.3f} / {r['aupr']:.3f}"
    header = ["model", "score", *(f"{s} (n = {n_ood[s][0]}; AUPR chance {n_ood[s][1]:.3f})" for s in sets)]
    return markdown_table(header, ([model, score, *(cells.get(s, "—") for s in sets)]
                                   for (model, score), cells in lines_of.items()))


# -- scores of models ---------------------------------------------------------------------------------
def _check_sets(ood_sets: Mapping[str, Tensor], data_shape: tuple[int, ...], levels: int | None) -> None:
    if not isinstance(ood_sets, Mapping) or not ood_sets:
        raise ValueError("ood_sets must be a non-empty dict {name: (N, *data_shape) tensor}")
    for name, x in ood_sets.items():
        if name == IN_DISTRIBUTION:
            raise ValueError(f"an OOD set may not be called {IN_DISTRIBUTION!r} (the in-distribution key)")
        if not isinstance(x, Tensor) or x.dim() != len(data_shape) + 1 or tuple(x.shape[1:]) != tuple(data_shape):
            raise ValueError(f"OOD set {name!r} must have shape (N, {', '.join(map(str, data_shape))}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if levels is not None:
            check_levels(x, levels, f"OOD set {name!r}")


def _train_sample(data: Splits, n: int | None, seed: int) -> Tensor:
    """At most n training images, a seeded random subset in the original order (None: all)."""
    return random_subset(data.train.tensors[0], n, seed, "train_sample")


def flow_log_likelihoods(
    model: MixtureFlow, x: Tensor, batch_size: int = 500, device: str | torch.device = "cpu", draws: int = 1,
) -> Tensor:
    """(N, K) log p(x|k) of a tensor of inputs (metrics.log_likelihood_table on it; eval mode; CPU float64 out)."""
    if not isinstance(x, Tensor) or tuple(x.shape[1:]) != tuple(model.data_shape):
        raise ValueError(f"inputs must have shape (N, {', '.join(map(str, model.data_shape))}), "
                         f"got {tuple(getattr(x, 'shape', ()))}")
    table, _ = log_likelihood_table(model, TensorDataset(x, torch.zeros(len(x), dtype=torch.int64)), batch_size,
                                    device, draws)
    return table.double()


def flow_scores(
    model: MixtureFlow, data: Splits, ood_sets: Mapping[str, Tensor], batch_size: int = 500, seed: int = 0,
    train_sample: int | None = 2000, *, names: Sequence[str] = SCORES, device: str | torch.device = "cpu",
    draws: int = 1, in_table: Tensor | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The flow's OOD scores of data.test (key IN_DISTRIBUTION) and of every OOD set.

    Dequantisation noise (and Hutchinson probes) come from torch's generator seeded with `seed` inside
    torch.random.fork_rng (the caller's generator is untouched), in the order: test (unless `in_table`
    is given), train sample, OOD sets. `in_table`: data.test's (N, K) log p(x|k) already computed (a run's
    tables.pt: the numbers behind its metrics), used instead of evaluating the test set again.

    Args:
        model: the mixture flow.
        data: its Splits; data.test is the in-distribution set, data.train gives the typicality's H.
        ood_sets: {name: (N, *data.data_shape) integer levels}.
        batch_size, device, draws: how log p(x|k) is computed (metrics.log_likelihood_table).
        seed: the noise seed (and of the training subsample).
        train_sample: training images for H = mean -log p(x) (a seeded subset; None: all).
        names: which of SCORES.

    Returns:
        {set name: {score name: (N,) float64 array}}, IN_DISTRIBUTION first. For histograms of bits/dim
        negate "neg_bpd".
    """
    names = _check_names(names)
    if tuple(model.data_shape) != tuple(data.data_shape):
        raise ValueError(f"the model takes samples of shape {model.data_shape}, the data has {data.data_shape}")
    _check_sets(ood_sets, data.data_shape, data.levels)
    device = torch.device(device)
    log_py = model.prior.log_class_probs.detach().cpu().double()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if in_table is None:
            in_table = flow_log_likelihoods(model, data.test.tensors[0], batch_size, device, draws)
        elif tuple(in_table.shape) != (len(data.test), data.num_classes):
            raise ValueError(f"in_table must be the ({len(data.test)}, {data.num_classes}) table of data.test, "
                             f"got {tuple(in_table.shape)}")
        tables = {IN_DISTRIBUTION: in_table.detach().cpu().double()}
        mean_nll = None
        if "typicality" in names:
            train = flow_log_likelihoods(model, _train_sample(data, train_sample, seed), batch_size, device, draws)
            mean_nll = float(-torch.logsumexp(train + log_py, 1).mean())
        for name, x in ood_sets.items():
            tables[name] = flow_log_likelihoods(model, x, batch_size, device, draws)
    return {name: density_scores(t, log_py, model.dim, mean_nll, names) for name, t in tables.items()}


def gaussian_scores(
    data: Splits, ood_sets: Mapping[str, Tensor], seed: int = 0, train_sample: int | None = 2000, *,
    names: Sequence[str] = SCORES, alpha: float = ModelConfig.alpha, copies: int = 10, ridge: float | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The per-class Gaussian's OOD scores of data.test (IN_DISTRIBUTION) and every OOD set (as flow_scores).

    gaussian_tables on data.test, the OOD sets, then the training sample (for the typicality's H; its
    noise draw is not the one the moments were fit on).
    """
    names = _check_names(names)
    _check_sets(ood_sets, data.data_shape, data.levels)
    inputs = {IN_DISTRIBUTION: data.test.tensors[0], **ood_sets}
    if "typicality" in names:
        inputs["__train__"] = _train_sample(data, train_sample, seed)
    tables, log_py, _ = gaussian_tables(data, inputs, alpha, copies, seed, ridge)
    mean_nll = None
    if "typicality" in names:
        mean_nll = float(-torch.logsumexp(tables.pop("__train__") + log_py, 1).mean())
    dim = math.prod(data.data_shape)
    return {name: density_scores(t, log_py, dim, mean_nll, names) for name, t in tables.items()}


def ood_scores(
    model: MixtureFlow, data: Splits, ood_sets: Mapping[str, Tensor], batch_size: int = 500, seed: int = 0,
    gaussian: bool = True, sklearn: Sequence[str] = ("logistic",), train_sample: int | None = 2000, *,
    scores: Sequence[str] = SCORES, device: str | torch.device = "cpu", draws: int = 1, gaussian_copies: int = 10,
    gaussian_ridge: float | None = None, sklearn_max_train: int | None = SKLEARN_MAX_TRAIN,
    in_table: Tensor | None = None,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Every OOD score of the flow, the per-class Gaussian and sklearn classifiers: {model: {set: {score: (N,)}}}.

    In-distribution = data.test (key IN_DISTRIBUTION); every score is oriented higher = more in-distribution
    (module docstring). The flow: flow_scores (its test table `in_table` when given); the Gaussian (quantised
    data only): gaussian_scores with the flow's logit margin, `gaussian_copies` dequantised copies of train and
    the ridge `gaussian_ridge` (None: chosen on validation, one more fit); sklearn: max_posterior of
    sklearn_max_posteriors, fit on at most `sklearn_max_train` training examples. Models in that order, keyed
    FLOW_METHOD, GAUSSIAN_METHOD, baselines.SKLEARN_METHODS[...]. ood_table turns them into AUROC / AUPR rows;
    negate the flow's "neg_bpd" for histograms of bits/dim.

    Cost on digits (1 thread): about a second beside the flow's own evaluation. On Fashion-MNIST (2 threads,
    1,000 images per OOD set, RESULTS.md "Out-of-distribution detection"): the flow's evaluation of the sets,
    the Gaussian's moments (twice, plus the ridge search unless gaussian_ridge is given), the logistic fit.

    Args:
        model: the mixture flow.
        data: its Splits.
        ood_sets: {name: (N, *data.data_shape) integer levels} (ood_sets.standard_ood_sets, ood_sets.other_dataset).
        batch_size: the flow's evaluation batch.
        seed: every noise draw, subsample and classifier seed.
        gaussian: include the per-class Gaussian.
        sklearn: sklearn methods (keys of baselines.SKLEARN_METHODS) for max-posterior scores; () for none.
        train_sample: training images for the typicality's H (None: all).
        scores: which of SCORES (the sklearn models have only max_posterior).
        device, draws: the flow's evaluation device and dequantisation draws.
        gaussian_copies, gaussian_ridge: the Gaussian's dequantised copies of train and its ridge.
        sklearn_max_train: the most training examples the sklearn classifiers are fit on.
        in_table: data.test's (N, K) log p(x|k) under the flow, if already computed.
    """
    scores = _check_names(scores)
    sklearn = check_sklearn_methods(sklearn)  # before any work
    _check_sets(ood_sets, data.data_shape, data.levels)
    out = {FLOW_METHOD: flow_scores(model, data, ood_sets, batch_size, seed, train_sample, names=scores,
                                    device=device, draws=draws, in_table=in_table)}
    if gaussian:
        if data.levels is None:
            log.info("continuous data: no logit-space Gaussian scores")
        else:
            alpha = getattr(model.preprocess, "alpha", ModelConfig.alpha)
            out[GAUSSIAN_METHOD] = gaussian_scores(data, ood_sets, seed, train_sample, names=scores, alpha=alpha,
                                                   copies=gaussian_copies, ridge=gaussian_ridge)
    if sklearn and "max_posterior" in scores:
        inputs = {IN_DISTRIBUTION: data.test.tensors[0], **ood_sets}
        for method, by_set in sklearn_max_posteriors(data, inputs, sklearn, seed, sklearn_max_train).items():
            out[method] = {name: {"max_posterior": s} for name, s in by_set.items()}
    return out


def ood_table(
    model: MixtureFlow, data: Splits, ood_sets: Mapping[str, Tensor], batch_size: int = 500, seed: int = 0,
    gaussian: bool = True, sklearn: Sequence[str] = ("logistic",), train_sample: int | None = 2000, **kwargs: Any,
) -> list[dict]:
    """AUROC and AUPR of every score of the flow, the per-class Gaussian and sklearn classifiers, per OOD set.

    ood_rows of each model of ood_scores (same arguments; keyword ones passed through), in-distribution
    (data.test) the positive class.

    Returns:
        Rows {"model", "score", "ood_set", "auroc", "aupr", "n_in", "n_ood"}: the flow's first (model
        FLOW_METHOD), then the Gaussian's (GAUSSIAN_METHOD), then each sklearn method's (baselines.SKLEARN_METHODS).
    """
    by_model = ood_scores(model, data, ood_sets, batch_size, seed, gaussian, sklearn, train_sample, **kwargs)
    return [row for name, by_set in by_model.items() for row in ood_rows(name, by_set)]
