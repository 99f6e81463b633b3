"""What a training run is: RunConfig = data + model + prior + train (the trajectory) + runtime (where and how long).

- `TrainConfig` holds everything that shapes the parameter trajectory (optimiser, objective,
  schedule, seed, which metric selects the best weights);
- `RuntimeConfig` holds where and how long it runs (epochs, time budget, patience, device,
  threads, progress bars, evaluation batch size and draws).
- `resume_conflicts` is the one resume policy, used by `fit(resume=True)`, `runs.ensure_run`
  and `mixflow train --resume`: the runtime section (and where the data lie) may change,
  nothing else; with a cosine schedule the epochs fix the schedule's length and may not change.
- `apply_overrides` sets fields by dotted name at any depth (``train.lr``,
  ``model.logdet.n_terms``, ``model.logdet=russian_roulette``), type-checked by annotation.
- `upgrade` reads the configs that mixflow 0.1 wrote (flat estimator and objective fields,
  epochs and device in train, the configuration name ``seed``) into today's shape.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..data import DataConfig
from ..flows.config import IRESNET_FIELDS, ModelConfig, PriorConfig, conform, describe, from_dict, parse_tagged, tagged_types, to_dict
from ..flows.layers import PRECISIONS
from ..flows.objectives import Hybrid, TrainingObjective

__all__ = ["TrainConfig", "RuntimeConfig", "RunConfig", "apply_overrides", "resume_conflicts", "flatten", "upgrade",
           "RESUMABLE_FIELDS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """What shapes the trajectory: optimisation, objective, schedule, best-weight selection, seed."""

    batch_size: int = 64  # per process
    lr: float = 1e-3  # flow parameters
    prior_lr: float | None = None  # prior parameters (None: lr); IB-INN learns means faster
    weight_decay: float = 0.0  # flow parameters (Adam's L2 penalty)
    prior_weight_decay: float = 0.0  # prior parameters; the student used 5e-4 on everything
    objective: TrainingObjective = Hybrid()  # Likelihood(), Hybrid(beta) or PushAway(lam)
    schedule: Literal["constant", "cosine"] = "constant"  # lr schedule over runtime.epochs
    grad_clip: float | None = None  # max global gradient norm
    early_stopping: Literal["none", "val_bpd", "val_acc"] = "val_bpd"  # the metric that selects the best weights
    seed: int = 0  # weight init, batch order, dequantisation noise, probes

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size and lr must be positive: {self}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how long a run goes: none of it changes the trajectory, so all of it may change on resume."""

    epochs: int = 100  # (with a cosine schedule also the schedule's length, then fixed on resume)
    max_minutes: float | None = None  # wall-clock budget, checked after every batch (then validates and saves)
    max_steps: int | None = None  # optimiser-step budget of the whole run, resumes included, checked likewise
    checkpoint_minutes: float = 2.0  # with a run directory: a mid-epoch checkpoint at least this often
    patience: int = 20  # epochs without improvement of train.early_stopping before stopping
    max_nonfinite: int = 20  # consecutive non-finite batches before giving up
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: int = 1  # torch CPU threads (small models run best with 1)
    progress: bool = True  # tqdm progress bars (rank 0)
    eval_batch_size: int = 128  # 128 evaluates 3x faster than 500 on 2 CPU cores (cache; RESULTS.md "Evaluation speed")
    eval_draws: int = 1  # dequantisation draws averaged (importance-weighted) in the final val / test metrics
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"  # training steps' arithmetic (flows.layers.training_precision)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, tf32 or bf16, got {self.precision!r}")
        if self.epochs < 1 or self.eval_batch_size < 1 or self.threads < 1:
            raise ValueError(f"epochs, eval_batch_size and threads must be positive: {self}")
        if self.eval_draws < 1:
            raise ValueError(f"eval_draws must be >= 1, got {self.eval_draws}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {self.max_steps!r}")
        if not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be positive, got {self.checkpoint_minutes}")


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "prior": PriorConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run, in five sections."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    prior: PriorConfig = PriorConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> RunConfig:
        """From to_dict()'s shape (or an older one, see `upgrade`); unknown sections or fields raise ValueError."""
        d = upgrade(d)
        unknown = set(d) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"Unknown config section(s) {sorted(unknown)}; use {', '.join(_SECTIONS)}")
        return cls(**{k: from_dict(_SECTIONS[k], v, k) for k, v in d.items()})


# -- the resume policy ------------------------------------------------------------------------------------
RESUMABLE_FIELDS = ("data.root", "data.download")  # where the data lie; besides these, only runtime.* may change


def flatten(sections: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"logdet": {"type": "exact"}}} -> {"model.logdet.type": "exact"}: leaves by dotted name."""
    out: dict[str, Any] = {}
    for key, value in sections.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def resume_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved, new)} of the changes that resuming a run may not make.

    `saved` and `new` are section dicts (RunConfig.to_dict(), or only {"train": ..., "runtime": ...}
    as fit has them). Allowed: every runtime field, and data.root / data.download; refused: every
    other difference, and runtime.epochs when the schedule is cosine (it is the schedule's length).
    The optimiser's saved state restores the old lr and weight decay, so a change there would
    otherwise be silently ignored.
    """
    a, b = flatten(saved), flatten(new)
    cosine = b.get("train.schedule") == "cosine"
    refused = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key in RESUMABLE_FIELDS:
            continue
        if key.startswith("runtime.") and not (cosine and key == "runtime.epochs"):
            continue
        refused[key] = (a.get(key), b.get(key))
    return refused


# -- overrides by dotted name ---------------------------------------------------------------------------------
_MOVED = {  # mixflow 0.1's dotted names that now live elsewhere
    "model.hidden": "model.arch.hidden (MLP) or model.arch.channels (Conv)",
    "model.n_blocks": "model.arch.n_blocks", "model.n_scales": "model.arch.n_scales",
    "model.kernel_size": "model.arch.kernel_size",
    "model.n_terms": "model.logdet.n_terms (power_series) or model.logdet.n_exact_terms (russian_roulette)",
    "model.n_probes": "model.logdet.n_probes", "model.neumann_gradient": "model.logdet.neumann_gradient",
    "model.eval_n_terms": "model.eval_logdet.n_terms (eval_logdet is now an estimator, or null for the training one)",
    "train.beta": "train.objective.beta (with train.objective=hybrid)",
    "train.push_lambda": "train.objective.lam (with train.objective=push_away)",
    **{f"train.{f.name}": f"runtime.{f.name}" for f in dataclasses.fields(RuntimeConfig)},
}


def _set(node: dict[str, Any], cls: type, path: list[str], value: Any, key: str) -> None:
    """Set `path` inside `node` (the to_dict of a `cls`), checking names and types against `cls`."""
    hints = typing.get_type_hints(cls)
    name, rest = path[0], path[1:]
    if name not in hints or name == "kind":
        known = ", ".join(sorted(n for n in node if n != "type"))
        raise ValueError(f"Unknown config field {key!r}: {cls.__name__} has {known}")
    hint = hints[name]
    kinds = tagged_types(hint)
    if kinds:
        if rest == ["type"]:  # model.logdet.type=exact: the same as model.logdet=exact
            rest, value = [], {"type": value}
        if not rest:  # a whole tagged value: a name, a dict with "type", or None where allowed
            if value is None and type(None) in typing.get_args(hint):
                node[name] = None
            else:
                node[name] = to_dict(parse_tagged(hint, value, key))
            return
        current = node[name]
        if current is None:
            raise ValueError(f"{key}: {key.rsplit('.', 1)[0]} is null; set it to one of {sorted(kinds)} first")
        _set(current, kinds[current["type"]], rest, value, key)
        return
    if rest:
        if dataclasses.is_dataclass(hint):
            _set(node[name], hint, rest, value, key)
            return
        raise ValueError(f"Unknown config field {key!r}: {cls.__name__}.{name} has no fields")
    ok, converted = conform(value, hint)
    if not ok:
        raise ValueError(f"{key} must be {describe(hint)}, got {value!r}")
    node[name] = to_dict(converted)


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Set fields by dotted name, e.g. {"train.lr": 3e-4, "model.arch.hidden": [64, 64], "model.logdet": "exact"}.

    Values are type-checked against the annotations; a tagged field (architecture, estimator,
    objective) takes a name (its defaults), a dict with "type", or has its own fields set one by one.
    Every error is one line naming the field.
    """
    sections = cfg.to_dict()
    for key, value in overrides.items():
        section, *path = key.split(".")
        if key in _MOVED:
            raise ValueError(f"{key} is now {_MOVED[key]}")
        if section not in _SECTIONS or not path:
            raise ValueError(f"Unknown config field {key!r}; fields look like train.lr, model.arch.n_blocks, "
                             f"model.logdet.n_terms, prior.init, runtime.epochs, data.root")
        _set(sections[section], _SECTIONS[section], path, value, key)
    _drop_other_family(cfg, sections["model"], overrides)
    return RunConfig.from_dict(sections)


def _drop_other_family(cfg: RunConfig, model: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A switch from an i-ResNet to a coupling architecture (e.g. --set model.arch=coupling_conv on an i-ResNet
    profile) resets the i-ResNet fields that the overrides do not name to their defaults; one they name is then
    refused by ModelConfig, with one line."""
    arch = tagged_types(typing.get_type_hints(ModelConfig)["arch"])[model["arch"]["type"]]
    if cfg.model.family != "iresnet" or arch.family == "iresnet":
        return
    named = {k.split(".")[1] for k in overrides if k.startswith("model.") and k.count(".") >= 1}
    defaults = to_dict(ModelConfig())
    for name in IRESNET_FIELDS:
        if name not in named:
            model[name] = defaults[name]


# -- configs of mixflow 0.1 ------------------------------------------------------------------------------------
_OLD_RUNTIME = {f.name for f in dataclasses.fields(RuntimeConfig)}


def _upgrade_spectral(d: dict[str, Any]) -> dict[str, Any]:
    model = d.get("model")
    if not (isinstance(model, dict) and "power_rtol" in model and "krylov_steps" not in model):
        return d
    logger.info("model.power_rtol without model.krylov_steps: the power-iteration rule (krylov_steps = None)")
    return {**d, "model": {**model, "krylov_steps": None}}


def _upgrade_model(m: dict[str, Any]) -> dict[str, Any]:
    m = dict(m)
    arch = m.pop("arch", "mlp")
    hidden, n_blocks = m.pop("hidden", [128, 128]), m.pop("n_blocks", 10)
    n_scales, kernel = m.pop("n_scales", 2), m.pop("kernel_size", 3)
    if arch == "conv":
        m["arch"] = {"type": "conv", "channels": hidden[0], "n_blocks": n_blocks, "n_scales": n_scales,
                     "kernel_size": kernel}
    else:
        m["arch"] = {"type": "mlp", "hidden": hidden, "n_blocks": n_blocks}
    name, n_terms = m.pop("logdet", "power_series"), m.pop("n_terms", 5)
    probes, neumann = m.pop("n_probes", 1), m.pop("neumann_gradient", False)
    eval_name, eval_terms = m.pop("eval_logdet", "same"), m.pop("eval_n_terms", 10)

    def estimator(kind: str, terms: int, grad: bool) -> dict[str, Any]:
        if kind == "exact":
            return {"type": "exact"}
        if kind == "russian_roulette":
            return {"type": kind, "n_exact_terms": terms, "n_probes": probes, "neumann_gradient": grad}
        return {"type": kind, "n_terms": terms, "n_probes": probes, "neumann_gradient": grad}

    m["logdet"] = estimator(name, n_terms, neumann)
    m["eval_logdet"] = None if eval_name == "same" else estimator(eval_name, eval_terms, False)
    return m


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict as mixflow 0.1 wrote it (flat estimator / objective fields, epochs etc. in train,
    prior.init "seed") in today's shape; today's dicts pass unchanged.

    A model section that names power_rtol but not krylov_steps was written before the Krylov
    refresh existed (a saved config holds every field) or asks for the power-iteration rule
    by its tolerance: krylov_steps = None, the rule it trained or means to train with.
    """
    d = _upgrade_spectral(d)
    model, train = d.get("model"), d.get("train")
    # 0.1 wrote every field (dataclasses.asdict): its model always had "hidden", its train "beta"
    old_model = isinstance(model, dict) and any(k in model for k in ("hidden", "n_terms", "eval_n_terms"))
    old_train = isinstance(train, dict) and any(k in train for k in ("beta", "push_lambda", *_OLD_RUNTIME))
    if not (old_model or old_train or (isinstance(d.get("prior"), dict) and d["prior"].get("init") == "seed")):
        return d
    d = dict(d)
    if old_model:
        d["model"] = _upgrade_model(model)
    if old_train:
        train = dict(train)
        name, beta, lam = train.pop("objective", "hybrid"), train.pop("beta", 1.0), train.pop("push_lambda", 0.05)
        train["objective"] = {"type": name, **({"beta": beta} if name == "hybrid" else {}),
                              **({"lam": lam} if name == "push_away" else {})}
        runtime = {k: train.pop(k) for k in list(train) if k in _OLD_RUNTIME}
        d["train"], d["runtime"] = train, {**runtime, **d.get("runtime", {})}
    if isinstance(d.get("prior"), dict) and d["prior"].get("init") == "seed":
        d["prior"] = {**d["prior"], "init": "student"}  # the student's configuration was called "seed"
    logger.info("read a configuration written by mixflow 0.1 (converted to today's fields)")
    return d
