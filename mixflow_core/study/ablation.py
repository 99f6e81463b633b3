"""Explain the student's ~20%: its configuration, then one factor at a time toward the fix.

The `student` configuration repeats the original project's choices on top of a dataset profile:
means U[0,1) and log-std U[0,1), both learned; Adam at a constant lr 0.01 with weight decay 5e-4 on every
parameter including the prior; a 1-term log-det series; no ActNorm; no dequantisation noise;
loss -log p(x|y) + 0.05 sum_{y' != y} log p(x|y') (push-away), no cross-entropy.

Each variant changes exactly one of those choices to what the literature does (FlowGMM,
IB-INN, Residual Flows); `combined fix` is the dataset's own profile. Given the other backbone
family's profile (`ablate(..., other=...)`), the backbone is a factor too: the student's
configuration on the other family's architecture, and that family's own profile (the fixed
configuration on both backbones). The student's i-ResNet-only choices (its 1-term log-det series,
its initial scale of g) have no counterpart on a coupling flow and are left out there. All variants share
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

from ..data import Splits, load_data
from ..eval import tables
from ..eval.diagnostics import overlap_summary
from ..eval.metrics import evaluate
from ..flows.config import IRESNET_FIELDS
from ..flows.model import build_model
from ..training.config import RunConfig, apply_overrides, upgrade
from ..training.fit import NonFiniteLossError, fit
from ..training.io import json_safe, write_json, write_text

__all__ = ["STUDENT_BACKBONE", "STUDENT_OVERRIDES", "Variant", "student_config", "variants", "ablate", "markdown_table", "read_rows"]

logger = logging.getLogger(__name__)

STUDENT_BACKBONE = "iresnet"  # the original study's transformation: the base of the student configuration
STUDENT_OVERRIDES: dict[str, Any] = {
    "prior.init": "student", "prior.learn_means": True, "prior.learn_scales": True, "prior.covariance": "diagonal",
    "train.lr": 0.01, "train.prior_lr": None, "train.schedule": "constant", "train.weight_decay": 5e-4,
    "train.prior_weight_decay": 5e-4,
    "model.logdet": {"type": "power_series", "n_terms": 1}, "model.actnorm": False, "model.dequantize": False,
    "model.g_init_scale": 1.0,
    "train.objective": {"type": "push_away", "lam": 0.05},
}


@dataclass(frozen=True)
class Variant:
    name: str
    factor: str  # which of the student's choices it changes ("" for the student itself and the combined fix)
    overrides: dict[str, Any] = field(default_factory=dict)  # applied on top of the student configuration
    combined: bool = False  # True: the dataset profile itself (every fix at once)
    other_backbone: bool = False  # True: on the other backbone family's architecture (combined: its own profile)


def student_config(base: RunConfig) -> RunConfig:
    """The student's configuration on the architecture and data of `base` (on a coupling flow without the
    i-ResNet-only choices: the log-det series and g's initial scale)."""
    overrides = STUDENT_OVERRIDES
    if base.model.family != "iresnet":
        overrides = {k: v for k, v in overrides.items() if k.removeprefix("model.") not in IRESNET_FIELDS}
    return apply_overrides(base, overrides)


def variants(dim: int, other_family: str | None = None) -> list[Variant]:
    """Student, one variant per factor, and the combined fix; `dim` = data dimension D (hybrid beta = D).

    other_family: the other backbone family ("coupling" or "iresnet"): adds the student on its architecture and
    its own profile."""
    backbone = [] if other_family is None else [
        Variant(f"backbone: {other_family}", "backbone", other_backbone=True),
        Variant(f"combined fix, {other_family} backbone (its profile)", "", combined=True, other_backbone=True),
    ]
    return [
        Variant("student", ""),
        Variant("means separated, fixed (FlowGMM)", "mean init / separation",
                {"prior.init": "separated", "prior.learn_means": False}),
        Variant("means orthogonal 5 sigma, learned (IB-INN)", "mean init / separation",
                {"prior.init": "orthogonal", "prior.separation": 5.0}),
        Variant("sigma fixed (Sigma = I)", "learned sigma", {"prior.learn_scales": False}),
        Variant("no weight decay on the prior", "weight decay on the prior", {"train.prior_weight_decay": 0.0}),
        Variant("lr 1e-3", "learning rate", {"train.lr": 1e-3}),
        Variant("log-det 5 terms", "log-det estimator", {"model.logdet.n_terms": 5}),
        Variant("log-det Russian roulette", "log-det estimator",
                {"model.logdet": {"type": "russian_roulette", "n_exact_terms": 2}}),
        Variant("ActNorm", "ActNorm", {"model.actnorm": True}),
        Variant("dequantisation noise", "dequantisation", {"model.dequantize": True}),
        Variant("likelihood loss", "objective", {"train.objective": "likelihood"}),
        Variant(f"hybrid loss (beta = D = {dim})", "objective", {"train.objective": {"type": "hybrid", "beta": float(dim)}}),
        *backbone[:1],
        Variant("combined fix (dataset profile)", "", combined=True),
        *backbone[1:],
    ]


def _budget(cfg: RunConfig, epochs: int, max_minutes: float | None, seed: int, max_steps: int | None = None) -> RunConfig:
    """Same budget and evaluation for every variant: fixed epochs, no early stopping, and an exact (vectors) or unbiased
    (images: Russian roulette, 2 exact terms; ~3 vector-Jacobian products per block instead of a 10-term series'
    10, whose truncation is biased) evaluation log-det."""
    return replace(
        cfg,
        model=cfg.model.unbiased_eval(),
        train=replace(cfg.train, early_stopping="none", seed=seed),
        runtime=replace(cfg.runtime, epochs=epochs, max_minutes=max_minutes, max_steps=max_steps, progress=False,
                        eval_draws=1),  # one draw
    )


def _run_one(cfg: RunConfig, data: Splits, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    t0 = time.perf_counter()
    try:
        history = fit(model, data, cfg.train, cfg.runtime)
        status = history.stopped
    except NonFiniteLossError as err:
        logger.warning("variant diverged: %s", err)
        return {"status": "diverged", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    if hasattr(model.preprocess, "dequantize"):
        model.preprocess.dequantize = True  # evaluate every variant with noise: a valid bound
    torch.manual_seed(10_000 + seed)  # same evaluation noise for every variant
    metrics = evaluate(model, data.test, cfg.runtime.eval_batch_size, draws=1)  # one draw: the tables on record
    metrics.pop("confusion")
    steps = history.steps(len(data.train) // cfg.train.batch_size)  # fit drops the last partial batch
    row = {"status": status, "seconds": seconds, "epochs_run": len(history.epochs), "steps": steps, **metrics}
    row.update(overlap_summary(model, data.test, cfg.runtime.eval_batch_size))
    return json_safe(row)


def ablate(
    base: RunConfig,
    out_dir: str | Path,
    seeds: tuple[int, ...] = (0,),
    epochs: int = 30,
    max_minutes: float | None = None,
    only: tuple[str, ...] | None = None,
    max_steps: int | None = None,
    other: RunConfig | None = None,
) -> list[dict[str, Any]]:
    """Run the student configuration, the one-factor variants and the combined fix for each seed.

    Args:
        base: the dataset profile (the combined fix); the student's choices are applied on top of it.
        other: the same dataset's profile on the other backbone family (profiles.get_profile(..., backbone));
            adds the backbone variants (the student on its architecture, and `other` itself).
        out_dir: where ablation.json and ablation.md go (rows are saved after every run).
        seeds: training seeds, each run for every variant.
        epochs: epochs per run, no early stopping; max_minutes: wall-clock budget per run; max_steps: optimiser
            steps per run (a budget independent of the machine's load, for image-sized runs).
        only: names of the variants to run (default: all).

    Returns:
        All rows of out_dir/ablation.json (earlier ones included), one per (variant, seed).

    Example:
        >>> import tempfile
        >>> from mixflow_core.training.profiles import get_profile
        >>> rows = ablate(get_profile("toy2d", "smoke"), tempfile.mkdtemp(), epochs=1, only=("student", "ActNorm"))
        >>> [(r["variant"], r["status"]) for r in rows]
        [('student', 'completed'), ('ActNorm', 'completed')]
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ablation.json"
    rows = read_rows(path) if path.exists() else []
    done = {(r["variant"], r["seed"]): i for i, r in enumerate(rows)}
    data = load_data(base.data)
    dim = math.prod(data.data_shape)
    if other is not None and other.model.family == base.model.family:
        raise ValueError(f"other must be a profile of the other backbone family, got a {other.model.family} one too")
    student = student_config(base)
    for variant in variants(dim, None if other is None else other.model.family):
        if only is not None and variant.name not in only:
            continue
        if variant.other_backbone:  # the backbone alone changed: the other family's architecture, or its profile
            cfg = other if variant.combined else student_config(replace(base, model=other.model))
        else:
            cfg = base if variant.combined else apply_overrides(student, variant.overrides)
        for seed in seeds:
            run_cfg = _budget(cfg, epochs, max_minutes, seed, max_steps)
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
            _write(out, rows, base, seeds, epochs, max_minutes, max_steps)
    return rows


def _same_config(row: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a saved row was run with `cfg`; fields added to the configs since take their defaults."""
    try:
        saved = RunConfig.from_dict(row.get("config") or {})
    except (TypeError, ValueError):  # a field since removed or renamed: run it again
        return False
    return saved == cfg


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an ablation.json; those of mixflow 0.1 (variant "seed", flat configs) in today's shape."""
    rows = json.loads(Path(path).read_text())["rows"]
    for r in rows:
        if r["variant"] == "seed":  # the student's configuration was called "seed"
            r["variant"] = "student"
        if r.get("config"):
            r["config"] = upgrade(r["config"])
    return rows


_COLUMNS = [("accuracy", "test acc", ".3f"), ("bpd_conditional", "bpd", ".4g"), ("ece", "ECE", ".3f"),
            ("mean_dist_min_sigma", "min dist (sigma)", ".2f"), ("mean_dist_median_sigma", "median dist (sigma)", ".2f"),
            ("bhattacharyya_mean", "mean BC", ".3f"), ("nearer_other_fraction", "nearer other", ".3f"),
            ("steps", "steps", ".0f"), ("seconds", "train s", ".0f")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per variant: the mean over seeds (and the seed count); diverged runs are counted, not averaged."""
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    body = []
    for name in order:
        group = [r for r in rows if r["variant"] == name]
        ok = [r for r in group if r["status"] != "diverged"]
        cells = []
        for key, _, fmt in _COLUMNS:
            vals = [r[key] for r in ok if r.get(key) is not None]
            cells.append(format(sum(vals) / len(vals), fmt) if vals else "—")
        seeds = f"{len(ok)}" + (f" (+{len(group) - len(ok)} diverged)" if len(ok) < len(group) else "")
        body.append([name, group[0]["factor"] or "—", seeds, *cells])
    return tables.markdown_table(["variant", "factor", "seeds", *(c[1] for c in _COLUMNS)], body)


def _write(out: Path, rows: list[dict[str, Any]], base: RunConfig, seeds, epochs, max_minutes, max_steps=None) -> None:
    meta = {"base": base.to_dict(), "student_overrides": STUDENT_OVERRIDES, "seeds": list(seeds), "epochs": epochs,
            "max_minutes": max_minutes, "max_steps": max_steps}
    write_json(out / "ablation.json", {"meta": meta, "rows": rows}, indent=1)
    write_text(out / "ablation.md", markdown_table(rows) + "\n")
