"""Class-conditional Gaussian prior p(z|y) = N(z; mu_y, diag(sigma_y^2)), p(y) = pi_y.

One component per class over *all* latent dimensions. Densities come from
torch.distributions; only trained values are nn.Parameters (fixed ones are buffers).

Initialisation schemes (`init`):
- ``seed``:       mu ~ U[0, 1)^D, log sigma ~ U[0, 1)^D (the original student model)
(with learn_scales=False every scheme has sigma = 1, i.e. Sigma = I)
- ``zeros``:      mu = 0, sigma = 1
- ``separated``:  mu = r * randn(D), sigma = 1 (FlowGMM, Izmailov et al. 2020)
- ``orthogonal``: mu_k = (s / sqrt 2) q_k with orthonormal q_k, so ||mu_j - mu_k|| = s
                  exactly for j != k (IB-INN, Ardizzone et al. 2020), sigma = 1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, Normal

from .config import PriorConfig

__all__ = ["ClassConditionalGaussian", "init_means"]


def init_means(
    init: str, num_classes: int, dim: int, radius: float, separation: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(means, log_scales), both (K, D) float64, for an initialisation scheme."""
    shape = (num_classes, dim)
    log_scales = torch.zeros(shape, dtype=torch.float64)
    if init == "seed":
        means = torch.rand(shape, generator=generator, dtype=torch.float64)
        log_scales = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif init == "zeros":
        means = torch.zeros(shape, dtype=torch.float64)
    elif init == "separated":
        means = radius * torch.randn(shape, generator=generator, dtype=torch.float64)
    elif init == "orthogonal":
        if num_classes > dim:
            raise ValueError(f"orthogonal init needs num_classes <= dim, got K={num_classes} > D={dim}")
        q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=generator, dtype=torch.float64))
        means = (separation / math.sqrt(2.0)) * q.t()  # (K, D), orthonormal rows scaled
    else:
        raise ValueError(f"Unknown prior init {init!r}; use seed, zeros, separated or orthogonal")
    return means, log_scales


class ClassConditionalGaussian(nn.Module):
    """p(z|y) = N(z; mu_y, diag(exp(2 log_sigma_y))), one diagonal Gaussian per class."""

    def __init__(self, num_classes: int, dim: int, cfg: PriorConfig = PriorConfig(), class_counts: Tensor | None = None) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        self.num_classes, self.dim, self.cfg = num_classes, dim, cfg
        gen = torch.Generator().manual_seed(cfg.init_seed)
        means, log_scales = init_means(cfg.init, num_classes, dim, cfg.radius, cfg.separation, gen)
        dtype = torch.get_default_dtype()
        self._register("means", means.to(dtype), cfg.learn_means)
        if not cfg.learn_scales:
            log_scales = torch.zeros_like(log_scales)  # fixed scales mean Sigma = I, whatever the init scheme
        self._register("log_scales", log_scales.to(dtype), cfg.learn_scales)
        self.register_buffer("log_class_probs", self._log_class_probs(class_counts).to(dtype))

    def _register(self, name: str, value: Tensor, trainable: bool) -> None:
        if trainable:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _log_class_probs(self, class_counts: Tensor | None) -> Tensor:
        k = self.num_classes
        if self.cfg.class_prior == "uniform" or class_counts is None:
            return torch.full((k,), -math.log(k), dtype=torch.float64)
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.shape != (k,) or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError(f"class_counts must be {k} non-negative numbers with a positive sum, got {counts}")
        return torch.log(counts / counts.sum())

    # -- distributions ---------------------------------------------------------------
    def components(self) -> Independent:
        """Batch of K diagonal Gaussians, batch_shape (K,), event_shape (D,).

        No argument validation: shapes are checked by _check_z, and a non-finite latent (a diverging
        flow) must give a non-finite log-density for fit's NaN guard to skip, not a ValueError.
        """
        normal = Normal(self.means, torch.exp(self.log_scales), validate_args=False)
        return Independent(normal, 1, validate_args=False)

    def class_prior(self) -> Categorical:
        return Categorical(logits=self.log_class_probs)

    # -- densities -------------------------------------------------------------------
    def log_prob_all(self, z: Tensor) -> Tensor:
        """log p(z | k) for every class: (B, D) -> (B, K)."""
        self._check_z(z)
        return self.components().log_prob(z[:, None, :])

    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        """log p(z | y): (B, D), (B,) -> (B,)."""
        y = self.check_labels(y, z.shape[0])
        return self.log_prob_all(z).gather(1, y[:, None]).squeeze(1)

    def sample(self, y: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """z = mu_y + T * sigma_y * eps, eps ~ N(0, I): (B,) labels -> (B, D)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        y = self.check_labels(y, None)
        device = self.means.device if generator is None else generator.device
        eps = torch.randn(y.shape[0], self.dim, generator=generator, dtype=self.means.dtype, device=device)
        eps = eps.to(self.means.device)
        return self.means[y] + temperature * torch.exp(self.log_scales[y]) * eps

    # -- geometry ---------------------------------------------------------------------
    def mean_distances(self) -> Tensor:
        """(K, K) distances between class means in sigma units: Mahalanobis under the pair's average covariance.

        d_jk = sqrt(sum_i (mu_ji - mu_ki)^2 / ((sigma_ji^2 + sigma_ki^2) / 2)); with Sigma = I it is ||mu_j - mu_k||.
        """
        var = torch.exp(2 * self.log_scales)  # (K, D)
        avg = 0.5 * (var[:, None, :] + var[None, :, :])  # (K, K, D)
        return torch.sqrt(((self.means[:, None, :] - self.means[None, :, :]) ** 2 / avg).sum(-1))

    # -- validation -------------------------------------------------------------------
    def check_labels(self, y: Tensor, batch: int | None) -> Tensor:
        y = torch.as_tensor(y, device=self.means.device)
        if y.dim() != 1 or (batch is not None and y.shape[0] != batch):
            raise ValueError(f"labels must have shape ({batch if batch is not None else 'B'},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        return y.long()

    def _check_z(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"latents must have shape (B, {self.dim}), got {tuple(z.shape)}")
