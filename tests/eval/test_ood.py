"""OOD detection: AUROC/AUPR against their definitions, score orientation, the OOD sets' invariants (eval.ood_sets),
end to end. The baselines' tables and posteriors of any inputs are tested in test_baselines.py."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mixflow_core import build_model
from mixflow_core.data import DataConfig, Splits, load_data
from mixflow_core.eval.baselines import GAUSSIAN_METHOD
from mixflow_core.eval.ood import (
    FLOW_METHOD, IN_DISTRIBUTION, SCORES, auroc_aupr, density_scores, flow_scores, gaussian_scores, markdown_ood_table,
    ood_rows, ood_table, typicality_score,
)
from mixflow_core.eval.ood_sets import (
    gaussian_blur, hflip, invert_contrast, other_dataset, resample_images, standard_ood_sets, uniform_noise,
)
from mixflow_core.study.plotting import fig_ood_histograms
from mixflow_core.training.fit import fit
from mixflow_core.training.profiles import get_profile
from tests.helpers import float64_one_thread

LN2 = math.log(2.0)



@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data(DataConfig("digits"))


@pytest.fixture(scope="module")
def smoke():
    """(model, data): the digits smoke profile (300 training images) fit for one epoch (about a second)."""
    cfg = get_profile("digits", "smoke")
    with float64_one_thread():
        data = load_data(cfg.data)
        torch.manual_seed(0)
        model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
        fit(model, data, cfg.train, replace(cfg.runtime, epochs=1))
    return model.eval(), data


def fashion_like(n: int = 12, seed: int = 0) -> torch.Tensor:
    """(n, 1, 28, 28) uint8 images at 256 levels: smooth random blobs (Fashion-MNIST's shape and levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images = []
    for _ in range(n):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 9)
        images.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2)))
    return torch.from_numpy(np.round(np.stack(images)[:, None]).astype(np.uint8))


def _is_levels(x: torch.Tensor, levels: int) -> bool:
    xf = x.double()
    return bool((xf == xf.round()).all() and xf.min() >= 0 and xf.max() <= levels - 1)


# -- AUROC / AUPR ------------------------------------------------------------------------------------


def test_a_set_against_itself_is_chance():
    rng = np.random.default_rng(0)
    s = rng.normal(size=4000)
    auroc, aupr = auroc_aupr(s[:2000], s[2000:])  # two samples of one distribution
    # sd of the AUROC under H0 with n = m = 2000: sqrt((n + m + 1) / (12 n m)) = 0.0065; 5 sd
    assert abs(auroc - 0.5) < 0.033
    assert abs(aupr - 0.5) < 0.04  # AUPR's chance level is the positive fraction, here 1/2
    same = auroc_aupr(s[:500], s[:500])  # identical scores: every pair is a tie
    assert same[0] == pytest.approx(0.5)


def test_aupr_chance_level_is_the_positive_fraction():
    rng = np.random.default_rng(1)
    s = rng.normal(size=5000)
    _, aupr = auroc_aupr(s[:1000], s[1000:])  # 1000 in, 4000 OOD
    assert abs(aupr - 0.2) < 0.03


def test_separated_sets_score_one_and_reversed_sets_zero():
    rng = np.random.default_rng(2)
    s_in, s_ood = rng.normal(size=300), rng.normal(size=200) - 100.0
    assert auroc_aupr(s_in, s_ood) == pytest.approx((1.0, 1.0), abs=1e-12)
    auroc, aupr = auroc_aupr(s_ood, s_in)  # OOD scored higher: in-distribution is the positive class
    assert auroc == 0.0
    assert aupr < 0.45  # below even chance (200 / 500 = 0.4 plus the top positive's share)


def test_auroc_is_the_probability_that_an_in_input_outscores_an_ood_input():
    rng = np.random.default_rng(3)
    s_in, s_ood = rng.normal(0.7, 1, 60), rng.normal(0, 1, 40)
    pairs = (s_in[:, None] > s_ood[None]).mean() + 0.5 * (s_in[:, None] == s_ood[None]).mean()
    assert auroc_aupr(s_in, s_ood)[0] == pytest.approx(pairs, abs=1e-12)


def test_infinite_scores_are_ranked_and_nan_raises():
    assert auroc_aupr([0.0, 1.0, np.inf], [-np.inf, -5.0])[0] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        auroc_aupr([0.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        auroc_aupr([], [1.0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        auroc_aupr(np.zeros((2, 2)), [1.0])


# -- scores: values and orientation ---------------------------------------------------------------------


def test_density_scores_by_hand_and_oriented_higher_in_distribution():
    """In: confident, likely (log p(x|k) = (0, -50)); OOD: unlikely and ambiguous ((-10, -10)). Every score must put
    the in-distribution rows above the OOD rows."""
    log_py = torch.log(torch.tensor([0.25, 0.75]))
    table_in = torch.tensor([[0.0, -50.0], [-1.0, -60.0], [-55.0, -0.5]])
    table_ood = torch.tensor([[-10.0, -10.0], [-12.0, -11.0]])
    dim = 4
    train_nll = float(-torch.logsumexp(table_in + log_py, 1).mean())  # "training data" looks like the in rows
    s_in = density_scores(table_in, log_py, dim, train_nll)
    s_ood = density_scores(table_ood, log_py, dim, train_nll)
    assert tuple(s_in) == SCORES
    log_px = np.log(np.exp(table_in.numpy()) @ np.array([0.25, 0.75]))
    np.testing.assert_allclose(s_in["log_px"], log_px, rtol=1e-12)
    np.testing.assert_allclose(s_in["neg_bpd"], log_px / (dim * LN2), rtol=1e-12)
    np.testing.assert_allclose(s_in["max_log_px_y"], [0.0, -1.0, -0.5])
    post = np.exp(table_in.numpy()) * [0.25, 0.75]
    np.testing.assert_allclose(s_in["max_posterior"], post.max(1) / post.sum(1), rtol=1e-12)
    np.testing.assert_allclose(s_in["typicality"], -np.abs(-log_px - train_nll), rtol=1e-12)
    np.testing.assert_allclose(s_ood["max_posterior"][0], 0.75, rtol=1e-12)  # equal likelihoods: the prior decides
    for name in SCORES:
        assert auroc_aupr(s_in[name], s_ood[name]) == pytest.approx((1.0, 1.0), abs=1e-12), name


def test_typicality_is_best_at_the_training_mean():
    h = 3.0
    nll = np.linspace(0.0, 6.0, 61)
    t = typicality_score(nll, h)
    assert nll[np.argmax(t)] == pytest.approx(h)  # |nll - H| is minimal (0) at H: the most in-distribution point
    assert t.max() == 0.0 and (t <= 0).all()
    np.testing.assert_allclose(t, t[::-1])  # symmetric about H (the grid is): too likely is as atypical as too unlikely
    assert (np.diff(t[nll <= h]) > 0).all() and (np.diff(t[nll >= h]) < 0).all()
    with pytest.raises(ValueError, match="finite"):
        typicality_score(nll, math.inf)


def test_unknown_scores_and_a_missing_training_mean_raise():
    table, log_py = torch.zeros(3, 2), torch.log(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown OOD scores"):
        density_scores(table, log_py, 1, names=("log_px", "entropy"))
    with pytest.raises(ValueError, match="train_mean_nll"):
        density_scores(table, log_py, 1, names=("typicality",))
    assert "typicality" not in density_scores(table, log_py, 1)  # the default leaves it out without a mean
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        density_scores(table, log_py[:1], 1)


def test_rows_and_markdown():
    scores = {IN_DISTRIBUTION: {"log_px": np.array([3.0, 4.0]), "max_posterior": np.array([0.9, 0.8])},
              "noise": {"log_px": np.array([0.0, 1.0, 2.0]), "max_posterior": np.array([0.95, 0.5, 0.4])}}
    rows = ood_rows("m", scores)
    assert [(r["score"], r["ood_set"]) for r in rows] == [("log_px", "noise"), ("max_posterior", "noise")]
    assert rows[0] == {"model": "m", "score": "log_px", "ood_set": "noise", "auroc": 1.0,
                       "aupr": pytest.approx(1.0, abs=1e-12), "n_in": 2, "n_ood": 3}
    assert rows[1]["auroc"] == pytest.approx(4 / 6)
    md = markdown_ood_table(rows).splitlines()
    assert md[0] == "| model | score | noise (n = 3; AUPR chance 0.400) |"  # n_in / (n_in + n_ood) = 2 / 5
    assert md[2] == "| m | log_px | 1.000 / 1.000 |"
    with pytest.raises(ValueError, match="in-distribution"):
        ood_rows("m", {"noise": scores["noise"]})


# -- OOD transforms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["digits", "fashion"])
def test_transforms_keep_shape_dtype_and_levels(kind, digits):
    x, levels = (digits.test.tensors[0][:50], 17) if kind == "digits" else (fashion_like(), 256)
    for out in (uniform_noise(x, levels, seed=1), gaussian_blur(x, levels), invert_contrast(x, levels), hflip(x),
                gaussian_blur(x, levels, sigma=3.0)):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert _is_levels(out, levels)


def test_uniform_noise_is_uniform_over_the_levels_and_seeded():
    x = torch.zeros(500, 64, dtype=torch.uint8)
    noise = uniform_noise(x, 17, seed=3)
    counts = torch.bincount(noise.reshape(-1).long(), minlength=17).double()
    expected = noise.numel() / 17
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 16 degrees of freedom: P(chi2 > 50) ~ 2e-5
    assert torch.equal(noise, uniform_noise(x, 17, seed=3)) and not torch.equal(noise, uniform_noise(x, 17, seed=4))


def test_inversion_and_flip_are_involutions_on_the_image_view(digits):
    x = digits.test.tensors[0]
    inv = invert_contrast(x, 17)
    assert torch.equal(inv.int(), 16 - x.int())
    assert torch.equal(invert_contrast(inv, 17), x)
    flipped = hflip(x)
    assert torch.equal(hflip(flipped), x)
    assert torch.equal(flipped.reshape(-1, 8, 8), x.reshape(-1, 8, 8).flip(-1))  # the W axis of the 8x8 view
    assert not torch.equal(flipped, x)
    images = fashion_like(4)
    assert torch.equal(hflip(images), images.flip(-1))
    # a given image_shape: (64,) as 4 x 16
    assert torch.equal(hflip(x, image_shape=(4, 16)).reshape(-1, 4, 16), x.reshape(-1, 4, 16).flip(-1))


def test_blur_keeps_constant_images_and_smooths():
    const = torch.full((3, 64), 9, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(const, 17, sigma=1.5), const)
    images = fashion_like(6).double()
    noisy = (images + torch.from_numpy(np.random.default_rng(0).integers(-60, 60, images.shape))).clamp(0, 255)
    noisy = noisy.to(torch.uint8)
    blurred = gaussian_blur(noisy, 256, sigma=1.0)

    def roughness(v):  # mean squared difference of horizontal neighbours
        v = v.double()
        return float(((v[..., 1:] - v[..., :-1]) ** 2).mean())

    assert roughness(blurred) < 0.3 * roughness(noisy)
    assert abs(float(blurred.double().mean() - noisy.double().mean())) < 3.0  # a blur moves mass, keeps the level


def test_resample_digits_to_fashion_shape_and_back(digits):
    x = digits.test.tensors[0][:20]
    big = resample_images(x, (64,), 17, (1, 28, 28), 256)
    assert big.shape == (20, 1, 28, 28) and big.dtype == torch.uint8 and _is_levels(big, 256)
    for c in (0, 5, 16):  # a constant image stays constant, at its level rescaled
        const = torch.full((2, 64), c, dtype=torch.uint8)
        out = resample_images(const, (64,), 17, (1, 28, 28), 256)
        assert (out == round(c * 255 / 16)).all()
    assert int(big.max()) > 200 and int(big.min()) == 0  # the digits' range survives, rescaled
    small = resample_images(fashion_like(5), (1, 28, 28), 256, (64,), 17)
    assert small.shape == (5, 64) and _is_levels(small, 17)
    # up then down: a smoothed copy (bilinear is not invertible) with each image's mean level kept
    back = resample_images(big, (1, 28, 28), 256, (64,), 17).double()
    assert float((back.mean(1) - x.double().mean(1)).abs().max()) < 0.25
    assert float(torch.corrcoef(torch.stack([back.reshape(-1), x.double().reshape(-1)]))[0, 1]) > 0.9
    rgb = resample_images(x, (64,), 17, (3, 4, 4), 256)  # grey -> 3 equal channels
    assert rgb.shape == (20, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_other_dataset_from_splits_or_tensors(digits):
    src = fashion_like(30)
    out = other_dataset(src, digits, from_shape=(1, 28, 28), from_levels=256, n=10, seed=1)
    assert out.shape == (10, 64) and _is_levels(out, 17)
    fashion_splits = Splits(*(torch.utils.data.TensorDataset(src, torch.zeros(30, dtype=torch.int64))
                              for _ in range(3)), (1, 28, 28), 10, 256, tuple("0123456789"))
    assert torch.equal(other_dataset(fashion_splits, digits), resample_images(src, (1, 28, 28), 256, (64,), 17))
    to_fashion = other_dataset(digits, fashion_splits, n=7)
    assert to_fashion.shape == (7, 1, 28, 28) and _is_levels(to_fashion, 256)
    with pytest.raises(ValueError, match="from_shape and from_levels"):
        other_dataset(src, digits)


def test_bad_transform_input_raises(digits):
    x = digits.test.tensors[0][:5]
    with pytest.raises(ValueError, match="integer levels"):
        invert_contrast(x.double() / 16, 17)
    with pytest.raises(ValueError, match="integer levels"):
        gaussian_blur(x, 8)  # values up to 16 are not levels of L = 8
    with pytest.raises(ValueError, match="image_shape"):
        hflip(torch.zeros(3, 10))  # 10 is not a square
    with pytest.raises(ValueError, match="does not fit"):
        hflip(x, image_shape=(7, 7))
    with pytest.raises(ValueError, match="from_shape"):
        resample_images(x, (1, 28, 28), 17, (1, 28, 28), 256)
    with pytest.raises(ValueError, match="cannot hold"):
        resample_images(x, (64,), 17, (64,), 1024)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, 17, sigma=0.0)


# -- models --------------------------------------------------------------------------------------------


def test_gaussian_scores_tell_noise_from_digits(digits):
    sets = {"uniform noise": uniform_noise(digits.test.tensors[0], 17), "inverted": invert_contrast(digits.test.tensors[0], 17)}
    scores = gaussian_scores(digits, sets, copies=2)
    assert list(scores) == [IN_DISTRIBUTION, *sets] and set(scores[IN_DISTRIBUTION]) == set(SCORES)
    rows = {(r["score"], r["ood_set"]): r for r in ood_rows(GAUSSIAN_METHOD, scores)}
    assert rows["log_px", "uniform noise"]["auroc"] > 0.99
    assert rows["log_px", "inverted"]["auroc"] > 0.99


def test_flow_end_to_end_through_ood_table(smoke):
    model, data = smoke
    sets = standard_ood_sets(data)
    sets["fashion-like"] = other_dataset(fashion_like(40), data, from_shape=(1, 28, 28), from_levels=256)
    rows = ood_table(model, data, sets, seed=0, train_sample=200)
    models = {r["model"] for r in rows}
    assert models == {FLOW_METHOD, GAUSSIAN_METHOD, "logistic regression"}
    flow = [r for r in rows if r["model"] == FLOW_METHOD]
    assert len(flow) == len(SCORES) * len(sets)
    assert [r["score"] for r in rows if r["model"] == "logistic regression"] == ["max_posterior"] * len(sets)
    for r in rows:
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["aupr"] <= 1.0
        assert r["n_in"] == len(data.test) and r["n_ood"] == len(sets[r["ood_set"]])
    md = markdown_ood_table(rows)
    assert md.count("\n") == 1 + len(SCORES) * 2 + 1  # header, rule, 5 flow + 5 Gaussian scores, 1 logistic line
    # log p(x) of the flow: uniform noise is far less likely than digits
    noise = next(r for r in flow if r["score"] == "log_px" and r["ood_set"] == "uniform noise")
    assert noise["auroc"] > 0.9, noise


def test_flow_scores_are_seeded_and_give_bits_per_dim_for_histograms(smoke):
    model, data = smoke
    sets = {"uniform noise": uniform_noise(data.test.tensors[0], 17)}
    a = flow_scores(model, data, sets, seed=3, train_sample=100)
    b = flow_scores(model, data, sets, seed=3, train_sample=100)
    for name in a:
        for score in a[name]:
            np.testing.assert_array_equal(a[name][score], b[name][score])
    bpd_in, bpd_noise = -a[IN_DISTRIBUTION]["neg_bpd"], -a["uniform noise"]["neg_bpd"]
    assert np.median(bpd_noise) > np.median(bpd_in)
    fig = fig_ood_histograms(bpd_in, {"uniform noise": bpd_noise, "also noise": np.r_[bpd_noise, np.inf]})
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["uniform noise", "also noise"]
    assert "1 non-finite left out" in visible[1].get_legend().get_texts()[1].get_text()
    with pytest.raises(ValueError, match="at least one"):
        fig_ood_histograms(bpd_in, {})


def test_bad_ood_table_input_raises(smoke):
    model, data = smoke
    x = data.test.tensors[0]
    with pytest.raises(ValueError, match="must have shape"):
        ood_table(model, data, {"wrong": x.reshape(-1, 1, 8, 8)}, gaussian=False, sklearn=())
    with pytest.raises(ValueError, match="unknown OOD scores"):
        ood_table(model, data, {"noise": uniform_noise(x, 17)}, scores=("log_px", "energy"))
    with pytest.raises(ValueError, match="integer levels"):
        ood_table(model, data, {"scaled": x.double() / 16 + 0.5}, gaussian=False, sklearn=())
    with pytest.raises(ValueError, match="unknown sklearn"):
        ood_table(model, data, {"noise": uniform_noise(x, 17)}, sklearn=("knn",))
    with pytest.raises(ValueError, match="non-empty"):
        ood_table(model, data, {})
    with pytest.raises(ValueError, match="may not be called"):
        ood_table(model, data, {IN_DISTRIBUTION: x})
