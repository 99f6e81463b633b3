"""fit(model, data, cfg, runtime): learning, resume = uninterrupted run, atomic checkpoints, NaN guard,
early stopping, optimiser groups, DDP under torchrun (2 CPU processes, gloo), time budget."""

import copy
import pickle
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch

from mixflow_core import MLP, Exact, Hybrid, Likelihood, MixtureFlow, PushAway, build_model
from mixflow_core.data import Splits, load_data
from mixflow_core.eval.metrics import evaluate, log_likelihood_table
from mixflow_core.training.checkpoint import CheckpointError, load_checkpoint
from mixflow_core.training.config import RunConfig, RuntimeConfig, TrainConfig
from mixflow_core.training.fit import History, NonFiniteLossError, fit, make_optimizer
from mixflow_core.training.io import save_torch
from mixflow_core.training.profiles import get_profile
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
TIMING_FIELDS = {"epoch_seconds"}


# -- helpers -----------------------------------------------------------------------------------


@cache
def _data(dataset: str) -> Splits:
    return load_data(get_profile(dataset, "smoke").data)


RUNTIME_FIELDS = set(RuntimeConfig.__dataclass_fields__)


def with_fields(rc: RunConfig, **fields) -> tuple[TrainConfig, RuntimeConfig]:
    """(train, runtime) of `rc` with fields replaced, each in the config it belongs to."""
    runtime = {k: v for k, v in fields.items() if k in RUNTIME_FIELDS}
    train = {k: v for k, v in fields.items() if k not in RUNTIME_FIELDS}
    return replace(rc.train, **train), replace(rc.runtime, **runtime)


def smoke(dataset: str = "digits", *, model: dict | None = None, prior: dict | None = None, **fields) -> RunConfig:
    """The smoke profile with fields replaced (train and runtime fields as keyword arguments)."""
    rc = get_profile(dataset, "smoke")
    train, runtime = with_fields(rc, **fields)
    return replace(rc, model=replace(rc.model, **(model or {})), prior=replace(rc.prior, **(prior or {})),
                   train=train, runtime=runtime)


def build(rc: RunConfig, seed: int = 0) -> tuple[MixtureFlow, Splits]:
    data = _data(rc.data.name)
    torch.manual_seed(seed)
    model = build_model(data.data_shape, data.num_classes, data.levels, rc.model, rc.prior, data.class_counts())
    return model, data


EXACT_EVAL = {"eval_logdet": Exact()}  # with continuous toy2d (no dequantisation): deterministic evaluation


def metrics_only(history: History) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in history.epochs]


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def params_snapshot(model: MixtureFlow) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def init_actnorm(model: MixtureFlow, data: Splits) -> None:
    """Data-dependent ActNorm init before fit (fit's own init is then a no-op), so a snapshot is final."""
    x = torch.stack([data.train[i][0] for i in range(256)])
    model.train()
    with torch.no_grad():
        model.log_prob_all(x)


# -- learning ----------------------------------------------------------------------------------


def test_fit_learns_toy2d():
    """20 epochs at lr 2e-2: val acc ended in [0.74, 1.0] over init/train seeds 0..9 (chance 0.5)."""
    rc = smoke("toy2d", epochs=20, lr=2e-2)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime)
    assert history.stopped == "completed" and len(history.epochs) == 20
    val_loss, train_loss = history.column("val_loss"), history.column("train_loss")
    assert val_loss[-1] < val_loss[0]
    assert train_loss[-1] < train_loss[0]
    assert sum(b < a for a, b in zip(train_loss, train_loss[1:])) >= 12  # mostly decreasing
    assert history.column("val_acc")[-1] > 0.7
    assert all(math.isfinite(v) for e in history.epochs for v in e.values())
    assert not model.training  # fit returns the model in eval mode


def test_fit_on_float32_data_with_a_float64_model_without_actnorm():
    """toy2d points are float32; the model casts them to its dtype (no ActNorm type promotion to rely on)."""
    rc = smoke("toy2d", epochs=1, model={"actnorm": False})
    model, data = build(rc)
    assert data.train.tensors[0].dtype == torch.float32 and model.prior.means.dtype == torch.float64
    history = fit(model, data, rc.train, rc.runtime)
    assert math.isfinite(history.epochs[0]["val_loss"])


def test_fit_learns_digits():
    rc = smoke("digits", epochs=6)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime)
    val_loss, train_loss = history.column("val_loss"), history.column("train_loss")
    assert val_loss[-1] < val_loss[0]
    assert train_loss[-1] < train_loss[0]
    assert all(b < a for a, b in zip(train_loss, train_loss[1:]))  # hybrid loss with beta=64 falls every epoch
    assert history.column("val_bpd")[-1] < history.column("val_bpd")[0]
    assert set(history.epochs[0]) >= {"epoch", "train_loss", "val_loss", "val_bpd", "val_acc", "inverse_error",
                                      "mean_dist_min_sigma", "mean_dist_median_sigma", "bhattacharyya_mean",
                                      "bhattacharyya_max", "epoch_seconds"}
    assert max(history.column("inverse_error")) < 1e-4


# -- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("early_stopping", ["none", "val_bpd"])
def test_resume_equals_uninterrupted_run(tmp_path, early_stopping):
    rc = smoke("digits", epochs=4, early_stopping=early_stopping)
    whole, data = build(rc)
    h_whole = fit(whole, data, rc.train, rc.runtime, run_dir=tmp_path / "a")

    first, _ = build(rc)
    fit(first, data, *with_fields(rc, epochs=2), run_dir=tmp_path / "b")
    second, _ = build(rc)  # a fresh process would start like this
    h_resumed = fit(second, data, rc.train, rc.runtime, run_dir=tmp_path / "b", resume=True)

    assert_state_dicts_equal(whole.state_dict(), second.state_dict())
    assert len(h_resumed.epochs) == 4
    assert metrics_only(h_resumed) == metrics_only(h_whole)
    assert (h_resumed.best_epoch, h_resumed.stopped, h_resumed.skipped_batches) == (
        h_whole.best_epoch, h_whole.stopped, h_whole.skipped_batches)
    ckpt_a, ckpt_b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt_a["epoch"] == ckpt_b["epoch"] == 3
    assert_state_dicts_equal(ckpt_a["model"], ckpt_b["model"])


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    rc = smoke("digits", epochs=1)
    a, data = build(rc)
    b, _ = build(rc)
    fit(a, data, rc.train, rc.runtime)
    fit(b, data, rc.train, rc.runtime, run_dir=tmp_path / "new", resume=True)
    assert_state_dicts_equal(a.state_dict(), b.state_dict())


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_written_atomically_and_complete(tmp_path):
    rc = smoke("digits", epochs=2)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint.pt" in files
    assert not [f for f in files if f.endswith(".tmp")]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "rng", "configs", "history", "epoch", "best", "bad_epochs"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["configs"]["runtime"]["epochs"] == 2
    assert TrainConfig(**{**ckpt["configs"]["train"], "objective": rc.train.objective}) == rc.train
    assert History.from_dict(ckpt["history"]).epochs == history.epochs
    assert_state_dicts_equal(ckpt["model"], model.state_dict())  # no early stopping: the last weights


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    """A save that dies half-way (here: an unpicklable object) must not clobber the last good checkpoint."""
    rc = smoke("digits", epochs=1)
    model, data = build(rc)
    fit(model, data, rc.train, rc.runtime, run_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_torch({"model": model.state_dict(), "oops": lambda: None}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 0


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", "truncated"], ids=["empty", "garbage", "truncated"])
def test_load_checkpoint_rejects_corrupt_files(tmp_path, content):
    path = tmp_path / "run" / "checkpoint.pt"
    if content == "truncated":
        rc = smoke("digits", epochs=1)
        model, data = build(rc)
        fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.parent.mkdir()
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.pt"))):
        load_checkpoint(tmp_path / "nope.pt")


def test_resume_from_corrupt_checkpoint_raises(tmp_path):
    rc = smoke("digits", epochs=1)
    model, data = build(rc)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run", resume=True)


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 3e-3},
        {"batch_size": 32},
        {"seed": 1},
        {"objective": Hybrid(beta=1.0)},
        {"objective": Likelihood()},
        {"weight_decay": 1e-4},  # the optimiser state would otherwise silently restore the old value
        {"prior_weight_decay": 5e-4},
        {"prior_lr": 1e-2},
        {"grad_clip": 1.0},
        {"objective": PushAway(lam=0.5)},
    ],
    ids=lambda change: f"{next(iter(change))}-{next(iter(change.values()))}",
)
def test_resume_with_different_train_config_raises(tmp_path, change):
    rc = smoke("digits", epochs=1, prior={"learn_means": True})
    model, data = build(rc)
    fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    other, _ = build(rc)
    with pytest.raises(CheckpointError, match=f"checkpoint.pt.*{next(iter(change))}"):
        fit(other, data, *with_fields(rc, epochs=2, **change), run_dir=tmp_path / "run", resume=True)


def test_resume_may_change_epochs_and_bookkeeping(tmp_path):
    rc = smoke("digits", epochs=1)
    model, data = build(rc)
    fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    other, _ = build(rc)
    runtime = replace(rc.runtime, epochs=2, eval_batch_size=7, max_minutes=100.0, patience=3, threads=1, max_nonfinite=5,
                      eval_draws=2, progress=True)
    history = fit(other, data, rc.train, runtime, run_dir=tmp_path / "run", resume=True)
    assert [e["epoch"] for e in history.epochs] == [1, 2]


def test_resume_with_other_architecture_raises(tmp_path):
    rc = smoke("digits", epochs=1)
    model, data = build(rc)
    fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    wider, _ = build(replace(rc, model=replace(rc.model, arch=MLP(hidden=(16,), n_blocks=2))))
    with pytest.raises(CheckpointError, match="checkpoint.pt.*does not match"):
        fit(wider, data, rc.train, rc.runtime, run_dir=tmp_path / "run", resume=True)


# -- NaN guard -------------------------------------------------------------------------------


def poison_training_steps(model: MixtureFlow, loss_steps=(), grad_steps=(), every: bool = False):
    """Forward hook on the flow: chosen training steps (grad-enabled train-mode calls, counted from 0)
    give a NaN latent (non-finite loss) or a NaN gradient (finite loss). Returns the step counter."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not (module.training and torch.is_grad_enabled()):
            return None  # ActNorm init, validation and the inverse check pass untouched
        step, calls["n"] = calls["n"], calls["n"] + 1
        z, logdet = output
        if every or step in loss_steps:
            return z * float("nan"), logdet
        if step in grad_steps:
            z = z.clone()
            z.register_hook(lambda g: torch.full_like(g, float("nan")))
            return z, logdet
        return None

    model.flow.register_forward_hook(hook)
    return calls


def test_isolated_nonfinite_batches_are_skipped(tmp_path):
    rc = smoke("digits", epochs=2)  # 270 training examples / 64: 4 batches per epoch
    model, data = build(rc)
    calls = poison_training_steps(model, loss_steps=(1, 5), grad_steps=(6,))
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    assert calls["n"] == 8
    assert history.skipped_batches == 3
    assert history.stopped == "completed"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for e in history.epochs for v in e.values())
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["history"]["skipped_batches"] == 3


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_skipped_batches_leave_parameters_unchanged():
    """All batches of an epoch non-finite, max_nonfinite above their number: training ends without an update."""
    rc = smoke("digits", epochs=1, max_nonfinite=10)
    model, data = build(rc)
    init_actnorm(model, data)
    before = params_snapshot(model)
    poison_training_steps(model, every=True)
    history = fit(model, data, rc.train, rc.runtime)
    assert history.skipped_batches == 4
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_persistent_nonfinite_batches_raise(kind):
    rc = smoke("digits", epochs=3, max_nonfinite=3)
    model, data = build(rc)
    init_actnorm(model, data)
    before = params_snapshot(model)
    steps = dict(loss_steps=range(100)) if kind == "loss" else dict(grad_steps=range(100))
    calls = poison_training_steps(model, **steps)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive batches.*non-finite.*epoch 1"):
        fit(model, data, rc.train, rc.runtime)
    assert calls["n"] == 3  # stopped right at max_nonfinite
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_nonfinite_counter_resets_after_a_good_batch():
    rc = smoke("digits", epochs=2, max_nonfinite=2)
    model, data = build(rc)
    poison_training_steps(model, loss_steps=(0, 2, 4, 6))  # never two in a row
    history = fit(model, data, rc.train, rc.runtime)
    assert history.skipped_batches == 4 and history.stopped == "completed"


# -- early stopping ----------------------------------------------------------------------------


def test_early_stopping_restores_best_weights(tmp_path):
    # toy2d is continuous (no dequantisation noise) and the exact log-det makes evaluation deterministic;
    # at lr 5e-2 validation bpd stalled and rose within 6-17 epochs for init/train seeds 0..3
    rc = smoke("toy2d", epochs=40, lr=5e-2, early_stopping="val_bpd", patience=2, model=EXACT_EVAL)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    assert history.stopped == "early stopping"
    bpd = history.column("val_bpd")
    best = history.best_epoch
    assert best is not None and len(bpd) == best + 2  # stopped `patience` epochs after the best
    assert bpd[best - 1] == min(bpd)
    assert bpd[-1] != pytest.approx(bpd[best - 1], rel=1e-6)  # restoring makes a difference
    result = evaluate(model, data.val)
    assert result["bpd_conditional"] == pytest.approx(bpd[best - 1], rel=1e-10)
    assert result["accuracy"] == pytest.approx(history.column("val_acc")[best - 1])
    assert_state_dicts_equal(load_checkpoint(tmp_path / "run" / "best.pt")["model"], model.state_dict())
    last = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert last["epoch"] == len(bpd) - 1 and last["bad_epochs"] == 2


def test_early_stopping_on_accuracy():
    rc = smoke("toy2d", epochs=40, lr=5e-2, early_stopping="val_acc", patience=2, model=EXACT_EVAL)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime)
    assert history.stopped == "early stopping"
    acc = history.column("val_acc")
    best = history.best_epoch
    assert acc.index(max(acc)) == best - 1  # the first epoch reaching the maximum
    assert len(acc) == best + 2
    assert evaluate(model, data.val)["accuracy"] == pytest.approx(acc[best - 1])


def test_no_early_stopping_keeps_last_weights():
    rc = smoke("toy2d", epochs=8, lr=5e-2, early_stopping="none", patience=1, model=EXACT_EVAL)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime)
    assert history.stopped == "completed" and len(history.epochs) == 8
    assert evaluate(model, data.val)["bpd_conditional"] == pytest.approx(history.column("val_bpd")[-1], rel=1e-10)


# -- optimiser groups ----------------------------------------------------------------------------


def test_optimizer_groups_without_trainable_prior():
    rc = smoke("digits", weight_decay=1e-3, prior_weight_decay=5e-4)
    model, _ = build(rc)  # smoke prior: fixed means and scales (buffers)
    opt = make_optimizer(model, rc.train)
    assert [g["name"] for g in opt.param_groups] == ["flow"]
    assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.param_groups[0]["lr"] == rc.train.lr
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("prior_lr", [None, 1e-2])
def test_optimizer_groups_with_trainable_prior(prior_lr):
    rc = smoke("digits", prior={"learn_means": True, "learn_scales": True}, weight_decay=1e-3, prior_lr=prior_lr)
    model, _ = build(rc)
    groups = {g["name"]: g for g in make_optimizer(model, rc.train).param_groups}
    assert set(groups) == {"flow", "prior"}
    prior_ids = {id(model.prior.means), id(model.prior.log_scales)}
    assert {id(p) for p in groups["prior"]["params"]} == prior_ids
    assert not prior_ids & {id(p) for p in groups["flow"]["params"]}
    assert len(groups["flow"]["params"]) + 2 == len(list(model.parameters()))
    assert groups["flow"]["weight_decay"] == 1e-3
    assert groups["prior"]["weight_decay"] == 0.0  # not inherited from the flow
    assert groups["prior"]["lr"] == (prior_lr or rc.train.lr)


def test_the_optimizer_is_fused_adam_and_steps_as_the_foreach_one():
    """fit's Adam runs fused on the CPU (one kernel over all parameters) and updates as the default (foreach) Adam
    does, to float64 round-off, over several steps with both groups' weight decay."""
    rc = smoke("digits", prior={"learn_means": True}, weight_decay=0.1, prior_weight_decay=0.2)
    torch.manual_seed(0)
    model, _ = build(rc)
    model = model.double()
    twin = copy.deepcopy(model)
    opt = make_optimizer(model, rc.train)
    assert opt.defaults["fused"] is True
    ref = torch.optim.Adam(_regroup(opt, model, twin), foreach=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
        for m in (model, twin):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
        opt.step()
        ref.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every parameter moved


def _regroup(opt, model, twin):
    """opt's parameter groups (hyperparameters as they are) over twin's parameters at the same positions."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    twins = list(twin.parameters())
    return [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
            | {"params": [twins[index[id(p)]] for p in g["params"]]} for g in opt.param_groups]


@pytest.mark.parametrize("prior_weight_decay", [0.0, 0.5])
def test_weight_decay_reaches_prior_only_when_set(prior_weight_decay):
    """With zero loss gradients an Adam step moves a parameter only through its group's L2 penalty."""
    rc = smoke("digits", prior={"learn_means": True}, weight_decay=0.5, prior_weight_decay=prior_weight_decay)
    model, _ = build(rc)
    opt = make_optimizer(model, rc.train)
    before = params_snapshot(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    prior_moved = not torch.equal(model.prior.means, before["prior.means"])
    assert prior_moved == (prior_weight_decay > 0)
    moved_flow = [n for n, p in model.named_parameters() if n != "prior.means" and not torch.equal(p, before[n])]
    decayable = [n for n, p in before.items() if n != "prior.means" and p.abs().sum() > 0]
    assert moved_flow == decayable  # every non-zero flow parameter decayed


# -- time budget, device -------------------------------------------------------------------------


def test_time_budget_stops_in_the_first_epoch(tmp_path):
    rc = smoke("digits", epochs=50, max_minutes=1e-9)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "run")
    assert history.stopped == "time budget"
    assert len(history.epochs) == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["history"]["stopped"] == "time budget"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_raises(device):
    rc = smoke("digits", device=device)
    model, data = build(rc)
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(model, data, rc.train, rc.runtime)


def test_batch_larger_than_data_raises():
    rc = smoke("digits", batch_size=10_000)
    model, data = build(rc)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, data, rc.train, rc.runtime)


# -- DDP ------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from dataclasses import replace
    from pathlib import Path

    import torch

    from mixflow_core import build_model
    from mixflow_core.data import load_data
    from mixflow_core.training.profiles import get_profile
    from mixflow_core.training.fit import fit

    torch.set_default_dtype(torch.float64)
    out, backbone = Path(sys.argv[1]), sys.argv[2]
    rc = get_profile("toy2d", "smoke", backbone)
    from mixflow_core import Exact
    model_cfg = replace(rc.model, eval_logdet=Exact()) if backbone == "iresnet" else rc.model  # coupling: exact
    data = load_data(rc.data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, model_cfg, rc.prior, data.class_counts())
    history = fit(model, data, rc.train, replace(rc.runtime, epochs=2), run_dir=out / "run")
    rank = int(os.environ["RANK"])
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    (out / f"history{rank}.json").write_text(json.dumps(history.to_dict()))
    """
)


def _ddp_fit(tmp_path: Path, backbone: str) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(tmp_path), backbone]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_two_processes_gloo_coupling(tmp_path):
    """The coupling backbone under DDP: both ranks end with the weights rank 0 saved, after two epochs that moved."""
    _ddp_fit(tmp_path, "coupling")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any("lower" in k for k in s0)  # an LU-parametrised invertible linear map: the coupling flow
    assert_state_dicts_equal(s0, s1)
    assert_state_dicts_equal(s0, ckpt["model"])
    h0 = json.loads((tmp_path / "history0.json").read_text())
    assert h0["stopped"] == "completed" and len(h0["epochs"]) == 2
    assert h0["epochs"][0]["train_loss"] != h0["epochs"][1]["train_loss"]


def test_ddp_two_processes_gloo(tmp_path):
    _ddp_fit(tmp_path, "iresnet")

    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint.pt" in files and not [f for f in files if f.endswith(".tmp")]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(ckpt["rng"]) == 2  # one RNG state per rank

    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_state_dicts_equal(s0, s1)
    assert_state_dicts_equal(s0, ckpt["model"])
    h0, h1 = (json.loads((tmp_path / f"history{r}.json").read_text()) for r in (0, 1))
    assert metrics_only(History.from_dict(h0)) == metrics_only(History.from_dict(h1))
    assert h0["stopped"] == "completed" and len(h0["epochs"]) == 2
    # the second epoch trained from the first (the weights moved)
    assert h0["epochs"][0]["train_loss"] != h0["epochs"][1]["train_loss"]

    # validation was all-reduced over both shards: recompute on the full set in this process
    rc = smoke("toy2d", model=EXACT_EVAL)
    model, data = build(rc)
    model.load_state_dict(s0)
    table, y = log_likelihood_table(model, data.val)
    log_py = model.prior.log_class_probs
    last = h0["epochs"][-1]
    full = evaluate(model, data.val)
    assert last["val_bpd"] == pytest.approx(full["bpd_conditional"], rel=1e-9)
    assert last["val_acc"] == pytest.approx(full["accuracy"], abs=1e-12)
    assert last["val_loss"] == pytest.approx(float(rc.train.objective(table, y, log_py, model.dim)), rel=1e-9)
    # ... and a single shard would have given something else
    half = evaluate(model, torch.utils.data.Subset(data.val, range(0, len(data.val), 2)))
    assert half["bpd_conditional"] != pytest.approx(full["bpd_conditional"], rel=1e-9)


def test_resume_keeps_early_stop_label_and_continues_after_time_budget(tmp_path):
    """An early-stopped run stays finished on resume; a time-budget stop continues with a fresh budget."""
    cfg = get_profile("toy2d", "smoke")
    data = load_data(cfg.data)

    def model():
        torch.manual_seed(0)
        return build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())

    budget = replace(cfg.runtime, epochs=3, max_minutes=1e-9)
    first = fit(model(), data, cfg.train, budget, run_dir=tmp_path / "t")
    assert first.stopped == "time budget" and len(first.epochs) == 1
    resumed = fit(model(), data, cfg.train, replace(budget, max_minutes=None), run_dir=tmp_path / "t", resume=True)
    assert resumed.stopped == "completed" and len(resumed.epochs) == 3

    early = with_fields(cfg, epochs=30, early_stopping="val_bpd", patience=1, lr=0.5)
    stopped = fit(model(), data, *early, run_dir=tmp_path / "e")
    assert stopped.stopped == "early stopping" and len(stopped.epochs) < 30  # patience 1 trips within 30 epochs
    again = fit(model(), data, *early, run_dir=tmp_path / "e", resume=True)
    assert again.stopped == "early stopping" and again.epochs == stopped.epochs


def test_resume_refuses_changed_epochs_under_cosine_schedule(tmp_path):

    cfg = get_profile("toy2d", "smoke")
    data = load_data(cfg.data)
    train = replace(cfg.train, schedule="cosine")
    build = lambda: build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior)  # noqa: E731
    fit(build(), data, train, replace(cfg.runtime, epochs=1), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="runtime.epochs"):
        fit(build(), data, train, replace(cfg.runtime, epochs=2), run_dir=tmp_path, resume=True)


# -- the budget within epochs, mid-epoch checkpoints -------------------------------------------------


def test_the_budget_stops_within_the_epoch(tmp_path):
    """Past max_minutes the epoch stops after the batch in hand: its (partial) record is validated and kept,
    and the checkpoint resumes that epoch at the next batch."""
    rc = smoke("digits", epochs=3, max_minutes=1e-9)  # 4 batches per epoch
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path)
    assert history.stopped == "time budget" and len(history.epochs) == 1
    record = history.epochs[0]
    assert record["partial"] is True and record["batches"] == 1 and math.isfinite(record["val_bpd"])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["resume_at"] == [0, 1] and ckpt["history"]["epochs"] == []  # the partial record is not resumed
    assert ckpt["history"]["stopped"] == "time budget"


@pytest.mark.parametrize("max_steps, epochs, last_batches", [(6, 2, 2), (4, 1, None)], ids=["mid-epoch", "epoch-end"])
def test_the_step_budget_counts_optimiser_steps_over_epochs(tmp_path, max_steps, epochs, last_batches):
    """runtime.max_steps (4 batches per epoch): 6 steps = one whole epoch + 2 batches of the next (a partial record);
    4 steps = exactly one epoch. The weights equal an uninterrupted run's after the same steps, and a resume with a
    larger budget continues to that budget."""
    rc = smoke("digits", epochs=3, max_steps=max_steps)
    model, data = build(rc)
    history = fit(model, data, rc.train, rc.runtime, run_dir=tmp_path / "a")
    assert history.stopped == "step budget" and len(history.epochs) == epochs
    assert history.epochs[-1].get("batches") == last_batches
    resumed = fit(build(rc)[0], data, rc.train, replace(rc.runtime, max_steps=8), run_dir=tmp_path / "a", resume=True)
    assert resumed.stopped == "step budget"
    whole, _ = build(replace(rc, runtime=replace(rc.runtime, max_steps=8)))
    fit(whole, data, rc.train, replace(rc.runtime, max_steps=8), run_dir=tmp_path / "b")
    again = build(rc)[0]
    again.load_state_dict(load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"])
    expected = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="max_steps"):
        replace(rc.runtime, max_steps=0)


def test_resume_from_mid_epoch_checkpoints_equals_an_uninterrupted_run(tmp_path):
    """Stopped by the budget after every single batch and resumed each time (8 runs for 2 epochs of 4 batches):
    the weights, optimiser state and history equal one uninterrupted run, bit for bit."""
    rc = smoke("digits", epochs=2, early_stopping="val_bpd")
    whole, data = build(rc)
    h_whole = fit(whole, data, rc.train, rc.runtime, run_dir=tmp_path / "a")
    stingy = replace(rc.runtime, max_minutes=1e-9)
    runs = 0
    while True:
        model, _ = build(rc)
        history = fit(model, data, rc.train, stingy, run_dir=tmp_path / "b", resume=True)
        runs += 1
        done = [e for e in history.epochs if not e.get("partial")]
        if len(done) == 2 or runs > 12:
            break
    assert runs == 8
    final, _ = build(rc)
    load = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert load["resume_at"] == [2, 0]
    assert metrics_only(History.from_dict(load["history"])) == metrics_only(h_whole)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["backbone_state"], b["backbone_state"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][k][name], b["optimizer"]["state"][k][name])
    assert_state_dicts_equal(load_checkpoint(tmp_path / "a" / "best.pt")["model"],
                             load_checkpoint(tmp_path / "b" / "best.pt")["model"])


def test_a_kill_loses_at_most_the_batches_since_the_last_checkpoint(tmp_path):
    """With a checkpoint after every batch, a crash in the middle of epoch 2 resumes from the batch before it and
    ends where an uninterrupted run ends."""
    rc = smoke("digits", epochs=2, checkpoint_minutes=1e-9)
    whole, data = build(rc)
    fit(whole, data, rc.train, rc.runtime, run_dir=tmp_path / "a")
    crashing, _ = build(rc)

    def crash(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 7:  # epoch 2, batch 3: as if killed there
                raise KeyboardInterrupt

    calls = {"n": 0}
    crashing.flow.register_forward_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, data, rc.train, rc.runtime, run_dir=tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["resume_at"] == [1, 2]  # 6 batches were safe
    resumed, _ = build(rc)
    fit(resumed, data, rc.train, rc.runtime, run_dir=tmp_path / "b", resume=True)
    assert_state_dicts_equal(whole.state_dict(), resumed.state_dict())
