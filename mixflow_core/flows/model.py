"""MixtureFlow: x -> preprocess -> backbone f (i-ResNet or coupling flow) -> z, with a class-conditional Gaussian prior.

log p(x|y) = log N(f(h(x)); mu_y, sigma_y) + log|det J_f| + log|det J_h| - D log L,
where h is dequantisation + logit and L the number of quantisation levels, so that
log p(x|y) lower-bounds the log-probability of the *discrete* data (uniform
dequantisation) and bits/dim = -log p(x|y) / (D ln 2). This module is the only place
densities are assembled; objectives, classification and metrics call it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig, PriorConfig
from .coupling import build_coupling
from .iresnet import build_iresnet
from .layers import Flow
from .preprocess import IdentityPreprocess, LogitPreprocess
from .priors import ClassConditionalGaussian

__all__ = ["MixtureFlow", "build_model"]


class MixtureFlow(nn.Module):
    """Normalizing flow with a class-conditional Gaussian mixture prior.

    Generates (z ~ N(mu_y, T^2 sigma_y^2), x = f^{-1}(z)) and classifies by Bayes' rule
    (argmax_y log p(x|y) + log p(y)).

    From data to latent, three calls, named by what they return:
    - ``latent(x)`` -> z: the map alone (diagnostics, plots);
    - ``latent_and_logdet(x)`` -> (z, log|det dz/dx|): the map and its log-determinant;
    - ``log_prob_all(x)`` -> log p(x|k) for every class: the density, the only place it is assembled.
    (Each flow layer likewise has ``forward(x) -> (z, logdet)`` and ``transform(x) -> z``.)

    Example:
        >>> import torch
        >>> from mixflow_core import MLP, ModelConfig, build_model
        >>> model = build_model((4,), 3, 17, ModelConfig(arch=MLP(hidden=(8,), n_blocks=2))).eval()
        >>> x = torch.randint(0, 17, (5, 4))
        >>> model.log_prob_all(x).shape, model.latent(x).shape
        (torch.Size([5, 3]), torch.Size([5, 4]))
        >>> bool(torch.allclose(model.posterior(x).sum(1), torch.ones(5)))
        True
        >>> model.predict(x).shape, model.bits_per_dim(x, model.predict(x)).shape
        (torch.Size([5]), torch.Size([5]))
        >>> model.sample(2, n=6, temperature=0.7).shape  # 6 samples of class 2, integer levels
        torch.Size([6, 4])
    """

    def __init__(
        self,
        flow: Flow,
        prior: ClassConditionalGaussian,
        preprocess: LogitPreprocess | IdentityPreprocess,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.flow, self.prior, self.preprocess = flow, prior, preprocess
        self.data_shape = tuple(data_shape)
        self.latent_shape = flow.output_shape(self.data_shape)
        self.dim = math.prod(self.data_shape)
        if math.prod(self.latent_shape) != prior.dim:
            raise ValueError(f"prior dim {prior.dim} != latent size {math.prod(self.latent_shape)}")

    @property
    def num_classes(self) -> int:
        return self.prior.num_classes

    @property
    def exact_logdet(self) -> bool:
        """Whether log p(x|k) in eval mode uses an exact log-det (every layer's own answer), not an estimate."""
        return all(m.exact_logdet for m in self.flow.modules() if isinstance(m, Flow))

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(self.data_shape) + 1 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"input must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        self.preprocess.check(x)

    # -- the one place densities are assembled ------------------------------------------
    def latent_and_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (z flattened (B, D), log|det dz/dx| (B,) incl. preprocessing and -D log L)."""
        self._check_x(x)
        # the model's dtype: integer levels (e.g. uint8) must not truncate u to 0, and float32 data (toy2d)
        # must not meet float64 weights (only ActNorm's type promotion hid that)
        x = x.to(self.prior.means.dtype)
        h, logdet_pre = self.preprocess(x)
        z, logdet_flow = self.flow(h)
        return z.flatten(1), logdet_pre + logdet_flow

    def latent(self, x: Tensor) -> Tensor:
        """z = f(h(x)) flattened (B, D): latent_and_logdet(x)[0] without the log-determinant's cost."""
        self._check_x(x)
        h, _ = self.preprocess(x.to(self.prior.means.dtype))
        return self.flow.transform(h).flatten(1)

    def log_prob_all(self, x: Tensor) -> Tensor:
        """log p(x | k) for every class k: (B, ...) -> (B, K)."""
        z, logdet = self.latent_and_logdet(x)
        return self.prior.log_prob_all(z) + logdet[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """log p(x | k) for every class, (B, K); the call DistributedDataParallel wraps."""
        return self.log_prob_all(x)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """log p(x | y): (B,)."""
        y = self.prior.check_labels(y, x.shape[0])
        return self.log_prob_all(x).gather(1, y[:, None]).squeeze(1)

    def log_joint_all(self, x: Tensor) -> Tensor:
        """log p(x, k) = log p(x|k) + log p(k): (B, K)."""
        return self.log_prob_all(x) + self.prior.log_class_probs

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_k log p(x, k): (B,)."""
        return torch.logsumexp(self.log_joint_all(x), dim=1)

    def posterior(self, x: Tensor) -> Tensor:
        """p(y | x) by Bayes' rule: (B, K), rows sum to 1."""
        return torch.softmax(self.log_joint_all(x), dim=1)

    def predict(self, x: Tensor) -> Tensor:
        """argmax_y p(y | x): (B,) int64."""
        return self.log_joint_all(x).argmax(1)

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """-log2 p(x|y) / D (conditional) or -log2 p(x) / D (marginal, y None): (B,)."""
        log_p = self.marginal_log_prob(x) if y is None else self.log_prob(x, y)
        return -log_p / (self.dim * math.log(2.0))

    # -- generation -----------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Flattened latents (B, D) -> data (levels, or continuous values without quantisation)."""
        h = self.flow.inverse(z.reshape(z.shape[0], *self.latent_shape))
        return self.preprocess.inverse(h)

    @torch.no_grad()
    def sample(
        self,
        y: int | Tensor,
        n: int | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of class y: `y` an int with `n` samples, or a (B,) tensor of labels."""
        if isinstance(y, int):
            if n is None or n < 1:
                raise ValueError(f"sampling class {y} needs n >= 1 samples, got n={n}")
            y = torch.full((n,), y, dtype=torch.long, device=self.prior.means.device)
        elif n is not None and n != len(y):
            raise ValueError(f"n={n} disagrees with {len(y)} labels")
        return self.decode(self.prior.sample(y, temperature, generator))


def build_model(
    data_shape: tuple[int, ...],
    num_classes: int,
    levels: int | None,
    model_cfg: ModelConfig = ModelConfig(),
    prior_cfg: PriorConfig = PriorConfig(),
    class_counts: Tensor | None = None,
) -> MixtureFlow:
    """The mixture flow for data of per-sample shape `data_shape`: preprocessing, backbone, class Gaussians.

    Args:
        data_shape: per-sample shape, (D,) for ModelConfig(arch=MLP(...)) or CouplingMLP(...), (C, H, W) for
            Conv(...) or CouplingConv(...).
        num_classes: K, one Gaussian per class.
        levels: quantisation levels L of the data (17 for digits, 256 for images); None for
            continuous data (identity preprocessing, densities in nats).
        model_cfg: the backbone (architecture; the i-ResNet's Lipschitz bound and log-det estimators) and
            preprocessing.
        prior_cfg: the class-conditional Gaussians (init scheme, what is learned, covariance).
        class_counts: (K,) training counts for the empirical p(y); None: uniform.

    Returns:
        A MixtureFlow in training mode.

    Example:
        >>> from mixflow_core import Conv, ModelConfig, PriorConfig, build_model
        >>> model = build_model((1, 8, 8), 10, 256, ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2)),
        ...                     PriorConfig(init="orthogonal", separation=5.0))
        >>> model.latent_shape, model.dim, model.num_classes
        ((4, 4, 4), 64, 10)
    """
    build = build_iresnet if model_cfg.family == "iresnet" else build_coupling
    flow = build(tuple(data_shape), model_cfg)
    latent_dim = math.prod(flow.output_shape(tuple(data_shape)))
    prior = ClassConditionalGaussian(num_classes, latent_dim, prior_cfg, class_counts)
    preprocess = (
        IdentityPreprocess() if levels is None else LogitPreprocess(levels, model_cfg.alpha, model_cfg.dequantize)
    )
    return MixtureFlow(flow, prior, preprocess, tuple(data_shape))
