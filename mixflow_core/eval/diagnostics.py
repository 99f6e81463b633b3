"""Class overlap in latent space: where the data land, and how far apart the class Gaussians are.

For two Gaussians N(mu_1, S_1), N(mu_2, S_2) (diagonal or full) with S = (S_1 + S_2) / 2:
- distance in sigma units (ClassConditionalGaussian.mean_distances, Mahalanobis under the
  average covariance): d = sqrt((mu_1 - mu_2)^T S^{-1} (mu_1 - mu_2));
- Bhattacharyya distance D_B = d^2 / 8 + 1/2 ln(det S / sqrt(det S_1 det S_2)), and the
  Bhattacharyya coefficient BC = exp(-D_B) in (0, 1], an overlap measure (1 = identical) that
  upper-bounds twice the Bayes error of the pair: P(error) <= BC / 2 for equal priors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .metrics import over_dataset
from ..flows.model import MixtureFlow
from ..flows.priors import ClassConditionalGaussian

__all__ = ["latents", "off_diagonal", "bhattacharyya", "nearer_other_fraction", "prior_overlap", "overlap_summary", "embed"]


def latents(model: MixtureFlow, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Flattened latents z = f(h(x)) (N, D) and labels (N,), eval mode, on the CPU."""
    return over_dataset(model, data, model.latent, batch_size, device)


def bhattacharyya(prior: ClassConditionalGaussian) -> Tensor:
    """(K, K) Bhattacharyya coefficients exp(-D_B) between the class Gaussians (diagonal 1), diagonal or full."""
    with torch.no_grad():
        d2, log_det_avg = (t.double().cpu() for t in prior.pair_statistics())
        log_det = prior.log_det_covariances().double().cpu()  # (K,)
    d_b = d2 / 8 + 0.5 * (log_det_avg - 0.5 * (log_det[:, None] + log_det[None, :]))
    return torch.exp(-d_b)


def nearer_other_fraction(z: Tensor, y: Tensor, prior: ClassConditionalGaussian) -> float:
    """Fraction of latents whose nearest class mean (Mahalanobis, in that class's covariance) is not their own class's."""
    with torch.no_grad():
        d2 = prior.mahalanobis_sq(z.to(prior.means)).cpu()  # (N, K)
    return float((d2.argmin(1) != y.cpu()).double().mean())


def off_diagonal(m: Tensor) -> Tensor:
    """Entries of a (K, K) matrix off its diagonal, flattened."""
    k = m.shape[0]
    return m[~torch.eye(k, dtype=torch.bool, device=m.device)]


def prior_overlap(prior: ClassConditionalGaussian) -> dict[str, float]:
    """Distances between the class means (sigma units: min, median) and Bhattacharyya coefficients (mean, max).

    The one source of these numbers: the training history records them every epoch and
    `overlap_summary` reports them, under the same keys. Empty with a single class.
    """
    with torch.no_grad():
        dist = off_diagonal(prior.mean_distances().detach().double().cpu())
    if not dist.numel():
        return {}
    bc = off_diagonal(bhattacharyya(prior))
    return {
        "mean_dist_min_sigma": float(dist.min()),
        "mean_dist_median_sigma": float(dist.median()),
        "bhattacharyya_mean": float(bc.mean()),
        "bhattacharyya_max": float(bc.max()),
    }


def overlap_summary(model: MixtureFlow, data: Dataset, batch_size: int = 500) -> dict[str, float]:
    """The study's overlap numbers for a trained model on a dataset: prior_overlap plus where the latents fall."""
    device = model.prior.means.device
    z, y = latents(model, data, batch_size, device)
    return {
        **prior_overlap(model.prior),
        "nearer_other_fraction": nearer_other_fraction(z, y, model.prior),
        "latent_norm_mean": float(z.double().norm(dim=1).mean() / math.sqrt(z.shape[1])),  # per-dim RMS
    }


def embed(z: Tensor | np.ndarray, method: str = "pca", seed: int = 0, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D embedding of latents by PCA, or t-SNE after PCA to <= 50 dims.

    `extra` points (e.g. class means) are embedded with the same PCA; t-SNE has no
    out-of-sample map, so for t-SNE they are placed at the centroid of their class's points
    by the caller (returned None here).
    """
    from sklearn.decomposition import PCA

    z = np.asarray(z, dtype=np.float64)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(z)
        return pca.transform(z), None if extra is None else pca.transform(np.asarray(extra, dtype=np.float64))
    if method == "tsne":
        from sklearn.manifold import TSNE

        reduced = PCA(n_components=min(50, z.shape[1], len(z)), random_state=seed).fit_transform(z)
        perplexity = min(30.0, max(2.0, (len(z) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced), None
    raise ValueError(f"Unknown embedding {method!r}; use pca or tsne")
