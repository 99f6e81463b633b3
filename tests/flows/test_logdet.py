"""Log-det estimators for f(x) = x + g(x): exact values, unbiasedness, truncation bias, gradients."""

import pytest
import torch
from torch import nn

from mixflow_core.flows.iresnet.logdet import Exact, PowerSeries, RussianRoulette
from tests.helpers import conv_g, exact_residual_logdet, mlp_g


# helpers ------------------------------------------------------------------------------------------


class LinearG(nn.Module):
    """g(x) = x A^T: J_g = A everywhere, so log det(I + J_g) = slogdet(I + A) exactly."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


def _matrix_with_norm(dim: int, norm: float) -> torch.Tensor:
    """A generic (non-symmetric) matrix with spectral norm `norm`."""
    m = torch.randn(dim, dim)
    return m * (norm / torch.linalg.matrix_norm(m, 2))


def _symmetric_with_eigenvalues(eigenvalues: list[float]) -> torch.Tensor:
    """Q diag(lambda) Q^T: traces of powers are large, so truncating the series visibly biases it."""
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues)))
    return q @ torch.diag(torch.tensor(eigenvalues)) @ q.T


def _logdet_i_plus(a: torch.Tensor) -> float:
    sign, logabsdet = torch.linalg.slogdet(torch.eye(a.shape[0]) + a)
    assert sign > 0  # ||A|| < 1 keeps I + A orientation preserving
    return float(logabsdet)


def _truncated_series(a: torch.Tensor, n_terms: int) -> float:
    """sum_{k=1}^n (-1)^{k+1} tr(A^k) / k, with exact traces."""
    total, power = 0.0, torch.eye(a.shape[0])
    for k in range(1, n_terms + 1):
        power = power @ a
        total += (-1) ** (k + 1) * float(torch.trace(power)) / k
    return total


def _replicated_draws(estimator, g, x0: torch.Tensor, n: int) -> torch.Tensor:
    """n independent estimates at x0: one batch of n copies (each row gets its own probes)."""
    _, logdet = estimator(g, x0.expand(n, *x0.shape).clone())
    return logdet.detach()


def _assert_mean_within_se(draws: torch.Tensor, target: float, k: float = 4.0) -> float:
    mean, se = float(draws.mean()), float(draws.std() / draws.numel() ** 0.5)
    assert se > 0
    assert abs(mean - target) <= k * se, f"mean {mean:.5f} vs {target:.5f}: {abs(mean - target) / se:.1f} SE"
    return se


def _estimators():
    return [Exact(), PowerSeries(n_terms=5, n_probes=2), RussianRoulette(n_exact_terms=2, n_probes=2)]


ESTIMATOR_IDS = ["exact", "power_series", "russian_roulette"]


# Exact -----------------------------------------------------------------------------------------


def test_exact_matches_closed_form_for_linear_g():
    a = _matrix_with_norm(5, 0.6)
    gx, logdet = Exact()(LinearG(a), torch.randn(6, 5))
    assert logdet.shape == (6,)
    assert torch.allclose(logdet, torch.full((6,), _logdet_i_plus(a)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 6])
def test_exact_matches_jacrev_for_mlp_g(dim):
    g, x = mlp_g(dim), torch.randn(5, dim) * 2
    _, logdet = Exact()(g, x)
    reference = exact_residual_logdet(g, x)
    assert torch.allclose(logdet, reference, atol=1e-10, rtol=0)
    assert reference.std() > 1e-3  # a nonlinear g: the log-det really varies with x


def test_exact_matches_jacrev_for_conv_g():
    g, x = conv_g(), torch.randn(3, 1, 4, 4)
    _, logdet = Exact()(g, x)
    assert logdet.shape == (3,)
    assert torch.allclose(logdet, exact_residual_logdet(g, x), atol=1e-10, rtol=0)


def test_exact_refuses_dimension_above_max_dim():
    with pytest.raises(ValueError):
        Exact(max_dim=3)(LinearG(_matrix_with_norm(4, 0.5)), torch.randn(2, 4))


# PowerSeries --------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_power_series_many_terms_mean_matches_exact(probe):
    g, x0 = mlp_g(4), torch.randn(4) * 2
    exact = float(exact_residual_logdet(g, x0[None])[0])
    draws = _replicated_draws(PowerSeries(n_terms=40, n_probes=4, probe=probe), g, x0, 1000)
    se = _assert_mean_within_se(draws, exact)
    assert se < 0.02  # the check is tight enough to mean something


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_power_series_expectation_is_truncated_series(probe, n_terms):
    a = _symmetric_with_eigenvalues([0.9, 0.7, -0.5, 0.3])
    draws = _replicated_draws(PowerSeries(n_terms=n_terms, probe=probe), LinearG(a), torch.randn(4), 20000)
    truncated = _truncated_series(a, n_terms)
    se = _assert_mean_within_se(draws, truncated)
    assert abs(truncated - _logdet_i_plus(a)) > 8 * se  # the bias is real and resolved by the test


def test_power_series_is_reproducible_with_generator():
    g, x = mlp_g(3), torch.randn(5, 3)

    def run(seed: int) -> torch.Tensor:
        estimator = PowerSeries(n_terms=4, n_probes=2, generator=torch.Generator().manual_seed(seed))
        return estimator(g, x)[1].detach()

    assert torch.equal(run(123), run(123))
    assert not torch.allclose(run(123), run(124))


@pytest.mark.parametrize(
    "make",
    [
        lambda: PowerSeries(n_terms=0),
        lambda: PowerSeries(n_probes=0),
        lambda: RussianRoulette(p=0.0),
        lambda: RussianRoulette(p=1.0),
        lambda: RussianRoulette(p=-0.2),
        lambda: RussianRoulette(p=1.5),
        lambda: RussianRoulette(n_exact_terms=0),
    ],
    ids=["ps_terms0", "ps_probes0", "rr_p0", "rr_p1", "rr_p_neg", "rr_p_gt1", "rr_exact0"],
)
def test_invalid_estimator_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


# RussianRoulette -----------------------------------------------------------------------------------


def test_russian_roulette_is_unbiased():
    a = _symmetric_with_eigenvalues([0.5, 0.45, 0.4, 0.35])
    g, x = LinearG(a), torch.randn(16, 4)
    estimator = RussianRoulette(n_exact_terms=2, p=0.5, generator=torch.Generator().manual_seed(1))
    # one draw per call: the number of terms is shared across the batch, the probes are not
    draws = torch.stack([estimator(g, x)[1].detach().mean() for _ in range(2000)])
    exact = _logdet_i_plus(a)
    se = _assert_mean_within_se(draws, exact)
    # the terms it always computes alone would be biased by far more than the tolerance
    assert abs(_truncated_series(a, 2) - exact) > 8 * se


def test_russian_roulette_number_of_terms_is_geometric():
    estimator = RussianRoulette(p=0.3, generator=torch.Generator().manual_seed(2))
    n = torch.tensor([estimator.sample_extra_terms() for _ in range(20000)], dtype=torch.float64)
    for m in range(5):  # P(N >= m) = (1 - p)^m is what the reweighting 1 / P(N >= m) assumes
        frac = float((n >= m).double().mean())
        assert frac == pytest.approx(0.7**m, abs=4 * (0.7**m * (1 - 0.7**m) / 20000) ** 0.5 + 1e-12)


# all estimators: g(x), gradients, no_grad -----------------------------------------------------------


@pytest.mark.parametrize("estimator", _estimators(), ids=ESTIMATOR_IDS)
def test_estimator_returns_g_of_x(estimator):
    g, x = mlp_g(4), torch.randn(5, 4)
    gx, logdet = estimator(g, x)
    assert gx.shape == x.shape and logdet.shape == (5,)
    assert torch.allclose(gx, g(x), atol=1e-14, rtol=0)


def _assert_grads(g: nn.Module, skip_last_bias: bool) -> None:
    for name, p in g.named_parameters():
        if skip_last_bias and name == "2.bias":
            # J_g does not depend on the output bias, so neither does the log-det
            assert p.grad is None or bool((p.grad == 0).all()), name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("estimator", _estimators(), ids=ESTIMATOR_IDS)
def test_gradients_flow_to_parameters_and_input(estimator):
    g = mlp_g(3)
    x = torch.randn(4, 3, requires_grad=True)
    _, logdet = estimator(g, x)
    logdet.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    _assert_grads(g, skip_last_bias=True)


@pytest.mark.parametrize("estimator", _estimators(), ids=ESTIMATOR_IDS)
def test_gradients_flow_to_parameters_when_x_is_plain_data(estimator):
    g = mlp_g(3)
    gx, logdet = estimator(g, torch.randn(4, 3))
    (gx.pow(2).sum() + logdet.sum()).backward()
    _assert_grads(g, skip_last_bias=False)


def test_exact_gradients_are_the_derivatives_of_the_log_det():
    a = _matrix_with_norm(4, 0.6)
    g = LinearG(a)
    _, logdet = Exact()(g, torch.randn(3, 4))
    logdet.sum().backward()
    # d/dA log det(I + A) = (I + A)^{-T}, summed over the 3 samples
    expected = 3 * torch.linalg.inv(torch.eye(4) + a).T
    assert torch.allclose(g.a.grad, expected, atol=1e-10)

    g_mlp, x = mlp_g(3), torch.randn(2, 3, requires_grad=True)
    Exact()(g_mlp, x)[1].sum().backward()

    def reference(xi: torch.Tensor) -> torch.Tensor:
        jac = torch.func.jacrev(lambda v: g_mlp(v[None])[0])(xi)
        return torch.linalg.slogdet(torch.eye(3) + jac).logabsdet

    for xi, grad in zip(x.detach(), x.grad):
        assert torch.allclose(grad, torch.func.grad(reference)(xi), atol=1e-10)


@pytest.mark.parametrize("estimator", _estimators(), ids=ESTIMATOR_IDS)
def test_no_grad_returns_tensors_without_graph(estimator):
    g = mlp_g(3)
    x = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        gx, logdet = estimator(g, x)
    assert gx.grad_fn is None and logdet.grad_fn is None
    assert not gx.requires_grad and not logdet.requires_grad
    assert torch.isfinite(logdet).all()
    if isinstance(estimator, Exact):  # deterministic: same numbers as with grad
        assert torch.allclose(logdet, estimator(g, x)[1].detach(), atol=1e-14, rtol=0)
