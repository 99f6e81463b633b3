"""Full class covariances (PriorConfig(covariance="full")) and the data-dependent init="moments",
against independent computations: scipy densities, numpy linear algebra, grid quadrature,
sample statistics, and class moments of latents computed outside the library."""

import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from scipy.stats import multivariate_normal
from torch import nn

from mixflow_core import ClassConditionalGaussian, Conv, MixtureFlow, ModelConfig, PriorConfig, build_model
from mixflow_core.data import DataConfig, Splits, load_data
from mixflow_core.eval.diagnostics import bhattacharyya, latents, nearer_other_fraction
from mixflow_core.study.analysis import gaussian_panel
from mixflow_core.study.plotting import _projected_ellipse, fig_gaussian_ellipses
from mixflow_core.training.checkpoint import load_checkpoint
from mixflow_core.training.config import RunConfig, apply_overrides
from mixflow_core.training.fit import _init_actnorm, _init_prior, fit
from mixflow_core.training.profiles import get_profile

CPU = torch.device("cpu")
FULL_LEARNED = dict(init="student", learn_means=True, learn_scales=True, covariance="full")


# -- helpers -----------------------------------------------------------------------------------


def random_full_prior(k: int, d: int, seed: int = 0) -> ClassConditionalGaussian:
    """A full-covariance prior with random means, log-scales and below-diagonal entries of L.

    Entries of `tril` on and above the diagonal are set to garbage too: L must ignore them.
    """
    prior = ClassConditionalGaussian(k, d, PriorConfig(**FULL_LEARNED))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.means.copy_(2.0 * torch.randn(k, d, generator=g))
        prior.log_scales.copy_(0.3 * torch.randn(k, d, generator=g))
        prior.tril.copy_(0.7 * torch.randn(k, d, d, generator=g))
    return prior


def set_full(prior: ClassConditionalGaussian, means, chol) -> ClassConditionalGaussian:
    """Set mu_k and the lower-triangular factors L_k of a full prior (log_scales = log diag L)."""
    means, chol = torch.as_tensor(np.asarray(means, dtype=np.float64)), torch.as_tensor(np.asarray(chol, dtype=np.float64))
    with torch.no_grad():
        prior.means.copy_(means)
        prior.log_scales.copy_(torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)))
        prior.tril.copy_(chol)
    return prior


def factors(prior: ClassConditionalGaussian) -> np.ndarray:
    """L_k = strictly-lower part of `tril` + diag(exp(log_scales)), in numpy: (K, D, D)."""
    tril = prior.tril.detach().numpy()
    scales = np.exp(prior.log_scales.detach().numpy())
    return np.stack([np.tril(t, -1) + np.diag(s) for t, s in zip(tril, scales)])


def covs_of(prior: ClassConditionalGaussian) -> np.ndarray:
    chol = factors(prior)
    return chol @ np.swapaxes(chol, -1, -2)


def random_spd(k: int, d: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    return torch.as_tensor(a @ np.swapaxes(a, -1, -2) / d + 0.1 * np.eye(d))


# -- parametrisation ---------------------------------------------------------------------------


def test_scale_tril_covariances_and_log_det_from_the_parameters():
    prior = random_full_prior(4, 3)
    chol = factors(prior)
    np.testing.assert_allclose(prior.scale_tril().detach().numpy(), chol, rtol=0, atol=1e-15)
    np.testing.assert_allclose(prior.covariances().detach().numpy(), chol @ np.swapaxes(chol, 1, 2), rtol=0, atol=1e-13)
    sign, logdet = np.linalg.slogdet(covs_of(prior))
    assert (sign == 1).all()
    np.testing.assert_allclose(prior.log_det_covariances().detach().numpy(), logdet, rtol=0, atol=1e-12)
    assert isinstance(prior.tril, nn.Parameter) and prior.tril.shape == (4, 3, 3)


def test_only_the_strictly_lower_entries_of_tril_receive_gradient():
    prior = random_full_prior(3, 4)
    z, y = torch.randn(16, 4), torch.arange(16) % 3
    prior.log_prob(z, y).sum().backward()
    grad = prior.tril.grad
    lower = torch.tril(torch.ones(4, 4, dtype=torch.bool), -1)
    assert torch.equal(grad[:, ~lower], torch.zeros_like(grad[:, ~lower]))  # diagonal comes from log_scales
    assert (grad[:, lower].abs() > 0).all()
    assert torch.isfinite(prior.log_scales.grad).all() and (prior.log_scales.grad.abs() > 0).all()


# -- densities ---------------------------------------------------------------------------------


def test_full_log_prob_matches_scipy_multivariate_normal():
    prior = random_full_prior(4, 3, seed=1)
    z = 2.5 * torch.randn(9, 3)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2])
    mu, covs = prior.means.detach().numpy(), covs_of(prior)
    assert np.abs(covs - np.stack([np.diag(np.diag(c)) for c in covs])).max() > 0.3  # really correlated
    want_all = np.stack([multivariate_normal.logpdf(z.numpy(), mu[k], covs[k]) for k in range(4)], 1)  # (B, K)
    with torch.no_grad():
        np.testing.assert_allclose(prior.log_prob_all(z).numpy(), want_all, rtol=0, atol=1e-10)
        np.testing.assert_allclose(prior.log_prob(z, y).numpy(), want_all[np.arange(9), y.numpy()], rtol=0, atol=1e-10)


def test_each_full_class_density_integrates_to_one_in_2d():
    prior = random_full_prior(3, 2, seed=2)
    # class 0 strongly correlated: L = [[1, 0], [2, 0.5]], correlation 2 / sqrt(4.25) = 0.97
    chol = factors(prior)
    chol[0] = [[1.0, 0.0], [2.0, 0.5]]
    set_full(prior, prior.means.detach(), chol)
    covs = covs_of(prior)
    n = 801  # midpoint rule on +-8 marginal sigma around each mean; spectrally accurate for Gaussians
    for k in range(3):
        mu, sd = prior.means[k].detach(), torch.as_tensor(np.sqrt(np.diag(covs[k])))
        edges = [torch.linspace(mu[i] - 8 * sd[i], mu[i] + 8 * sd[i], n + 1) for i in range(2)]
        mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
        cell = float((edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0]))
        grid = torch.stack(torch.meshgrid(*mids, indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            dens = torch.exp(prior.log_prob_all(grid))  # (n^2, K)
        assert float(dens[:, k].sum()) * cell == pytest.approx(1.0, abs=1e-6)


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_full_sample_mean_and_covariance(temperature):
    """Sample mean ~ mu_k and sample covariance ~ T^2 Sigma_k within 5 standard errors.

    SE of a mean entry: sqrt(S_ii / n); of a covariance entry (Gaussian): sqrt((S_ii S_jj + S_ij^2) / n),
    with S = T^2 Sigma_k. 2 temperatures x 3 classes x (3 + 6) entries: a 5-SE miss has probability ~1e-5.
    """
    prior = random_full_prior(3, 3, seed=3)
    covs = covs_of(prior)
    n = 20000
    gen = torch.Generator().manual_seed(123)
    for k in range(3):
        z = prior.sample(torch.full((n,), k), temperature, gen).detach().numpy()
        s = temperature**2 * covs[k]
        mean_se = np.sqrt(np.diag(s) / n)
        assert (np.abs(z.mean(0) - prior.means[k].detach().numpy()) < 5 * mean_se).all()
        cov_se = np.sqrt((np.outer(np.diag(s), np.diag(s)) + s**2) / n)
        assert (np.abs(np.cov(z.T) - s) < 5 * cov_se).all()
        # the off-diagonal structure is resolved: L^T L (a transposed factor) would be far outside
        chol = factors(prior)[k]
        assert (np.abs(temperature**2 * chol.T @ chol - s) > 5 * cov_se).any()


def test_full_sample_at_zero_temperature_is_exactly_the_mean():
    prior = random_full_prior(3, 4, seed=4)
    y = torch.tensor([2, 0, 1, 2, 1])
    assert torch.equal(prior.sample(y, 0.0).detach(), prior.means[y].detach())


# -- full with L = diag(sigma) is the diagonal prior --------------------------------------------


def test_full_prior_with_zero_off_diagonal_equals_diagonal_prior():
    k, d = 4, 3
    full = random_full_prior(k, d, seed=5)
    with torch.no_grad():  # zero below the diagonal; garbage on and above it must not matter
        full.tril.copy_(torch.triu(full.tril))
    diag = ClassConditionalGaussian(k, d, PriorConfig(init="student", learn_means=True, learn_scales=True))
    with torch.no_grad():
        diag.means.copy_(full.means)
        diag.log_scales.copy_(full.log_scales)
    z = 2.0 * torch.randn(11, d)
    y = torch.arange(11) % k
    with torch.no_grad():
        torch.testing.assert_close(full.covariances(), diag.covariances(), rtol=0, atol=1e-14)
        torch.testing.assert_close(full.log_det_covariances(), diag.log_det_covariances(), rtol=0, atol=1e-14)
        torch.testing.assert_close(full.log_prob_all(z), diag.log_prob_all(z), rtol=0, atol=1e-12)
        torch.testing.assert_close(full.log_prob(z, y), diag.log_prob(z, y), rtol=0, atol=1e-12)
        torch.testing.assert_close(full.mahalanobis_sq(z), diag.mahalanobis_sq(z), rtol=1e-12, atol=1e-12)
        for a, b in zip(full.pair_statistics(), diag.pair_statistics()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(full.mean_distances(), diag.mean_distances(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bhattacharyya(full), bhattacharyya(diag), rtol=1e-12, atol=1e-14)
        a = full.sample(y, 0.7, torch.Generator().manual_seed(9))
        b = diag.sample(y, 0.7, torch.Generator().manual_seed(9))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # same noise, same map mu + T sigma * eps


# -- geometry: distances, Bhattacharyya, Mahalanobis -----------------------------------------------


def test_full_mean_distances_and_pair_statistics_match_numpy():
    prior = random_full_prior(4, 3, seed=6)
    mu, covs = prior.means.detach().numpy(), covs_of(prior)
    with torch.no_grad():
        dist = prior.mean_distances().numpy()
        d2, logdet_avg = (t.numpy() for t in prior.pair_statistics())
    for j in range(4):
        for k in range(4):
            avg = 0.5 * (covs[j] + covs[k])
            diff = mu[j] - mu[k]
            want = float(diff @ np.linalg.solve(avg, diff))
            assert d2[j, k] == pytest.approx(want, rel=1e-11, abs=1e-13)
            assert dist[j, k] == pytest.approx(math.sqrt(want), rel=1e-11, abs=1e-13)
            assert logdet_avg[j, k] == pytest.approx(np.linalg.slogdet(avg)[1], rel=1e-11, abs=1e-12)
    assert np.array_equal(np.diag(dist), np.zeros(4))
    assert (dist[~np.eye(4, dtype=bool)] > 0).all()


def test_full_bhattacharyya_equals_integral_of_sqrt_pq_in_2d():
    """BC_jk = integral sqrt(p_j q_k) dz on a 2-D grid with scipy's (independent) densities."""
    prior = random_full_prior(3, 2, seed=7)
    chol = factors(prior)
    chol[0] = [[1.0, 0.0], [1.2, 0.6]]  # strongly correlated class
    chol[2] = [[0.8, 0.0], [-0.9, 1.1]]  # anti-correlated
    means = np.array([[0.0, 0.5], [1.5, -1.0], [0.4, 1.2]])
    set_full(prior, means, chol)
    covs = covs_of(prior)
    bc = bhattacharyya(prior).numpy()
    sd = np.sqrt(np.stack([np.diag(c) for c in covs]))  # (K, 2) marginal std devs
    lo, hi = (means - 9 * sd).min(0), (means + 9 * sd).max(0)
    n = 1200
    edges = [np.linspace(lo[i], hi[i], n + 1) for i in range(2)]
    mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
    cell = (edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0])
    grid = np.stack(np.meshgrid(*mids, indexing="ij"), -1).reshape(-1, 2)
    logp = [multivariate_normal.logpdf(grid, means[k], covs[k]) for k in range(3)]
    for j in range(3):
        for k in range(3):
            want = np.exp(0.5 * (logp[j] + logp[k])).sum() * cell
            assert bc[j, k] == pytest.approx(want, rel=1e-8)
    np.testing.assert_allclose(np.diag(bc), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bc, bc.T, rtol=0, atol=1e-14)
    assert (bc[~np.eye(3, dtype=bool)] < 1).all()


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_mahalanobis_sq_matches_numpy(covariance):
    if covariance == "full":
        prior = random_full_prior(3, 4, seed=8)
    else:
        prior = ClassConditionalGaussian(3, 4, PriorConfig(init="student", learn_scales=True))
    z = 3.0 * torch.randn(10, 4)
    with torch.no_grad():
        got = prior.mahalanobis_sq(z).numpy()
    mu, covs = prior.means.detach().numpy(), prior.covariances().detach().numpy()
    if covariance == "full":
        np.testing.assert_allclose(covs, covs_of(prior), rtol=0, atol=1e-13)
    assert got.shape == (10, 3)
    for k in range(3):
        diff = z.numpy() - mu[k]
        want = np.einsum("bi,bi->b", diff, np.linalg.solve(covs[k], diff.T).T)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-11)


def test_nearer_other_fraction_uses_the_full_covariances():
    """Class 0: mean 0, variance 9 along u = (1, 1)/sqrt 2 and 1/4 along v = (1, -1)/sqrt 2; class 1: mean (4, 0), Sigma = I.

    d2_0(z) = (z.u)^2 / 9 + 4 (z.v)^2; d2_1(z) = |z - (4, 0)|^2.
    (3, 3) y=0: 2 vs 10, own.        (2, -2) y=0: 32 vs 8, other (the diagonal of Sigma_0 alone says own).
    (4, 1) y=1: 19.39 vs 1, own.     (5, 5) y=1: 50/9 vs 26, other (Euclidean distance says own).
    """
    rot = np.array([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)  # columns u, v
    sigma0 = rot @ np.diag([9.0, 0.25]) @ rot.T
    prior = ClassConditionalGaussian(2, 2, PriorConfig(init="zeros", learn_means=True, learn_scales=True, covariance="full"))
    set_full(prior, [[0.0, 0.0], [4.0, 0.0]], np.stack([np.linalg.cholesky(sigma0), np.eye(2)]))
    z = torch.tensor([[3.0, 3.0], [2.0, -2.0], [4.0, 1.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    want = np.array([[2.0, 10.0], [32.0, 8.0], [12.5 / 9 + 18.0, 1.0], [50.0 / 9, 26.0]])
    np.testing.assert_allclose(prior.mahalanobis_sq(z).detach().numpy(), want, rtol=1e-12)
    assert nearer_other_fraction(z, y, prior) == pytest.approx(2 / 4)
    assert nearer_other_fraction(z[[0, 2]], y[[0, 2]], prior) == 0.0
    assert nearer_other_fraction(z[[1, 3]], y[[1, 3]], prior) == 1.0


# -- init_from_moments -------------------------------------------------------------------------


LEARN_FLAGS = [(True, True), (False, False), (True, False), (False, True)]


@pytest.mark.parametrize(("learn_means", "learn_scales"), LEARN_FLAGS)
def test_init_from_moments_full_sets_means_and_covariances_plus_ridge(learn_means, learn_scales):
    k, d, ridge = 3, 4, 0.05
    cfg = PriorConfig(init="moments", covariance="full", moments_ridge=ridge, learn_means=learn_means, learn_scales=learn_scales)
    prior = ClassConditionalGaussian(k, d, cfg)
    assert prior.needs_data_init and not bool(prior.moments_initialized)
    assert isinstance(prior.means, nn.Parameter) is learn_means
    assert isinstance(prior.log_scales, nn.Parameter) is learn_scales and isinstance(prior.tril, nn.Parameter) is learn_scales
    means = torch.as_tensor(np.random.default_rng(0).normal(size=(k, d)))
    covs = random_spd(k, d, seed=1)
    v = torch.as_tensor(np.random.default_rng(2).normal(size=(d, 1)))
    covs[2] = v @ v.T  # rank 1: only the ridge makes it positive definite
    prior.init_from_moments(means, covs)
    assert not prior.needs_data_init and bool(prior.moments_initialized)
    want = covs.numpy() + ridge * np.eye(d)
    np.testing.assert_array_equal(prior.means.detach().numpy(), means.numpy())
    np.testing.assert_allclose(prior.covariances().detach().numpy(), want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(prior.log_det_covariances().detach().numpy(), np.linalg.slogdet(want)[1], rtol=0, atol=1e-12)
    z = torch.randn(6, d)
    for c in range(k):  # the densities are those of N(mean, cov + ridge I)
        np.testing.assert_allclose(prior.log_prob_all(z)[:, c].detach().numpy(),
                                   multivariate_normal.logpdf(z.numpy(), means[c].numpy(), want[c]), rtol=0, atol=1e-10)
    state = prior.state_dict()  # learned or fixed, the data-set values are what a checkpoint holds
    assert torch.equal(state["means"], means) and bool(state["moments_initialized"])


@pytest.mark.parametrize(("learn_means", "learn_scales"), LEARN_FLAGS)
def test_init_from_moments_diagonal_uses_the_variances_plus_ridge(learn_means, learn_scales):
    k, d, ridge = 3, 4, 0.03
    prior = ClassConditionalGaussian(
        k, d, PriorConfig(init="moments", moments_ridge=ridge, learn_means=learn_means, learn_scales=learn_scales))
    assert prior.needs_data_init
    means = torch.as_tensor(np.random.default_rng(3).normal(size=(k, d)))
    covs = random_spd(k, d, seed=4)  # correlated: the off-diagonal entries must be dropped
    prior.init_from_moments(means, covs)
    assert not prior.needs_data_init
    var = np.stack([np.diag(c) for c in covs.numpy()]) + ridge
    np.testing.assert_array_equal(prior.means.detach().numpy(), means.numpy())
    np.testing.assert_allclose(torch.exp(2 * prior.log_scales).detach().numpy(), var, rtol=1e-13)
    np.testing.assert_allclose(prior.log_scales.detach().numpy(), 0.5 * np.log(var), rtol=0, atol=1e-14)
    np.testing.assert_allclose(prior.covariances().detach().numpy(), np.stack([np.diag(v) for v in var]), rtol=1e-13, atol=0)


def test_needs_data_init_only_for_the_moments_scheme():
    assert not ClassConditionalGaussian(2, 3, PriorConfig(**FULL_LEARNED)).needs_data_init
    assert not ClassConditionalGaussian(2, 3, PriorConfig(init="separated")).needs_data_init
    assert ClassConditionalGaussian(2, 3, PriorConfig(init="moments")).needs_data_init
    fixed = ClassConditionalGaussian(2, 3, PriorConfig(init="moments", covariance="full"))
    assert fixed.needs_data_init
    assert torch.equal(fixed.covariances(), torch.eye(3).expand(2, 3, 3))  # placeholder Sigma = I until the data come


def _bad_moments(case: str, k: int = 2, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    means, covs = torch.zeros(k, d), torch.eye(d).repeat(k, 1, 1)
    if case == "means-shape":
        means = torch.zeros(k, d + 1)
    elif case == "covs-shape":
        covs = torch.ones(k, d)
    elif case == "too-few-classes":
        means, covs = means[:1], covs[:1]
    elif case == "nan-mean":
        means[1, 2] = math.nan
    elif case == "inf-cov":
        covs[0, 1, 1] = math.inf
    elif case == "nan-cov":
        covs[1, 0, 2] = covs[1, 2, 0] = math.nan
    return means, covs


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
@pytest.mark.parametrize(
    ("case", "match"),
    [("means-shape", r"need means \(2, 3\) and covariances \(2, 3, 3\)"), ("covs-shape", r"need means"),
     ("too-few-classes", r"need means"), ("nan-mean", "not finite"), ("inf-cov", "not finite"), ("nan-cov", "not finite")],
)
def test_init_from_moments_rejects_bad_input(covariance, case, match):
    prior = ClassConditionalGaussian(2, 3, PriorConfig(init="moments", covariance=covariance, learn_scales=True))
    means, covs = _bad_moments(case)
    with pytest.raises(ValueError, match=match):
        prior.init_from_moments(means, covs)
    assert prior.needs_data_init  # still waiting for usable data


def test_init_from_moments_rejects_a_non_positive_definite_full_covariance():
    prior = ClassConditionalGaussian(2, 2, PriorConfig(init="moments", covariance="full", moments_ridge=0.0))
    covs = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])])  # eigenvalues 3, -1
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    with pytest.raises(ValueError, match="not positive definite.*moments_ridge"):
        prior.init_from_moments(torch.ones(2, 2), covs)
    assert prior.needs_data_init
    for k, v in prior.state_dict().items():  # a failed init changes nothing, the means included
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # a ridge larger than the negative eigenvalue makes it positive definite
    ok = ClassConditionalGaussian(2, 2, PriorConfig(init="moments", covariance="full", moments_ridge=1.5))
    ok.init_from_moments(torch.zeros(2, 2), covs)
    torch.testing.assert_close(ok.covariances(), covs + 1.5 * torch.eye(2), rtol=0, atol=1e-13)


def test_init_from_moments_rejects_a_zero_variance_in_the_diagonal_prior():
    prior = ClassConditionalGaussian(2, 3, PriorConfig(init="moments", moments_ridge=0.0))
    covs = torch.eye(3).repeat(2, 1, 1)
    covs[1, 2, 2] = 0.0  # a latent constant within class 1
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    with pytest.raises(ValueError, match="variance is not positive.*moments_ridge"):
        prior.init_from_moments(torch.ones(2, 3), covs)
    assert prior.needs_data_init
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["separated", "orthogonal", "zeros", "student"])
def test_full_covariance_with_fixed_scales_is_rejected(init):
    with pytest.raises(ValueError, match="covariance='full'.*learn_scales"):
        PriorConfig(init=init, covariance="full", learn_scales=False)
    PriorConfig(init=init, covariance="full", learn_scales=True)  # learned: fine
    PriorConfig(init="moments", covariance="full", learn_scales=False)  # fixed by the data: fine


def test_full_covariance_with_fixed_scales_is_rejected_through_overrides():
    with pytest.raises(ValueError, match="covariance='full'"):
        apply_overrides(get_profile("toy2d", "smoke"), {"prior.covariance": "full"})


def test_negative_moments_ridge_is_rejected():
    with pytest.raises(ValueError, match="moments_ridge must be >= 0"):
        PriorConfig(init="moments", moments_ridge=-1e-3)
    assert PriorConfig(init="moments", moments_ridge=0.0).moments_ridge == 0.0


# -- moments init in training ------------------------------------------------------------------


@cache
def _data(cfg: DataConfig) -> Splits:
    return load_data(cfg)


def moments_rc(dataset: str, **overrides) -> RunConfig:
    """The dataset's smoke profile with a full, learned, moments-initialised prior (plus overrides)."""
    return apply_overrides(get_profile(dataset, "smoke"), {
        "prior.init": "moments", "prior.covariance": "full", "prior.learn_scales": True, "prior.learn_means": True,
        **overrides,
    })


def build(rc: RunConfig, seed: int = 0) -> tuple[MixtureFlow, Splits]:
    data = _data(rc.data)
    torch.manual_seed(seed)
    return build_model(data.data_shape, data.num_classes, data.levels, rc.model, rc.prior, data.class_counts()), data


def class_moments_np(z: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and unbiased covariance by numpy."""
    return np.stack([z[y == c].mean(0) for c in range(k)]), np.stack([np.cov(z[y == c].T) for c in range(k)])


def initial_latent_moments(rc: RunConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class moments of the training latents of a freshly built model after (only) its ActNorm init, in eval mode."""
    model, data = build(rc, seed)
    _init_actnorm(model, data.train, rc.train.batch_size, CPU)
    x, y = data.train.tensors
    model.eval()
    with torch.no_grad():
        z = model.latent_and_logdet(x)[0].numpy()
    return class_moments_np(z, y.numpy(), data.num_classes)


# Exact references need the init's latents to be a fixed function of x. Continuous toy2d has no dequantisation
# noise, and digits without dequantisation takes the bin midpoints. The init runs in eval mode, so the spectral
# norms' power iterations do not move between batches (in train mode they would, even under no_grad, because
# the log-det estimators switch grad on): the power iterations can stay on.
EXACT = {"toy2d": {}, "digits": {"model.dequantize": False}}


@pytest.mark.parametrize("dataset", ["toy2d", "digits"])
def test_init_prior_sets_the_class_moments_of_the_initial_latents(dataset):
    rc = moments_rc(dataset, **EXACT[dataset])
    model, data = build(rc)
    assert model.prior.needs_data_init
    _init_actnorm(model, data.train, rc.train.batch_size, CPU)
    flow_state = {n: t.clone() for n, t in model.flow.state_dict().items()}
    # a batch size that does not divide the training set: the moments are pooled over uneven batches
    assert len(data.train) % 97
    _init_prior(model, data.train, 97, CPU)
    assert not model.prior.needs_data_init
    for n, t in model.flow.state_dict().items():
        assert torch.equal(t, flow_state[n]), f"the prior init changed the flow's {n}"
    x, y = data.train.tensors
    model.eval()
    with torch.no_grad():
        z = model.latent_and_logdet(x)[0].numpy()
    means, covs = class_moments_np(z, y.numpy(), data.num_classes)
    d = z.shape[1]
    np.testing.assert_allclose(model.prior.means.detach().numpy(), means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.prior.covariances().detach().numpy(), covs + rc.prior.moments_ridge * np.eye(d),
                               rtol=0, atol=1e-12)


def test_init_prior_in_the_shipped_digits_configuration():
    """Power iterations on (the profile's setting), deterministic preprocessing, the profile's eval batch size:
    the moments are exactly those of the initial flow's eval-mode latents (the init does not move the spectral
    norms between batches). A biased (1/n) covariance would be off by ~4% here (~30 examples per class), a
    missing ridge by 0.03 on the diagonal."""
    rc = moments_rc("digits", **{"model.dequantize": False})
    assert rc.model.n_power_iterations > 0
    model, data = build(rc)
    _init_actnorm(model, data.train, rc.train.batch_size, CPU)
    _init_prior(model, data.train, rc.runtime.eval_batch_size, CPU)
    x, y = data.train.tensors
    model.eval()
    with torch.no_grad():
        z = model.latent_and_logdet(x)[0].numpy()
    means, covs = class_moments_np(z, y.numpy(), data.num_classes)
    np.testing.assert_allclose(model.prior.means.detach().numpy(), means, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.prior.covariances().detach().numpy(), covs + rc.prior.moments_ridge * np.eye(64),
                               rtol=0, atol=1e-10)


def test_fit_initialises_a_fixed_moments_prior_from_the_initial_latents():
    """With means and covariances fixed (buffers), after fit they are still what the init set: the class moments
    of the training latents of the flow after its ActNorm init (computed here on an identically built model)."""
    rc = moments_rc("toy2d", **EXACT["toy2d"], **{"prior.learn_means": False, "prior.learn_scales": False,
                                                  "runtime.epochs": 1})
    model, data = build(rc)
    assert model.prior.needs_data_init and not list(model.prior.parameters())
    history = fit(model, data, rc.train, rc.runtime)
    assert math.isfinite(history.epochs[0]["train_loss"]) and math.isfinite(history.epochs[0]["val_loss"])
    assert not model.prior.needs_data_init
    means, covs = initial_latent_moments(rc)
    np.testing.assert_allclose(model.prior.means.numpy(), means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.prior.covariances().numpy(), covs + rc.prior.moments_ridge * np.eye(2), rtol=0, atol=1e-12)


def test_fit_with_a_learned_moments_prior_then_resume_does_not_reinitialise(tmp_path):
    rc = moments_rc("toy2d", **{"runtime.epochs": 1})
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    assert len(history.epochs) == 1 and history.stopped == "completed"
    assert all(math.isfinite(v) for v in history.epochs[0].values())
    assert not model.prior.needs_data_init
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert bool(ckpt["prior.moments_initialized"])
    # training moved the prior away from the initial moments (so that a re-init on resume would show)
    init_means, _ = initial_latent_moments(rc)
    assert np.abs(ckpt["prior.means"].numpy() - init_means).max() > 1e-3

    # a fresh process, with a differently initialised model: resume restores the checkpoint and trains no further
    other, _ = build(rc, seed=1)
    assert other.prior.needs_data_init
    fit(other, data, rc.train, rc.runtime, run_dir=tmp_path / "run", resume=True)
    state = other.state_dict()
    assert state.keys() == ckpt.keys()
    for name in ("prior.means", "prior.log_scales", "prior.tril", "prior.moments_initialized"):
        assert torch.equal(state[name], ckpt[name]), name
    for name in ckpt:
        assert torch.equal(state[name], ckpt[name]), name


def test_resumed_moments_run_equals_the_uninterrupted_run(tmp_path):
    """A prior re-initialised on resume would put the resumed run on another trajectory."""
    rc = moments_rc("toy2d", **{"runtime.epochs": 2})
    whole, data = build(rc)
    fit(whole, data, rc.train, rc.runtime, run_dir=tmp_path / "a")
    first, _ = build(rc)
    fit(first, data, rc.train, replace(rc.runtime, epochs=1), run_dir=tmp_path / "b")
    second, _ = build(rc, seed=1)
    fit(second, data, rc.train, rc.runtime, run_dir=tmp_path / "b", resume=True)
    a, b = whole.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("learn", [True, False])
def test_full_moments_checkpoint_round_trips_into_a_fresh_model(tmp_path, learn):
    rc = moments_rc("toy2d", **{"prior.learn_means": learn, "prior.learn_scales": learn})
    model, data = build(rc)
    _init_actnorm(model, data.train, rc.train.batch_size, CPU)
    _init_prior(model, data.train, rc.runtime.eval_batch_size, CPU)
    torch.save({"model": model.state_dict()}, tmp_path / "m.pt")
    state = load_checkpoint(tmp_path / "m.pt")["model"]
    assert {"prior.means", "prior.log_scales", "prior.tril", "prior.moments_initialized"} <= set(state)

    fresh, _ = build(rc, seed=1)
    assert fresh.prior.needs_data_init
    fresh.load_state_dict(state)  # strict: the same keys
    assert not fresh.prior.needs_data_init  # fit would not re-initialise it
    for a, b in ((fresh.prior.scale_tril(), model.prior.scale_tril()), (fresh.prior.means, model.prior.means)):
        assert torch.equal(a, b)
    x = data.val.tensors[0][:50]
    fresh.eval(), model.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        want = model.log_prob_all(x)
        torch.manual_seed(3)
        got = fresh.log_prob_all(x)
    assert torch.isfinite(want).all() and torch.equal(got, want)


# -- plotting and study ------------------------------------------------------------------------


def _random_factor(rng: np.random.Generator, d: int) -> np.ndarray:
    return np.tril(rng.normal(size=(d, d)), -1) + np.diag(np.exp(0.5 * rng.normal(size=d)))


def test_projected_ellipse_with_a_full_factor():
    rng = np.random.default_rng(10)
    d = 5
    chol, mean = _random_factor(rng, d), rng.normal(size=d)
    p = np.linalg.qr(rng.normal(size=(d, d)))[0][:2]  # (2, D) orthonormal rows
    centre, major, minor, angle = _projected_ellipse(mean, chol, p)
    sigma = chol @ chol.T  # (D, D)
    (a, b), (_, c) = p @ sigma @ p.T  # the projected covariance [[a, b], [b, c]]; its eigenvalues in closed form
    half_gap = math.sqrt(((a - c) / 2) ** 2 + b**2)
    np.testing.assert_allclose(centre, p @ mean, rtol=0, atol=1e-12)
    assert major == pytest.approx(math.sqrt((a + c) / 2 + half_gap), rel=1e-12)
    assert minor == pytest.approx(math.sqrt((a + c) / 2 - half_gap), rel=1e-12)
    t = math.radians(angle)
    direction = np.array([math.cos(t), math.sin(t)])  # the major axis: an eigenvector of the largest eigenvalue
    np.testing.assert_allclose(np.array([[a, b], [b, c]]) @ direction, major**2 * direction, rtol=0, atol=1e-10)
    # a transposed factor (L^T L) gives another ellipse: the test above tells them apart
    (a2, b2), (_, c2) = p @ chol.T @ chol @ p.T
    assert abs(math.sqrt((a2 + c2) / 2 + math.sqrt(((a2 - c2) / 2) ** 2 + b2**2)) - major) > 1e-3


def test_projected_ellipse_of_a_diagonal_factor_equals_the_std_dev_form():
    rng = np.random.default_rng(11)
    d = 4
    s, mean = np.exp(rng.normal(size=d)), rng.normal(size=d)
    p = np.linalg.qr(rng.normal(size=(d, d)))[0][:2]
    c1, major1, minor1, angle1 = _projected_ellipse(mean, s, p)
    c2, major2, minor2, angle2 = _projected_ellipse(mean, np.diag(s), p)
    np.testing.assert_allclose(c1, c2, rtol=0, atol=1e-14)
    assert major1 == pytest.approx(major2, rel=1e-13) and minor1 == pytest.approx(minor2, rel=1e-13)
    assert math.sin(math.radians(angle1 - angle2)) == pytest.approx(0.0, abs=1e-10)  # the same axis, up to direction


def _ellipse_cov(e: Ellipse) -> np.ndarray:
    """The 2x2 matrix whose 1-sigma ellipse is `e`: R diag((w/2)^2, (h/2)^2) R^T."""
    t = math.radians(e.angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return rot @ np.diag([(e.width / 2) ** 2, (e.height / 2) ** 2]) @ rot.T


def _ellipses(fig: Figure) -> dict[str, Ellipse]:
    return {p.get_gid(): p for p in fig.axes[0].patches if isinstance(p, Ellipse)}


def test_fig_gaussian_ellipses_draws_full_covariances():
    rng = np.random.default_rng(12)
    k, d = 3, 4
    means, chols = rng.normal(size=(k, d)), np.stack([_random_factor(rng, d) for _ in range(k)])
    p = np.linalg.qr(rng.normal(size=(d, d)))[0][:2]
    fig = fig_gaussian_ellipses([{"title": "", "means": means, "scales": chols}], ["a", "b", "c"], p)
    ellipses = _ellipses(fig)
    for c in range(k):
        cov = p @ chols[c] @ chols[c].T @ p.T
        for r in (1, 2):
            e = ellipses[f"{c}:{r}"]
            np.testing.assert_allclose(e.center, p @ means[c], atol=1e-12)
            np.testing.assert_allclose(_ellipse_cov(e), r**2 * cov, rtol=0, atol=1e-10)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_gaussian_panel_scales_are_the_factors_of_the_prior(covariance):
    rc = apply_overrides(get_profile("toy2d", "smoke"), {"prior.init": "student", "prior.learn_scales": True,
                                                         "prior.covariance": covariance})
    model, data = build(rc)
    if covariance == "full":
        with torch.no_grad():
            model.prior.tril.copy_(torch.randn(2, 2, 2))
    panel = gaussian_panel(model, data.val, "t")
    k, d = 2, 2
    if covariance == "full":
        assert panel["scales"].shape == (k, d, d)
        np.testing.assert_array_equal(panel["scales"], model.prior.scale_tril().detach().numpy())
        assert abs(panel["scales"][:, 1, 0]).min() > 0  # really not diagonal
    else:
        assert panel["scales"].shape == (k, d)
        np.testing.assert_array_equal(panel["scales"], torch.exp(model.prior.log_scales).detach().numpy())
    np.testing.assert_array_equal(panel["means"], model.prior.means.detach().numpy())
    z, y = latents(model, data.val)
    np.testing.assert_array_equal(panel["z"], z.numpy())
    np.testing.assert_array_equal(panel["y"], y.numpy())
    # end to end with the identity projection (D = 2): the drawn 1-sigma ellipses are the class covariances
    ellipses = _ellipses(fig_gaussian_ellipses([panel], list(data.class_names), np.eye(2)))
    covs = model.prior.covariances().detach().numpy()
    for c in range(k):
        np.testing.assert_allclose(_ellipse_cov(ellipses[f"{c}:1"]), covs[c], rtol=0, atol=1e-10)


def test_moments_init_of_a_conv_image_model():
    """The Fashion-MNIST default's prior (moments, learned diagonal) on a multi-scale conv model: the init equals
    the class moments of the initial flow's flattened latents (deterministic preprocessing, eval mode)."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2), dequantize=False)
    prior_cfg = PriorConfig(init="moments", learn_means=True, learn_scales=True)
    k, n = 3, 60
    model = build_model((1, 8, 8), k, 256, model_cfg, prior_cfg)
    x = torch.randint(0, 256, (n, 1, 8, 8)).double()
    y = torch.arange(n) % k
    data = torch.utils.data.TensorDataset(x, y)
    _init_actnorm(model, data, 32, CPU)
    _init_prior(model, data, 25, CPU)
    assert not model.prior.needs_data_init
    model.eval()
    with torch.no_grad():
        z = model.latent_and_logdet(x)[0].numpy()
    means, covs = class_moments_np(z, y.numpy(), k)
    np.testing.assert_allclose(model.prior.means.detach().numpy(), means, rtol=0, atol=1e-10)
    var = np.diagonal(covs, axis1=1, axis2=2) + prior_cfg.moments_ridge
    np.testing.assert_allclose(torch.exp(2 * model.prior.log_scales).detach().numpy(), var, rtol=1e-10, atol=0)
