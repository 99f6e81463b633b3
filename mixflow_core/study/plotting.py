"""Figures as functions of data: fig_* return a matplotlib Figure (no pyplot state, no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from torch import Tensor

from ..eval.tables import markdown_table

__all__ = [
    "set_style", "class_colors", "save_figure", "sample_images", "fig_sample_grid", "fig_samples_2d",
    "fig_learning_curves", "mean_projection", "draw_gaussians", "fig_gaussian_ellipses", "fig_embedding", "fig_pairwise",
    "fig_distance_trajectory", "fig_confusion", "fig_image_strip", "most_overlapping_pairs", "fig_ablation",
    "fig_ood_histograms", "fig_reliability", "frontier_points", "markdown_frontier", "fig_frontier",
    "fig_bpd_per_image",
]


def set_style() -> None:
    """The one style for every figure: seaborn whitegrid/notebook (plain rcParams without seaborn), dpi 100."""
    try:
        import seaborn as sns

        sns.set_theme(style="whitegrid", context="notebook")
    except ImportError:
        mpl.rcParams.update({
            "axes.grid": True, "grid.color": "#dddddd", "axes.edgecolor": "#cccccc", "axes.axisbelow": True,
            "axes.spines.top": False, "axes.spines.right": False, "font.size": 11, "legend.frameon": False,
        })
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "savefig.bbox": "tight", "image.cmap": "viridis"})


def class_colors(k: int) -> list[tuple[float, float, float, float]]:
    """K distinguishable RGBA colours, the same for class k in every figure: tab10, tab20, tab20+b+c, then turbo."""
    if k <= 10:
        colors = mpl.colormaps["tab10"].colors[:k]
    elif k <= 20:
        colors = mpl.colormaps["tab20"].colors[:k]
    elif k <= 60:
        colors = [c for name in ("tab20", "tab20b", "tab20c") for c in mpl.colormaps[name].colors][:k]
    else:
        colors = [mpl.colormaps["turbo"](t) for t in np.linspace(0.05, 0.95, k)]
    return [to_rgba(c) for c in colors]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG (tight bounding box) at `path`, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if type(fig.canvas) is FigureCanvasBase:  # a bare Figure(...) has no renderer yet
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _np(x: Any) -> np.ndarray:
    """Tensors and array-likes -> float64 numpy arrays."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def sample_images(x: Tensor, data_shape: tuple[int, ...], levels: int) -> np.ndarray:
    """Samples (n, *data_shape) in levels 0..L-1 -> (n, H, W) or (n, H, W, 3) in [0, 1].

    (C, H, W) images with C = 1 or 3; flat vectors of a square size become square images
    (64 -> 8x8 digits).
    """
    x = (x.detach().cpu().double() / (levels - 1)).clamp(0, 1).numpy()
    if len(data_shape) == 3 and data_shape[0] in (1, 3):
        x = x.reshape(-1, *data_shape)
        return x[:, 0] if data_shape[0] == 1 else x.transpose(0, 2, 3, 1)
    side = math.isqrt(math.prod(data_shape))
    if side * side != math.prod(data_shape):
        raise ValueError(f"cannot draw samples of shape {tuple(data_shape)} as images")
    return x.reshape(-1, side, side)


def fig_sample_grid(rows: list[Tensor], data_shape: tuple[int, ...], levels: int, names: list[str]) -> Figure:
    """One row per class, one column per sample, 1-pixel white gaps, class names in the row corners.

    The figure has exactly the mosaic's aspect: each image pixel becomes `scale` output pixels
    (cells about 64 px high).
    """
    blocks = [sample_images(r, data_shape, levels) for r in rows]
    n, h, w = blocks[0].shape[:3]
    height, width = len(rows) * (h + 1) + 1, n * (w + 1) + 1
    mosaic = np.ones((height, width) + blocks[0].shape[3:])
    for r, block in enumerate(blocks):
        for c, image in enumerate(block):
            mosaic[1 + r * (h + 1): (r + 1) * (h + 1), 1 + c * (w + 1): (c + 1) * (w + 1)] = image
    scale, dpi = max(1, round(64 / h)), 100
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for r, name in enumerate(names):
        ax.text(1, 1 + r * (h + 1), name, color="yellow", fontsize=7, va="top", ha="left",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    return fig


def fig_samples_2d(rows: list[Tensor], names: list[str], temperature: float) -> Figure:
    """Scatter plot of 2-D samples, one colour per class."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    for x, name in zip(rows, names):
        x = x.detach().cpu().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=10, alpha=0.7, label=name)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"samples per class, T = {temperature:g}")
    ax.legend()
    return fig


# -- training curves -------------------------------------------------------------------------

_CURVES = (  # panel title, y label, [(line label, record keys in order of preference, line style)]
    ("training loss", "loss", [("train", ("train_loss",), "-"), ("validation", ("val_loss",), "--")]),
    ("validation bits/dim", "bits/dim", [("validation", ("val_bpd",), "-")]),
    ("validation accuracy", "accuracy", [("validation", ("val_acc", "val_accuracy"), "-")]),
    ("distance between class means", "sigma", [("median", ("mean_dist_median_sigma",), "-"), ("min", ("mean_dist_min_sigma",), "--")]),
)


def _records(history: Any) -> tuple[list[dict[str, float]], int | None]:
    """History, History.to_dict() or a list of epoch records -> (records, best_epoch)."""
    if hasattr(history, "to_dict"):
        history = history.to_dict()
    if isinstance(history, dict):
        return list(history.get("epochs", [])), history.get("best_epoch")
    return list(history), None


def _series(records: list[dict[str, float]], keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, values) of the first of `keys` present in any record; None if none is."""
    key = next((k for k in keys if any(k in r for r in records)), None)
    if key is None:
        return None
    rows = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(records) if key in r]
    return _np([e for e, _ in rows]), _np([v for _, v in rows])


def fig_learning_curves(history: dict | list[dict]) -> Figure:
    """Loss, validation bits/dim, validation accuracy and min/median class-mean distance vs epoch.

    Panels without data are skipped; the best epoch (History.best_epoch) is a dashed vertical line.
    """
    records, best = _records(history)
    panels = [(t, yl, [(lab, s, st) for lab, keys, st in lines if (s := _series(records, keys))])
              for t, yl, lines in _CURVES]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError("history has no epochs with train_loss, val_bpd, val_acc or mean_dist_* keys")
    fig = Figure(figsize=(3.8 * len(panels), 3.2), dpi=100, layout="constrained")
    for ax, (title, ylabel, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, (x, v), style in lines:
            ax.plot(x, v, style, color="C0" if style == "-" else "C1", marker=".", label=label)
        if best is not None:
            ax.axvline(best, color="gray", linestyle="--", linewidth=1, label=f"best epoch {best}")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        if len(lines) > 1 or best is not None:
            ax.legend(fontsize="small")
    return fig


def fig_distance_trajectory(runs: dict[str, dict | list[dict]]) -> Figure:
    """Median (solid) and min (dashed) distance between class means in sigma vs epoch, one colour per run.

    A second panel shows the mean Bhattacharyya coefficient (log y) when records have `bhattacharyya_mean`.
    """
    data = {label: _records(h)[0] for label, h in runs.items()}
    has_bc = any("bhattacharyya_mean" in r for recs in data.values() for r in recs)
    fig = Figure(figsize=(9 if has_bc else 5.5, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2 if has_bc else 1, squeeze=False)[0]
    for color, (label, recs) in zip(class_colors(len(data)), data.items()):
        for key, style in (("mean_dist_median_sigma", "-"), ("mean_dist_min_sigma", "--")):
            if (s := _series(recs, (key,))) is not None:
                axes[0].plot(*s, style, color=color, label=label if style == "-" else None)
        if has_bc and (s := _series(recs, ("bhattacharyya_mean",))) is not None:
            axes[1].plot(*s, "-", color=color, label=label)
    axes[0].set(title="distance between class means", xlabel="epoch", ylabel="sigma")
    styles = [Line2D([], [], color="black", linestyle=ls, label=lab) for ls, lab in (("-", "median"), ("--", "min"))]
    axes[0].legend(handles=[*axes[0].get_legend_handles_labels()[0], *styles], fontsize="small")
    if has_bc:
        axes[1].set(title="mean Bhattacharyya coefficient", xlabel="epoch", ylabel="overlap", yscale="log")
    return fig


# -- latent space ----------------------------------------------------------------------------

def mean_projection(means: np.ndarray) -> np.ndarray:
    """(2, D) orthonormal rows: the top-2 principal directions of the centered class means.

    Signs are fixed (largest entry of each row positive). If the centered means span one
    direction (e.g. K = 2), the second row is the coordinate axis least aligned with it,
    orthogonalised; if they span none, the first two coordinate axes.
    """
    m = _np(means)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"need (K, D) means with D >= 2 to project to 2-D, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("class means are not finite")
    _, s, vt = np.linalg.svd(m - m.mean(0), full_matrices=False)
    rank = int((s > 1e-9 * max(np.abs(m).max(), 1e-300)).sum())
    if rank == 0:
        return np.eye(2, m.shape[1])
    first = vt[0]
    if rank >= 2:
        second = vt[1]
    else:
        axis = np.eye(m.shape[1])[np.argmin(np.abs(first))]
        second = axis - (axis @ first) * first
        second /= np.linalg.norm(second)
    p = np.stack([first, second])
    return p * np.sign(p[np.arange(2), np.abs(p).argmax(1)])[:, None]


def _projected_ellipse(mean: np.ndarray, scale: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """N(mu, L L^T) under z -> P z: centre P mu, major/minor std devs and major-axis angle (degrees).

    `scale`: (D,) std devs (L = diag(s)) or a (D, D) factor L.
    """
    pl = p * scale if scale.ndim == 1 else p @ scale  # (2, D) = P L
    cov = pl @ pl.T  # (2, 2) = P L L^T P^T
    evals, evecs = np.linalg.eigh(cov)  # ascending
    major = evecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0]))
    return p @ mean, math.sqrt(max(evals[1], 0.0)), math.sqrt(max(evals[0], 0.0)), angle


def _class_legend(fig: Figure, class_names: Sequence[str], colors: list, marker: str) -> None:
    handles = [Line2D([], [], color=c, marker=marker, linestyle="none", markersize=7, label=n)
               for c, n in zip(colors, class_names)]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", ncols=max(1, math.ceil(len(handles) / 20)))


def draw_gaussians(ax: Any, panel: dict, projection: np.ndarray, colors: list) -> None:
    """One panel of fig_gaussian_ellipses drawn on `ax` (see there for the panel dict)."""
    p = _np(projection)
    means, scales = _np(panel["means"]), _np(panel["scales"])
    if panel.get("z") is not None:
        zp = _np(panel["z"]) @ p.T  # (N, 2)
        y = _np(panel["y"]) if panel.get("y") is not None else None
        groups = [(zp, "gray")] if y is None else [(zp[y == k], colors[k]) for k in range(len(colors))]
        for pts, color in groups:
            ax.scatter(pts[:, 0], pts[:, 1], s=4, color=color, alpha=0.25, linewidths=0, rasterized=True)
    for k, (mean, scale) in enumerate(zip(means, scales)):
        centre, major, minor, angle = _projected_ellipse(mean, scale, p)
        for r, alpha in ((1, 0.9), (2, 0.45)):
            ax.add_patch(Ellipse(tuple(centre), 2 * r * major, 2 * r * minor, angle=angle, fill=False,
                                 edgecolor=colors[k], linewidth=1.5, alpha=alpha, gid=f"{k}:{r}"))
        ax.plot(*centre, marker="x", color=colors[k], markersize=8, markeredgewidth=2, linestyle="none")
    if panel.get("highlight") is not None:
        point = p @ _np(panel["highlight"])
        ax.plot(*point, marker="*", color="black", markersize=16, markerfacecolor="yellow", linestyle="none",
                zorder=5, gid="highlight")
    ax.set(title=panel.get("title", ""), xlabel="projection 1", ylabel="projection 2")
    ax.set_aspect("equal", adjustable="datalim")


def fig_gaussian_ellipses(panels: list[dict], class_names: list[str],
                          projection: np.ndarray | Sequence[np.ndarray]) -> Figure:
    """Each class Gaussian N(mu_k, Sigma_k) projected by P: 1- and 2-sigma ellipses, mean as x, latents as dots.

    The projection is exact: centre P mu_k, covariance P Sigma_k P^T (2x2), ellipse axes
    2 r sqrt(eigenvalue) for r = 1, 2. One subplot per panel dict {"title", "means" (K, D),
    "scales" (K, D) std devs (Sigma_k = diag(s_k^2)) or (K, D, D) factors L_k (Sigma_k = L_k L_k^T),
    optional "z" (N, D) and "y" (N,), optional "highlight" (D,): one latent drawn as a large star};
    use one P for all panels to compare them, or a list of one P per panel.
    """
    projections = [_np(projection)] * len(panels) if _np(projection).ndim == 2 else [_np(q) for q in projection]
    if len(projections) != len(panels):
        raise ValueError(f"{len(projections)} projections for {len(panels)} panels")
    colors = class_colors(len(class_names))
    fig = Figure(figsize=(4.2 * len(panels) + 1.5, 4.4), dpi=100, layout="constrained")
    for ax, panel, p in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, projections):
        draw_gaussians(ax, panel, p, colors)
    _class_legend(fig, class_names, colors, "x")
    return fig


def fig_embedding(points: np.ndarray, y: np.ndarray, class_names: list[str], centers: np.ndarray | None = None,
                  title: str = "") -> Figure:
    """2-D embedding (PCA / t-SNE) of latents coloured by class; optional class centres as large labelled markers."""
    pts, y = _np(points), _np(y)  # labels may be tensors
    colors = class_colors(len(class_names))
    fig = Figure(figsize=(6.5, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for k, color in enumerate(colors):
        ax.scatter(pts[y == k, 0], pts[y == k, 1], s=5, color=color, alpha=0.5, linewidths=0, rasterized=True)
    for k, c in enumerate([] if centers is None else _np(centers)):
        if np.isfinite(c).all():
            ax.scatter(c[0], c[1], s=160, color=colors[k], edgecolors="black", linewidths=1.5, zorder=3)
            ax.annotate(class_names[k], tuple(c), xytext=(6, 6), textcoords="offset points", fontsize=8, zorder=4,
                        bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    ax.set(title=title, xticks=[], yticks=[])
    _class_legend(fig, class_names, colors, "o")
    return fig


# -- class-by-class matrices -----------------------------------------------------------------

def _heatmap(data: np.ndarray | np.ma.MaskedArray, class_names: Sequence[str], title: str, fmt: str, cmap: str,
             vmin: float | None = None, vmax: float | None = None) -> tuple[Figure, Any]:
    """Annotated (K <= 15) heatmap with a colourbar and class names on both axes."""
    k = len(class_names)
    side = min(max(4.5, 0.45 * k + 2.5), 14)
    fig = Figure(figsize=(side + 1, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), class_names)
    ax.grid(False)
    ax.set_title(title)
    if k <= 15:
        for (i, j), v in np.ndenumerate(np.ma.getdata(data)):
            if not np.ma.getmaskarray(data)[i, j] and np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    return fig, ax


def fig_pairwise(matrix: np.ndarray, class_names: list[str], title: str, fmt: str = ".1f", cmap: str = "viridis",
                 mask_diagonal: bool = True) -> Figure:
    """Heatmap of a (K, K) class-pair matrix (mean distances, Bhattacharyya coefficients), diagonal masked."""
    m = _np(matrix)
    data = np.ma.masked_array(m, mask=np.eye(len(m), dtype=bool)) if mask_diagonal else m
    return _heatmap(data, class_names, title, fmt, cmap)[0]


def fig_confusion(confusion: np.ndarray, class_names: list[str], normalize: bool = True, title: str = "") -> Figure:
    """Confusion matrix, rows = true class, columns = predicted; rows scaled to sum to 1 when `normalize`."""
    c = _np(confusion)
    if normalize:
        totals = c.sum(1, keepdims=True)
        c = np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)  # an absent class keeps a zero row
    fig, ax = _heatmap(c, class_names, title, ".2f" if normalize else ".0f", "Blues",
                       vmin=0.0, vmax=1.0 if normalize else None)
    ax.set(xlabel="predicted class", ylabel="true class")
    return fig


def most_overlapping_pairs(matrix: np.ndarray, class_names: list[str], k: int = 5,
                           largest: bool = True) -> list[tuple[str, str, float]]:
    """The k unordered class pairs i < j with the largest (or smallest) values of (M + M^T) / 2.

    Largest for overlaps (row-normalised confusion, Bhattacharyya coefficients), smallest for distances.
    """
    m = _np(matrix)
    sym = 0.5 * (m + m.T)
    i, j = np.triu_indices(len(m), 1)
    values = sym[i, j]
    order = np.argsort(-values if largest else values, kind="stable")[:k]
    return [(class_names[i[o]], class_names[j[o]], float(values[o])) for o in order]


def fig_image_strip(images: np.ndarray, labels: list[str] | None = None, title: str = "") -> Figure:
    """One row of images (n, H, W) or (n, H, W, 3) in [0, 1], e.g. a latent interpolation between classes; no axes."""
    images = _np(images)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n, h, w = images.shape[:3]
    cell = 1.2
    fig = Figure(figsize=(cell * n, cell * h / w + 0.3 * (labels is not None) + 0.35 * bool(title)), dpi=100,
                 layout="constrained")
    for i, ax in enumerate(fig.subplots(1, n, squeeze=False)[0]):
        ax.imshow(images[i].clip(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        if labels is not None:
            ax.set_title(labels[i], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def fig_ablation(rows: list[dict[str, Any]], chance: float | None = None) -> Figure:
    """Test accuracy and bits/dim per ablation variant (rows of ablation.ablate): bars = mean over seeds, dots = seeds.

    Variants keep the table's order (student first, combined fix last); diverged runs are marked
    with a cross at zero accuracy. `chance` draws the 1/K line.
    """
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    fig = Figure(figsize=(10, 0.45 * len(order) + 1.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    ypos = np.arange(len(order))[::-1]
    for ax, key, label in ((axes[0], "accuracy", "test accuracy"), (axes[1], "bpd_conditional", "bits/dim (test)")):
        for y, name in zip(ypos, order):
            group = [r for r in rows if r["variant"] == name]
            vals = [r[key] for r in group if r.get("status") != "diverged" and r.get(key) is not None]
            if vals:
                ax.barh(y, float(np.mean(vals)), color="tab:green" if name.startswith("combined") else
                        "tab:red" if name == "student" else "tab:blue", alpha=0.6)
                ax.plot(vals, [y] * len(vals), "k.", ms=5)
            if len(vals) < len(group) and key == "accuracy":
                ax.plot([0] * (len(group) - len(vals)), [y] * (len(group) - len(vals)), "kx")
        ax.set_xlabel(label)
    if chance is not None:
        axes[0].axvline(chance, color="gray", ls="--", lw=1, label="chance")
        axes[0].legend(loc="lower right")
    axes[0].set_yticks(ypos, order)
    axes[1].set_xscale("log")
    return fig


# -- the backbones: hybrid frontier and learning per image ----------------------------------------

BACKBONE_STYLE = {"coupling": ("tab:blue", "o", "coupling flow"), "iresnet": ("tab:orange", "s", "i-ResNet")}


def frontier_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (backbone, beta, minutes): mean test accuracy and bits/dim over seeds, with their min and max.

    runs: rows of benchmarks/backbones_fashion.py (keys backbone, beta, minutes, seed, test_acc, test_bpd).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["backbone"], float(r["beta"]), float(r["minutes"])), []).append(r)
    points = []
    for (backbone, beta, minutes), group in sorted(groups.items()):
        acc, bpd = np.array([r["test_acc"] for r in group]), np.array([r["test_bpd"] for r in group])
        points.append({"backbone": backbone, "beta": beta, "minutes": minutes, "seeds": len(group),
                       "test_acc": float(acc.mean()), "acc_min": float(acc.min()), "acc_max": float(acc.max()),
                       "test_bpd": float(bpd.mean()), "bpd_min": float(bpd.min()), "bpd_max": float(bpd.max())})
    return points


def markdown_frontier(runs: list[dict[str, Any]]) -> str:
    """The frontier's points as a Markdown table: mean over seeds, with the range where there are several."""
    def cell(mean: float, lo: float, hi: float, n: int, fmt: str) -> str:
        return f"{mean:{fmt}}" + (f" ({lo:{fmt}}–{hi:{fmt}})" if n > 1 else "")

    rows = []
    for p in frontier_points(runs):
        name = BACKBONE_STYLE.get(p["backbone"], (None, None, p["backbone"]))[2]
        rows.append([name, f"{p['beta']:g}", f"{p['minutes']:g}", p["seeds"],
                     cell(p["test_acc"], p["acc_min"], p["acc_max"], p["seeds"], ".4f"),
                     cell(p["test_bpd"], p["bpd_min"], p["bpd_max"], p["seeds"], ".3f")])
    return markdown_table(["backbone", "β", "minutes", "seeds", "test accuracy", "bits/dim (test)"], rows)


def fig_frontier(runs: list[dict[str, Any]], baselines: Sequence[dict[str, Any]] = (), title: str = "") -> Figure:
    """Test accuracy against test bits/dim over the hybrid weight beta, one line per backbone (and budget).

    Points are means over seeds with min-max bars where there are several; each is labelled with its beta.
    Baselines with a bits/dim (the per-class Gaussian) are points; those without (logistic regression) a
    horizontal line. Lower bits/dim (left) and higher accuracy (up) are better.
    """
    fig = Figure(figsize=(7.5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    points = frontier_points(runs)
    shortest = min((p["minutes"] for p in points), default=0.0)
    for (backbone, minutes) in sorted({(p["backbone"], p["minutes"]) for p in points}):
        line = sorted((p for p in points if (p["backbone"], p["minutes"]) == (backbone, minutes)), key=lambda p: p["beta"])
        color, marker, name = BACKBONE_STYLE.get(backbone, ("tab:gray", "^", backbone))
        x, y = [p["test_bpd"] for p in line], [p["test_acc"] for p in line]
        seeds = max(p["seeds"] for p in line)
        label = f"{name}, {minutes:g} min" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        if minutes == shortest:  # the frontier: a line over beta
            ax.plot(x, y, "-", color=color, marker=marker, label=label)
        else:  # longer budgets: larger hollow markers, no line
            ax.plot(x, y, ls="none", marker=marker, ms=11, mfc="none", mew=2, color=color, label=label)
        for i, p in enumerate(line):
            if p["seeds"] > 1:
                ax.errorbar(p["test_bpd"], p["test_acc"], color=color, lw=1, capsize=2,
                            xerr=[[p["test_bpd"] - p["bpd_min"]], [p["bpd_max"] - p["test_bpd"]]],
                            yerr=[[p["test_acc"] - p["acc_min"]], [p["acc_max"] - p["test_acc"]]])
            ax.annotate(f"β={p['beta']:g}" + (f", {minutes:g} min" if minutes != shortest else ""),
                        (p["test_bpd"], p["test_acc"]), textcoords="offset points",
                        xytext=(6, -12) if i % 2 == 0 else (6, 5), fontsize=8, color=color)
    for b in baselines:
        if b.get("test_bpd") is not None:
            ax.plot(b["test_bpd"], b["test_acc"], "k*", ms=11, label=b["method"])
        else:
            ax.axhline(b["test_acc"], color="k", ls="--", lw=1, label=b["method"])
    ax.set_xlabel("bits/dim (test; lower is better)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "hybrid frontier: loss = NLL/D + β·CE")
    ax.legend(fontsize=8, loc="best")
    return fig


def fig_bpd_per_image(runs: list[dict[str, Any]], title: str = "") -> Figure:
    """Validation bits/dim against images seen (left) and against training seconds (right), one line per run.

    runs: rows with a "curve" (images, seconds, val_bpd per epoch) and backbone / name keys.
    """
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for r in runs:
        color, marker, name = BACKBONE_STYLE.get(r["backbone"], ("tab:gray", "^", r["backbone"]))
        images = np.array([c["images"] for c in r["curve"]])
        seconds = np.cumsum([c["seconds"] for c in r["curve"]])
        bpd = np.array([c["val_bpd"] for c in r["curve"]])
        label = f"{name}, β={r['beta']:g}, seed {r['seed']}"
        axes[0].plot(images, bpd, "-", color=color, marker=marker, ms=3, label=label, alpha=0.8)
        axes[1].plot(seconds / 60, bpd, "-", color=color, marker=marker, ms=3, alpha=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training images seen")
    axes[1].set_xlabel("training minutes (batches only)")
    axes[0].set_ylabel("bits/dim (validation)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "learning per image and per minute")
    return fig


# -- out-of-distribution detection -----------------------------------------------------------

def fig_ood_histograms(bpd_in: Any, bpd_by_set: dict[str, Any], title: str = "bits/dim: in-distribution vs OOD",
                       bins: int = 40) -> Figure:
    """Histograms of (marginal) bits/dim, in-distribution (grey) against each OOD set, one panel per set.

    All panels share one set of bins over the finite values of every set, so panels compare; densities
    (area 1), overlaid with transparency. Non-finite values (a density that underflows) are left out and
    counted in the legend. Bits/dim from eval.ood.flow_scores: -scores[name]["neg_bpd"].

    Args:
        bpd_in: (N,) bits/dim of in-distribution (test) inputs.
        bpd_by_set: {OOD set name: (M,) bits/dim}.
        title: the figure's title.
        bins: the number of shared bins.

    Returns:
        The Figure, one axes per OOD set (at most 3 per row).
    """
    if not bpd_by_set:
        raise ValueError("bpd_by_set must name at least one OOD set")
    sets = {"in-distribution": _np(bpd_in).ravel(), **{k: _np(v).ravel() for k, v in bpd_by_set.items()}}
    finite = np.concatenate([v[np.isfinite(v)] for v in sets.values()])
    if finite.size == 0:
        raise ValueError("no finite bits/dim to draw")
    lo, hi = float(finite.min()), float(finite.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    n = len(bpd_by_set)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()

    def label(name: str, v: np.ndarray) -> str:
        bad = int((~np.isfinite(v)).sum())
        return f"{name} (n = {len(v)}" + (f", {bad} non-finite left out)" if bad else ")")

    for i, (ax, (name, v)) in enumerate(zip(axes, list(sets.items())[1:])):
        v_in = sets["in-distribution"]
        ax.hist(v_in[np.isfinite(v_in)], bins=edges, density=True, color="gray", alpha=0.55,
                label=label("in-distribution", v_in))
        ax.hist(v[np.isfinite(v)], bins=edges, density=True, color=f"C{i % 10}", alpha=0.55, label=label(name, v))
        ax.set(title=name, xlabel="bits/dim", ylabel="density")
        ax.legend(fontsize="small")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def fig_reliability(bins_by_model: dict[str, dict[str, Any]], title: str = "") -> Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one colour per model, counts below.

    Args:
        bins_by_model: {label: eval.metrics.reliability_bins(...)} (its dict, e.g. read back from JSON);
            every model's bins are drawn over the same [0, 1] axis.
        title: the figure's title.

    Returns:
        A Figure of two panels sharing the confidence axis: above, the diagonal (perfect calibration) and
        each model's (mean confidence, accuracy) per non-empty bin, with its ECE in the legend; below, the
        number of examples per bin (log scale), one bar per model side by side.

    Raises:
        ValueError: no models.
    """
    if not bins_by_model:
        raise ValueError("fig_reliability needs at least one model's reliability bins")
    colors = class_colors(len(bins_by_model))
    fig = Figure(figsize=(5.2, 5.6), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    n_models = len(bins_by_model)
    for i, (color, (label, b)) in enumerate(zip(colors, bins_by_model.items())):
        edges = _np(b["edges"])
        pts = [(c, a) for c, a in zip(b["confidence"], b["accuracy"]) if c is not None and a is not None]
        xs, ys = (_np([p[0] for p in pts]), _np([p[1] for p in pts])) if pts else (_np([]), _np([]))
        top.plot(xs, ys, "-o", color=color, markersize=5, linewidth=1.5, label=f"{label} (ECE {b['ece']:.3f})")
        width = np.diff(edges) / n_models
        bottom.bar(edges[:-1] + i * width, _np(b["counts"]), width=width, align="edge", color=color, alpha=0.7)
    top.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence (max posterior probability)", ylabel="examples", yscale="log")
    return fig
