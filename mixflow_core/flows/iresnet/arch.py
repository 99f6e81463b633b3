"""The i-ResNet family's architecture values: `MLP` (vectors) and `Conv` (images).

Both are invertible residual networks (blocks x + g(x), Lip(g) <= coeff < 1). Their family's other
fields (coeff, spectral refresh, log-det estimators, fixed-point inverse) are ModelConfig's
i-ResNet fields (flows/config.py), refused there on a coupling architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["MLP", "Conv"]


@dataclass(frozen=True)
class MLP:
    """i-ResNet for vectors (D,): blocks x + g(x) with g = Linear -> act -> ... -> Linear, widths D-hidden-D."""

    kind: ClassVar[str] = "mlp"
    family: ClassVar[str] = "iresnet"
    hidden: tuple[int, ...] = (128, 128)  # hidden widths of each g
    n_blocks: int = 10  # residual blocks

    def __post_init__(self) -> None:
        if self.n_blocks < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"MLP needs n_blocks >= 1 and positive hidden widths, got {self}")


@dataclass(frozen=True)
class Conv:
    """Multi-scale conv i-ResNet for images (C, H, W): n_scales stages of n_blocks, a squeeze between stages."""

    kind: ClassVar[str] = "conv"
    family: ClassVar[str] = "iresnet"
    channels: int = 32  # hidden channels of each g (conv k x k -> act -> conv 1x1 -> act -> conv k x k)
    n_blocks: int = 2  # residual blocks per scale
    n_scales: int = 2  # scales, with a squeeze between consecutive ones
    kernel_size: int = 3  # first and last conv of g (the middle one is 1x1)

    def __post_init__(self) -> None:
        if min(self.channels, self.n_blocks, self.n_scales, self.kernel_size) < 1:
            raise ValueError(f"Conv needs positive channels, n_blocks, n_scales and kernel_size, got {self}")
