"""ClassConditionalGaussian: p(z|y) = N(z; mu_y, diag(sigma_y^2)), p(y) = pi_y."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn

from mixflow_core import ClassConditionalGaussian, PriorConfig


def make_prior(k: int = 3, d: int = 2, class_counts=None, **cfg) -> ClassConditionalGaussian:
    return ClassConditionalGaussian(k, d, PriorConfig(**cfg), class_counts)


def sigmas(prior: ClassConditionalGaussian) -> torch.Tensor:
    return torch.exp(prior.log_scales.detach())  # (K, D)


def pairwise_off_diagonal(dist: torch.Tensor) -> torch.Tensor:
    k = dist.shape[0]
    return dist[~torch.eye(k, dtype=torch.bool)]


# -- densities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(init="student", learn_means=True, learn_scales=True),  # sigma in [1, e), differs per class
        dict(init="separated", radius=3.0),  # sigma = 1, means apart
    ],
    ids=["learned-scale", "fixed-scale"],
)
def test_each_class_density_integrates_to_one_in_2d(cfg):
    prior = make_prior(k=3, d=2, **cfg)
    n = 801  # midpoint rule on +-8 sigma around each class mean; spectrally accurate for Gaussians
    for k in range(3):
        mu, sig = prior.means[k].detach(), sigmas(prior)[k]
        edges = [torch.linspace(mu[i] - 8 * sig[i], mu[i] + 8 * sig[i], n + 1) for i in range(2)]
        mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
        cell = float((edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0]))
        grid = torch.stack(torch.meshgrid(*mids, indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            dens = torch.exp(prior.log_prob_all(grid))  # (n^2, K)
        assert float(dens[:, k].sum()) * cell == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("init", ["student", "separated"])
def test_log_prob_matches_scipy_diagonal_gaussian(init):
    prior = make_prior(k=4, d=5, init=init, radius=2.0, learn_scales=True)
    z = 3.0 * torch.randn(7, 5)
    y = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    got = prior.log_prob(z, y).detach().numpy()
    mu, var = prior.means.detach().numpy(), (sigmas(prior) ** 2).numpy()
    want = np.array([multivariate_normal.logpdf(z[i].numpy(), mu[c], np.diag(var[c])) for i, c in enumerate(y.tolist())])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_log_prob_is_log_prob_all_gathered():
    prior = make_prior(k=4, d=3, init="student")
    z, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    all_ = prior.log_prob_all(z)
    assert all_.shape == (10, 4)
    torch.testing.assert_close(prior.log_prob(z, y), all_[torch.arange(10), y], rtol=0, atol=0)


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sample_moments(temperature):
    prior = make_prior(k=3, d=4, init="student", learn_scales=True)
    n = 20000
    gen = torch.Generator().manual_seed(123)
    for k in range(3):
        z = prior.sample(torch.full((n,), k), temperature, gen).detach()
        mu, sd = prior.means[k].detach(), temperature * sigmas(prior)[k]
        # 5 standard errors: mean SE = sd / sqrt(n), std SE ~= sd / sqrt(2n)
        assert ((z.mean(0) - mu).abs() < 5 * sd / math.sqrt(n)).all()
        assert ((z.std(0) - sd).abs() < 5 * sd / math.sqrt(2 * n)).all()


def test_sample_zero_temperature_is_exactly_the_mean():
    prior = make_prior(k=3, d=4, init="student", learn_scales=True)
    y = torch.tensor([2, 0, 1, 2])
    assert torch.equal(prior.sample(y, 0.0).detach(), prior.means[y].detach())


def test_sample_reproducible_with_generator_seed():
    prior = make_prior(k=3, d=4, init="separated")
    y = torch.tensor([0, 1, 2, 1])
    a = prior.sample(y, 1.0, torch.Generator().manual_seed(7))
    b = prior.sample(y, 1.0, torch.Generator().manual_seed(7))
    c = prior.sample(y, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_rejects_negative_temperature():
    with pytest.raises(ValueError, match="temperature"):
        make_prior().sample(torch.tensor([0]), -0.1)


# -- initialisation schemes --------------------------------------------------------------------


@pytest.mark.parametrize("learn", [True, False])
def test_student_init_unit_interval(learn):
    prior = make_prior(k=5, d=8, init="student", learn_means=learn, learn_scales=learn)
    for t in (prior.means, prior.log_scales) if learn else (prior.means,):
        assert t.min() >= 0 and t.max() < 1
        assert t.std() > 0.1  # really random, not constant
    if not learn:
        assert torch.equal(prior.log_scales, torch.zeros(5, 8))  # fixed scales: Sigma = I
    assert isinstance(prior.means, nn.Parameter) is learn
    assert isinstance(prior.log_scales, nn.Parameter) is learn
    assert prior.means.requires_grad is learn and prior.log_scales.requires_grad is learn


def test_zeros_init():
    prior = make_prior(k=4, d=6, init="zeros")
    assert torch.equal(prior.means, torch.zeros(4, 6))
    assert torch.equal(sigmas(prior), torch.ones(4, 6))


def test_separated_init_pairwise_distance_radius_sqrt_2d():
    radius, d = 2.5, 512
    prior = make_prior(k=6, d=d, init="separated", radius=radius)
    assert torch.equal(sigmas(prior), torch.ones(6, d))
    mean_dist = float(pairwise_off_diagonal(torch.cdist(prior.means, prior.means)).mean())
    assert mean_dist == pytest.approx(radius * math.sqrt(2 * d), rel=0.05)


def test_orthogonal_init_exact_separation_and_orthogonality():
    sep = 4.0
    prior = make_prior(k=5, d=7, init="orthogonal", separation=sep)
    mu = prior.means
    assert torch.equal(sigmas(prior), torch.ones(5, 7))
    off = pairwise_off_diagonal(torch.cdist(mu, mu))
    torch.testing.assert_close(off, torch.full_like(off, sep), rtol=0, atol=1e-10)
    gram = mu @ mu.t()  # (K, K): diag = s^2 / 2, off-diagonal = 0
    torch.testing.assert_close(gram, torch.eye(5) * sep**2 / 2, rtol=0, atol=1e-10)


def test_orthogonal_init_more_classes_than_dims_raises():
    with pytest.raises(ValueError, match="num_classes <= dim"):
        make_prior(k=5, d=4, init="orthogonal")


def test_unknown_init_raises():
    with pytest.raises(ValueError, match="Unknown prior init"):
        make_prior(init="random")


def test_init_seed_changes_random_means_only():
    a, b, c = (make_prior(k=3, d=4, init="separated", init_seed=s) for s in (0, 0, 1))
    assert torch.equal(a.means, b.means)
    assert not torch.equal(a.means, c.means)


# -- parameters vs buffers ---------------------------------------------------------------------


@pytest.mark.parametrize("learn_means,learn_scales", [(False, False), (True, False), (False, True), (True, True)])
def test_only_trained_values_are_parameters(learn_means, learn_scales):
    prior = make_prior(k=3, d=4, learn_means=learn_means, learn_scales=learn_scales)
    params = dict(prior.named_parameters())
    buffers = dict(prior.named_buffers())
    for name, learn in (("means", learn_means), ("log_scales", learn_scales)):
        assert (name in params) is learn
        assert (name in buffers) is not learn
    assert "log_class_probs" in buffers and "log_class_probs" not in params
    assert len(params) == learn_means + learn_scales
    # both kinds travel with the state dict
    assert {"means", "log_scales", "log_class_probs"} <= set(prior.state_dict())


# -- class prior -------------------------------------------------------------------------------


def test_empirical_class_prior_is_log_frequencies():
    counts = torch.tensor([10.0, 30.0, 60.0])
    prior = make_prior(k=3, class_counts=counts, class_prior="empirical")
    torch.testing.assert_close(prior.log_class_probs, torch.log(torch.tensor([0.1, 0.3, 0.6])), rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.class_prior().probs, torch.tensor([0.1, 0.3, 0.6]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("counts", [None, torch.tensor([1.0, 2.0, 7.0, 5.0])])
def test_uniform_class_prior(counts):
    prior = make_prior(k=4, class_counts=counts, class_prior="uniform")
    torch.testing.assert_close(prior.log_class_probs, torch.full((4,), -math.log(4)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "counts", [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, -1.0, 2.0]), torch.zeros(3)],
    ids=["too-short", "too-long", "negative", "zero-sum"],
)
def test_bad_class_counts_raise(counts):
    with pytest.raises(ValueError, match="class_counts must be 3 non-negative"):
        make_prior(k=3, class_counts=counts, class_prior="empirical")


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "y,match",
    [
        (torch.tensor([0, 3]), r"labels must lie in \[0, 3\)"),
        (torch.tensor([-1, 0]), r"labels must lie in \[0, 3\)"),
        (torch.tensor([0.0, 1.0]), "labels must be integers"),
        (torch.tensor([True, False]), "labels must be integers"),
        (torch.tensor([[0, 1]]), r"labels must have shape \(2,\)"),
        (torch.tensor([0, 1, 2]), r"labels must have shape \(2,\)"),
    ],
    ids=["too-large", "negative", "float", "bool", "2-d", "wrong-length"],
)
def test_bad_labels_raise(y, match):
    prior = make_prior(k=3, d=2)
    with pytest.raises(ValueError, match=match):
        prior.log_prob(torch.zeros(2, 2), y)


def test_sample_bad_labels_raise():
    prior = make_prior(k=3, d=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prior.sample(torch.tensor([3]))
    with pytest.raises(ValueError, match="labels must be integers"):
        prior.sample(torch.tensor([1.0]))


@pytest.mark.parametrize("shape", [(4, 3), (4,), (4, 2, 1)])
def test_latents_of_wrong_shape_raise(shape):
    prior = make_prior(k=3, d=2)
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 2\)"):
        prior.log_prob_all(torch.zeros(shape))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_classes >= 1 and dim >= 1"):
        make_prior(k=0, d=2)


# -- geometry ----------------------------------------------------------------------------------


def test_mean_distances_unit_sigma_is_cdist():
    prior = make_prior(k=5, d=6, init="separated", radius=2.0)
    dist = prior.mean_distances()
    assert torch.equal(dist, dist.t())
    assert torch.equal(torch.diagonal(dist), torch.zeros(5))
    mu = prior.means.numpy()
    want = np.linalg.norm(mu[:, None, :] - mu[None, :, :], axis=-1)  # independent of torch.cdist
    np.testing.assert_allclose(dist.numpy(), want, rtol=0, atol=1e-10)


def test_mean_distances_are_mahalanobis_under_average_covariance():
    prior = make_prior(k=4, d=3, init="student", learn_scales=True)
    dist = prior.mean_distances().detach()
    assert torch.allclose(dist, dist.t(), rtol=0, atol=1e-12)
    assert torch.all(torch.diagonal(dist) == 0)
    s = sigmas(prior).numpy()
    mu = prior.means.detach().numpy()
    for j in range(4):
        for k in range(4):
            cov = np.diag((s[j] ** 2 + s[k] ** 2) / 2)
            diff = mu[j] - mu[k]
            want = float(np.sqrt(diff @ np.linalg.solve(cov, diff)))
            assert float(dist[j, k]) == pytest.approx(want, abs=1e-12)
