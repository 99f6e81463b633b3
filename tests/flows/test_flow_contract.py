"""The Flow contract, checked on a small instance of every concrete Flow subclass in mixflow_core.flows.

forward(x) -> (z, logdet (B,)), inverse(z) -> x, transform(x) -> z, output_shape(per-sample shape):
(a) inverse(forward(x)[0]) = x; (b) logdet = log|det dz/dx| per sample, from the full jacrev Jacobian;
(c) each sample's z and logdet do not depend on the rest of the batch (eval mode); (d) the module's
dtype carries through (float32 and float64, whatever the default dtype), transform(x) = forward(x)[0],
and output_shape(shape) is z's per-sample shape. A Flow subclass without a case here fails
test_every_flow_subclass_has_a_contract_case.
"""

from __future__ import annotations

import copy
import math
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import mixflow_core.flows
from mixflow_core.flows.config import CouplingConv, CouplingMLP, ModelConfig
from mixflow_core.flows.coupling import AffineCoupling, FactorOut, InvertibleLinear, build_coupling
from mixflow_core.flows.iresnet import IResNet, ResidualBlock
from mixflow_core.flows.layers import ActNorm, Flow, FlowSequence, Squeeze, Whiten
from mixflow_core.flows.iresnet.logdet import Exact, PowerSeries
from tests.helpers import conv_g, exact_flow_logdet, initialised_eval, mlp_g, off_centre_data

EXACT_ATOL = 1e-12  # layers whose inverse is closed form
RESIDUAL_ATOL = 1e-6  # fixed-point inverses (run to tol 1e-10)


def _block(g: torch.nn.Module, estimator=None) -> ResidualBlock:
    return ResidualBlock(g, estimator or Exact(), inverse_tol=1e-10, inverse_max_iter=500)


def _whiten(shape: tuple[int, ...]) -> Whiten:
    """A Whiten initialised from a random, correlated covariance (a non-trivial W, not the identity)."""
    d = math.prod(shape)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = Whiten(shape, ridge=1e-3).double()
    w.init_from(torch.randn(d, generator=g, dtype=torch.float64), a @ a.T / d)
    return w


def _perturbed(flow: Flow, scale: float = 0.3) -> Flow:
    """Every parameter moved by seeded noise: a coupling net's zero-initialised last layer (and a fresh 1x1
    convolution's rotation) would make the checks below trivial."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def _coupling_net(c_in: int, c_out: int, image: bool) -> torch.nn.Module:
    if image:
        return torch.nn.Sequential(torch.nn.Conv2d(c_in, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, c_out, 3, padding=1))
    return torch.nn.Sequential(torch.nn.Linear(c_in, 5), torch.nn.Tanh(), torch.nn.Linear(5, c_out))


def _coupling(c: int, image: bool) -> AffineCoupling:
    return _perturbed(AffineCoupling(_coupling_net(c // 2, 2 * (c - c // 2), image), c))


def _built(arch) -> Flow:
    return _perturbed(build_coupling((4,) if isinstance(arch, CouplingMLP) else (2, 8, 8), ModelConfig(arch=arch)), 0.1)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], Flow]  # a fresh, uninitialised instance
    shape: tuple[int, ...]  # per-sample input shape
    inverse_atol: float
    exact_logdet: bool = True  # False: a stochastic estimator, so (b) and the logdet half of (c) do not apply
    zero_logdet: bool = False  # volume preserving: logdet is exactly 0


CASES = [
    Case("actnorm_vector", lambda: ActNorm(4), (4,), EXACT_ATOL),
    Case("actnorm_image", lambda: ActNorm(2), (2, 4, 4), EXACT_ATOL),
    Case("squeeze", lambda: Squeeze(), (2, 4, 4), EXACT_ATOL, zero_logdet=True),
    Case("whiten_vector", lambda: _whiten((4,)), (4,), 1e-9),
    Case("whiten_image", lambda: _whiten((2, 4, 4)), (2, 4, 4), 1e-9),
    Case("residual_mlp_exact", lambda: _block(mlp_g(4)), (4,), RESIDUAL_ATOL),
    Case("residual_conv_exact", lambda: _block(conv_g(2, 4, (4, 4))), (2, 4, 4), RESIDUAL_ATOL),
    Case(
        "residual_mlp_power_series", lambda: _block(mlp_g(4), PowerSeries(n_terms=5, n_probes=2)), (4,),
        RESIDUAL_ATOL, exact_logdet=False,
    ),
    Case(
        "flow_sequence_mlp", lambda: FlowSequence([ActNorm(4), _block(mlp_g(4)), ActNorm(4), _block(mlp_g(4))]),
        (4,), RESIDUAL_ATOL,
    ),
    Case(
        "flow_sequence_image",
        lambda: FlowSequence([ActNorm(2), _block(conv_g(2, 4, (4, 4))), Squeeze(), ActNorm(8)]),
        (2, 4, 4), RESIDUAL_ATOL,
    ),
    Case(
        "iresnet_image",  # the builders' FlowSequence whose training forward refreshes its spectral layers batched
        lambda: IResNet([ActNorm(2), _block(conv_g(2, 4, (4, 4))), ActNorm(2), _block(conv_g(2, 4, (4, 4)))]),
        (2, 4, 4), RESIDUAL_ATOL,
    ),
    Case("invertible_linear_vector", lambda: _perturbed(InvertibleLinear(4)), (4,), 1e-10),
    Case("invertible_linear_image", lambda: _perturbed(InvertibleLinear(3)), (3, 4, 4), 1e-10),
    Case("affine_coupling_vector", lambda: _coupling(5, image=False), (5,), 1e-10),  # odd: a 2 / 3 split
    Case("affine_coupling_image", lambda: _coupling(4, image=True), (4, 4, 4), 1e-10),
    Case("factor_out", lambda: FactorOut(2, FlowSequence([Squeeze(), ActNorm(8), _coupling(8, image=True)]), (4, 4, 4)),
         (4, 4, 4), 1e-10),
    Case("coupling_mlp_flow", lambda: _built(CouplingMLP(hidden=(6,), n_steps=3)), (4,), 1e-10),
    Case("coupling_conv_flow", lambda: _built(CouplingConv(channels=4, n_steps=2, n_scales=2)), (2, 8, 8), 1e-10),
    Case("coupling_conv_factor_out_flow",
         lambda: _built(CouplingConv(channels=4, n_steps=1, n_scales=2, factor_out=True)), (2, 8, 8), 1e-10),
]
EXACT_CASES = [c for c in CASES if c.exact_logdet]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def _prepared(case: Case, batch: int = 6) -> tuple[Flow, torch.Tensor]:
    """A fresh flow with its ActNorms initialised from off-centre data (non-trivial parameters), in eval mode."""
    x = off_centre_data(case.shape, batch)
    flow = initialised_eval(case.build(), x)
    assert all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))
    return flow, x


def _flow_subclasses(cls: type) -> set[type]:
    subs = set(cls.__subclasses__())
    for sub in list(subs):
        subs |= _flow_subclasses(sub)
    return subs


def test_every_flow_subclass_has_a_contract_case():
    # import every module of mixflow_core.flows, so a subclass in a module __init__ does not import is seen too
    for info in pkgutil.walk_packages(mixflow_core.flows.__path__, mixflow_core.flows.__name__ + "."):
        importlib.import_module(info.name)
    defined = {c for c in _flow_subclasses(Flow) if c.__module__.startswith(mixflow_core.flows.__name__ + ".")}
    covered = {type(case.build()) for case in CASES}
    assert {ActNorm, Squeeze, FlowSequence, ResidualBlock} <= defined  # the walk does find them
    missing = sorted(c.__qualname__ for c in defined - covered)
    assert not missing, f"Flow subclasses without a contract case: {missing}"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_inverse_undoes_forward(case):
    flow, x = _prepared(case)
    with torch.no_grad():
        z, _ = flow(x)
        x_back = flow.inverse(z)
    assert x_back.shape == x.shape
    assert torch.allclose(x_back, x, atol=case.inverse_atol, rtol=0)


@pytest.mark.parametrize("case", EXACT_CASES, ids=_ids(EXACT_CASES))
def test_logdet_is_log_abs_det_jacobian(case):
    flow, x = _prepared(case)
    x = x[:3]
    logdet = flow(x)[1].detach()
    assert logdet.shape == (3,)
    reference = exact_flow_logdet(flow, x)
    assert torch.allclose(logdet, reference, atol=1e-9, rtol=0)
    if case.zero_logdet:
        assert torch.equal(logdet, torch.zeros(3))
    else:
        assert float(reference.abs().max()) > 1e-3  # the parameters make the check non-trivial


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_samples_are_independent_of_the_batch(case):
    flow, x = _prepared(case)
    with torch.no_grad():
        z, logdet = flow(x)
        for i in range(x.shape[0]):
            zi, logdet_i = flow(x[i : i + 1])
            assert torch.allclose(zi[0], z[i], atol=1e-12, rtol=0)
            if case.exact_logdet:
                assert torch.allclose(logdet_i[0], logdet[i], atol=1e-10, rtol=0)
            else:  # a stochastic estimate draws its own probes per call: only its shape is the contract
                assert logdet_i.shape == (1,) and torch.isfinite(logdet_i).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_dtype_transform_and_output_shape(case, dtype):
    flow, x = _prepared(case)
    flow, x = copy.deepcopy(flow).to(dtype), x.to(dtype)
    for block in (m for m in flow.modules() if isinstance(m, ResidualBlock)):
        block.inverse_tol = 1e-10 if dtype == torch.float64 else 1e-5  # float32 cannot resolve 1e-10
    # the other default dtype: a tensor created without an explicit dtype would show up as a mismatch
    torch.set_default_dtype(torch.float64 if dtype == torch.float32 else torch.float32)
    with torch.no_grad():
        z, logdet = flow(x)
        transformed = flow.transform(x)
        x_back = flow.inverse(z)
    assert z.dtype == dtype and logdet.dtype == dtype and transformed.dtype == dtype and x_back.dtype == dtype
    assert logdet.shape == (x.shape[0],)
    assert torch.equal(transformed, z)
    assert tuple(flow.output_shape(case.shape)) == tuple(z.shape[1:])
    atol = case.inverse_atol if dtype == torch.float64 else 1e-4
    assert torch.allclose(x_back, x, atol=atol, rtol=0)
