"""Lipschitz-constrained layers: W_hat = W / max(1, sigma(W) / c), so Lip(layer) <= c.

sigma(W) is the operator norm (largest singular value) of the *linear map* the layer
applies, estimated from singular vectors that persist between training steps (Miyato et
al. 2018; Behrmann et al. 2019). Each training step refines them either by a small Krylov
(Lanczos) subspace warm-started from v (`krylov_steps`, the default: m products with W^T W,
Rayleigh-Ritz, no tolerance test) or by power iteration to a tolerance (`krylov_steps=None`).
For a convolution the map is the convolution operator on inputs of a fixed shape, applied
with conv2d / conv_transpose2d, not the reshaped kernel matrix (whose norm can be smaller
than the operator's by a factor up to k).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpectralLinear", "SpectralConv2d", "LipSwish", "operator_norm", "spectral_layers", "check_coeff",
           "check_krylov_steps", "KRYLOV_STEPS", "refresh_spectral_norms", "converge_spectral_norms", "converged_spectral_norms", "power_vectors",
           "load_power_vectors"]

CHECK_EVERY = 5  # power iterations between two convergence checks of a batched refresh (each check: one host sync)
KRYLOV_STEPS = 12  # products with W^T W per training step; measured in RESULTS.md "Spectral normalisation per step"


def _normalise(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v / (v.norm() + eps)


class _SpectralNormMixin(nn.Module):
    """Shared power-iteration logic; subclasses define _apply_W and _apply_WT on one vector."""

    coeff: float
    krylov_steps: int | None  # per training step: a Krylov subspace of this many W^T W products; None: power iteration
    n_power_iterations: int  # power iteration: at least this many per training step
    power_rtol: float | None  # ... then more until sigma changes by at most this fraction
    max_power_iterations: int  # ... but at most this many more
    u: Tensor  # left singular vector, shape of the output
    v: Tensor  # right singular vector, shape of the input
    external_refresh: bool = False  # True: an owner (IResNet) refreshes all its layers at once per training step

    def _init_spectral(self, layer: nn.Module, coeff: float, n_power_iterations: int, power_rtol: float | None,
                       max_power_iterations: int, krylov_steps: int | None) -> None:
        """The shared settings, and weight / bias taken from `layer` (PyTorch's default init)."""
        check_coeff(coeff)
        check_krylov_steps(krylov_steps)
        self.coeff, self.n_power_iterations, self.krylov_steps = coeff, n_power_iterations, krylov_steps
        self.power_rtol, self.max_power_iterations = power_rtol, max_power_iterations
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None

    def _apply_W(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_WT(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def power_iterate(self, n_iterations: int) -> None:
        """Refine the stored singular vectors of the raw weight in place."""
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(n_iterations):
            v = _normalise(self._apply_WT(u, w))
            u = _normalise(self._apply_W(v, w))
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def refresh(self) -> int:
        """One training step's update of (u, v): refresh_spectral_norms on this layer alone; returns the products
        with W^T W it ran (krylov_steps, or the power iterations: n_power_iterations, then more until sigma
        settles to power_rtol, at most max_power_iterations more).

        Why not one power iteration: a fixed small count falls behind in training (the top singular
        vector rotates away from the estimate and the operator norm overshoots coeff); the measurements
        are in benchmarks/RESULTS.md, "Spectral normalisation per step".
        """
        return refresh_spectral_norms([self])

    def converge(self, rtol: float = 1e-7, max_iterations: int = 2000) -> None:
        """This layer's (u, v) converged for W as it is now, so that W_hat = W / max(1, sigma / c) has operator norm
        <= c (the per-step refresh lags one optimiser step behind): converge_spectral_norms on this layer alone."""
        converge_spectral_norms(self, rtol, max_iterations)

    def sigma(self) -> Tensor:
        """sigma(W) ~= u^T W v, differentiable in W (u, v held constant)."""
        u, v = self.u.clone(), self.v.clone()  # clone: later in-place updates must not touch this graph
        return torch.sum(u * self._apply_W(v, self.weight))

    def normalised_weight(self) -> Tensor:
        """W / max(1, sigma/c); refreshes the power iteration in training steps only.

        A training step is training mode with grad enabled: fixed-point inversions and
        evaluations under no_grad see one fixed function.
        """
        if self.training and torch.is_grad_enabled() and self.n_power_iterations > 0 and not self.external_refresh:
            self.refresh()
        with torch.autocast(self.weight.device.type, enabled=False):  # sigma at full precision under autocast too
            factor = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / factor

    def extra_repr(self) -> str:
        if self.krylov_steps is not None:
            return f"coeff={self.coeff}, krylov_steps={self.krylov_steps}"
        return f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}, power_rtol={self.power_rtol}"


class SpectralLinear(_SpectralNormMixin):
    """Affine map x W_hat^T + b with ||W_hat||_2 <= coeff."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        bias: bool = True,
        power_rtol: float | None = 1e-4,
        max_power_iterations: int = 50,
        krylov_steps: int | None = KRYLOV_STEPS,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_spectral(nn.Linear(in_features, out_features, bias=bias), coeff, n_power_iterations, power_rtol,
                            max_power_iterations, krylov_steps)
        self.register_buffer("u", _normalise(torch.randn(out_features)))
        self.register_buffer("v", _normalise(torch.randn(in_features)))
        self.power_iterate(20)  # start from a converged estimate

    def _apply_W(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight @ v

    def _apply_WT(self, u: Tensor, weight: Tensor) -> Tensor:
        return weight.t() @ u

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalised_weight(), self.bias)


class SpectralConv2d(_SpectralNormMixin):
    """Convolution (stride 1, 'same' padding) whose operator norm on (C_in, H, W) inputs is <= coeff."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_hw: tuple[int, int],
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        bias: bool = True,
        power_rtol: float | None = 1e-4,
        max_power_iterations: int = 50,
        krylov_steps: int | None = KRYLOV_STEPS,
    ) -> None:
        super().__init__()
        check_coeff(coeff)  # before anything else: the message names the coefficient
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, kernel_size // 2
        self.input_hw = tuple(input_hw)
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=self.padding, bias=bias)
        self._init_spectral(layer, coeff, n_power_iterations, power_rtol, max_power_iterations, krylov_steps)
        h, w = self.input_hw
        self.register_buffer("u", _normalise(torch.randn(1, out_channels, h, w)))
        self.register_buffer("v", _normalise(torch.randn(1, in_channels, h, w)))
        self.power_iterate(50)

    def _apply_W(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, padding=self.padding)

    def _apply_WT(self, u: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(u, weight, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"SpectralConv2d was built for inputs of spatial size {self.input_hw}, got {tuple(x.shape[-2:])}"
            )
        return F.conv2d(x, self.normalised_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_hw={self.input_hw}, " + super().extra_repr()
        )


class LipSwish(nn.Module):
    """LipSwish(x) = x * sigmoid(beta x) / 1.1, beta = softplus(b) > 0; Lip <= 1 (Chen et al. 2019)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus^-1(1) -> beta = 1

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.raw_beta)
        return x * torch.sigmoid(beta * x) / 1.1


def check_coeff(coeff: float) -> None:
    """The one check of a Lipschitz coefficient (layers and ModelConfig): 0 < c < 1 keeps x + g(x) invertible."""
    if not 0.0 < coeff < 1.0:
        raise ValueError(f"coeff (the Lipschitz bound) must lie in (0, 1) for invertibility, got {coeff}")


def check_krylov_steps(krylov_steps: int | None) -> None:
    """The one check of krylov_steps (layers and ModelConfig): None, or at least 2 products (one is power iteration)."""
    if krylov_steps is not None and (isinstance(krylov_steps, bool) or not isinstance(krylov_steps, int)
                                     or krylov_steps < 2):
        raise ValueError(f"krylov_steps must be an integer >= 2 (or None for power iteration), got {krylov_steps!r}")


def spectral_layers(module: nn.Module) -> list[_SpectralNormMixin]:
    """All spectrally normalised layers inside `module`."""
    return [m for m in module.modules() if isinstance(m, _SpectralNormMixin)]


class _Group:
    """Spectral layers of one kind and shape, power-iterated as one batched operator.

    G linear layers: one bmm of the stacked (G, out, in) weights. G convolutions: one grouped
    convolution (groups=G) of the stacked kernels on the stacked vectors, and its transpose.
    Per member the arithmetic is that of the layer's own power_iterate.
    """

    def __init__(self, layers: list[_SpectralNormMixin]) -> None:
        self.layers = layers
        self.conv = isinstance(layers[0], SpectralConv2d)
        self.w = torch.stack([layer.weight.detach() for layer in layers])
        self.u = torch.cat([layer.u.reshape(1, *layer.u.shape[-3:]) if self.conv else layer.u[None] for layer in layers])
        self.v = torch.cat([layer.v.reshape(1, *layer.v.shape[-3:]) if self.conv else layer.v[None] for layer in layers])

    # linear members: row vectors times W^T / W, (G, 1, in) @ (G, in, out): 4-5x faster on CPU than bmm(W, column)
    def _apply_W(self, v: Tensor) -> Tensor:
        if not self.conv:
            return torch.matmul(v.unsqueeze(1), self.w.transpose(1, 2)).squeeze(1)
        g = len(self.layers)
        out = F.conv2d(v.reshape(1, -1, *v.shape[-2:]), self.w.flatten(0, 1), padding=self.layers[0].padding, groups=g)
        return out.reshape(g, -1, *out.shape[-2:])

    def _apply_WT(self, u: Tensor) -> Tensor:
        if not self.conv:
            return torch.matmul(u.unsqueeze(1), self.w).squeeze(1)
        g = len(self.layers)
        out = F.conv_transpose2d(u.reshape(1, -1, *u.shape[-2:]), self.w.flatten(0, 1), padding=self.layers[0].padding,
                                 groups=g)
        return out.reshape(g, -1, *out.shape[-2:])

    @staticmethod
    def _normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
        return x / (x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1)) + eps)

    def iterate(self) -> Tensor:
        """One power iteration of every member; returns each member's sigma = u^T W v for the new (u, v)."""
        self.v = self._normalise(self._apply_WT(self.u))
        wv = self._apply_W(self.v)
        self.u = self._normalise(wv)
        return (self.u * wv).flatten(1).sum(1)

    def sigma(self) -> Tensor:
        return (self.u * self._apply_W(self.v)).flatten(1).sum(1)

    def until_settled(self, rtol: float, max_iterations: int, check_every: int, sigma: Tensor | None = None) -> int:
        """Iterate until every member's sigma has changed by <= rtol (relative) at one iteration, checked (one host
        sync) every `check_every` iterations; members settled earlier keep iterating. Returns the iterations run."""
        sigma = self.sigma() if sigma is None else sigma
        done = torch.zeros_like(sigma, dtype=torch.bool)
        count = 0
        while count < max_iterations:
            for _ in range(min(check_every, max_iterations - count)):
                new = self.iterate()
                done |= (new - sigma).abs() <= rtol * new.abs()
                sigma, count = new, count + 1
            if bool(done.all()):
                break
        return count

    def krylov(self, steps: int) -> int:
        """Every member's (u, v) from a Krylov subspace of A = W^T W warm-started from its v (Lanczos with full
        re-orthogonalisation): q_0 = v, q_j = the part of A q_{j-1} orthogonal to q_0..q_{j-1}, normalised; then
        Rayleigh-Ritz: v = the top eigenvector of Q A Q^T mapped back, u = W v / ||W v||. The subspace holds the
        power iterates v, Av, ..., A^(m-1) v, so sigma = ||W v|| is at least what m - 1 power iterations from the same
        v reach, and at most sigma_max; with clustered top singular values it converges far faster. No value is read
        on the host (on CUDA, eigh may check its error flag). Returns the products run: min(steps, dim(v)).
        """
        g, shape = len(self.layers), self.v.shape
        v = self.v.flatten(1)
        m = min(steps, v.shape[1])  # at most dim(v) orthonormal directions
        basis, images = v.new_zeros(g, m, v.shape[1]), v.new_zeros(g, m, v.shape[1])
        q = v / (v.norm(dim=1, keepdim=True) + 1e-12)
        for j in range(m):
            basis[:, j] = q
            aq = self._apply_WT(self._apply_W(q.view(shape))).flatten(1)
            images[:, j] = aq
            if j + 1 == m:
                break
            span, w = basis[:, : j + 1], aq
            for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to float precision
                w = w - torch.matmul(torch.matmul(span, w.unsqueeze(2)).transpose(1, 2), span).squeeze(1)
            norm = w.norm(dim=1, keepdim=True)
            # a direction within rounding of the span (invariant subspace; v converged) adds nothing: leave it zero
            keep = norm > 1e-5 * aq.norm(dim=1, keepdim=True)
            q = torch.where(keep, w / norm.clamp_min(1e-30), torch.zeros_like(w))
        h = torch.matmul(basis, images.transpose(1, 2)).double()  # Q A Q^T, (G, m, m)
        _, vectors = torch.linalg.eigh((h + h.transpose(1, 2)) / 2)
        top = vectors[:, :, -1].to(v.dtype)
        v = torch.matmul(top.unsqueeze(1), basis).squeeze(1)
        self.v = self._normalise(v).view(shape)
        self.u = self._normalise(self._apply_W(self.v))
        return m

    def write_back(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.u.copy_(self.u[i].view_as(layer.u))
            layer.v.copy_(self.v[i].view_as(layer.v))


def _groups(layers: list[_SpectralNormMixin]) -> list[_Group]:
    """Layers that can share one batched power iteration: same kind, weight shape, input size, dtype, device and
    iteration settings."""
    keyed: dict[tuple, list[_SpectralNormMixin]] = {}
    for layer in layers:
        key = (type(layer), tuple(layer.weight.shape), getattr(layer, "input_hw", None), getattr(layer, "padding", None),
               layer.weight.dtype, layer.weight.device, layer.krylov_steps, layer.n_power_iterations, layer.power_rtol,
               layer.max_power_iterations)
        keyed.setdefault(key, []).append(layer)
    return [_Group(members) for members in keyed.values()]


@torch.no_grad()
def refresh_spectral_norms(layers: list[_SpectralNormMixin], check_every: int = CHECK_EVERY) -> int:
    """One training step's update of (u, v) for many spectral layers at once, batched over layers of equal shape;
    returns the most products with W^T W any group ran.

    Layers with krylov_steps: `_Group.krylov` (one Krylov subspace per member, no host sync).
    Otherwise power iteration: n_power_iterations, then more until sigma settles to power_rtol (at
    most max_power_iterations more), the convergence read on the host once every `check_every`
    iterations per group; a member may iterate a few times past its own tolerance.
    """
    most = 0
    for group in _groups(layers):
        first = group.layers[0]
        if first.krylov_steps is not None:
            ran = group.krylov(first.krylov_steps)  # capped at dim(v)
            group.write_back()
            most = max(most, ran)
            continue
        sigma = None
        for _ in range(first.n_power_iterations):
            sigma = group.iterate()
        count = first.n_power_iterations
        if first.power_rtol is not None and first.max_power_iterations > 0:
            count += group.until_settled(first.power_rtol, first.max_power_iterations, check_every, sigma)
        group.write_back()
        most = max(most, count)
    return most


@torch.no_grad()
def converge_spectral_norms(module: nn.Module, rtol: float = 1e-7, max_iterations: int = 2000) -> None:
    """Every spectral layer's (u, v) converged for its current weight, in place: Lip(layer) <= coeff holds exactly
    for the weights as they are (call it before saving or evaluating weights that a training step just changed).

    Linear layers: exact top singular vectors (one batched SVD per shape). Convolutions: power
    iteration until sigma changes by <= rtol, batched per shape as in refresh_spectral_norms.
    """
    for group in _groups(spectral_layers(module)):
        if group.conv:
            group.until_settled(rtol, max_iterations, check_every=10)
        else:
            u, _, vh = torch.linalg.svd(group.w, full_matrices=False)
            group.u, group.v = u[:, :, 0], vh[:, 0, :]
        group.write_back()


def power_vectors(module: nn.Module) -> dict[str, Tensor]:
    """{state_dict name: copy} of every spectral layer's power-iteration vectors u and v."""
    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _SpectralNormMixin):
            prefix = f"{name}." if name else ""
            out[f"{prefix}u"], out[f"{prefix}v"] = layer.u.detach().clone(), layer.v.detach().clone()
    return out


@torch.no_grad()
def load_power_vectors(module: nn.Module, vectors: dict[str, Tensor]) -> None:
    """Put back vectors taken by power_vectors (e.g. a training run's warm start after an evaluation)."""
    buffers = dict(module.named_buffers())
    missing = [name for name in power_vectors(module) if name not in vectors]
    if missing:
        raise ValueError(f"no saved power-iteration vectors for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for name, value in vectors.items():
        buffers[name].copy_(value)


@contextlib.contextmanager
def converged_spectral_norms(module: nn.Module) -> Iterator[None]:
    """Inside: converge_spectral_norms(module); after: every (u, v) as before, so a training run's warm-started power
    iteration (and its trajectory) is the same whether or not it validated or saved in between."""
    saved = power_vectors(module)
    converge_spectral_norms(module)
    try:
        yield
    finally:
        load_power_vectors(module, saved)


@torch.no_grad()
def operator_norm(layer: _SpectralNormMixin, n_iterations: int = 500, seed: int = 0) -> float:
    """Operator norm of the layer's *normalised* linear map, by a fresh, long power iteration.

    Independent of the layer's stored vectors, so it checks the constraint rather than
    repeating the estimate the layer used.
    """
    was_training = layer.training
    layer.eval()  # no in-place refresh while we read the weight
    w = layer.normalised_weight()
    layer.train(was_training)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = _normalise(torch.randn(layer.v.shape, generator=g, dtype=w.dtype).to(w.device))
    for _ in range(n_iterations):
        u = _normalise(layer._apply_W(v, w))
        v = _normalise(layer._apply_WT(u, w))
    return float(layer._apply_W(v, w).norm())
