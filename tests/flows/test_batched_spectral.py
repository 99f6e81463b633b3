"""Batched spectral normalisation: the same power iteration / Krylov refresh as each layer's own, fewer calls, few
host syncs; the Krylov refresh between m - 1 power iterations and the exact operator norm."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixflow_core.flows.config import MLP, Conv, ModelConfig, PriorConfig
from mixflow_core.flows.iresnet import IResNet, build_iresnet
from mixflow_core.flows.iresnet.lipschitz import (
    SpectralConv2d,
    SpectralLinear,
    converge_spectral_norms,
    refresh_spectral_norms,
    spectral_layers,
)
from mixflow_core.flows.iresnet.logdet import PowerSeries
from mixflow_core.flows.model import build_model
from mixflow_core.training.config import TrainConfig


def _perturb(layers, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.add_(scale * torch.randn(layer.weight.shape, generator=g))


def _mixed_layers(n_power_iterations=3, power_rtol=None, krylov_steps=None):
    """Three convs and three linears of one shape each, plus a conv of another shape: three groups."""
    sn = dict(n_power_iterations=n_power_iterations, power_rtol=power_rtol, krylov_steps=krylov_steps)
    layers = [SpectralConv2d(2, 3, 3, (5, 5), **sn) for _ in range(3)]
    layers += [SpectralLinear(6, 4, **sn) for _ in range(3)]
    layers.append(SpectralConv2d(3, 3, 1, (4, 4), **sn))
    _perturb(layers)
    return layers


def test_batched_refresh_equals_each_layers_own_iterations():
    batched = _mixed_layers()
    single = copy.deepcopy(batched)
    assert refresh_spectral_norms(batched) == 3
    for layer in single:
        layer.refresh()
    for a, b in zip(batched, single):
        assert torch.allclose(a.u, b.u, atol=1e-12) and torch.allclose(a.v, b.v, atol=1e-12)


def test_batched_krylov_refresh_equals_each_layers_own():
    batched = _mixed_layers(krylov_steps=6)
    single = copy.deepcopy(batched)
    assert refresh_spectral_norms(batched) == 6
    for layer in single:
        assert layer.refresh() == 6
    for a, b in zip(batched, single):
        assert torch.allclose(a.u, b.u, atol=1e-6) and torch.allclose(a.v, b.v, atol=1e-6)


def _exact_sigma(layer) -> float:
    w = layer.weight.detach()
    if isinstance(layer, SpectralConv2d):
        n = layer.in_channels * math.prod(layer.input_hw)
        basis = torch.eye(n).reshape(n, layer.in_channels, *layer.input_hw)
        w = F.conv2d(basis, w, padding=layer.padding).reshape(n, -1).T
    return float(torch.linalg.matrix_norm(w, 2))


def test_batched_refresh_to_tolerance_is_at_least_as_converged_as_per_layer():
    """Power iteration's ||W v_k|| rises monotonically to sigma_max: the batched refresh runs at least as many
    iterations per layer as the layer's own tolerance rule, so it lands between that and the exact sigma."""
    batched = _mixed_layers(n_power_iterations=1, power_rtol=1e-4)
    single = copy.deepcopy(batched)
    refresh_spectral_norms(batched)
    for layer in single:
        layer.refresh()
    for a, b in zip(batched, single):
        exact = _exact_sigma(a)
        with torch.no_grad():
            got, own = float(a.sigma()), float(b.sigma())
        assert own - 1e-12 <= got <= exact * (1 + 1e-12)
        assert got >= exact * (1 - 1e-2)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_krylov_sigma_lies_between_m_minus_1_power_iterations_and_the_exact_norm(m):
    """The Krylov space from v holds A^(m-1) v, so its Rayleigh-Ritz sigma is at least the power iterate's and at most
    sigma_max; (u, v) stay unit vectors with u = W v / ||W v||, so u^T W v = ||W v|| is the sigma the layer uses."""
    krylov = _mixed_layers(krylov_steps=m)
    power = copy.deepcopy(krylov)
    refresh_spectral_norms(krylov)
    for layer in power:
        layer.power_iterate(m - 1)
    for a, b in zip(krylov, power):
        with torch.no_grad():
            got, iterated = float(a.sigma()), float(b.sigma())
            assert float(a.u.norm()) == pytest.approx(1.0, abs=1e-10) and float(a.v.norm()) == pytest.approx(1.0, abs=1e-10)
            assert got == pytest.approx(float(a._apply_W(a.v, a.weight).norm()), rel=1e-10)
        assert iterated * (1 - 1e-12) <= got <= _exact_sigma(a) * (1 + 1e-12)


def test_krylov_is_exact_once_the_subspace_spans_the_input():
    """m >= dim(v): the subspace is the whole input space (or an invariant subspace holding v), so sigma is exact;
    a request for more directions than exist is capped, not an error."""
    layers = [SpectralLinear(6, 4, krylov_steps=6), SpectralLinear(3, 5, krylov_steps=12),
              SpectralConv2d(1, 2, 3, (2, 2), krylov_steps=12)]
    _perturb(layers)
    refresh_spectral_norms(layers)
    for layer in layers:
        with torch.no_grad():
            assert float(layer.sigma()) == pytest.approx(_exact_sigma(layer), rel=1e-10)


def test_krylov_converges_where_power_iteration_crawls():
    """Two nearly equal top singular values (ratio 0.999): power iteration barely moves a v that mixes them, the
    Krylov refresh with 3 products lands on sigma_max to 1e-8."""
    layer = SpectralLinear(8, 8, krylov_steps=3)
    power = SpectralLinear(8, 8, krylov_steps=None, n_power_iterations=3, power_rtol=None)
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    s = torch.tensor([1.0, 0.999, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    for a in (layer, power):
        with torch.no_grad():
            a.weight.copy_(q @ torch.diag(s) @ q.T)
            a.v.copy_(F.normalize(q[:, 1] + 0.3 * q[:, 0] + 0.3 * q[:, 2], dim=0))
    refresh_spectral_norms([layer])
    power.refresh()
    with torch.no_grad():
        assert float(layer.sigma()) == pytest.approx(1.0, abs=1e-8)
        assert float(power.sigma()) < 1.0 - 1e-3


def test_krylov_refresh_needs_no_host_sync():
    assert _syncs_per_training_step(4, None, krylov_steps=12) == _syncs_per_training_step(1, None, krylov_steps=12)
    assert _syncs_per_training_step(4, None, krylov_steps=12) == _syncs_per_training_step(4, None)


def test_bad_krylov_steps_raise():
    for bad in (0, 1, -3, 2.5, True):
        with pytest.raises(ValueError, match="krylov_steps"):
            SpectralLinear(3, 3, krylov_steps=bad)
        with pytest.raises(ValueError, match="krylov_steps"):
            ModelConfig(krylov_steps=bad)


def test_converge_spectral_norms_batched_reaches_the_exact_operator_norm():
    """Linear layers: exact (SVD). Convolutions: power iteration to a 1e-7 change per iteration, at least as close to the
    exact norm as each layer's own converge(), which stops by the same rule."""
    layers = _mixed_layers()
    single = copy.deepcopy(layers)
    converge_spectral_norms(torch.nn.ModuleList(layers))
    for a, b in zip(layers, single):
        b.converge()
        exact = _exact_sigma(a)
        with torch.no_grad():
            got, own = float(a.sigma()), float(b.sigma())
        assert own * (1 - 1e-7) <= got <= exact * (1 + 1e-12)
        assert got == pytest.approx(exact, rel=1e-4)
        if isinstance(a, SpectralLinear):
            assert got == pytest.approx(exact, rel=1e-12)


def _conv_flow(n_blocks: int, **kw) -> IResNet:
    cfg = ModelConfig(arch=Conv(channels=4, n_blocks=n_blocks, n_scales=2, kernel_size=3), **kw)
    return build_iresnet((1, 8, 8), cfg)


def test_iresnet_refreshes_once_per_training_forward_and_never_in_eval():
    flow = _conv_flow(2, n_power_iterations=2, power_rtol=None, krylov_steps=None)
    assert all(layer.external_refresh for layer in spectral_layers(flow))
    reference = copy.deepcopy(flow)
    x = torch.randn(4, 1, 8, 8)
    flow.train()
    flow(x)
    for layer in spectral_layers(reference):
        layer.power_iterate(2)  # what one training step must do: n_power_iterations, once
    for a, b in zip(spectral_layers(flow), spectral_layers(reference)):
        assert torch.allclose(a.u, b.u, atol=1e-12)
    before = [layer.u.clone() for layer in spectral_layers(flow)]
    flow.eval()
    flow(x)
    with torch.no_grad():
        flow.train()
        flow(x)  # no grad: a fixed function, no refresh
    assert all(torch.equal(a, layer.u) for a, layer in zip(before, spectral_layers(flow)))


class _CountSyncs(TorchFunctionMode):
    """Counts the reads of tensor values by the host (each a device sync on a GPU)."""

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs_per_training_step(n_blocks: int, power_rtol, krylov_steps=None) -> int:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=Conv(channels=4, n_blocks=n_blocks, n_scales=2, kernel_size=3),
                      logdet=PowerSeries(n_terms=2), power_rtol=power_rtol, krylov_steps=krylov_steps)
    model = build_model((1, 8, 8), 3, 4, cfg, PriorConfig())
    x, y = torch.randint(0, 4, (6, 1, 8, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    objective = TrainConfig().objective
    model.train()
    objective(model(x), y, model.prior.log_class_probs, model.dim).backward()  # first step: ActNorm init reads
    with _CountSyncs() as counter:
        loss = objective(model(x), y, model.prior.log_class_probs, model.dim)
        loss.backward()
    return counter.count


def test_host_syncs_per_training_step_do_not_grow_with_depth():
    """No read of a tensor value per layer per step: the count is the same for 1 and 4 blocks per scale."""
    assert _syncs_per_training_step(1, None) == _syncs_per_training_step(4, None)


def test_tolerance_checks_cost_a_sync_per_group_every_few_iterations_not_per_layer_iteration():
    from mixflow_core.flows.iresnet.lipschitz import CHECK_EVERY

    fixed = _syncs_per_training_step(4, None)
    checked = _syncs_per_training_step(4, 1e-4)
    flow = _conv_flow(4, krylov_steps=None)
    groups = len({(type(m), tuple(m.weight.shape), m.input_hw) for m in spectral_layers(flow)})
    assert checked - fixed <= groups * math.ceil(flow.layers[1].g[0].max_power_iterations / CHECK_EVERY)
    # the per-layer rule read sigma after every extra iteration of every layer (>= 1 read per layer per step)
    assert checked - fixed < len(spectral_layers(flow))


def test_mlp_flow_uses_the_batched_refresh_too():
    flow = build_iresnet((5,), ModelConfig(arch=MLP(hidden=(7,), n_blocks=3), actnorm=False))
    assert isinstance(flow, IResNet) and all(layer.external_refresh for layer in spectral_layers(flow))
