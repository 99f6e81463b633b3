"""Conv mixture flows at the real image sizes (Fashion-MNIST 1x28x28, CIFAR-10 3x32x32)."""

import pytest
import torch

from mixflow_core import Conv, ModelConfig, PriorConfig, build_model


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
