"""The fixed ZCA whitening layer: unit covariance after init, exact inverse and log-det, set by fit from the data."""

import math

import pytest
import torch

from mixflow_core import MLP, ModelConfig, PriorConfig, build_model
from mixflow_core.data import DataConfig, load_data
from mixflow_core.flows.layers import Whiten
from mixflow_core.training.config import RuntimeConfig, TrainConfig
from mixflow_core.training.fit import fit


def correlated(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (float64) of a Gaussian with a random, badly conditioned covariance; and that covariance."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, d, dtype=torch.float64)
    cov = a @ a.T
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T + 3.0
    return x, cov


def initialised(d: int = 6, ridge: float = 1e-10) -> tuple[Whiten, torch.Tensor]:
    x, _ = correlated(4000, d)
    w = Whiten((d,), ridge).double()
    w.init_from(x.mean(0), torch.cov(x.T))
    return w, x


def test_whitened_training_data_have_unit_covariance_and_zero_mean() -> None:
    w, x = initialised()
    z, _ = w(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    # ZCA, not any whitening: W is symmetric (the rotation that keeps the images closest to themselves)
    torch.testing.assert_close(w.matrix, w.matrix.T)


def test_the_ridge_shrinks_the_directions_below_it() -> None:
    """Eigenvalue lambda of S becomes lambda / (lambda + ridge) in the whitened covariance."""
    x, _ = correlated(4000, 6)
    s = torch.cov(x.T)
    lam = torch.linalg.eigvalsh(s)
    w = Whiten((6,), ridge=float(lam[2])).double()
    w.init_from(x.mean(0), s)
    got = torch.linalg.eigvalsh(torch.cov(w(x)[0].T))
    torch.testing.assert_close(got, lam / (lam + float(lam[2])), atol=1e-8, rtol=1e-6)


def test_inverse_and_log_det_are_exact() -> None:
    w, x = initialised()
    z, logdet = w(x[:5])
    torch.testing.assert_close(w.inverse(z), x[:5], atol=1e-10, rtol=0)
    jac = torch.func.jacrev(lambda v: w(v[None])[0][0])(x[0])
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac)[1].expand(5))
    torch.testing.assert_close(w.transform(x[:5]), z)


def test_images_keep_their_shape() -> None:
    x = torch.randn(300, 1, 4, 4, dtype=torch.float64)
    w = Whiten((1, 4, 4)).double()
    w.init_from(x.flatten(1).mean(0), torch.cov(x.flatten(1).T))
    z, _ = w(x[:3])
    assert z.shape == (3, 1, 4, 4)
    torch.testing.assert_close(w.inverse(z), x[:3])


def test_before_init_it_is_the_identity() -> None:
    w = Whiten((3,))
    x = torch.randn(4, 3)
    z, logdet = w(x)
    assert w.needs_data_init and torch.equal(z, x) and torch.equal(logdet, torch.zeros(4))


@pytest.mark.parametrize("case, match", [
    ("ridge", "ridge must be positive"), ("shape", "need a mean"), ("nan", "not finite"), ("input", "built for samples"),
])
def test_bad_input_is_a_clear_error(case, match) -> None:
    with pytest.raises(ValueError, match=match):
        if case == "ridge":
            Whiten((3,), ridge=0.0)
        w = Whiten((3,))
        if case == "shape":
            w.init_from(torch.zeros(4), torch.eye(4))
        if case == "nan":
            w.init_from(torch.tensor([0.0, float("nan"), 0.0]), torch.eye(3))
        if case == "input":
            w(torch.zeros(2, 4))


def test_model_config_rejects_a_non_positive_ridge() -> None:
    with pytest.raises(ValueError, match="whiten_ridge"):
        ModelConfig(whiten=True, whiten_ridge=-1.0)


def test_fit_whitens_with_the_training_data_and_the_model_density_stays_normalised() -> None:
    """fit sets m and S from the preprocessed training set (before ActNorm); with a moments prior and g ~ 0 the model
    is then a per-class Gaussian of the data, so its log-density integrates the change of variables correctly:
    log p(x|y) equals a Gaussian log-density computed directly in logit space with Sigma_y = W^-1 C_y W^-T."""
    data = load_data(DataConfig("digits", train_limit=600))
    cfg = ModelConfig(arch=MLP(hidden=(8,), n_blocks=1), whiten=True, whiten_ridge=1e-2, g_init_scale=1e-6,
                      actnorm=False)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg,
                        PriorConfig(init="moments", covariance="full", moments_ridge=1e-3), data.class_counts()).double()
    fit(model, data, TrainConfig(lr=1e-12, early_stopping="none"), RuntimeConfig(epochs=1, progress=False))
    whiten = model.flow.layers[0]
    assert isinstance(whiten, Whiten) and not whiten.needs_data_init
    x = torch.stack([data.train[i][0] for i in range(len(data.train))]).double()
    torch.manual_seed(1)
    h = model.preprocess(x)[0].flatten(1)
    assert (whiten.mean - h.mean(0)).abs().max() < 0.05  # another dequantisation draw of the same set
    model.eval()
    xt = torch.stack([data.test[i][0] for i in range(5)]).double()
    torch.manual_seed(2)
    log_p = model.log_prob_all(xt)
    torch.manual_seed(2)
    h, pre_ld = model.preprocess(xt)
    z, flow_ld = model.flow(h)  # g ~ 1e-6: z ~ W (h - m)
    w_inv = whiten.inverse_matrix
    for k in range(3):
        cov_h = w_inv @ model.prior.covariances()[k] @ w_inv.T
        mean_h = w_inv @ model.prior.means[k] + whiten.mean
        direct = torch.distributions.MultivariateNormal(mean_h, cov_h).log_prob(h.flatten(1)) + pre_ld
        torch.testing.assert_close(log_p[:, k], direct, atol=1e-3, rtol=1e-6)
    assert math.isfinite(float(log_p.detach().sum()))
