"""Named configurations per dataset: smoke (seconds, for tests), default (CPU), full (GPU scale).

A profile is a RunConfig: the four configs that define a training run. `get_profile` returns
one; `apply_overrides` changes fields by dotted names ("train.lr", "model.n_blocks", ...).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

from .config import ModelConfig, PriorConfig, from_dict, to_dict
from .data import DataConfig
from .train import TrainConfig

__all__ = ["RunConfig", "get_profile", "apply_overrides", "PROFILES", "DATASETS"]

DATASETS = ("digits", "fashion-mnist", "cifar10", "toy2d")
PROFILES = ("smoke", "default", "full")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    prior: PriorConfig = PriorConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> RunConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown config section(s) {sorted(unknown)}; use data, model, prior, train")
        kinds = {"data": DataConfig, "model": ModelConfig, "prior": PriorConfig, "train": TrainConfig}
        return cls(**{k: from_dict(kinds[k], v) for k, v in d.items()})


_CONV_IMAGE = dict(arch="conv", n_scales=3, kernel_size=3, coeff=0.9, logdet="power_series", n_terms=5, actnorm=True)


def _profiles() -> dict[tuple[str, str], RunConfig]:
    p: dict[tuple[str, str], RunConfig] = {}
    # digits: 64-D vectors, 17 levels
    # Tuned on validation (benchmarks/digits_quality.py, benchmarks/RESULTS.md). With beta = 64
    # the CE term dominated: val bits/dim stayed ~3.45 and early stopping kept epoch 1 (78% test
    # accuracy). beta = 1 brought val bpd to ~2.05 with equal or better val accuracy (beta 4, 8
    # were worse on both). At lr 1e-3 (20 steps per epoch) val bpd was still falling when the
    # budget ran out, hence lr 3e-3 with a cosine schedule over 120 epochs (~5 CPU-minutes on
    # one thread). One power iteration per step (power_rtol None) fits ~165 epochs and reached
    # val bpd 2.034 vs 2.049, but let single layers reach operator norm 1.11 early in training
    # (coeff 0.9), so the spectral norm keeps iterating to its tolerance here. Exact eval
    # log-det: validation bpd (early stopping) without Hutchinson noise at 64-D. Final metrics average
    # 16 dequantisation draws per image (importance-weighted, a tighter bound): with one draw the test
    # accuracy of the same weights moved by up to 4 of 360 images between noise seeds.
    p["digits", "default"] = RunConfig(
        DataConfig("digits"),
        ModelConfig(arch="mlp", hidden=(128, 128), n_blocks=10, coeff=0.9, n_terms=5, eval_logdet="exact"),
        PriorConfig(init="separated", radius=1.0),
        TrainConfig(epochs=120, batch_size=64, lr=3e-3, schedule="cosine", objective="hybrid", beta=1.0,
                    early_stopping="val_bpd", patience=25, max_minutes=5.0, eval_draws=16),
    )
    p["digits", "smoke"] = RunConfig(
        DataConfig("digits", train_limit=300),
        ModelConfig(arch="mlp", hidden=(32,), n_blocks=2, n_terms=2),
        PriorConfig(init="separated"),
        TrainConfig(epochs=2, batch_size=64, lr=1e-3, objective="hybrid", beta=64.0, early_stopping="none", progress=False),
    )
    p["digits", "full"] = replace(p["digits", "default"], train=replace(p["digits", "default"].train, epochs=400, max_minutes=None, patience=50))
    # toy2d: continuous 2-D moons
    p["toy2d", "default"] = RunConfig(
        DataConfig("toy2d"),
        ModelConfig(arch="mlp", hidden=(64, 64), n_blocks=6, n_terms=5),
        PriorConfig(init="separated", radius=2.0),
        TrainConfig(epochs=60, batch_size=128, lr=3e-3, objective="hybrid", beta=2.0, early_stopping="none"),
    )
    p["toy2d", "smoke"] = replace(
        p["toy2d", "default"], model=ModelConfig(arch="mlp", hidden=(16,), n_blocks=2, n_terms=2),
        train=replace(p["toy2d", "default"].train, epochs=2, progress=False),
    )
    p["toy2d", "full"] = replace(p["toy2d", "default"], train=replace(p["toy2d", "default"].train, epochs=300))
    # images: multi-scale conv i-ResNets
    full_width = {"fashion-mnist": (128, 8), "cifar10": (512, 16)}  # (hidden channels, blocks per scale)
    for name, (width, blocks) in full_width.items():
        d = 784 if name == "fashion-mnist" else 3072
        p[name, "smoke"] = RunConfig(
            DataConfig(name, train_limit=200),
            ModelConfig(**{**_CONV_IMAGE, "n_scales": 2, "hidden": (8,), "n_blocks": 1, "n_terms": 2}),
            PriorConfig(init="separated"),
            TrainConfig(epochs=1, batch_size=32, objective="hybrid", beta=float(d), early_stopping="none", progress=False),
        )
        p[name, "default"] = RunConfig(  # CPU-sized (fashion-mnist's prior and beta retuned below)
            DataConfig(name),
            ModelConfig(**{**_CONV_IMAGE, "hidden": (32,), "n_blocks": 2}),
            PriorConfig(init="separated"),
            TrainConfig(epochs=10, batch_size=64, lr=1e-3, objective="hybrid", beta=float(d), early_stopping="val_bpd",
                        patience=3, threads=2),
        )
        p[name, "full"] = RunConfig(  # i-ResNet / Residual-Flow scale, one or more GPUs
            DataConfig(name),
            ModelConfig(**{**_CONV_IMAGE, "hidden": (width,), "n_blocks": blocks, "logdet": "russian_roulette",
                           "n_terms": 2, "neumann_gradient": True}),
            PriorConfig(init="separated"),
            TrainConfig(epochs=100, batch_size=64, lr=1e-3, objective="hybrid", beta=float(d), schedule="cosine",
                        early_stopping="val_bpd", patience=10, device="cuda", grad_clip=100.0, eval_batch_size=256),
        )
    # fashion-mnist default: class Gaussians from the initial flow's latents (init "moments"), learned diagonal,
    # beta 1. Chosen on validation at the CPU ablation's budget (2 epochs, 7,200 images; RESULTS.md "Fashion-MNIST
    # default profile, retuned"): 77.9% / 7.83 bits/dim vs 57.6% / 9.56 with fixed means r randn (FlowGMM) and
    # beta 784: at CPU budgets the flow cannot carry the data ~40 sigma to fixed random means. cifar10 keeps the
    # literature's fixed means (nothing measured: CIFAR-10 is not obtainable here).
    fashion = p["fashion-mnist", "default"]
    p["fashion-mnist", "default"] = replace(
        fashion, prior=PriorConfig(init="moments", learn_means=True, learn_scales=True),
        train=replace(fashion.train, beta=1.0))
    return p


_ALL = _profiles()


def get_profile(dataset: str, profile: str = "default") -> RunConfig:
    """The named RunConfig for a dataset."""
    if (dataset, profile) not in _ALL:
        raise ValueError(f"No profile {profile!r} for dataset {dataset!r}; datasets {DATASETS}, profiles {PROFILES}")
    return _ALL[dataset, profile]


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits the annotation `hint`, value converted: list -> tuple, int -> float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args), value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = _conform(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_conform(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is type(None):
        return value is None, value
    if hint is bool or isinstance(value, bool):  # bool is an int subclass: keep them apart
        return hint is bool and isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if hint in (int, str):
        return isinstance(value, hint), value
    return True, value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set fields by dotted name, e.g. {"train.lr": 3e-4, "model.hidden": [64, 64]}; values are type-checked by name."""
    sections = cfg.to_dict()
    kinds = {f.name: typing.get_type_hints(type(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or name not in sections[section]:
            raise ValueError(f"Unknown config field {key!r}; fields look like train.lr, model.n_blocks, prior.init, data.root")
        ok, converted = _conform(value, kinds[section][name])
        if not ok:
            raise ValueError(f"{key} must be {_describe(kinds[section][name])}, got {value!r}")
        sections[section][name] = converted
    return RunConfig.from_dict(sections)
