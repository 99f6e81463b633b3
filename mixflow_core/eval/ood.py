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

The same density scores come from the per-class Gaussian baseline in logit space (baselines.py: its
class_moments / logit_space / gaussian_log_likelihoods, with the ridge gaussian_test_table picks), and
max_posterior from sklearn classifiers (logistic regression, RBF-SVC through the calibrated wrapper the
baselines use, QDA).

OOD sets are pure transforms of integer-level tensors (shape, dtype and levels kept): uniform noise,
Gaussian blur, contrast inversion L-1-x, horizontal flip, and another data set resampled to this one's
shape and levels (resample_images: digits 8x8 at 17 levels <-> Fashion-MNIST 28x28 at 256 levels).
Vector data (digits: (N, 64)) is viewed as images through `image_shape` ((1, 8, 8) by default for a square
vector) and returned as vectors.

Example:
    >>> import torch
    >>> x = torch.tensor([[0, 3, 16, 8]], dtype=torch.uint8)  # one 2x2 "image" at 17 levels, as a vector
    >>> invert_contrast(x, 17).tolist(), hflip(x).tolist()
    ([[16, 13, 0, 8]], [[3, 0, 8, 16]])
    >>> auroc_aupr([2.0, 3.0, 4.0], [0.0, 1.0])  # in-distribution scores all higher: perfect
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..data import Splits
from ..flows.config import ModelConfig
from ..flows.model import MixtureFlow
from ..flows.preprocess import LogitPreprocess
from .baselines import (
    FAST_GRIDS, GAUSSIAN_METHOD, RIDGES, _flat, _probabilities, _val_score, class_moments,
    gaussian_log_likelihoods, gaussian_test_table, logit_space,
)
from .metrics import log_likelihood_table

__all__ = [
    "SCORES", "SCORE_DESCRIPTIONS", "IN_DISTRIBUTION", "FLOW_METHOD", "SKLEARN_METHODS", "SKLEARN_OOD_GRIDS",
    "SKLEARN_MAX_TRAIN", "density_scores", "typicality_score", "auroc_aupr", "ood_rows", "markdown_ood_table",
    "uniform_noise", "gaussian_blur", "invert_contrast", "hflip", "resample_images", "other_dataset",
    "standard_ood_sets", "flow_log_likelihoods", "flow_scores", "gaussian_tables", "gaussian_scores",
    "sklearn_max_posteriors", "ood_scores", "ood_table",
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
SKLEARN_METHODS: Mapping[str, str] = {"logistic": "logistic regression", "svc": "RBF-SVC", "qda": "QDA"}
# small grids (tuned by validation accuracy, first best): an OOD table should not cost a full baseline search
SKLEARN_OOD_GRIDS: Mapping[str, tuple] = {"logistic": FAST_GRIDS["logistic"], "qda": FAST_GRIDS["qda"],
                                          "svc": ((10.0, "scale"),)}
SKLEARN_MAX_TRAIN = 10_000  # sklearn classifiers are fit on at most this many (stratified) training examples


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
    n_ood: dict[str, int] = {}
    for r in rows:
        if r["ood_set"] not in sets:
            sets.append(r["ood_set"])
            n_ood[r["ood_set"]] = (r["n_ood"], r["n_in"] / (r["n_in"] + r["n_ood"]))
        lines_of.setdefault((r["model"], r["score"]), {})[r["ood_set"]] = f"{r['auroc']:.3f} / {r['aupr']:.3f}"
    lines = ["| model | score | " + " | ".join(f"{s} (n = {n_ood[s][0]}; AUPR chance {n_ood[s][1]:.3f})" for s in sets)
             + " |",
             "|---|---|" + "---|" * len(sets)]
    for (model, score), cells in lines_of.items():
        lines.append(f"| {model} | {score} | " + " | ".join(cells.get(s, "—") for s in sets) + " |")
    return "\n".join(lines)


# -- OOD sets: pure transforms of integer levels ------------------------------------------------------
def _check_levels(x: Tensor, levels: int, what: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"{what} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    xf = x.double()
    if not torch.isfinite(xf).all() or (xf != torch.round(xf)).any() or xf.min() < 0 or xf.max() > levels - 1:
        raise ValueError(f"{what} must hold integer levels in [0, {levels - 1}], got range "
                         f"[{float(xf.min()):.4g}, {float(xf.max()):.4g}]")


def _image_shape(sample_shape: tuple[int, ...], image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W) of one sample: image_shape as given ((H, W) or (C, H, W)), else the sample's own (C, H, W) /
    (H, W) shape, else a square vector as (1, side, side) (digits: 64 -> (1, 8, 8))."""
    n = math.prod(sample_shape)
    if image_shape is None:
        if len(sample_shape) in (2, 3):
            image_shape = sample_shape
        else:
            side = math.isqrt(n)
            if len(sample_shape) != 1 or side * side != n:
                raise ValueError(f"cannot view samples of shape {tuple(sample_shape)} as images; pass image_shape")
            image_shape = (side, side)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or math.prod(shape) != n:
        raise ValueError(f"image_shape {tuple(image_shape)} does not fit samples of shape {tuple(sample_shape)} "
                         f"({n} values); give (H, W) or (C, H, W)")
    return shape  # type: ignore[return-value]


def uniform_noise(x: Tensor, levels: int, seed: int = 0) -> Tensor:
    """Uniform integer noise over the levels 0..L-1, of x's shape and dtype (x's values are not used).

    Args:
        x: (N, ...) a batch whose shape and dtype the noise takes.
        levels: L.
        seed: seeds a torch.Generator (the global generator is untouched).

    Returns:
        (N, ...) i.i.d. uniform levels.
    """
    _check_levels(x, levels)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, tuple(x.shape), generator=gen).to(x.dtype)


def gaussian_blur(x: Tensor, levels: int, sigma: float = 1.0, image_shape: Sequence[int] | None = None) -> Tensor:
    """Gaussian-blurred images, re-quantised: round(blur(x)) in 0..L-1, x's shape and dtype.

    torchvision.transforms.functional.gaussian_blur with reflect padding, kernel 2 ceil(3 sigma) + 1 (at most
    2 min(H, W) - 1, as reflect padding needs), on each channel of the (C, H, W) view of a sample.

    Args:
        x: (N, ...) integer levels.
        levels: L.
        sigma: the blur's standard deviation in pixels (> 0).
        image_shape: the image view of a sample ((H, W) or (C, H, W)); None: see the module docstring.

    Returns:
        (N, ...) blurred levels.
    """
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    _check_levels(x, levels)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    c, h, w = _image_shape(tuple(x.shape[1:]), image_shape)
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * min(h, w) - 1)
    img = x.reshape(len(x), c, h, w).double()
    blurred = tv_blur(img, kernel_size=[k, k], sigma=[float(sigma), float(sigma)])
    return blurred.round().clamp(0, levels - 1).reshape(x.shape).to(x.dtype)


def invert_contrast(x: Tensor, levels: int) -> Tensor:
    """L - 1 - x (black <-> white), x's shape and dtype; an involution."""
    _check_levels(x, levels)
    return ((levels - 1) - x.to(torch.int64)).to(x.dtype)


def hflip(x: Tensor, image_shape: Sequence[int] | None = None) -> Tensor:
    """Images mirrored left-right (the W axis of the (C, H, W) view), x's shape and dtype; an involution."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    c, h, w = _image_shape(tuple(x.shape[1:]), image_shape)
    return x.reshape(len(x), c, h, w).flip(-1).reshape(x.shape)


def resample_images(
    x: Tensor, from_shape: Sequence[int], from_levels: int, to_shape: Sequence[int], to_levels: int,
) -> Tensor:
    """Images of one data set as another's: bilinear resize, then levels rescaled and rounded.

    v in 0..L_from-1 -> v / (L_from - 1) -> bilinear resize (torch.nn.functional.interpolate, align_corners
    False, antialiased when shrinking) -> round(. * (L_to - 1)). A constant image stays constant (up to the
    rounding). Channels: 1 -> C repeats the grey image, C -> 1 averages the channels.

    Args:
        x: (N, ...) integer levels 0..from_levels-1, N samples of prod(from_shape) values each.
        from_shape: a sample's shape, (C, H, W), (H, W) or a square vector (digits: (64,) = 1x8x8).
        from_levels: L_from.
        to_shape: the output sample shape, read the same way (Fashion-MNIST: (1, 28, 28)).
        to_levels: L_to.

    Returns:
        (N, *to_shape) in x's dtype, levels 0..to_levels-1.

    Example:
        >>> import torch
        >>> digits = torch.full((2, 64), 16, dtype=torch.uint8)  # white 8x8 digits at 17 levels
        >>> y = resample_images(digits, (64,), 17, (1, 28, 28), 256)
        >>> tuple(y.shape), y.dtype, int(y.min()), int(y.max())
        ((2, 1, 28, 28), torch.uint8, 255, 255)
    """
    _check_levels(x, from_levels)
    if isinstance(to_levels, bool) or not isinstance(to_levels, int) or to_levels < 2:
        raise ValueError(f"to_levels must be an int >= 2, got {to_levels!r}")
    from_shape, to_shape = tuple(from_shape), tuple(to_shape)
    if x[0].numel() != math.prod(from_shape):
        raise ValueError(f"x has samples of shape {tuple(x.shape[1:])} ({x[0].numel()} values), "
                         f"from_shape {from_shape} has {math.prod(from_shape)}")
    if not x.dtype.is_floating_point and torch.iinfo(x.dtype).max < to_levels - 1:
        raise ValueError(f"{x.dtype} cannot hold level {to_levels - 1}; cast x first")
    c0, h0, w0 = _image_shape(from_shape, None)
    c1, h1, w1 = _image_shape(to_shape, None)
    img = x.reshape(len(x), c0, h0, w0).double() / (from_levels - 1)
    if c0 != c1:
        if c0 == 1:
            img = img.expand(-1, c1, -1, -1)
        elif c1 == 1:
            img = img.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot map {c0} channels to {c1}; only 1 <-> C")
    shrink = h1 < h0 or w1 < w0
    img = torch.nn.functional.interpolate(img, size=(h1, w1), mode="bilinear", align_corners=False, antialias=shrink)
    out = (img.clamp(0, 1) * (to_levels - 1)).round()
    return out.reshape(len(x), *to_shape).to(x.dtype)


def other_dataset(
    source: Splits | Tensor, target: Splits, *, from_shape: Sequence[int] | None = None,
    from_levels: int | None = None, n: int | None = None, seed: int = 0,
) -> Tensor:
    """Another data set's images as an OOD set of `target`: resampled to target's sample shape and levels.

    Args:
        source: the other data set, a Splits (its test images, data_shape and levels are used) or a tensor
            (N, ...) of integer levels (then from_shape and from_levels are required). Loading it (e.g.
            Fashion-MNIST with data.load_data) is the caller's job.
        target: the in-distribution Splits (its data_shape and levels).
        from_shape, from_levels: the tensor source's sample shape and levels.
        n: keep at most this many images (a seeded random subset, in their original order); None: all.
        seed: the subset's seed.

    Returns:
        (n, *target.data_shape) integer levels in the source tensor's dtype (resample_images).
    """
    if isinstance(source, Splits):
        if source.levels is None:
            raise ValueError("the other data set must be quantised (levels not None)")
        x, from_shape, from_levels = source.test.tensors[0], source.data_shape, source.levels
    elif isinstance(source, Tensor):
        if from_shape is None or from_levels is None:
            raise ValueError("a tensor source needs from_shape and from_levels")
        x = source
    else:
        raise ValueError(f"source must be a Splits or a tensor, got {type(source).__name__}")
    if target.levels is None:
        raise ValueError("the in-distribution data must be quantised (levels not None)")
    x = _subset(x, n, seed, "n")
    return resample_images(x, from_shape, from_levels, target.data_shape, target.levels)


def standard_ood_sets(
    data: Splits, image_shape: Sequence[int] | None = None, seed: int = 0, sigma: float = 1.0, n: int | None = None,
) -> dict[str, Tensor]:
    """The offline OOD sets of a Splits' test images: {"uniform noise", "blurred", "inverted", "flipped"}.

    Each is a pure transform of data.test's images (uniform_noise with `seed`, gaussian_blur with `sigma`,
    invert_contrast, hflip), same shape, dtype and levels. Add another data set with other_dataset.
    n: transform at most this many test images (a seeded random subset in their original order; None: all),
    so that scoring the sets costs n images each, not the whole test set each.
    """
    if data.levels is None:
        raise ValueError("OOD transforms need quantised data (levels not None)")
    x = _subset(data.test.tensors[0], n, seed, "n")
    return {"uniform noise": uniform_noise(x, data.levels, seed),
            "blurred": gaussian_blur(x, data.levels, sigma, image_shape),
            "inverted": invert_contrast(x, data.levels),
            "flipped": hflip(x, image_shape)}


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
            _check_levels(x, levels, f"OOD set {name!r}")


def _subset(x: Tensor, n: int | None, seed: int, what: str) -> Tensor:
    """At most n rows of x, a seeded random subset in the original order (None: all)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{what} must be an int >= 1 (or None: all), got {n!r}")
    if n is None or n >= len(x):
        return x
    keep = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[torch.from_numpy(keep)]


def _train_sample(data: Splits, n: int | None, seed: int) -> Tensor:
    """At most n training images, a seeded random subset in the original order (None: all)."""
    return _subset(data.train.tensors[0], n, seed, "train_sample")


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


def gaussian_tables(
    data: Splits, inputs: Mapping[str, Tensor], alpha: float = ModelConfig.alpha, copies: int = 10, seed: int = 0,
    ridge: float | None = None, ridges: Sequence[float] = RIDGES,
) -> tuple[dict[str, Tensor], Tensor, float]:
    """(N, K) log p(x|k) of any inputs under the per-class Gaussian in logit space (baselines.gaussian_test_table's).

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


def sklearn_max_posteriors(
    data: Splits, inputs: Mapping[str, Tensor], methods: Sequence[str] = ("logistic",), seed: int = 0,
    max_train: int | None = SKLEARN_MAX_TRAIN, grids: Mapping[str, Sequence] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """max_y p(y|x) of sklearn classifiers for any inputs: the discriminative baseline of OOD detection.

    Each method is fit as baselines.sklearn_baselines fits it (inputs x / (L - 1), hyperparameter = the
    first best validation accuracy), but cheaply: on at most `max_train` training examples (a stratified
    subsample, seed `seed`) and over SKLEARN_OOD_GRIDS (logistic C in (0.1, 1); RBF-SVC C = 10, gamma
    "scale", with Platt-calibrated probabilities as in the baselines; QDA reg_param (0.1, 0.03, 0.01)).
    A method none of whose grid points can be fit (QDA on too few examples) is left out with a warning.

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

    if isinstance(methods, str):
        methods = (methods,)
    unknown = [m for m in methods if m not in SKLEARN_METHODS]
    if unknown:
        raise ValueError(f"unknown sklearn OOD baselines {unknown}; choose from {sorted(SKLEARN_METHODS)}")
    scale = 1.0 / (data.levels - 1) if data.levels is not None else 1.0
    (x_tr, y_tr), (x_va, y_va) = ((x.numpy() * scale, y.numpy()) for x, y in (_flat(data.train), _flat(data.val)))
    if max_train is not None and max_train < len(y_tr):
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=max_train, stratify=y_tr, random_state=seed)
    xs = {}
    for name, x in inputs.items():
        if not isinstance(x, Tensor) or x.dim() < 2 or x[0].numel() != x_tr.shape[1]:
            raise ValueError(f"input {name!r} must have {x_tr.shape[1]} values per sample, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        xs[name] = x.reshape(len(x), -1).double().numpy() * scale
    out = {}
    for method in methods:
        grid = list((grids or {}).get(method, SKLEARN_OOD_GRIDS[method]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Variables are collinear")
            best, clf, param = float("-inf"), None, None
            for p in grid:
                score, fitted = _val_score(method, p, seed, x_tr, y_tr, x_va, y_va)
                if fitted is not None and (clf is None or score > best):
                    best, clf, param = score, fitted, p
            if clf is None:
                log.warning("%s: no grid point could be fit on %d training examples; left out",
                            SKLEARN_METHODS[method], len(y_tr))
                continue
            prob_model = _probabilities(method, clf, param, seed, x_tr, y_tr)
            out[SKLEARN_METHODS[method]] = {name: prob_model.predict_proba(x).max(1).astype(np.float64)
                                            for name, x in xs.items()}
    return out


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
    FLOW_METHOD, GAUSSIAN_METHOD, SKLEARN_METHODS[...]. ood_table turns them into AUROC / AUPR rows;
    negate the flow's "neg_bpd" for histograms of bits/dim.

    Cost on digits (1 thread): about a second beside the flow's own evaluation. On Fashion-MNIST (2 threads,
    1,000 images per OOD set, RESULTS.md "Out-of-distribution detection"): the flow's evaluation of the sets,
    the Gaussian's moments (twice, plus the ridge search unless gaussian_ridge is given), the logistic fit.

    Args:
        model: the mixture flow.
        data: its Splits.
        ood_sets: {name: (N, *data.data_shape) integer levels} (standard_ood_sets, other_dataset).
        batch_size: the flow's evaluation batch.
        seed: every noise draw, subsample and classifier seed.
        gaussian: include the per-class Gaussian.
        sklearn: sklearn methods (keys of SKLEARN_METHODS) for max-posterior scores; () for none.
        train_sample: training images for the typicality's H (None: all).
        scores: which of SCORES (the sklearn models have only max_posterior).
        device, draws: the flow's evaluation device and dequantisation draws.
        gaussian_copies, gaussian_ridge: the Gaussian's dequantised copies of train and its ridge.
        sklearn_max_train: the most training examples the sklearn classifiers are fit on.
        in_table: data.test's (N, K) log p(x|k) under the flow, if already computed.
    """
    scores = _check_names(scores)
    sklearn = (sklearn,) if isinstance(sklearn, str) else tuple(sklearn)
    unknown = [m for m in sklearn if m not in SKLEARN_METHODS]
    if unknown:  # before any work
        raise ValueError(f"unknown sklearn OOD baselines {unknown}; choose from {sorted(SKLEARN_METHODS)}")
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
        FLOW_METHOD), then the Gaussian's (GAUSSIAN_METHOD), then each sklearn method's (SKLEARN_METHODS).
    """
    by_model = ood_scores(model, data, ood_sets, batch_size, seed, gaussian, sklearn, train_sample, **kwargs)
    return [row for name, by_set in by_model.items() for row in ood_rows(name, by_set)]
