"""benchmarks/throughput_peers.py compares like with like: the peer models it builds have the parameter counts its
docstring states, normflows' model computes our function once our weights are copied in (so the two are the same
architecture), FrEIA's Glow-style model too where its coupling's shift convention allows, every peer is invertible,
and a fresh peer gives finite log-densities of the size ours gives on the same batch.

The peers (normflows, FrEIA, zuko) are benchmark-only dependencies that CI does not install: each test skips, saying
which, when its peer is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput_peers.py"
PEERS = {"normflows": "normflows", "FrEIA Glow-style": "FrEIA", "FrEIA AllInOneBlock": "FrEIA", "zuko": "zuko"}
CASE_PEERS = {"images": ("normflows", "FrEIA Glow-style", "FrEIA AllInOneBlock"), "digits": ("normflows", "zuko")}
PAIRS = [(case, peer) for case, peers in CASE_PEERS.items() for peer in peers]
pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated")  # normflows 1.7.3's Invertible1x1Conv


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("throughput_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput_peers"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("throughput_peers", None)


def _need(peer: str) -> None:
    module = PEERS[peer]
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed (a benchmark-only dependency: .venv/bin/pip install normflows==1.7.3 "
                    "FrEIA==0.2 zuko)")


def _peer_flow(bench, case_name: str, peer: str, seed: int = 0):
    case = bench.CASES[case_name]
    torch.manual_seed(seed)
    if peer == "normflows":
        import normflows as nf

        build = bench.normflows_images if case_name == "images" else bench.normflows_digits
        return build(nf, case)
    if peer == "zuko":
        import zuko

        return bench.zuko_digits(zuko, case)
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    return bench.freia_images(Ff, Fm, case, "glow" if peer == "FrEIA Glow-style" else "allinone")


def test_our_own_count_is_the_stated_one(bench):
    for case in bench.CASES.values():
        model = bench.build_ours(case)
        assert bench.count(model.flow)[0] == bench.STATED_FLOW_PARAMS[case.name, "mixflow"]


@pytest.mark.parametrize("case,peer", PAIRS)
def test_each_peer_has_the_stated_parameter_count(bench, case, peer):
    _need(peer)
    flow = _peer_flow(bench, case, peer)
    assert bench.count(flow.modules)[0] == bench.STATED_FLOW_PARAMS[case, peer]


@pytest.mark.parametrize("case", ["images", "digits"])
def test_normflows_with_our_weights_is_our_flow(bench, case):
    _need("normflows")
    c = bench.CASES[case]
    ours = bench.build_ours(c)
    bench._perturb(ours.flow, 2 * bench.perturb_scale(c))
    peer = _peer_flow(bench, case, "normflows")
    bench.load_ours_into_normflows(ours.flow, peer.modules, c)
    ours.eval()
    peer.modules.eval()
    h = torch.randn(4, *c.shape)
    with torch.no_grad():
        z, logdet = ours.flow(h)
        zp, logdet_p = peer.to_latent(h)
        torch.testing.assert_close(zp.reshape(z.shape), z, rtol=0, atol=1e-9)
        torch.testing.assert_close(logdet_p, logdet, rtol=0, atol=1e-9)
        torch.testing.assert_close(peer.to_data(z), ours.flow.inverse(z), rtol=0, atol=1e-9)


def test_freia_glow_style_with_our_weights_is_our_flow_when_shifts_are_zero(bench):
    """FrEIA's coupling adds its shift after scaling (x s + t, ours (x + t) s): with the shift rows of every
    conditioner's last layer at zero the two are the same function, every other weight moved (our W copied into
    FrEIA's fixed 1x1 convs)."""
    _need("FrEIA Glow-style")
    c = bench.CASES["images"]
    ours = bench.build_ours(c)
    bench._perturb(ours.flow, 0.1)
    bench.zero_shift_rows(ours.flow)
    peer = _peer_flow(bench, "images", "FrEIA Glow-style")
    bench.load_ours_into_freia(ours.flow, peer.modules)
    ours.eval()
    h = torch.randn(4, *c.shape)
    with torch.no_grad():
        z, logdet = ours.flow(h)
        zp, logdet_p = peer.to_latent(h)
        torch.testing.assert_close(zp, z, rtol=0, atol=1e-9)
        torch.testing.assert_close(logdet_p, logdet, rtol=0, atol=1e-8)
        torch.testing.assert_close(peer.to_data(z), ours.flow.inverse(z), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case,peer", PAIRS)
def test_each_peer_is_invertible(bench, case, peer):
    _need(peer)
    c = bench.CASES[case]
    flow = _peer_flow(bench, case, peer)
    h = torch.randn(4, *c.shape)
    flow.to_latent(h)  # data-dependent inits (ActNorm) from this batch, in training mode
    bench._perturb(flow.modules, bench.perturb_scale(c))
    flow.modules.eval()
    with torch.no_grad():
        z, logdet = flow.to_latent(h)
        assert z.shape[1:] == flow.latent_shape and logdet.shape == (4,) and torch.isfinite(logdet).all()
        # FrEIA's AllInOneBlock inverts its permutation by the transpose of a rotation rounded to float32
        atol = 1e-5 if peer == "FrEIA AllInOneBlock" else 1e-8
        torch.testing.assert_close(flow.to_data(z), h, rtol=0, atol=atol)


@pytest.mark.parametrize("case,peer", PAIRS)
def test_a_fresh_peer_and_ours_give_finite_log_densities_of_the_same_size(bench, case, peer):
    """Freshly initialised (ActNorms from the batch, couplings at their zero last layer, random rotations), the flows
    are the same map up to the rotations, so log p(h) per dimension agrees closely where the peer has our ActNorm
    (normflows, FrEIA Glow-style); the others (no data-dependent init) must at least be finite."""
    _need(peer)
    c = bench.CASES[case]
    x = torch.randint(0, c.levels, (64, *c.shape), generator=torch.Generator().manual_seed(0))
    h, _ = bench.preprocess(x, c.levels)  # one dequantisation draw for both
    ours = bench.build_ours(c)
    flow = _peer_flow(bench, case, peer)
    prior = bench.ClassGaussian(bench.K, c.dim)
    with torch.no_grad():
        z, logdet = ours.flow(h)  # training mode: ActNorm initialises from h
        ours_lp = (ours.prior.log_prob_all(z.flatten(1))[:, 0] + logdet).mean() / c.dim
        zp, logdet_p = flow.to_latent(h)
        peer_lp = (prior.log_prob_all(zp)[:, 0] + logdet_p).mean() / c.dim
    assert torch.isfinite(ours_lp) and torch.isfinite(peer_lp)
    if peer in ("normflows", "FrEIA Glow-style"):
        assert abs(float(peer_lp - ours_lp)) < 0.02, (float(peer_lp), float(ours_lp))


def test_the_before_and_shipped_paths_compute_one_function(bench):
    """'mixflow' (before issue 22: NCHW) and 'mixflow as shipped' (channels_last) are the same model up to layout,
    so their img/s ratio measures the layout only (no peer needed)."""
    case = bench.CASES["images"]
    before, shipped = bench.build_before(case), bench.build_ours(case)
    linears = [m for m in before.modules() if isinstance(m, bench.coupling.InvertibleLinear)]
    assert linears and {m.memory_format for m in linears} == {None}
    assert {m.memory_format for m in shipped.modules() if isinstance(m, bench.coupling.InvertibleLinear)} == {
        torch.channels_last}
    x = torch.randint(0, case.levels, (3, *case.shape), generator=torch.Generator().manual_seed(0))
    out = []
    for model in (shipped, before):
        torch.manual_seed(1)  # the same dequantisation noise
        with torch.no_grad():
            out.append(model.log_prob_all(x))
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-8)


def test_the_profile_splits_the_shipped_step(bench, capsys):
    args = bench.argparse.Namespace(batch=8, warmup=1, steps=2, threads=1)
    bench.profile_shipped(bench.CASES["digits"], args)
    out = capsys.readouterr().out
    assert "the shipped training step" in out and "| op |" in out
    shares = [float(v.rstrip("%")) for v in
              out.split("self CPU time: ")[1].split("\n")[0].replace(",", "").split() if v.endswith("%")]
    assert len(shares) == 4 and abs(sum(shares) - 100) < 0.2 and shares[1] > 0  # digits: matmuls, no convolutions
