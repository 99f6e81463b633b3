"""Run directories: what a training run leaves behind, and how to read it back.

A run directory holds
- ``config.json``: RunConfig.to_dict() (sections data / model / prior / train / runtime), the profile
  name, and ``dataset_info`` (data_shape, levels, num_classes, class names and counts, split
  sizes) so that a model can be rebuilt without loading the data;
- ``checkpoint.pt`` (last epoch, for resuming) and ``best.pt`` (best validated weights),
  both written by fit (checkpoint.py);
- ``history.json`` (History.to_dict()) and ``metrics.json`` (validation and test metrics);
- ``tables.pt``: the (N, K) tables of log p(x|k) those metrics come from, per split (``write_tables``), so
  that calibration, temperature scaling and OOD scores of the same numbers need no second evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data import Splits, load_data
from ..eval.metrics import evaluate, evaluate_with_table
from ..flows.model import MixtureFlow, build_model
from .checkpoint import load_checkpoint
from .config import RunConfig, apply_overrides, resume_conflicts, upgrade
from .distributed import resolve_device
from .fit import History, fit
from .io import read_json as _read_json
from .io import save_torch, write_json

__all__ = [
    "RunError", "one_line", "CONFIG", "HISTORY", "METRICS", "parse_set", "read_config_file", "refuse_resume_changes",
    "dataset_info", "check_same_data", "write_json", "write_config", "read_config", "find_checkpoint", "device_or_error",
    "load_run_model", "evaluate_seeded", "evaluate_splits", "seeded_rng", "TABLES", "write_tables", "read_tables", "merge_config",
    "train_run", "ensure_run", "read_json", "read_history",
]

CONFIG, HISTORY, METRICS, TABLES = "config.json", "history.json", "metrics.json", "tables.pt"
_META_KEYS = ("profile", "dataset_info", "mixflow_version")  # config.json keys that are not RunConfig sections


class RunError(ValueError):
    """Bad command-line input or an unusable run directory; the message says what to do."""


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# -- configuration ---------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict[str, Any]:
    """["train.lr=3e-4", "model.arch.hidden=[64,64]", "data.root=/d"] -> dotted overrides; values as JSON, else str."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or "." not in key:
            raise RunError(f"--set expects section.field=value (e.g. train.lr=3e-4), got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Dotted overrides from a .json / .yaml file of {section: {field: value}} (a run's config.json works too)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"config file {path} does not exist")
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RunError(f"reading {path} needs PyYAML: `pip install pyyaml` "
                               "(or write the config as .json)") from None
            content = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            content = json.loads(path.read_text())
        else:
            raise RunError(f"config file {path} must end in .json, .yaml or .yml")
    except RunError:
        raise
    except Exception as err:  # JSON / YAML syntax errors
        raise RunError(f"config file {path} could not be parsed: {one_line(err)}") from err
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise RunError(f"config file {path} must hold a mapping of sections (data, model, prior, train, runtime)")
    if "dataset_info" in content:  # a run's config.json, perhaps of an older version
        content = upgrade(content)
    out: dict[str, Any] = {}
    for section, fields in content.items():
        if section in _META_KEYS:
            continue
        if "." in section:  # already dotted: {"train.lr": 1e-3}
            out[section] = fields
        elif isinstance(fields, dict):
            out.update({f"{section}.{name}": value for name, value in fields.items()})
        else:
            raise RunError(f"config file {path}: section {section!r} must map field names to values")
    return out


def refuse_resume_changes(saved: RunConfig, new: RunConfig, run_dir: Path, what: str) -> None:
    """RunError naming every change config.resume_conflicts refuses (the one resume policy)."""
    refused = resume_conflicts(saved.to_dict(), new.to_dict())
    if refused:
        change = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        hint = " (or pass retrain=True to replace it)" if what.startswith("ensure_run") else ""
        raise RunError(f"{what} {run_dir / CONFIG} but changes {change}; only runtime.* and data.root / data.download "
                       f"may change on resume: start a new run directory for a different configuration{hint}")


# -- the run directory -------------------------------------------------------------------------
def dataset_info(data: Splits) -> dict[str, Any]:
    """What build_model and the plots need to know about the data, JSON-ready."""
    return {
        "data_shape": list(data.data_shape), "levels": data.levels, "num_classes": data.num_classes,
        "class_names": list(data.class_names), "class_counts": data.class_counts().tolist(),
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
    }


def check_same_data(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> None:
    """The data loaded now must look like the data the run was trained on."""
    keys = ("data_shape", "levels", "num_classes", "n_train", "n_val", "n_test")
    differ = [f"{k} {saved.get(k)} -> {now[k]}" for k in keys if saved.get(k) != now[k]]
    if differ:
        raise RunError(f"the data loaded now differ from those of {run_dir / CONFIG}: {', '.join(differ)}")


def write_config(run_dir: Path, cfg: RunConfig, profile: str, info: dict[str, Any]) -> None:
    from ..version import __version__

    content = {"profile": profile, **cfg.to_dict(), "dataset_info": info, "mixflow_version": __version__}
    write_json(run_dir / CONFIG, content)


def read_config(run_dir: Path) -> tuple[RunConfig, str, dict[str, Any]]:
    """(RunConfig, profile name, dataset_info) of a run directory."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise RunError(f"{path} does not exist; is {run_dir} a run directory written by `mixflow train`?")
    try:
        saved = json.loads(path.read_text())
        cfg = RunConfig.from_dict({k: v for k, v in saved.items() if k not in _META_KEYS})
        return cfg, saved.get("profile", "custom"), saved["dataset_info"]
    except Exception as err:
        raise RunError(f"{path} is not a valid run configuration: {one_line(err)}") from err


def find_checkpoint(run_dir: Path) -> Path:
    """best.pt (best validated weights) if present, else checkpoint.pt (last epoch)."""
    for name in ("best.pt", "checkpoint.pt"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    raise RunError(f"no best.pt or checkpoint.pt in {run_dir}; train it first (or resume with `train --resume`)")


def device_or_error(name: str) -> torch.device:
    """distributed.resolve_device, its ValueError as a one-line RunError."""
    try:
        return resolve_device(name)
    except ValueError as err:
        raise RunError(f"{one_line(err)} (--device)") from err


def load_run_model(run_dir: Path, device: str | None = None) -> tuple[MixtureFlow, RunConfig, dict[str, Any], Path]:
    """(model in eval mode with the run's best weights, config, dataset_info, checkpoint path).

    `device` None uses the run's own runtime.device.
    """
    cfg, _, info = read_config(run_dir)
    device = device_or_error(device or cfg.runtime.device)
    path = find_checkpoint(run_dir)
    ckpt = load_checkpoint(path, device)  # CheckpointError (a ValueError) if unreadable
    model = build_model(tuple(info["data_shape"]), info["num_classes"], info["levels"], cfg.model, cfg.prior)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunError(f"checkpoint {path} holds no model weights")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise RunError(f"checkpoint {path} does not match the model of {run_dir / CONFIG}: {one_line(err)}") from err
    return model.to(device).eval(), cfg, info, path


def evaluate_seeded(
    model: MixtureFlow, data: Dataset, seed: int, batch_size: int, device: torch.device, draws: int = 1,
) -> dict[str, Any]:
    """metrics.evaluate with the global RNG (dequantisation noise, Hutchinson probes) seeded, then restored.

    The same seed gives the same numbers for the same weights and device, so `mixflow evaluate`
    reproduces the metrics.json that `mixflow train` wrote.
    """
    with seeded_rng(seed, device):
        return evaluate(model, data, batch_size, device, draws)


def evaluate_splits(
    model: MixtureFlow, data: Splits, run_dir: str | Path, checkpoint: str, seed: int, batch_size: int,
    device: torch.device, draws: int = 1, splits: tuple[str, ...] = ("val", "test"),
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The metrics of each split, seeded as evaluate_seeded (the same numbers), and their tables in run_dir/tables.pt.

    Returns ({split: metrics}, write_tables' payload). The one evaluation behind metrics.json (train_run) and
    behind a tables.pt computed later for an older run (study.generative.eval_tables).
    """
    metrics, tables = {}, {}
    for split in splits:
        with seeded_rng(seed, device):
            metrics[split], *tables[split] = evaluate_with_table(model, getattr(data, split), batch_size, device, draws)
    payload = write_tables(run_dir, tables, model.prior.log_class_probs, checkpoint, seed, metrics[splits[-1]]["draws"])
    return metrics, payload


def write_tables(run_dir: str | Path, tables: dict[str, tuple[torch.Tensor, torch.Tensor]], log_py: torch.Tensor,
                 checkpoint: str, seed: int, draws: int) -> dict[str, Any]:
    """run_dir/tables.pt: {"splits": {split: {"table": (N, K) float64 log p(x|k), "y": (N,)}}, "log_py" (K,),
    "checkpoint", "eval_seed", "draws"} (CPU tensors), written atomically; returns that payload."""
    payload = {"checkpoint": checkpoint, "eval_seed": seed, "draws": draws,
               "log_py": log_py.detach().cpu().double(),
               "splits": {split: {"table": t.detach().cpu().double(), "y": y.detach().cpu().long()}
                          for split, (t, y) in tables.items()}}
    save_torch(payload, Path(run_dir) / TABLES)
    return payload


def read_tables(run_dir: str | Path) -> dict[str, Any] | None:
    """write_tables' payload of run_dir, or None when the run has none (runs trained before tables.pt existed)."""
    path = Path(run_dir) / TABLES
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise RunError(f"{path} is not a readable tables file ({one_line(err)}); delete it to recompute") from err


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global RNG (and the device's, on CUDA) seeded with `seed`; after: restored as before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def merge_config(base: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """apply_overrides with its ValueError turned into a one-line RunError."""
    try:
        return apply_overrides(base, overrides)
    except (ValueError, TypeError) as err:
        raise RunError(one_line(err)) from err


def read_json(path: str | Path) -> Any:
    """io.read_json with a missing or unreadable file as a one-line RunError."""
    try:
        return _read_json(path)
    except (OSError, ValueError) as err:
        raise RunError(one_line(err)) from err


def read_history(run_dir: str | Path) -> dict[str, Any]:
    """run_dir/history.json as a dict (records of older versions with today's keys, see History.from_dict)."""
    return History.from_dict(read_json(Path(run_dir) / HISTORY)).to_dict()


def train_run(
    cfg: RunConfig,
    run_dir: str | Path,
    profile: str = "custom",
    resume: bool = False,
    saved_info: dict[str, Any] | None = None,
    snapshot_epochs: tuple[int, ...] = (),
) -> tuple[Any, dict[str, Any] | None]:
    """Train `cfg` into `run_dir` (config.json, checkpoints, history.json, metrics.json); (History, metrics).

    The metrics are those of best.pt (else the last checkpoint) on val and test, with the run's
    seed, exactly as `mixflow evaluate` recomputes them. Under torchrun, ranks other than 0 train
    but write nothing and get (None, None). A failure before the first epoch leaves no
    config.json behind.
    """
    run_dir = Path(run_dir)
    device_or_error(cfg.runtime.device)  # fail early on a bad device
    if not resume and ((run_dir / CONFIG).exists() or (run_dir / "checkpoint.pt").exists()):
        raise RunError(f"{run_dir} already holds a run: continue it with --resume or choose another --run-dir")
    data = load_data(cfg.data)
    info = dataset_info(data)
    if saved_info is not None:
        check_same_data(saved_info, info, run_dir)
    torch.manual_seed(cfg.train.seed)  # weight initialisation (a resumed run loads its weights instead)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    if main_rank:
        write_config(run_dir, cfg, profile, info)
    try:
        history = fit(model, data, cfg.train, cfg.runtime, run_dir=run_dir, resume=resume,
                      snapshot_epochs=tuple(snapshot_epochs))
    except Exception:
        if main_rank and not resume and not (run_dir / "checkpoint.pt").exists():
            (run_dir / CONFIG).unlink(missing_ok=True)  # failed before any epoch: leave no half run behind
        raise
    if not main_rank:
        return None, None
    write_json(run_dir / HISTORY, history.to_dict())
    device, ckpt = model.prior.means.device, find_checkpoint(run_dir)
    model.load_state_dict(load_checkpoint(ckpt, device)["model"])  # exactly the weights `evaluate` loads
    seed, batch, draws = cfg.train.seed, cfg.runtime.eval_batch_size, cfg.runtime.eval_draws
    metrics: dict[str, Any] = {"checkpoint": ckpt.name, "eval_seed": seed, "best_epoch": history.best_epoch,
                               "epochs": len(history.epochs), "stopped": history.stopped}
    metrics.update(evaluate_splits(model, data, run_dir, ckpt.name, seed, batch, device, draws)[0])
    write_json(run_dir / METRICS, metrics)
    return history, metrics


def ensure_run(
    cfg: RunConfig, run_dir: str | Path, profile: str = "custom", snapshot_epochs: tuple[int, ...] = (),
    retrain: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """A finished run of `cfg` in `run_dir`: reuse it, resume it, or train it; (history dict, metrics, trained now).

    - metrics.json present and config.json equal to `cfg`: nothing to do (a notebook rerun is instant);
    - a checkpoint of the same configuration without metrics.json (interrupted): resume it;
    - another configuration in `run_dir`: RunError, unless `retrain`, which deletes the old run first.
    Only what config.resume_conflicts allows (runtime.*, data.root / data.download) may differ from a saved run.
    """
    import shutil

    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists():
        saved, _, info = read_config(run_dir)
        if not retrain:
            refuse_resume_changes(saved, cfg, run_dir, "ensure_run reuses")
        if retrain:
            shutil.rmtree(run_dir)
        elif (run_dir / METRICS).exists() and (run_dir / HISTORY).exists() and saved == cfg:
            return read_history(run_dir), read_json(run_dir / METRICS), False
        elif (run_dir / "checkpoint.pt").exists():
            history, metrics = train_run(cfg, run_dir, profile, resume=True, saved_info=info,
                                         snapshot_epochs=snapshot_epochs)
            return history.to_dict(), metrics, True
        else:
            (run_dir / CONFIG).unlink()  # a config without weights: start afresh
    history, metrics = train_run(cfg, run_dir, profile, snapshot_epochs=snapshot_epochs)
    return history.to_dict(), metrics, True
