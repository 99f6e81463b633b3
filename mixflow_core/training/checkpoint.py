"""Checkpoints: what fit saves every epoch, how it reads them back, and when a resume is refused.

A checkpoint (run_dir/checkpoint.pt) holds the model, optimiser and scheduler states, every
rank's RNG state, the train and runtime configs, the history and the early-stopping state;
`best.pt` holds the best validated weights, `snapshots/epoch_NNNN.pt` weights at chosen
epochs. All are written atomically (io.save_torch) by rank 0. Resuming applies the one resume
policy, config.resume_conflicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..flows.config import to_dict
from .config import RuntimeConfig, TrainConfig, resume_conflicts, upgrade

__all__ = ["CheckpointError", "load_checkpoint", "snapshot_path", "rng_state", "set_rng_state", "saved_configs",
           "check_resumable"]


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model / configuration."""


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


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    # .cpu(): a checkpoint loaded with map_location=cuda holds the states on the GPU; generators take CPU ByteTensors
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def saved_configs(cfg: TrainConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """The config sections a checkpoint records: {"train": ..., "runtime": ...}."""
    return {"train": to_dict(cfg), "runtime": to_dict(runtime)}


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, runtime: RuntimeConfig, path: Path) -> None:
    """CheckpointError unless continuing `ckpt` with (cfg, runtime) is allowed by config.resume_conflicts."""
    if "configs" in ckpt:
        saved = ckpt["configs"]
    else:  # mixflow 0.1 saved one flat TrainConfig (runtime fields included)
        saved = upgrade({"train": ckpt.get("train_config", {})})
    refused = resume_conflicts(saved, saved_configs(cfg, runtime))
    if refused:
        change = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise CheckpointError(f"checkpoint {path} was written with another configuration ({change}); "
                              "start a new run directory or pass the same configuration")
