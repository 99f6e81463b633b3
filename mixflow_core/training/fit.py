"""fit(model, data, cfg, runtime) -> History: one training loop for CPU, one GPU, or many under torchrun.

- Adam with two parameter groups: the flow, and the prior (own lr and weight decay; the
  original student model applied weight decay to the prior too, which TrainConfig can repeat);
  fused (one kernel over all parameters) where the device has the kernel, else the default foreach Adam.
- Per epoch: validation loss / bits/dim / accuracy (all-reduced across ranks), distances
  between class means in sigma units, fixed-point inverse error; early stopping on
  validation bits/dim or accuracy, restoring the best weights at the end.
- Checkpoints after every epoch and every runtime.checkpoint_minutes inside one, written
  atomically by rank 0: model, optimiser, scheduler, RNG states, configs, history, where to go on
  (epoch, batch) and the partial epoch's sums. runtime.max_minutes is checked after every batch.
- The backbone is reached only through its hooks (flows.layers.Flow): validation, saving and the
  returned model see `flow.settled()` weights (the i-ResNet: Lip <= coeff exactly, its power
  vectors converged, then the training run's put back); checkpoints carry `flow.training_state()`
  (the i-ResNet's power vectors; nothing for a coupling flow) for an exact resume.
- `resume=True` continues from the last checkpoint, mid-epoch too, and reproduces the
  uninterrupted run (same seed, CPU); what may change on resume is config.resume_conflicts' policy.
- A non-finite loss or gradient skips the batch (counted); runtime.max_nonfinite consecutive ones
  stop training with NonFiniteLossError.
- Distributed: under torchrun (WORLD_SIZE > 1) the same code initialises the process group
  (gloo on CPU, nccl on CUDA), shards batches with DistributedSampler and wraps the model in
  DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..data import Splits
from ..eval.diagnostics import latents, prior_overlap
from ..eval.metrics import accuracy, bits_per_dim, over_dataset
from ..flows.layers import Whiten, training_precision
from ..flows.model import MixtureFlow
from ..flows.priors import class_moments
from .checkpoint import (
    CheckpointError, check_resumable, load_checkpoint, rng_state, saved_configs, set_rng_state, snapshot_path,
)
from .config import RuntimeConfig, TrainConfig
from .distributed import DistContext, resolve_device, setup_distributed
from .io import save_torch

__all__ = ["History", "fit", "make_optimizer", "NonFiniteLossError", "inverse_error"]

logger = logging.getLogger(__name__)


@dataclass
class History:
    """Per-epoch records (dicts of floats) and how training ended."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped: str = "not started"
    skipped_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """From to_dict(); records of mixflow 0.1 (mean_dist_min / _median without _sigma) get today's keys."""
        renamed = {"mean_dist_min": "mean_dist_min_sigma", "mean_dist_median": "mean_dist_median_sigma"}
        epochs = [{renamed.get(k, k): v for k, v in e.items()} for e in d.get("epochs", [])]
        return cls(**{**d, "epochs": epochs})

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs]

    def steps(self, batches_per_epoch: int) -> int:
        """Optimiser steps of the epochs recorded: whole epochs, or a budget-cut epoch's batches (its later, resumed
        record counts once, as the whole epoch)."""
        per_epoch: dict[int, int] = {}
        for e in self.epochs:
            n = e["batches"] if e.get("partial") else batches_per_epoch
            per_epoch[e["epoch"]] = max(per_epoch.get(e["epoch"], 0), n)
        return sum(per_epoch.values())


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive batches."""


def backbone_training_state(ckpt: dict[str, Any]) -> dict[str, Tensor] | None:
    """The backbone's training state in a checkpoint: "backbone_state" (keys relative to model.flow), or the
    "power_vectors" of checkpoints written before the backbone hooks (keys relative to the model: "flow." dropped);
    None where neither was saved (mixflow 0.1)."""
    if ckpt.get("backbone_state") is not None:
        return ckpt["backbone_state"]
    if ckpt.get("power_vectors") is not None:
        return {k.removeprefix("flow."): v for k, v in ckpt["power_vectors"].items()}
    return None


# -- set-up -------------------------------------------------------------------------------------------
def make_optimizer(model: MixtureFlow, cfg: TrainConfig) -> torch.optim.Adam:
    """The Adam fit trains with: a "flow" and a "prior" parameter group (each its lr and weight decay), fused where
    the device has the kernel (benchmarks build their shipped optimizer here too)."""
    prior_params = list(model.prior.parameters())
    prior_ids = {id(p) for p in prior_params}
    flow_params = [p for p in model.parameters() if id(p) not in prior_ids]
    groups = [{"params": flow_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "flow"}]
    if prior_params:
        groups.append({"params": prior_params, "lr": cfg.prior_lr or cfg.lr, "weight_decay": cfg.prior_weight_decay, "name": "prior"})
    try:  # one fused kernel over all parameters: +1% (images) to +22% (digits) training img/s on CPU (RESULTS.md)
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel: the default (foreach) Adam
        return torch.optim.Adam(groups)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)


@torch.no_grad()
def inverse_error(model: MixtureFlow, x: Tensor) -> float:
    """max |f^{-1}(f(h)) - h| in the flow's input space (after preprocessing), eval mode."""
    was_training = model.training
    model.eval()
    h, _ = model.preprocess(x.to(model.prior.means.dtype))
    z, _ = model.flow(h)
    err = float((model.flow.inverse(z) - h).abs().max())
    model.train(was_training)
    return err


def _init_whiten(model: MixtureFlow, data: Dataset, batch_size: int, device: torch.device) -> None:
    """ModelConfig.whiten: the Whiten layer's mean and covariance from the preprocessed (dequantised) training set.

    Runs first, before the ActNorm init sees whitened data; float64 sums over the whole training
    set, one pass without the flow. The same on every rank up to the dequantisation noise.
    """
    layers = [m for m in model.flow.modules() if isinstance(m, Whiten) and m.needs_data_init]
    if not layers:
        return
    n, total, outer = 0, None, None
    with torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
            h = model.preprocess(x.to(device, model.prior.means.dtype))[0].flatten(1).double()
            total = h.sum(0) if total is None else total + h.sum(0)
            outer = h.T @ h if outer is None else outer + h.T @ h
            n += h.shape[0]
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / max(n - 1, 1)
    for layer in layers:  # build_iresnet puts one first; its input is the preprocessed data
        layer.init_from(mean.to(layer.mean.dtype), cov)


def _init_actnorm(model: MixtureFlow, data: Dataset, batch_size: int, device: torch.device) -> None:
    """Data-dependent ActNorm init from the same first examples on every rank (a no-op once initialised)."""
    x = torch.stack([data[i][0] for i in range(min(len(data), max(batch_size, 256)))]).to(device)
    model.train()
    with torch.no_grad():
        model.log_prob_all(x)


def _init_prior(model: MixtureFlow, data: Dataset, batch_size: int, device: torch.device, max_examples: int = 60000) -> None:
    """PriorConfig.init="moments": mu_k, Sigma_k from the initial flow's latents of (up to max_examples) training examples.

    Runs after the ActNorm init, in eval mode: one fixed flow for every batch (in train mode the
    spectral norms' power iterations would move between batches), with dequantisation noise as in
    training. Under torchrun ranks differ by their noise; DistributedDataParallel then broadcasts
    rank 0's prior.
    """
    n = len(data)
    if n > max_examples:
        gen = torch.Generator().manual_seed(model.prior.cfg.init_seed)
        data = Subset(data, torch.randperm(n, generator=gen)[:max_examples].tolist())
    z, y = latents(model, data, batch_size, device)  # eval mode, then back to the model's mode
    moments = class_moments([(z, y)], model.prior.num_classes)
    model.prior.init_from_moments(moments.means.to(device), moments.covs.to(device))


@dataclass
class _State:
    """What the loop carries from epoch to epoch (and a checkpoint saves)."""

    history: History
    start_epoch: int = 0
    best: float | None = None  # best early-stopping value so far (bits/dim, or -accuracy)
    bad_epochs: int = 0
    best_weights: dict[str, Tensor] | None = None
    consecutive_bad: int = 0
    training_state: dict[str, Tensor] | None = None  # the backbone's flow.training_state(), saved for an exact resume
    start_step: int = 0  # batches of start_epoch already trained (a mid-epoch checkpoint)
    partial: dict[str, float] = field(default_factory=dict)  # loss_sum, n_ok, seconds of start_epoch's first batches
    pending_rng: dict[str, Any] | None = None  # a mid-epoch resume restores the RNG after the epoch's loader starts
    last_save: float = 0.0  # time.perf_counter() of the last checkpoint


@dataclass
class _Clock:
    """The budgets (wall clock, optimiser steps) and the checkpoint interval, checked after every batch."""

    start: float
    runtime: RuntimeConfig
    saving: bool  # a run directory to checkpoint into
    steps_before: int = 0  # optimiser steps of the run before the current epoch (set at each epoch's start)

    def out_of_time(self, now: float, step: int = 0) -> bool:
        """Past runtime.max_minutes, or runtime.max_steps reached with `step` batches of the current epoch done."""
        return self.budget_reason(now, step) is not None

    def budget_reason(self, now: float, step: int = 0) -> str | None:
        rt = self.runtime
        if rt.max_steps is not None and self.steps_before + step >= rt.max_steps:
            return "step budget"
        if rt.max_minutes is not None and (now - self.start) / 60 > rt.max_minutes:
            return "time budget"
        return None

    def checkpoint_due(self, now: float, last_save: float) -> bool:
        return self.saving and (now - last_save) / 60 > self.runtime.checkpoint_minutes


def _resume(model: MixtureFlow, opt, sched, cfg: TrainConfig, runtime: RuntimeConfig, run_dir: Path,
            ctx: DistContext, device: torch.device) -> _State:
    """The loop's state from run_dir/checkpoint.pt, after config.resume_conflicts allowed it."""
    path = run_dir / "checkpoint.pt"
    # read on the CPU: load_state_dict moves weights and optimiser moments to the parameters' device, while Adam's
    # step counts stay on the CPU as in a fresh run (on the GPU every step would sync once per parameter)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, cfg, runtime, path)
    try:
        model.load_state_dict(ckpt["model"])  # evaluation-ready (settled) weights ...
        backbone_state = backbone_training_state(ckpt)  # ... then the training run's own state (absent in 0.1's)
        if backbone_state is not None:
            model.flow.load_training_state(backbone_state)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this model: {err}") from err
    epoch, step = ckpt.get("resume_at", (ckpt["epoch"] + 1, 0))  # mixflow 0.1 saved only after whole epochs
    state = _State(History.from_dict(ckpt["history"]), epoch, ckpt["best"], ckpt["bad_epochs"], start_step=step,
                   partial=dict(ckpt.get("partial", {})), consecutive_bad=ckpt.get("consecutive_bad", 0))
    rng = ckpt["rng"][ctx.rank] if ctx.rank < len(ckpt["rng"]) else ckpt["rng"][0]
    if step:
        state.pending_rng = rng  # after the epoch's loader has drawn its seed, as it had when the checkpoint was taken
    else:
        set_rng_state(rng, device)
    if (run_dir / "best.pt").exists():
        state.best_weights = load_checkpoint(run_dir / "best.pt", device)["model"]
    logger.info("resumed from %s at epoch %d, batch %d", path, state.start_epoch + 1, step)
    if state.history.stopped == "early stopping":
        state.start_epoch = runtime.epochs  # that run had converged; a time-budget stop continues with a fresh budget
    return state


# -- one epoch --------------------------------------------------------------------------------------------
def _train_epoch(net: nn.Module, model: MixtureFlow, loader: DataLoader, opt, cfg: TrainConfig,
                 runtime: RuntimeConfig, state: _State, ctx: DistContext, device: torch.device, epoch: int,
                 clock: _Clock, checkpoint: Callable[[int, dict[str, float]], None]) -> tuple[dict, bool]:
    """One pass over the loader (from state.start_step on a mid-epoch resume); (the epoch's train record, whether the
    time budget stopped it before its end).

    Non-finite batches are skipped (all ranks agree). After every batch the clock is read: past
    runtime.max_minutes the epoch stops there; every runtime.checkpoint_minutes `checkpoint(step, sums)`
    saves a mid-epoch checkpoint, so that a kill loses at most that much work.
    """
    model.train()
    step, sums = state.start_step, {"loss_sum": 0.0, "n_ok": 0.0, "seconds": 0.0, **state.partial}
    state.start_step, state.partial = 0, {}
    batches = iter(loader)  # draws the loader's seed from the global RNG
    if state.pending_rng is not None:
        set_rng_state(state.pending_rng, device)  # ... which the checkpoint's state then replaces
        state.pending_rng = None
    for _ in range(step):
        next(batches)  # the batches the checkpoint had already trained on: same order, no RNG drawn
    t0, stopped = time.perf_counter() - sums["seconds"], False
    bar = tqdm(batches, total=len(loader), initial=step, desc=f"epoch {epoch + 1}/{runtime.epochs}", leave=False,
               disable=not (runtime.progress and ctx.main))
    for x, y in bar:
        loss = _step(net, model, x.to(device), y.to(device), opt, cfg, runtime, state, ctx, epoch)
        if loss is not None:
            sums["loss_sum"], sums["n_ok"] = sums["loss_sum"] + loss, sums["n_ok"] + 1
            bar.set_postfix(loss=f"{loss:.4f}")
        step += 1
        if step == len(loader):
            break  # the epoch's end validates, checks the budget and saves
        now = time.perf_counter()
        flags = torch.tensor([clock.out_of_time(now, step), clock.checkpoint_due(now, state.last_save)],
                             dtype=torch.float64)
        late, due = (bool(f) for f in ctx.all_sum(flags.to(device)) > 0)  # every rank decides alike
        if late:  # what the checkpoint records: a resume continues with a new time budget (the step budget is global)
            state.history.stopped = clock.budget_reason(now, step) or "time budget"
        if late or due:
            sums["seconds"] = time.perf_counter() - t0
            checkpoint(step, sums)
        if late:
            stopped = True
            break
    totals = ctx.all_sum(torch.tensor([sums["loss_sum"], sums["n_ok"]], dtype=torch.float64, device=device))
    loss_sum, n_ok = float(totals[0]), int(totals[1])  # over all ranks: the same History everywhere
    record = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_ok, 1), "epoch_seconds": time.perf_counter() - t0}
    if stopped:
        record.update(partial=True, batches=step)
    return record, stopped


def _step(net: nn.Module, model: MixtureFlow, x: Tensor, y: Tensor, opt, cfg: TrainConfig, runtime: RuntimeConfig,
          state: _State, ctx: DistContext, epoch: int) -> float | None:
    """One optimiser step; None when the batch gave a non-finite loss or gradient and was skipped."""
    loss = cfg.objective(net(x), y, model.prior.log_class_probs, model.dim)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(loss).all() & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    finite = ctx.all_sum(finite.double()) == ctx.world  # every rank agrees on skipping
    if not bool(finite):
        state.consecutive_bad += 1
        state.history.skipped_batches += 1
        opt.zero_grad(set_to_none=True)
        if state.consecutive_bad >= runtime.max_nonfinite:
            state.history.stopped = "non-finite loss"
            raise NonFiniteLossError(
                f"{state.consecutive_bad} consecutive batches gave a non-finite loss or gradient at epoch {epoch + 1} "
                f"({state.history.skipped_batches} skipped in all); the model was not updated by them. Lower the lr, "
                "set grad_clip, or check the data."
            )
        return None
    state.consecutive_bad = 0
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


@torch.no_grad()
def _validate(model: MixtureFlow, data: Dataset, cfg: TrainConfig, batch_size: int, ctx: DistContext,
              device: torch.device) -> dict[str, float]:
    """Loss, conditional bits/dim and accuracy (metrics' functions on this rank's shard), averaged over ranks."""
    shard = Subset(data, range(ctx.rank, len(data), ctx.world))
    table, y = over_dataset(model, shard, model.log_prob_all, batch_size, device)  # eval mode, then train again
    log_py = model.prior.log_class_probs.detach().cpu().to(table.dtype)
    n = len(y)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, bpd * n, correct, n
    if n:
        sums[0] = float(cfg.objective(table, y, log_py, model.dim)) * n
        sums[1] = bits_per_dim(table, y, log_py, model.dim) * n
        sums[2] = accuracy(table, y, log_py) * n
        sums[3] = n
    sums = ctx.all_sum(sums)
    model.train()
    total = max(float(sums[3]), 1.0)
    return {"val_loss": float(sums[0]) / total, "val_bpd": float(sums[1]) / total, "val_acc": float(sums[2]) / total}


def _improved(cfg: TrainConfig, record: dict[str, float], best: float | None) -> tuple[bool, float | None]:
    if cfg.early_stopping == "none":
        return True, None
    value = record["val_bpd"] if cfg.early_stopping == "val_bpd" else -record["val_acc"]
    if best is None or value < best:
        return True, value
    return False, best


def _write_checkpoint(model: MixtureFlow, opt, sched, cfg: TrainConfig, runtime: RuntimeConfig, state: _State,
                      run_dir: Path, resume_at: tuple[int, int], partial: dict[str, float], ctx: DistContext,
                      device: torch.device) -> None:
    """run_dir/checkpoint.pt: everything a resume needs to continue at `resume_at` = (epoch, batch), 0-based.

    Called inside model.flow.settled(): the weights saved are settled (the i-ResNet: Lip <= coeff); the training
    run's own backbone state goes along (state.training_state), and so do the sums of a partly trained epoch, so
    that a resume continues exactly. Every rank's RNG state is gathered; rank 0 writes.
    """
    rng = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(rng, rng_state(device))
    else:
        rng = [rng_state(device)]
    state.last_save = time.perf_counter()
    if not ctx.main:
        return
    epoch, step = resume_at
    save_torch({
        "model": model.state_dict(), "backbone_state": state.training_state, "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "rng": rng, "configs": saved_configs(cfg, runtime),
        "history": state.history.to_dict(), "epoch": epoch - 1,  # the last whole epoch (as mixflow 0.1 read it)
        "resume_at": [epoch, step], "partial": dict(partial), "consecutive_bad": state.consecutive_bad,
        "best": state.best, "bad_epochs": state.bad_epochs,
    }, run_dir / "checkpoint.pt")


def _end_epoch(model: MixtureFlow, opt, sched, data: Splits, probe_x: Tensor, cfg: TrainConfig, runtime: RuntimeConfig,
               state: _State, record: dict, run_dir: Path | None, snapshot_epochs: tuple[int, ...], late: str | bool,
               ctx: DistContext, device: torch.device) -> tuple[bool, bool]:
    """Validate, track the best weights, decide whether to stop, save; returns (stop early, out of time).

    All of it inside model.flow.settled(): validation, best.pt and checkpoints see settled weights (the i-ResNet:
    Lip <= coeff exactly), and the training run's backbone state is put back afterwards (an unchanged trajectory).
    A record of an epoch the time budget cut short ("partial") is validated and kept in the history, but takes
    no part in early stopping, and the checkpoint (written when it stopped) resumes that epoch where it stopped.
    """
    epoch = record["epoch"] - 1
    state.training_state = model.flow.training_state()
    with model.flow.settled():
        record.update(_validate(model, data.val, cfg, runtime.eval_batch_size, ctx, device))
        record.update(prior_overlap(model.prior))
        record["inverse_error"] = inverse_error(model, probe_x.to(device))
        state.history.epochs.append(record)
        if record.get("partial"):
            logger.info("epoch %d stopped by the %s after %d batches: val_bpd=%.4g, val_acc=%.4g",
                        epoch + 1, state.history.stopped, record["batches"], record["val_bpd"], record["val_acc"])
            return False, True
        improved, state.best = _improved(cfg, record, state.best)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        if improved:
            state.history.best_epoch = epoch + 1
            state.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        late_flag = torch.tensor(float(bool(late)), dtype=torch.float64, device=device)
        out_of_time = bool(ctx.all_sum(late_flag) > 0)  # ranks stop together
        stop_early = cfg.early_stopping != "none" and state.bad_epochs >= runtime.patience
        if stop_early:
            state.history.stopped = "early stopping"
        elif out_of_time:
            state.history.stopped = late if isinstance(late, str) else "time budget"
        if run_dir is not None:
            if improved and ctx.main:
                save_torch({"model": state.best_weights}, run_dir / "best.pt")
            if epoch + 1 in snapshot_epochs and ctx.main:
                save_torch({"model": model.state_dict(), "epoch": epoch + 1, "record": record},
                           snapshot_path(run_dir, epoch + 1))
            _write_checkpoint(model, opt, sched, cfg, runtime, state, run_dir, (epoch + 1, 0), {}, ctx, device)
    return stop_early, out_of_time


# -- the loop ------------------------------------------------------------------------------------------------
def fit(
    model: MixtureFlow,
    data: Splits,
    cfg: TrainConfig = TrainConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    run_dir: str | Path | None = None,
    resume: bool = False,
    snapshot_epochs: tuple[int, ...] = (),
) -> History:
    """Train `model` in place on data.train, validating on data.val every epoch.

    Args:
        model: the MixtureFlow to train (moved to runtime.device).
        data: train / val splits (load_data).
        cfg: what shapes the trajectory: optimiser, objective, schedule, early-stopping metric, seed.
        runtime: where and how long: epochs, time budget, patience, device, threads, progress.
        run_dir: if given, checkpoint.pt every epoch and best.pt on improvement go there.
        resume: continue from run_dir/checkpoint.pt if it exists (config.resume_conflicts decides
            what may differ); the result equals an uninterrupted run on CPU.
        snapshot_epochs: 1-based epochs after which the weights also go to
            run_dir/snapshots/epoch_NNNN.pt (diagnostics over training).

    Returns:
        The History; with early stopping the model ends with its best validated weights, in eval mode.

    Example:
        >>> from mixflow_core.training.profiles import get_profile
        >>> from mixflow_core.data import load_data
        >>> from mixflow_core.flows import build_model
        >>> cfg = get_profile("toy2d", "smoke")
        >>> data = load_data(cfg.data)
        >>> model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior)
        >>> history = fit(model, data, cfg.train, cfg.runtime)
        >>> len(history.epochs), history.stopped
        (2, 'completed')
    """
    torch.set_num_threads(runtime.threads)
    device = resolve_device(runtime.device)
    ctx = setup_distributed(device)
    torch.manual_seed(cfg.seed + ctx.rank)  # probes and dequantisation noise differ across ranks
    run_dir = Path(run_dir) if run_dir is not None else None
    if snapshot_epochs and run_dir is None:
        raise ValueError("snapshot_epochs needs a run_dir to write the snapshots to")
    if run_dir is not None and ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = _scheduler(opt, cfg, runtime.epochs)
    if resume and run_dir is not None and (run_dir / "checkpoint.pt").exists():
        state = _resume(model, opt, sched, cfg, runtime, run_dir, ctx, device)
    else:
        state = _State(History())
        _init_whiten(model, data.train, runtime.eval_batch_size, device)
        _init_actnorm(model, data.train, cfg.batch_size, device)
        if model.prior.needs_data_init:
            _init_prior(model, data.train, runtime.eval_batch_size, device)

    net: nn.Module = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(data.train, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {ctx.world} processes exceeds the {len(data.train)} training examples")
    probe_x = torch.stack([data.val[i][0] for i in range(min(len(data.val), 64))])
    clock = _Clock(time.perf_counter(), runtime, saving=run_dir is not None)
    state.last_save = clock.start

    def checkpoint_mid_epoch(epoch: int, step: int, sums: dict[str, float]) -> None:
        if run_dir is None:
            return
        state.training_state = model.flow.training_state()
        with model.flow.settled():
            _write_checkpoint(model, opt, sched, cfg, runtime, state, run_dir, (epoch, step), sums, ctx, device)

    if state.start_epoch < runtime.epochs:
        state.history.stopped = "completed"  # until the loop says otherwise
    with training_precision(model.flow, runtime.precision):
        for epoch in range(state.start_epoch, runtime.epochs):
            sampler.set_epoch(epoch)
            clock.steps_before = state.history.steps(len(loader))
            record, cut_short = _train_epoch(net, model, loader, opt, cfg, runtime, state, ctx, device, epoch, clock,
                                             lambda step, sums, epoch=epoch: checkpoint_mid_epoch(epoch, step, sums))
            if not cut_short:
                sched.step()
            late = (state.history.stopped if cut_short
                    else clock.budget_reason(time.perf_counter(), record.get("batches", len(loader))) or False)
            stop_early, out_of_time = _end_epoch(model, opt, sched, data, probe_x, cfg, runtime, state, record,
                                                 run_dir, snapshot_epochs, late, ctx, device)
            ctx.barrier()
            if stop_early or out_of_time:
                break
    if state.best_weights is not None and cfg.early_stopping != "none":
        model.load_state_dict(state.best_weights)  # return the best validated weights
    model.flow.settle()  # the returned weights settled (the i-ResNet: Lip <= coeff; a no-op for best weights)
    model.eval()
    return state.history
