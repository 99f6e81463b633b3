"""The dtype audit (CPU): every tensor the package creates takes its dtype from the model or the input, never from
torch's default dtype.

A model is built in the default dtype (like any nn.Module) and converted with ``model.to(dtype)``, the supported way
to get a float32 (or float64) model; there is no dtype field in the configs. Each case builds the model in the *other*
dtype than the default (float32 under the tests' float64 default, float64 under a float32 default), so a tensor made
with the default dtype shows up as a wrong dtype in an output, as a dtype clash, or, promoted away silently, in
`DefaultDtypeAudit`: a torch function mode that records every factory call (torch.zeros, torch.tensor, torch.randn,
...) made directly from mixflow_core code after the build with neither a dtype nor a tensor to take it from.

Per case a vector model (digits, MLP, with the Whiten layer) and an image model (1x8x8 generated levels, multi-scale
conv, Russian roulette), both with the data-dependent full-covariance prior (init="moments"): fit a few steps (ActNorm,
Whiten and prior init), evaluate, every density / posterior / latent output, the inverse, sample with and without a
generator, the interpolation and the sampler's render_png.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.data import Subset, TensorDataset

from mixflow_core import MLP, Conv, CouplingConv, CouplingMLP, Exact, MixtureFlow, ModelConfig, PowerSeries, PriorConfig, RussianRoulette, build_model
from mixflow_core.data import DataConfig, Splits, load_data
from mixflow_core.eval.diagnostics import latents
from mixflow_core.eval.metrics import evaluate, log_likelihood_table
from mixflow_core.flows.layers import ActNorm, Whiten
from mixflow_core.study.widgets import interpolation, render_png
from mixflow_core.training.config import RuntimeConfig, TrainConfig
from mixflow_core.training.fit import fit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (default dtype while the test runs, dtype of the model)
CASES = [(torch.float64, torch.float32), (torch.float32, torch.float64)]
CASE_IDS = ["float32-model-under-float64-default", "float64-model-under-float32-default"]

# factories whose floating result takes torch's default dtype unless given a dtype (or, for tensor / as_tensor, a
# tensor to copy it from); the *_like and Tensor.new_* variants take the dtype of their tensor and are not listed
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand,
    torch.randn, torch.normal, torch.arange, torch.linspace, torch.logspace, torch.eye,
}


class DefaultDtypeAudit(TorchFunctionMode):
    """Records (file, line, function) of every floating tensor a factory made with the default dtype, called directly
    from mixflow_core code (torch's own internals are not the package's)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[tuple[str, int, str], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func in _FACTORIES and kwargs.get("dtype") is None and isinstance(out, Tensor) and out.is_floating_point()
                and not (args and isinstance(args[0], Tensor))):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/mixflow_core/" in caller:
                site = (caller.split("/mixflow_core/")[-1], sys._getframe(1).f_lineno, func.__name__)
                self.sites[site] = self.sites.get(site, 0) + 1
        return out

    def report(self) -> str:
        return "; ".join(f"mixflow_core/{f}:{line} torch.{fn} (x{n})" for (f, line, fn), n in sorted(self.sites.items()))


def test_the_audit_sees_a_default_dtype_tensor_made_by_package_code():
    """The audit itself: a package function that makes a default-dtype tensor is reported, one that passes a dtype
    or copies a tensor's is not (guards against an audit that records nothing)."""
    from mixflow_core.flows.iresnet import logdet

    audit = DefaultDtypeAudit()
    code = compile("def made_here(x):\n    return torch.zeros(3), torch.zeros(3, dtype=x.dtype), torch.as_tensor(x)\n",
                   logdet.__file__, "exec")  # a function whose code lives in a mixflow_core file
    namespace = {"torch": torch}
    exec(code, namespace)
    with audit:
        namespace["made_here"](torch.ones(2, dtype=torch.float32))
    assert list(audit.sites) == [("flows/iresnet/logdet.py", 2, "zeros")], audit.sites


@pytest.fixture(params=CASES, ids=CASE_IDS)
def model_dtype(request, _float64_one_thread):
    """The model's dtype; the default dtype is set to the other one for the test (after conftest's float64 fixture,
    and restored before conftest restores its own)."""
    default, dtype = request.param
    torch.set_default_dtype(default)
    try:
        yield dtype
    finally:
        torch.set_default_dtype(torch.float64)


# -- data and models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> Splits:
    """Loaded once per module (the sklearn import and split take a couple of seconds)."""
    return load_data(DataConfig("digits", train_limit=100))


@pytest.fixture(scope="module", autouse=True)
def _warm_imports() -> None:
    """torch.optim's first optimiser imports torch._dynamo lazily (seconds): once here, not inside the first test."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _images(shape=(1, 8, 8), k: int = 3, levels: int = 256) -> Splits:
    """Generated uint8 images (as the idx / CIFAR readers return them), balanced labels."""
    gen = torch.Generator().manual_seed(0)

    def ds(n: int) -> TensorDataset:
        x = torch.randint(0, levels, (n, *shape), generator=gen, dtype=torch.uint8)
        return TensorDataset(x, torch.arange(n) % k)

    return Splits(ds(48), ds(12), ds(12), shape, k, levels, tuple(f"c{i}" for i in range(k)))


MOMENTS_FULL = PriorConfig(init="moments", covariance="full")
VECTOR = ModelConfig(arch=MLP(hidden=(16,), n_blocks=2), logdet=PowerSeries(n_terms=2), eval_logdet=Exact(),
                     whiten=True)
IMAGE = ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2),
                    logdet=RussianRoulette(n_exact_terms=2, neumann_gradient=True))
COUPLING_VECTOR = ModelConfig(arch=CouplingMLP(hidden=(16,), n_steps=2), whiten=True)
COUPLING_IMAGE = ModelConfig(arch=CouplingConv(channels=4, n_steps=1, n_scales=2, factor_out=True))


def _model(data: Splits, cfg: ModelConfig, dtype: torch.dtype) -> MixtureFlow:
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg, MOMENTS_FULL, data.class_counts())
    model = model.to(dtype)  # the supported way to choose the model's dtype
    assert all(t.dtype == dtype for t in model.state_dict().values() if t.is_floating_point())
    return model


# -- the checks -----------------------------------------------------------------------------------------
def _assert_float_outputs(outputs: dict[str, Tensor], dtype: torch.dtype) -> None:
    wrong = {name: t.dtype for name, t in outputs.items() if t.is_floating_point() and t.dtype != dtype}
    assert not wrong, f"outputs not in the model's dtype {dtype}: {wrong}"
    assert all(t.is_floating_point() for t in outputs.values()), [n for n, t in outputs.items() if not t.is_floating_point()]
    nonfinite = [name for name, t in outputs.items() if not torch.isfinite(t).all()]
    assert not nonfinite, f"non-finite outputs: {nonfinite}"


def _assert_levels(x: Tensor, model: MixtureFlow, n: int, dtype: torch.dtype) -> None:
    levels = model.preprocess.levels
    assert x.shape == (n, *model.data_shape) and x.dtype == dtype
    assert torch.isfinite(x).all() and torch.equal(x, torch.round(x))
    assert float(x.min()) >= 0 and float(x.max()) <= levels - 1


def _exercise(model: MixtureFlow, data: Splits, dtype: torch.dtype, draws: int, steps: int) -> None:
    """fit (inits), evaluate, densities, latents, inverse, sampling and render_png under the audit; then the checks."""
    train = TrainConfig(batch_size=16 if len(data.train) < 64 else 32, early_stopping="none")
    runtime = RuntimeConfig(epochs=1, progress=False, eval_batch_size=64)
    test = Subset(data.test, range(min(64, len(data.test))))
    x_levels, y = data.test.tensors[0][:6], data.test.tensors[1][:6]  # uint8 levels, as stored
    audit = DefaultDtypeAudit()
    with audit:
        history = fit(model, data, train, runtime)
        metrics = evaluate(model, test, batch_size=32, draws=draws)
        table, _ = log_likelihood_table(model, test, batch_size=32, draws=draws)
        z_data, _ = latents(model, test, batch_size=32)
        with torch.no_grad():
            model.eval()
            z, logdet = model.latent_and_logdet(x_levels)
            h, _ = model.preprocess(x_levels.to(dtype))
            h_back = model.flow.inverse(model.flow.transform(h))
            outputs = {
                "log_prob_all": model.log_prob_all(x_levels),
                "log_prob_all(float64 input)": model.log_prob_all(x_levels.to(torch.float64)),
                "log_prob_all(float32 input)": model.log_prob_all(x_levels.to(torch.float32)),
                "log_prob": model.log_prob(x_levels, y),
                "log_joint_all": model.log_joint_all(x_levels),
                "marginal_log_prob": model.marginal_log_prob(x_levels),
                "posterior": model.posterior(x_levels),
                "bits_per_dim": model.bits_per_dim(x_levels, y),
                "bits_per_dim(marginal)": model.bits_per_dim(x_levels),
                "latent": model.latent(x_levels),
                "latent_and_logdet z": z,
                "latent_and_logdet logdet": logdet,
                "log_likelihood_table": table,
                "latents": z_data,
                "flow.inverse": h_back,
                "decode": model.decode(z),
                "prior.log_prob_all": model.prior.log_prob_all(z),
                "prior.mahalanobis_sq": model.prior.mahalanobis_sq(z),
                "prior.mean_distances": model.prior.mean_distances(),
                "prior.covariances": model.prior.covariances(),
                "prior.sample": model.prior.sample(y, 0.7),
                "prior.sample(generator)": model.prior.sample(y, 0.7, torch.Generator().manual_seed(0)),
                "interpolation": interpolation(model, 0, 1, steps=3),
            }
        samples = model.sample(1, n=5, temperature=0.7)
        seeded = model.sample(1, n=5, temperature=0.7, generator=torch.Generator().manual_seed(0))
        labelled = model.sample(torch.tensor([0, 1, 2]), temperature=1.0, generator=torch.Generator().manual_seed(1))
        png = render_png(model, 0, 0.7, 4, 0, data.data_shape, data.levels, data.class_names)

    assert not audit.sites, f"tensors made with the default dtype {torch.get_default_dtype()}: {audit.report()}"
    # the model kept its dtype through training and its data-dependent inits ran
    assert all(t.dtype == dtype for t in model.state_dict().values() if t.is_floating_point())
    assert not model.prior.needs_data_init
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, (ActNorm, Whiten)))
    assert len(history.epochs) == 1 and history.skipped_batches == 0
    assert all(math.isfinite(v) for k, v in history.epochs[0].items() if k != "epoch")
    assert len(data.train) // train.batch_size == steps
    assert all(math.isfinite(metrics[k]) for k in ("accuracy", "bpd_conditional", "bpd_marginal", "ece"))
    assert metrics["n"] == len(test) and metrics["draws"] == draws

    _assert_float_outputs(outputs, dtype)
    torch.testing.assert_close(h_back, h, rtol=0, atol=1e-3)  # the fixed-point inverse, in the model's dtype
    torch.testing.assert_close(outputs["posterior"].sum(1), torch.ones(6, dtype=dtype))
    for name in ("log_prob_all(float64 input)", "log_prob_all(float32 input)"):  # the input's dtype does not leak
        assert outputs[name].shape == (6, model.num_classes)
    _assert_levels(samples, model, 5, dtype)
    _assert_levels(seeded, model, 5, dtype)
    _assert_levels(labelled, model, 3, dtype)
    again = model.sample(1, n=5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded, again)  # the generator, not the global RNG, drew them
    assert png.startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("cfg", [VECTOR, COUPLING_VECTOR], ids=["iresnet", "coupling"])
def test_vector_model_keeps_its_dtype(digits, model_dtype, cfg):
    """digits MLP (i-ResNet or coupling) with Whiten and the moments full-covariance prior; evaluate with 2 draws
    (exact eval log-det)."""
    _exercise(_model(digits, cfg, model_dtype), digits, model_dtype, draws=2, steps=2)


@pytest.mark.parametrize("cfg", [IMAGE, COUPLING_IMAGE], ids=["iresnet", "coupling"])
def test_image_model_keeps_its_dtype(model_dtype, cfg):
    """1x8x8 conv model (2 scales; i-ResNet with Russian roulette and the Neumann gradient, or coupling with factor-out),
    the moments full-covariance prior."""
    data = _images()
    _exercise(_model(data, cfg, model_dtype), data, model_dtype, draws=1, steps=3)


def test_actnorm_init_in_the_model_dtype(model_dtype):
    """ActNorm's data-dependent init on input of the layer's dtype: zero mean, unit variance per channel, nothing
    promoted to the default dtype (the first forward sets the parameters from the batch in place)."""
    layer = ActNorm(3).to(model_dtype).train()
    x = (1.5 + torch.linspace(0.5, 3.0, 3, dtype=model_dtype).view(1, 3, 1, 1)
         * torch.randn(16, 3, 4, 4, dtype=model_dtype))
    audit = DefaultDtypeAudit()
    with audit:
        z, logdet = layer(x)
        back = layer.inverse(z)
    assert not audit.sites, audit.report()
    assert bool(layer.initialized)
    assert z.dtype == logdet.dtype == back.dtype == layer.bias.dtype == layer.log_scale.dtype == model_dtype
    per_channel = z.transpose(0, 1).reshape(3, -1)
    tol = 1e-5 if model_dtype == torch.float32 else 1e-12
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, dtype=model_dtype), rtol=0, atol=tol)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3, dtype=model_dtype), rtol=0, atol=tol)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4 if model_dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("cfg", [IMAGE, COUPLING_IMAGE], ids=["iresnet", "coupling"])
def test_bf16_training_keeps_the_model_dtype(model_dtype, cfg):
    """runtime.precision="bf16" (g / the coupling nets under bfloat16 autocast in training steps): the weights, the
    prior and the training records stay in the model's dtype, and nothing is made in the default dtype."""
    data = _images()
    model = _model(data, cfg, model_dtype)
    audit = DefaultDtypeAudit()
    with audit:
        history = fit(model, data, TrainConfig(batch_size=16, early_stopping="none"),
                      RuntimeConfig(epochs=1, progress=False, eval_batch_size=64, precision="bf16"))
        out = model.log_prob_all(data.test.tensors[0][:4])
    assert not audit.sites, audit.report()
    assert all(t.dtype == model_dtype for t in model.state_dict().values() if t.is_floating_point())
    assert out.dtype == model_dtype and bool(torch.isfinite(out).all())
    assert all(math.isfinite(v) for k, v in history.epochs[0].items() if k != "epoch")
