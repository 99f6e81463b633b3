"""How much the report's numbers move with the training seed, and a rerun checked against that spread.

The report trains each configuration once (seed 0). `seed_table` trains the same configurations (the report's own
run directories and configs, `analysis.run_config`) for more seeds and scores the baselines the same way, so the
committed table (`benchmarks/spread/<dataset>-<profile>.json`, written by `benchmarks/report_seeds.py`) says what a
rerun may give: `summarise` gives mean ± sd per method; `reference_check` puts a new report's rows beside them.

Seeds move a flow's initialisation, batch order and dequantisation noise; the data split (data.seed) stays the one
the report uses. The Gaussian's only randomness is its dequantisation noise (seeded the same way); the sklearn
classifiers are deterministic given the split, so they are scored once and their sd is 0 by construction.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import load_data
from ..eval.baselines import baseline_table
from ..eval.tables import markdown_table
from ..training.runs import ensure_run
from .analysis import configs as report_configs
from .analysis import flow_method, run_config, table_cell
from .report import default_baselines, run_name

__all__ = ["METRICS", "seed_table", "summarise", "markdown_spread", "reference_check", "markdown_reference_check"]

METRICS = ("accuracy", "bpd_conditional")  # the headline columns
TOLERANCE_SD = 3.0  # a rerun is "within" when |value - mean| <= 3 sd (+ a floor for sd 0: SD_FLOOR)
SD_FLOOR = {"accuracy": 0.005, "bpd_conditional": 0.01}  # float rounding across CPUs moves even deterministic rows


def seed_table(
    dataset: str, profile: str = "default", seeds: Sequence[int] = (0, 1, 2), configs: Sequence[str] | None = None,
    runs_dir: str | Path = "runs/report", baselines: str | None = None, data_root: str | None = None,
    progress: bool = False, log=print,
) -> list[dict[str, Any]]:
    """One row per (method, seed): the report's flow configurations and its baselines.

    Args:
        dataset, profile: as `mixflow report`.
        seeds: training seeds (the report's run is seed 0; its run directory is reused, not retrained).
        configs: the flow configurations (default: the report's fixed configurations on both backbones, no student:
            it collapses to chance on every seed).
        runs_dir: where the runs live, named as report.plan names them, so both share them.
        baselines: "fast", "full" or "none"; None: the report's choice for the dataset (report.default_baselines).
        log: called with one line per finished row (progress on long work).

    Returns:
        [{"method", "kind", "seed", "accuracy", "bpd_conditional", "ece", "n", "seconds"}, ...]
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    configs = tuple(configs) if configs is not None else tuple(c for c in report_configs(dataset) if c != "student")
    baselines = baselines or default_baselines(dataset)
    if baselines not in ("fast", "full", "none"):
        raise ValueError(f"baselines must be 'fast', 'full' or 'none', got {baselines!r}")
    rows: list[dict[str, Any]] = []
    for config in configs:
        for seed in seeds:
            cfg = run_config(dataset, profile, config, seed, data_root=data_root, progress=progress)
            history, metrics, _ = ensure_run(cfg, Path(runs_dir) / run_name(dataset, profile, seed, config), profile)
            rows.append(_row(flow_method(config), "mixture flow", seed, metrics["test"],
                             sum(e["epoch_seconds"] for e in history["epochs"])))
            log(f"{rows[-1]['method']} seed {seed}: accuracy {rows[-1]['accuracy']:.4f}, "
                f"bits/dim {rows[-1]['bpd_conditional']:.4f}")
    if baselines == "none":
        return rows
    fixed = run_config(dataset, profile, "fixed", data_root=data_root)
    data, draws, fast = load_data(fixed.data), fixed.runtime.eval_draws, baselines == "fast"  # draws: as 04 scores
    for seed in seeds:  # the Gaussian's dequantisation noise moves with the seed
        for g in baseline_table(data, seed, fast, draws, sklearn=False):
            rows.append(_row(g["method"], "baseline", seed, g))
            log(f"{g['method']} seed {seed}: accuracy {g['accuracy']:.4f}, bits/dim {g['bpd_conditional']:.4f}")
    for r in baseline_table(data, seeds[0], fast, draws, gaussian=False):  # deterministic given the split: one fit
        rows.append(_row(r["method"], "baseline", None, r))
        log(f"{r['method']}: accuracy {r['accuracy']:.4f}")
    return rows


def _row(method: str, kind: str, seed: int | None, metrics: Mapping[str, Any], seconds: float | None = None) -> dict:
    return {"method": method, "kind": kind, "seed": seed, **{k: metrics.get(k) for k in (*METRICS, "ece", "n")},
            "seconds": seconds}


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd (n - 1) per method and metric, in the rows' order; `n_seeds` counts the seeds.

    Example:
        >>> rows = [{"method": "m", "kind": "mixture flow", "seed": s, "accuracy": a, "bpd_conditional": b}
        ...         for s, a, b in [(0, 0.90, 3.0), (1, 0.92, 3.2)]]
        >>> s = summarise(rows)[0]
        >>> (s["n_seeds"], round(s["accuracy_mean"], 3), round(s["accuracy_sd"], 4), s["bpd_conditional_mean"])
        (2, 0.91, 0.0141, 3.1)
    """
    out: list[dict[str, Any]] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        row: dict[str, Any] = {"method": method, "kind": group[0]["kind"],
                               "n_seeds": len(group) if group[0]["seed"] is not None else 0}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_sd"] = _mean_sd([r.get(m) for r in group])
            row[f"{m}_values"] = [r.get(m) for r in group]
        out.append(row)
    return out


def _pm(mean: float | None, sd: float | None, fmt: str) -> str:
    if mean is None:
        return "—"
    return f"{table_cell(mean, fmt)} ± {format(sd, fmt)}" if sd else table_cell(mean, fmt)


def markdown_spread(summary: Sequence[Mapping[str, Any]]) -> str:
    """The committed table: mean ± sd over seeds (a deterministic baseline shows its one value, 'deterministic')."""
    return markdown_table(
        ["method", "seeds", "test accuracy", "bits/dim (conditional)"],
        [[s["method"], s["n_seeds"] or "deterministic", _pm(s["accuracy_mean"], s["accuracy_sd"], ".4f"),
          _pm(s["bpd_conditional_mean"], s["bpd_conditional_sd"], ".4f")] for s in summary])


def reference_check(
    rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], tolerance_sd: float = TOLERANCE_SD,
) -> list[dict[str, Any]]:
    """A report's result rows beside the committed spread: for each method in both and each metric, this run's
    value, the committed mean and sd, and whether |value - mean| <= tolerance_sd * max(sd, SD_FLOOR[metric]).

    Example:
        >>> summary = [{"method": "m", "accuracy_mean": 0.90, "accuracy_sd": 0.01, "bpd_conditional_mean": 3.0,
        ...             "bpd_conditional_sd": 0.02, "n_seeds": 3}]
        >>> [(c["metric"], c["within"]) for c in reference_check([{"method": "m", "accuracy": 0.95,
        ...                                                       "bpd_conditional": 3.01}], summary)]
        [('accuracy', False), ('bpd_conditional', True)]
    """
    committed = {s["method"]: s for s in summary}
    out = []
    for r in rows:
        s = committed.get(r["method"])
        if s is None:
            continue
        for m in METRICS:
            value, mean, sd = r.get(m), s.get(f"{m}_mean"), s.get(f"{m}_sd")
            if value is None or mean is None:
                continue
            bound = tolerance_sd * max(sd or 0.0, SD_FLOOR[m])
            out.append({"method": r["method"], "metric": m, "value": value, "mean": mean, "sd": sd,
                        "n_seeds": s["n_seeds"], "within": abs(value - mean) <= bound, "bound": bound})
    return out


def markdown_reference_check(checks: Sequence[Mapping[str, Any]]) -> str:
    """The check as Markdown, one line per (method, metric)."""
    names = {"accuracy": "test accuracy", "bpd_conditional": "bits/dim"}
    return markdown_table(
        ["method", "metric", "this run", "committed mean ± sd (seeds)", "within ± bound"],
        [[c["method"], names[c["metric"]], table_cell(c["value"], ".4f"),
          f"{_pm(c['mean'], c['sd'], '.4f')} ({c['n_seeds'] or 'deterministic'})",
          f"{'yes' if c['within'] else '**no**'} (± {c['bound']:.4f})"] for c in checks])
