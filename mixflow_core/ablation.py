"""Explain the student's ~20%: its configuration, then one factor at a time toward the fix.

The `seed` configuration repeats the original project's choices on top of a dataset profile:
means U[0,1) and log-std U[0,1), both learned; Adam at a constant lr 0.01 with weight decay 5e-4 on every
parameter including the prior; a 1-term log-det series; no ActNorm; no dequantisation noise;
loss -log p(x|y) + 0.05 sum_{y' != y} log p(x|y') (push-away), no cross-entropy.

Each variant changes exactly one of those choices to what the literature does (FlowGMM,
IB-INN, Residual Flows); `combined fix` is the dataset's own profile. All variants share
seeds and budget (epochs, time, no early stopping). Every variant is evaluated the same way:
test accuracy, conditional bits/dim *with* uniform dequantisation (a valid bound even for a
model trained without noise), ECE, and overlap diagnostics of the class Gaussians.
Rows are written to out_dir/ablation.json and .md after every run, and a rerun skips rows
already there with the same configuration (a row whose configuration changed, e.g. the combined
fix after a profile change, is run again and replaced), so an interrupted ablation loses at most one run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import Splits, load_data
from .diagnostics import overlap_summary
from .metrics import evaluate
from .model import build_model
from .profiles import RunConfig, apply_overrides
from .train import NonFiniteLossError, fit

__all__ = ["SEED_OVERRIDES", "Variant", "seed_config", "variants", "ablate", "markdown_table"]

logger = logging.getLogger(__name__)

SEED_OVERRIDES: dict[str, Any] = {
    "prior.init": "seed", "prior.learn_means": True, "prior.learn_scales": True,
    "train.lr": 0.01, "train.prior_lr": None, "train.schedule": "constant", "train.weight_decay": 5e-4,
    "train.prior_weight_decay": 5e-4,
    "model.logdet": "power_series", "model.n_terms": 1, "model.actnorm": False, "model.dequantize": False,
    "train.objective": "push_away", "train.push_lambda": 0.05,
}


@dataclass(frozen=True)
class Variant:
    name: str
    factor: str  # which of the seed's choices it changes ("" for the seed itself and the combined fix)
    overrides: dict[str, Any] = field(default_factory=dict)  # applied on top of the seed configuration
    combined: bool = False  # True: the dataset profile itself (every fix at once)


def seed_config(base: RunConfig) -> RunConfig:
    """The student's configuration on the architecture and data of `base`."""
    return apply_overrides(base, SEED_OVERRIDES)


def variants(dim: int) -> list[Variant]:
    """Seed, one variant per factor, and the combined fix; `dim` = data dimension D (hybrid beta = D)."""
    return [
        Variant("seed", ""),
        Variant("means separated, fixed (FlowGMM)", "mean init / separation",
                {"prior.init": "separated", "prior.learn_means": False}),
        Variant("means orthogonal 5 sigma, learned (IB-INN)", "mean init / separation",
                {"prior.init": "orthogonal", "prior.separation": 5.0}),
        Variant("sigma fixed (Sigma = I)", "learned sigma", {"prior.learn_scales": False}),
        Variant("no weight decay on the prior", "weight decay on the prior", {"train.prior_weight_decay": 0.0}),
        Variant("lr 1e-3", "learning rate", {"train.lr": 1e-3}),
        Variant("log-det 5 terms", "log-det estimator", {"model.n_terms": 5}),
        Variant("log-det Russian roulette", "log-det estimator", {"model.logdet": "russian_roulette", "model.n_terms": 2}),
        Variant("ActNorm", "ActNorm", {"model.actnorm": True}),
        Variant("dequantisation noise", "dequantisation", {"model.dequantize": True}),
        Variant("likelihood loss", "objective", {"train.objective": "likelihood"}),
        Variant(f"hybrid loss (beta = D = {dim})", "objective", {"train.objective": "hybrid", "train.beta": float(dim)}),
        Variant("combined fix (dataset profile)", "", combined=True),
    ]


def _budget(cfg: RunConfig, epochs: int, max_minutes: float | None, seed: int) -> RunConfig:
    """Same budget and evaluation for every variant: fixed epochs, no early stopping, exact-enough eval log-det."""
    eval_logdet = "exact" if cfg.model.arch == "mlp" else "power_series"
    return replace(
        cfg,
        model=replace(cfg.model, eval_logdet=eval_logdet, eval_n_terms=10),
        train=replace(cfg.train, epochs=epochs, max_minutes=max_minutes, early_stopping="none", seed=seed, progress=False),
    )


def _run_one(cfg: RunConfig, data: Splits, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    t0 = time.perf_counter()
    try:
        history = fit(model, data, cfg.train)
        status = history.stopped
    except NonFiniteLossError as err:
        logger.warning("variant diverged: %s", err)
        return {"status": "diverged", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    if hasattr(model.preprocess, "dequantize"):
        model.preprocess.dequantize = True  # evaluate every variant with noise: a valid bound
    torch.manual_seed(10_000 + seed)  # same evaluation noise for every variant
    metrics = evaluate(model, data.test, cfg.train.eval_batch_size, draws=1)  # one draw: the tables on record
    metrics.pop("confusion")
    row = {"status": status, "seconds": seconds, "epochs_run": len(history.epochs), **metrics}
    row.update(overlap_summary(model, data.test, cfg.train.eval_batch_size))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def ablate(
    base: RunConfig,
    out_dir: str | Path,
    seeds: tuple[int, ...] = (0,),
    epochs: int = 30,
    max_minutes: float | None = None,
    only: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Run seed, one-factor variants and combined fix for each seed; returns (and writes) the rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ablation.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["variant"], r["seed"]): i for i, r in enumerate(rows)}
    data = load_data(base.data)
    dim = math.prod(data.data_shape)
    seed_cfg = seed_config(base)
    for variant in variants(dim):
        if only is not None and variant.name not in only:
            continue
        cfg = base if variant.combined else apply_overrides(seed_cfg, variant.overrides)
        for seed in seeds:
            run_cfg = _budget(cfg, epochs, max_minutes, seed)
            key = (variant.name, seed)
            if key in done and _same_config(rows[done[key]], run_cfg):
                continue
            logger.info("ablation: %s (seed %d)%s", variant.name, seed, " (its configuration changed)" if key in done else "")
            row = {"variant": variant.name, "factor": variant.factor, "seed": seed, **_run_one(run_cfg, data, seed)}
            row["config"] = run_cfg.to_dict()
            if key in done:
                rows[done[key]] = row  # a stale row (the profile changed since): replaced in place
            else:
                rows.append(row)
            _write(out, rows, base, seeds, epochs, max_minutes)
    return rows


def _effective(cfg: RunConfig) -> RunConfig:
    """`cfg` with the loss weights its objective does not use set to their defaults (beta outside hybrid,
    push_lambda outside push_away): two configs that train identically compare equal."""
    t, default = cfg.train, type(cfg.train)()
    beta = t.beta if t.objective == "hybrid" else default.beta
    push = t.push_lambda if t.objective == "push_away" else default.push_lambda
    return replace(cfg, train=replace(t, beta=beta, push_lambda=push))


def _same_config(row: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a saved row was run with (effectively) `cfg`; fields added to the configs since take their defaults."""
    try:
        saved = RunConfig.from_dict(row.get("config") or {})
    except (TypeError, ValueError):  # a field since removed or renamed: run it again
        return False
    return _effective(saved) == _effective(cfg)


_COLUMNS = [("accuracy", "test acc", ".3f"), ("bpd_conditional", "bpd", ".4g"), ("ece", "ECE", ".3f"),
            ("mean_dist_min_sigma", "min dist (sigma)", ".2f"), ("mean_dist_median_sigma", "median dist (sigma)", ".2f"),
            ("bhattacharyya_mean", "mean BC", ".3f"), ("nearer_other_fraction", "nearer other", ".3f"),
            ("seconds", "train s", ".0f")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per variant: the mean over seeds (and the seed count); diverged runs are counted, not averaged."""
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    lines = ["| variant | factor | seeds | " + " | ".join(c[1] for c in _COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(_COLUMNS)]
    for name in order:
        group = [r for r in rows if r["variant"] == name]
        ok = [r for r in group if r["status"] != "diverged"]
        cells = []
        for key, _, fmt in _COLUMNS:
            vals = [r[key] for r in ok if r.get(key) is not None]
            cells.append(format(sum(vals) / len(vals), fmt) if vals else "—")
        seeds = f"{len(ok)}" + (f" (+{len(group) - len(ok)} diverged)" if len(ok) < len(group) else "")
        lines.append(f"| {name} | {group[0]['factor'] or '—'} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: Path, rows: list[dict[str, Any]], base: RunConfig, seeds, epochs, max_minutes) -> None:
    meta = {"base": base.to_dict(), "seed_overrides": SEED_OVERRIDES, "seeds": list(seeds), "epochs": epochs,
            "max_minutes": max_minutes}
    tmp = out / "ablation.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out / "ablation.json")
    (out / "ablation.md").write_text(markdown_table(rows) + "\n")
