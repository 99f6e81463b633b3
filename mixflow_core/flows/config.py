"""Typed, frozen configuration of the flow and the prior, and the dict round trip every config uses.

A config field holds a typed value, not a cluster of flags: the architecture is an i-ResNet
(`MLP`, `Conv`: flows/iresnet/) or a coupling flow (`CouplingMLP`, `CouplingConv`: flows/coupling.py),
the log-det estimator a `PowerSeries`, `RussianRoulette` or `Exact` (iresnet/logdet.py). In JSON
such a value is a tagged dict, ``{"type": "power_series", "n_terms": 5, ...}``; `to_dict` and
`from_dict` convert both ways for any (nested) config dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from .coupling import CouplingConv, CouplingMLP
from .iresnet.arch import MLP, Conv
from .iresnet.lipschitz import KRYLOV_STEPS, check_coeff, check_krylov_steps
from .iresnet.logdet import Estimator, Exact, PowerSeries, RussianRoulette
from .preprocess import check_alpha

__all__ = ["MLP", "Conv", "CouplingMLP", "CouplingConv", "Arch", "IRESNET_FIELDS", "ModelConfig", "PriorConfig", "from_dict", "to_dict", "tagged_types", "parse_tagged", "conform",
           "describe"]


Arch = MLP | Conv | CouplingMLP | CouplingConv  # the backbone: family i-ResNet (mlp, conv) or coupling
# the i-ResNet's own fields of ModelConfig: a coupling architecture refuses any of them set away from its default
IRESNET_FIELDS = ("coeff", "krylov_steps", "n_power_iterations", "power_rtol", "activation", "g_init_scale", "logdet",
                  "eval_logdet", "inverse_tol", "inverse_max_iter")


@dataclass(frozen=True)
class ModelConfig:
    """The invertible network f (the backbone) and its preprocessing.

    `arch` picks the backbone and its family. The fields from `coeff` to `inverse_max_iter`
    (IRESNET_FIELDS) belong to the i-ResNet family, and a coupling architecture refuses them set
    (one line); the rest (ActNorm, whitening, logit, dequantisation) belong to both.
    """

    arch: Arch = MLP()  # i-ResNet: MLP (vectors: toy2d, digits) or Conv (images); coupling: CouplingMLP, CouplingConv
    # -- i-ResNet fields --
    coeff: float = 0.9  # Lipschitz bound of each spectrally normalised layer, < 1
    # spectral normalisation per training step: a Krylov subspace of this many products with W^T W per layer
    # (RESULTS.md "Spectral normalisation per step"); None: power iteration, n_power_iterations, then more until
    # sigma changes < power_rtol (max 50; power_rtol None: no more)
    krylov_steps: int | None = KRYLOV_STEPS
    n_power_iterations: int = 1
    power_rtol: float | None = 1e-4
    activation: Literal["lipswish", "elu"] = "lipswish"
    g_init_scale: float = 1.0  # the last layer of every g starts at this multiple of PyTorch's init (bias 0 when < 1):
    #                            small values start the flow near the identity (ActNorm only)
    logdet: Estimator = PowerSeries()  # log-det estimator in training mode
    eval_logdet: Estimator | None = None  # in eval mode; None: the training estimator
    inverse_tol: float = 1e-6  # fixed-point inverse stops when max |x_{k+1} - x_k| < tol * max(1, max |z|)
    inverse_max_iter: int = 100  # ... or after this many iterations (then warns)
    # -- both families --
    actnorm: bool = True  # ActNorm before every residual block / first in every coupling step (both families)
    whiten: bool = False  # a fixed ZCA whitening (S + whiten_ridge I)^-1/2 of the training data first (set by fit)
    whiten_ridge: float = 1e-3  # in the units of the preprocessed data (logit space)
    alpha: float = 0.05  # logit preprocessing: s = alpha + (1 - 2 alpha) * y
    dequantize: bool = True  # uniform dequantisation noise; False uses the bin midpoint

    def __post_init__(self) -> None:
        check_coeff(self.coeff)
        check_krylov_steps(self.krylov_steps)
        check_alpha(self.alpha)
        if self.n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {self.n_power_iterations}")
        if not self.whiten_ridge > 0:
            raise ValueError(f"whiten_ridge must be positive, got {self.whiten_ridge}")
        if not 0.0 < self.g_init_scale <= 1.0:
            raise ValueError(f"g_init_scale must lie in (0, 1] (0 would leave the power iteration without a direction), "
                             f"got {self.g_init_scale}")

        if self.arch.family != "iresnet":
            defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
            changed = [name for name in IRESNET_FIELDS if getattr(self, name) != defaults[name]]
            if changed:
                raise ValueError(f"model.{changed[0]} is an i-ResNet field: the {self.arch.kind} backbone (a coupling "
                                 f"flow, exact log-det and analytic inverse) has no use for it; leave it unset")

    @property
    def family(self) -> str:
        """The backbone family: "iresnet" or "coupling"."""
        return self.arch.family

    def unbiased_eval(self) -> ModelConfig:
        """This config with an evaluation log-det that is exact where affordable and unbiased otherwise: the i-ResNet
        on vectors Exact, on images Russian roulette (2 exact terms); a coupling flow's is exact already."""
        if self.family != "iresnet":
            return self
        return dataclasses.replace(
            self, eval_logdet=Exact() if isinstance(self.arch, MLP) else RussianRoulette(n_exact_terms=2))

    @property
    def eval_estimator(self) -> Estimator:
        """The estimator used in eval mode."""
        return self.logdet if self.eval_logdet is None else self.eval_logdet


@dataclass(frozen=True)
class PriorConfig:
    """Class-conditional Gaussian p(z|y) = N(mu_y, Sigma_y) over all latent dims."""

    # student: the original student model's U[0,1) means and log-stds; moments: data-dependent, set by fit from
    # the class means and covariances of the initial flow's training latents
    init: Literal["separated", "orthogonal", "zeros", "student", "moments"] = "separated"
    learn_means: bool = False  # FlowGMM keeps means fixed
    learn_scales: bool = False  # False: sigma = 1 (Sigma = I), except init "moments", which fixes them from the data
    covariance: Literal["diagonal", "full"] = "diagonal"  # Sigma_y = diag(sigma_y^2), or L_y L_y^T (L_y lower-triangular)
    moments_ridge: float = 0.03  # init "moments": added to every latent variance (the Gaussian baseline's ridge on digits)
    radius: float = 1.0  # separated: mu_k = radius * randn(D)
    separation: float = 5.0  # orthogonal: pairwise distance between means, in units of sigma
    class_prior: Literal["empirical", "uniform"] = "empirical"  # p(y): class frequencies or 1/K
    init_seed: int = 0  # seed for the random parts of the mean / scale initialisation

    def __post_init__(self) -> None:
        if self.radius <= 0 or self.separation <= 0:
            raise ValueError(f"radius and separation must be positive, got {self.radius}, {self.separation}")
        if self.moments_ridge < 0:
            raise ValueError(f"moments_ridge must be >= 0, got {self.moments_ridge}")
        if self.covariance == "full" and not (self.learn_scales or self.init == "moments"):
            raise ValueError("covariance='full' with fixed scales is Sigma = I: learn them (learn_scales=True) "
                             "or set them from the data (init='moments')")


def conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits the annotation `hint`, value converted: list -> tuple, int -> float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args), value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = conform(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [conform(v, args[0]) for v in value]
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


def describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    if tagged_types(hint):
        kinds = sorted(tagged_types(hint))
        return "one of " + ", ".join(kinds) + (" or null" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")



# -- dict round trips ---------------------------------------------------------------------------------
_C = TypeVar("_C")


def _saved_fields(cls: Any) -> list[dataclasses.Field]:
    """A dataclass's fields that belong in its dict (not e.g. a torch.Generator marked config=False)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def to_dict(cfg: Any) -> Any:
    """Plain JSON-ready data: dataclasses become dicts (tagged with "type" where the class has a `kind`), tuples lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {"type": cfg.kind} if hasattr(type(cfg), "kind") else {}
        out.update({f.name: to_dict(getattr(cfg, f.name)) for f in _saved_fields(cfg)})
        return out
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def tagged_types(hint: Any) -> dict[str, type]:
    """{tag: class} of the tagged dataclasses in a type hint (e.g. Estimator -> power_series, russian_roulette, exact)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return {a.kind: a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a) and hasattr(a, "kind")}


def parse_tagged(hint: Any, value: Any, where: str) -> Any:
    """A tagged config value from {"type": tag, field: value, ...} or a bare tag (its defaults)."""
    kinds = tagged_types(hint)
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"{where} must be one of {sorted(kinds)} (a name, or a dict with \"type\"), got {value!r}")
    tag = value["type"]
    if tag not in kinds:
        raise ValueError(f"{where}: unknown type {tag!r}; use one of {sorted(kinds)}")
    return from_dict(kinds[tag], {k: v for k, v in value.items() if k != "type"}, where)


def from_dict(cls: type[_C], data: dict[str, Any], where: str | None = None) -> _C:
    """Build `cls` from a dict, rejecting unknown keys and restoring tuples and tagged values (see to_dict)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {data!r}")
    fields = {f.name: f for f in _saved_fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"Unknown {where} field(s): {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if tagged_types(hint) and not (value is None and type(None) in typing.get_args(hint)):
            kwargs[name] = parse_tagged(hint, value, f"{where}.{name}")
        elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            ok, converted = conform(value, hint)
            if not ok:
                raise ValueError(f"{where}.{name} must be {describe(hint)}, got {value!r}")
            kwargs[name] = converted
    return cls(**kwargs)
