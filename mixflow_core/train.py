"""fit(model, data, cfg) -> History: one training loop for CPU, one GPU, or many under torchrun.

- Adam with two parameter groups: the flow, and the prior (own lr and weight decay; the
  original student model applied weight decay to the prior too, which TrainConfig can repeat).
- Per epoch: validation loss / bits/dim / accuracy (all-reduced across ranks), distances
  between class means in sigma units, fixed-point inverse error; early stopping on
  validation bits/dim or accuracy, restoring the best weights at the end.
- Checkpoints every epoch, written atomically (temp file + os.replace) by rank 0: model,
  optimiser, scheduler, RNG states, configs, history. `resume=True` continues from it and
  reproduces the uninterrupted run (same seed, CPU).
- A non-finite loss or gradient skips the batch (counted); `max_nonfinite` consecutive ones
  stop training with NonFiniteLossError.
- Distributed: under torchrun (WORLD_SIZE > 1) the same code initialises the process group
  (gloo on CPU, nccl on CUDA), shards batches with DistributedSampler and wraps the model in
  DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from .data import Splits
from .diagnostics import bhattacharyya, latents, off_diagonal
from .model import MixtureFlow
from .objectives import make_objective
from .priors import class_moments

__all__ = ["TrainConfig", "History", "fit", "NonFiniteLossError", "CheckpointError", "load_checkpoint", "inverse_error",
           "snapshot_path"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, objective, stopping, and where it runs."""

    epochs: int = 100
    batch_size: int = 64  # per process
    lr: float = 1e-3  # flow parameters
    prior_lr: float | None = None  # prior parameters (None: lr); IB-INN learns means faster
    weight_decay: float = 0.0  # flow parameters (Adam's L2 penalty)
    prior_weight_decay: float = 0.0  # prior parameters; the student used 5e-4 on everything
    objective: Literal["likelihood", "hybrid", "push_away"] = "hybrid"
    beta: float = 1.0  # hybrid: weight of CE(p(y|x)) against the per-dimension NLL
    push_lambda: float = 0.05  # push_away: weight of sum_{y' != y} log p(x|y')
    schedule: Literal["constant", "cosine"] = "constant"  # lr schedule over `epochs`
    grad_clip: float | None = None  # max global gradient norm
    early_stopping: Literal["none", "val_bpd", "val_acc"] = "val_bpd"
    patience: int = 20  # epochs without improvement before stopping
    max_nonfinite: int = 20  # consecutive non-finite batches before giving up
    eval_batch_size: int = 500
    eval_draws: int = 1  # dequantisation draws averaged (importance-weighted) in the final val / test metrics
    threads: int = 1  # torch CPU threads (small models run best with 1)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    seed: int = 0
    max_minutes: float | None = None  # wall-clock budget; stops after the epoch that exceeds it
    progress: bool = True  # tqdm progress bars (rank 0)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs, batch_size and lr must be positive: {self}")
        if self.eval_draws < 1:
            raise ValueError(f"eval_draws must be >= 1, got {self.eval_draws}")


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
        return cls(**d)

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs]


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive batches."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model / configuration."""


# -- distributed context -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# -- pieces of the loop ----------------------------------------------------------------------
def _optimizer(model: MixtureFlow, cfg: TrainConfig) -> torch.optim.Adam:
    prior_params = list(model.prior.parameters())
    prior_ids = {id(p) for p in prior_params}
    flow_params = [p for p in model.parameters() if id(p) not in prior_ids]
    groups = [{"params": flow_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "flow"}]
    if prior_params:
        groups.append({"params": prior_params, "lr": cfg.prior_lr or cfg.lr, "weight_decay": cfg.prior_weight_decay, "name": "prior"})
    return torch.optim.Adam(groups)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
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


def _init_actnorm(model: MixtureFlow, data: Dataset, batch_size: int, device: torch.device) -> None:
    """Data-dependent ActNorm init from the same first examples on every rank (a no-op once initialised)."""
    x = torch.stack([data[i][0] for i in range(min(len(data), max(batch_size, 256)))]).to(device)
    model.train()
    with torch.no_grad():
        model.log_prob_all(x)


def _init_prior(model: MixtureFlow, data: Dataset, batch_size: int, device: torch.device, max_examples: int = 20000) -> None:
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


@torch.no_grad()
def _validate(model: MixtureFlow, data: Dataset, cfg: TrainConfig, objective, ctx: _Dist, device: torch.device) -> dict[str, float]:
    """Loss, conditional bits/dim and accuracy on this rank's shard, summed over ranks."""
    model.eval()
    shard = torch.utils.data.Subset(data, range(ctx.rank, len(data), ctx.world))
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, bpd * n, correct, n
    log_py = model.prior.log_class_probs
    for x, y in DataLoader(shard, batch_size=cfg.eval_batch_size):
        x, y = x.to(device), y.to(device)
        table = model.log_prob_all(x)
        n = len(y)
        sums[0] += objective(table, y, log_py, model.dim).double() * n
        sums[1] += (-table.gather(1, y[:, None]).sum() / (model.dim * math.log(2.0))).double()
        sums[2] += ((table + log_py).argmax(1) == y).sum()
        sums[3] += n
    sums = ctx.all_sum(sums)
    model.train()
    n = max(float(sums[3]), 1.0)
    return {"val_loss": float(sums[0]) / n, "val_bpd": float(sums[1]) / n, "val_acc": float(sums[2]) / n}


def _mean_distance_stats(model: MixtureFlow) -> dict[str, float]:
    off = off_diagonal(model.prior.mean_distances().detach())
    if not off.numel():
        return {}
    bc = off_diagonal(bhattacharyya(model.prior))
    return {"mean_dist_min": float(off.min()), "mean_dist_median": float(off.median()),
            "bhattacharyya_mean": float(bc.mean()), "bhattacharyya_max": float(bc.max())}


def _improved(cfg: TrainConfig, record: dict[str, float], best: float | None) -> tuple[bool, float | None]:
    if cfg.early_stopping == "none":
        return True, None
    value = record["val_bpd"] if cfg.early_stopping == "val_bpd" else -record["val_acc"]
    if best is None or value < best:
        return True, value
    return False, best


# -- checkpoints -----------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    """Where fit(snapshot_epochs=...) writes the weights after `epoch` (1-based)."""
    return Path(run_dir) / "snapshots" / f"epoch_{epoch:04d}.pt"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only); CheckpointError names the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated / corrupt / foreign file
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {err}") from err


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# Fields that shape the parameter trajectory; the rest (epochs, patience, max_minutes, threads, ...) may change
# on resume. The optimiser's state restores the saved lr / weight decay of each group, so a changed value
# would otherwise be silently ignored.
_RESUME_FIXED = ("batch_size", "lr", "prior_lr", "weight_decay", "prior_weight_decay", "objective", "beta",
                 "push_lambda", "schedule", "grad_clip", "seed")


def _restore(model: MixtureFlow, opt, sched, ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    saved = ckpt.get("train_config", {})
    fixed = _RESUME_FIXED + (("epochs",) if cfg.schedule == "cosine" else ())  # the schedule's length
    changed = {k for k in fixed if saved.get(k) != getattr(cfg, k)}
    if changed:
        raise CheckpointError(f"checkpoint {path} was written with a different TrainConfig ({sorted(changed)}); "
                              "start a new run directory or pass the same configuration")
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this model: {err}") from err


# -- the loop ------------------------------------------------------------------------------------
def fit(
    model: MixtureFlow,
    data: Splits,
    cfg: TrainConfig = TrainConfig(),
    run_dir: str | Path | None = None,
    resume: bool = False,
    snapshot_epochs: tuple[int, ...] = (),
) -> History:
    """Train `model` in place on data.train, validating on data.val; returns the History.

    With `run_dir`, writes run_dir/checkpoint.pt every epoch (and best.pt on improvement);
    `resume=True` continues from run_dir/checkpoint.pt if it exists. After each epoch listed in
    `snapshot_epochs` (1-based) the weights also go to run_dir/snapshots/epoch_NNNN.pt, for
    diagnostics over training (class Gaussians and latents at several epochs).
    """
    torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.device)
    ctx = _setup_distributed(device)
    torch.manual_seed(cfg.seed + ctx.rank)  # probes and dequantisation noise differ across ranks
    run_dir = Path(run_dir) if run_dir is not None else None
    if snapshot_epochs and run_dir is None:
        raise ValueError("snapshot_epochs needs a run_dir to write the snapshots to")
    if run_dir is not None and ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt" if run_dir is not None else None

    model.to(device)
    objective = make_objective(cfg.objective, cfg.beta, cfg.push_lambda)
    opt, history = _optimizer(model, cfg), History()
    sched = _scheduler(opt, cfg)
    start_epoch, best, bad_epochs, best_state = 0, None, 0, None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        _restore(model, opt, sched, ckpt, cfg, ckpt_path)
        history = History.from_dict(ckpt["history"])
        start_epoch, best, bad_epochs = ckpt["epoch"] + 1, ckpt["best"], ckpt["bad_epochs"]
        _set_rng_state(ckpt["rng"][ctx.rank] if ctx.rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
        if (run_dir / "best.pt").exists():
            best_state = load_checkpoint(run_dir / "best.pt", device)["model"]
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
        if history.stopped == "early stopping":
            start_epoch = cfg.epochs  # that run had converged; a time-budget stop continues with a fresh budget
    else:
        _init_actnorm(model, data.train, cfg.batch_size, device)
        if model.prior.needs_data_init:
            _init_prior(model, data.train, cfg.eval_batch_size, device)

    net: nn.Module = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(data.train, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {ctx.world} processes exceeds the {len(data.train)} training examples")
    probe_x = torch.stack([data.val[i][0] for i in range(min(len(data.val), 64))])
    t_start, consecutive_bad = time.perf_counter(), 0
    if start_epoch < cfg.epochs:
        history.stopped = "completed"  # until the loop says otherwise
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, loss_sum, n_ok = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (cfg.progress and ctx.main))
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss = objective(net(x), y, model.prior.log_class_probs, model.dim)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = torch.isfinite(loss).all() & torch.stack([torch.isfinite(g).all() for g in grads]).all()
            finite = ctx.all_sum(finite.double()) == ctx.world  # every rank agrees on skipping
            if not bool(finite):
                consecutive_bad += 1
                history.skipped_batches += 1
                opt.zero_grad(set_to_none=True)
                if consecutive_bad >= cfg.max_nonfinite:
                    history.stopped = "non-finite loss"
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive batches gave a non-finite loss or gradient at epoch {epoch + 1} "
                        f"({history.skipped_batches} skipped in all); the model was not updated by them. Lower the lr, "
                        "set grad_clip, or check the data."
                    )
                continue
            consecutive_bad = 0
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum, n_ok = loss_sum + loss.item(), n_ok + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        sched.step()
        totals = ctx.all_sum(torch.tensor([loss_sum, float(n_ok)], dtype=torch.float64, device=device))
        loss_sum, n_ok = float(totals[0]), int(totals[1])  # over all ranks: the same History everywhere
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_ok, 1), "epoch_seconds": time.perf_counter() - t0}
        record.update(_validate(model, data.val, cfg, objective, ctx, device))
        record.update(_mean_distance_stats(model))
        record["inverse_error"] = inverse_error(model, probe_x.to(device))
        history.epochs.append(record)
        improved, best = _improved(cfg, record, best)
        bad_epochs = 0 if improved else bad_epochs + 1
        if improved:
            history.best_epoch = epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        late = cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 > cfg.max_minutes
        out_of_time = bool(ctx.all_sum(torch.tensor(float(late), device=device)) > 0)  # ranks stop together
        stop_early = cfg.early_stopping != "none" and bad_epochs >= cfg.patience
        if stop_early:
            history.stopped = "early stopping"
        elif out_of_time:
            history.stopped = "time budget"
        if ckpt_path is not None:
            rng = [None] * ctx.world
            if ctx.world > 1:
                dist.all_gather_object(rng, _rng_state(device))
            else:
                rng = [_rng_state(device)]
            if ctx.main:
                if improved:
                    _atomic_save({"model": best_state}, run_dir / "best.pt")
                if epoch + 1 in snapshot_epochs:
                    _atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "record": record},
                                 snapshot_path(run_dir, epoch + 1))
                _atomic_save({
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": rng, "train_config": dataclasses.asdict(cfg), "history": history.to_dict(),
                    "epoch": epoch, "best": best, "bad_epochs": bad_epochs,
                }, ckpt_path)
        ctx.barrier()
        if stop_early or out_of_time:
            break
    if best_state is not None and cfg.early_stopping != "none":
        model.load_state_dict(best_state)  # return the best validated weights
    model.eval()
    return history
