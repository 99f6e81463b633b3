"""The GPU path, proven: training, resuming, evaluation, sampling, the sampler widget, the data-dependent inits,
checkpoints moving between devices, torchrun on nccl, and host syncs per training step, all on device "cuda".

Every test is marked `cuda` and skipped without a CUDA GPU (`pytest -m cuda` runs just these). Models are float32
here, as on a GPU in practice: the package builds a model in torch's default dtype (the command line leaves it at
float32), so the tests set the default to float32 instead of the float64 of tests/conftest.py. Tiny models and the
digits smoke data (sklearn, offline) keep each test to seconds; where CPU and GPU are compared the model is made
deterministic (no dequantisation noise, exact eval log-det), since the two devices draw different random numbers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixflow_core import Conv, Exact, MixtureFlow, ModelConfig, PowerSeries, PriorConfig, build_model
from mixflow_core.cli import main
from mixflow_core.data import Splits, load_data
from mixflow_core.eval.diagnostics import latents
from mixflow_core.eval.metrics import evaluate
from mixflow_core.flows.layers import ActNorm
from mixflow_core.flows.priors import class_moments
from mixflow_core.study.widgets import render_png
from mixflow_core.training.checkpoint import load_checkpoint
from mixflow_core.training.config import RunConfig, RuntimeConfig, TrainConfig
from mixflow_core.training.distributed import DistContext
from mixflow_core.training.fit import History, _init_actnorm, _init_prior, _State, _step, fit, make_optimizer
from mixflow_core.training.profiles import get_profile
from mixflow_core.training.runs import evaluate_seeded, load_run_model, train_run
from tests.helpers import off_centre_data

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DETERMINISTIC = {"dequantize": False, "eval_logdet": Exact()}  # the same numbers on CPU and GPU, up to round-off


@pytest.fixture(autouse=True)
def _float32(_float64_one_thread):
    """float32 models, as on a GPU in practice (after conftest's float64 fixture, restored before it restores)."""
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.fixture(scope="module")
def digits() -> Splits:
    """The digits smoke profile's data (270 training images), which train_run loads too."""
    return load_data(get_profile("digits", "smoke").data)


def _digits_rc(*, model: dict | None = None, prior: dict | None = None, **runtime) -> RunConfig:
    """The digits smoke profile on the GPU, fields of model / prior / runtime replaced."""
    rc = get_profile("digits", "smoke")
    return replace(rc, model=replace(rc.model, **(model or {})), prior=replace(rc.prior, **(prior or {})),
                   runtime=replace(rc.runtime, **{"device": "cuda", "progress": False, **runtime}))


def _build(rc: RunConfig, data: Splits, seed: int = 0) -> MixtureFlow:
    torch.manual_seed(seed)
    return build_model(data.data_shape, data.num_classes, data.levels, rc.model, rc.prior, data.class_counts())


def _initialised(rc: RunConfig, data: Splits) -> MixtureFlow:
    """A CPU model with its ActNorms initialised from training data (fit's own init), in eval mode."""
    model = _build(rc, data)
    _init_actnorm(model, data.train, 256, torch.device("cpu"))
    return model.eval()


def _device_types(model: MixtureFlow) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


def _assert_levels(x: torch.Tensor, n: int, data: Splits) -> None:
    assert x.device.type == "cuda" and x.dtype == torch.float32 and x.shape == (n, *data.data_shape)
    assert bool(torch.isfinite(x).all()) and torch.equal(x, torch.round(x))
    assert float(x.min()) >= 0 and float(x.max()) <= data.levels - 1


# -- training and resuming -------------------------------------------------------------------------------
def test_fit_checkpoint_and_resume_on_cuda(tmp_path, digits):
    """3 epochs straight vs 1 epoch, then a resume to 3 from the checkpoint (RNG states of CPU and GPU restored):
    the same records and weights up to GPU round-off."""
    rc = _digits_rc(epochs=3)
    whole = _build(rc, digits)
    h_whole = fit(whole, digits, rc.train, rc.runtime, run_dir=tmp_path / "whole")
    assert _device_types(whole) == {"cuda"}

    first = _build(rc, digits)
    fit(first, digits, rc.train, replace(rc.runtime, epochs=1), run_dir=tmp_path / "cut")
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert set(ckpt["rng"][0]) == {"torch", "cuda"}  # the GPU's RNG state is saved too
    second = _build(rc, digits)  # a fresh process would start like this
    h_resumed = fit(second, digits, rc.train, rc.runtime, run_dir=tmp_path / "cut", resume=True)

    assert _device_types(second) == {"cuda"}
    assert len(h_resumed.epochs) == 3 and h_resumed.stopped == h_whole.stopped == "completed"
    for a, b in zip(h_whole.epochs, h_resumed.epochs):
        for key in ("train_loss", "val_loss", "val_bpd", "inverse_error"):
            assert math.isfinite(b[key])
        for key in ("train_loss", "val_loss", "val_bpd"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["epoch"], key)
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=0.07), a["epoch"]  # 30 images: 2 may flip
    for (name, p), q in zip(whole.named_parameters(), second.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    # as saved (no map_location): the weights on the GPU, Adam's step counts on the CPU in the resumed run too (on the
    # GPU, every optimiser step would sync the host once per parameter)
    for run in ("whole", "cut"):
        saved = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
        steps = [s["step"] for s in saved["optimizer"]["state"].values()]
        assert steps and {t.device.type for t in steps} == {"cpu"}, run
        assert {t.device.type for t in saved["model"].values()} == {"cuda"}, run


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")], ids=["cpu-then-cuda", "cuda-then-cpu"])
def test_resume_on_the_other_device(tmp_path, digits, first, then):
    """runtime.device may change on resume: a checkpoint written on one device continues on the other (its model,
    optimiser and RNG states mapped there)."""
    rc = _digits_rc(epochs=2)
    h_first = fit(_build(rc, digits), digits, rc.train, replace(rc.runtime, epochs=1, device=first), run_dir=tmp_path)
    model = _build(rc, digits)
    h = fit(model, digits, rc.train, replace(rc.runtime, device=then), run_dir=tmp_path, resume=True)
    assert _device_types(model) == {then}
    assert len(h.epochs) == 2 and h.epochs[0] == h_first.epochs[0] and h.stopped == "completed"
    assert all(math.isfinite(v) for k, v in h.epochs[1].items() if k not in ("epoch",))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ("cuda" in ckpt["rng"][0]) == (then == "cuda")


# -- evaluation --------------------------------------------------------------------------------------------
def test_evaluate_on_cuda(digits):
    """The same weights evaluate alike on CPU and GPU (deterministic model); with dequantisation noise drawn on the
    GPU, evaluate_seeded reproduces itself and averages 4 draws."""
    cpu_model = _initialised(_digits_rc(model=DETERMINISTIC), digits)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    on_cpu = evaluate(cpu_model, digits.test, 128, "cpu")
    on_gpu = evaluate(gpu_model, digits.test, 128, CUDA)
    assert on_gpu["n"] == on_cpu["n"] == len(digits.test)
    for key in ("bpd_conditional", "bpd_marginal"):
        assert math.isfinite(on_gpu[key]) and on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-4), key
    assert on_gpu["accuracy"] == pytest.approx(on_cpu["accuracy"], abs=2.5 / len(digits.test))  # near-ties only
    assert on_gpu["ece"] == pytest.approx(on_cpu["ece"], abs=1e-2)
    assert sum(map(sum, on_gpu["confusion"])) == len(digits.test)
    assert _device_types(gpu_model) == {"cuda"} and not gpu_model.training  # evaluate restores the mode

    gpu_model.preprocess.dequantize = True  # noise from the GPU's RNG; the exact log-det allows draws > 1
    a = evaluate_seeded(gpu_model, digits.test, 0, 128, CUDA, draws=4)
    b = evaluate_seeded(gpu_model, digits.test, 0, 128, CUDA, draws=4)
    assert a["draws"] == 4 and all(math.isfinite(a[k]) for k in ("bpd_conditional", "bpd_marginal", "ece"))
    assert a["bpd_conditional"] == pytest.approx(b["bpd_conditional"], rel=1e-6)
    assert a["accuracy"] == b["accuracy"]


# -- sampling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_sample_with_a_generator_on_a_cuda_model(digits, generator_device):
    """A CPU torch.Generator with a CUDA model (the classic device-mismatch crash) and a CUDA generator both work:
    samples on the model's device, finite integer levels, reproducible from the generator's seed; a CPU generator
    draws the same latents as it does for the same model on the CPU."""
    cpu_model = _initialised(_digits_rc(), digits)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=generator_device).manual_seed(seed)

    x = gpu_model.sample(3, n=16, temperature=0.7, generator=gen(0))
    _assert_levels(x, 16, digits)
    assert torch.equal(x, gpu_model.sample(3, n=16, temperature=0.7, generator=gen(0)))
    labels = torch.tensor([0, 1, 2, 9])  # on the CPU: moved to the model's device
    _assert_levels(gpu_model.sample(labels, temperature=1.0, generator=gen(1)), 4, digits)
    _assert_levels(gpu_model.sample(labels.to(CUDA), temperature=0.0, generator=gen(1)), 4, digits)
    z = gpu_model.prior.sample(labels, 0.7, gen(2))
    assert z.device.type == "cuda" and z.dtype == torch.float32
    if generator_device == "cpu":
        z_cpu = cpu_model.prior.sample(labels, 0.7, torch.Generator().manual_seed(2))
        torch.testing.assert_close(z.cpu(), z_cpu, rtol=1e-5, atol=1e-5)
    _assert_levels(gpu_model.sample(5, n=4), 4, digits)  # no generator: the global CUDA RNG


def test_render_png_with_a_cuda_model(digits):
    """The sampler widget's image (a CUDA generator on the model's device) as PNG bytes, the same for the same seed."""
    model = _initialised(_digits_rc(), digits).to(CUDA)
    args = (model, 3, 0.7, 6, 0, digits.data_shape, digits.levels, digits.class_names)
    png = render_png(*args)
    assert isinstance(png, bytes) and png.startswith(PNG_SIGNATURE)
    assert render_png(*args) == png
    assert render_png(model, 3, 0.7, 6, 1, digits.data_shape, digits.levels, digits.class_names) != png


# -- data-dependent initialisation ---------------------------------------------------------------------------------
def test_actnorm_data_init_on_cuda(digits):
    """ActNorm's first training forward sets its parameters on the GPU (zero mean, unit variance per channel), and
    fit's ActNorm init initialises every ActNorm of a CUDA model."""
    layer = ActNorm(3).to(CUDA).train()
    x = off_centre_data((3, 4, 4), batch=64).to(CUDA)
    z, logdet = layer(x)
    assert bool(layer.initialized) and layer.bias.device.type == layer.log_scale.device.type == "cuda"
    assert z.device.type == logdet.device.type == "cuda" and logdet.shape == (64,)
    per_channel = z.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, device=CUDA), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3, device=CUDA), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=1e-5)

    model = _build(_digits_rc(), digits).to(CUDA)
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert norms and not any(bool(m.initialized) for m in norms)
    _init_actnorm(model, digits.train, 64, CUDA)
    assert all(bool(m.initialized) for m in norms)
    assert _device_types(model) == {"cuda"}
    first = norms[0]  # it saw the preprocessed training batch: a per-dimension scale of order 1, not the init's 0
    assert bool(torch.isfinite(first.log_scale).all()) and float(first.log_scale.detach().abs().max()) > 0


def test_moments_full_covariance_prior_init_on_cuda(digits):
    """PriorConfig(init="moments", covariance="full") initialised on the GPU: the class means and covariances
    (+ ridge) of the initial flow's training latents, as recomputed on the CPU; then fit trains from it on the GPU."""
    prior = {"init": "moments", "covariance": "full"}
    rc = _digits_rc(model=DETERMINISTIC, prior=prior)
    model = _build(rc, digits).to(CUDA)
    _init_actnorm(model, digits.train, 64, CUDA)
    assert model.prior.needs_data_init
    _init_prior(model, digits.train, 500, CUDA)
    assert not model.prior.needs_data_init
    assert {model.prior.means.device.type, model.prior.log_scales.device.type, model.prior.tril.device.type} == {"cuda"}

    reference = copy.deepcopy(model).cpu()
    z, y = latents(reference, digits.train, 500, "cpu")
    moments = class_moments([(z, y)], digits.num_classes)
    d = z.shape[1]
    expected = moments.covs + rc.prior.moments_ridge * torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(model.prior.means.detach().cpu().double(), moments.means, rtol=1e-4, atol=1e-4)
    cov = model.prior.covariances().detach().cpu().double()
    torch.testing.assert_close(cov, expected, rtol=1e-3, atol=1e-3)
    assert (cov[0] - torch.diag(torch.diagonal(cov[0]))).abs().max() > 1e-3  # full, not diagonal

    trained = _build(_digits_rc(prior=prior), digits)
    history = fit(trained, digits, rc.train, replace(rc.runtime, epochs=1))
    assert not trained.prior.needs_data_init and _device_types(trained) == {"cuda"}
    assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["val_bpd"]) for e in history.epochs)


# -- checkpoints between devices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("written, read", [("cuda", "cpu"), ("cpu", "cuda")], ids=["cuda-to-cpu", "cpu-to-cuda"])
def test_checkpoint_moves_between_devices(tmp_path, digits, written, read):
    """A run trained on one device loads on the other with the same log-probs (deterministic model), reproduces its
    metrics.json there, and `mixflow evaluate` / `mixflow sample --device` work on it."""
    rc = _digits_rc(epochs=1, device=written, model=DETERMINISTIC)
    run = tmp_path / "run"
    _, metrics = train_run(rc, run)
    there, *_ = load_run_model(run, written)
    here, *_ = load_run_model(run, read)
    assert _device_types(there) == {written} and _device_types(here) == {read}
    x, y = digits.test.tensors[0][:64], digits.test.tensors[1][:64]
    with torch.no_grad():
        a = there.log_prob(x.to(written), y.to(written)).cpu()
        b = here.log_prob(x.to(read), y.to(read)).cpu()
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
    device = here.prior.means.device
    m = evaluate_seeded(here, digits.test, rc.train.seed, rc.runtime.eval_batch_size, device)
    assert m["bpd_conditional"] == pytest.approx(metrics["test"]["bpd_conditional"], rel=1e-4)

    assert main(["evaluate", str(run), "--device", read, "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == len(digits.test)
    assert main(["sample", str(run), "--device", read, "--n", "4", "--out", str(tmp_path / "samples.png")]) == 0
    assert (tmp_path / "samples.png").read_bytes().startswith(PNG_SIGNATURE)


# -- torchrun ------------------------------------------------------------------------------------------------------
def _torchrun_train(tmp_path: Path, nproc: int) -> Path:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mixflow_core", "train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(run),
           "--device", "cuda"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test: accuracy" in proc.stdout  # rank 0 printed its summary
    return run


def _check_cuda_run(run: Path, ranks: int) -> None:
    files = sorted(p.name for p in run.iterdir())
    assert {"config.json", "checkpoint.pt", "history.json", "metrics.json"} <= set(files)
    assert not [f for f in files if f.endswith(".tmp")]
    assert json.loads((run / "config.json").read_text())["runtime"]["device"] == "cuda"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert len(ckpt["rng"]) == ranks and all("cuda" in s for s in ckpt["rng"])  # every rank trained on a GPU
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["bpd_conditional"]) and 0.0 <= metrics["test"]["accuracy"] <= 1.0


def test_torchrun_one_process_on_cuda(tmp_path):
    """`torchrun --nproc_per_node 1 -m mixflow_core train --device cuda`: LOCAL_RANK picks the GPU, rank 0 writes the
    run. (With one process fit needs no process group; the nccl collectives are the next test's, given 2 GPUs.)"""
    _check_cuda_run(_torchrun_train(tmp_path, 1), ranks=1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl with 2 processes needs 2 GPUs")
def test_torchrun_two_processes_on_nccl(tmp_path):
    """2 processes, one GPU each: DistributedDataParallel on nccl, RNG states gathered from both ranks."""
    _check_cuda_run(_torchrun_train(tmp_path, 2), ranks=2)


# -- host syncs per training step ----------------------------------------------------------------------------------
def _sync_warnings_of_a_step(n_blocks: int) -> list[str]:
    """The synchronising CUDA operations (set_sync_debug_mode("warn")) of one training step of fit (_step) of a conv
    model with n_blocks blocks per scale, after two warm-up steps (ActNorm init, lazy CUDA state)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=Conv(channels=8, n_blocks=n_blocks, n_scales=2), logdet=PowerSeries(n_terms=2))
    model = build_model((1, 8, 8), 10, 256, cfg, PriorConfig()).to(CUDA).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 1, 8, 8), generator=gen, dtype=torch.uint8).to(CUDA)
    y = (torch.arange(32) % 10).to(CUDA)
    train, runtime = TrainConfig(batch_size=32, early_stopping="none"), RuntimeConfig(device="cuda", progress=False)
    opt, state, ctx = make_optimizer(model, train), _State(History()), DistContext()
    for _ in range(2):
        assert _step(model, model, x, y, opt, train, runtime, state, ctx, 0) is not None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = _step(model, model, x, y, opt, train, runtime, state, ctx, 0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert loss is not None and math.isfinite(loss)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def test_host_syncs_per_training_step_do_not_grow_with_depth():
    """A training step's host syncs (the input check, the non-finite guard, the loss) are a fixed number, not one or
    more per layer: 3 blocks per scale sync no more often than 1 block per scale."""
    shallow, deep = _sync_warnings_of_a_step(1), _sync_warnings_of_a_step(3)
    assert shallow, "set_sync_debug_mode reported no sync at all: the loss's .item() alone is one"
    assert len(deep) <= len(shallow), (f"{len(shallow)} syncs with 1 block per scale, {len(deep)} with 3 "
                                       f"(the deep model's: {deep[:3]} ...)")
