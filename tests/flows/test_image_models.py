"""Conv mixture flows at the real image sizes (Fashion-MNIST 1x28x28, CIFAR-10 3x32x32)."""

import pytest
import torch

from mixflow_core import Conv, ModelConfig, PriorConfig, build_model
from mixflow_core.flows.iresnet.logdet import Exact


def tiny_conv(n_scales: int) -> ModelConfig:
    return ModelConfig(arch=Conv(channels=8, n_blocks=1, n_scales=n_scales), inverse_tol=1e-9)


@pytest.mark.parametrize(
    "shape, n_scales, latent_shape",
    [((1, 28, 28), 2, (4, 14, 14)), ((1, 28, 28), 3, (16, 7, 7)), ((3, 32, 32), 3, (48, 8, 8))],
)
def test_image_model_round_trip_and_finite_bpd(shape, n_scales, latent_shape) -> None:
    model = build_model(shape, 10, 256, tiny_conv(n_scales), PriorConfig())
    x = torch.randint(0, 256, (3, *shape)).double()
    y = torch.tensor([0, 4, 9])
    model.train()
    model.log_prob(x, y)  # data-dependent ActNorm init
    model.eval()
    assert model.latent_shape == latent_shape
    with torch.no_grad():
        h, _ = model.preprocess(x)
        z, _ = model.flow(h)
        assert z.shape == (3, *latent_shape)
        torch.testing.assert_close(model.flow.inverse(z), h, rtol=0, atol=1e-6)
        bpd = model.bits_per_dim(x, y)
    # random pixels: an untrained model is near the uniform 8 bits/dim, never below 0 or absurd
    assert torch.isfinite(bpd).all() and (bpd > 4).all() and (bpd < 20).all()


def test_too_many_scales_for_the_image_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="even height and width"):
        build_model((1, 28, 28), 10, 256, tiny_conv(4), PriorConfig())


@pytest.mark.parametrize("arch", [Conv(channels=8, n_blocks=2, n_scales=2), None])
def test_small_g_init_starts_the_flow_at_actnorm_alone(arch) -> None:
    """g_init_scale s scales the last layer of every g (bias 0): each g(x) is then s times a Lipschitz-coeff map, so
    z and log|det J| are those of the ActNorms alone up to O(s), and the flow still trains (g's gradient is not 0)."""
    from mixflow_core import MLP
    from mixflow_core.flows.layers import ActNorm

    shape = (1, 8, 8) if arch is not None else (64,)
    arch = arch or MLP(hidden=(32,), n_blocks=3)
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, g_init_scale=1e-3, logdet=Exact())
    model = build_model(shape, 3, 256, cfg, PriorConfig()).double()
    x = torch.randint(0, 256, (4, *shape)).double()
    model.train()
    model.log_prob(x, torch.tensor([0, 1, 2, 0]))  # ActNorm init
    model.eval()
    h, _ = model.preprocess(x)
    z_ref, ld_ref = h, torch.zeros(4, dtype=h.dtype)
    for layer in model.flow.layers:  # the same cascade with every residual block skipped
        if isinstance(layer, ActNorm) or not hasattr(layer, "g"):
            z_ref, ld = layer(z_ref)
            ld_ref = ld_ref + ld
    z, ld = model.flow(h)
    assert (z - z_ref).abs().max() < 1e-2 * z_ref.abs().max()
    assert (ld - ld_ref).abs().max() < 0.05  # 64-D: per-block log-det O(s * D)
    model.train()
    loss = -model.log_prob(x, torch.tensor([0, 1, 2, 0])).mean()
    loss.backward()
    first = next(layer for layer in model.flow.layers if hasattr(layer, "g")).g[0].weight
    assert first.grad is not None and first.grad.abs().max() > 0


@pytest.mark.parametrize("scale", [0.0, -0.1, 1.5])
def test_g_init_scale_outside_0_1_is_a_clear_error(scale) -> None:
    with pytest.raises(ValueError, match="g_init_scale"):
        ModelConfig(g_init_scale=scale)


def test_g_init_scale_scales_only_the_last_layer_of_each_g() -> None:
    """Same seed: every tensor equal to the default init's, except each g's last weight (times s) and bias (0)."""
    torch.manual_seed(3)
    a = build_model((1, 8, 8), 3, 256, tiny_conv(2), PriorConfig()).state_dict()
    torch.manual_seed(3)
    b = build_model((1, 8, 8), 3, 256, ModelConfig(arch=Conv(channels=8, n_blocks=1, n_scales=2), inverse_tol=1e-9,
                                                   g_init_scale=0.25), PriorConfig()).state_dict()
    assert a.keys() == b.keys()
    last = {k for k in a if k.endswith("g.4.weight") or k.endswith("g.4.bias")}
    assert len(last) == 4  # 2 blocks x (weight, bias)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in last)
    for k in last:
        expected = a[k] * 0.25 if k.endswith("weight") else torch.zeros_like(a[k])
        torch.testing.assert_close(b[k], expected, rtol=0, atol=0)
