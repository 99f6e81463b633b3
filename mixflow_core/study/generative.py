"""What a generative classifier offers beyond accuracy, for the notebooks: calibration and OOD detection of runs.

- `eval_tables`: the (N, K) tables of log p(x|k) behind a run's metrics.json (tables.pt, written by
  training; computed and cached for runs trained before it existed, with the same seed, batch and draws).
- `calibration`: reliability bins of p(y|x) on test before and after temperature scaling fit on
  validation (metrics.fit_temperature: accuracy unchanged), per run; `markdown_calibration`.
- `ood_sets`: the offline OOD sets of a data set (eval.ood_sets.standard_ood_sets on a subset of its test
  images, plus the other data set resampled to its shape and levels when its files are there).
- `ood_study`: AUROC / AUPR of every score of the flow, the per-class Gaussian and logistic regression
  (eval.ood.ood_scores), the bits/dim per set for histograms, and `ood_findings`: sentences that say where
  a density score prefers an OOD set, or is no better than chance, as the literature warns it may.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import DataConfig, Splits, load_data
from ..eval import ood
from ..eval.baselines import GAUSSIAN_METHOD, SKLEARN_MAX_TRAIN
from ..eval.metrics import TEMPERATURE_BOUNDS, accuracy, apply_temperature, fit_temperature, reliability_bins
from ..eval.ood_sets import other_dataset, standard_ood_sets
from ..eval.tables import markdown_table
from ..training.io import json_safe
from ..training.runs import evaluate_splits, read_tables
from .analysis import Run, table_cell

__all__ = ["eval_tables", "calibration", "markdown_calibration", "OTHER_DATASET", "FIGURE_TAGS", "ood_sets",
           "ood_study", "ood_findings"]

log = logging.getLogger(__name__)

# the data set whose images, resampled, are each data set's "other data set" OOD set
OTHER_DATASET: Mapping[str, str] = {"digits": "fashion-mnist", "fashion-mnist": "digits", "cifar10": "fashion-mnist"}
FIGURE_TAGS: Mapping[str, str] = {ood.FLOW_METHOD: "flow", GAUSSIAN_METHOD: "gaussian"}  # file-name tags of models


# -- the tables behind a run's metrics -------------------------------------------------------------------
def eval_tables(run: Run) -> dict[str, Any]:
    """The run's tables.pt payload (runs.write_tables): {"splits": {"val", "test": {"table", "y"}}, "log_py", ...}.

    Training writes it beside metrics.json. For a run without one (trained before it existed) or with one of
    another checkpoint, the tables are computed here exactly as training computes its metrics (best weights,
    the run's eval seed, eval batch size and draws) and written to the run directory.
    """
    payload = read_tables(run.run_dir)
    checkpoint = run.metrics.get("checkpoint")
    if payload is not None and payload.get("checkpoint") == checkpoint and set(payload["splits"]) >= {"val", "test"}:
        return payload
    seed = int(run.metrics.get("eval_seed", run.cfg.train.seed))
    runtime = run.cfg.runtime
    return evaluate_splits(run.model, run.data, run.run_dir, str(checkpoint), seed, runtime.eval_batch_size,
                           run.model.prior.means.device, runtime.eval_draws)[1]


# -- calibration -------------------------------------------------------------------------------------------
def _nll(log_post: Tensor, y: Tensor) -> float:
    """Mean -log p(y_i | x_i) of a table of log posteriors."""
    return float(-log_post.gather(1, y[:, None]).mean())


def calibration(runs: Mapping[str, Run], n_bins: int = 15,
                bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> dict[str, Any]:
    """Reliability of each run's p(y|x) on test, before and after temperature scaling fit on validation.

    T = metrics.fit_temperature on the validation table (the NLL of softmax((log p(x|k) + log p(k)) / T)),
    applied to the test table, searched within `bounds`; "temperature_at_bound" says the NLL still fell at a
    bound (a collapsed run's posteriors). A run whose tables are not finite gets T None.

    Returns:
        {"rows": [{"method", "accuracy", "temperature", "temperature_at_bound", "ece", "ece_scaled", "nll",
        "nll_scaled", "n"}],
         "bins": {label: metrics.reliability_bins dict}}: per run the bins under its name, and after scaling
         under "<name>, T = <T>" (JSON-ready).
    """
    rows, bins = [], {}
    for name, run in runs.items():
        t = eval_tables(run)
        log_py, val, test = t["log_py"], t["splits"]["val"], t["splits"]["test"]
        before = reliability_bins(test["table"], test["y"], log_py, n_bins)
        log_post = torch.log_softmax(test["table"] + log_py, 1)
        row = {"method": name, "accuracy": accuracy(test["table"], test["y"], log_py), "temperature": None,
               "temperature_at_bound": None, "ece": before["ece"], "ece_scaled": None,
               "nll": _nll(log_post, test["y"]), "nll_scaled": None, "n": len(test["y"])}
        bins[name] = before
        try:
            temperature = fit_temperature(val["table"], val["y"], log_py, bounds)
        except ValueError as err:  # NaN / +inf in the table: nothing to scale
            log.warning("%s: no temperature scaling (%s)", name, err)
        else:
            scaled = apply_temperature(test["table"], temperature, log_py)
            after = reliability_bins(scaled, test["y"], None, n_bins)
            row.update(temperature=temperature, ece_scaled=after["ece"], nll_scaled=_nll(scaled, test["y"]),
                       temperature_at_bound=temperature in bounds)
            bins[f"{name}, T = {temperature:.3g}"] = after
        rows.append(row)
    return json_safe({"rows": rows, "bins": bins})


def markdown_calibration(rows: Sequence[Mapping[str, Any]]) -> str:
    """calibration()'s rows as Markdown (— where a run has no temperature)."""
    cell = table_cell
    header = ["method", "test accuracy", "T (fit on val)", "ECE", "ECE after T", "NLL (nats)", "NLL after T", "n"]
    return markdown_table(header, (
        [r["method"], cell(r["accuracy"], ".4f"),
         cell(r["temperature"], ".3f") + (" (search bound)" if r.get("temperature_at_bound") else ""),
         cell(r["ece"], ".4f"), cell(r["ece_scaled"], ".4f"), cell(r["nll"], ".4f"), cell(r["nll_scaled"], ".4f"),
         r["n"]]
        for r in rows))


# -- out-of-distribution detection -------------------------------------------------------------------------
def ood_sets(data: Splits, dataset: str, n: int | None = 1000, seed: int = 0,
             other: str | None = "auto") -> tuple[dict[str, Tensor], list[str]]:
    """The OOD sets of a data set and notes on what was left out: ({name: images}, [note, ...]).

    eval.ood_sets.standard_ood_sets (uniform noise, blurred, inverted, flipped) of at most `n` test images, and
    `other` (default OTHER_DATASET[dataset]; None: none) resampled to this data's shape and levels, as many of
    its test images as the other sets have (at most n and at most this test set's size), under
    "<other> (resampled)". An other data set whose files are missing is left out
    with a note (no download: the default path never touches the network).
    """
    sets = standard_ood_sets(data, seed=seed, n=n)
    notes: list[str] = []
    other = OTHER_DATASET.get(dataset) if other == "auto" else other
    if other is not None:
        try:
            source = load_data(DataConfig(other))
        except OSError as err:  # DatasetNotFoundError (a FileNotFoundError), or unreadable files
            notes.append(f"{other} left out of the OOD sets: {err}")
        else:
            size = len(data.test) if n is None else min(n, len(data.test))
            sets[f"{other} (resampled)"] = other_dataset(source, data, n=size, seed=seed)
    return sets, notes


def ood_study(
    run: Run, sets: Mapping[str, Tensor], seed: int = 0, train_sample: int | None = 1000, draws: int = 1,
    gaussian_copies: int = 2, gaussian_ridge: float | None = None, sklearn: Sequence[str] = ("logistic",),
    sklearn_max_train: int | None = SKLEARN_MAX_TRAIN, baselines: bool = True,
) -> dict[str, Any]:
    """OOD detection by a run's flow and its baselines, on the test set against each of `sets`.

    eval.ood.ood_scores with the run's evaluation batch and device; the flow's test table is the run's own
    (eval_tables) when it was computed with `draws` dequantisation draws (in-distribution and OOD inputs are
    always scored alike). gaussian_ridge: the Gaussian's ridge (e.g. its results-table row's) to skip the
    ridge search. baselines False: the flow's rows only (no Gaussian, no sklearn).

    Returns:
        {"rows": ood_table rows, "bpd": {model: {set: (N,) bits/dim of the marginal}} for the density models
        (numpy arrays; IN_DISTRIBUTION is the test set), "findings": ood_findings(rows), "draws"}.
    """
    t = eval_tables(run)
    in_table = t["splits"]["test"]["table"] if int(t["draws"]) == draws else None
    by_model = ood.ood_scores(
        run.model, run.data, sets, run.cfg.runtime.eval_batch_size, seed, baselines, sklearn if baselines else (),
        train_sample,
        device=run.model.prior.means.device, draws=draws, gaussian_copies=gaussian_copies, gaussian_ridge=gaussian_ridge,
        sklearn_max_train=sklearn_max_train, in_table=in_table)
    rows = [r for name, by_set in by_model.items() for r in ood.ood_rows(name, by_set)]
    bpd = {name: {s: -np.asarray(scores["neg_bpd"]) for s, scores in by_set.items()}
           for name, by_set in by_model.items() if "neg_bpd" in by_set[ood.IN_DISTRIBUTION]}
    return {"rows": json_safe(rows), "bpd": bpd, "findings": ood_findings(rows), "draws": draws}


def ood_findings(rows: Sequence[Mapping[str, Any]], chance_margin: float = 0.05) -> list[str]:
    """Plain sentences for the OOD rows where a score fails: AUROC below 0.5 (the score prefers the OOD set:
    the likelihood failure Nalisnick et al. 2019 report) or within `chance_margin` of chance."""
    out = []
    for r in rows:
        what = f"{r['model']}: {ood.SCORE_DESCRIPTIONS.get(r['score'], r['score'])} on {r['ood_set']}"
        if r["auroc"] < 0.5 - chance_margin:
            out.append(f"{what}: AUROC {r['auroc']:.3f} < 0.5, the score ranks the OOD set as MORE in-distribution "
                       "than the test images")
        elif abs(r["auroc"] - 0.5) <= chance_margin:
            out.append(f"{what}: AUROC {r['auroc']:.3f}, no better than chance")
    return out

