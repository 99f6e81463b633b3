"""Preprocessing h(x) before the flow: dequantisation + logit for quantised data, identity for continuous data.

Each preprocessor maps x -> (h, log|det dh/dx|) and back; for quantised data the log-det
includes -D log L, so a density of h becomes a probability of the integer bins.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LogitPreprocess", "IdentityPreprocess", "check_alpha"]


def check_alpha(alpha: float) -> None:
    """The one check of the logit margin (LogitPreprocess and ModelConfig): s = alpha + (1 - 2 alpha) y needs 0 <= alpha < 1/2."""
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")


class LogitPreprocess(nn.Module):
    """x in {0..L-1}^D -> y = (x + u) / L -> s = a + (1 - 2a) y -> h = log s - log(1 - s).

    u ~ U[0, 1)^D when `dequantize`, else u = 1/2 (bin midpoint). The returned logdet is
    log|dh/dy| - D log L, so the flow's density of h becomes a probability of the bins.
    """

    def __init__(self, levels: int, alpha: float = 0.05, dequantize: bool = True) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        check_alpha(alpha)
        self.levels, self.alpha, self.dequantize = levels, alpha, dequantize

    def check(self, x: Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > self.levels - 1):
            raise ValueError(
                f"input must be quantisation levels in [0, {self.levels - 1}], got range "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}] (pass integer levels, not data scaled to [0, 1])"
            )
        if (x != torch.round(x)).any():
            raise ValueError(f"input must be integer levels 0..{self.levels - 1}; got non-integer values")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.rand_like(x) if self.dequantize else torch.full_like(x, 0.5)
        y = (x + u) / self.levels
        s = self.alpha + (1.0 - 2.0 * self.alpha) * y
        h = torch.log(s) - torch.log1p(-s)
        dim = x[0].numel()
        logdet = (math.log(1.0 - 2.0 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return h, logdet - dim * math.log(self.levels)

    def inverse(self, h: Tensor) -> Tensor:
        """Back to levels: the bin containing y, clamped to [0, L-1]."""
        y = (torch.sigmoid(h) - self.alpha) / (1.0 - 2.0 * self.alpha)
        return torch.clamp(torch.floor(y * self.levels), 0, self.levels - 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, alpha={self.alpha}, dequantize={self.dequantize}"


class IdentityPreprocess(nn.Module):
    """For continuous data (e.g. 2-D toys): h = x, log|det| = 0; densities are in nats."""

    levels = None

    def check(self, x: Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def inverse(self, h: Tensor) -> Tensor:
        return h
