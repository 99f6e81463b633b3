"""Sample-quality metrics: the C2ST's null and alternative, class fidelity, the Fréchet distance against
closed forms, and the per-class Gaussian's sampler against its own bin probabilities (digits only)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mixflow_core.data import DataConfig, Splits, load_data
from mixflow_core.eval.baselines import class_moments, gaussian_samples, gaussian_test_table, logit_space
from mixflow_core.eval.sample_quality import (
    C2ST_METHODS,
    class_fidelity,
    classifier_two_sample_test,
    feature_frechet_distance,
    fit_reference_classifier,
    frechet_distance,
    sample_quality,
)

LEVELS = 17  # digits


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data(DataConfig("digits"))


@pytest.fixture(scope="module")
def halves(digits) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits, shuffled and cut into two halves of 898 / 899: one distribution, two samples."""
    x = torch.cat([digits.train.tensors[0], digits.val.tensors[0], digits.test.tensors[0]]).numpy()
    x = x[np.random.default_rng(0).permutation(len(x))]
    return x[: len(x) // 2], x[len(x) // 2:]


@pytest.fixture(scope="module")
def reference(digits):
    return fit_reference_classifier(*digits.train.tensors, LEVELS)


@pytest.fixture(scope="module")
def ridge(digits) -> float:
    return gaussian_test_table(digits, copies=2)[3]["ridge"]


def exact_moments(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int) -> np.ndarray:
    """n points whose sample mean is exactly `mean` and whose unbiased sample covariance is exactly `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return mean + z @ np.linalg.cholesky(cov).T


# -- C2ST ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", C2ST_METHODS)
def test_c2st_of_one_distribution_is_chance(halves, method):
    # H0: 2n = 1796 out-of-fold predictions, each right with probability 1/2: sd sqrt(1/4 / 1796) = 0.012,
    # inflated by the dependence cross-validation brings (fold-to-fold sd measured 0.02-0.03 over 360
    # predictions each, i.e. about 0.013 on the mean); 0.06 is > 4 sd, a real difference of 0.1 is not missed
    out = classifier_two_sample_test(*halves, method=method, seed=0)
    assert out["n_per_side"] == 898 and out["method"] == method
    assert abs(out["accuracy"] - 0.5) < 0.06
    assert out["p_value"] > 0.01


@pytest.mark.parametrize("method", C2ST_METHODS)
def test_c2st_separates_different_distributions(halves, method):
    real, other = halves
    brighter = np.clip(other.astype(np.int64) + 3, 0, LEVELS - 1)  # every pixel 3 of 16 levels brighter
    noise = np.random.default_rng(1).integers(0, LEVELS, other.shape)
    assert classifier_two_sample_test(real, brighter, method=method)["accuracy"] >= 0.9
    out = classifier_two_sample_test(real, noise, method=method)
    assert out["accuracy"] >= 0.99 and out["p_value"] < 1e-100


def test_c2st_balances_and_caps_the_sides_and_is_seeded(halves):
    real, other = halves
    assert classifier_two_sample_test(real[:100], other)["n_per_side"] == 100
    assert classifier_two_sample_test(real, other, max_per_side=200)["n_per_side"] == 200
    a = classifier_two_sample_test(torch.as_tensor(real), other, max_per_side=200, seed=3)
    assert a == classifier_two_sample_test(real, other, max_per_side=200, seed=3)  # torch or numpy, same answer


def test_c2st_rejects_bad_input(halves):
    real, other = halves
    with pytest.raises(ValueError, match="unknown C2ST method 'svm'"):
        classifier_two_sample_test(real, other, method="svm")
    with pytest.raises(ValueError, match="at least folds=5 images per side, got 4 real"):
        classifier_two_sample_test(real[:4], other)
    with pytest.raises(ValueError, match="same number of pixels, got 64 and 63"):
        classifier_two_sample_test(real, other[:, :63])
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        classifier_two_sample_test(real, other, folds=1)
    with pytest.raises(ValueError, match="NaN"):
        classifier_two_sample_test(real, np.full(other.shape, np.nan))


# -- reference classifier and class fidelity ------------------------------------------------------------


def test_class_fidelity_of_real_test_images_is_the_reference_accuracy(digits, reference):
    x_te, y_te = digits.test.tensors
    out = class_fidelity(reference, x_te, y_te)
    assert out["accuracy"] == pytest.approx(reference.score(x_te.reshape(len(x_te), -1).double().numpy(), y_te.numpy()))
    assert out["accuracy"] >= 0.95 and out["n"] == len(y_te)
    counts = np.bincount(y_te.numpy(), minlength=10)
    assert np.dot(out["per_class"], counts) / counts.sum() == pytest.approx(out["accuracy"])
    assert class_fidelity(reference, x_te, (y_te + 1) % 10)["accuracy"] < 0.05  # labels of the wrong class


def test_class_fidelity_rejects_bad_input(digits, reference):
    x_te, y_te = digits.test.tensors
    with pytest.raises(ValueError, match="same length, got 360 and 359"):
        class_fidelity(reference, x_te, y_te[:-1])
    with pytest.raises(ValueError, match=r"labels \[10\] are not classes"):
        class_fidelity(reference, x_te[:2], torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="quantisation levels in"):
        class_fidelity(reference, x_te + 1, y_te)  # 17 is not a level of 17-level data
    with pytest.raises(ValueError, match="x_train and y_train must have the same length"):
        fit_reference_classifier(x_te, y_te[:10], LEVELS)


def test_reference_classifier_on_a_stratified_subsample(digits):
    x, y = digits.train.tensors
    small = fit_reference_classifier(x, y, LEVELS, max_train=300)
    assert small.named_steps["svc"].n_features_in_ == 50 and sorted(small.classes_) == list(range(10))
    assert class_fidelity(small, *digits.test.tensors)["accuracy"] > 0.9


# -- Fréchet distance ----------------------------------------------------------------------------------


def test_frechet_of_two_samples_of_one_gaussian_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20_000, 5)), rng.standard_normal((20_000, 5))
    # the estimate's bias and spread are O(F^2 / N) = 25 / 20000: 0.01 is generous
    assert frechet_distance(a, b) < 0.01


def test_frechet_of_shifted_unit_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    m = np.array([1.0, -2.0, 0.5, 0.0])
    a, b = exact_moments(rng, np.zeros(4), np.eye(4), 50), exact_moments(rng, m, np.eye(4), 80)
    assert frechet_distance(a, b) == pytest.approx(m @ m, rel=1e-9)  # equal covariances: the trace term is 0
    noisy_a, noisy_b = rng.standard_normal((20_000, 4)), m + rng.standard_normal((20_000, 4))
    assert frechet_distance(noisy_a, noisy_b) == pytest.approx(m @ m, abs=0.05)


def test_frechet_matches_the_closed_forms():
    rng = np.random.default_rng(2)
    mu_a, mu_b = rng.standard_normal(3), rng.standard_normal(3)
    sa, sb = np.array([0.5, 2.0, 1.0]), np.array([3.0, 0.1, 1.0])
    a, b = exact_moments(rng, mu_a, np.diag(sa), 40), exact_moments(rng, mu_b, np.diag(sb), 60)
    diagonal = np.sum((mu_a - mu_b) ** 2) + np.sum(sa + sb - 2 * np.sqrt(sa * sb))
    assert frechet_distance(a, b) == pytest.approx(diagonal, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(diagonal, rel=1e-9)
    # full, non-commuting covariances: tr (S_a S_b)^{1/2} = sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2})) (symmetric)
    ca, cb = (lambda q: q @ q.T + 0.1 * np.eye(3))(rng.standard_normal((3, 3))), np.array(
        [[2.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 0.5]])
    w, v = np.linalg.eigh(ca)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb) - 2 * np.sqrt(np.linalg.eigvalsh(root_a @ cb @ root_a)).sum()
    a, b = exact_moments(rng, mu_a, ca, 30), exact_moments(rng, mu_b, cb, 30)
    assert frechet_distance(torch.as_tensor(a), b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9) and frechet_distance(a, a) >= 0


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="same dimension, got 3 and 2"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="feats_b needs at least 2 rows"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))


def test_feature_frechet_uses_the_reference_features(halves, reference):
    real, other = halves
    pca_features = reference[:-1].transform
    same = feature_frechet_distance(real, other, reference)
    assert same == pytest.approx(frechet_distance(pca_features(real.astype(float)), pca_features(other.astype(float))))
    noise = np.random.default_rng(3).integers(0, LEVELS, other.shape)
    assert feature_frechet_distance(real, noise, reference) > 20 * same
    assert feature_frechet_distance(real, other, lambda x: x[:, 18:22]) == pytest.approx(
        frechet_distance(real[:, 18:22].astype(float), other[:, 18:22].astype(float)))  # a callable feature map
    with pytest.raises(ValueError, match="reference_features must be"):
        feature_frechet_distance(real, other, "pca")


# -- the per-class Gaussian's samples and one summary row ----------------------------------------------


def _gaussian_moments(digits, copies: int, seed: int = 0):
    """The moments gaussian_samples documents: `copies` dequantised copies of train, drawn first from the seed."""
    x, y = digits.train.tensors[0].double(), digits.train.tensors[1]
    rng = np.random.default_rng(seed)
    return class_moments(((logit_space(x, torch.from_numpy(rng.random(tuple(x.shape))), LEVELS, 0.05)[0], y)
                          for _ in range(copies)), 10)


def test_gaussian_samples_at_zero_temperature_are_the_bins_of_the_class_means(digits):
    x, y = gaussian_samples(digits, 3, temperature=0.0, ridge=0.1, copies=2)
    assert x.shape == (30, 64) and x.dtype == digits.train.tensors[0].dtype
    assert torch.equal(y, torch.arange(10).repeat_interleave(3))
    mu = _gaussian_moments(digits, copies=2).means  # (K, D) in logit space
    y_bin = (torch.sigmoid(mu) - 0.05) / 0.9
    expected = torch.clamp(torch.floor(y_bin * LEVELS), 0, LEVELS - 1)
    assert torch.equal(x.double(), expected.repeat_interleave(3, 0))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gaussian_sample_levels_follow_the_gaussians_bin_probabilities(digits, temperature):
    # a pixel's level j is the bin logit(a + (1-2a) j/L) <= h < logit(a + (1-2a)(j+1)/L) of
    # h ~ N(mu_kd, T^2 (S_kd,d + r)): P(j) = Phi(e_{j+1}) - Phi(e_j), the end bins take the tails
    n, ridge, k, d = 4000, 0.1, 3, 20
    x, y = gaussian_samples(digits, n, temperature=temperature, ridge=ridge, copies=2, seed=5)
    fit = _gaussian_moments(digits, copies=2, seed=5)
    edges = torch.logit(0.05 + 0.9 * torch.arange(1, LEVELS, dtype=torch.float64) / LEVELS)  # (L - 1,)
    sd = temperature * math.sqrt(fit.covs[k, d, d] + ridge)
    cdf = np.concatenate([[0.0], norm.cdf((edges.numpy() - float(fit.means[k, d])) / sd), [1.0]])
    expected = np.diff(cdf)  # (L,)
    observed = np.bincount(x[y == k, d].long().numpy(), minlength=LEVELS) / n
    assert np.abs(observed - expected).max() < 0.03  # a frequency's sd is <= sqrt(1/4 / 4000) = 0.008


def test_gaussian_samples_look_like_their_class(digits, reference, ridge):
    x, y = gaussian_samples(digits, 100, temperature=1.0, ridge=ridge, copies=2)
    assert int(x.min()) >= 0 and int(x.max()) <= LEVELS - 1
    fidelity = class_fidelity(reference, x, y)
    assert fidelity["accuracy"] > 0.9 and min(fidelity["per_class"]) > 0.7  # chance is 0.1
    # each class's mean sample is near the mean real image of its class, far from the other classes'
    x_tr, y_tr = digits.train.tensors[0].double() / (LEVELS - 1), digits.train.tensors[1]
    real_means = torch.stack([x_tr[y_tr == k].mean(0) for k in range(10)])  # (K, D) in [0, 1]
    sample_means = torch.stack([x[y == k].double().mean(0) / (LEVELS - 1) for k in range(10)])
    dist = torch.cdist(sample_means, real_means)  # (K, K); measured: own 0.15-0.21, others >= 0.6
    own, other = dist.diag(), dist + torch.diag(torch.full((10,), math.inf))
    assert (own < 0.3).all() and (own < 0.5 * other.min(1).values).all()


def test_gaussian_samples_reject_bad_input(digits):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got -0.5"):
        gaussian_samples(digits, 2, temperature=-0.5, ridge=0.1)
    with pytest.raises(ValueError, match="n_per_class must be an int >= 1"):
        gaussian_samples(digits, 0, ridge=0.1)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        gaussian_samples(digits, 2, ridge=-1.0)
    continuous = load_data(DataConfig("toy2d", toy_n=100))
    with pytest.raises(ValueError, match="quantised data"):
        gaussian_samples(continuous, 2)


def test_gaussian_samples_pick_the_baselines_ridge(digits, ridge):
    picked = gaussian_samples(digits, 5, ridge=None, copies=2, ridges=(0.01, 0.03, 0.1))
    assert torch.equal(picked[0], gaussian_samples(digits, 5, ridge=ridge, copies=2)[0])


def test_sample_quality_row(digits, reference, ridge):
    x_te, y_te = digits.test.tensors
    x, y = gaussian_samples(digits, 36, temperature=1.0, ridge=ridge, copies=2)
    row = sample_quality(reference, x_te, y_te, x, y, LEVELS)
    assert row["n"] == 360 and row["c2st_n_per_side"] == 360
    for m in C2ST_METHODS:
        assert row[f"c2st_{m}_accuracy"] == classifier_two_sample_test(x_te / 16, x / 16, method=m)["accuracy"]
    assert row["class_fidelity"] == class_fidelity(reference, x, y)["accuracy"] > 0.9
    assert row["real_class_fidelity"] == class_fidelity(reference, x_te, y_te)["accuracy"]
    assert row["frechet"] == pytest.approx(feature_frechet_distance(x_te, x, reference))
    # real images not seen by the reference (val, 144) against test: the C2ST at chance. Not halves of test
    # in file order: load_digits is ordered by writer, and its first and last halves are told apart (0.65)
    x_va, y_va = digits.val.tensors
    real = sample_quality(reference, x_te, y_te, x_va, y_va, LEVELS, methods=("knn",))
    assert "c2st_logistic_accuracy" not in real and real["c2st_n_per_side"] == len(y_va)
    assert abs(real["c2st_knn_accuracy"] - 0.5) < 0.1  # sd sqrt(1/4 / 288) = 0.03: > 3 sd
    with pytest.raises(ValueError, match="samples and sample_labels must have the same length"):
        sample_quality(reference, x_te, y_te, x, y[:-1], LEVELS)
    with pytest.raises(ValueError, match="methods must name C2ST methods"):
        sample_quality(reference, x_te, y_te, x, y, LEVELS, methods=("svm",))
    with pytest.raises(ValueError, match="non-integer"):
        sample_quality(reference, x_te / 16, y_te, x, y, LEVELS)  # [0, 1]-scaled data, not levels
