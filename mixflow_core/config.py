"""Typed, frozen configuration for the flow and the prior, with dict round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = ["ModelConfig", "PriorConfig", "from_dict", "to_dict"]


@dataclass(frozen=True)
class ModelConfig:
    """The invertible network f and its preprocessing."""

    arch: Literal["mlp", "conv"] = "mlp"  # mlp: vectors (toy2d, digits); conv: images (C, H, W)
    hidden: tuple[int, ...] = (128, 128)  # mlp: hidden widths of each g; conv: (hidden channels,)
    n_blocks: int = 10  # mlp: residual blocks; conv: blocks per scale
    n_scales: int = 2  # conv only: scales, with a squeeze between consecutive ones
    kernel_size: int = 3  # conv only: first and last conv of g (the middle one is 1x1)
    coeff: float = 0.9  # Lipschitz bound of each spectrally normalised layer, < 1
    n_power_iterations: int = 1  # power iterations per training step per layer, at least ...
    power_rtol: float | None = 1e-4  # ... then more until sigma changes < rtol (max 50); None: no more
    activation: Literal["lipswish", "elu"] = "lipswish"
    actnorm: bool = True  # ActNorm before every residual block
    logdet: Literal["power_series", "russian_roulette", "exact"] = "power_series"  # training estimator
    n_terms: int = 5  # power_series: series terms; russian_roulette: terms always computed
    n_probes: int = 1  # Hutchinson probes per estimate
    neumann_gradient: bool = False  # memory-saving Neumann-series gradient for series estimators
    eval_logdet: Literal["same", "power_series", "russian_roulette", "exact"] = "same"  # in eval mode
    eval_n_terms: int = 10  # series terms when eval_logdet is a series estimator
    inverse_tol: float = 1e-6  # fixed-point inverse stops when max |x_{k+1} - x_k| < tol * max(1, max |z|)
    inverse_max_iter: int = 100  # ... or after this many iterations (then warns)
    alpha: float = 0.05  # logit preprocessing: s = alpha + (1 - 2 alpha) * y
    dequantize: bool = True  # uniform dequantisation noise; False uses the bin midpoint

    def __post_init__(self) -> None:
        if not 0.0 < self.coeff < 1.0:
            raise ValueError(f"coeff must lie in (0, 1), got {self.coeff}")
        if not 0.0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {self.alpha}")
        if min(self.n_blocks, self.n_scales, self.n_terms, self.n_probes, len(self.hidden)) < 1:
            raise ValueError(f"n_blocks, n_scales, n_terms, n_probes and hidden must be positive: {self}")


@dataclass(frozen=True)
class PriorConfig:
    """Class-conditional Gaussian p(z|y) = N(mu_y, Sigma_y) over all latent dims."""

    # moments: data-dependent, set by fit from the class means and covariances of the initial flow's training latents
    init: Literal["separated", "orthogonal", "zeros", "seed", "moments"] = "separated"
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


_C = TypeVar("_C")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples become lists) suitable for JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
    """Build `cls` from a dict, rejecting unknown keys and restoring tuple fields."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)
