"""MixtureFlow: log p(x|y) = log N(f(h(x)); mu_y, sigma_y) + log|det J_f| + log|det J_h| - D log L."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from mixflow_core import (
    MLP,
    ClassConditionalGaussian,
    Conv,
    Exact,
    FlowSequence,
    IdentityPreprocess,
    LogitPreprocess,
    MixtureFlow,
    ModelConfig,
    PriorConfig,
    build_model,
    hybrid,
)

ALPHA = 0.05


# -- helpers -----------------------------------------------------------------------------------


def trivial_model(d: int, levels: int, k: int = 3, class_counts=None, means=None) -> MixtureFlow:
    """Identity flow, N(mu_k, I) prior (mu = 0 unless `means` given), midpoint logit preprocessing."""
    prior = ClassConditionalGaussian(k, d, PriorConfig(init="zeros"), class_counts)
    if means is not None:
        prior.means.copy_(means)
    return MixtureFlow(FlowSequence([]), prior, LogitPreprocess(levels, ALPHA, dequantize=False), (d,))


def hand_log_p_given_k(x: np.ndarray, levels: int, mean: np.ndarray) -> np.ndarray:
    """log p(x|k) for the trivial model, written out: (B, D) levels -> (B,)."""
    d = x.shape[1]
    y = (x + 0.5) / levels
    s = ALPHA + (1 - 2 * ALPHA) * y
    h = np.log(s / (1 - s))
    log_normal = -0.5 * ((h - mean) ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    jac = (math.log(1 - 2 * ALPHA) - np.log(s) - np.log(1 - s)).sum(1)
    return log_normal + jac - d * math.log(levels)


def mlp_model(d: int = 6, levels: int | None = 17, k: int = 3, seed: int = 0, class_counts=None, **cfg) -> MixtureFlow:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(**{"arch": MLP(hidden=(8,), n_blocks=2), **cfg})
    prior_cfg = PriorConfig(learn_means=True, learn_scales=True, init_seed=seed)
    return build_model((d,), k, levels, model_cfg, prior_cfg, class_counts)


def conv_model(seed: int = 0) -> MixtureFlow:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2))
    return build_model((1, 8, 8), 3, 256, model_cfg, PriorConfig(learn_means=True, learn_scales=True))


def levels_data(shape: tuple[int, ...], levels: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, levels, (n, *shape)).to(torch.get_default_dtype())


def warm_up(model: MixtureFlow, x: torch.Tensor) -> MixtureFlow:
    """One training-mode forward (initialises ActNorm from data), then eval mode."""
    model.train()
    model.log_prob_all(x)
    return model.eval()


def exact_eval_model(
    d: int = 3, levels: int | None = 17, seed: int = 0, class_counts=None
) -> tuple[MixtureFlow, torch.Tensor]:
    """Deterministic model (exact log-det, bin midpoints, tight inverse) in eval mode, and its warm-up data."""
    model = mlp_model(
        d, levels, seed=seed, class_counts=class_counts,
        logdet=Exact(), dequantize=False, inverse_tol=1e-10, inverse_max_iter=500,
    )
    x = levels_data((d,), levels, 16) if levels is not None else 2.0 * torch.randn(16, d)
    return warm_up(model, x), x


# -- (a) bits/dim by hand ----------------------------------------------------------------------


def test_trivial_flow_bits_per_dim_match_hand_computation():
    d, levels = 5, 17
    means = torch.tensor([[0.0] * 5, [0.5, -1.0, 0.0, 2.0, 0.3], [-1.5, 0.2, 1.0, 0.0, -0.4]])
    counts = torch.tensor([2.0, 5.0, 3.0])
    model = trivial_model(d, levels, class_counts=counts, means=means)
    x = levels_data((d,), levels, 12)
    x[0] = 0.0
    x[1] = levels - 1.0  # both ends of the range
    y = torch.tensor([0, 1, 2] * 4)
    xn, log2 = x.numpy(), math.log(2.0)
    log_p_all = np.stack([hand_log_p_given_k(xn, levels, means[k].numpy()) for k in range(3)], 1)  # (B, K)

    cond = log_p_all[np.arange(12), y.numpy()]
    np.testing.assert_allclose(model.bits_per_dim(x, y).detach().numpy(), -cond / (d * log2), rtol=0, atol=1e-10)

    log_joint = log_p_all + np.log(counts.numpy() / counts.numpy().sum())
    marginal = np.logaddexp.reduce(log_joint, axis=1)
    np.testing.assert_allclose(model.bits_per_dim(x).detach().numpy(), -marginal / (d * log2), rtol=0, atol=1e-10)


def test_trivial_flow_zero_means_all_classes_equal():
    # N(0, I) for every class: conditional bpd = marginal bpd (sum_k p(k) = 1)
    d, levels = 4, 17
    model = trivial_model(d, levels, class_counts=torch.tensor([1.0, 2.0, 3.0]))
    x = levels_data((d,), levels, 6)
    want = -hand_log_p_given_k(x.numpy(), levels, np.zeros(d)) / (d * math.log(2))
    for y in (None, torch.zeros(6, dtype=torch.long), torch.full((6,), 2)):
        np.testing.assert_allclose(model.bits_per_dim(x, y).detach().numpy(), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("d,levels,tol", [(1, 256, 2e-5), (1, 17, 5e-3), (2, 64, 2e-4)])
def test_midpoint_probabilities_sum_to_logit_window_mass(d, levels, tol):
    """exp(log p(x)) is the midpoint rule for the mass of bin x; over all L^D bins it sums to
    P(h in [logit a, logit(1-a)])^D = (Phi(logit(1-a)) - Phi(logit a))^D < 1 for a N(0, I) prior."""
    model = trivial_model(d, levels, k=1)
    grid = torch.tensor(list(itertools.product(range(levels), repeat=d)), dtype=torch.get_default_dtype())
    p = torch.exp(model.marginal_log_prob(grid)).detach()
    window = norm.cdf(math.log((1 - ALPHA) / ALPHA)) - norm.cdf(math.log(ALPHA / (1 - ALPHA)))
    assert float(p.sum()) <= 1.0
    assert float(p.sum()) == pytest.approx(window**d, abs=tol)
    if d == 1:
        # bin by bin against the exact mass Phi(h(upper edge)) - Phi(h(lower edge))
        edges = np.arange(levels + 1) / levels
        s = ALPHA + (1 - 2 * ALPHA) * edges
        exact = np.diff(norm.cdf(np.log(s / (1 - s))))
        np.testing.assert_allclose(p.numpy(), exact, rtol=5e-3 if levels == 256 else 0.1)


# -- (b) classification ------------------------------------------------------------------------


def test_posterior_is_bayes_rule_and_predict_is_argmax():
    # the exact log-det makes repeated forward passes identical, so the three calls can be compared
    model, x = exact_eval_model(d=3, class_counts=torch.tensor([1.0, 4.0, 5.0]))
    post = model.posterior(x).detach()
    assert post.shape == (16, 3)
    torch.testing.assert_close(post.sum(1), torch.ones(16), rtol=0, atol=1e-12)
    log_py = torch.log(torch.tensor([0.1, 0.4, 0.5]))
    torch.testing.assert_close(post, torch.softmax(model.log_prob_all(x).detach() + log_py, 1), rtol=0, atol=1e-12)
    pred = model.predict(x)
    assert pred.dtype == torch.long
    assert torch.equal(pred, post.argmax(1))


def test_marginal_log_prob_is_logsumexp_of_joint():
    model, x = exact_eval_model(d=3)
    joint = (model.log_prob_all(x) + model.prior.log_class_probs).detach()
    torch.testing.assert_close(model.marginal_log_prob(x).detach(), torch.logsumexp(joint, 1), rtol=0, atol=1e-12)


# -- (c) gradients -----------------------------------------------------------------------------


def assert_every_parameter_gets_a_gradient(model: MixtureFlow, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    loss = hybrid(model.log_prob_all(x), y, model.prior.log_class_probs, model.dim, beta=1.0)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert "prior.means" in names and "prior.log_scales" in names
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_every_parameter_gets_a_gradient_mlp():
    model = mlp_model(d=6, levels=17)
    assert_every_parameter_gets_a_gradient(model, levels_data((6,), 17, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


def test_every_parameter_gets_a_gradient_conv():
    model = conv_model()
    assert model.latent_shape == (4, 4, 4)
    assert_every_parameter_gets_a_gradient(model, levels_data((1, 8, 8), 256, 4), torch.tensor([0, 1, 2, 1]))


# -- (d) state dict round trip -----------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_densities():
    a, x = exact_eval_model(d=4, seed=0)
    b, _ = exact_eval_model(d=4, seed=1)  # other weights, prior init seed and ActNorm statistics
    assert not torch.allclose(a.log_prob_all(x), b.log_prob_all(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.log_prob_all(x), b.log_prob_all(x))
    assert torch.equal(a.prior.means, b.prior.means)


# -- (e) sampling and inversion ----------------------------------------------------------------


def test_sample_shapes_and_integer_levels():
    model, _ = exact_eval_model(d=3)
    s = model.sample(1, n=20, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20, 3)
    assert torch.equal(s, torch.round(s)) and s.min() >= 0 and s.max() <= 16
    s = model.sample(torch.tensor([0, 2, 1]), temperature=0.7)
    assert s.shape == (3, 3)
    conv = conv_model().eval()
    s = conv.sample(2, n=2)
    assert s.shape == (2, 1, 8, 8)
    assert torch.equal(s, torch.round(s)) and s.min() >= 0 and s.max() <= 255


def test_sample_reproducible_with_generator():
    model, _ = exact_eval_model(d=3)
    a = model.sample(0, n=5, generator=torch.Generator().manual_seed(3))
    b = model.sample(0, n=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("levels", [17, None])
def test_decode_inverts_latent_and_logdet(levels):
    model, x = exact_eval_model(d=3, levels=levels)
    z, _ = model.latent_and_logdet(x)
    back = model.decode(z.detach())
    if levels is None:
        torch.testing.assert_close(back, x, rtol=0, atol=1e-8)
    else:
        assert torch.equal(back, x)  # midpoint of each bin maps back to the same level


def test_samples_survive_latent_and_decode():
    model, _ = exact_eval_model(d=3)
    s = model.sample(2, n=30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.decode(model.latent_and_logdet(s)[0].detach()), s)


def test_zero_temperature_sample_is_the_decoded_mean():
    model, _ = exact_eval_model(d=3)
    one = model.sample(1, n=1, temperature=0.0)
    many = model.sample(1, n=7, temperature=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(many, one.expand(7, 3))
    assert torch.equal(one, model.decode(model.prior.means[1:2].detach()))


# -- (f) bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(4, 5), r"input must have shape \(B, 6\)"),
        (torch.zeros(6), r"input must have shape \(B, 6\)"),
        (torch.zeros(2, 6, 1), r"input must have shape \(B, 6\)"),
        (torch.tensor([[1.0, 2.0, float("nan"), 0.0, 0.0, 0.0]]), "NaN or infinite"),
        (torch.tensor([[1.0, 2.0, float("inf"), 0.0, 0.0, 0.0]]), "NaN or infinite"),
        (torch.tensor([[1.0, 2.0, 17.0, 0.0, 0.0, 0.0]]), r"levels in \[0, 16\]"),
        (torch.tensor([[-1.0, 2.0, 3.0, 0.0, 0.0, 0.0]]), r"levels in \[0, 16\]"),
        (torch.randint(0, 17, (3, 6)) / 16.0, "integer levels"),  # data scaled to [0, 1]
        (np.zeros((2, 6)), "must be a torch.Tensor"),
    ],
    ids=["wrong-dim", "no-batch", "extra-axis", "nan", "inf", "too-large", "negative", "scaled", "numpy"],
)
def test_bad_input_raises(x, match):
    model = mlp_model()
    with pytest.raises(ValueError, match=match):
        model.log_prob_all(x)


def test_bad_input_raises_for_continuous_model():
    model = mlp_model(d=2, levels=None)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.log_prob_all(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"input must have shape \(B, 2\)"):
        model.log_prob_all(torch.zeros(3, 3))


def test_bad_labels_raise():
    model = mlp_model()
    x = levels_data((6,), 17, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.log_prob(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        model.bits_per_dim(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.sample(5, n=2)


def test_bad_sampling_arguments_raise():
    model = mlp_model()
    with pytest.raises(ValueError, match="needs n >= 1"):
        model.sample(1)
    with pytest.raises(ValueError, match="needs n >= 1"):
        model.sample(1, n=0)
    with pytest.raises(ValueError, match="disagrees with 2 labels"):
        model.sample(torch.tensor([0, 1]), n=3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.sample(1, n=2, temperature=-1.0)


def test_mismatched_prior_raises():
    flow = build_model((4,), 2, 17, ModelConfig(arch=MLP(hidden=(4,), n_blocks=1))).flow
    prior = ClassConditionalGaussian(2, 5)
    with pytest.raises(ValueError, match="prior dim 5 != latent size 4"):
        MixtureFlow(flow, prior, LogitPreprocess(17), (4,))


def test_preprocess_arguments_validated():
    with pytest.raises(ValueError, match="levels must be >= 2"):
        LogitPreprocess(1)
    with pytest.raises(ValueError, match="alpha"):
        LogitPreprocess(17, alpha=0.5)


def test_integer_dtype_levels_give_the_same_density():
    # uint8 / int64 levels are the natural encoding of images; they must not shift the midpoint
    model, x = exact_eval_model(d=3)
    want = model.log_prob_all(x)
    assert model.log_prob_all(x.to(torch.long)).dtype == want.dtype
    for dtype in (torch.long, torch.uint8):
        torch.testing.assert_close(model.log_prob_all(x.to(dtype)), want, rtol=0, atol=1e-12)
    dequantising = mlp_model(d=3).eval()  # uniform noise needs a float tensor to draw into
    assert torch.isfinite(dequantising.log_prob_all(x.to(torch.uint8))).all()


# -- (g) log-density assembly against independent references -----------------------------------


def flow_jacobian_logdet(model: MixtureFlow, y: torch.Tensor, to_h) -> torch.Tensor:
    """log|det dz/dy| for one sample, from the full Jacobian of y -> h -> z by jacrev."""

    def f(v: torch.Tensor) -> torch.Tensor:
        return model.flow(to_h(v)[None])[0].flatten()

    return torch.linalg.slogdet(torch.func.jacrev(f)(y)).logabsdet


def test_log_prob_is_prior_density_of_latent_plus_logdet():
    model, x = exact_eval_model(d=3)
    y = torch.tensor([0, 1, 2] * 5 + [0])
    z, logdet = model.latent_and_logdet(x)
    z, logdet = z.detach().numpy(), logdet.detach().numpy()
    mu, sig = model.prior.means.detach().numpy(), torch.exp(model.prior.log_scales).detach().numpy()
    log_pz = np.array([multivariate_normal.logpdf(z[i], mu[c], np.diag(sig[c] ** 2)) for i, c in enumerate(y.tolist())])
    np.testing.assert_allclose(model.log_prob(x, y).detach().numpy(), log_pz + logdet, rtol=0, atol=1e-10)


def test_whole_model_logdet_equals_jacobian_of_continuous_map():
    levels, d = 17, 3
    model, x = exact_eval_model(d=d, levels=levels)
    logdet = model.latent_and_logdet(x)[1].detach()

    def to_h(y: torch.Tensor) -> torch.Tensor:  # y in (0, 1) -> logit space, as LogitPreprocess does
        return torch.logit(ALPHA + (1 - 2 * ALPHA) * y)

    for i in range(4):
        y = (x[i] + 0.5) / levels  # z as a function of the continuous y; x = L y - 1/2 adds -D log L
        want = flow_jacobian_logdet(model, y, to_h) - d * math.log(levels)
        assert float(logdet[i]) == pytest.approx(float(want.detach()), abs=1e-10)


def test_continuous_model_density_against_jacobian_and_scipy():
    model, x = exact_eval_model(d=3, levels=None)
    assert isinstance(model.preprocess, IdentityPreprocess)
    z, logdet = (t.detach() for t in model.latent_and_logdet(x))
    mu, sig = model.prior.means.detach().numpy(), torch.exp(model.prior.log_scales).detach().numpy()
    log_all = model.log_prob_all(x).detach().numpy()
    for i in range(3):
        jac_logdet = float(flow_jacobian_logdet(model, x[i], lambda v: v).detach())
        assert float(logdet[i]) == pytest.approx(jac_logdet, abs=1e-10)
        for k in range(3):
            want = multivariate_normal.logpdf(z[i].numpy(), mu[k], np.diag(sig[k] ** 2)) + jac_logdet
            assert log_all[i, k] == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_latent_is_latent_and_logdet_without_the_log_det(arch):
    """model.latent(x) = latent_and_logdet(x)[0]: the same dequantisation draw, the same flow, no log-det work.

    Eval mode: in train mode the log-det estimator runs g with grad on, which advances the spectral
    norms' power iterations, so two train-mode passes do not see the same weights."""
    model = mlp_model(d=6) if arch == "mlp" else conv_model()
    x = levels_data((6,) if arch == "mlp" else (1, 8, 8), 17 if arch == "mlp" else 256, n=5)
    warm_up(model, x)
    with torch.no_grad():
        torch.manual_seed(3)
        z = model.latent(x)
        torch.manual_seed(3)
        want = model.latent_and_logdet(x)[0]
    assert z.shape == (5, model.dim)
    torch.testing.assert_close(z, want, rtol=0, atol=1e-12)
    torch.manual_seed(4)  # another noise draw: another latent (the check above is not vacuous)
    assert not torch.allclose(model.latent(x), z)
