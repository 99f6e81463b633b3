"""Invertible layers with one signature: forward(x) -> (z, logdet), inverse(z) -> x, shared by both backbone families.

forward maps data to latent; logdet = log|det dz/dx| per sample, shape (B,). A backbone (the
i-ResNet in flows/iresnet/, the coupling flow in flows/coupling.py) is a Flow; the questions
that training and evaluation ask of it are the hooks below, so that neither imports a family:
- ``training_state()`` / ``load_training_state(state)``: what a training trajectory carries
  besides the state_dict (the i-ResNet's power-iteration vectors; nothing for a coupling flow);
- ``settle()`` and ``settled()``: bring derived state up to date with the weights (the i-ResNet
  converges its spectral norms, so Lip <= coeff holds exactly), for good or for a block;
- ``exact_logdet``: whether the layer's eval-mode log-det is exact (not a stochastic estimate);
- ``autocast_dtype`` on layers whose inner network may run in lower precision (training_precision).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Flow", "FlowSequence", "ActNorm", "Squeeze", "Whiten", "PRECISIONS", "training_precision"]


class Flow(nn.Module):
    """Base class: a bijection x -> z with a tractable log-determinant, and the backbone hooks (no-ops here)."""

    exact_logdet: bool = True  # eval-mode log-det exact; a layer with a stochastic estimator says False

    def training_state(self) -> dict[str, Tensor]:
        """State a training run carries beyond the state_dict, for an exact resume ({} for most flows)."""
        return {}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        """Put back what training_state() returned."""

    def settle(self) -> None:
        """Make derived state consistent with the weights as they are (before saving, evaluating, returning)."""

    @contextlib.contextmanager
    def settled(self) -> Iterator[None]:
        """Inside: settle(); after: the training state as before, so a training trajectory does not depend on whether
        it validated or saved in between."""
        saved = self.training_state()
        self.settle()
        try:
            yield
        finally:
            self.load_training_state(saved)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def transform(self, x: Tensor) -> Tensor:
        """z = f(x) alone, without the log-determinant (layers whose log-det is costly override this)."""
        return self.forward(x)[0]

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of z for a per-sample x of `input_shape` (identity by default)."""
        return tuple(input_shape)


class FlowSequence(Flow):
    """Composition f = f_n o ... o f_1; log|det| adds up. One cascade serves both directions."""

    def __init__(self, layers: Sequence[Flow]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def _cascade(x: Tensor, layers: Sequence[Flow], direction: str) -> tuple[Tensor, Tensor]:
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in layers:
            if direction == "forward":
                x, ld = layer(x)
                logdet = logdet + ld
            elif direction == "transform":
                x = layer.transform(x)
            else:
                x = layer.inverse(x)
        return x, logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._cascade(x, list(self.layers), "forward")

    def inverse(self, z: Tensor) -> Tensor:
        return self._cascade(z, list(self.layers)[::-1], "inverse")[0]

    def transform(self, x: Tensor) -> Tensor:
        return self._cascade(x, list(self.layers), "transform")[0]

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape


class ActNorm(Flow):
    """z = (x - b) * exp(-log_s) per channel (dim 1); data-dependent init gives unit variance.

    log|det| = -sum_c log_s_c * (number of positions per channel). On the first forward in
    training mode, b and log_s are set from the batch so that z has zero mean and unit
    variance per channel (Kingma & Dhariwal 2018); channels constant in that batch keep scale 1.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False  # host-side mirror of the buffer once read True: no device sync per step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # the loaded buffer decides again at the next training forward

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        per_channel = x.transpose(0, 1).reshape(self.num_channels, -1)  # (C, B * positions)
        std = per_channel.std(1)
        # a channel that is constant in the batch (e.g. a border pixel without dequantisation noise) is left
        # unscaled: dividing by its ~0 std would blow it up by 1/eps
        std = torch.where(std < 1e-3, torch.ones_like(std), std)
        self.bias.copy_(per_channel.mean(1))
        self.log_scale.copy_(torch.log(std))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"ActNorm expects (B, {self.num_channels}, ...), got {tuple(x.shape)}")
        if self.training and not self._seen_initialized:  # the buffer is read (a sync) until it is first seen True
            if not bool(self.initialized):
                self._init_from(x)
            self._seen_initialized = True
        z = (x - self._view(self.bias, x)) * torch.exp(-self._view(self.log_scale, x))
        positions = x[0, 0].numel()
        logdet = (-self.log_scale.sum() * positions).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        return z * torch.exp(self._view(self.log_scale, z)) + self._view(self.bias, z)


class Squeeze(Flow):
    """Invertible downsampling (C, H, W) -> (4C, H/2, W/2): each 2x2 block becomes 4 channels."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = self._check(x)
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, torch.zeros(b, dtype=x.dtype, device=x.device)

    def inverse(self, z: Tensor) -> Tensor:
        b, c4, h2, w2 = z.shape
        c = c4 // 4
        return z.reshape(b, c, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h2, 2 * w2)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = input_shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {input_shape}")
        return (4 * c, h // 2, w // 2)

    @staticmethod
    def _check(x: Tensor) -> tuple[int, int, int, int]:
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze expects (B, C, H, W) with even H, W; got {tuple(x.shape)}")
        return tuple(x.shape)  # type: ignore[return-value]


class Whiten(Flow):
    """z = W (x - m) over all C*H*W (or D) values of a sample, W = (S + ridge I)^(-1/2) (ZCA), fixed after init.

    m and S are the mean and covariance of the (preprocessed) training data, set once by
    `init_from` (`fit` does it before the ActNorm init); until then the layer is the identity.
    log|det| = -1/2 sum_i log(lambda_i + ridge) for the eigenvalues lambda_i of S, the same for
    every sample. It moves the residual blocks into coordinates where the data have unit
    covariance (a class Gaussian fit there is the per-class Gaussian baseline), meant to spare g's
    steps the very different scales of near-constant and varying pixels. On Fashion-MNIST it did
    not speed up learning in the measured runs (benchmarks/RESULTS.md), so it is off by default.
    """

    def __init__(self, shape: tuple[int, ...], ridge: float = 1e-3) -> None:
        super().__init__()
        if not ridge > 0:
            raise ValueError(f"the whitening ridge must be positive (S + ridge I must be invertible), got {ridge}")
        self.shape, self.ridge = tuple(shape), ridge
        d = math.prod(self.shape)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("matrix", torch.eye(d))  # W
        self.register_buffer("inverse_matrix", torch.eye(d))  # W^-1
        self.register_buffer("log_abs_det", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def needs_data_init(self) -> bool:
        return not bool(self.initialized)

    @torch.no_grad()
    def init_from(self, mean: Tensor, cov: Tensor) -> None:
        """m = mean (D,), W = (cov + ridge I)^(-1/2) from the (D, D) data covariance (eigh in float64)."""
        d = self.mean.numel()
        if mean.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"need a mean ({d},) and a covariance ({d}, {d}), got {tuple(mean.shape)}, {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("the data mean / covariance for the whitening is not finite")
        sym = 0.5 * (cov.double() + cov.double().T)
        lam, vec = torch.linalg.eigh(sym)
        lam = lam.clamp(min=0.0) + self.ridge  # a covariance is PSD; round-off below 0 must not flip a sign
        self.mean.copy_(mean)
        self.matrix.copy_((vec * lam.rsqrt()) @ vec.T)
        self.inverse_matrix.copy_((vec * lam.sqrt()) @ vec.T)
        self.log_abs_det.fill_(float(-0.5 * torch.log(lam).sum()))
        self.initialized.fill_(True)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Whiten was built for samples of shape {self.shape}, got {tuple(x.shape[1:])}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(x), self.log_abs_det.expand(x.shape[0]).to(x.dtype)

    def transform(self, x: Tensor) -> Tensor:
        self._check(x)
        return ((x.flatten(1) - self.mean) @ self.matrix.T).view(x.shape)

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z)
        return (z.flatten(1) @ self.inverse_matrix.T + self.mean).view(z.shape)


PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def training_precision(flow: nn.Module, precision: str) -> Iterator[None]:
    """Inside: the training steps of `flow` at `precision` (RuntimeConfig.precision); after: as before.

    - "fp32": full float32 (float64) arithmetic; on CUDA also TF32 off for matmuls and cuDNN
      convolutions (PyTorch's own default lets cuDNN use TF32).
    - "tf32": CUDA matmuls and convolutions in TF32 (no effect on CPU).
    - "bf16": tf32, and the inner network of every layer that has an ``autocast_dtype`` attribute
      (the i-ResNet's g, a coupling layer's conditioner) under bfloat16 autocast in training mode, its
      output cast back. Log-det sums, ActNorm, 1x1 convolutions and the prior stay in the model's
      dtype. Evaluation (eval mode) runs as built.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    tf32 = precision != "fp32"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    layers = [m for m in flow.modules() if hasattr(m, "autocast_dtype")]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    for layer in layers:
        layer.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        for layer in layers:
            layer.autocast_dtype = None
