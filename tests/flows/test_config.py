"""Typed, frozen ModelConfig / PriorConfig: dict (JSON) round trips as tagged values, and the checks they run."""

import itertools
import json

import pytest
import torch

from mixflow_core import (
    MLP, Conv, Exact, Hybrid, LogitPreprocess, ModelConfig, PowerSeries, PriorConfig, PushAway, RussianRoulette,
    SpectralConv2d,
    SpectralLinear, build_model, from_dict, to_dict,
)
from mixflow_core.flows.iresnet import ResidualBlock, build_iresnet
from mixflow_core.flows.iresnet.lipschitz import check_coeff
from mixflow_core.flows.preprocess import check_alpha

ARCHS = [MLP(hidden=(8, 4), n_blocks=3), Conv(channels=4, n_blocks=1, n_scales=3, kernel_size=5)]
ESTIMATORS = [
    PowerSeries(n_terms=3, n_probes=2, probe="rademacher", neumann_gradient=True),
    RussianRoulette(n_exact_terms=3, p=0.3, n_probes=2, max_terms=40, neumann_gradient=True),
    Exact(max_dim=100),
]
EVAL_ESTIMATORS = [None, Exact(), PowerSeries(n_terms=10)]


def _through_json(cfg):
    """to_dict -> JSON text -> from_dict: what a saved config goes through."""
    data = json.loads(json.dumps(to_dict(cfg)))
    return from_dict(type(cfg), data), data


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, logdet, eval_logdet",
    list(itertools.product(ARCHS, ESTIMATORS, EVAL_ESTIMATORS)),
    ids=lambda v: "none" if v is None else v.kind,
)
def test_model_config_round_trips_through_dict_and_json(arch, logdet, eval_logdet):
    cfg = ModelConfig(arch=arch, coeff=0.8, power_rtol=None, activation="elu", actnorm=False, logdet=logdet,
                      eval_logdet=eval_logdet, inverse_tol=1e-8, inverse_max_iter=30, alpha=0.1, dequantize=False)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    back, data = _through_json(cfg)
    assert back == cfg
    # the typed values come back as their classes, tuples as tuples (JSON has only lists)
    assert type(back.arch) is type(arch) and type(back.logdet) is type(logdet)
    assert (back.eval_logdet is None) if eval_logdet is None else (type(back.eval_logdet) is type(eval_logdet))
    if isinstance(arch, MLP):
        assert back.arch.hidden == (8, 4) and isinstance(back.arch.hidden, tuple)
    # ... and are tagged dicts in JSON
    assert data["arch"] == ({"type": "mlp", "hidden": [8, 4], "n_blocks": 3} if isinstance(arch, MLP) else
                            {"type": "conv", "channels": 4, "n_blocks": 1, "n_scales": 3, "kernel_size": 5})
    assert data["logdet"]["type"] == logdet.kind and "generator" not in data["logdet"]
    assert (data["eval_logdet"] is None) if eval_logdet is None else (data["eval_logdet"]["type"] == eval_logdet.kind)
    assert back.eval_estimator == (logdet if eval_logdet is None else eval_logdet)


def test_default_model_config_json_form_is_tagged():
    data = to_dict(ModelConfig())
    assert data["arch"] == {"type": "mlp", "hidden": [128, 128], "n_blocks": 10}
    assert data["logdet"] == {"type": "power_series", "n_terms": 5, "n_probes": 1, "probe": "gaussian",
                              "neumann_gradient": False}
    assert data["eval_logdet"] is None
    assert to_dict(Conv()) == {"type": "conv", "channels": 32, "n_blocks": 2, "n_scales": 2, "kernel_size": 3}
    assert to_dict(RussianRoulette()) == {"type": "russian_roulette", "n_exact_terms": 2, "p": 0.5, "n_probes": 1,
                                          "max_terms": 100, "probe": "gaussian", "neumann_gradient": False}
    assert to_dict(Exact()) == {"type": "exact", "max_dim": 4096}
    json.dumps(data)  # plain JSON


def test_estimator_generator_is_not_saved():
    est = PowerSeries(n_terms=4, generator=torch.Generator().manual_seed(0))
    data = to_dict(ModelConfig(logdet=est))["logdet"]
    assert "generator" not in data
    assert from_dict(ModelConfig, {"logdet": data}).logdet == PowerSeries(n_terms=4)


def test_a_bare_tag_is_the_estimator_or_arch_with_its_defaults():
    cfg = from_dict(ModelConfig, {"arch": "conv", "logdet": "russian_roulette", "eval_logdet": "exact"})
    assert cfg == ModelConfig(arch=Conv(), logdet=RussianRoulette(), eval_logdet=Exact())
    assert from_dict(ModelConfig, {"eval_logdet": None}).eval_logdet is None
    assert from_dict(ModelConfig, {}) == ModelConfig()


@pytest.mark.parametrize(
    "cfg",
    [
        PriorConfig(),
        PriorConfig(init="student", learn_means=True, learn_scales=True, class_prior="uniform", init_seed=3),
        PriorConfig(init="moments", covariance="full", moments_ridge=0.1),
        PriorConfig(init="orthogonal", separation=7.5, radius=2.0),
    ],
    ids=["default", "student", "moments-full", "orthogonal"],
)
def test_prior_config_round_trips_through_dict_and_json(cfg):
    assert from_dict(PriorConfig, to_dict(cfg)) == cfg
    back, data = _through_json(cfg)
    assert back == cfg
    assert "type" not in data  # not a tagged value: one kind of prior config


# -- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, where, tag",
    [
        ({"logdet": {"type": "hutchinson", "n_terms": 3}}, "ModelConfig.logdet", "hutchinson"),
        ({"logdet": "hutchinson"}, "ModelConfig.logdet", "hutchinson"),
        ({"eval_logdet": {"type": "same"}}, "ModelConfig.eval_logdet", "same"),
        ({"arch": {"type": "resnet"}}, "ModelConfig.arch", "resnet"),
    ],
    ids=["logdet", "logdet-bare", "eval_logdet", "arch"],
)
def test_from_dict_rejects_an_unknown_tag(data, where, tag):
    with pytest.raises(ValueError, match=rf"{where}: unknown type '{tag}'") as err:
        from_dict(ModelConfig, data)
    for known in ("power_series", "russian_roulette", "exact") if "logdet" in where else ("mlp", "conv"):
        assert known in str(err.value)  # says what would do


def test_from_dict_rejects_a_tagged_value_without_a_tag():
    with pytest.raises(ValueError, match=r"ModelConfig\.logdet must be one of"):
        from_dict(ModelConfig, {"logdet": {"n_terms": 3}})


@pytest.mark.parametrize(
    "cls, data, where, field",
    [
        (ModelConfig, {"hidden": [8]}, "ModelConfig", "hidden"),  # a mixflow 0.1 field
        (ModelConfig, {"n_terms": 5}, "ModelConfig", "n_terms"),
        (ModelConfig, {"arch": {"type": "mlp", "hiden": [8]}}, "ModelConfig.arch", "hiden"),
        (ModelConfig, {"logdet": {"type": "power_series", "n_term": 3}}, "ModelConfig.logdet", "n_term"),
        (ModelConfig, {"logdet": {"type": "exact", "generator": None}}, "ModelConfig.logdet", "generator"),
        (PriorConfig, {"init": "zeros", "learn_mean": True}, "PriorConfig", "learn_mean"),
    ],
    ids=["hidden", "n_terms", "arch-field", "estimator-field", "exact-generator", "prior-field"],
)
def test_from_dict_rejects_an_unknown_field(cls, data, where, field):
    with pytest.raises(ValueError, match=rf"Unknown {where} field\(s\): \['{field}'\]"):
        from_dict(cls, data)


# -- the one check of coeff and of alpha ------------------------------------------------------------


def _message(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    return str(err.value)


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.3])
def test_bad_coeff_is_refused_with_the_one_check(coeff):
    want = f"coeff (the Lipschitz bound) must lie in (0, 1) for invertibility, got {coeff}"
    assert _message(lambda: check_coeff(coeff)) == want
    assert _message(lambda: ModelConfig(coeff=coeff)) == want
    assert _message(lambda: SpectralLinear(3, 3, coeff=coeff)) == want
    assert _message(lambda: SpectralConv2d(1, 1, 3, (4, 4), coeff=coeff)) == want


def test_coeff_inside_the_unit_interval_is_accepted():
    for coeff in (1e-3, 0.5, 0.999):
        check_coeff(coeff)
        assert ModelConfig(coeff=coeff).coeff == coeff


@pytest.mark.parametrize("alpha", [0.5, 0.7, -0.01])
def test_bad_alpha_is_refused_with_the_one_check(alpha):
    want = f"alpha must lie in [0, 0.5), got {alpha}"
    assert _message(lambda: check_alpha(alpha)) == want
    assert _message(lambda: LogitPreprocess(17, alpha=alpha)) == want
    assert _message(lambda: ModelConfig(alpha=alpha)) == want


def test_alpha_in_range_is_accepted():
    for alpha in (0.0, 0.05, 0.499):
        check_alpha(alpha)
        assert LogitPreprocess(17, alpha=alpha).alpha == alpha and ModelConfig(alpha=alpha).alpha == alpha


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(n_blocks=0), lambda: MLP(hidden=()), lambda: MLP(hidden=(8, 0)), lambda: Conv(channels=0),
     lambda: Conv(n_scales=0), lambda: ModelConfig(n_power_iterations=0), lambda: PowerSeries(n_terms=0),
     lambda: RussianRoulette(p=1.0)],
    ids=["mlp-blocks", "mlp-empty", "mlp-width", "conv-channels", "conv-scales", "power-iterations", "n_terms", "p"],
)
def test_invalid_typed_values_raise(make):
    with pytest.raises(ValueError):
        make()


# -- architecture against data shape ---------------------------------------------------------------


def test_mlp_arch_on_image_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"arch MLP needs vector data \(D,\), got shape \(1, 8, 8\); use Conv"):
        build_model((1, 8, 8), 3, 256, ModelConfig(arch=MLP(hidden=(8,), n_blocks=1)), PriorConfig())


def test_conv_arch_on_vector_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"arch Conv needs image data \(C, H, W\), got shape \(16,\); use MLP"):
        build_model((16,), 3, 17, ModelConfig(arch=Conv(channels=4, n_blocks=1)), PriorConfig())


@pytest.mark.parametrize("eval_logdet", EVAL_ESTIMATORS, ids=lambda v: "none" if v is None else v.kind)
def test_blocks_use_the_configured_estimators(eval_logdet):
    cfg = ModelConfig(arch=MLP(hidden=(8,), n_blocks=2), logdet=PowerSeries(n_terms=3), eval_logdet=eval_logdet)
    blocks = [layer for layer in build_iresnet((4,), cfg).layers if isinstance(layer, ResidualBlock)]
    assert len(blocks) == 2
    for block in blocks:
        assert block.logdet == PowerSeries(n_terms=3)
        assert block.eval_logdet == (PowerSeries(n_terms=3) if eval_logdet is None else eval_logdet)


@pytest.mark.parametrize(
    "cls, data, where",
    [
        (ModelConfig, {"arch": {"type": "mlp", "hidden": 8}}, "ModelConfig.arch.hidden"),
        (ModelConfig, {"coeff": "0.9"}, "ModelConfig.coeff"),
        (ModelConfig, {"activation": "relu"}, "ModelConfig.activation"),
        (ModelConfig, {"logdet": {"type": "power_series", "n_terms": 2.5}}, "ModelConfig.logdet.n_terms"),
        (PriorConfig, {"init": "seed"}, "PriorConfig.init"),  # the student's old name: RunConfig.from_dict upgrades it
        (PriorConfig, {"learn_means": 1}, "PriorConfig.learn_means"),
    ],
    ids=["hidden-int", "coeff-str", "activation", "n_terms-float", "init-seed", "bool-int"],
)
def test_from_dict_rejects_a_value_of_the_wrong_type(cls, data, where):
    with pytest.raises(ValueError, match=rf"{where} must be"):
        from_dict(cls, data)


def test_null_is_refused_where_a_value_is_required():
    with pytest.raises(ValueError, match="ModelConfig.logdet must be one of"):
        from_dict(ModelConfig, {"logdet": None})
    with pytest.raises(ValueError, match="ModelConfig.arch must be one of"):
        from_dict(ModelConfig, {"arch": None})
    assert from_dict(ModelConfig, {"eval_logdet": None}).eval_logdet is None  # nullable: the training estimator


def test_russian_roulette_never_cuts_below_its_exact_terms():
    with pytest.raises(ValueError, match="max_terms >= n_exact_terms"):
        RussianRoulette(n_exact_terms=5, max_terms=3)


@pytest.mark.parametrize("make", [lambda: Hybrid(beta=float("nan")), lambda: PushAway(lam=float("nan"))])
def test_objective_weights_must_be_finite(make):
    with pytest.raises(ValueError, match="finite"):
        make()
