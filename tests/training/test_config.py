"""RunConfig: dotted overrides at any depth with one-line errors, the one resume policy, configs of mixflow 0.1."""

import dataclasses
import json
from pathlib import Path

import pytest

from mixflow_core import MLP, Conv, Exact, Hybrid, Likelihood, ModelConfig, PowerSeries, PushAway, RussianRoulette
from mixflow_core.training.config import RunConfig, RuntimeConfig, TrainConfig, apply_overrides, flatten, \
    resume_conflicts, upgrade
from mixflow_core.training.profiles import DATASETS, PROFILES, get_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1"
SMOKE = get_profile("digits", "smoke")


# -- overrides -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, check", [
    ({"train.lr": 3e-4}, lambda c: c.train.lr == 3e-4),
    ({"train.lr": 1}, lambda c: c.train.lr == 1.0 and isinstance(c.train.lr, float)),  # int -> float
    ({"runtime.epochs": 7}, lambda c: c.runtime.epochs == 7),
    ({"model.arch.hidden": [64, 64]}, lambda c: c.model.arch == MLP(hidden=(64, 64), n_blocks=2)),
    ({"model.logdet.n_terms": 3}, lambda c: c.model.logdet == PowerSeries(n_terms=3)),
    ({"model.logdet": "russian_roulette"}, lambda c: c.model.logdet == RussianRoulette()),
    ({"model.logdet.type": "exact"}, lambda c: c.model.logdet == Exact()),
    ({"model.logdet": {"type": "russian_roulette", "n_exact_terms": 3, "neumann_gradient": True}},
     lambda c: c.model.logdet == RussianRoulette(n_exact_terms=3, neumann_gradient=True)),
    ({"model.logdet": "russian_roulette", "model.logdet.n_exact_terms": 4},  # in order: the type, then its field
     lambda c: c.model.logdet == RussianRoulette(n_exact_terms=4)),
    ({"model.eval_logdet": "exact"}, lambda c: c.model.eval_logdet == Exact() and c.model.eval_estimator == Exact()),
    ({"model.eval_logdet": None}, lambda c: c.model.eval_estimator == c.model.logdet),
    ({"train.objective": "likelihood"}, lambda c: c.train.objective == Likelihood()),
    ({"train.objective.beta": 784}, lambda c: c.train.objective == Hybrid(beta=784.0)),
    ({"train.objective": {"type": "push_away", "lam": 0.5}}, lambda c: c.train.objective == PushAway(lam=0.5)),
    ({"model.arch": {"type": "conv", "channels": 8}}, lambda c: c.model.arch == Conv(channels=8)),
    ({"prior.init": "student"}, lambda c: c.prior.init == "student"),
    ({"runtime.max_minutes": None}, lambda c: c.runtime.max_minutes is None),
])
def test_overrides_reach_every_depth(overrides, check):
    cfg = apply_overrides(SMOKE, overrides)
    assert check(cfg)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # and survive JSON


@pytest.mark.parametrize("overrides, message", [
    ({"train.nope": 1}, "Unknown config field 'train.nope': TrainConfig has"),
    ({"runtime.epochs": "abc"}, "runtime.epochs must be int, got 'abc'"),
    ({"runtime.progress": 1}, "runtime.progress must be bool"),
    ({"model.arch.hidden": [64, "x"]}, "model.arch.hidden must be"),
    ({"model.arch.channels": 8}, "Unknown config field 'model.arch.channels': MLP has hidden, n_blocks"),
    ({"model.logdet": "series"}, "model.logdet: unknown type 'series'; use one of ['exact', 'power_series', 'russian_roulette']"),
    ({"model.logdet": 3}, "model.logdet must be one of"),
    ({"model.logdet.n_exact_terms": 2}, "PowerSeries has"),
    ({"model.eval_logdet.n_terms": 2}, "model.eval_logdet is null"),
    ({"train.objective.lam": 0.1}, "Hybrid has beta"),
    ({"train.objective": {"type": "hybrid", "beta": -1}}, "beta must be finite and >= 0"),
    ({"model.coeff": 1.0}, "coeff (the Lipschitz bound) must lie in (0, 1)"),
    ({"model.alpha": 0.5}, "alpha must lie in [0, 0.5)"),
    ({"train.epochs": 3}, "train.epochs is now runtime.epochs"),
    ({"train.device": "cpu"}, "train.device is now runtime.device"),
    ({"model.hidden": [8]}, "model.hidden is now model.arch.hidden (MLP) or model.arch.channels (Conv)"),
    ({"model.n_terms": 3}, "model.n_terms is now model.logdet.n_terms"),
    ({"train.beta": 3.0}, "train.beta is now train.objective.beta"),
    ({"nope.x": 1}, "Unknown config field 'nope.x'"),
    ({"train": 1}, "Unknown config field 'train'"),
])
def test_bad_overrides_raise_one_line(overrides, message):
    with pytest.raises(ValueError) as info:
        apply_overrides(SMOKE, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- the resume policy ---------------------------------------------------------------------------------------
def _changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if value is not None else 1
    if value is None:
        return 1
    if isinstance(value, str):
        return value + "x"
    return [*value, 1] if isinstance(value, list) else value


def test_every_field_is_either_runtime_or_fixed_on_resume():
    """Each leaf of RunConfig changed alone: allowed exactly for runtime.* and data.root / data.download."""
    base = SMOKE.to_dict()
    for key, value in flatten(base).items():
        section, *path = key.split(".")
        new = json.loads(json.dumps(base))
        node = new[section]
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = _changed_value(value)
        refused = resume_conflicts(base, new)
        allowed = section == "runtime" or key in ("data.root", "data.download")
        assert (refused == {}) == allowed, key
        if not allowed:
            assert list(refused) == [key]


def test_cosine_schedule_fixes_the_epochs():
    cosine = apply_overrides(SMOKE, {"train.schedule": "cosine"})
    longer = apply_overrides(cosine, {"runtime.epochs": 5})
    assert list(resume_conflicts(cosine.to_dict(), longer.to_dict())) == ["runtime.epochs"]
    assert resume_conflicts(SMOKE.to_dict(), apply_overrides(SMOKE, {"runtime.epochs": 5}).to_dict()) == {}


def test_train_and_runtime_partition_the_old_train_config():
    old = json.loads((FIXTURES / "digits-smoke-train_config.json").read_text())
    train, runtime = {f.name for f in dataclasses.fields(TrainConfig)}, {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert not train & runtime
    # beta, push_lambda now live in the objective; new since: checkpoint_minutes (mid-epoch checkpoints), max_steps
    # (a step budget) and precision (the training steps' arithmetic)
    assert set(old) - {"beta", "push_lambda"} == (train | runtime) - {"checkpoint_minutes", "max_steps", "precision"}


# -- configs written by mixflow 0.1 ----------------------------------------------------------------------------
def test_a_v0_1_config_json_reads_as_the_same_run():
    saved = json.loads((FIXTURES / "digits-smoke-config.json").read_text())
    cfg = RunConfig.from_dict({k: v for k, v in saved.items() if k in ("data", "model", "prior", "train")})
    # the smoke profile, as 0.1 wrote it (0.1 evaluated in batches of 500, today's default is 128: a runtime field;
    # 0.1 refreshed the spectral norms by power iteration to a tolerance, today's default is the Krylov refresh)
    assert cfg == dataclasses.replace(SMOKE, runtime=dataclasses.replace(SMOKE.runtime, eval_batch_size=500),
                                      model=dataclasses.replace(SMOKE.model, krylov_steps=None))


def test_a_config_saved_before_the_krylov_refresh_reads_as_power_iteration():
    """Saved configs hold every field: power_rtol without krylov_steps was written before krylov_steps existed, and
    trained with the power-iteration rule; a partial config naming only power_rtol means that rule too."""
    today = get_profile("digits", "default").to_dict()
    before = {**today, "model": {k: v for k, v in today["model"].items() if k != "krylov_steps"}}
    assert RunConfig.from_dict(before).model.krylov_steps is None
    assert RunConfig.from_dict(today).model.krylov_steps == 12  # today's dicts pass unchanged
    assert RunConfig.from_dict({"model": {"power_rtol": 1e-3}}).model == ModelConfig(power_rtol=1e-3, krylov_steps=None)
    assert RunConfig.from_dict({"model": {"coeff": 0.8}}).model.krylov_steps == 12


def test_upgrade_converts_every_v0_1_field():
    old = {
        "model": {"arch": "conv", "hidden": [16], "n_blocks": 3, "n_scales": 2, "kernel_size": 5,
                  "logdet": "russian_roulette", "n_terms": 4, "n_probes": 2, "neumann_gradient": True,
                  "eval_logdet": "power_series", "eval_n_terms": 12},
        "train": {"objective": "push_away", "beta": 7.0, "push_lambda": 0.2, "epochs": 9, "device": "cpu",
                  "eval_draws": 4, "lr": 0.01},
        "prior": {"init": "seed"},
    }
    cfg = RunConfig.from_dict(upgrade(old))
    assert cfg.model.arch == Conv(channels=16, n_blocks=3, n_scales=2, kernel_size=5)
    assert cfg.model.logdet == RussianRoulette(n_exact_terms=4, n_probes=2, neumann_gradient=True)
    assert cfg.model.eval_logdet == PowerSeries(n_terms=12, n_probes=2)
    assert cfg.train.objective == PushAway(lam=0.2) and cfg.train.lr == 0.01
    assert (cfg.runtime.epochs, cfg.runtime.eval_draws) == (9, 4)
    assert cfg.prior.init == "student"
    assert upgrade(cfg.to_dict()) == cfg.to_dict()  # today's dicts pass unchanged


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_round_trip(dataset, profile):
    cfg = get_profile(dataset, profile)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_committed_splits_comparisons_still_apply():
    """benchmarks/splits/*.json record the --set overrides they ran with; each still applies to today's profile."""
    from mixflow_core.training.runs import parse_set

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "splits"
    files = sorted(root.glob("*.json"))
    assert files
    for path in files:
        argv = json.loads(path.read_text())["argv"]
        sets = [a for a in argv if "=" in a and not a.startswith("--")]
        cfg = apply_overrides(get_profile("digits", "default"), parse_set(sets))
        assert RunConfig.from_dict(cfg.to_dict()) == cfg, path.name
