"""The coupling flow's speed levers compute the same function (float64): InvertibleLinear's evaluation cache of W and
W^-1 (and its invalidation), fold_actnorm's folded flow, channels_last, and `compiled` (torch.compile with an eager
fallback)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from mixflow_core import CouplingConv, CouplingMLP, ModelConfig, PriorConfig, build_model
from mixflow_core.flows.coupling import (
    InvertibleLinear, build_coupling, channels_last, compiled, fold_actnorm,
)
from mixflow_core.flows.layers import ActNorm, FlowSequence
from mixflow_core.flows.objectives import likelihood
from tests.helpers import exact_flow_logdet

ARCHS = {
    "mlp": (CouplingMLP(hidden=(6,), n_steps=3), (4,)),
    "conv": (CouplingConv(channels=4, n_steps=2, n_scales=2), (2, 8, 8)),
    "conv_factor_out": (CouplingConv(channels=4, n_steps=1, n_scales=2, factor_out=True), (2, 8, 8)),
}


def _perturbed(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _flow(name: str):
    arch, shape = ARCHS[name]
    flow = _perturbed(build_coupling(shape, ModelConfig(arch=arch)))
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    flow(x)  # training mode: the ActNorms initialise from this batch (then perturbed below, off their data init)
    _perturbed(flow, 0.05)
    return flow.eval(), x


def _linears(module: torch.nn.Module) -> list[InvertibleLinear]:
    return [m for m in module.modules() if isinstance(m, InvertibleLinear)]


# -- the W cache ---------------------------------------------------------------------------------------------
def test_the_cache_serves_w_and_its_inverse_only_while_gradients_are_off():
    layer = _perturbed(InvertibleLinear(4))
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        z1, _ = layer(x)
        w = layer._cache["weight"][2]
        z2, _ = layer(x)
        assert layer._cache["weight"][2] is w  # reused, not reassembled
        x_back = layer.inverse(z1)
    torch.testing.assert_close(w, layer.weight(), rtol=0, atol=0)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    with torch.inference_mode():
        z3, _ = layer(x)
    torch.testing.assert_close(z3, z1, rtol=0, atol=0)
    z, logdet = layer(x)  # gradients on: W assembled in the graph, every factor gets a gradient
    (z.square().sum() + logdet.sum()).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in layer.parameters())


@pytest.mark.parametrize("how", ["adam", "fused_adam", "load_state_dict", "to_float32"])
def test_the_cache_is_invalidated_when_the_weights_change(how):
    """A stale W would give the old function: compare with the cache off after each way weights change."""
    model = build_model((1, 4, 4), 3, 17, ModelConfig(arch=CouplingConv(channels=3, n_steps=1, n_scales=2),
                                                      dequantize=False), PriorConfig())
    x = torch.randint(0, 17, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    model.log_prob_all(x)  # ActNorm init
    model.eval()
    with torch.no_grad():
        before = model.log_prob_all(x)
        z = model.latent(x)
        decoded_before = model.decode(z)
    assert all("weight" in m._cache and "inverse_weight" in m._cache for m in _linears(model))
    if how in ("adam", "fused_adam"):  # fused Adam (fit's) updates without bumping the version counters
        opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=how == "fused_adam")
        model.train()
        likelihood(model.log_prob_all(x), y, model.prior.log_class_probs, model.dim).backward()
        opt.step()
        model.eval()
    elif how == "load_state_dict":
        other = copy.deepcopy(model)
        _perturbed(other)
        model.load_state_dict(other.state_dict())
    else:
        model.float()
    z = z.to(model.prior.means.dtype)
    with torch.no_grad():
        cached, decoded = model.log_prob_all(x), model.decode(z)
        for m in _linears(model):
            m.cache_weights = False
        fresh, decoded_fresh = model.log_prob_all(x), model.decode(z)
    assert not torch.allclose(fresh.double(), before, atol=1e-3) or how == "to_float32"  # the weights did change
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    torch.testing.assert_close(decoded, decoded_fresh, rtol=0, atol=0)
    if how == "to_float32":
        assert cached.dtype == torch.float32 and decoded_before.dtype == torch.float64


def test_the_cache_is_not_copied():
    layer = InvertibleLinear(3)
    with torch.no_grad():
        layer(torch.randn(2, 3))
    assert layer._cache and copy.deepcopy(layer)._cache == {}


def _same_function(flow, other, x, x_other, atol):
    """other(x_other) equals flow(x) (z and log-det) and other.inverse equals flow.inverse, to atol; other's z."""
    with torch.no_grad():
        z, logdet = flow(x)
        zo, logdet_o = other(x_other)
        torch.testing.assert_close(zo, z, rtol=0, atol=atol)
        torch.testing.assert_close(logdet_o, logdet, rtol=0, atol=atol)
        torch.testing.assert_close(other.inverse(z), flow.inverse(z), rtol=0, atol=atol)
    return zo


# -- folded ActNorm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_the_folded_flow_is_the_same_function(name):
    flow, x = _flow(name)
    folded = fold_actnorm(flow)
    n_actnorm = sum(isinstance(m, ActNorm) for m in flow.modules())
    assert n_actnorm > 0 and sum(m.bias is not None for m in _linears(folded)) == n_actnorm
    assert not any(isinstance(m, ActNorm) for m in folded.modules())
    assert all(m.bias is None for m in _linears(flow))
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert any(p.requires_grad for p in flow.parameters())  # the original is untouched
    zf = _same_function(flow, folded, x, x, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(folded.inverse(zf), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(4,), (4, 3, 2), (4, 3)])
def test_a_folded_pair_is_one_affine_layer_with_the_exact_logdet(shape):
    pair = FlowSequence([_perturbed(ActNorm(4), 0.3), _perturbed(InvertibleLinear(4), 0.3)]).eval()  # eval: no init
    folded = fold_actnorm(pair)
    assert len(folded.layers) == 1
    layer = folded.layers[0]
    x = torch.randn(3, *shape)
    z, logdet = layer(x)
    torch.testing.assert_close(z, pair(x)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, pair(x)[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, exact_flow_logdet(layer, x), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=1e-12)
    assert "bias" not in layer.state_dict()  # a non-persistent buffer: every state_dict stays as it was


def test_a_folded_model_gives_the_same_log_densities_and_samples():
    from mixflow_core.flows.model import MixtureFlow

    model = build_model((1, 4, 4), 3, 17, ModelConfig(arch=CouplingConv(channels=3, n_steps=2, n_scales=2),
                                                      dequantize=False), PriorConfig(init="separated"))
    x = torch.randint(0, 17, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    model.log_prob_all(x)
    _perturbed(model.flow, 0.05)
    model.eval()
    folded = MixtureFlow(fold_actnorm(model.flow), model.prior, model.preprocess, model.data_shape)
    with torch.inference_mode():
        torch.testing.assert_close(folded.log_prob_all(x), model.log_prob_all(x), rtol=0, atol=1e-9)
        a = model.sample(1, n=5, generator=torch.Generator().manual_seed(2))
        b = folded.sample(1, n=5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- channels_last ------------------------------------------------------------------------------------------
def test_build_coupling_makes_images_channels_last_and_leaves_vectors():
    for name, fmt in (("mlp", None), ("conv", torch.channels_last), ("conv_factor_out", torch.channels_last)):
        arch, shape = ARCHS[name]
        flow = build_coupling(shape, ModelConfig(arch=arch))
        assert {m.memory_format for m in _linears(flow)} == {fmt}, name
        if fmt is not None:
            convs = [m for m in flow.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(c.weight.is_contiguous(memory_format=fmt) for c in convs)
            back = channels_last(flow, on=False)
            assert {m.memory_format for m in _linears(back)} == {None}
            assert all(c.weight.is_contiguous() for c in convs)


@pytest.mark.parametrize("name", ["conv", "conv_factor_out"])
def test_channels_last_gives_the_same_outputs(name):
    nhwc, x = _flow(name)  # build_coupling's default: channels_last
    flow = channels_last(copy.deepcopy(nhwc), on=False)
    xc = x.contiguous(memory_format=torch.channels_last)
    _same_function(flow, nhwc, x, xc, atol=1e-12)
    nhwc.train()  # and it trains: gradients as the NCHW flow's
    flow.train()
    for f, inp in ((flow, x), (nhwc, xc)):
        z, logdet = f(inp)
        (z.square().sum() - logdet.sum()).backward()
    for (name_a, a), (_, b) in zip(flow.named_parameters(), nhwc.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name_a)


# -- compiled ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~5 s with inductor's on-disk cache warm, ~25 s cold (its first C++ compilations)
def test_compiled_gives_the_eager_log_densities_and_gradients():
    """torch.compile (inductor, the default backend) of the model: the same log p(x|k) and parameter gradients, in
    float64. Skipped, with the compiler's reason, where inductor cannot run (compiled() then falls back to eager)."""
    model = build_model((1, 4, 4), 3, 17, ModelConfig(arch=CouplingConv(channels=2, n_steps=1, n_scales=2),
                                                      dequantize=False), PriorConfig(init="separated"))
    x = torch.randint(0, 17, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 3
    model.log_prob_all(x)  # ActNorm init, eagerly
    _perturbed(model.flow, 0.05)
    fast = compiled(model)
    eager_table = model.log_prob_all(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = fast(x)
    if fast.eager():
        pytest.skip(f"torch.compile cannot run here: {[str(w.message) for w in caught]}")
    torch.testing.assert_close(table, eager_table, rtol=1e-12, atol=1e-10)
    grads = []
    for out in (eager_table, table):
        model.zero_grad()
        likelihood(out, y, model.prior.log_class_probs, model.dim).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C compiler here (a stand-in)")


def test_compiled_falls_back_to_eager_once_with_one_warning():
    model = build_model((4,), 3, 17, ModelConfig(arch=CouplingMLP(hidden=(6,), n_steps=2), dequantize=False))
    x = torch.randint(0, 17, (5, 4), generator=torch.Generator().manual_seed(0))
    model.eval()
    fast = compiled(model, backend=_broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*runs eagerly"):
        out = fast(x)
    assert fast.eager()
    torch.testing.assert_close(out, model.log_prob_all(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(fast(x), out, rtol=0, atol=0)


def test_compiled_lets_the_functions_own_errors_through():
    model = build_model((4,), 3, 17, ModelConfig(arch=CouplingMLP(hidden=(6,), n_steps=2)))
    fast = compiled(model, backend="eager")  # dynamo only: no code generation
    with pytest.raises(ValueError, match="input must have shape"):
        fast(torch.zeros(2, 5))
    assert not fast.eager()
