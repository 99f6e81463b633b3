"""Invertible layers and i-ResNet builders: inverse(forward(x)) = x and logdet = log|det J| by jacrev."""

import logging

import pytest
import torch
from torch import nn

from mixflow_core.flows.config import MLP, Conv, ModelConfig
from mixflow_core.flows.iresnet import (
    ResidualBlock,
    build_conv_iresnet,
    build_iresnet,
    build_mlp_iresnet,
    fixed_point_inverse,
)
from mixflow_core.flows.layers import ActNorm, FlowSequence, Squeeze
from mixflow_core.flows.iresnet.lipschitz import SpectralLinear
from mixflow_core.flows.iresnet.logdet import Exact, PowerSeries
from tests.helpers import exact_flow_logdet, initialised_eval, mlp_g, off_centre_data

# helpers ------------------------------------------------------------------------------------------


def _exact_cfg(**kwargs) -> ModelConfig:
    """Exact log-det and a tight, long fixed-point inverse: the tests compare against exact maths."""
    base = dict(logdet=Exact(), inverse_tol=1e-10, inverse_max_iter=2000)
    return ModelConfig(**{**base, **kwargs})


def _assert_logdet_is_jacobian(flow: nn.Module, x: torch.Tensor, n_samples: int = 2) -> None:
    logdet = flow(x)[1].detach()
    assert logdet.shape == (x.shape[0],)
    reference = exact_flow_logdet(flow, x[:n_samples])
    for i in range(n_samples):
        assert float(logdet[i]) == pytest.approx(float(reference[i]), abs=1e-9)


def _assert_inverts(flow: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        z, _ = flow(x)
        x_back = flow.inverse(z)
    assert z.shape[0] == x.shape[0]
    assert torch.allclose(x_back, x, atol=1e-6, rtol=0)


# ActNorm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)], ids=["vector", "image"])
def test_actnorm_inverts_and_logdet_is_jacobian(shape):
    x = off_centre_data(shape)
    layer = initialised_eval(ActNorm(shape[0]), x)
    _assert_inverts(layer, x)
    _assert_logdet_is_jacobian(layer, x)


@pytest.mark.parametrize("shape", [(3,), (3, 4, 4)], ids=["vector", "image"])
def test_actnorm_first_training_forward_standardises_each_channel(shape):
    x = off_centre_data(shape, batch=64)
    layer = ActNorm(shape[0])
    assert not bool(layer.initialized)
    z, _ = layer(x)
    per_channel = z.transpose(0, 1).reshape(shape[0], -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-10)
    assert torch.allclose(per_channel.std(1), torch.ones(shape[0]), atol=1e-5)
    assert bool(layer.initialized)
    # later batches reuse the parameters: no re-initialisation
    bias = layer.bias.detach().clone()
    layer(x * 5.0 + 2.0)
    assert torch.equal(layer.bias.detach(), bias)


def test_actnorm_does_not_initialise_in_eval_mode():
    layer = ActNorm(3).eval()
    x = off_centre_data((3,))
    z, logdet = layer(x)
    assert not bool(layer.initialized)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(8))


def test_actnorm_initialized_flag_survives_state_dict_round_trip():
    x = off_centre_data((3,))
    trained = ActNorm(3)
    trained(x)
    restored = ActNorm(3)
    restored.load_state_dict(trained.state_dict())
    assert bool(restored.initialized)
    x_new = off_centre_data((3,)) * 4.0  # would give different parameters if it re-initialised
    restored(x_new)
    assert torch.equal(restored.bias, trained.bias) and torch.equal(restored.log_scale, trained.log_scale)


def test_actnorm_rejects_wrong_channel_count():
    with pytest.raises(ValueError):
        ActNorm(3)(torch.randn(4, 2))


# Squeeze ---------------------------------------------------------------------------------------------


def test_squeeze_is_a_permutation_with_zero_logdet():
    x = torch.randn(3, 2, 4, 6)
    squeeze = Squeeze()
    z, logdet = squeeze(x)
    assert z.shape == (3, 8, 2, 3) and squeeze.output_shape((2, 4, 6)) == (8, 2, 3)
    assert torch.equal(logdet, torch.zeros(3))
    assert torch.equal(squeeze.inverse(z), x)
    # channel 4c + 2i + j at (h, w) is pixel (2h + i, 2w + j) of channel c
    for c, i, j in [(0, 0, 0), (1, 0, 1), (1, 1, 0), (0, 1, 1)]:
        assert torch.equal(z[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    jac = torch.func.jacrev(lambda v: squeeze(v.reshape(1, 2, 4, 6))[0].reshape(-1))(x[0].reshape(-1))
    assert bool(((jac == 0) | (jac == 1)).all())
    assert torch.equal(jac.sum(0), torch.ones(48)) and torch.equal(jac.sum(1), torch.ones(48))


@pytest.mark.parametrize("shape", [(1, 3, 4), (1, 4, 5), (1, 3, 3)])
def test_squeeze_rejects_odd_sizes(shape):
    with pytest.raises(ValueError):
        Squeeze()(torch.randn(2, *shape))
    with pytest.raises(ValueError):
        Squeeze().output_shape(shape)


# FlowSequence --------------------------------------------------------------------------------------


def test_flow_sequence_composes_shapes_logdets_and_inverses():
    x = off_centre_data((2, 4, 4))
    flow = initialised_eval(FlowSequence([ActNorm(2), Squeeze(), ActNorm(8)]), x)
    assert flow.output_shape((2, 4, 4)) == (8, 2, 2)
    z, logdet = flow(x)
    assert z.shape == (8, 8, 2, 2)
    h, total = x, torch.zeros(8)
    for layer in flow.layers:  # the composition, by hand
        h, part = layer(h)
        total = total + part
    assert torch.equal(z, h)
    assert torch.allclose(logdet, total, atol=1e-12)
    assert logdet.abs().max() > 1e-3  # ActNorm made the total non-trivial
    _assert_inverts(flow, x)
    _assert_logdet_is_jacobian(flow, x)


# ResidualBlock and fixed-point inverse ---------------------------------------------------------------


def test_residual_block_inverts_and_logdet_is_jacobian():
    block = ResidualBlock(mlp_g(4), Exact(), inverse_tol=1e-10, inverse_max_iter=500).eval()
    x = off_centre_data((4,))
    _assert_inverts(block, x)
    assert block.last_inverse is not None and block.last_inverse.converged
    _assert_logdet_is_jacobian(block, x)


def test_fixed_point_inverse_converges_for_contraction():
    g = mlp_g(3)
    z = torch.randn(5, 3)
    x, info = fixed_point_inverse(g, z, tol=1e-10, max_iter=500)
    assert info.converged and info.iterations < 500 and info.max_change < 1e-10
    with torch.no_grad():
        assert torch.allclose(x + g(x), z, atol=1e-9, rtol=0)


def test_fixed_point_inverse_reports_non_convergence():
    z = torch.randn(5, 3)
    _, info = fixed_point_inverse(mlp_g(3), z, tol=1e-10, max_iter=1)
    assert not info.converged and info.iterations == 1 and info.max_change > 1e-10


def test_residual_block_warns_when_inverse_does_not_converge(caplog):
    block = ResidualBlock(mlp_g(3), Exact(), inverse_tol=1e-10, inverse_max_iter=1).eval()
    z = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger="mixflow_core.flows.iresnet"):
        block.inverse(z)
    assert block.last_inverse is not None and not block.last_inverse.converged
    assert any("did not converge" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    caplog.clear()
    block.inverse_max_iter = 500
    with caplog.at_level(logging.WARNING, logger="mixflow_core.flows.iresnet"):
        block.inverse(z)
    assert block.last_inverse.converged and not caplog.records


# whole models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 6])
def test_mlp_iresnet_inverts_and_logdet_is_jacobian(dim):
    x = off_centre_data((dim,))
    model = initialised_eval(build_mlp_iresnet(dim, _exact_cfg(arch=MLP(hidden=(8,), n_blocks=2))), x)
    _assert_inverts(model, x)
    _assert_logdet_is_jacobian(model, x)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)])
def test_conv_iresnet_inverts_and_logdet_is_jacobian(shape):
    cfg = _exact_cfg(arch=Conv(channels=4, n_blocks=1, n_scales=2))
    x = off_centre_data(shape, batch=4)
    model = initialised_eval(build_conv_iresnet(shape, cfg), x)
    assert model.output_shape(shape) == (4 * shape[0], 2, 2)
    assert sum(isinstance(layer, Squeeze) for layer in model.layers) == 1
    _assert_inverts(model, x)
    _assert_logdet_is_jacobian(model, x)


@pytest.mark.parametrize(
    "shape, cfg",
    [((1, 4, 4), ModelConfig(arch=MLP())), ((16,), ModelConfig(arch=Conv(channels=4)))],
    ids=["mlp_on_image", "conv_on_vector"],
)
def test_builder_rejects_arch_shape_mismatch(shape, cfg):
    with pytest.raises(ValueError):
        build_iresnet(shape, cfg)


@pytest.mark.parametrize(
    "shape, cfg",
    [
        ((4,), ModelConfig(arch=MLP(hidden=(8,), n_blocks=2))),
        ((2, 4, 4), ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2))),
    ],
    ids=["mlp", "conv"],
)
def test_every_parameter_gets_a_gradient(shape, cfg):
    model = build_iresnet(shape, cfg).train()
    assert cfg.logdet == PowerSeries()  # the default training estimator
    z, logdet = model(off_centre_data(shape, batch=4))
    (0.5 * z.pow(2).flatten(1).sum(1) - logdet).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_actnorm_leaves_constant_channels_unscaled():
    """A channel constant in the init batch (std 0) keeps scale 1 instead of being blown up by 1/eps."""
    layer = ActNorm(3)
    x = torch.randn(64, 3)
    x[:, 1] = 2.5  # constant channel
    layer.train()
    z, logdet = layer(x)
    assert float(layer.log_scale.detach()[1]) == 0.0 and torch.allclose(z[:, 1], torch.zeros(64))
    assert torch.isfinite(logdet).all() and float(logdet.detach()[0]) == pytest.approx(-float(layer.log_scale.detach().sum()))


def test_fixed_point_tolerance_is_relative_for_large_latents():
    """|z| ~ 1e6 in float32: an absolute 1e-6 is below float resolution, the relative criterion converges."""
    torch.manual_seed(0)
    g = nn.Sequential(SpectralLinear(4, 4, coeff=0.5)).eval().float()
    z = torch.randn(3, 4, dtype=torch.float32) * 1e6
    x, info = fixed_point_inverse(g, z, tol=1e-6, max_iter=200)
    assert info.converged and info.iterations < 200
    with torch.no_grad():
        assert float((x + g(x) - z).abs().max()) <= 1e-5 * float(z.abs().max())
