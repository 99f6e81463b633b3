"""Lip(g) <= coeff holds on what training saves and returns, checked with an independent long power iteration."""

from dataclasses import replace

import pytest
import torch

from mixflow_core import SpectralConv2d, SpectralLinear, build_model, operator_norm, spectral_layers
from mixflow_core.data import load_data
from mixflow_core.flows.iresnet.lipschitz import converge_spectral_norms, converged_spectral_norms, power_vectors
from mixflow_core.training.checkpoint import load_checkpoint
from mixflow_core.training.fit import fit
from mixflow_core.training.profiles import get_profile

TOL = 1e-3


def _max_norm(model) -> float:
    return max(operator_norm(layer, n_iterations=1000) for layer in spectral_layers(model))


@pytest.mark.parametrize("make", [lambda: SpectralLinear(6, 9, coeff=0.8),
                                  lambda: SpectralConv2d(2, 3, 3, input_hw=(5, 5), coeff=0.8)], ids=["linear", "conv"])
def test_converge_restores_the_bound_after_a_weight_change(make):
    layer = make()
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))  # as an optimiser step would, after the last refresh
    layer.eval()
    stale = operator_norm(layer)
    assert stale > 0.8 + TOL  # the stored vectors lag behind: the bound is broken
    before = power_vectors(layer)
    with converged_spectral_norms(layer):
        assert operator_norm(layer, n_iterations=2000) <= 0.8 + TOL
    after = power_vectors(layer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the training vectors are back
    converge_spectral_norms(layer)
    assert operator_norm(layer, n_iterations=2000) <= 0.8 + TOL


@pytest.mark.parametrize("early_stopping", ["none", "val_bpd"])
def test_saved_and_returned_weights_keep_the_bound(tmp_path, early_stopping):
    cfg = get_profile("digits", "smoke")
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior)
    coeff = cfg.model.coeff
    train = replace(cfg.train, lr=3e-2, early_stopping=early_stopping)  # big steps: stale vectors break the bound
    fit(model, data, train, replace(cfg.runtime, epochs=3), run_dir=tmp_path)
    assert _max_norm(model) <= coeff + TOL  # the returned model
    for name in ("best.pt", "checkpoint.pt"):
        saved = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior)
        saved.load_state_dict(load_checkpoint(tmp_path / name)["model"])
        assert _max_norm(saved.eval()) <= coeff + TOL, name
    # the checkpoint also carries the training run's own vectors (for an exact resume); with them the bound
    # is what the per-step refresh left, which is why evaluation never uses them
    vectors = load_checkpoint(tmp_path / "checkpoint.pt")["backbone_state"]  # keys relative to model.flow
    assert set(vectors) == set(power_vectors(model.flow)) == set(model.flow.training_state())
