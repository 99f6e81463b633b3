"""Coupling flows (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018): exact log-det, analytic inverse.

FlowGMM's and IB-INN's backbone family. One step is [ActNorm] -> invertible linear map (Glow's
1x1 convolution, LU-parametrised) -> affine coupling:

    z_a = x_a,   z_b = (x_b + t(x_a)) * s(x_a),   s = sigmoid(h(x_a) + 2),

with (h, t) from a small network of x_a (the "conditioner") whose last layer starts at zero.
log|det| = sum log s, and the inverse is x_b = z_b / s(z_a) - t(z_a): no estimator, no iteration.

- `CouplingMLP` (vectors, digits / toy2d): an MLP conditioner on half the dimensions.
- `CouplingConv` (images): per scale a squeeze, then n_steps steps with a conv conditioner
  (conv k x k -> ReLU -> conv 1x1 -> ReLU -> conv k x k); with `factor_out` (RealNVP's multi-scale
  architecture) half the channels leave for the latent after every scale but the last.

This family has no training state beyond its weights: the backbone hooks of layers.Flow keep
their no-op defaults, and its log-det is exact in training and evaluation alike.

Speed levers (benchmarks/throughput_peers.py measures each against the peers, normflows, FrEIA, zuko):
- `InvertibleLinear` caches W and W^-1 while gradients are off (evaluation, sampling), keyed on the
  parameters' storage and in-place version counters and on the process's count of torch.optim steps, so an
  optimizer step (fused ones too) or load_state_dict invalidates it;
- `fold_actnorm(flow)`: an equivalent eval-only flow with every [ActNorm, InvertibleLinear] pair folded
  into one InvertibleLinear with a bias (one affine 1x1 convolution instead of two passes);
- `channels_last(flow)`: NHWC activations in every 1x1 convolution and conditioner (on in every CouplingConv
  build_coupling makes; `channels_last(flow, on=False)` undoes it);
- `compiled(fn)`: opt-in torch.compile of a function (e.g. a model's log_prob_all) with a clean eager fallback.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import Tensor, nn

from .layers import ActNorm, Flow, FlowSequence, Squeeze, Whiten

if TYPE_CHECKING:  # flows/config.py imports this family, not the other way round
    from .config import ModelConfig

__all__ = ["CouplingMLP", "CouplingConv", "InvertibleLinear", "AffineCoupling", "FactorOut", "build_coupling",
           "fold_actnorm", "channels_last", "compiled"]


# torch.optim steps taken in this process, by any optimizer: part of every W-cache key, because a fused optimizer
# (Adam(fused=True), the one training/fit.py makes) updates parameters in place without bumping their version counters.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@dataclass(frozen=True)
class CouplingMLP:
    """Coupling flow for vectors (D,): n_steps of [ActNorm] + invertible linear map + affine coupling, MLP conditioner."""

    kind: ClassVar[str] = "coupling_mlp"
    family: ClassVar[str] = "coupling"
    hidden: tuple[int, ...] = (128, 128)  # hidden widths of each conditioner (D/2 -> hidden -> 2 * D/2)
    n_steps: int = 8  # flow steps

    def __post_init__(self) -> None:
        if self.n_steps < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"CouplingMLP needs n_steps >= 1 and positive hidden widths, got {self}")


@dataclass(frozen=True)
class CouplingConv:
    """Multi-scale Glow-style coupling flow for images (C, H, W): per scale a squeeze, then n_steps flow steps."""

    kind: ClassVar[str] = "coupling_conv"
    family: ClassVar[str] = "coupling"
    channels: int = 64  # hidden channels of each conditioner (conv k x k -> ReLU -> conv 1x1 -> ReLU -> conv k x k)
    n_steps: int = 4  # flow steps per scale
    n_scales: int = 2  # scales, each starting with a squeeze (28x28x1 -> 14x14x4 -> 7x7x16)
    kernel_size: int = 3  # first and last conv of each conditioner
    factor_out: bool = False  # RealNVP / Glow: half the channels go to the latent after each scale but the last

    def __post_init__(self) -> None:
        if min(self.channels, self.n_steps, self.n_scales) < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"CouplingConv needs positive channels, n_steps, n_scales and an odd kernel_size, "
                             f"got {self}")


class InvertibleLinear(Flow):
    """z = W x per position (Glow's invertible 1x1 convolution; a D x D linear map on vectors), W = P L (U + diag(s)).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular, s = sign * exp(log_s)
    (Kingma & Dhariwal 2018, LU-parametrised): log|det| = positions * sum log|s_i|, O(C) per step
    instead of a C x C determinant. Starts as a random rotation (seeded by torch's global RNG).

    `bias` (a (C,) non-persistent buffer, None unless `fold_actnorm` made the layer) adds c: z = W x + c,
    x = W^-1 (z - c).

    While gradients are off (evaluation, sampling) the assembled W and W^-1 are cached between calls
    (`cache_weights`, on by default), keyed on the storage and in-place version counter of every
    factor and on the count of torch.optim steps taken (a fused optimizer bumps no version counter):
    an optimizer step, `load_state_dict` or `.to()` changes the key, so a stale W is never
    used. (Writes through `.data` bypass version counters; call `clear_cache()` after such a write.)
    With gradients on, W is assembled in the graph at every call, as before.
    """

    cache_weights: bool = True  # class default; set False on an instance (or here) to assemble W at every call
    memory_format: torch.memory_format | None = None  # set by channels_last(flow): 4-D inputs made NHWC here

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(s.abs()).to(dtype))
        # set by fold_actnorm only; non-persistent: state_dicts of every other layer stay as they were
        self.register_buffer("bias", None, persistent=False)
        self._cache: dict[str, tuple[tuple, list, Tensor]] = {}

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """W = P L U, (C, C)."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """W^-1 = U^-1 L^-1 P^T by two triangular solves, (C, C)."""
        lower, upper = self._factors()
        l_inv_pt = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)

    # -- the evaluation cache ------------------------------------------------------------------
    def _factor_tensors(self) -> tuple[Tensor, ...]:
        return self.lower, self.upper, self.log_s, self.perm, self.sign_s

    def _cache_key(self) -> tuple:
        # storage address + in-place version of each factor: foreach Adam's update, load_state_dict's copy_ and
        # ActNorm-style fills bump the version; .to() / .data = ... give a new storage (kept alive by the cache, so an
        # address is not reused while its entry exists); fused optimizers bump no version, so every torch.optim step
        # (any optimizer's) invalidates too
        return (_OPTIMIZER_STEPS[0],) + tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                                              for t in self._factor_tensors())

    def _cached(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """make(), or its value from an earlier call with the same factors; only while gradients are off."""
        if not self.cache_weights or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return make()
        try:
            key = self._cache_key()
        except RuntimeError:  # factors without storage (functorch-batched, fake): nothing to key on
            return make()
        cache = self.__dict__.setdefault("_cache", {})  # (setdefault: modules pickled before the cache existed)
        hit = cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[2]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable outside inference_mode too
            value = make()
        cache[name] = (key, [t.untyped_storage() for t in self._factor_tensors()], value)
        return value

    def clear_cache(self) -> None:
        """Drop the cached W and W^-1 (only needed after writing a factor through `.data`)."""
        self.__dict__.get("_cache", {}).clear()

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: the cache is derived state, not copied
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # -- the map ---------------------------------------------------------------------------------
    def _mix(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """w x per position (+ bias)."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"InvertibleLinear expects (B, {self.num_channels}, ...), got {tuple(x.shape)}")
        if x.dim() == 2:
            return F.linear(x, w, bias)
        if x.dim() == 4:
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
            return F.conv2d(x, w[:, :, None, None], bias)
        out = torch.einsum("ij,bj...->bi...", w, x)
        return out if bias is None else out + bias.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self._mix(x, self._cached("weight", self.weight), getattr(self, "bias", None))
        positions = math.prod(x.shape[2:])
        return z, (self.log_s.sum() * positions).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        bias = getattr(self, "bias", None)
        if bias is not None:
            z = z - bias.view(1, -1, *([1] * (z.dim() - 2)))
        return self._mix(z, self._cached("inverse_weight", self.inverse_weight))

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class AffineCoupling(Flow):
    """z_a = x_a, z_b = (x_b + t) * sigmoid(h + 2) with (h, t) = net(x_a), split along dim 1 (Glow's affine coupling).

    x_a is the first C // 2 channels (or dimensions), x_b the rest; `net` maps (B, C // 2, ...) to
    (B, 2 (C - C // 2), ...), h first. log|det| = sum log sigmoid(h + 2); the inverse is
    x_b = z_b / sigmoid(h + 2) - t. The sigmoid keeps every scale in (0, 1): a step can only
    contract x_b, which Glow found stable (the ActNorm and the linear maps restore the scale).
    """

    def __init__(self, net: nn.Module, num_channels: int) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels (dimensions) to split, got {num_channels}")
        self.net, self.num_channels = net, num_channels
        self.split = num_channels // 2
        self.autocast_dtype: torch.dtype | None = None  # set by layers.training_precision: net under autocast

    def _scale_shift(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        """(log s, t) from the conditioning half."""
        if self.training and self.autocast_dtype is not None:
            with torch.autocast(xa.device.type, dtype=self.autocast_dtype):
                out = self.net(xa)
            out = out.to(xa.dtype)
        else:
            out = self.net(xa)
        nb = self.num_channels - self.split
        if out.shape[1] != 2 * nb:
            raise ValueError(f"the coupling net must return {2 * nb} channels, returned {out.shape[1]}")
        return F.logsigmoid(out[:, :nb] + 2.0), out[:, nb:]

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"AffineCoupling expects (B, {self.num_channels}, ...), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        xa, xb = x[:, : self.split], x[:, self.split:]
        log_s, t = self._scale_shift(xa)
        zb = (xb + t) * torch.exp(log_s)
        return torch.cat([xa, zb], 1), log_s.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        self._check(z)
        za, zb = z[:, : self.split], z[:, self.split:]
        log_s, t = self._scale_shift(za)
        return torch.cat([za, zb * torch.exp(-log_s) - t], 1)


class FactorOut(Flow):
    """Multi-scale split (RealNVP): x (C, H, W) -> [inner(x[:keep]) flattened, x[keep:] flattened], a (D,) vector.

    The first `keep` channels go on through `inner` (the next scales); the others leave for the
    latent unchanged. log|det| is inner's.
    """

    def __init__(self, keep: int, inner: Flow, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        if not 0 < keep < c:
            raise ValueError(f"FactorOut keeps 1 .. {c - 1} of {c} channels, got {keep}")
        self.keep, self.inner, self.input_shape = keep, inner, tuple(input_shape)
        self.inner_shape = inner.output_shape((keep, h, w))

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"FactorOut was built for samples of shape {self.input_shape}, got {tuple(x.shape[1:])}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        za, logdet = self.inner(x[:, : self.keep])
        return torch.cat([za.flatten(1), x[:, self.keep:].flatten(1)], 1), logdet

    def transform(self, x: Tensor) -> Tensor:
        self._check(x)
        return torch.cat([self.inner.transform(x[:, : self.keep]).flatten(1), x[:, self.keep:].flatten(1)], 1)

    def inverse(self, z: Tensor) -> Tensor:
        n_inner = math.prod(self.inner_shape)
        c, h, w = self.input_shape
        xa = self.inner.inverse(z[:, :n_inner].reshape(z.shape[0], *self.inner_shape))
        return torch.cat([xa, z[:, n_inner:].reshape(z.shape[0], c - self.keep, h, w)], 1)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(input_shape) != self.input_shape:
            raise ValueError(f"FactorOut was built for {self.input_shape}, asked for {tuple(input_shape)}")
        return (math.prod(input_shape),)


def _zero_last(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """The conditioner's last layer starts at zero: every coupling starts as z_b = x_b * sigmoid(2)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp_net(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    widths = (d_in, *hidden)
    net: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        net += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*net, _zero_last(nn.Linear(widths[-1], d_out)))


def _conv_net(c_in: int, hidden: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, k, padding=k // 2), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        _zero_last(nn.Conv2d(hidden, c_out, k, padding=k // 2)),
    )


def _step(c: int, net: nn.Module, actnorm: bool) -> list[Flow]:
    """[ActNorm] -> invertible linear map -> affine coupling, on c channels (dimensions)."""
    return [*([ActNorm(c)] if actnorm else []), InvertibleLinear(c), AffineCoupling(net, c)]


def _conv_scales(shape: tuple[int, int, int], arch: CouplingConv, actnorm: bool, scale: int) -> list[Flow]:
    """The layers from scale `scale` on: squeeze, n_steps steps, then the next scale (all channels, or after a
    FactorOut the first half)."""
    squeeze = Squeeze()
    c, h, w = squeeze.output_shape(shape)
    layers: list[Flow] = [squeeze]
    for _ in range(arch.n_steps):
        nb = c - c // 2
        layers += _step(c, _conv_net(c // 2, arch.channels, 2 * nb, arch.kernel_size), actnorm)
    if scale + 1 < arch.n_scales:
        if arch.factor_out:
            keep = c // 2
            inner = FlowSequence(_conv_scales((keep, h, w), arch, actnorm, scale + 1))
            layers.append(FactorOut(keep, inner, (c, h, w)))
        else:
            layers += _conv_scales((c, h, w), arch, actnorm, scale + 1)
    return layers


def build_coupling(data_shape: tuple[int, ...], cfg: ModelConfig) -> FlowSequence:
    """The coupling flow for per-sample data of `data_shape`: CouplingMLP for vectors (D,), CouplingConv for images.

    [Whiten] (cfg.whiten), then the steps; cfg.actnorm puts an ActNorm first in every step.
    """
    arch = cfg.arch
    pre: list[Flow] = [Whiten(tuple(data_shape), cfg.whiten_ridge)] if cfg.whiten else []
    if isinstance(arch, CouplingMLP):
        if len(data_shape) != 1:
            raise ValueError(f"arch coupling_mlp needs vector data (D,), got shape {data_shape}; use coupling_conv "
                             "for images")
        d = data_shape[0]
        if d < 2:
            raise ValueError(f"a coupling flow needs at least 2 dimensions to split, got D = {d}")
        steps = [layer for _ in range(arch.n_steps)
                 for layer in _step(d, _mlp_net(d // 2, arch.hidden, 2 * (d - d // 2)), cfg.actnorm)]
        return FlowSequence(pre + steps)
    if isinstance(arch, CouplingConv):
        if len(data_shape) != 3:
            raise ValueError(f"arch coupling_conv needs image data (C, H, W), got shape {data_shape}; use "
                             "coupling_mlp for vectors")
        c, h, w = data_shape
        if h % (2 ** arch.n_scales) or w % (2 ** arch.n_scales):
            raise ValueError(f"coupling_conv with {arch.n_scales} scales squeezes {arch.n_scales} times: height and "
                             f"width must be multiples of {2 ** arch.n_scales}, got {h} x {w}")
        return channels_last(FlowSequence(pre + _conv_scales((c, h, w), arch, cfg.actnorm, 0)))
    raise ValueError(f"build_coupling needs a coupling architecture (coupling_mlp, coupling_conv), got {arch!r}")


def fold_actnorm(flow: Flow) -> Flow:
    """An equivalent, eval-only copy of `flow`: every ActNorm directly followed by an InvertibleLinear (each step of
    build_coupling with actnorm) becomes one InvertibleLinear with a bias, one affine 1x1 convolution instead of an
    elementwise pass and a convolution.

    ActNorm a = (x - b) exp(-log_scale), then z = W a: z = W' x + c with W' = W diag(exp(-log_scale)) and
    c = -W' b. W' keeps the LU form, P L (U diag(exp(-log_scale))): U's columns scale, log_s becomes
    log_s - log_scale (so log|det| = positions * (sum log_s - sum log_scale), the pair's), and W'^-1 comes from the
    same triangular solves. The same function as flow in eval mode (log-det and inverse included, to round-off);
    a snapshot of the weights, returned in eval mode with gradients off: fold again after the weights change.
    """
    folded = copy.deepcopy(flow)
    _fold_pairs(folded)
    return folded.eval().requires_grad_(False)


@torch.no_grad()
def _folded(actnorm: ActNorm, linear: InvertibleLinear) -> InvertibleLinear:
    """One InvertibleLinear computing linear(actnorm(x)) (eval mode)."""
    if actnorm.num_channels != linear.num_channels:
        raise ValueError(f"cannot fold an ActNorm of {actnorm.num_channels} channels into an InvertibleLinear of "
                         f"{linear.num_channels}")
    layer = copy.deepcopy(linear)
    layer.upper.mul_(torch.exp(-actnorm.log_scale)[None, :])  # U diag(a): column j times a_j (diagonal in log_s)
    layer.log_s.sub_(actnorm.log_scale)
    shift = -(layer.weight() @ actnorm.bias)
    layer.bias = shift if linear.bias is None else shift + linear.bias
    return layer


def _fold_pairs(module: nn.Module) -> None:
    for child in module.children():  # FactorOut's inner flow, nested sequences
        _fold_pairs(child)
    if not isinstance(module, FlowSequence):
        return
    layers, out, i = list(module.layers), [], 0
    while i < len(layers):
        if i + 1 < len(layers) and isinstance(layers[i], ActNorm) and isinstance(layers[i + 1], InvertibleLinear):
            out.append(_folded(layers[i], layers[i + 1]))
            i += 2
        else:
            out.append(layers[i])
            i += 1
    module.layers = nn.ModuleList(out)


def channels_last(flow: nn.Module, on: bool = True) -> nn.Module:
    """`flow` with NHWC (channels_last) activations: every InvertibleLinear makes its 4-D input NHWC (a squeeze gives
    NCHW), so the couplings' slices, conditioners and concatenations that follow run NHWC; the conditioners' 4-D
    weights are converted too. The same function (float64 to round-off); vectors are untouched. build_coupling
    applies it to every CouplingConv (+11-20% training img/s on CPU, benchmarks/RESULTS.md); `on=False` returns
    to NCHW (the benchmarks' before). Returns flow."""
    fmt = torch.channels_last if on else torch.contiguous_format
    for m in flow.modules():
        if isinstance(m, InvertibleLinear):
            m.memory_format = torch.channels_last if on else None
        elif isinstance(m, AffineCoupling):
            m.net.to(memory_format=fmt)
    return flow


def compiled(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """`torch.compile(fn, **options)` as an opt-in, with a clean eager fallback: fn itself where compiling fails.

    fn is any callable torch.compile takes: a model (its forward, e.g. MixtureFlow's log p(x|k) for all classes,
    whose backward is then compiled too) or a function. When a call of the compiled fn raises, the call is run
    again eagerly: if that succeeds, the compiler was at fault (no C compiler, an unsupported op, ...), one
    RuntimeWarning says why, and every later call runs eagerly; if it raises too, that error (fn's own) propagates
    and compilation stays on. So fn should not change state before it can fail (a forward, not a whole training step
    with its optimizer update). The forward's compilation (where a missing C compiler shows) is covered; the
    backward graph, which inductor compiles at the first backward, fails there, outside this wrapper. Each new input
    shape, grad mode or train/eval switch compiles again (about a minute for the Fashion-MNIST coupling default's
    training step on one CPU thread, half that for evaluation). Nothing else changes: no global precision or compiler setting is touched, and code
    that does not call this runs eagerly as before (the float64 tests). `compiled(fn).eager()` says whether it fell
    back.
    """
    name = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        fast = torch.compile(fn, **options)
    except Exception as err:  # torch.compile itself unavailable (e.g. an unsupported Python)
        warnings.warn(f"torch.compile is unavailable here ({type(err).__name__}: {err}); {name} runs eagerly",
                      RuntimeWarning, stacklevel=2)
        return _Compiled(fn, fn, eager=True)
    return _Compiled(fn, fast, eager=False)


class _Compiled:
    """The callable `compiled` returns: the compiled fn until it fails, then fn (see `compiled`)."""

    def __init__(self, fn: Callable[..., Any], fast: Callable[..., Any], eager: bool) -> None:
        self.fn, self.fast, self._eager = fn, fast, eager

    def eager(self) -> bool:
        """Whether calls run eagerly (compiling failed or was impossible)."""
        return self._eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._eager:
            return self.fn(*args, **kwargs)
        try:
            return self.fast(*args, **kwargs)
        except Exception as err:
            out = self.fn(*args, **kwargs)  # fn's own error, if it has one, propagates from here
            self._eager = True
            name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
            why = " ".join(str(err).split())[:300]  # one line
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {why}); {name} runs eagerly from now on",
                          RuntimeWarning, stacklevel=2)
            return out
