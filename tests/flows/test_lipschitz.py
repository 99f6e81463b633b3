"""Spectral normalisation and LipSwish: the Lipschitz bounds the i-ResNet's invertibility rests on."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixflow_core.flows.iresnet.lipschitz import LipSwish, SpectralConv2d, SpectralLinear, operator_norm

COEFF = 0.7


def _linear(coeff: float = COEFF, n_power_iterations: int = 1) -> SpectralLinear:
    return SpectralLinear(5, 3, coeff=coeff, n_power_iterations=n_power_iterations)


def _conv(coeff: float = COEFF, n_power_iterations: int = 1, kernel_size: int = 3) -> SpectralConv2d:
    return SpectralConv2d(2, 3, kernel_size, (5, 5), coeff=coeff, n_power_iterations=n_power_iterations)


def _normalised_weight(layer) -> torch.Tensor:
    """W_hat as the layer would use it at evaluation, without touching its stored vectors."""
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        w = layer.normalised_weight().clone()
    layer.train(was_training)
    return w


def _conv_matrix(weight: torch.Tensor, padding: int, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense matrix (C_out H W, C_in H W) of x -> conv2d(x, weight) (no bias): conv of each basis vector."""
    n = math.prod(in_shape)
    basis = torch.eye(n).reshape(n, *in_shape)
    with torch.no_grad():
        columns = F.conv2d(basis, weight, padding=padding).reshape(n, -1)  # (n_in, n_out)
    return columns.T


def _kernel_matrix_norm(weight: torch.Tensor) -> float:
    """Norm of the kernel reshaped to (C_out, C_in k k): the quantity naive conv spectral norm bounds."""
    return float(torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), 2))


def _raw_operator_norm(layer) -> float:
    """Exact largest singular value of the layer's raw (unnormalised) linear map."""
    w = layer.weight.detach()
    if isinstance(layer, SpectralConv2d):
        w = _conv_matrix(w, layer.padding, (layer.in_channels, *layer.input_hw))
    return float(torch.linalg.matrix_norm(w, 2))


def _set_weight(layer, weight: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.power_iterate(300)


def _perturbed(make):
    """A layer whose weight moved after construction, so one power iteration would change u and v."""
    layer = make()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    return layer


def _buffers(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.u.clone(), layer.v.clone()


def _input(layer, batch: int = 4) -> torch.Tensor:
    if isinstance(layer, SpectralConv2d):
        return torch.randn(batch, layer.in_channels, *layer.input_hw)
    return torch.randn(batch, layer.in_features)


# (a) bound right after construction ---------------------------------------------------------


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_operator_norm_within_coeff_after_construction(make):
    layer = make()
    assert operator_norm(layer) <= COEFF + 1e-3


def test_spectral_linear_norm_matches_exact_matrix_norm():
    layer = _linear(coeff=0.3)
    # sigma(W) of PyTorch's default init is ~0.6 here, so normalisation is active and must be tight
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) > 0.3
    exact = float(torch.linalg.matrix_norm(_normalised_weight(layer), 2))
    assert exact <= 0.3 + 1e-3
    assert exact == pytest.approx(0.3, abs=1e-6)
    assert operator_norm(layer) == pytest.approx(exact, abs=1e-10)


# (b) conv: the operator norm, not the kernel-matrix norm --------------------------------------


def test_conv_operator_norm_matches_dense_operator_matrix():
    layer = _conv()
    w_hat = _normalised_weight(layer)
    dense = _conv_matrix(w_hat, layer.padding, (2, 5, 5))  # (75, 50)
    exact = float(torch.linalg.matrix_norm(dense, 2))
    assert operator_norm(layer) == pytest.approx(exact, abs=1e-4)
    # the conv operator contains the kernel matrix (a delta through the transpose), so it is never smaller
    assert exact >= _kernel_matrix_norm(w_hat) - 1e-12


def test_conv_operator_norm_exceeds_kernel_matrix_norm():
    """All-ones 3x3 kernel: ||reshaped K||_2 = 3, but the operator on 5x5 inputs has norm 4 + 2 sqrt(3) ~ 7.46."""
    layer = SpectralConv2d(1, 1, 3, (5, 5), coeff=COEFF, bias=False)
    _set_weight(layer, torch.ones(1, 1, 3, 3))
    w_hat = _normalised_weight(layer)
    exact = float(torch.linalg.matrix_norm(_conv_matrix(w_hat, 1, (1, 5, 5)), 2))
    assert exact == pytest.approx(COEFF, abs=1e-6)
    assert operator_norm(layer) == pytest.approx(exact, abs=1e-4)
    # normalising the reshaped kernel instead would have allowed an operator norm above 1
    assert exact > 2.0 * _kernel_matrix_norm(w_hat)


# (c) bound survives adversarial training -------------------------------------------------------


@pytest.mark.parametrize("krylov_steps", [12, None], ids=["krylov", "power"])
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_bound_holds_after_adam_steps_that_grow_weights(make, krylov_steps):
    layer = make(n_power_iterations=1)
    layer.krylov_steps = krylov_steps
    layer.train()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    raw_before = float(layer.weight.detach().norm())
    used = []  # operator norm of the map each training step actually applied
    for step in range(50):
        loss = -layer(_input(layer, batch=8)).pow(2).sum()  # maximise the output norm
        opt.zero_grad()
        loss.backward()
        if step % 5 == 4:
            used.append(operator_norm(layer, n_iterations=300))  # eval reuses this step's u, v and W
        opt.step()
    assert float(layer.weight.detach().norm()) > raw_before  # the loss did push the raw weights up
    assert max(used) <= COEFF + 0.02
    assert operator_norm(layer) <= COEFF + 0.02  # after the last step, with the vectors it left


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_training_step_reconverges_sigma_after_weight_change(make):
    layer = _perturbed(make)  # the stored vectors belong to the old weight
    layer.krylov_steps, layer.power_rtol, layer.max_power_iterations = None, 1e-9, 2000  # tighter than the default 1e-4
    layer.train()
    layer(_input(layer))
    with torch.no_grad():
        estimate = float(layer.sigma())
    exact = _raw_operator_norm(layer)
    assert estimate == pytest.approx(exact, rel=1e-4)


# (d) normalisation only shrinks -----------------------------------------------------------------


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_weight_below_coeff_is_unchanged(make):
    layer = make()
    w_small = _normalised_weight(layer) * 0.5  # operator norm ~ COEFF / 2
    _set_weight(layer, w_small)
    layer.train()
    w_hat = layer.normalised_weight()
    assert torch.equal(w_hat.detach(), w_small)
    layer.eval()
    assert torch.equal(layer.normalised_weight().detach(), w_small)


# (e) LipSwish is 1-Lipschitz for every beta -------------------------------------------------


def _lipswish(beta: float) -> LipSwish:
    act = LipSwish()
    with torch.no_grad():
        act.raw_beta.fill_(math.log(math.expm1(beta)))  # softplus^-1(beta)
    assert float(F.softplus(act.raw_beta.detach())) == pytest.approx(beta, rel=1e-12)
    return act


BETAS = [0.05, 0.5, 1.0, 4.0, 50.0]


@pytest.mark.parametrize("beta", BETAS)
def test_lipswish_difference_quotients_at_most_one(beta):
    act = _lipswish(beta)
    scale = 10.0 / beta  # the interesting region is |beta x| <~ 10
    a = torch.randn(20000) * scale
    b = a + torch.randn(20000) * scale * torch.rand(20000) ** 3  # many close pairs too
    with torch.no_grad():
        lhs = (act(a) - act(b)).abs()
    assert bool((lhs <= (a - b).abs() * (1 + 1e-12)).all())


@pytest.mark.parametrize("beta", BETAS)
def test_lipswish_max_derivative_at_most_one(beta):
    act = _lipswish(beta)
    x = torch.linspace(-30.0 / beta, 30.0 / beta, 200001, requires_grad=True)
    (dx,) = torch.autograd.grad(act(x).sum(), x)
    max_slope = float(dx.abs().max())
    assert max_slope <= 1.0
    # max_t d/dt[t sigmoid(t)] = 1.0998..., so the bound is nearly tight and independent of beta
    assert max_slope == pytest.approx(1.0998 / 1.1, abs=1e-3)


# (f) bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.3])
def test_bad_coeff_raises(coeff):
    with pytest.raises(ValueError):
        SpectralLinear(3, 3, coeff=coeff)
    with pytest.raises(ValueError):
        SpectralConv2d(1, 1, 3, (4, 4), coeff=coeff)


def test_conv_wrong_spatial_size_raises():
    layer = _conv()
    with pytest.raises(ValueError):
        layer(torch.randn(2, 2, 4, 5))


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_conv_even_kernel_raises(kernel_size):
    with pytest.raises(ValueError):
        _conv(kernel_size=kernel_size)


# (g) power-iteration buffers refresh only in training steps ----------------------------------


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_buffers_frozen_in_eval_mode(make):
    layer = _perturbed(make)
    layer.eval()
    u, v = _buffers(layer)
    layer(_input(layer)).sum().backward()
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_buffers_frozen_under_no_grad(make):
    layer = _perturbed(make)
    layer.train()
    u, v = _buffers(layer)
    with torch.no_grad():
        layer(_input(layer))
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_buffers_refresh_in_training_step(make):
    layer = _perturbed(make)
    layer.train()
    u, v = _buffers(layer)
    layer(_input(layer)).sum().backward()
    assert not torch.allclose(layer.u, u, atol=1e-8)
    assert not torch.allclose(layer.v, v, atol=1e-8)
    assert layer.u.norm().item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_refresh_iteration_count_follows_tolerance(make):
    layer = _perturbed(make)
    layer.krylov_steps, layer.power_rtol = None, None  # power iteration: exactly n_power_iterations, the classic update
    assert layer.refresh() == 1
    layer = _perturbed(make)
    layer.krylov_steps, layer.power_rtol, layer.max_power_iterations = None, 1e-12, 7
    assert layer.refresh() == 1 + 7  # cannot settle to 1e-12 within 7 more: stops at the cap
