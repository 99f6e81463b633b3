"""Overlap diagnostics against independent computations."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mixflow_core import MLP, ClassConditionalGaussian, ModelConfig, PriorConfig, build_model
from mixflow_core.data import DataConfig, load_data
from mixflow_core.eval.diagnostics import (
    bhattacharyya, embed, latents, nearer_other_fraction, overlap_summary, prior_overlap,
)


def _prior(means, log_scales) -> ClassConditionalGaussian:
    means = torch.as_tensor(means, dtype=torch.float64)
    prior = ClassConditionalGaussian(means.shape[0], means.shape[1], PriorConfig(init="zeros", learn_scales=True))
    with torch.no_grad():
        prior.means.copy_(means)
        prior.log_scales.copy_(torch.as_tensor(log_scales, dtype=torch.float64))
    return prior


def test_bhattacharyya_equals_integral_of_sqrt_pq() -> None:
    """BC = integral sqrt(p q) dz, a product over dimensions for diagonal Gaussians (grid quadrature)."""
    means = [[0.0, 1.0], [1.5, -0.5], [0.2, 0.9]]
    log_scales = [[0.0, -0.3], [0.4, 0.1], [-0.2, 0.0]]
    bc = bhattacharyya(_prior(means, log_scales)).numpy()
    grid = np.linspace(-15, 15, 200001)
    dx = grid[1] - grid[0]
    for j in range(3):
        for k in range(3):
            want = 1.0
            for d in range(2):
                p = norm.pdf(grid, means[j][d], np.exp(log_scales[j][d]))
                q = norm.pdf(grid, means[k][d], np.exp(log_scales[k][d]))
                want *= np.sqrt(p * q).sum() * dx
            assert bc[j, k] == pytest.approx(want, rel=1e-7)
    assert np.allclose(np.diag(bc), 1.0)


def test_bhattacharyya_of_unit_gaussians_is_exp_minus_d2_over_8() -> None:
    prior = _prior([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], torch.zeros(2, 3))
    assert float(bhattacharyya(prior)[0, 1]) == pytest.approx(np.exp(-25 / 8), rel=1e-12)


def test_nearer_other_fraction_counts_latents_closer_to_another_mean() -> None:
    prior = _prior([[0.0, 0.0], [4.0, 0.0]], [[0.0, 0.0], [np.log(2.0), 0.0]])
    # class-1 sigma is 2 along x: z = (2.5, 0) is 2.5 sigma from mean 0 and 0.75 sigma from mean 1
    z = torch.tensor([[0.5, 0.0], [2.5, 0.0], [3.9, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert nearer_other_fraction(z, y, prior) == pytest.approx(2 / 4)  # rows 1 and 3 are misplaced


def test_overlap_summary_and_latents_on_a_small_model() -> None:
    data = load_data(DataConfig("digits", train_limit=200))
    cfg = ModelConfig(arch=MLP(n_blocks=1, hidden=(8,)))
    model = build_model(data.data_shape, 10, 17, cfg, PriorConfig(init="orthogonal"))
    z, y = latents(model, data.val)
    assert z.shape == (len(data.val), 64) and torch.equal(y, data.val.tensors[1])
    summary = overlap_summary(model, data.val)
    assert summary["mean_dist_min_sigma"] == pytest.approx(5.0, abs=1e-9)  # orthogonal init: exactly 5 sigma apart
    assert summary["mean_dist_median_sigma"] == pytest.approx(5.0, abs=1e-9)
    assert summary["bhattacharyya_mean"] == pytest.approx(np.exp(-25 / 8), rel=1e-9)
    assert 0.0 <= summary["nearer_other_fraction"] <= 1.0
    overlap = prior_overlap(model.prior)  # the one source of the prior's numbers (the history records them too)
    assert set(overlap) == {"mean_dist_min_sigma", "mean_dist_median_sigma", "bhattacharyya_mean", "bhattacharyya_max"}
    assert {k: summary[k] for k in overlap} == overlap


def test_embed_pca_and_tsne() -> None:
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 1, (40, 6)), rng.normal(8, 1, (40, 6))])
    points, extra = embed(z, "pca", extra=np.array([[0.0] * 6, [8.0] * 6]))
    assert points.shape == (80, 2) and extra.shape == (2, 2)
    # PCA keeps the separating direction: the two groups are far apart along the first component
    assert abs(points[:40, 0].mean() - points[40:, 0].mean()) > 10
    tsne, none = embed(z, "tsne", seed=0)
    assert tsne.shape == (80, 2) and none is None
    with pytest.raises(ValueError, match="Unknown embedding"):
        embed(z, "umap")
