"""The study's glue for the notebooks: which configuration to train, and what to compute from a run.

Three configurations are compared:
- ``fixed``: the dataset profile on its default backbone (every fix at once);
- ``student``: the original student's choices (ablation.STUDENT_OVERRIDES) on the original study's
  backbone, the i-ResNet profile's architecture, and the same data, trained without early stopping
  (its validation numbers are what collapse);
- ``fixed-<backbone>`` (CONFIGS' third, e.g. ``fixed-coupling``): the dataset's profile on the other
  backbone family, so the report shows both families side by side.

A notebook calls `run_config`, trains with runs.ensure_run, and later reads the run back with
`load_run`; everything else here turns a run into numbers and figure inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..data import Splits, load_data
from ..eval.diagnostics import bhattacharyya, embed, latents, overlap_summary
from ..eval.tables import markdown_table
from ..flows.model import MixtureFlow
from ..training.checkpoint import load_checkpoint
from ..training.config import RunConfig, apply_overrides
from ..training.io import json_safe
from ..training.profiles import DEFAULT_BACKBONE, get_profile
from ..training.profiles import other_backbone as _other_family
from ..training.runs import METRICS, RunError, check_same_data, dataset_info, load_run_model, read_history, read_json
from .ablation import STUDENT_BACKBONE, student_config

__all__ = [
    "CONFIGS", "STUDENT_BACKBONE", "configs", "flow_method", "other_backbone", "run_config", "snapshot_epochs", "Run", "load_run", "load_runs", "overlap_numbers", "snapshot_models", "test_subset",
    "gaussian_panel", "embedding_panels", "overlap_matrices", "results_rows", "table_cell", "markdown_results",
    "SAMPLE_QUALITY_TEMPERATURES", "sample_quality_rows", "markdown_sample_quality",
]

CONFIGS = ("fixed", "student")  # the two every dataset has; configs(dataset) adds the other backbone's


def flow_method(config: str) -> str:
    """A configuration's row name in the report's tables (results, calibration, the committed spread).

    Example:
        >>> flow_method("fixed-coupling")
        'mixture flow: fixed-coupling'
    """
    return f"mixture flow: {config}"


def other_backbone(dataset: str) -> str:
    """The backbone family that is not the dataset's default."""
    return _other_family(DEFAULT_BACKBONE[dataset])


def configs(dataset: str) -> tuple[str, ...]:
    """The report's configurations of a dataset: fixed, student, and fixed on the other backbone family.

    Example:
        >>> configs("digits")
        ('fixed', 'student', 'fixed-coupling')
    """
    return (*CONFIGS, f"fixed-{other_backbone(dataset)}")


def run_config(
    dataset: str, profile: str = "default", config: str = "fixed", seed: int = 0, device: str = "cpu",
    overrides: dict[str, Any] | None = None, data_root: str | None = None, progress: bool = True,
) -> RunConfig:
    """The RunConfig of one of the study's configurations (`configs(dataset)`) on a dataset profile."""
    if dataset in DEFAULT_BACKBONE and config not in configs(dataset):
        raise ValueError(f"config must be one of {configs(dataset)}, got {config!r}")
    if config == "student":
        cfg = student_config(get_profile(dataset, profile, STUDENT_BACKBONE))
        cfg = replace(cfg, train=replace(cfg.train, early_stopping="none"))
    elif config.startswith("fixed-"):
        cfg = get_profile(dataset, profile, config.removeprefix("fixed-"))
    else:
        cfg = get_profile(dataset, profile)  # ValueError for an unknown dataset or profile
    flags: dict[str, Any] = {"train.seed": seed, "runtime.device": device, "runtime.progress": progress}
    if data_root:
        flags["data.root"] = data_root
    return apply_overrides(cfg, {**flags, **(overrides or {})})


def snapshot_epochs(epochs: int, count: int = 4) -> tuple[int, ...]:
    """`count` epochs from 1 to `epochs`, spaced geometrically (early training changes fastest)."""
    if epochs < 1 or count < 1:
        raise ValueError(f"epochs and count must be >= 1, got {epochs} and {count}")
    if count == 1:
        return (epochs,)
    points = np.geomspace(1, epochs, count)
    return tuple(sorted({int(round(p)) for p in points}))


@dataclass
class Run:
    """A trained run read back from its directory."""

    run_dir: Path
    model: MixtureFlow  # best weights, eval mode
    cfg: RunConfig
    info: dict[str, Any]
    data: Splits
    history: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])


def load_run(run_dir: str | Path, device: str = "cpu", data: Splits | None = None) -> Run:
    """Model (best weights), config, data and the JSON files of a finished run directory."""
    run_dir = Path(run_dir)
    model, cfg, info, _ = load_run_model(run_dir, device)
    if not (run_dir / METRICS).exists():
        raise RunError(f"{run_dir} has no {METRICS}: its training did not finish; rerun notebook 01 to resume it")
    if data is None:
        data = load_data(cfg.data)
    check_same_data(info, dataset_info(data), run_dir)
    torch.set_num_threads(cfg.runtime.threads)
    return Run(run_dir, model, cfg, info, data, read_history(run_dir), read_json(run_dir / METRICS))


def snapshot_models(run: Run) -> list[tuple[str, MixtureFlow]]:
    """(label, model) for every saved snapshot (epoch order), then the best weights."""
    out: list[tuple[str, MixtureFlow]] = []
    device = run.model.prior.means.device
    for path in sorted((run.run_dir / "snapshots").glob("epoch_*.pt")):
        ckpt = load_checkpoint(path, device)
        model = copy.deepcopy(run.model)
        model.load_state_dict(ckpt["model"])
        out.append((f"epoch {ckpt['epoch']}", model.eval()))
    out.append((f"best (epoch {run.history.get('best_epoch')})", run.model))
    return out


def test_subset(data: Dataset, max_points: int, seed: int = 0) -> Dataset:
    """At most `max_points` examples, chosen at random with a fixed seed (for t-SNE and scatter plots)."""
    n = len(data)
    if n <= max_points:
        return data
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]
    return Subset(data, sorted(idx.tolist()))


def gaussian_panel(model: MixtureFlow, data: Dataset, title: str, batch_size: int = 500) -> dict[str, Any]:
    """Input of plotting.fig_gaussian_ellipses: the class Gaussians and the latents of `data`."""
    z, y = latents(model, data, batch_size, model.prior.means.device)
    prior = model.prior
    return {
        "title": title,
        "means": prior.means.detach().double().cpu().numpy(),
        # std devs (K, D), or the factors L_k (K, D, D) of full covariances
        "scales": (prior.scale_tril() if prior.full else torch.exp(prior.log_scales).expand_as(prior.means))
        .detach().double().cpu().numpy(),
        "z": z.double().numpy(),
        "y": y.numpy(),
    }


def embedding_panels(panel: dict[str, Any], seed: int = 0, tsne: bool = True) -> dict[str, dict[str, Any]]:
    """PCA (class means projected with the same map) and t-SNE (means at class centroids) of a panel's latents."""
    z, y, means = panel["z"], panel["y"], panel["means"]
    out = {}
    points, centers = embed(z, "pca", seed, extra=means)
    out["pca"] = {"points": points, "y": y, "centers": centers}
    if tsne:
        points, _ = embed(z, "tsne", seed)
        centers = np.stack([points[y == k].mean(0) if (y == k).any() else np.full(2, np.nan) for k in range(len(means))])
        out["tsne"] = {"points": points, "y": y, "centers": centers}
    return out


def overlap_matrices(model: MixtureFlow) -> dict[str, np.ndarray]:
    """(K, K) distances between class means in sigma units and Bhattacharyya coefficients."""
    return {
        "distance_sigma": model.prior.mean_distances().detach().double().cpu().numpy(),
        "bhattacharyya": bhattacharyya(model.prior).numpy(),
    }


def overlap_numbers(model: MixtureFlow, data: Dataset, batch_size: int = 500) -> dict[str, float]:
    """diagnostics.overlap_summary (JSON-ready), with NaN/inf as None."""
    return json_safe(overlap_summary(model, data, batch_size))


_RESULT_KEYS = ("accuracy", "bpd_conditional", "bpd_marginal", "ece")


def results_rows(runs: dict[str, dict[str, Any]], baselines: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Table rows: one per configuration (its metrics.json test split), then the baselines."""
    rows = []
    for name, metrics in runs.items():
        test = metrics["test"]
        rows.append({"method": name, "kind": "mixture flow", **{k: test.get(k) for k in _RESULT_KEYS},
                     "n": test.get("n"), "draws": test.get("draws", 1), "epochs": metrics.get("epochs"),
                     "best_epoch": metrics.get("best_epoch")})
    for b in baselines or []:
        rows.append({"method": b["method"], "kind": "baseline", **{k: b.get(k) for k in _RESULT_KEYS}, "n": b.get("n"),
                     "draws": b.get("draws")})
    return rows


def table_cell(v: Any, fmt: str) -> str:
    """One Markdown table cell: — for None, scientific notation for |floats| >= 1e4 (collapsed runs), else fmt."""
    if v is None:
        return "—"
    return format(v, ".3e") if isinstance(v, float) and abs(v) >= 1e4 else format(v, fmt)


def markdown_results(rows: list[dict[str, Any]]) -> str:
    """The results table as Markdown (— where a method has no such number).

    "draws": dequantisation draws averaged per test image for the densities (— for classifiers without one).
    """
    cell = table_cell
    header = ["method", "kind", "test accuracy", "bits/dim (conditional)", "bits/dim (marginal)", "ECE", "n", "draws"]
    return markdown_table(header, (
        [r["method"], r["kind"], cell(r["accuracy"], ".4f"), cell(r["bpd_conditional"], ".4f"),
         cell(r["bpd_marginal"], ".4f"), cell(r["ece"], ".4f"), cell(r.get("n"), "d"), cell(r.get("draws"), "d")]
        for r in rows))


SAMPLE_QUALITY_TEMPERATURES = (1.0, 0.7)


def sample_quality_rows(
    models: dict[str, MixtureFlow], data: Splits, temperatures: Sequence[float] = SAMPLE_QUALITY_TEMPERATURES,
    n_per_class: int = 100, seed: int = 0, gaussian_ridge: float | None = None, max_train: int = 30_000,
    gaussian: bool = True,
) -> list[dict[str, Any]]:
    """Sample quality of each model and of the per-class Gaussian baseline (unless `gaussian` is False), per
    temperature (eval.sample_quality).

    Each method draws `n_per_class` samples of every class at each temperature (the flow: its prior at T,
    then the inverse flow; the Gaussian: baselines.gaussian_samples with `gaussian_ridge`, None: chosen on
    validation), scored against the real test images by sample_quality with one reference classifier fit
    on (up to `max_train`) real training images.
    """
    from ..eval.baselines import gaussian_samples
    from ..eval.sample_quality import fit_reference_classifier, sample_quality

    (x_tr, y_tr), (x_te, y_te) = data.train.tensors, data.test.tensors  # Splits hold TensorDatasets
    reference = fit_reference_classifier(x_tr, y_tr, data.levels, seed=seed, max_train=max_train)
    k = data.num_classes
    rows = []
    for temperature in temperatures:
        draws: dict[str, tuple[Tensor, Tensor]] = {}
        for name, model in models.items():
            gen = torch.Generator(device=model.prior.means.device).manual_seed(seed)
            labels = torch.arange(k, device=model.prior.means.device).repeat_interleave(n_per_class)
            with torch.no_grad():
                images = torch.cat([model.sample(part, temperature=temperature, generator=gen)
                                    for part in labels.split(500)])
            draws[name] = (images.cpu(), labels.cpu())
        if gaussian:
            draws["per-class Gaussian (logit space)"] = gaussian_samples(
                data, n_per_class, temperature, ridge=gaussian_ridge, copies=2, seed=seed)
        for name, (images, labels) in draws.items():
            row = sample_quality(reference, x_te, y_te, images, labels, data.levels, seed=seed)
            rows.append({"method": name, "temperature": temperature, **row})
    return rows


def markdown_sample_quality(rows: list[dict[str, Any]]) -> str:
    """The sample-quality table as Markdown: C2ST accuracies (0.5 = indistinguishable), class fidelity, Fréchet."""
    real = format(rows[0]["real_class_fidelity"], ".3f") if rows else "—"
    header = ["method", "T", "C2ST 1-NN", "C2ST logistic", f"class fidelity (real: {real})", "Fréchet (PCA-50)",
              "samples"]
    return markdown_table(header, (
        [r["method"], f"{r['temperature']:g}", f"{r['c2st_knn_accuracy']:.3f}", f"{r['c2st_logistic_accuracy']:.3f}",
         f"{r['class_fidelity']:.3f}", f"{r['frechet']:.3f}", r["n"]]
        for r in rows))


def load_runs(run_dirs: dict[str, str | Path], device: str = "cpu") -> dict[str, Run]:
    """load_run for several run directories, loading the data once when their data configs agree."""
    out: dict[str, Run] = {}
    for name, path in run_dirs.items():
        shared = next((r.data for r in out.values() if r.cfg.data == _data_cfg(path)), None)
        out[name] = load_run(path, device, data=shared)
    return out


def _data_cfg(run_dir: str | Path):
    from ..training.runs import read_config

    return read_config(Path(run_dir))[0].data
