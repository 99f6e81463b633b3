"""runtime.precision: bf16 autocast of g in training steps, sigma and the log-det sums at full precision, the bound kept."""

from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

from mixflow_core import Conv, ModelConfig, PriorConfig, build_model, operator_norm, spectral_layers
from mixflow_core.data import Splits, load_data
from mixflow_core.flows.iresnet import ResidualBlock
from mixflow_core.flows.layers import training_precision
from mixflow_core.flows.iresnet.lipschitz import SpectralConv2d
from mixflow_core.training.config import RuntimeConfig, TrainConfig
from mixflow_core.training.fit import fit
from mixflow_core.training.profiles import get_profile


def _image_model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=Conv(channels=8, n_blocks=1, n_scales=2), inverse_tol=1e-6)
    return build_model((1, 8, 8), 3, 17, cfg, PriorConfig()).to(dtype)


def _conv_output_dtypes(model, x, y) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, SpectralConv2d)]
    try:
        model.log_prob(x, y).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bf16_runs_gs_convolutions_in_bf16_only_in_training_and_only_inside():
    model = _image_model()
    x, y = torch.randint(0, 17, (4, 1, 8, 8)).float(), torch.tensor([0, 1, 2, 0])
    model.train()
    model.log_prob(x, y)  # ActNorm init
    with training_precision(model.flow, "bf16"):
        assert _conv_output_dtypes(model, x, y) == {torch.bfloat16}
        logp = model.log_prob(x, y)
        assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
        model.eval()
        assert _conv_output_dtypes(model, x, y) == {torch.float32}  # evaluation as built
        model.train()
    assert _conv_output_dtypes(model, x, y) == {torch.float32}  # after: as before
    assert all(b.autocast_dtype is None for b in model.modules() if isinstance(b, ResidualBlock))


def test_sigma_stays_at_full_precision_under_autocast():
    layer = SpectralConv2d(2, 3, 3, (5, 5)).float().eval()
    with torch.no_grad():
        w_full = layer.normalised_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w_auto = layer.normalised_weight()
    assert w_auto.dtype == torch.float32 and torch.equal(w_full, w_auto)


def test_fp32_is_bitwise_the_model_as_built_and_bad_names_are_refused():
    model = _image_model()
    x, y = torch.randint(0, 17, (4, 1, 8, 8)).float(), torch.tensor([0, 1, 2, 0])
    model.train()
    model.log_prob(x, y)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)  # the same dequantisation noise and probes
        ref = model.log_prob(x, y)
        with training_precision(model.flow, "fp32"):
            torch.manual_seed(1)
            assert torch.equal(model.log_prob(x, y), ref)
    with pytest.raises(ValueError, match="precision"):
        with training_precision(model.flow, "fp8"):
            pass
    with pytest.raises(ValueError, match="precision"):
        RuntimeConfig(precision="fp16")


def _digit_images() -> Splits:
    d = load_data(get_profile("digits", "smoke").data)
    as_image = [TensorDataset(s.tensors[0].reshape(-1, 1, 8, 8), s.tensors[1]) for s in (d.train, d.val, d.test)]
    return Splits(*as_image, data_shape=(1, 8, 8), num_classes=d.num_classes, levels=d.levels,
                  class_names=d.class_names)


def test_fit_in_bf16_learns_keeps_the_bound_and_stays_invertible():
    data = _digit_images()
    torch.manual_seed(0)
    cfg = ModelConfig(arch=Conv(channels=8, n_blocks=1, n_scales=2), coeff=0.9)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg, PriorConfig()).float()
    runtime = RuntimeConfig(epochs=3, progress=False, precision="bf16")
    history = fit(model, data, replace(TrainConfig(), lr=3e-3, batch_size=64, early_stopping="none"), runtime)
    losses = history.column("train_loss")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert max(operator_norm(layer, n_iterations=1000) for layer in spectral_layers(model)) <= 0.9 + 1e-3
    x = data.test.tensors[0][:16].float()
    with torch.no_grad():
        h, _ = model.preprocess(x)
        z, _ = model.flow(h)
        torch.testing.assert_close(model.flow.inverse(z), h, rtol=0, atol=1e-4)
