"""Baselines: the logit-space per-class Gaussian (against scipy and hand computations), the sklearn rows, and both
models' scores of any inputs for OOD detection (gaussian_tables, sklearn_max_posteriors)."""

import inspect
import math
import statistics

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.utils.data import TensorDataset

from mixflow_core import LogitPreprocess, ModelConfig
from mixflow_core.eval.baselines import (
    GAUSSIAN_METHOD,
    SKLEARN_GRIDS,
    baseline_table,
    check_sklearn_methods,
    class_moments,
    gaussian_baseline,
    gaussian_log_likelihoods,
    gaussian_tables,
    gaussian_test_table,
    logit_space,
    sklearn_baselines,
    sklearn_max_posteriors,
)
from mixflow_core.eval.ood import auroc_aupr, density_scores
from mixflow_core.eval.ood_sets import uniform_noise
from mixflow_core.data import DataConfig, Splits, load_data

LN2 = math.log(2.0)


def make_splits(parts: dict[str, tuple[np.ndarray, np.ndarray]], levels: int | None, k: int) -> Splits:
    """Splits from {"train"|"val"|"test": (x, y)} numpy arrays."""
    ds = {name: TensorDataset(torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)) for name, (x, y) in parts.items()}
    return Splits(ds["train"], ds["val"], ds["test"], tuple(parts["train"][0].shape[1:]), k, levels,
                  tuple(str(i) for i in range(k)))


def binomial_classes(rng: np.random.Generator, probs: list[float], n: int, dim: int, levels: int) -> tuple:
    """n examples per class k with independent pixels ~ Binomial(L - 1, probs[k]), as float levels."""
    x = np.concatenate([rng.binomial(levels - 1, p, size=(n, dim)) for p in probs]).astype(np.float32)
    return x, np.repeat(np.arange(len(probs)), n)


def synthetic(probs: list[float], n: dict[str, int], dim: int = 4, levels: int = 16, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    return make_splits({s: binomial_classes(rng, probs, n[s], dim, levels) for s in ("train", "val", "test")},
                       levels, len(probs))


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data(DataConfig("digits"))


# -- the logit map and the class densities ---------------------------------------------------------


def test_logit_space_is_the_flows_map_and_logdet_is_the_jacobian():
    levels, alpha = 17, 0.05
    x = torch.tensor([[0.0, 3.0, 16.0], [7.0, 0.0, 12.0]])
    h_mid, ld_mid = logit_space(x, torch.full_like(x, 0.5), levels, alpha)
    h_flow, ld_flow = LogitPreprocess(levels, alpha, dequantize=False)(x)
    torch.testing.assert_close(h_mid, h_flow, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ld_mid, ld_flow, rtol=1e-13, atol=1e-13)

    u = torch.tensor([[0.1, 0.7, 0.999], [0.0, 0.3, 0.5]])
    h, logdet = logit_space(x, u, levels, alpha)
    torch.testing.assert_close(h, torch.logit(alpha + (1 - 2 * alpha) * (x + u) / levels), rtol=1e-12, atol=1e-12)
    for i in range(len(x)):  # log|det dh/dx| of the whole map, x in level units (so it includes -D log L)
        jac = torch.func.jacrev(lambda xi, ui=u[i]: logit_space(xi[None], ui[None], levels, alpha)[0][0])(x[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac).logabsdet, rtol=1e-12, atol=1e-12)


def test_class_moments_are_pooled_sample_mean_and_covariance():
    rng = np.random.default_rng(1)
    batches = [(torch.from_numpy(rng.normal(3.0, 0.1, size=(n, 3))), torch.from_numpy(rng.integers(0, 2, n)))
               for n in (40, 25, 31)]
    m = class_moments(batches, 2)
    h = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    for k in range(2):
        np.testing.assert_allclose(m.means[k].numpy(), h[y == k].mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.covs[k].numpy(), np.cov(h[y == k], rowvar=False), rtol=1e-9, atol=1e-14)
        assert m.counts[k] == (y == k).sum()
    with pytest.raises(ValueError, match="fewer than 2"):
        class_moments([(torch.zeros(3, 2), torch.tensor([0, 0, 1]))], 2)


def test_class_log_density_is_scipy_logpdf_plus_logit_jacobian():
    levels, alpha, ridge, dim = 9, 0.05, 0.02, 3
    rng = np.random.default_rng(2)
    x, y = binomial_classes(rng, [0.3, 0.6], 60, dim, levels)
    x = x.astype(np.float64)
    u = rng.random(x.shape)
    h, logdet = logit_space(torch.from_numpy(x), torch.from_numpy(u), levels, alpha)
    table = gaussian_log_likelihoods(h, class_moments([(h, torch.from_numpy(y))], 2), ridge) + logdet[:, None]

    s = alpha + (1 - 2 * alpha) * (x + u) / levels
    h_np = np.log(s / (1 - s))
    jac = np.log((1 - 2 * alpha) / (levels * s * (1 - s))).sum(1)  # dh/dx per pixel, x in level units
    for k in range(2):
        mean, cov = h_np[y == k].mean(0), np.cov(h_np[y == k], rowvar=False) + ridge * np.eye(dim)
        expected = multivariate_normal(mean, cov).logpdf(h_np) + jac
        np.testing.assert_allclose(table[:, k].numpy(), expected, rtol=1e-10)


# -- gaussian_baseline -----------------------------------------------------------------------------


def test_bits_per_dim_of_a_one_dimensional_case_by_hand():
    levels, alpha, ridge, copies, seed = 8, 0.05, 0.1, 2, 3
    parts = {
        "train": ([1, 2, 2, 3, 1, 5, 6, 6, 7, 5, 4], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]),
        "val": ([2, 6, 3], [0, 1, 1]),
        "test": ([1, 3, 4, 6, 7], [0, 0, 1, 1, 0]),
    }
    data = make_splits({s: (np.array(x, np.float32)[:, None], np.array(y)) for s, (x, y) in parts.items()}, levels, 2)
    got = gaussian_baseline(data, alpha, copies, seed, ridges=(ridge,))

    rng = np.random.default_rng(seed)  # documented draw order: train copies, val, test
    noise = {"train": [rng.random((11, 1))[:, 0] for _ in range(copies)], "val": rng.random((3, 1))[:, 0],
             "test": rng.random((5, 1))[:, 0]}

    def s_of(x, u):
        return alpha + (1 - 2 * alpha) * (x + u) / levels

    def h_of(x, u):
        return math.log(s_of(x, u) / (1 - s_of(x, u)))

    xs, ys = parts["train"]
    fit = {k: [h_of(x, u[i]) for u in noise["train"] for i, (x, c) in enumerate(zip(xs, ys)) if c == k] for k in (0, 1)}
    mean = {k: statistics.mean(v) for k, v in fit.items()}
    var = {k: statistics.variance(v) + ridge for k, v in fit.items()}  # n - 1 denominator, as np.cov
    prior = {0: 5 / 11, 1: 6 / 11}
    cond, marg, correct = [], [], 0
    for x, c, u in zip(*parts["test"], noise["test"]):
        h = h_of(x, u)
        jac = math.log((1 - 2 * alpha) / (levels * s_of(x, u) * (1 - s_of(x, u))))
        log_p = {k: -0.5 * math.log(2 * math.pi * var[k]) - (h - mean[k]) ** 2 / (2 * var[k]) + jac for k in (0, 1)}
        cond.append(log_p[c])
        marg.append(math.log(sum(math.exp(log_p[k]) * prior[k] for k in (0, 1))))
        correct += max((0, 1), key=lambda k: log_p[k] + math.log(prior[k])) == c
    assert got["bpd_conditional"] == pytest.approx(-statistics.mean(cond) / LN2, rel=1e-10)
    assert got["bpd_marginal"] == pytest.approx(-statistics.mean(marg) / LN2, rel=1e-10)
    assert got["accuracy"] == correct / 5
    assert got["n"] == 5 and got["ridge"] == ridge and got["method"] == GAUSSIAN_METHOD


def test_ridge_is_the_validation_best():
    data = synthetic([0.3, 0.5, 0.7], {"train": 12, "val": 200, "test": 50}, dim=8)
    ridges = (1e-4, 1e-2, 0.1, 1.0, 100.0)
    val = [gaussian_baseline(data, copies=1, ridges=(r,))["val_bpd_conditional"] for r in ridges]
    best = int(np.argmin(val))
    assert 0 < best < len(ridges) - 1, f"want an interior optimum to tell the rule apart: {val}"
    got = gaussian_baseline(data, copies=1, ridges=ridges)
    assert got["ridge"] == ridges[best]
    assert got["val_bpd_conditional"] == pytest.approx(val[best], rel=1e-12)


def test_separated_classes_are_classified_and_identical_classes_are_chance():
    separated = gaussian_baseline(synthetic([0.2, 0.8], {"train": 200, "val": 50, "test": 500}), copies=2)
    assert separated["accuracy"] >= 0.99
    same = gaussian_baseline(synthetic([0.5, 0.5], {"train": 500, "val": 50, "test": 1000}), copies=2)
    assert abs(same["accuracy"] - 0.5) < 0.06
    # p(x|0) ~ p(x|1), so p(x) ~ p(x|y): the two bits/dim agree; the labels carry no information
    assert abs(same["bpd_marginal"] - same["bpd_conditional"]) < 0.01
    for r in (separated, same):
        assert 0.0 <= r["ece"] <= 1.0


def test_seeded_results_reproduce_and_depend_on_the_seed():
    data = synthetic([0.3, 0.6], {"train": 60, "val": 30, "test": 80})
    a, b, c = (gaussian_baseline(data, copies=2, seed=s) for s in (5, 5, 6))
    assert a == b
    assert a["bpd_conditional"] != c["bpd_conditional"]


def test_images_are_flattened_like_vectors():
    rng = np.random.default_rng(4)
    parts = {s: binomial_classes(rng, [0.3, 0.6], n, 6, 16) for s, n in (("train", 40), ("val", 20), ("test", 30))}
    vectors = make_splits(parts, 16, 2)
    images = make_splits({s: (x.reshape(-1, 1, 2, 3), y) for s, (x, y) in parts.items()}, 16, 2)
    assert images.data_shape == (1, 2, 3)
    assert gaussian_baseline(images, copies=2) == gaussian_baseline(vectors, copies=2)


def test_continuous_data_raises_and_the_table_skips_the_gaussian():
    toy = load_data(DataConfig("toy2d", toy_n=400))
    with pytest.raises(ValueError, match="continuous"):
        gaussian_baseline(toy)
    rows = baseline_table(toy, fast=True)
    assert [r["method"] for r in rows] == ["QDA (reg_param)", "logistic regression (C)"]
    assert all(r["accuracy"] > 0.75 for r in rows)


def test_non_level_input_raises():
    data = synthetic([0.3, 0.6], {"train": 20, "val": 10, "test": 10})
    scaled = make_splits({s: (ds.tensors[0].numpy() / 15, ds.tensors[1].numpy())
                          for s, ds in (("train", data.train), ("val", data.val), ("test", data.test))}, 16, 2)
    with pytest.raises(ValueError, match="integer levels"):
        gaussian_baseline(scaled)


def test_default_alpha_is_the_flows():
    default = inspect.signature(gaussian_baseline).parameters["alpha"].default
    assert default == inspect.signature(LogitPreprocess).parameters["alpha"].default == ModelConfig().alpha


def test_digits_gaussian(digits):
    g = gaussian_baseline(digits)  # benchmarks/RESULTS.md: 98.61% and 2.167 bits/dim (copies 10, seed 0)
    assert g["accuracy"] > 0.95
    assert 1.5 < g["bpd_conditional"] < 3.0
    assert 0.0 <= g["ece"] <= 1.0
    assert g["n"] == len(digits.test)
    refit = gaussian_baseline(digits, refit_on_val=True)
    assert refit["ridge"] == g["ridge"] and refit["val_bpd_conditional"] is None
    assert refit["accuracy"] > 0.95 and 1.5 < refit["bpd_conditional"] < 3.0


# -- sklearn ---------------------------------------------------------------------------------------


def test_sklearn_rows_are_tuned_on_validation(digits):
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis

    rows = sklearn_baselines(digits, methods=("qda", "logistic", "svc"))
    for method, row in zip(("qda", "logistic", "svc"), rows):
        scores = row["val_grid_accuracy"]
        assert len(scores) == len(SKLEARN_GRIDS[method])
        assert row["param"] == SKLEARN_GRIDS[method][scores.index(max(scores))]  # first maximum
        assert row["val_accuracy"] == max(scores)
        assert row["accuracy"] > 0.95 and 0.0 <= row["ece"] <= 1.0
        assert row["bpd_conditional"] is None and row["bpd_marginal"] is None and row["n"] == len(digits.test)
    qda = rows[0]
    x_tr, y_tr = (t.numpy() for t in digits.train.tensors)
    x_te, y_te = (t.numpy() for t in digits.test.tensors)
    direct = QuadraticDiscriminantAnalysis(reg_param=qda["param"]).fit(x_tr / 16, y_tr).score(x_te / 16, y_te)
    assert qda["accuracy"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="unknown"):
        sklearn_baselines(digits, methods=("knn",))


def test_fast_table_on_digits(digits):
    rows = baseline_table(digits, fast=True)
    assert [r["method"] for r in rows] == [GAUSSIAN_METHOD, "QDA (reg_param)", "logistic regression (C)"]
    assert rows[0]["accuracy"] > 0.95 and 1.5 < rows[0]["bpd_conditional"] < 3.0
    assert rows[0] == baseline_table(digits, fast=True)[0]


def test_qda_is_left_out_when_classes_have_fewer_examples_than_features():
    """sklearn's QDA refuses classes with fewer examples than dimensions (smoke-sized digits: ~27 per class, 64 dims)."""
    from mixflow_core.data import DataConfig, load_data

    small = load_data(DataConfig("digits", train_limit=300))
    rows = sklearn_baselines(small, methods=("qda", "logistic"))
    assert [r["method"] for r in rows] == ["logistic regression (C)"]
    assert 0.5 < rows[0]["accuracy"] <= 1.0


def test_gaussian_draws_tighten_the_bound_and_leave_one_draw_unchanged(digits):
    one = gaussian_baseline(digits, copies=2)
    assert gaussian_baseline(digits, copies=2, draws=1) == one and one["draws"] == 1
    many = gaussian_baseline(digits, copies=2, draws=32)
    assert many["draws"] == 32 and many["ridge"] == one["ridge"]  # validation is untouched
    # log-mean-exp over draws is a tighter bound than one draw: ~0.07 bits/dim on digits, far above noise
    assert many["bpd_conditional"] < one["bpd_conditional"] - 0.03
    with pytest.raises(ValueError, match="draws"):
        gaussian_baseline(digits, draws=0)


def test_baseline_table_leaves_the_svc_out_for_large_training_sets(digits, monkeypatch):
    import mixflow_core.eval.baselines as baselines

    monkeypatch.setattr(baselines, "SVC_MAX_TRAIN", len(digits.train) - 1)
    methods = [r["method"] for r in baselines.baseline_table(digits)]
    assert methods == [GAUSSIAN_METHOD, "QDA (reg_param)", "logistic regression (C)"]


# -- OOD detection: the baselines' scores of any inputs ------------------------------------------------


def test_gaussian_tables_are_the_baselines_gaussian(digits):
    table, _, log_py, info = gaussian_test_table(digits, copies=2, seed=4)
    tables, log_py2, ridge = gaussian_tables(digits, {"test": digits.test.tensors[0], "again": digits.test.tensors[0]},
                                             copies=2, seed=4)
    assert ridge == info["ridge"]
    torch.testing.assert_close(tables["test"], table, rtol=0, atol=0)  # the same moments and the same noise draw
    torch.testing.assert_close(log_py2, log_py, rtol=0, atol=0)
    # the test set against a second noise draw of itself: indistinguishable
    s = {name: density_scores(t, log_py, 64)["log_px"] for name, t in tables.items()}
    assert abs(auroc_aupr(s["test"], s["again"])[0] - 0.5) < 0.08  # n = m = 360: sd 0.0215


def test_sklearn_max_posteriors_are_probabilities(digits):
    inputs = {"test": digits.test.tensors[0], "noise": uniform_noise(digits.test.tensors[0], 17)}
    out = sklearn_max_posteriors(digits, inputs, ("logistic",), max_train=500)
    assert list(out) == ["logistic regression"]
    for s in out["logistic regression"].values():
        assert s.shape == (360,) and (s >= 0.1 - 1e-12).all() and (s <= 1 + 1e-12).all()  # max of 10 probabilities
    assert np.median(out["logistic regression"]["test"]) > 0.9
    with pytest.raises(ValueError, match="unknown sklearn"):
        sklearn_max_posteriors(digits, inputs, ("knn",))
    assert check_sklearn_methods("svc") == ("svc",)  # one name or several
