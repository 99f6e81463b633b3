"""Figures against independent computations: what is drawn is the data, projected exactly."""

import math
import sys

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from mixflow_core.study import plotting
from mixflow_core.study.plotting import (
    class_colors, fig_confusion, fig_distance_trajectory, fig_embedding, fig_gaussian_ellipses, fig_image_strip,
    fig_learning_curves, fig_pairwise, mean_projection, most_overlapping_pairs, save_figure, set_style,
)

NAMES = ["a", "b", "c"]


def _orthonormal_rows(p: np.ndarray) -> bool:
    return np.allclose(p @ p.T, np.eye(2), atol=1e-12)


def _ellipse_cov(e: Ellipse) -> np.ndarray:
    """The 2x2 matrix whose 1-sigma ellipse is `e`: R diag((w/2)^2, (h/2)^2) R^T."""
    t = math.radians(e.angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return rot @ np.diag([(e.width / 2) ** 2, (e.height / 2) ** 2]) @ rot.T


def _ellipses(fig: Figure, ax_index: int = 0) -> dict[str, Ellipse]:
    return {p.get_gid(): p for p in fig.axes[ax_index].patches if isinstance(p, Ellipse)}


# -- mean_projection -------------------------------------------------------------------------

def test_mean_projection_spans_the_subspace_of_the_means() -> None:
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 2)))  # (D, 2), orthonormal columns
    means = 5.0 + rng.normal(size=(7, 2)) @ basis.T  # (K, D) in an affine 2-D subspace
    p = mean_projection(means)
    assert p.shape == (2, 6) and _orthonormal_rows(p)
    centered = means - means.mean(0)
    np.testing.assert_allclose(centered @ p.T @ p, centered, atol=1e-10)  # P^T P is the identity on the means
    np.testing.assert_allclose(p.T @ p, basis @ basis.T, atol=1e-10)  # same subspace as the basis


def test_mean_projection_orders_directions_by_variance() -> None:
    means = np.array([[-3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    np.testing.assert_allclose(mean_projection(means), np.eye(2, 3), atol=1e-12)  # signs made positive too


def test_mean_projection_degenerate_means() -> None:
    np.testing.assert_array_equal(mean_projection(np.full((4, 5), 2.5)), np.eye(2, 5))
    jitter = 1e-13 * np.random.default_rng(4).normal(size=(4, 5))  # rounding noise, not directions
    np.testing.assert_array_equal(mean_projection(2.5 + jitter), np.eye(2, 5))
    d = np.array([1.0, 2.0, 0.0, -2.0]) / 3.0
    p = mean_projection(np.stack([-d, d]))  # K = 2: the means span one direction
    assert _orthonormal_rows(p)
    np.testing.assert_allclose(abs(p[0] @ d), 1.0, atol=1e-12)


@pytest.mark.parametrize("means", [np.zeros((3, 1)), np.zeros(4), np.array([[0.0, np.nan], [1.0, 2.0]])])
def test_mean_projection_rejects(means) -> None:
    with pytest.raises(ValueError):
        mean_projection(means)


# -- fig_gaussian_ellipses -------------------------------------------------------------------

def test_ellipses_identity_projection_are_the_axis_aligned_gaussians() -> None:
    means = np.array([[1.0, -2.0], [0.5, 3.0], [-4.0, 0.0]])
    scales = np.array([[2.0, 0.5], [1.5, 0.25], [0.7, 0.3]])  # sx > sy: the major axis is x
    fig = fig_gaussian_ellipses([{"title": "t", "means": means, "scales": scales}], NAMES, np.eye(2))
    ellipses = _ellipses(fig)
    assert len(ellipses) == 2 * len(NAMES)
    for k in range(3):
        for r in (1, 2):
            e = ellipses[f"{k}:{r}"]
            np.testing.assert_allclose(e.center, means[k], atol=1e-12)
            np.testing.assert_allclose([e.width, e.height], 2 * r * scales[k], rtol=1e-12)
            assert math.isclose(math.sin(math.radians(e.angle)), 0.0, abs_tol=1e-12)
            assert e.get_edgecolor()[:3] == class_colors(3)[k][:3]
    assert fig.axes[0].get_title() == "t"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == NAMES


def test_ellipses_match_eigendecomposition_of_projected_covariance() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    p = q[:2]  # (2, D) orthonormal rows, not axis-aligned
    means, scales = rng.normal(size=(3, 4)), np.exp(rng.normal(size=(3, 4)))
    fig = fig_gaussian_ellipses([{"title": "", "means": means, "scales": scales}] * 2, NAMES, p)
    assert len(fig.axes) == 2
    for k in range(3):
        cov = p @ np.diag(scales[k] ** 2) @ p.T
        evals, evecs = np.linalg.eigh(cov)
        for r in (1, 2):
            e = _ellipses(fig, 1)[f"{k}:{r}"]
            np.testing.assert_allclose(e.center, p @ means[k], atol=1e-12)
            np.testing.assert_allclose([e.width, e.height], 2 * r * np.sqrt(evals[::-1]), rtol=1e-10)
            t = math.radians(e.angle)
            assert math.isclose(abs(math.cos(t) * evecs[0, 1] + math.sin(t) * evecs[1, 1]), 1.0, rel_tol=1e-10)
            np.testing.assert_allclose(_ellipse_cov(e), r**2 * cov, atol=1e-10)


def test_ellipse_latents_are_projected_points() -> None:
    rng = np.random.default_rng(2)
    p = mean_projection(rng.normal(size=(3, 5)))
    z, y = rng.normal(size=(30, 5)), np.arange(30) % 3
    panel = {"title": "", "means": np.zeros((3, 5)), "scales": np.ones((3, 5)), "z": z, "y": y}
    ax = fig_gaussian_ellipses([panel], NAMES, p).axes[0]
    for k, coll in enumerate(ax.collections):
        np.testing.assert_allclose(coll.get_offsets(), z[y == k] @ p.T, atol=1e-12)


# -- embedding, heatmaps, strips -------------------------------------------------------------

def test_embedding_scatter_and_centres() -> None:
    rng = np.random.default_rng(3)
    pts, y = rng.normal(size=(20, 2)), np.arange(20) % 3
    centers = np.array([[0.0, 1.0], [np.nan, np.nan], [2.0, 2.0]])  # class b absent: no centre drawn
    ax = fig_embedding(pts, y, NAMES, centers, title="pca").axes[0]
    for k in range(3):
        np.testing.assert_allclose(ax.collections[k].get_offsets(), pts[y == k])
    np.testing.assert_allclose(np.concatenate([c.get_offsets() for c in ax.collections[3:]]), centers[[0, 2]])
    assert [t.get_text() for t in ax.texts] == ["a", "c"] and ax.get_title() == "pca"


def test_pairwise_shows_the_matrix_with_masked_diagonal() -> None:
    m = np.arange(9.0).reshape(3, 3)
    ax = fig_pairwise(m, NAMES, "distances").axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_array_equal(np.ma.getdata(shown), m)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.eye(3, dtype=bool))
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.1f}" for v in (1, 2, 3, 5, 6, 7))
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    unmasked = fig_pairwise(m, NAMES, "", fmt=".0f", mask_diagonal=False).axes[0]
    assert not np.ma.getmaskarray(unmasked.images[0].get_array()).any() and len(unmasked.texts) == 9
    assert len(fig_pairwise(np.ones((16, 16)), [str(i) for i in range(16)], "").axes[0].texts) == 0


def test_confusion_rows_normalised() -> None:
    c = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])  # class c never occurs: a zero row, not NaN
    ax = fig_confusion(c, NAMES, title="val").axes[0]
    shown = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(shown, [[0.8, 0.2, 0.0], [0.25, 0.25, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(shown[:2].sum(1), 1.0)
    assert ax.get_ylabel() == "true class" and ax.get_xlabel() == "predicted class"
    assert "0.80" in [t.get_text() for t in ax.texts]
    raw = fig_confusion(c, NAMES, normalize=False).axes[0]
    np.testing.assert_array_equal(np.asarray(raw.images[0].get_array()), c)


def test_image_strip() -> None:
    images = np.linspace(0, 1, 4 * 5 * 6).reshape(4, 5, 6)
    fig = fig_image_strip(images, ["0", "1/3", "2/3", "1"], title="a to b")
    assert len(fig.axes) == 4 and not any(ax.axison for ax in fig.axes)
    for ax, image in zip(fig.axes, images):
        np.testing.assert_allclose(ax.images[0].get_array(), image)
    assert [ax.get_title() for ax in fig.axes] == ["0", "1/3", "2/3", "1"]
    assert fig_image_strip(np.zeros((2, 4, 4, 3))).axes[0].images[0].get_array().shape == (4, 4, 3)
    with pytest.raises(ValueError):
        fig_image_strip(images, ["just one"])


def test_most_overlapping_pairs_uses_symmetric_average() -> None:
    m = np.array([
        [9.0, 0.1, 0.5, 0.0],
        [0.3, 9.0, 0.0, 0.2],
        [0.1, 0.0, 9.0, 0.9],
        [0.0, 0.0, 0.1, 9.0],
    ])  # pairs: ab 0.2, ac 0.3, ad 0.0, bc 0.0, bd 0.1, cd 0.5; the diagonal is never a pair
    names = ["a", "b", "c", "d"]
    top = most_overlapping_pairs(m, names, k=3)
    assert [(i, j) for i, j, _ in top] == [("c", "d"), ("a", "c"), ("a", "b")]
    np.testing.assert_allclose([v for *_, v in top], [0.5, 0.3, 0.2])
    low = most_overlapping_pairs(m, names, k=2, largest=False)
    assert [(i, j) for i, j, _ in low] == [("a", "d"), ("b", "c")]
    assert len(most_overlapping_pairs(m, names, k=100)) == 6


# -- training curves -------------------------------------------------------------------------

def _history(n: int = 6, drop: tuple[str, ...] = ()) -> dict:
    epochs = [{"epoch": e, "train_loss": 4.0 / e, "val_loss": 4.5 / e, "val_bpd": 2.0 / e, "val_acc": 1 - 0.5 / e,
               "mean_dist_min_sigma": 0.5 * e, "mean_dist_median_sigma": 1.0 * e, "inverse_error": 1e-6,
               "bhattacharyya_mean": math.exp(-e)} for e in range(1, n + 1)]
    return {"epochs": [{k: v for k, v in r.items() if k not in drop} for r in epochs], "best_epoch": 4}


def test_learning_curves_panels_and_best_epoch() -> None:
    h = _history()
    fig = fig_learning_curves(h)
    assert len(fig.axes) == 4
    loss = fig.axes[0]
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [r["train_loss"] for r in h["epochs"]])
    np.testing.assert_allclose(loss.lines[0].get_xdata(), range(1, 7))
    for ax in fig.axes:
        best = [ln for ln in ax.lines if ln.get_label().startswith("best epoch")]
        assert len(best) == 1 and list(best[0].get_xdata()) == [4, 4] and best[0].get_linestyle() == "--"
    dist = fig.axes[3]
    np.testing.assert_allclose(dist.lines[1].get_ydata(), [r["mean_dist_min_sigma"] for r in h["epochs"]])


def test_learning_curves_skip_missing_keys() -> None:
    h = _history(drop=("val_bpd", "mean_dist_min_sigma", "mean_dist_median_sigma"))
    fig = fig_learning_curves(h["epochs"])  # a plain list: no best epoch
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "validation accuracy"]
    assert not any(ln.get_label().startswith("best") for ax in fig.axes for ln in ax.lines)
    renamed = [{("val_accuracy" if k == "val_acc" else k): v for k, v in r.items()} for r in h["epochs"]]
    assert len(fig_learning_curves(renamed).axes) == 2
    with pytest.raises(ValueError):
        fig_learning_curves({"epochs": [], "best_epoch": None})


def test_distance_trajectory() -> None:
    fig = fig_distance_trajectory({"run 1": _history(5), "run 2": _history(3)["epochs"]})
    assert len(fig.axes) == 2 and fig.axes[1].get_yscale() == "log"
    lines = fig.axes[0].lines
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-", "--"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    np.testing.assert_allclose(lines[2].get_ydata(), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), np.exp(-np.arange(1, 6)))
    no_bc = fig_distance_trajectory({"x": _history(3, drop=("bhattacharyya_mean",))})
    assert len(no_bc.axes) == 1


# -- style and files -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 10, 11, 20, 45, 100])
def test_class_colors_are_distinct(k: int) -> None:
    colors = class_colors(k)
    assert len(colors) == k and len(set(colors)) == k and all(len(c) == 4 for c in colors)


@pytest.mark.parametrize("with_seaborn", [True, False])
def test_set_style_idempotent(monkeypatch, with_seaborn: bool) -> None:
    with mpl.rc_context():
        if not with_seaborn:
            monkeypatch.setitem(sys.modules, "seaborn", None)  # import seaborn -> ImportError
        set_style()
        first = dict(mpl.rcParams)
        set_style()
        assert dict(mpl.rcParams) == first
        assert mpl.rcParams["figure.dpi"] == 100 and mpl.rcParams["savefig.bbox"] == "tight"


def test_save_figure_writes_png(tmp_path) -> None:
    fig = fig_confusion(np.eye(3), NAMES)
    path = save_figure(fig, tmp_path / "new" / "nested" / "confusion.png", dpi=50)
    assert path == tmp_path / "new" / "nested" / "confusion.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_fig_ablation_bars_are_seed_means_and_diverged_runs_are_marked():
    from mixflow_core.study.plotting import fig_ablation

    rows = [
        {"variant": "student", "seed": 0, "status": "completed", "accuracy": 0.1, "bpd_conditional": 9.0},
        {"variant": "student", "seed": 1, "status": "diverged"},
        {"variant": "fix", "seed": 0, "status": "completed", "accuracy": 0.9, "bpd_conditional": 2.0},
        {"variant": "fix", "seed": 1, "status": "completed", "accuracy": 0.8, "bpd_conditional": 3.0},
    ]
    fig = fig_ablation(rows, chance=0.5)
    acc_ax, bpd_ax = fig.axes[:2]
    widths = sorted(p.get_width() for p in acc_ax.patches)
    assert widths == pytest.approx([0.1, 0.85])
    assert sorted(p.get_width() for p in bpd_ax.patches) == pytest.approx([2.5, 9.0])
    ticks = {float(pos): label.get_text() for pos, label in zip(acc_ax.get_yticks(), acc_ax.get_yticklabels())}
    assert ticks == {1.0: "student", 0.0: "fix"}  # table order, top to bottom
    crosses = [ln for ln in acc_ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [0]


def _frontier_rows() -> list[dict]:
    rows = []
    for backbone, shift in (("coupling", 0.0), ("iresnet", 1.0)):
        for beta, acc, bpd in ((0.0, 0.75, 3.6), (0.1, 0.85, 3.7), (1.0, 0.88, 4.1)):
            for seed, noise in ((0, -0.01), (1, 0.01)):
                rows.append({"backbone": backbone, "beta": beta, "minutes": 5.0, "seed": seed,
                             "test_acc": acc - 0.1 * shift + noise, "test_bpd": bpd + shift + noise,
                             "curve": [{"images": 64 * (i + 1), "seconds": 1.0, "val_bpd": bpd + 1 / (i + 1)}
                                       for i in range(3)]})
    return rows


def test_frontier_points_are_seed_means_with_their_range() -> None:
    points = plotting.frontier_points(_frontier_rows())
    assert len(points) == 6 and all(p["seeds"] == 2 for p in points)
    p = next(p for p in points if (p["backbone"], p["beta"]) == ("iresnet", 0.1))
    assert p["test_acc"] == pytest.approx(0.75) and (p["acc_min"], p["acc_max"]) == pytest.approx((0.74, 0.76))
    assert p["test_bpd"] == pytest.approx(4.7) and (p["bpd_min"], p["bpd_max"]) == pytest.approx((4.69, 4.71))


def test_frontier_figure_draws_one_line_per_backbone_and_the_baselines() -> None:
    baselines = [{"method": "per-class Gaussian", "test_acc": 0.72, "test_bpd": 4.97},
                 {"method": "logistic regression", "test_acc": 0.846, "test_bpd": None}]
    fig = plotting.fig_frontier(_frontier_rows(), baselines)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "coupling flow, 5 min (mean of 2 seeds)" in labels and "i-ResNet, 5 min (mean of 2 seeds)" in labels
    coupling = next(line for line in ax.get_lines() if line.get_label() == "coupling flow, 5 min (mean of 2 seeds)")
    assert np.allclose(coupling.get_xdata(), [3.6, 3.7, 4.1]) and np.allclose(coupling.get_ydata(), [0.75, 0.85, 0.88])
    gaussian = next(line for line in ax.get_lines() if line.get_label() == "per-class Gaussian")
    assert (gaussian.get_xdata()[0], gaussian.get_ydata()[0]) == (4.97, 0.72)
    assert any(line.get_label() == "logistic regression" and line.get_ydata()[0] == 0.846 for line in ax.get_lines())
    assert sum(t.get_text() == "β=0.1" for t in ax.texts) == 2


def test_bpd_per_image_plots_each_curve_against_images_and_minutes() -> None:
    rows = _frontier_rows()[:2]
    fig = plotting.fig_bpd_per_image(rows)
    left, right = fig.axes
    assert np.allclose(left.get_lines()[0].get_xdata(), [64, 128, 192])
    assert np.allclose(right.get_lines()[0].get_xdata(), np.array([1, 2, 3]) / 60)
    assert np.allclose(left.get_lines()[0].get_ydata(), [3.6 + 1, 3.6 + 0.5, 3.6 + 1 / 3])


def test_markdown_frontier_lists_each_point_with_its_seed_range() -> None:
    table = plotting.markdown_frontier(_frontier_rows())
    assert table.count("\n") == 2 + 6 - 1
    assert "| i-ResNet | 0.1 | 5 | 2 | 0.7500 (0.7400–0.7600) | 4.700 (4.690–4.710) |" in table
