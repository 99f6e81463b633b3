"""Coupling-flow throughput against the peers: mixflow's coupling mixture flow vs the same architecture in normflows, FrEIA, zuko.

What is timed, per model (float32, batch 64, the same torch thread count, random integer data of the
right shape and levels: a coupling flow's speed does not depend on the content):
- train: one training step = forward, loss = -mean log p(x|y) / D (the likelihood part of the profiles'
  hybrid loss; the CE term adds one log-softmax over the same (B, K) table and is left out on every side),
  zero_grad, backward, Adam(lr 1e-3) step;
- eval: log p(x|k) for all K = 10 classes of a batch (--eval-batch, 128 as RuntimeConfig.eval_batch_size),
  under torch.inference_mode for the peers; ours as listed per variant;
- sample: --sample-batch samples of one class (classes taken in turn): z from that class's Gaussian,
  the inverse flow, back to integer levels.
Every model gets the same preprocessing: dequantisation + logit (alpha 0.05), log-det included; ours in
its LogitPreprocess (which also validates the input: isfinite / range / integer checks, a few reductions),
the peers inline (`preprocess` below, no checks). Every peer gets the same class-conditional diagonal
Gaussian prior (`ClassGaussian` below: K x D learned means and log-scales from zero, densities from
torch.distributions as ours); ours has its own ClassConditionalGaussian (learned diagonal, from zero: the
profiles' `_LEARNED_DIAGONAL`).

Architectures (x -> z order; "step" = [ActNorm, invertible 1x1 conv / linear, affine coupling]):

images, 1x28x28 at 256 levels: squeeze -> 4 steps at 4x14x14 -> squeeze -> 4 steps at 16x7x7, no
factor-out (ours: CouplingConv(channels=64, n_steps=4, n_scales=2), the Fashion-MNIST coupling default).
The coupling conditions on the first C/2 channels and transforms the rest; its conditioner is
conv3x3(C/2 -> 64) - ReLU - conv1x1(64 -> 64) - ReLU - conv3x3(64 -> C) with a zero-initialised last layer;
scale sigmoid(h + 2).
- ours: mixflow_core.flows.coupling (Squeeze, ActNorm, InvertibleLinear LU, AffineCoupling).
- normflows 1.7.3: nf.flows.Squeeze + nf.flows.GlowBlock(C, 64, scale_map="sigmoid", split_mode="channel",
  leaky=0, init_zeros=True, use_lu=True) = ActNorm((C,1,1)) -> Invertible1x1Conv(use_lu=True) ->
  AffineCouplingBlock(ConvNet2d kernels (3, 1, 3)). The same function as ours (tests/test_throughput_peers.py
  copies our weights into it and gets our log-densities to round-off): the same squeeze layout, the same LU
  factors, the same coupling with the shift's sign flipped and (shift, scale) interleaved in the last conv's
  output. Differences in code only: normflows' coupling takes log(sigmoid) in two ops, slices its
  parameters with stride 2, and every layer returns a scalar or (B,) log-det added in Python.
- FrEIA 0.2 "Glow-style": Fm.SequenceINN with Fm.IRevNetDownsampling (a fixed strided grouped conv; the
  same channel layout as our squeeze), Fm.ActNorm, Fm.Fixed1x1Conv(M = a random rotation) and
  Fm.AffineCouplingOneSided(clamp=1, clamp_activation=logsigmoid(u + 2)). FrEIA has no learned (LU) 1x1
  convolution: its 1x1 conv is FIXED (W and W^-1 stored, log|det W| a constant), so it trains 2C^2 + C
  fewer parameters per step (2,256 in all) and computes no gradient for W; and FrEIA's coupling adds the
  shift after scaling, y = x * s + t (ours (x + t) * s), the same cost. With our W copied into its fixed
  conv and our shifts at zero it computes our function (the test checks it).
- FrEIA 0.2 AllInOneBlock (FrEIA's recommended block): per step, affine coupling (the same conditioner;
  scale exp(2 tanh(0.1 a))), then a global affine scaling with a SOFTPLUS activation (ActNorm without the
  data-dependent init), then a LEARNED Householder permutation with C reflections on a random rotation
  (learned_householder_permutation=C, permute_soft=True): C^2 trained values instead of our 2C^2 + C, the
  C x C matrix rebuilt from C rank-1 reflections in a Python loop at every call.

digits, 64-D vectors at 17 levels: 8 steps on 64 dimensions, MLP conditioner 32 -> 128 -> 128 -> 64 with
ReLU, zero-initialised last layer (ours: CouplingMLP(hidden=(128, 128), n_steps=8)).
- normflows 1.7.3: nf.flows.ActNorm((64,)) -> nf.flows.InvertibleAffine(64, use_lu=True) ->
  nf.flows.AffineCouplingBlock(nf.nets.MLP([32, 128, 128, 64], init_zeros=True), scale_map="sigmoid"),
  the same function as ours (the test copies our weights in; its linear map right-multiplies, so the LU
  factors are those of our W^T).
- zuko 1.6: per step [an elementwise affine (zuko has no ActNorm: a learned MonotonicAffineTransform, no
  data-dependent init), LULinearTransform (ONE D x D matrix: L with its diagonal, unit-diagonal U, no
  permutation: 4,160 fewer parameters per step, 33,280 in all), GeneralCouplingTransform (the first 32
  dimensions condition; zuko.nn.MLP 32 -> 128 -> 128 -> 64 ReLU; MonotonicAffineTransform, scale = exp of a
  soft-clipped log-scale)] in a LazyComposedTransform, run through zuko's Transform machinery
  (call_and_ladj / inv), which rebuilds every transform from the parameters at each call and gathers /
  scatters the coupling halves by index (`zuko_digits`).

Parameter counts are printed side by side per case (flow parameters trained / prior / fixed tensors);
ours and normflows match exactly, the FrEIA and zuko differences are the ones named above
(`STATED_FLOW_PARAMS` holds the numbers; tests/test_throughput_peers.py checks them).

Our variants (the levers of issue 22, mixflow_core/flows/coupling.py):
- "mixflow": the path before issue 22: eager, NCHW, foreach Adam; eval and sampling under torch.no_grad (as
  eval/metrics.py and MixtureFlow.sample run them) with InvertibleLinear's W cache OFF;
- "+ inference_mode": the same under torch.inference_mode;
- "+ inference_mode + W cache": InvertibleLinear.cache_weights on (W, W^-1 assembled once per weight change);
- "+ W cache + folded ActNorm": coupling.fold_actnorm(flow): every [ActNorm, InvertibleLinear] pair one
  InvertibleLinear with a bias (one affine 1x1 conv instead of an elementwise pass and a conv), folded once
  after the training phase (the fold is in that variant's "first call (s)");
- "+ fused Adam" (training only): torch.optim.Adam(fused=True) in place of the default (foreach) Adam (the
  optimizer training/fit.py makes since issue 22), measured because Adam is a quarter to a third of a digits step;
- "channels_last" (images): the model and input in NHWC and every squeezed tensor too
  (coupling.channels_last: the conditioners run in NHWC);
- "mixflow as shipped": the defaults since issue 22: channels_last (images; build_coupling makes every
  CouplingConv so), fused Adam (training/fit.py), W cache on, eval under no_grad;
- "compiled" (and "compiled + channels_last", images): coupling.compiled(model) (torch.compile, inductor, of
  log p(x|k), its backward compiled with it); the first call's time (the compilation, about a minute for a
  training step on this CPU) is the "first call (s)" column; no sampling row; skipped with --no-compile.

`--profile` times nothing against the peers: it profiles the shipped training step of each case with
torch.profiler (top ops by self CPU time; convolutions, matmuls, Adam and the rest as shares; the convolutions by
input shape), to say where the time goes.

Timing: after --warmup steps per model, --rounds rounds; in each, every variant runs --steps calls
(train, then eval, then sample phases, variants interleaved, the order rotated per round); img/s from the
median round, with the min-max over rounds. FLOPs per image: torch.utils.flop_counter.FlopCounterMode
over one call (matmuls and convolutions, forward and backward), counted eagerly (a compiled variant has
its eager model's count); GFLOP/s = FLOPs/img x img/s, and that as a fraction of a 1024^3 float32 matmul
timed in the same run and thread count.

    .venv/bin/python benchmarks/throughput_peers.py --threads 1 [--rounds 7] [--steps 10] [--case images digits]
        [--json out.json] [--no-compile] [--only mixflow normflows] [--relu-inplace] [--profile]

The peers are benchmark-only dependencies (never in pyproject.toml):
    .venv/bin/pip install normflows==1.7.3 FrEIA==0.2 zuko
A peer that is not installed is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, loadavg, matmul_gflops, table  # noqa: E402

from mixflow_core import CouplingConv, CouplingMLP, ModelConfig, PriorConfig, build_model  # noqa: E402
from mixflow_core.flows import coupling  # noqa: E402
from mixflow_core.flows.model import MixtureFlow  # noqa: E402
from mixflow_core.flows.objectives import likelihood  # noqa: E402
from mixflow_core.training.config import TrainConfig  # noqa: E402
from mixflow_core.training.fit import make_optimizer  # noqa: E402

ALPHA = 0.05  # logit margin, ModelConfig's default
K = 10  # classes
LR = 1e-3


@dataclass(frozen=True)
class Case:
    """One data shape and its architecture."""

    name: str
    shape: tuple[int, ...]  # per-sample data shape
    levels: int
    arch: CouplingConv | CouplingMLP

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


CASES = {
    "images": Case("images", (1, 28, 28), 256, CouplingConv(channels=64, n_steps=4, n_scales=2)),
    "digits": Case("digits", (64,), 17, CouplingMLP(hidden=(128, 128), n_steps=8)),
}
LEARNED_DIAGONAL = PriorConfig(init="zeros", learn_means=True, learn_scales=True, covariance="diagonal")

# trained flow parameters (the prior's 2 K D are extra, the same for every model); tests/test_throughput_peers.py
STATED_FLOW_PARAMS = {
    ("images", "mixflow"): 105_408,
    ("images", "normflows"): 105_408,  # the same
    ("images", "FrEIA Glow-style"): 105_408 - 2_256,  # fixed 1x1 convs: 4 (2*4^2 + 4) + 4 (2*16^2 + 16) fewer
    ("images", "FrEIA AllInOneBlock"): 105_408 - 1_168,  # Householder C^2 for LU 2C^2 + C: 4 (16 + 4) + 4 (256 + 16)
    ("digits", "mixflow"): 299_008,
    ("digits", "normflows"): 299_008,  # the same
    ("digits", "zuko"): 299_008 - 33_280,  # LULinearTransform: one D x D matrix per step for our 2D^2 + D
}


# -- shared pieces for the peers ------------------------------------------------------------------------
def preprocess(x: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Dequantisation + logit as mixflow's LogitPreprocess (inline ops, no input checks): (h, log|dh/dx| - D log L)."""
    x = x.to(torch.get_default_dtype())
    s = ALPHA + (1 - 2 * ALPHA) * (x + torch.rand_like(x)) / levels
    h = torch.log(s) - torch.log1p(-s)
    logdet = (math.log(1 - 2 * ALPHA) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return h, logdet - x[0].numel() * math.log(levels)


def postprocess(h: Tensor, levels: int) -> Tensor:
    """Back to integer levels, as LogitPreprocess.inverse."""
    y = (torch.sigmoid(h) - ALPHA) / (1 - 2 * ALPHA)
    return torch.clamp(torch.floor(y * levels), 0, levels - 1)


class ClassGaussian(nn.Module):
    """p(z|k) = N(z; mu_k, diag(sigma_k^2)) for the peers: K x D learned means and log-scales from zero (torch.distributions)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.means = nn.Parameter(torch.zeros(num_classes, dim))
        self.log_scales = nn.Parameter(torch.zeros(num_classes, dim))

    def log_prob_all(self, z: Tensor) -> Tensor:
        """(B, ...) latents -> (B, K) log N(z; mu_k, Sigma_k)."""
        normal = Normal(self.means, torch.exp(self.log_scales), validate_args=False)
        return Independent(normal, 1, validate_args=False).log_prob(z.flatten(1)[:, None, :])

    def sample(self, y: Tensor) -> Tensor:
        """z = mu_y + sigma_y * eps: (B,) labels -> (B, D)."""
        eps = torch.randn(len(y), self.means.shape[1], dtype=self.means.dtype)
        return self.means[y] + torch.exp(self.log_scales[y]) * eps


@dataclass
class PeerFlow:
    """A peer's flow as two functions, x -> (z, log|det|) and z -> x, with the modules that hold its parameters."""

    modules: nn.Module
    to_latent: Callable[[Tensor], tuple[Tensor, Tensor]]
    to_data: Callable[[Tensor], Tensor]
    latent_shape: tuple[int, ...]


# -- the peers ---------------------------------------------------------------------------------------------
def normflows_images(nf: Any, case: Case) -> PeerFlow:
    """squeeze -> 4 GlowBlocks (4 ch) -> squeeze -> 4 GlowBlocks (16 ch), nf.NormalizingFlow's own cascade."""
    arch = case.arch
    flows: list[nn.Module] = []  # x -> z order here; normflows lists them z -> x
    c = case.shape[0]
    for _ in range(arch.n_scales):
        c *= 4
        flows.append(nf.flows.Squeeze())
        for _ in range(arch.n_steps):
            flows.append(nf.flows.GlowBlock(c, arch.channels, scale=True, scale_map="sigmoid", split_mode="channel",
                                            leaky=0.0, init_zeros=True, use_lu=True, net_actnorm=False))
    model = nf.NormalizingFlow(q0=None, flows=flows[::-1])
    latent = (c, case.shape[1] // 2 ** arch.n_scales, case.shape[2] // 2 ** arch.n_scales)
    return PeerFlow(model, model.inverse_and_log_det, model.forward, latent)


def normflows_digits(nf: Any, case: Case) -> PeerFlow:
    """8 x [ActNorm((64,)), InvertibleAffine(64, use_lu=True), AffineCouplingBlock(MLP, sigmoid scale)]."""
    d = case.dim
    hidden = list(case.arch.hidden)
    flows: list[nn.Module] = []
    for _ in range(case.arch.n_steps):
        net = nf.nets.MLP([d // 2, *hidden, 2 * (d - d // 2)], init_zeros=True)
        flows += [nf.flows.ActNorm((d,)), nf.flows.InvertibleAffine(d, use_lu=True),
                  nf.flows.AffineCouplingBlock(net, scale=True, scale_map="sigmoid", split_mode="channel")]
    model = nf.NormalizingFlow(q0=None, flows=flows[::-1])
    return PeerFlow(model, model.inverse_and_log_det, model.forward, (d,))


def freia_conv_subnet(hidden: int, k: int) -> Callable[[int, int], nn.Module]:
    """FrEIA's subnet_constructor(c_in, c_out): our conditioner, conv k - ReLU - conv 1x1 - ReLU - conv k, last at zero."""
    def make(c_in: int, c_out: int) -> nn.Module:
        last = nn.Conv2d(hidden, c_out, k, padding=k // 2)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(c_in, hidden, k, padding=k // 2), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                             nn.ReLU(), last)
    return make


def _logsigmoid_plus_2(u: Tensor) -> Tensor:
    return F.logsigmoid(u + 2.0)


def freia_images(Ff: Any, Fm: Any, case: Case, style: str) -> PeerFlow:
    """style "glow": IRevNetDownsampling, then per step ActNorm, Fixed1x1Conv (random rotation), AffineCouplingOneSided
    with log s = logsigmoid(h + 2); style "allinone": per step AllInOneBlock with a learned Householder permutation."""
    arch = case.arch
    inn = Ff.SequenceINN(*case.shape)
    c = case.shape[0]
    subnet = freia_conv_subnet(arch.channels, arch.kernel_size)
    for _ in range(arch.n_scales):
        inn.append(Fm.IRevNetDownsampling)
        c *= 4
        for _ in range(arch.n_steps):
            if style == "glow":
                q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
                inn.append(Fm.ActNorm)
                inn.append(Fm.Fixed1x1Conv, M=q.to(torch.get_default_dtype()))
                inn.append(Fm.AffineCouplingOneSided, subnet_constructor=subnet, clamp=1.0,
                           clamp_activation=_logsigmoid_plus_2)
            else:
                inn.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0, permute_soft=True,
                           learned_householder_permutation=c)
    inn.to(torch.get_default_dtype())  # AllInOneBlock makes its permutation a FloatTensor whatever the default dtype
    latent = (c, case.shape[1] // 2 ** arch.n_scales, case.shape[2] // 2 ** arch.n_scales)

    def to_latent(x: Tensor) -> tuple[Tensor, Tensor]:
        return inn(x)

    def to_data(z: Tensor) -> Tensor:
        return inn(z, rev=True, jac=False)[0]

    return PeerFlow(inn, to_latent, to_data, latent)


def _elementwise_affine(shift: Tensor, scale: Tensor) -> Any:
    """zuko's per-dimension affine map exp(a) x + b (soft-clipped a) over a vector: the ActNorm stand-in."""
    from zuko.transforms import DependentTransform, MonotonicAffineTransform

    return DependentTransform(MonotonicAffineTransform(shift, scale), 1)


def zuko_digits(zuko: Any, case: Case) -> PeerFlow:
    """8 x [elementwise affine, LULinearTransform, GeneralCouplingTransform(MLP (128, 128))], zuko's lazy transforms.

    Per step: UnconditionalTransform(DependentTransform(MonotonicAffineTransform(b, a))) with 2D learned values
    (zuko has no ActNorm: no data-dependent init), UnconditionalTransform(LULinearTransform, LU) with one D x D
    matrix holding L (with its diagonal) and U (unit diagonal) — D^2 values, no permutation, against our
    2D^2 + D (4,160 fewer per step, 33,280 in all) — started at the identity, and GeneralCouplingTransform with the
    first D/2 dimensions conditioning (mask), zuko.nn.MLP(32 -> 128 -> 128 -> 64, ReLU) whose last layer we
    zero as ours, univariate MonotonicAffineTransform (scale exp of a soft-clipped log-scale; ours sigmoid(h + 2)).
    x -> z is LazyComposedTransform()(...).call_and_ladj, z -> x its .inv: zuko rebuilds every transform
    (L U, the coupling's meta transform) from the parameters at each call, and its coupling gathers and scatters
    the halves by index.
    """
    from zuko.flows import GeneralCouplingTransform, UnconditionalTransform
    from zuko.lazy import LazyComposedTransform
    from zuko.transforms import LULinearTransform

    d = case.dim
    mask = torch.arange(d) < d // 2  # True: the constant, conditioning half
    steps: list[nn.Module] = []
    for _ in range(case.arch.n_steps):
        couple = GeneralCouplingTransform(d, mask=mask, hidden_features=tuple(case.arch.hidden), activation=nn.ReLU)
        last = [m for m in couple.hyper.modules() if isinstance(m, (nn.Linear, zuko.nn.Linear))][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        steps += [UnconditionalTransform(_elementwise_affine, torch.zeros(d), torch.zeros(d)),
                  UnconditionalTransform(LULinearTransform, torch.eye(d)), couple]
    lazy = LazyComposedTransform(*steps)

    def to_latent(h: Tensor) -> tuple[Tensor, Tensor]:
        return lazy().call_and_ladj(h)

    def to_data(z: Tensor) -> Tensor:
        return lazy().inv(z)

    return PeerFlow(lazy, to_latent, to_data, (d,))


# -- ours -------------------------------------------------------------------------------------------------
def build_ours(case: Case, seed: int = 0) -> MixtureFlow:
    torch.manual_seed(seed)
    return build_model(case.shape, K, case.levels, ModelConfig(arch=case.arch), LEARNED_DIAGONAL)


def set_weight_cache(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, coupling.InvertibleLinear):
            m.cache_weights = on


def count(module: nn.Module) -> tuple[int, int]:
    """(trained parameters, fixed tensors: non-trained parameters and float buffers) of a module."""
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    fixed = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    fixed += sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return trained, fixed


# -- variants -----------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One model and the three timed calls (None: the phase does not apply)."""

    name: str
    library: str
    train: Callable[[Tensor, Tensor], Any] | None
    evaluate: Callable[[Tensor], Tensor] | None
    sample: Callable[[Tensor], Tensor] | None
    flow_params: int | None = None
    prior_params: int | None = None
    fixed: int | None = None
    note: str = ""
    eager_twin: str | None = None  # FLOPs counted on this variant's calls (a compiled variant's eager model)
    setup_s: dict[str, float] = field(default_factory=dict)  # e.g. compile time per phase
    train_model: nn.Module | None = None  # put in train mode before the training phase, eval mode after
    compiled: Any = None  # coupling.compiled's callable, to report a fallback to eager


_counting = [False]  # True while FLOPs are counted


def grad_off(mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode
             ) -> contextlib.AbstractContextManager:
    """mode() for a timed call; torch.no_grad() while FLOPs are counted (FlopCounterMode's module tracker fails on
    modules that touch parameters under inference_mode; the FLOPs are the same)."""
    return torch.no_grad() if _counting[0] else mode()


def peer_variant(name: str, library: str, flow: PeerFlow, case: Case, note: str = "") -> Variant:
    prior = ClassGaussian(K, case.dim)
    holder = nn.ModuleDict({"flow": flow.modules, "prior": prior})
    opt = torch.optim.Adam(holder.parameters(), lr=LR)
    levels, dim = case.levels, case.dim

    def log_prob_all(x: Tensor) -> Tensor:
        h, logdet_pre = preprocess(x, levels)
        z, logdet = flow.to_latent(h)
        return prior.log_prob_all(z) + (logdet + logdet_pre)[:, None]

    def train(x: Tensor, y: Tensor) -> None:
        loss = likelihood(log_prob_all(x), y, None, dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def evaluate(x: Tensor) -> Tensor:
        with grad_off():
            return log_prob_all(x)

    def sample(y: Tensor) -> Tensor:
        with grad_off():
            z = prior.sample(y).reshape(len(y), *flow.latent_shape)
            return postprocess(flow.to_data(z), levels)

    trained, fixed = count(flow.modules)
    return Variant(name, library, train, evaluate, sample, trained, count(prior)[0], fixed, note, train_model=holder)


def ours_variants(case: Case, compile_: bool, relu_inplace: bool = False) -> list[Variant]:
    """The path before issue 22, each lever on it, and the path as shipped; eval-only variants share the first
    variant's (trained) model."""
    model = build_before(case)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    trained, fixed = count(model.flow)
    prior_params = count(model.prior)[0]

    def caller(method: str, grad_mode: Callable[[], contextlib.AbstractContextManager], cache: bool,
               get: Callable[[], MixtureFlow] = lambda: model) -> Callable[[Tensor], Tensor]:
        """A timed call of get().method ("log_prob_all": evaluate, "sample") with the W cache on or off."""
        def call(arg: Tensor) -> Tensor:
            m = get()
            set_weight_cache(m, cache)
            with grad_off(grad_mode):
                return getattr(m, method)(arg)
        return call

    folded: list[MixtureFlow] = []

    def get_folded() -> MixtureFlow:  # folded once, after training (a snapshot of the trained weights)
        if not folded:
            folded.append(MixtureFlow(coupling.fold_actnorm(model.flow), model.prior, model.preprocess,
                                      model.data_shape).eval())
        return folded[0]

    base = dict(flow_params=trained, prior_params=prior_params, fixed=fixed)
    out = [
        Variant("mixflow", "ours", trainer(model, opt), caller("log_prob_all", torch.no_grad, False),
                caller("sample", torch.no_grad, False), **base,
                note="before issue 22: NCHW, foreach Adam, no_grad, no W cache", train_model=model),
        Variant("mixflow + inference_mode", "ours", None, caller("log_prob_all", torch.inference_mode, False),
                caller("sample", torch.inference_mode, False), **base),
        Variant("mixflow + inference_mode + W cache", "ours", None, caller("log_prob_all", torch.inference_mode, True),
                caller("sample", torch.inference_mode, True), **base),
        Variant("mixflow + inference_mode + W cache + folded ActNorm", "ours", None,
                caller("log_prob_all", torch.inference_mode, True, get_folded),
                caller("sample", torch.inference_mode, True, get_folded),
                **base, note="fold_actnorm(flow), folded after the training phase"),
    ]
    out.append(fused_adam_variant(case, base))
    if len(case.shape) == 3:
        out.append(channels_last_variant(case, base))
    out.append(shipped_variant(case, base))
    if relu_inplace:
        out.append(shipped_variant(case, base, relu_inplace=True))
    if compile_:
        out.append(compiled_variant(case, base))
        if len(case.shape) == 3:
            out.append(compiled_variant(case, base, nhwc=True))
    return out


def build_before(case: Case) -> MixtureFlow:
    """Our model as it was before issue 22's defaults: NCHW activations (build_coupling now makes every CouplingConv
    channels_last)."""
    model = build_ours(case)
    coupling.channels_last(model.flow, on=False)
    return model


def trainer(model: MixtureFlow, opt: torch.optim.Optimizer, layout: Callable[[Tensor], Tensor] = lambda x: x,
            log_prob_all: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor, Tensor], None]:
    """One training step of `model` with `opt`: likelihood loss of log_prob_all (default model.log_prob_all) on
    layout(x), backward, update."""
    log_prob_all = log_prob_all or model.log_prob_all

    def train(x: Tensor, y: Tensor) -> None:
        loss = likelihood(log_prob_all(layout(x)), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return train


def fused_adam_variant(case: Case, base: dict) -> Variant:
    """Training only: torch.optim.Adam(fused=True), one fused kernel over all parameters (training/fit.py's
    optimizer since issue 22), on the model as it was before."""
    model = build_before(case)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    return Variant("mixflow + fused Adam", "ours", trainer(model, opt), None, None, **base,
                   note="Adam(fused=True) (training/fit.py's optimizer since issue 22)", train_model=model)


def to_nhwc(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def channels_last_variant(case: Case, base: dict) -> Variant:
    """channels_last alone (foreach Adam), input NHWC too; eval / sample as shipped (no_grad, W cache)."""
    model = build_ours(case)  # channels_last, as build_coupling makes every CouplingConv now
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def evaluate(x: Tensor) -> Tensor:
        with grad_off():
            return model.log_prob_all(to_nhwc(x))

    def sample(y: Tensor) -> Tensor:
        with grad_off():
            return model.sample(y)

    return Variant("mixflow channels_last", "ours", trainer(model, opt, to_nhwc), evaluate, sample, **base,
                   note="coupling.channels_last(flow), input NHWC; eval / sample with inference_mode + W cache",
                   train_model=model)


def shipped_variant(case: Case, base: dict, relu_inplace: bool = False) -> Variant:
    """The path as shipped since issue 22: build_model's flow (channels_last for images), fit's fused Adam,
    evaluation under no_grad and sampling as eval/metrics.py and MixtureFlow.sample run them (W cache on);
    `relu_inplace`: the conditioners' ReLUs in place (a lever measured, not shipped)."""
    model = build_ours(case)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = relu_inplace
    opt = make_optimizer(model, TrainConfig(lr=LR))  # fit's own (fused Adam since issue 22)

    def evaluate(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model.log_prob_all(x)

    return Variant("mixflow as shipped" + (", in-place ReLU" if relu_inplace else ""), "ours", trainer(model, opt),
                   evaluate, model.sample, **base,
                   note="channels_last (images) + fused Adam + W cache, no_grad: the defaults since issue 22",
                   train_model=model)


def compiled_variant(case: Case, base: dict, nhwc: bool = False) -> Variant:
    model = build_ours(case) if nhwc else build_before(case)
    fast = coupling.compiled(model)  # model(x) = log p(x|k) for all k
    layout = to_nhwc if nhwc else (lambda x: x)
    train = trainer(model, torch.optim.Adam(model.parameters(), lr=LR), layout, fast)

    def evaluate(x: Tensor) -> Tensor:
        with grad_off():
            return fast(layout(x))

    return Variant("mixflow compiled" + (" + channels_last" if nhwc else ""), "ours", train, evaluate, None, **base,
                   note="coupling.compiled(model): torch.compile (inductor) of log p(x|k) and its backward",
                   eager_twin="mixflow", train_model=model, compiled=fast)


def peer_variants(case: Case) -> tuple[list[Variant], list[str]]:
    """The peers that are installed, and a line for each that is not."""
    out, missing = [], []
    try:
        import normflows as nf
    except ImportError as err:
        missing.append(f"normflows not installed ({err}); `.venv/bin/pip install normflows==1.7.3`")
    else:
        torch.manual_seed(1)
        build = normflows_images if len(case.shape) == 3 else normflows_digits
        out.append(peer_variant("normflows", "normflows " + nf.__version__, build(nf, case), case))
    if len(case.shape) == 3:
        try:
            import FrEIA
            import FrEIA.framework as Ff
            import FrEIA.modules as Fm
        except ImportError as err:
            missing.append(f"FrEIA not installed ({err}); `.venv/bin/pip install FrEIA==0.2`")
        else:
            version = "FrEIA " + (getattr(FrEIA, "__version__", None) or _dist_version("FrEIA"))
            torch.manual_seed(2)
            out.append(peer_variant("FrEIA Glow-style", version, freia_images(Ff, Fm, case, "glow"), case,
                                    "fixed 1x1 conv (FrEIA has no learned one)"))
            torch.manual_seed(3)
            out.append(peer_variant("FrEIA AllInOneBlock", version, freia_images(Ff, Fm, case, "allinone"), case,
                                    "learned Householder (C reflections), global affine, tanh clamp"))
    else:
        try:
            import zuko
        except ImportError as err:
            missing.append(f"zuko not installed ({err}); `.venv/bin/pip install zuko`")
        else:
            torch.manual_seed(4)
            out.append(peer_variant("zuko", "zuko " + zuko.__version__, zuko_digits(zuko, case), case,
                                    "LU: one D x D matrix; affine without data init; index-gather coupling"))
    return out, missing


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# -- timing -------------------------------------------------------------------------------------------
def flops_per_call(fn: Callable[..., Any], phase: str, b: tuple[Tensor, Tensor]) -> float:
    """FLOPs (matmuls, convolutions; forward and backward) of one call, counted eagerly."""
    _counting[0] = True
    try:
        with FlopCounterMode(display=False) as counter:
            call(fn, phase, b, 0)
    finally:
        _counting[0] = False
    return float(counter.get_total_flops())


PHASES = ("train", "evaluate", "sample")


def run_case(case: Case, args: argparse.Namespace) -> tuple[list[dict], list[dict], list[str]]:
    """(timing rows, parameter rows, notes) for one case."""
    gen = torch.Generator().manual_seed(0)
    n_data = 4096
    dtype = torch.uint8 if case.levels <= 256 else torch.int64
    x_all = torch.randint(0, case.levels, (n_data, *case.shape), generator=gen).to(dtype)
    y_all = torch.arange(n_data) % K
    notes: list[str] = []

    variants = ours_variants(case, not args.no_compile, args.relu_inplace)
    peers, missing = peer_variants(case)
    variants += peers
    notes += missing
    if args.only:
        variants = [v for v in variants if any(v.name.startswith(o) for o in args.only)]
    by_name = {v.name: v for v in variants}

    def batch(n: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(n_data, (n,), generator=gen)
        return x_all[idx], y_all[idx]

    sizes = {"train": args.batch, "evaluate": args.eval_batch, "sample": args.sample_batch}
    rows: list[dict] = []
    peak = []
    for phase in PHASES:
        active = [v for v in variants if getattr(v, phase) is not None]
        for v in variants:
            if v.train_model is not None:
                v.train_model.train(phase == "train")
        # warm-up (training also initialises ActNorm; compiled variants compile here, timed)
        for v in active:
            fn = getattr(v, phase)
            t0 = time.perf_counter()
            # a compiled model compiles again at its second training call (ActNorm's first-call initialisation branch
            # is a guard): at least 3 untimed calls
            for i in range(max(args.warmup, 3) if v.compiled is not None else args.warmup):
                call(fn, phase, batch(sizes[phase]), i)
                if i == 0:
                    v.setup_s[phase] = time.perf_counter() - t0
            if v.compiled is not None and v.compiled.eager():
                v.note += f" [compile failed, ran eagerly in {phase}]"
        times: dict[str, list[float]] = {v.name: [] for v in active}
        loads = []
        for r in range(args.rounds):
            loads.append(loadavg())
            peak.append(matmul_gflops(repeats=10))
            order = active[r % len(active):] + active[: r % len(active)] if active else []
            for v in order:
                fn = getattr(v, phase)
                batches = [batch(sizes[phase]) for _ in range(args.steps)]
                t0 = time.perf_counter()
                for i, b in enumerate(batches):
                    call(fn, phase, b, r * args.steps + i)
                times[v.name].append(time.perf_counter() - t0)
        for v in active:
            twin = by_name.get(v.eager_twin) if v.eager_twin else v  # None: its eager twin was left out (--only)
            fl = (flops_per_call(getattr(twin, phase), phase, batch(sizes[phase])) / sizes[phase]
                  if twin is not None else float("nan"))
            ts = times[v.name]
            n_img = sizes[phase] * args.steps
            med = statistics.median(ts)
            rows.append({
                "case": case.name, "phase": phase, "variant": v.name, "library": v.library,
                "img/s": n_img / med, "img/s min": n_img / max(ts), "img/s max": n_img / min(ts),
                "ms/batch": 1000 * med / args.steps, "batch": sizes[phase], "MFLOP/img": fl / 1e6,
                "GFLOP/s": fl * n_img / med / 1e9, "first call (s)": v.setup_s.get(phase),
                "load min": min(loads), "load max": max(loads), "note": v.note,
            })
    gflops = statistics.median(peak) if peak else float("nan")
    for row in rows:
        row["matmul GFLOP/s"] = gflops
        row["of matmul"] = row["GFLOP/s"] / gflops
    for phase in PHASES:
        base = next((r for r in rows if r["phase"] == phase and r["variant"] == "mixflow"), None)
        for r in rows:
            if r["phase"] == phase:
                r["vs mixflow"] = r["img/s"] / base["img/s"] if base else None
    ours = by_name.get("mixflow")
    params = [{"case": case.name, "model": v.name, "library": v.library, "flow params (trained)": v.flow_params,
               "prior params": v.prior_params, "fixed tensors": v.fixed,
               "flow params vs mixflow": (v.flow_params - ours.flow_params) if ours else None,
               "stated": STATED_FLOW_PARAMS.get((case.name, v.name), "")}
              for v in variants if v.train is not None]
    return rows, params, notes


def call(fn: Callable[..., Any], phase: str, b: tuple[Tensor, Tensor], i: int) -> Any:
    x, y = b
    if phase == "train":
        return fn(x, y)
    if phase == "evaluate":
        return fn(x)
    return fn(torch.full((len(y),), i % K, dtype=torch.long))  # one class per call, classes in turn


def self_check(case: Case) -> list[str]:
    """A line per peer that can take our weights (normflows; FrEIA Glow-style with zero shifts): how far its z and
    log-det are from ours on one batch (float32) — the proof that it is the same architecture."""
    lines = []
    h = torch.randn(32, *case.shape, generator=torch.Generator().manual_seed(9))

    def compare(label: str, model: MixtureFlow, peer: PeerFlow) -> None:
        model.flow.eval()
        peer.modules.eval()
        with torch.no_grad():
            z, ld = model.flow(h)
            zp, ldp = peer.to_latent(h)
            back = peer.to_data(z)
        lines.append(f"{case.name}: {label}: max |z - z_ours| {float((zp.reshape(z.shape) - z).abs().max()):.1e}, "
                     f"max |logdet - logdet_ours| {float((ldp - ld).abs().max()):.1e} (|logdet| ~ "
                     f"{float(ld.abs().mean()):.0f}), max |inverse - h| {float((back - h).abs().max()):.1e}")

    try:
        import normflows as nf
    except ImportError:
        pass
    else:
        model = build_ours(case)
        _perturb(model.flow, perturb_scale(case))
        peer = (normflows_images if len(case.shape) == 3 else normflows_digits)(nf, case)
        load_ours_into_normflows(model.flow, peer.modules, case)
        compare("normflows with our weights", model, peer)
    if len(case.shape) == 3:
        try:
            import FrEIA.framework as Ff
            import FrEIA.modules as Fm
        except ImportError:
            pass
        else:
            model = build_ours(case)
            _perturb(model.flow)
            zero_shift_rows(model.flow)
            peer = freia_images(Ff, Fm, case, "glow")
            load_ours_into_freia(model.flow, peer.modules)
            compare("FrEIA Glow-style with our weights (shifts 0)", model, peer)
    return lines


def perturb_scale(case: Case) -> float:
    """A size of seeded weight noise that moves every layer but keeps 8-16 steps' activations moderate (64-D
    linear maps compound it)."""
    return 0.05 if len(case.shape) == 3 else 0.01


def _perturb(module: nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    """Every trained parameter moved by seeded noise (a zero last layer would make any comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def zero_shift_rows(flow: nn.Module) -> None:
    """Every coupling's shift t at zero (the last conditioner layer's t-rows), leaving its scale."""
    for m in flow.modules():
        if isinstance(m, coupling.AffineCoupling):
            last = [layer for layer in m.net if isinstance(layer, (nn.Conv2d, nn.Linear))][-1]
            nb = m.num_channels - m.split
            last.weight[nb:] = 0
            last.bias[nb:] = 0


# -- weight copies: the peers computing our function (tests/test_throughput_peers.py) -----------------------
def _coupling_last_rows(weight: Tensor, nb: int) -> Tensor:
    """Our conditioner output [h (nb), t (nb)] as normflows' interleaved [shift_0, scale_0, shift_1, ...] with shift = -t."""
    h, t = weight[:nb], weight[nb:]
    return torch.stack([-t, h], 1).reshape(weight.shape)


@torch.no_grad()
def load_ours_into_normflows(ours: nn.Module, nf_model: nn.Module, case: Case) -> None:
    """Copy our flow's weights into the normflows model built for `case`, so that it computes our function."""
    our_layers = [m for m in ours.modules() if isinstance(m, (coupling.ActNorm, coupling.InvertibleLinear,
                                                             coupling.AffineCoupling))]
    import normflows as nf
    their = [m for m in list(nf_model.flows)[::-1]]  # x -> z order
    their_layers: list[nn.Module] = []
    for f in their:
        if isinstance(f, nf.flows.GlowBlock):
            their_layers += list(f.flows)[::-1]  # ActNorm, Invertible1x1Conv, AffineCouplingBlock
        elif not isinstance(f, nf.flows.Squeeze):
            their_layers.append(f)
    if len(our_layers) != len(their_layers):
        raise ValueError(f"{len(our_layers)} layers of ours, {len(their_layers)} of normflows")
    for o, t in zip(our_layers, their_layers):
        if isinstance(o, coupling.ActNorm):
            t.t.copy_(o.bias.view(t.t.shape))
            t.s.copy_(o.log_scale.view(t.s.shape))
            t.data_dep_init_done.fill_(1.0)
        elif isinstance(o, coupling.InvertibleLinear):
            w = o.weight()
            if isinstance(t, nf.flows.Invertible1x1Conv):  # conv2d(x, W): our convention
                p, lower, upper = o.perm, o.lower, o.upper
                log_s, sign = o.log_s, o.sign_s
            else:  # InvertibleAffine: x @ W, so W = (our W)^T, LU-factorised afresh
                p, lower, upper = torch.linalg.lu(w.T.double())
                diag = torch.diagonal(upper)
                log_s, sign = torch.log(diag.abs()), torch.sign(diag)
            t.P.copy_(p)
            t.L.copy_(torch.tril(lower, -1) + torch.eye(len(log_s), dtype=lower.dtype))
            t.U.copy_(torch.triu(upper, 1))
            t.log_S.copy_(log_s)
            t.sign_S.copy_(sign)
        else:
            ours_net = [m for m in o.net if isinstance(m, (nn.Conv2d, nn.Linear))]
            coupling_layer = t.flows[1]
            their_net = [m for m in coupling_layer.param_map.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            nb = o.num_channels - o.split
            for a, b in zip(ours_net[:-1], their_net[:-1]):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            their_net[-1].weight.copy_(_coupling_last_rows(ours_net[-1].weight, nb))
            their_net[-1].bias.copy_(_coupling_last_rows(ours_net[-1].bias, nb))


@torch.no_grad()
def load_ours_into_freia(ours: nn.Module, inn: nn.Module) -> None:
    """Copy our flow's weights into the FrEIA Glow-style SequenceINN (our W into its fixed 1x1 convs): the same
    function where our couplings' shifts are zero (FrEIA's coupling is x s + t, ours (x + t) s)."""
    import FrEIA.modules as Fm

    our_layers = [m for m in ours.modules() if isinstance(m, (coupling.ActNorm, coupling.InvertibleLinear,
                                                             coupling.AffineCoupling))]
    their_layers = [m for m in inn.module_list if not isinstance(m, Fm.IRevNetDownsampling)]
    if len(our_layers) != len(their_layers):
        raise ValueError(f"{len(our_layers)} layers of ours, {len(their_layers)} of FrEIA")
    for o, t in zip(our_layers, their_layers):
        if isinstance(o, coupling.ActNorm):  # FrEIA: x exp(scale) + bias; ours (x - b) exp(-log_scale)
            t.scale.copy_(-o.log_scale.view(t.scale.shape))
            t.bias.copy_((-o.bias * torch.exp(-o.log_scale)).view(t.bias.shape))
            t.init_on_next_batch = False
        elif isinstance(o, coupling.InvertibleLinear):  # Fixed1x1Conv: conv2d(x, M^T), so M = W^T
            w = o.weight()
            t.M.copy_(w.view(t.M.shape))
            t.M_inv.copy_(torch.linalg.inv(w).view(t.M_inv.shape))
            t.logDetM.fill_(float(torch.linalg.slogdet(w).logabsdet))
        else:
            ours_net = [m for m in o.net if isinstance(m, (nn.Conv2d, nn.Linear))]
            their_net = [m for m in t.subnet if isinstance(m, (nn.Conv2d, nn.Linear))]
            for a, b in zip(ours_net, their_net):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)


# -- profile ------------------------------------------------------------------------------------------------
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::convolution",
            "aten::conv2d", "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def profile_shipped(case: Case, args: argparse.Namespace) -> None:
    """torch.profiler over --steps shipped training steps: the top ops by self CPU time, the convolutions' time by
    input shape, and the step's time split into convolutions, matmuls, Adam and the rest."""
    from torch.profiler import ProfilerActivity, profile

    variant = shipped_variant(case, {"flow_params": 0, "prior_params": 0, "fixed": 0})
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, case.levels, (args.batch, *case.shape), generator=gen).to(torch.uint8)
    y = torch.arange(args.batch) % K
    for _ in range(args.warmup):
        variant.train(x, y)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            variant.train(x, y)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n## profile: {case.name}, the shipped training step, {args.steps} steps of batch {args.batch}, "
          f"{args.threads} thread(s): {1000 * wall / args.steps:.1f} ms/step\n")
    rows = [{"op": e.key, "self CPU %": 100 * e.self_cpu_time_total / total, "calls per step": e.count / args.steps,
             "µs per call": e.self_cpu_time_total / max(e.count, 1)}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]
    print(table(rows))

    def share(pred: Callable[[str], bool]) -> float:
        return 100 * sum(e.self_cpu_time_total for e in events if pred(e.key)) / total

    conv = share(lambda k: k in CONV_OPS)
    mm = share(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
    adam = share(lambda k: "adam" in k.lower())
    print(f"\nself CPU time: convolutions (forward and backward) {conv:.1f}%, matmuls {mm:.1f}%, Adam {adam:.1f}%, "
          f"everything else (elementwise, copies, autograd bookkeeping) {100 - conv - mm - adam:.1f}%")
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in CONV_OPS]
    rows = [{"op": e.key, "input shapes": str(e.input_shapes[:2])[:90], "self CPU %": 100 * e.self_cpu_time_total / total,
             "µs per call": e.self_cpu_time_total / max(e.count, 1)}
            for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:10]]
    if rows:
        print("\nconvolutions by input shape (the ten costliest):\n")
        print(table(rows))


# -- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="calls per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per variant and phase first")
    ap.add_argument("--batch", type=int, default=64, help="training batch")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant (compiling takes "
                                                              "a minute or more on 2 cores)")
    ap.add_argument("--only", nargs="*", help="variants whose name starts with one of these")
    ap.add_argument("--json", help="write every row (and the header) to this file")
    ap.add_argument("--relu-inplace", action="store_true",
                    help="add 'mixflow as shipped, in-place ReLU' (the conditioners' ReLUs in place; not shipped)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the shipped training step of each case (torch.profiler): where the time goes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("default")
    warnings.filterwarnings("ignore", "torch.lu is deprecated")  # normflows 1.7.3 calls it
    warnings.filterwarnings("ignore", ".*_prims_common.check", FutureWarning)  # inductor's own
    head = header(args.threads)
    print(head)
    if args.profile:
        for name in args.case:
            profile_shipped(CASES[name], args)
        return
    print(f"batch {args.batch} (train) / {args.eval_batch} (eval) / {args.sample_batch} (sample), {args.rounds} rounds x "
          f"{args.steps} calls per variant, interleaved, warm-up {args.warmup}\n")
    out: dict[str, Any] = {"header": head, "args": vars(args), "rows": [], "params": [], "notes": []}
    for name in args.case:
        case = CASES[name]
        for line in self_check(case):
            print("check: " + line)
            out["notes"].append(line)
        rows, params, notes = run_case(case, args)
        out["rows"] += rows
        out["params"] += params
        out["notes"] += notes
        print(f"\n## {name}: {case.shape} at {case.levels} levels, {case.arch}\n")
        for line in notes:
            print("note: " + line)
        print("\n### parameters\n")
        print(table(params, ["model", "library", "flow params (trained)", "prior params", "fixed tensors",
                             "flow params vs mixflow", "stated"]))
        for phase in PHASES:
            sel = [r for r in rows if r["phase"] == phase]
            if not sel:
                continue
            print(f"\n### {phase} (img/s: median of {args.rounds} rounds, min-max; batch {sel[0]['batch']})\n")
            for r in sel:
                r["img/s (min-max)"] = f"{r['img/s min']:.0f}-{r['img/s max']:.0f}"
            print(table(sel, ["variant", "img/s", "img/s (min-max)", "vs mixflow", "ms/batch", "MFLOP/img", "GFLOP/s",
                              "of matmul", "first call (s)", "note"]))
        if rows:
            print(f"\nfloat32 matmul 1024^3 ({args.threads} threads, median over rounds): "
                  f"{rows[0]['matmul GFLOP/s']:.1f} GFLOP/s; load average (1 min) during the rounds "
                  f"{min(r['load min'] for r in rows):.2f}-{max(r['load max'] for r in rows):.2f}")
    if args.json:
        for r in out["rows"]:
            r.pop("img/s (min-max)", None)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
