"""Configuring the backbone family: coupling architectures, the i-ResNet fields they refuse, the family switch by
override, round trips, and the upgrade path of checkpoints saved before the backbone hooks."""

from __future__ import annotations

import json

import pytest
import torch

from mixflow_core import IRESNET_FIELDS, MLP, CouplingConv, CouplingMLP, Exact, ModelConfig, RussianRoulette
from mixflow_core.training.config import RunConfig, apply_overrides
from mixflow_core.training.fit import backbone_training_state
from mixflow_core.flows.model import build_model
from mixflow_core.training.profiles import BACKBONES, DATASETS, DEFAULT_BACKBONE, PROFILES, get_profile


@pytest.mark.parametrize("field,value", [
    ("coeff", 0.8), ("krylov_steps", 4), ("n_power_iterations", 3), ("power_rtol", None), ("activation", "elu"),
    ("g_init_scale", 0.5), ("logdet", RussianRoulette()), ("eval_logdet", Exact()), ("inverse_tol", 1e-8),
    ("inverse_max_iter", 7),
])
def test_a_coupling_arch_refuses_every_iresnet_field_in_one_line(field, value):
    assert field in IRESNET_FIELDS
    with pytest.raises(ValueError, match=rf"^model\.{field} is an i-ResNet field") as err:
        ModelConfig(arch=CouplingConv(), **{field: value})
    assert "\n" not in str(err.value)


def test_shared_fields_are_accepted_on_both_families():
    for arch in (MLP(), CouplingMLP()):
        cfg = ModelConfig(arch=arch, actnorm=False, whiten=True, alpha=0.01, dequantize=False)
        assert cfg.family == ("iresnet" if arch.kind == "mlp" else "coupling")


@pytest.mark.parametrize("bad", [dict(n_steps=0), dict(hidden=()), dict(hidden=(0,))])
def test_coupling_mlp_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="CouplingMLP"):
        CouplingMLP(**bad)


@pytest.mark.parametrize("bad", [dict(channels=0), dict(n_steps=0), dict(n_scales=0), dict(kernel_size=2)])
def test_coupling_conv_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="CouplingConv"):
        CouplingConv(**bad)


def test_switching_the_family_by_override_drops_the_profiles_iresnet_fields():
    base = get_profile("fashion-mnist", "default", "iresnet")  # Russian roulette, an i-ResNet field away from its default
    cfg = apply_overrides(base, {"model.arch": "coupling_conv", "model.arch.channels": 32})
    assert cfg.model.arch == CouplingConv(channels=32) and cfg.model.logdet == ModelConfig().logdet
    assert cfg.model.actnorm == base.model.actnorm and cfg.model.alpha == base.model.alpha  # shared fields kept
    assert cfg.prior == base.prior and cfg.train == base.train
    with pytest.raises(ValueError, match=r"^model\.logdet is an i-ResNet field"):  # named with it: refused
        apply_overrides(base, {"model.arch": "coupling_conv", "model.logdet": "exact"})
    back = apply_overrides(cfg, {"model.arch": "conv"})  # and back: the i-ResNet takes the defaults it had
    assert back.model.family == "iresnet"


def test_coupling_run_config_round_trips_through_json():
    cfg = apply_overrides(get_profile("digits", "default"), {"model.arch": {"type": "coupling_mlp", "n_steps": 3}})
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.model.arch == CouplingMLP(n_steps=3)


def test_unbiased_eval_is_the_familys_own():
    assert ModelConfig(arch=MLP()).unbiased_eval().eval_logdet == Exact()
    assert isinstance(get_profile("fashion-mnist", "default", "iresnet").model.unbiased_eval().eval_logdet, RussianRoulette)
    coupling = ModelConfig(arch=CouplingConv())
    assert coupling.unbiased_eval() is coupling


def test_old_checkpoints_power_vectors_read_as_the_backbone_state():
    u, v = torch.ones(3), torch.zeros(3)
    old = {"power_vectors": {"flow.layers.1.g.0.u": u, "flow.layers.1.g.0.v": v}}
    assert backbone_training_state(old) == {"layers.1.g.0.u": u, "layers.1.g.0.v": v}
    new = {"backbone_state": {"layers.1.g.0.u": u}, "power_vectors": None}
    assert backbone_training_state(new) == {"layers.1.g.0.u": u}
    assert backbone_training_state({"model": {}}) is None  # mixflow 0.1 saved neither


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_exists_for_both_backbones(dataset, profile):
    for backbone in BACKBONES:
        assert get_profile(dataset, profile, backbone).model.family == backbone
    assert get_profile(dataset, profile) == get_profile(dataset, profile, DEFAULT_BACKBONE[dataset])


def test_an_unknown_backbone_is_refused_by_name():
    with pytest.raises(ValueError, match="No backbone 'glow'"):
        get_profile("digits", "default", "glow")


@pytest.mark.parametrize("dataset", ["digits", "toy2d"])
def test_vector_coupling_profiles_change_only_the_backbone(dataset):
    for profile in PROFILES:
        a, b = get_profile(dataset, profile, "iresnet"), get_profile(dataset, profile, "coupling")
        assert (a.data, a.prior, a.train, a.runtime) == (b.data, b.prior, b.train, b.runtime)
        shared = [f for f in ("actnorm", "whiten", "whiten_ridge", "alpha", "dequantize")]
        assert all(getattr(a.model, f) == getattr(b.model, f) for f in shared)


@pytest.mark.parametrize("dataset,shape", [("fashion-mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_full_coupling_profiles_build_and_invert(dataset, shape):
    """The GPU-sized coupling flows (factor-out, 2 or 3 scales) build on their image shape and invert exactly."""
    cfg = get_profile(dataset, "full", "coupling")
    assert cfg.model.arch.factor_out
    torch.manual_seed(0)
    model = build_model(shape, 10, 256, cfg.model, cfg.prior).double()
    with torch.no_grad():
        for p in model.parameters():  # away from the identity (the couplings' last layers start at zero)
            p.add_(0.01 * torch.randn_like(p))
        x = torch.rand(2, *shape, dtype=torch.float64) * 4 - 2
        z, _ = model.flow(x)
        assert z.shape == (2, int(torch.tensor(shape).prod()))
        assert torch.allclose(model.flow.inverse(z), x, atol=1e-8)
