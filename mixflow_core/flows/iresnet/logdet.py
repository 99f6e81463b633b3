"""Estimators of log|det(I + J_g(x))| for residual blocks f(x) = x + g(x), Lip(g) < 1.

Each estimator is a small frozen dataclass called as ``estimator(g, x) -> (g(x), logdet)``,
logdet of shape (B,). They keep no state; randomness comes from ``generator`` (or torch's
global RNG when it is None).

With Lip(g) < 1, log det(I + J) = tr log(I + J) = sum_{k>=1} (-1)^{k+1} tr(J^k) / k, and
tr(J^k) = E_v[v^T J^k v] for probes with E[v v^T] = I (Hutchinson). v^T J^k is k
vector-Jacobian products.

Example (a linear g, whose Jacobian is its normalised weight W):
    >>> import torch
    >>> from mixflow_core import Exact, PowerSeries, RussianRoulette, SpectralLinear
    >>> _ = torch.manual_seed(0)
    >>> g, x = SpectralLinear(3, 3, coeff=0.5).eval(), torch.randn(4, 3)
    >>> gx, exact = Exact()(g, x)  # (B,) per-sample log|det(I + J_g(x))|
    >>> bool(torch.allclose(exact, torch.linalg.slogdet(torch.eye(3) + g.normalised_weight()).logabsdet))
    True
    >>> _, series = PowerSeries(n_terms=10, n_probes=200)(g, x)  # Hutchinson: close, not exact
    >>> _, unbiased = RussianRoulette(n_exact_terms=2, n_probes=200, generator=torch.Generator().manual_seed(0))(g, x)
    >>> bool((series - exact).abs().max() < 0.2), bool((unbiased - exact).abs().max() < 0.2)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = ["Exact", "PowerSeries", "RussianRoulette", "LogDetEstimator", "Estimator"]

LogDetEstimator = Callable[[Callable[[Tensor], Tensor], Tensor], tuple[Tensor, Tensor]]


def _with_input_graph(g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Evaluate g(x) with a graph back to x, even under no_grad; returns (x, g(x), keep_graph)."""
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        gx = g(x)
    return x, gx, keep_graph


def _finish(gx: Tensor, logdet: Tensor, keep_graph: bool) -> tuple[Tensor, Tensor]:
    if keep_graph:
        return gx, logdet
    return gx.detach(), logdet.detach()


def _probe(x: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    device = x.device if generator is None else generator.device  # draw where the generator lives
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    if kind == "rademacher":
        v = torch.sign(v)
        v[v == 0] = 1.0
    return v


def _batch_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)  # (B,)


def _series(
    x: Tensor,
    gx: Tensor,
    v: Tensor,
    n_terms: int,
    weights: Callable[[int], float],
    create_graph: bool,
    neumann_gradient: bool = False,
) -> Tensor:
    """sum_{k=1}^{n} (-1)^{k+1} w(k) v^T J^k v / k, with v^T J^k built by repeated VJPs.

    With `neumann_gradient`, the series is evaluated without a graph and the gradient comes
    from a surrogate u^T J v, u = sum_{k=1}^{n} (-1)^{k+1} w(k) (J^T)^{k-1} v (detached):
    d log det(I + J) = tr((I + J)^{-1} dJ) = sum_k (-1)^{k+1} tr(J^{k-1} dJ), so memory no
    longer grows with n (Chen et al. 2019, sec. 3.2). Same expectation, one double-backward.
    """
    graph_in_loop = create_graph and not neumann_gradient
    w = v
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    u = torch.zeros_like(v)
    for k in range(1, n_terms + 1):
        sign = 1.0 if k % 2 == 1 else -1.0
        u = u + sign * weights(k) * w.detach()  # (J^T)^{k-1} v term of the gradient series
        (w,) = torch.autograd.grad(gx, x, w, create_graph=graph_in_loop, retain_graph=True)
        total = total + sign * weights(k) / k * _batch_dot(w, v)
    if not (create_graph and neumann_gradient):
        return total
    (ju,) = torch.autograd.grad(gx, x, u, create_graph=True, retain_graph=True)  # u^T J, differentiable
    surrogate = _batch_dot(ju, v)
    return total.detach() + surrogate - surrogate.detach()


@dataclass(frozen=True)
class Exact:
    """log|det(I + J_g(x))| from the full per-sample Jacobian: D backward passes, for small D only."""

    kind: ClassVar[str] = "exact"  # the tag of this estimator in a config's JSON
    max_dim: int = 4096  # refuse absurd sizes instead of exhausting memory

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        x, gx, keep_graph = _with_input_graph(g, x)
        batch, dim = x.shape[0], x[0].numel()
        if dim > self.max_dim:
            raise ValueError(f"Exact log-det refuses D={dim} > max_dim={self.max_dim}; use PowerSeries")
        eye = torch.eye(dim, dtype=x.dtype, device=x.device)
        grad_out = eye[:, None, :].expand(dim, batch, dim).reshape(dim, *gx.shape)
        with torch.enable_grad():
            (rows,) = torch.autograd.grad(
                gx, x, grad_out, create_graph=keep_graph, retain_graph=True, is_grads_batched=True
            )  # (D, B, ...): rows[i, b] = d g_i(x_b) / d x_b
        jac = rows.reshape(dim, batch, dim).transpose(0, 1)  # (B, D, D)
        logdet = torch.linalg.slogdet(jac + eye).logabsdet
        return _finish(gx, logdet, keep_graph)


@dataclass(frozen=True)
class PowerSeries:
    """Truncated series sum_{k<=n} (-1)^{k+1} tr(J^k)/k with Hutchinson probes (i-ResNet).

    Biased: truncation error ~ Lip^(n+1)/(n+1) per dimension; n >= 5 keeps it small.
    """

    kind: ClassVar[str] = "power_series"
    n_terms: int = 5
    n_probes: int = 1
    probe: Literal["gaussian", "rademacher"] = "gaussian"
    neumann_gradient: bool = False  # memory-saving gradient (see _series)
    generator: torch.Generator | None = field(default=None, compare=False, metadata={"config": False})  # not saved

    def __post_init__(self) -> None:
        if self.n_terms < 1 or self.n_probes < 1:
            raise ValueError(f"PowerSeries needs n_terms >= 1 and n_probes >= 1, got {self}")

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        x, gx, keep_graph = _with_input_graph(g, x)
        with torch.enable_grad():
            estimates = [
                _series(
                    x, gx, _probe(x, self.probe, self.generator), self.n_terms, lambda k: 1.0, keep_graph,
                    self.neumann_gradient,
                )
                for _ in range(self.n_probes)
            ]
        return _finish(gx, torch.stack(estimates).mean(0), keep_graph)


@dataclass(frozen=True)
class RussianRoulette:
    """Unbiased series estimator (Residual Flows, Chen et al. 2019).

    Always computes `n_exact_terms` terms, then N ~ Geometric(p) more (P(N >= m) = (1-p)^m,
    shared across the batch); term k > n_exact is reweighted by 1 / P(N >= k - n_exact), so
    the expectation over N equals the infinite series.
    """

    kind: ClassVar[str] = "russian_roulette"
    n_exact_terms: int = 2
    p: float = 0.5
    n_probes: int = 1
    max_terms: int = 100  # safety cap; the chance of reaching it is (1-p)^(max_terms - n_exact)
    probe: Literal["gaussian", "rademacher"] = "gaussian"
    neumann_gradient: bool = False  # memory-saving gradient (see _series)
    generator: torch.Generator | None = field(default=None, compare=False, metadata={"config": False})  # not saved

    def __post_init__(self) -> None:
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"RussianRoulette needs 0 < p < 1, got {self.p}")
        if self.n_exact_terms < 1 or self.n_probes < 1 or self.max_terms < self.n_exact_terms:
            raise ValueError(f"RussianRoulette needs n_exact_terms >= 1, n_probes >= 1 and max_terms >= n_exact_terms, "
                             f"got {self}")

    def sample_extra_terms(self) -> int:
        """N ~ Geometric(p) on {0, 1, ...} by inversion: N = floor(log U / log(1 - p))."""
        u = torch.rand((), generator=self.generator, dtype=torch.float64)
        n = int(torch.floor(torch.log(u) / torch.log1p(torch.tensor(-self.p, dtype=torch.float64))))
        return min(n, self.max_terms - self.n_exact_terms)

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        x, gx, keep_graph = _with_input_graph(g, x)
        n_terms = self.n_exact_terms + self.sample_extra_terms()
        q = 1.0 - self.p

        def weight(k: int) -> float:
            return 1.0 if k <= self.n_exact_terms else q ** -(k - self.n_exact_terms)

        with torch.enable_grad():
            estimates = [
                _series(x, gx, _probe(x, self.probe, self.generator), n_terms, weight, keep_graph, self.neumann_gradient)
                for _ in range(self.n_probes)
            ]
        return _finish(gx, torch.stack(estimates).mean(0), keep_graph)


Estimator = PowerSeries | RussianRoulette | Exact  # the estimators a ModelConfig can hold
