"""Neumann-series gradient: its expectation equals the gradient of the exact log-det."""

import torch
from torch import nn

from mixflow_core import Exact, LipSwish, PowerSeries, RussianRoulette, SpectralLinear


def _small_g(dim: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(SpectralLinear(dim, 8, coeff=0.6), LipSwish(), SpectralLinear(8, dim, coeff=0.6)).eval()


def _grads(g: nn.Module, x: torch.Tensor, estimator) -> torch.Tensor:
    """Flattened gradient of sum(logdet) w.r.t. g's parameters and x."""
    x = x.detach().requires_grad_(True)
    g.zero_grad(set_to_none=True)
    _, logdet = estimator(g, x)
    logdet.sum().backward()
    # the last bias does not enter J_g: its gradient is None, i.e. zero
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in g.parameters()]
    return torch.cat([t.flatten() for t in grads] + [x.grad.flatten()])


def _check_mean_gradient(estimator, draws: int) -> None:
    g, x = _small_g(), torch.randn(2, 3)
    exact = _grads(g, x, Exact())
    samples = torch.stack([_grads(g, x, estimator) for _ in range(draws)])  # (R, P)
    mean, se = samples.mean(0), samples.std(0) / draws**0.5
    assert torch.all((mean - exact).abs() <= 4.5 * se + 2e-3), (mean - exact).abs().max()


def test_neumann_power_series_gradient_mean_matches_exact_gradient() -> None:
    _check_mean_gradient(PowerSeries(n_terms=25, probe="rademacher", neumann_gradient=True), draws=600)


def test_neumann_russian_roulette_gradient_mean_matches_exact_gradient() -> None:
    _check_mean_gradient(RussianRoulette(n_exact_terms=4, probe="rademacher", neumann_gradient=True), draws=600)


def test_neumann_value_equals_plain_series_value_for_the_same_probe() -> None:
    g, x = _small_g(), torch.randn(4, 3)
    values = []
    for neumann in (False, True):
        gen = torch.Generator().manual_seed(7)
        values.append(PowerSeries(n_terms=6, neumann_gradient=neumann, generator=gen)(g, x)[1])
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-12)
