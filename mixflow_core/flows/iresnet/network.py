"""Invertible residual networks (Behrmann et al. 2019; Chen et al. 2019).

A block is f(x) = x + g(x) with Lip(g) < 1, so f is invertible (Banach fixed point:
x = z - g(x)) and log|det J_f| = tr log(I + J_g), estimated by a pluggable estimator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from typing import TYPE_CHECKING

from ..layers import ActNorm, Flow, FlowSequence, Squeeze, Whiten
from .arch import MLP, Conv
from .lipschitz import (
    LipSwish, SpectralConv2d, SpectralLinear, converge_spectral_norms, load_power_vectors, power_vectors,
    refresh_spectral_norms, spectral_layers,
)
from .logdet import Exact, LogDetEstimator, PowerSeries

if TYPE_CHECKING:  # flows/config.py imports this family, not the other way round
    from ..config import ModelConfig

__all__ = [
    "FixedPointInfo",
    "ResidualBlock",
    "IResNet",
    "fixed_point_inverse",
    "build_iresnet",
    "build_mlp_iresnet",
    "build_conv_iresnet",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixedPointInfo:
    """How a fixed-point inversion ended."""

    iterations: int
    max_change: float  # max |x_{k+1} - x_k| at the last iteration
    converged: bool


@torch.no_grad()
def fixed_point_inverse(g: nn.Module, z: Tensor, tol: float, max_iter: int) -> tuple[Tensor, FixedPointInfo]:
    """Solve x + g(x) = z by x_{k+1} = z - g(x_k), x_0 = z; linear convergence at rate Lip(g).

    Converged when max |x_{k+1} - x_k| < tol * max(1, max |z|): absolute for data of unit scale,
    relative for large latents, where float precision rules out an absolute 1e-6.
    """
    x = z.clone()
    change = float("inf")
    threshold = tol * max(1.0, float(z.abs().max())) if z.numel() else tol
    for it in range(1, max_iter + 1):
        x_next = z - g(x)
        change = float((x_next - x).abs().max()) if x.numel() else 0.0
        x = x_next
        if change < threshold:
            return x, FixedPointInfo(it, change, True)
        if not torch.isfinite(x).all():
            break
    return x, FixedPointInfo(max_iter, change, False)


class ResidualBlock(Flow):
    """Residual block f(x) = x + g(x), Lip(g) <= c < 1; inverse by fixed-point iteration.

    `logdet` estimates log|det(I + J_g)| in training mode, `eval_logdet` (default: the
    same) in eval mode. After each `inverse`, `last_inverse` holds a FixedPointInfo; a
    non-converged inversion is logged as a warning.
    """

    def __init__(
        self,
        g: nn.Module,
        logdet: LogDetEstimator = PowerSeries(),
        eval_logdet: LogDetEstimator | None = None,
        inverse_tol: float = 1e-6,
        inverse_max_iter: int = 100,
    ) -> None:
        super().__init__()
        self.g = g
        self.logdet = logdet
        self.eval_logdet = eval_logdet if eval_logdet is not None else logdet
        self.inverse_tol, self.inverse_max_iter = inverse_tol, inverse_max_iter
        self.last_inverse: FixedPointInfo | None = None
        self.autocast_dtype: torch.dtype | None = None  # set by layers.training_precision: g under autocast in training

    @property
    def exact_logdet(self) -> bool:
        """Whether the eval-mode log-det is exact (the Exact estimator), not a stochastic estimate."""
        return isinstance(self.eval_logdet, Exact)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and self.autocast_dtype is not None:
            gx, logdet = self.logdet(self._autocast_g, x)
        else:
            gx, logdet = (self.logdet if self.training else self.eval_logdet)(self.g, x)
        return x + gx, logdet

    def _autocast_g(self, x: Tensor) -> Tensor:
        """g(x) with its convolutions / linear maps under autocast (lower precision), returned in x's dtype."""
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self.g(x).to(x.dtype)

    def transform(self, x: Tensor) -> Tensor:
        """x + g(x) without the log-det estimate."""
        return x + self.g(x)

    def inverse(self, z: Tensor) -> Tensor:
        x, info = fixed_point_inverse(self.g, z, self.inverse_tol, self.inverse_max_iter)
        self.last_inverse = info
        if not info.converged:
            logger.warning(
                "fixed-point inverse did not converge: %d iterations, last change %.3g > tol %.1g",
                info.iterations, info.max_change, self.inverse_tol,
            )
        return x

    def extra_repr(self) -> str:
        return f"logdet={self.logdet}, eval_logdet={self.eval_logdet}"


class IResNet(FlowSequence):
    """The flow of residual blocks: a FlowSequence whose training forward first refreshes the power iterations of all
    its spectral layers at once (refresh_spectral_norms: batched per shape, one host sync per few iterations), instead
    of each layer refreshing itself, one at a time, when it is applied.

    Its backbone hooks (layers.Flow): the training state is the power-iteration vectors (u, v) of every spectral
    layer, the training run's warm start; `settle` converges them for the weights as they are, so that
    Lip <= coeff holds exactly for saved, validated and returned weights.
    """

    def __init__(self, layers: list[Flow]) -> None:
        super().__init__(layers)
        self._spectral = spectral_layers(self)
        for layer in self._spectral:
            layer.external_refresh = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and torch.is_grad_enabled():
            refresh_spectral_norms(self._spectral)
        return super().forward(x)

    def training_state(self) -> dict[str, Tensor]:
        return power_vectors(self)

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        load_power_vectors(self, state)

    def settle(self) -> None:
        converge_spectral_norms(self)


def _activation(name: str) -> nn.Module:
    if name == "lipswish":
        return LipSwish()
    if name == "elu":
        return nn.ELU()  # 1-Lipschitz
    raise ValueError(f"Unknown activation {name!r}; use lipswish or elu")


def _block(g: nn.Sequential, cfg: ModelConfig) -> ResidualBlock:
    if cfg.g_init_scale < 1.0:  # g starts near 0: the block near the identity
        last = g[-1]
        with torch.no_grad():
            last.weight.mul_(cfg.g_init_scale)  # the power vectors stay valid: scaling keeps the singular vectors
            if last.bias is not None:
                last.bias.zero_()
    return ResidualBlock(g, cfg.logdet, cfg.eval_estimator, cfg.inverse_tol, cfg.inverse_max_iter)


def build_mlp_iresnet(dim: int, cfg: ModelConfig) -> IResNet:
    """[Whiten], then per block [ActNorm] + residual block with g = Linear -> act -> ... -> Linear, widths dim-hidden-dim
    (cfg.arch: MLP)."""
    arch = cfg.arch
    if not isinstance(arch, MLP):
        raise ValueError(f"build_mlp_iresnet needs ModelConfig(arch=MLP(...)), got {arch}")
    widths = (dim, *arch.hidden, dim)
    layers: list[Flow] = [Whiten((dim,), cfg.whiten_ridge)] if cfg.whiten else []
    for _ in range(arch.n_blocks):
        if cfg.actnorm:
            layers.append(ActNorm(dim))
        net: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                net.append(_activation(cfg.activation))
            net.append(SpectralLinear(w_in, w_out, cfg.coeff, cfg.n_power_iterations, power_rtol=cfg.power_rtol,
                                      krylov_steps=cfg.krylov_steps))
        layers.append(_block(nn.Sequential(*net), cfg))
    return IResNet(layers)


def build_conv_iresnet(shape: tuple[int, int, int], cfg: ModelConfig) -> IResNet:
    """Multi-scale conv i-ResNet: [Whiten] of the whole image, then n_scales stages of n_blocks, a Squeeze between stages.

    g = conv k x k (C -> h) -> act -> conv 1x1 (h -> h) -> act -> conv k x k (h -> C), each
    spectrally normalised as an operator on that stage's (C, H, W) (cfg.arch: Conv).
    """
    arch = cfg.arch
    if not isinstance(arch, Conv):
        raise ValueError(f"build_conv_iresnet needs ModelConfig(arch=Conv(...)), got {arch}")
    c, h, w = shape
    hidden = arch.channels
    layers: list[Flow] = [Whiten(tuple(shape), cfg.whiten_ridge)] if cfg.whiten else []
    for scale in range(arch.n_scales):
        if scale > 0:
            squeeze = Squeeze()
            c, h, w = squeeze.output_shape((c, h, w))
            layers.append(squeeze)
        for _ in range(arch.n_blocks):
            if cfg.actnorm:
                layers.append(ActNorm(c))
            k, sn = arch.kernel_size, dict(input_hw=(h, w), coeff=cfg.coeff,
                                           n_power_iterations=cfg.n_power_iterations, power_rtol=cfg.power_rtol,
                                           krylov_steps=cfg.krylov_steps)
            g = nn.Sequential(
                SpectralConv2d(c, hidden, k, **sn),
                _activation(cfg.activation),
                SpectralConv2d(hidden, hidden, 1, **sn),
                _activation(cfg.activation),
                SpectralConv2d(hidden, c, k, **sn),
            )
            layers.append(_block(g, cfg))
    return IResNet(layers)


def build_iresnet(data_shape: tuple[int, ...], cfg: ModelConfig) -> IResNet:
    """The i-ResNet for per-sample data of `data_shape`: MLP for vectors (D,), Conv for images (C, H, W)."""
    if isinstance(cfg.arch, MLP):
        if len(data_shape) != 1:
            raise ValueError(f"arch MLP needs vector data (D,), got shape {data_shape}; use Conv for images")
        return build_mlp_iresnet(data_shape[0], cfg)
    if isinstance(cfg.arch, Conv):
        if len(data_shape) != 3:
            raise ValueError(f"arch Conv needs image data (C, H, W), got shape {data_shape}; use MLP for vectors")
        return build_conv_iresnet(data_shape, cfg)  # type: ignore[arg-type]
    raise ValueError(f"Unknown arch {cfg.arch!r}; use MLP(...) or Conv(...)")
