"""Class-conditional Gaussian prior p(z|y) = N(z; mu_y, Sigma_y), p(y) = pi_y.

One component per class over *all* latent dimensions. Sigma_y is diagonal, diag(sigma_y^2)
(`covariance="diagonal"`, the default), or full, L_y L_y^T with a lower-triangular L_y whose
diagonal is exp(log_scales) (`covariance="full"`: per-class quadratic boundaries in latent space;
a flow with g = 0 is then the per-class full-covariance Gaussian). Densities come from
torch.distributions; only trained values are nn.Parameters (fixed ones are buffers).

Initialisation schemes (`init`):
- ``student``:    mu ~ U[0, 1)^D, log sigma ~ U[0, 1)^D (the original student model)
(with learn_scales=False every scheme but ``moments`` has sigma = 1, i.e. Sigma = I)
- ``zeros``:      mu = 0, sigma = 1
- ``separated``:  mu = r * randn(D), sigma = 1 (FlowGMM, Izmailov et al. 2020)
- ``orthogonal``: mu_k = (s / sqrt 2) q_k with orthonormal q_k, so ||mu_j - mu_k|| = s
                  exactly for j != k (IB-INN, Ardizzone et al. 2020), sigma = 1
- ``moments``:    data-dependent: `fit` sets mu_k and Sigma_k to the class mean and covariance
                  (+ moments_ridge I; diagonal: its diagonal) of the training latents under the
                  initial flow (`init_from_moments`), so training starts from the Gaussian fit
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MultivariateNormal, Normal

from .config import PriorConfig

__all__ = ["ClassConditionalGaussian", "init_means", "ClassMoments", "class_moments"]


@dataclass(frozen=True)
class ClassMoments:
    """Per-class sample means (K, D), unbiased covariances (K, D, D) and counts (K,), float64."""

    means: Tensor
    covs: Tensor
    counts: Tensor

    def log_class_probs(self) -> Tensor:
        """log p(k) = log of the class frequencies, (K,)."""
        return torch.log(self.counts / self.counts.sum())


def class_moments(batches: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> ClassMoments:
    """Mean and covariance of each class over all (h (N, D), y (N,)) batches, pooled as one data set.

    Streams the batches (dequantised copies of an image set need not fit in memory at once) with
    sums shifted by each class's first-batch mean, so S2 - S1 S1^T / n does not cancel catastrophically.
    """
    shift: list[Tensor | None] = [None] * num_classes
    s1: list[Tensor | None] = [None] * num_classes
    s2: list[Tensor | None] = [None] * num_classes
    n = torch.zeros(num_classes, dtype=torch.float64)
    for h, y in batches:
        h = h.double()
        for k in range(num_classes):
            hk = h[y == k]  # (n_k, D)
            if len(hk) == 0:
                continue
            if shift[k] is None:
                shift[k] = hk.mean(0)
                s1[k], s2[k] = torch.zeros_like(shift[k]), torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64)
            c = hk - shift[k]
            s1[k] += c.sum(0)
            s2[k] += c.T @ c
            n[k] += len(hk)
    missing = [k for k in range(num_classes) if n[k] < 2]
    if missing:
        raise ValueError(f"classes {missing} have fewer than 2 fit examples; a covariance needs at least 2")
    means = torch.stack([shift[k] + s1[k] / n[k] for k in range(num_classes)])
    covs = torch.stack([(s2[k] - torch.outer(s1[k], s1[k]) / n[k]) / (n[k] - 1) for k in range(num_classes)])
    return ClassMoments(means, covs, n)


def init_means(
    init: str, num_classes: int, dim: int, radius: float, separation: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(means, log_scales), both (K, D) float64, for an initialisation scheme."""
    shape = (num_classes, dim)
    log_scales = torch.zeros(shape, dtype=torch.float64)
    if init == "student":
        means = torch.rand(shape, generator=generator, dtype=torch.float64)
        log_scales = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif init in ("zeros", "moments"):  # moments: placeholders until init_from_moments
        means = torch.zeros(shape, dtype=torch.float64)
    elif init == "separated":
        means = radius * torch.randn(shape, generator=generator, dtype=torch.float64)
    elif init == "orthogonal":
        if num_classes > dim:
            raise ValueError(f"orthogonal init needs num_classes <= dim, got K={num_classes} > D={dim}")
        q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=generator, dtype=torch.float64))
        means = (separation / math.sqrt(2.0)) * q.t()  # (K, D), orthonormal rows scaled
    else:
        raise ValueError(f"Unknown prior init {init!r}; use student, zeros, separated, orthogonal or moments")
    return means, log_scales


class ClassConditionalGaussian(nn.Module):
    """p(z|y) = N(z; mu_y, Sigma_y), one Gaussian per class: diagonal, or full with covariance="full".

    Args:
        num_classes: K components, one per class.
        dim: D, the latent dimension (every latent dimension gets the class prior).
        cfg: init scheme, what is learned, covariance kind, p(y).
        class_counts: (K,) counts for the empirical p(y) (None: uniform).

    Example:
        >>> import torch
        >>> from mixflow_core import ClassConditionalGaussian, PriorConfig
        >>> prior = ClassConditionalGaussian(3, 4, PriorConfig(init="orthogonal", separation=5.0))
        >>> prior.mean_distances()  # in sigma units: every pair exactly 5 apart
        tensor([[0., 5., 5.],
                [5., 0., 5.],
                [5., 5., 0.]])
        >>> z = prior.sample(torch.tensor([0, 1, 2]), temperature=0.0)  # T = 0: the means themselves
        >>> prior.log_prob_all(z).argmax(1)  # (B, K) log N(z; mu_k, Sigma_k)
        tensor([0, 1, 2])
    """

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
        # diagonal: log sigma; full: log of L's diagonal
        self._register("log_scales", log_scales.to(dtype), cfg.learn_scales)
        if self.full:  # L's entries below the diagonal (those on and above it are not used)
            self._register("tril", torch.zeros(num_classes, dim, dim, dtype=dtype), cfg.learn_scales)
        if cfg.init == "moments":
            self.register_buffer("moments_initialized", torch.tensor(False))
        self.register_buffer("log_class_probs", self._log_class_probs(class_counts).to(dtype))

    @property
    def full(self) -> bool:
        return self.cfg.covariance == "full"

    @property
    def needs_data_init(self) -> bool:
        """init="moments" and init_from_moments has not run yet (fit runs it before the first epoch)."""
        return self.cfg.init == "moments" and not bool(self.moments_initialized)

    @torch.no_grad()
    def init_from_moments(self, means: Tensor, covs: Tensor) -> None:
        """mu_k = means[k], Sigma_k = covs[k] + moments_ridge I (diagonal: its diagonal); (K, D), (K, D, D).

        Sets buffers as well as parameters: with learn_means / learn_scales False the data fix them.
        """
        k, d = self.num_classes, self.dim
        if means.shape != (k, d) or covs.shape != (k, d, d):
            raise ValueError(f"need means ({k}, {d}) and covariances ({k}, {d}, {d}), got {tuple(means.shape)}, "
                             f"{tuple(covs.shape)}")
        cov = covs.double() + self.cfg.moments_ridge * torch.eye(d, dtype=torch.float64, device=covs.device)
        if not torch.isfinite(cov).all() or not torch.isfinite(means).all():
            raise ValueError("class moments are not finite: the initial flow maps some training data to inf/nan")
        if self.full:
            chol, info = torch.linalg.cholesky_ex(cov)
            if int(info.max()) > 0:
                raise ValueError("a class covariance is not positive definite; raise PriorConfig.moments_ridge")
            log_scales = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1))
        else:
            var = torch.diagonal(cov, dim1=-2, dim2=-1)
            if (var <= 0).any():
                raise ValueError("a latent variance is not positive; raise PriorConfig.moments_ridge")
            log_scales = 0.5 * torch.log(var)
        # checked: now change the prior, all or nothing
        self.means.copy_(means)
        self.log_scales.copy_(log_scales)
        if self.full:
            self.tril.copy_(chol)
        if self.cfg.init == "moments":
            self.moments_initialized.fill_(True)

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
    def scale_tril(self) -> Tensor:
        """(K, D, D) lower-triangular L_y with Sigma_y = L_y L_y^T (diagonal: diag(sigma_y))."""
        diag = torch.diag_embed(torch.exp(self.log_scales))
        return torch.tril(self.tril, -1) + diag if self.full else diag

    def covariances(self) -> Tensor:
        """(K, D, D) Sigma_y."""
        chol = self.scale_tril()
        return chol @ chol.transpose(-1, -2)

    def log_det_covariances(self) -> Tensor:
        """(K,) log det Sigma_y = 2 sum_i log L_ii (both covariance kinds)."""
        return 2.0 * self.log_scales.sum(-1)

    def components(self) -> Independent | MultivariateNormal:
        """Batch of K Gaussians, batch_shape (K,), event_shape (D,).

        No argument validation: shapes are checked by _check_z, and a non-finite latent (a diverging
        flow) must give a non-finite log-density for fit's NaN guard to skip, not a ValueError.
        """
        if self.full:
            return MultivariateNormal(self.means, scale_tril=self.scale_tril(), validate_args=False)
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
        """z = mu_y + T * L_y eps, eps ~ N(0, I) (diagonal: L_y eps = sigma_y * eps): (B,) labels -> (B, D)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        y = self.check_labels(y, None)
        device = self.means.device if generator is None else generator.device
        eps = torch.randn(y.shape[0], self.dim, generator=generator, dtype=self.means.dtype, device=device)
        eps = eps.to(self.means.device)
        if self.full:
            return self.means[y] + temperature * (self.scale_tril()[y] @ eps[:, :, None]).squeeze(-1)
        return self.means[y] + temperature * torch.exp(self.log_scales[y]) * eps

    def mahalanobis_sq(self, z: Tensor) -> Tensor:
        """(B, K) squared distance of each latent to each class mean in that class's units, (z - mu_k)^T Sigma_k^-1 (z - mu_k)."""
        self._check_z(z)
        diff = z[None, :, :] - self.means[:, None, :]  # (K, B, D)
        if self.full:
            white = torch.linalg.solve_triangular(self.scale_tril(), diff.transpose(1, 2), upper=False)  # (K, D, B)
            return (white**2).sum(1).T
        return ((diff / torch.exp(self.log_scales)[:, None, :]) ** 2).sum(-1).T

    # -- geometry ---------------------------------------------------------------------
    def pair_statistics(self) -> tuple[Tensor, Tensor]:
        """For every pair (j, k), S = (Sigma_j + Sigma_k) / 2: ((K, K) (mu_j - mu_k)^T S^-1 (mu_j - mu_k), (K, K) log det S)."""
        if not self.full:
            var = torch.exp(2 * self.log_scales)  # (K, D)
            avg = 0.5 * (var[:, None, :] + var[None, :, :])  # (K, K, D)
            return ((self.means[:, None, :] - self.means[None, :, :]) ** 2 / avg).sum(-1), torch.log(avg).sum(-1)
        cov, own = self.covariances(), self.log_det_covariances()
        k = self.num_classes
        d2 = [[self.means.new_zeros(()) for _ in range(k)] for _ in range(k)]
        logdet = [[own[i] if j == i else None for j in range(k)] for i in range(k)]
        for i in range(k):  # one pair at a time: memory D x D, not K x K x D x D
            for j in range(i + 1, k):
                chol = torch.linalg.cholesky(0.5 * (cov[i] + cov[j]))
                white = torch.linalg.solve_triangular(chol, (self.means[i] - self.means[j])[:, None], upper=False)
                d2[i][j] = d2[j][i] = (white**2).sum()
                logdet[i][j] = logdet[j][i] = 2.0 * torch.log(torch.diagonal(chol)).sum()
        return torch.stack([torch.stack(r) for r in d2]), torch.stack([torch.stack(r) for r in logdet])

    def mean_distances(self) -> Tensor:
        """(K, K) distances between class means in sigma units: Mahalanobis under the pair's average covariance.

        d_jk = sqrt((mu_j - mu_k)^T S^-1 (mu_j - mu_k)), S = (Sigma_j + Sigma_k) / 2; with Sigma = I it is
        ||mu_j - mu_k||.
        """
        return torch.sqrt(self.pair_statistics()[0])

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
