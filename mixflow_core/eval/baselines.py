"""Baselines on the flow's own splits: a per-class Gaussian in the flow's logit space, and sklearn classifiers.

Per-class Gaussian: h = logit(a + (1 - 2a)(x + u)/L), u ~ U[0, 1)^D (LogitPreprocess's map), and
log p(x|k) = log N(h; mu_k, S_k + r I) + log|dh/dx| - D log L, so its bits/dim are a bound on the
discrete data exactly like the flow's (one noise draw per evaluated example). mu_k, S_k come from
`copies` dequantised copies of the training set, the ridge r by validation bits/dim, p(k) are the
fit data's class frequencies; accuracy, bits/dim and ECE come from mixflow_core.metrics on the
(N, K) table, as for the flow.

sklearn classifiers (QDA, logistic regression, RBF-SVC) see x / (L - 1) (x as is for continuous
data), hyperparameters tuned by validation accuracy; they give accuracy and ECE, no bits/dim.

For OOD detection (eval.ood) the same models score any inputs: gaussian_tables (the Gaussian's log p(x|k)
of named input sets) and sklearn_max_posteriors (max_y p(y|x) of cheaply fit classifiers).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal
from torch.utils.data import TensorDataset

from ..flows.config import ModelConfig
from ..data import Splits
from .metrics import accuracy, bits_per_dim, expected_calibration_error, reliability_bins
from ..flows.preprocess import LogitPreprocess
from ..flows.priors import ClassMoments, class_moments

__all__ = [
    "RIDGES", "SKLEARN_GRIDS", "ClassMoments", "logit_space", "class_moments", "gaussian_log_likelihoods",
    "gaussian_baseline", "gaussian_test_table", "gaussian_samples", "sklearn_baselines", "baseline_table",
    "FAST_GRIDS", "SKLEARN_METHODS", "SKLEARN_OOD_GRIDS", "SKLEARN_MAX_TRAIN", "gaussian_tables",
    "check_sklearn_methods", "sklearn_max_posteriors",
]

log = logging.getLogger(__name__)

RIDGES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 1.0)  # candidate ridges r of S_k + r I
# each grid runs from the strongest regularisation to the weakest; ties on validation go to the first
SKLEARN_GRIDS: Mapping[str, tuple] = {
    "qda": (0.8, 0.5, 0.3, 0.2, 0.1, 0.03, 0.01, 0.001),  # reg_param
    "logistic": (0.01, 0.1, 1.0, 10.0, 100.0),  # C
    "svc": tuple((c, g) for c in (1.0, 10.0, 100.0) for g in (0.01, 0.03, "scale", 0.1)),  # (C, gamma)
}
_SKLEARN_NAMES = {"qda": "QDA (reg_param)", "logistic": "logistic regression (C)", "svc": "RBF-SVC (C, gamma)"}
GAUSSIAN_METHOD = "per-class Gaussian (logit space)"


# -- the per-class Gaussian in logit space -------------------------------------------------------------
def logit_space(x: Tensor, u: Tensor, levels: int, alpha: float) -> tuple[Tensor, Tensor]:
    """h = logit(a + (1 - 2a)(x + u)/L) (N, D) and log|dh/dx| - D log L (N,): LogitPreprocess at noise u.

    x: (N, D) levels 0..L-1, u: (N, D) in [0, 1). The flow's own module does the maths (written once):
    without dequantisation it puts x at its bin midpoint x + 1/2, so x + (u - 1/2) lands on x + u.
    """
    return LogitPreprocess(levels, alpha, dequantize=False)(x + (u - 0.5))


def gaussian_log_likelihoods(h: Tensor, moments: ClassMoments, ridge: float) -> Tensor:
    """log N(h; mu_k, S_k + ridge I) for every class k: (N, K), float64."""
    eye = torch.eye(h.shape[1], dtype=torch.float64)
    columns = []
    for mu, cov in zip(moments.means, moments.covs):  # one class at a time: memory N x D, not N x K x D
        normal = MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov + ridge * eye))
        columns.append(normal.log_prob(h.double()))
    return torch.stack(columns, 1)


def _flat(ds: TensorDataset) -> tuple[Tensor, Tensor]:
    """(x flattened to (N, D) in float64, y (N,)): vectors and (C, H, W) images alike."""
    x, y = ds.tensors
    return x.reshape(len(x), -1).double(), y.long()


def _table_metrics(table: Tensor, y: Tensor, log_py: Tensor, dim: int) -> dict:
    return {
        "accuracy": accuracy(table, y, log_py),
        "bpd_conditional": bits_per_dim(table, y, log_py, dim),
        "bpd_marginal": bits_per_dim(table, None, log_py, dim),
        "ece": expected_calibration_error(table, y, log_py),
        "reliability": reliability_bins(table, y, log_py),  # the reliability diagram's bins (its "ece" is the above)
    }


def gaussian_baseline(
    data: Splits, alpha: float = ModelConfig.alpha, copies: int = 10, seed: int = 0,
    ridges: Sequence[float] = RIDGES, refit_on_val: bool = False, draws: int = 1,
) -> dict:
    """Per-class full-covariance Gaussian in the flow's logit space, evaluated on test like the flow.

    The metrics of `gaussian_test_table` (see there for the model, the noise and `draws`).
    Returns {"method", "accuracy", "bpd_conditional", "bpd_marginal", "ece", "ridge", "n", "draws",
    "val_accuracy", "val_bpd_conditional" (at the chosen ridge; None when refit on val), "reliability"
    (metrics.reliability_bins of its test posteriors)}.
    """
    table, y_te, log_py, info = gaussian_test_table(data, alpha, copies, seed, ridges, refit_on_val, draws)
    return {"method": info["method"], **_table_metrics(table, y_te, log_py, info["dim"]),
            "ridge": info["ridge"], "n": len(y_te), "draws": draws,
            "val_accuracy": info["val_accuracy"], "val_bpd_conditional": info["val_bpd_conditional"]}


def gaussian_test_table(
    data: Splits, alpha: float = ModelConfig.alpha, copies: int = 10, seed: int = 0,
    ridges: Sequence[float] = RIDGES, refit_on_val: bool = False, draws: int = 1,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Per-class full-covariance Gaussian in the flow's logit space, evaluated on test like the flow.

    log p(x|k) = log N(h; mu_k, S_k + r I) + log|dh/dx| - D log L with h = logit(a + (1-2a)(x+u)/L).
    mu_k, S_k from `copies` dequantised copies of train; r = the first of `ridges` with the least
    validation bits/dim; test uses one noise draw per example. With `refit_on_val` the Gaussian is
    refit on train+val (copies drawn after the test noise) with that r. Noise comes from
    numpy.random.default_rng(seed) in a fixed order: train copies, val, test, then train+val copies.
    `draws` > 1 scores test like metrics.log_likelihood_table(draws=S): log (1/S) sum_s p(x + u_s | k)
    (importance-weighted over dequantisation draws; the S - 1 extra draws come last, so draws=1
    results are unchanged).

    Returns (log p(x|k) on test (N, K) float64, test labels (N,), log p(k) (K,), info) with info =
    {"method", "ridge", "dim", "val_accuracy", "val_bpd_conditional"}: the per-image table lets
    callers compare predictions image by image (benchmarks/digits_splits.py).
    """
    if data.levels is None:
        raise ValueError("the logit-space Gaussian needs quantised data (integer levels); this data set is "
                         "continuous (levels None): use sklearn_baselines for it")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if len(ridges) == 0:
        raise ValueError("ridges must name at least one ridge")
    pre = LogitPreprocess(data.levels, alpha)  # validates levels and alpha
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (_flat(ds) for ds in (data.train, data.val, data.test))
    for x in (x_tr, x_va, x_te):
        pre.check(x)
    k, dim = data.num_classes, x_tr.shape[1]
    rng = np.random.default_rng(seed)

    def noisy(x: Tensor) -> tuple[Tensor, Tensor]:
        return logit_space(x, torch.from_numpy(rng.random(tuple(x.shape))), data.levels, alpha)

    # class_moments consumes the generator before the val/test draws below: the draw order is fixed
    fit = class_moments(((noisy(x_tr)[0], y_tr) for _ in range(copies)), k)
    h_va, ld_va = noisy(x_va)
    h_te, ld_te = noisy(x_te)
    log_py = fit.log_class_probs()
    val = {r: _table_metrics(gaussian_log_likelihoods(h_va, fit, r) + ld_va[:, None], y_va, log_py, dim)
           for r in ridges}
    best = min(ridges, key=lambda r: val[r]["bpd_conditional"])  # first minimum
    method = GAUSSIAN_METHOD
    if refit_on_val:
        x_all, y_all = torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])
        fit = class_moments(((noisy(x_all)[0], y_all) for _ in range(copies)), k)
        log_py = fit.log_class_probs()
        method += ", refit on train+val"
    tables = [gaussian_log_likelihoods(h_te, fit, best) + ld_te[:, None]]
    for _ in range(draws - 1):
        h, ld = noisy(x_te)
        tables.append(gaussian_log_likelihoods(h, fit, best) + ld[:, None])
    table = torch.logsumexp(torch.stack(tables), 0) - math.log(draws)
    info = {"method": method, "ridge": best, "dim": dim,
            "val_accuracy": None if refit_on_val else val[best]["accuracy"],
            "val_bpd_conditional": None if refit_on_val else val[best]["bpd_conditional"]}
    return table, y_te, log_py, info


def gaussian_samples(
    data: Splits, n_per_class: int, temperature: float = 1.0, alpha: float = ModelConfig.alpha,
    ridge: float | None = None, copies: int = 10, seed: int = 0, ridges: Sequence[float] = RIDGES,
) -> tuple[Tensor, Tensor]:
    """Samples of the per-class Gaussian: h = mu_k + T L_k eps, L_k L_k^T = S_k + r I, x = the bin of h.

    mu_k, S_k are the moments `gaussian_test_table` fits (the same `copies` dequantised copies of train
    in logit space, drawn first from numpy.random.default_rng(seed), so the same seed gives the same
    Gaussian); eps ~ N(0, I) continues that generator, class after class. h maps back to levels by
    LogitPreprocess.inverse: y = (sigmoid(h) - a) / (1 - 2a), x = clamp(floor(L y), 0, L - 1).
    T = 1 samples the fitted density, T < 1 shrinks towards the class mean (T = 0: the mean's bin).
    Cost (1 thread, loaded 2-core machine): digits 0.1 s; Fashion-MNIST, copies=2, 1000 per class
    ~30 s given the ridge, plus ~90 s to pick it (it picks 0.001 there).

    Args:
        data: the splits (quantised data: levels not None); only train is used, plus val to pick r.
        n_per_class: samples per class.
        temperature: T >= 0.
        alpha: the logit margin a (the flow's ModelConfig.alpha).
        ridge: r; None picks it as gaussian_baseline does (least validation bits/dim over `ridges`,
            which costs one more fit of the baseline: pass the ridge to skip it).
        copies: dequantised copies of train for the moments.
        seed: the generator of the dequantisation noise and of eps.
        ridges: the candidates when ridge is None.

    Returns:
        (images (K * n_per_class, *data.data_shape) in the training images' dtype, labels (K * n_per_class,)
        int64, class 0's samples first).
    """
    if data.levels is None:
        raise ValueError("the logit-space Gaussian needs quantised data (integer levels); this data set is "
                         "continuous (levels None)")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an int >= 1, got {n_per_class!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if ridge is None:
        ridge = gaussian_test_table(data, alpha, copies, seed, ridges)[3]["ridge"]
    elif not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    pre = LogitPreprocess(data.levels, alpha)  # validates alpha; its inverse maps h back to levels
    x_tr, y_tr = _flat(data.train)
    pre.check(x_tr)
    rng = np.random.default_rng(seed)
    fit = class_moments(((logit_space(x_tr, torch.from_numpy(rng.random(tuple(x_tr.shape))), data.levels, alpha)[0],
                          y_tr) for _ in range(copies)), data.num_classes)
    eye = torch.eye(x_tr.shape[1], dtype=torch.float64)
    images = []
    for mu, cov in zip(fit.means, fit.covs):
        chol = torch.linalg.cholesky(cov + ridge * eye)  # (D, D)
        eps = torch.from_numpy(rng.standard_normal((n_per_class, x_tr.shape[1])))  # (n, D)
        images.append(pre.inverse(mu + temperature * eps @ chol.T))
    x = torch.cat(images).reshape(-1, *data.data_shape).to(data.train.tensors[0].dtype)
    return x, torch.arange(data.num_classes).repeat_interleave(n_per_class)


# -- sklearn classifiers -------------------------------------------------------------------------------
def _make_classifier(method: str, param, seed: int):
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    if method == "qda":
        return QuadraticDiscriminantAnalysis(reg_param=param)
    if method == "logistic":
        return LogisticRegression(C=param, max_iter=5000, random_state=seed)
    return SVC(C=param[0], gamma=param[1])  # deterministic: no random_state needed


def _probabilities(method: str, fitted, param, seed: int, x_tr: np.ndarray, y_tr: np.ndarray):
    """The model whose predict_proba gives p(k|x): the fitted classifier, or for the SVC (no probabilities
    of its own; SVC(probability=True) is deprecated in sklearn 1.9) its Platt-scaled decision values."""
    if method != "svc":
        return fitted
    from sklearn.calibration import CalibratedClassifierCV

    # ensemble=False: one SVC on all of train (the one predict uses), sigmoids fit on 5-fold CV decisions
    return CalibratedClassifierCV(_make_classifier(method, param, seed), ensemble=False).fit(x_tr, y_tr)


def _val_score(method: str, param, seed: int, x_tr, y_tr, x_va, y_va):
    """(validation accuracy, the fitted classifier), or (-inf, None) where the fit is impossible (QDA with fewer
    examples per class than features)."""
    try:
        clf = _make_classifier(method, param, seed).fit(x_tr, y_tr)
        return clf.score(x_va, y_va), clf
    except np.linalg.LinAlgError as err:
        log.info("%s %r cannot be fit: %s", method, param, err)
        return float("-inf"), None


def _sklearn_view(data: Splits, x: Tensor) -> np.ndarray:
    """What the sklearn classifiers see of inputs x: (N, D) float64 x / (L - 1) (x as is for continuous data)."""
    scale = 1.0 / (data.levels - 1) if data.levels is not None else 1.0
    return x.reshape(len(x), -1).double().numpy() * scale


def _sklearn_split(data: Splits, ds: TensorDataset) -> tuple[np.ndarray, np.ndarray]:
    """(_sklearn_view of a split's inputs, its labels as int64 numpy)."""
    x, y = ds.tensors
    return _sklearn_view(data, x), y.long().numpy()


def _fit_first_best(method: str, grid: Sequence, seed: int, x_tr, y_tr, x_va, y_va, name: str):
    """The classifier of the first best validation accuracy over `grid`: (fitted, prob_model, index, accuracies).

    prob_model gives p(k|x) (_probabilities); accuracies has one entry per grid point, -inf where the fit is
    impossible; fitted and prob_model are None (index -1), with a warning naming the method by `name`, where no
    grid point can be fit (QDA with fewer examples per class than features): the caller leaves the method out.
    """
    with warnings.catch_warnings():
        # QDA warns about collinear variables at small reg_param (constant border pixels)
        warnings.filterwarnings("ignore", message="Variables are collinear")
        scores, clf = [], None
        for p in grid:  # the first best fit is kept (deterministic: refitting it would give the same model)
            score, fitted = _val_score(method, p, seed, x_tr, y_tr, x_va, y_va)
            if fitted is not None and (clf is None or score > max(scores)):
                clf = fitted
            scores.append(score)
        if clf is None:
            log.warning("%s: no grid point could be fit on %d training examples; left out", name, len(y_tr))
            return None, None, -1, scores
        i = int(np.argmax(scores))  # first maximum: the kept fit
        return clf, _probabilities(method, clf, grid[i], seed, x_tr, y_tr), i, scores


def sklearn_baselines(
    data: Splits, seed: int = 0, methods: Sequence[str] = ("qda", "logistic"),
    grids: Mapping[str, Sequence] | None = None,
) -> list[dict]:
    """sklearn classifiers fit on train, hyperparameter = first best validation accuracy over its grid.

    methods: "qda" (reg_param), "logistic" (C), "svc" (RBF, (C, gamma)); grids override SKLEARN_GRIDS
    per method. Inputs x / (L - 1), or x for continuous data. Accuracy from predict, ECE from
    predict_proba (through metrics.expected_calibration_error); for the SVC, of Platt-calibrated
    decision values (CalibratedClassifierCV, ensemble=False), whose argmax may differ from predict. Each row: {"method", "accuracy",
    "bpd_conditional": None, "bpd_marginal": None, "ece", "n", "param", "val_accuracy",
    "val_grid_accuracy" (one per grid point; -inf where the fit is impossible), "reliability"
    (metrics.reliability_bins of the predict_proba posteriors)}. A method none of whose
    grid points can be fit (QDA with fewer examples per class than features) is left out, with a warning.
    """
    unknown = [m for m in methods if m not in SKLEARN_GRIDS]
    if unknown:
        raise ValueError(f"unknown sklearn baselines {unknown}; choose from {sorted(SKLEARN_GRIDS)}")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (_sklearn_split(data, ds) for ds in (data.train, data.val, data.test))
    rows = []
    for method in methods:
        grid = list((grids or {}).get(method, SKLEARN_GRIDS[method]))
        name = _SKLEARN_NAMES[method]
        clf, prob_model, i, scores = _fit_first_best(method, grid, seed, x_tr, y_tr, x_va, y_va, name)
        if clf is None:
            continue
        pred, proba = clf.predict(x_te), prob_model.predict_proba(x_te)
        probs = torch.zeros(len(y_te), data.num_classes, dtype=torch.float64)
        probs[:, torch.as_tensor(prob_model.classes_)] = torch.from_numpy(proba).double()  # classes absent from train: 0
        zeros = torch.zeros(data.num_classes, dtype=torch.float64)  # probs is already p(k|x)
        rows.append({
            "method": name, "accuracy": float((pred == y_te).mean()),
            "bpd_conditional": None, "bpd_marginal": None,
            "ece": expected_calibration_error(torch.log(probs), torch.from_numpy(y_te), zeros),
            "reliability": reliability_bins(torch.log(probs), torch.from_numpy(y_te), zeros),
            "n": len(y_te), "param": grid[i], "val_accuracy": float(scores[i]),
            "val_grid_accuracy": [float(s) for s in scores],
        })
    return rows


# -- both ----------------------------------------------------------------------------------------------
SVC_MAX_TRAIN = 10_000  # baseline_table fits the RBF-SVC grid only up to this many training examples
FAST_GRIDS: Mapping[str, tuple] = {"qda": (0.1, 0.03, 0.01), "logistic": (0.1, 1.0)}


def baseline_table(
    data: Splits, seed: int = 0, fast: bool = False, draws: int = 1, gaussian: bool = True, sklearn: bool = True,
) -> list[dict]:
    """The Gaussian row (quantised data only) then QDA, logistic regression and RBF-SVC rows.

    fast: 2 dequantised copies, QDA and logistic regression on FAST_GRIDS (a few seconds on digits, for
    tests and smoke notebooks; minutes on Fashion-MNIST); otherwise 10 copies, SKLEARN_GRIDS, and
    the RBF-SVC only up to SVC_MAX_TRAIN training examples.
    draws: dequantisation draws of the Gaussian's test scores (match the flow's train.eval_draws).
    gaussian, sklearn: include the Gaussian row / the sklearn rows (e.g. the Gaussian alone per noise seed: the
    sklearn classifiers do not depend on it).
    """
    rows = []
    if gaussian and data.levels is None:
        log.info("continuous data: no logit-space Gaussian row")
    elif gaussian:
        # every ridge in both modes (one Cholesky each); fast saves on the noise copies and the sklearn grids
        rows.append(gaussian_baseline(data, copies=2 if fast else 10, seed=seed, draws=draws))
    if not sklearn:
        return rows
    if fast:
        rows += sklearn_baselines(data, seed, methods=tuple(FAST_GRIDS), grids=FAST_GRIDS)
    else:
        svc = len(data.train) <= SVC_MAX_TRAIN  # a kernel SVC grid on 54k images would take hours
        if not svc:
            log.info("%d training examples: RBF-SVC left out (more than %d)", len(data.train), SVC_MAX_TRAIN)
        rows += sklearn_baselines(data, seed, methods=("qda", "logistic", "svc") if svc else ("qda", "logistic"))
    return rows


# -- OOD detection (eval.ood): the baselines' densities and posteriors of any inputs ------------------------
SKLEARN_METHODS: Mapping[str, str] = {"logistic": "logistic regression", "svc": "RBF-SVC", "qda": "QDA"}
# small grids (tuned by validation accuracy, first best): an OOD table should not cost a full baseline search
SKLEARN_OOD_GRIDS: Mapping[str, tuple] = {"logistic": FAST_GRIDS["logistic"], "qda": FAST_GRIDS["qda"],
                                          "svc": ((10.0, "scale"),)}
SKLEARN_MAX_TRAIN = 10_000  # sklearn_max_posteriors fits on at most this many (stratified) training examples


def gaussian_tables(
    data: Splits, inputs: Mapping[str, Tensor], alpha: float = ModelConfig.alpha, copies: int = 10, seed: int = 0,
    ridge: float | None = None, ridges: Sequence[float] = RIDGES,
) -> tuple[dict[str, Tensor], Tensor, float]:
    """(N, K) log p(x|k) of any inputs under the per-class Gaussian in logit space (gaussian_test_table's).

    The Gaussian is gaussian_test_table's: moments of `copies` dequantised copies of train from
    numpy.random.default_rng(seed), ridge r chosen there on validation bits/dim (one more fit; pass `ridge`
    to skip it). The generator then skips the validation draw and gives each input one noise draw, in the
    order of `inputs`: with data.test first (and ridge the chosen one) its table equals gaussian_test_table's.

    Args:
        data: quantised Splits (levels not None).
        inputs: {name: (N, ...) integer levels with data.data_shape's number of values per sample}.
        alpha: the logit margin (the flow's ModelConfig.alpha).
        copies, seed, ridges: as gaussian_test_table.
        ridge: r; None chooses it as gaussian_test_table does.

    Returns:
        ({name: (N, K) float64 log p(x|k)}, log p(k) (K,) the training class frequencies, the ridge r).
    """
    if data.levels is None:
        raise ValueError("the logit-space Gaussian needs quantised data (integer levels); this data set is "
                         "continuous (levels None)")
    if ridge is None:
        ridge = gaussian_test_table(data, alpha, copies, seed, ridges)[3]["ridge"]
    elif not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    pre = LogitPreprocess(data.levels, alpha)
    (x_tr, y_tr), (x_va, _) = _flat(data.train), _flat(data.val)
    dim = x_tr.shape[1]
    rng = np.random.default_rng(seed)

    def noisy(x: Tensor) -> tuple[Tensor, Tensor]:
        return logit_space(x, torch.from_numpy(rng.random(tuple(x.shape))), data.levels, alpha)

    fit = class_moments(((noisy(x_tr)[0], y_tr) for _ in range(copies)), data.num_classes)
    rng.random(tuple(x_va.shape))  # gaussian_test_table's validation draw: keeps its test noise for data.test
    hs, logdets = [], []
    for name, x in inputs.items():
        if not isinstance(x, Tensor) or x.dim() < 2 or x[0].numel() != dim:
            raise ValueError(f"input {name!r} must have {dim} values per sample, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        xf = x.reshape(len(x), -1).double()
        pre.check(xf)
        h, logdet = noisy(xf)
        hs.append(h)
        logdets.append(logdet)
    # all inputs in one call: each class covariance is factorised once, not once per input set
    table = gaussian_log_likelihoods(torch.cat(hs), fit, ridge) + torch.cat(logdets)[:, None]
    tables = dict(zip(inputs, torch.split(table, [len(h) for h in hs])))
    return tables, fit.log_class_probs(), float(ridge)


def check_sklearn_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """The sklearn OOD baselines asked for, as a tuple of SKLEARN_METHODS keys; ValueError on an unknown one."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in methods if m not in SKLEARN_METHODS]
    if unknown:
        raise ValueError(f"unknown sklearn OOD baselines {unknown}; choose from {sorted(SKLEARN_METHODS)}")
    return methods


def sklearn_max_posteriors(
    data: Splits, inputs: Mapping[str, Tensor], methods: Sequence[str] = ("logistic",), seed: int = 0,
    max_train: int | None = SKLEARN_MAX_TRAIN, grids: Mapping[str, Sequence] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """max_y p(y|x) of sklearn classifiers for any inputs: the discriminative baseline of OOD detection.

    Each method is fit as sklearn_baselines fits it (inputs x / (L - 1), hyperparameter = the first best
    validation accuracy), but cheaply: on at most `max_train` training examples (a stratified subsample, seed
    `seed`) and over SKLEARN_OOD_GRIDS (logistic C in (0.1, 1); RBF-SVC C = 10, gamma "scale", with
    Platt-calibrated probabilities as in the baselines; QDA reg_param (0.1, 0.03, 0.01)). A method none of
    whose grid points can be fit (QDA on too few examples) is left out with a warning.

    Args:
        data: the Splits (train to fit, val to tune).
        inputs: {name: (N, ...) inputs with data.data_shape's number of values per sample}.
        methods: keys of SKLEARN_METHODS.
        seed: the subsample's and classifiers' seed.
        max_train: the most training examples fit on (None: all).
        grids: per-method grid overrides.

    Returns:
        {SKLEARN_METHODS[method]: {input name: (N,) max_y p(y|x), float64}}.
    """
    from sklearn.model_selection import train_test_split

    methods = check_sklearn_methods(methods)
    (x_tr, y_tr), (x_va, y_va) = (_sklearn_split(data, ds) for ds in (data.train, data.val))
    if max_train is not None and max_train < len(y_tr):
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=max_train, stratify=y_tr, random_state=seed)
    xs = {}
    for name, x in inputs.items():
        if not isinstance(x, Tensor) or x.dim() < 2 or x[0].numel() != x_tr.shape[1]:
            raise ValueError(f"input {name!r} must have {x_tr.shape[1]} values per sample, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        xs[name] = _sklearn_view(data, x)
    out = {}
    for method in methods:
        grid = list((grids or {}).get(method, SKLEARN_OOD_GRIDS[method]))
        prob_model = _fit_first_best(method, grid, seed, x_tr, y_tr, x_va, y_va, SKLEARN_METHODS[method])[1]
        if prob_model is not None:
            out[SKLEARN_METHODS[method]] = {name: prob_model.predict_proba(x).max(1).astype(np.float64)
                                            for name, x in xs.items()}
    return out
