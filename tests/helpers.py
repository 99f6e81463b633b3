"""Helpers shared by several test modules: exact reference log-dets, small Lipschitz g's, a free port.

Import as ``from tests.helpers import ...`` (tests/ is a package; pytest puts the repository root on sys.path).

Reference log-dets are computed per sample: the full (D, D) Jacobian of one flattened sample by
torch.func.jacrev, then torch.linalg.slogdet. Both return shape (B,) for a batch x of shape (B, *shape).

- ``exact_flow_logdet(flow, x)``: log|det dz/dx| for a flow whose forward returns (z, logdet).
- ``exact_residual_logdet(g, x)``: log det(I + J_g) for a residual map x + g(x); asserts the sign is
  positive (Lip(g) < 1 keeps I + J_g orientation preserving).

Modules: ``mlp_g`` and ``conv_g`` build small spectrally normalised g's (Lip(g) < 1) in eval mode;
``off_centre_data`` and ``initialised_eval`` give data and a flow whose ActNorms are initialised from it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mixflow_core.flows.iresnet.lipschitz import LipSwish, SpectralConv2d, SpectralLinear

__all__ = [
    "exact_flow_logdet", "exact_residual_logdet", "mlp_g", "conv_g", "off_centre_data", "initialised_eval", "free_port",
]


def _per_sample_jacobians(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """(B, D, D): row b is the Jacobian of fn, applied to sample b alone (a batch of one), flattened."""
    shape, d = x.shape[1:], x[0].numel()

    def f(v: Tensor) -> Tensor:
        return fn(v.reshape(1, *shape)).reshape(-1)

    jacs = []
    for xi in x:
        jac = torch.func.jacrev(f)(xi.reshape(-1).detach())
        assert jac.shape == (d, d), f"fn must map {d} inputs to {d} outputs per sample, Jacobian is {tuple(jac.shape)}"
        jacs.append(jac.detach())
    return torch.stack(jacs)


def exact_flow_logdet(flow: nn.Module, x: Tensor) -> Tensor:
    """(B,) log|det dz/dx| per sample, z = flow(x)[0], from the full Jacobian of each sample."""
    return torch.linalg.slogdet(_per_sample_jacobians(lambda v: flow(v)[0], x)).logabsdet


def exact_residual_logdet(g: nn.Module, x: Tensor) -> Tensor:
    """(B,) log det(I + J_g) per sample, J_g the Jacobian of g on that single sample; asserts det > 0."""
    jac = _per_sample_jacobians(g, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    sign, logabsdet = torch.linalg.slogdet(eye + jac)
    assert bool((sign > 0).all())  # ||J_g|| < 1 keeps I + J_g orientation preserving
    return logabsdet


def mlp_g(dim: int, hidden: int = 8, coeff: float = 0.9) -> nn.Module:
    """g = SpectralLinear(dim, hidden) -> LipSwish -> SpectralLinear(hidden, dim), Lip(g) <= coeff^2, in eval mode.

    Eval mode: no power-iteration refresh, so every call sees the same function.
    """
    g = nn.Sequential(SpectralLinear(dim, hidden, coeff), LipSwish(), SpectralLinear(hidden, dim, coeff))
    return g.eval()


def conv_g(channels: int = 1, hidden: int = 3, input_hw: tuple[int, int] = (4, 4), coeff: float = 0.9) -> nn.Module:
    """g = SpectralConv2d 3x3 (channels -> hidden) -> LipSwish -> SpectralConv2d 3x3 (hidden -> channels), eval mode."""
    g = nn.Sequential(
        SpectralConv2d(channels, hidden, 3, input_hw, coeff=coeff),
        LipSwish(),
        SpectralConv2d(hidden, channels, 3, input_hw, coeff=coeff),
    )
    return g.eval()


def off_centre_data(shape: tuple[int, ...], batch: int = 8) -> Tensor:
    """(batch, *shape): off-centre, unevenly scaled per channel (dim 0 of shape), so ActNorm's init is not the identity."""
    scale = torch.linspace(0.5, 3.0, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    return 1.5 + scale * torch.randn(batch, *shape)


def initialised_eval(flow: nn.Module, x: Tensor) -> nn.Module:
    """One training-mode forward (ActNorm data init), then eval mode: a fixed function."""
    flow.train()
    flow(x)
    return flow.eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def float64_one_thread() -> Iterator[None]:
    """What the autouse conftest fixture does per test, for module-scoped fixtures (built before it runs)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
