"""The overlap explorer: the class Gaussians over training, and one test image classified, interactively.

- An epoch slider over the saved snapshots redraws each configuration's class-Gaussian ellipses
  (±1σ, ±2σ, exact projections) with its test latents, the configurations side by side: how the
  student's Gaussians collapse while its latents run away, against the fixed configuration.
- A "classify one image" view: a test image (by index, or the most confidently misclassified, or
  the one of lowest p(x)), its posterior p(y|x) as bars, its latent as a star in the ellipse panel,
  and its distances to the nearest class means in σ units (Mahalanobis, in that class's covariance).

The design is the sampler's (widgets.py): `explorer_frames` computes everything once; `render_epoch`
and `render_image` are pure functions of (frames, arguments) returning PNG bytes, tested in plain
pytest; `OverlapExplorer` is a thin ipywidgets shell whose observe callbacks call them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from ..eval.diagnostics import latents
from ..eval.metrics import log_likelihood_table
from ..flows.model import MixtureFlow
from ..training.runs import seeded_rng
from .analysis import Run, gaussian_panel, snapshot_models
from .plotting import class_colors, draw_gaussians, fig_gaussian_ellipses, mean_projection, sample_images
from .widgets import png_bytes

__all__ = ["PICKS", "Frames", "explorer_frames", "pick_image", "fig_epoch", "fig_image", "render_epoch",
           "render_image", "OverlapExplorer"]

PICKS = ("index", "most confused", "most OOD")


@dataclass
class Frames:
    """What the explorer draws, computed once (explorer_frames).

    panels[config]: gaussian_panel dicts (means, scales, test latents z, labels y), one per snapshot in
    epoch order, the best weights last; labels[config]: "epoch 3", ..., "best (epoch 7)";
    projections[config]: the (2, D) plane of that configuration's final class means, the same for all its
    frames; models[config]: the best weights; x, y: the test images the panels show; table[config]: their
    (N, K) log p(x|k); log_py[config]: log p(k).
    """

    panels: dict[str, list[dict[str, Any]]]
    labels: dict[str, list[str]]
    projections: dict[str, np.ndarray]
    models: dict[str, MixtureFlow]
    class_names: list[str]
    data_shape: tuple[int, ...]
    levels: int | None
    x: torch.Tensor
    y: torch.Tensor
    table: dict[str, torch.Tensor]
    log_py: dict[str, torch.Tensor]

    @property
    def n_frames(self) -> int:
        """Slider positions: the longest configuration's frame count (shorter ones stay at their last frame)."""
        return max(len(p) for p in self.panels.values())

    def posterior(self, config: str, i: int) -> torch.Tensor:
        """p(k | x_i), (K,), under the configuration's best weights."""
        joint = self.table[config][i] + self.log_py[config]
        return torch.softmax(joint, 0)


def explorer_frames(runs: Mapping[str, Run], points: Dataset, batch_size: int = 500, seed: int = 0) -> Frames:
    """Every snapshot's panel for each run, on the test examples `points` (e.g. analysis.test_subset).

    Args:
        runs: {configuration name: Run} (analysis.load_runs), e.g. {"student": ..., "fixed": ...}.
        points: the test examples drawn (all of them are latents in every frame).
        batch_size: of the latent and density computations.
        seed: of the densities' dequantisation noise and probes (the global RNG is restored after).
    """
    if not runs:
        raise ValueError("need at least one run")
    first = next(iter(runs.values()))
    x = torch.stack([points[i][0] for i in range(len(points))])
    y = torch.stack([torch.as_tensor(points[i][1]) for i in range(len(points))])
    panels, labels, projections, models, tables, log_pys = {}, {}, {}, {}, {}, {}
    for config, run in runs.items():
        snaps = snapshot_models(run)
        panels[config] = [gaussian_panel(model, points, f"{config}: {label}", batch_size) for label, model in snaps]
        labels[config] = [label for label, _ in snaps]
        projections[config] = mean_projection(panels[config][-1]["means"])
        models[config] = run.model
        device = run.model.prior.means.device
        with seeded_rng(seed, device):
            tables[config], _ = log_likelihood_table(run.model, points, batch_size, device)
        log_pys[config] = run.model.prior.log_class_probs.detach().cpu().to(tables[config].dtype)
    return Frames(panels, labels, projections, models, first.class_names, tuple(first.info["data_shape"]),
                  first.info["levels"], x, y, tables, log_pys)


def _check_config(frames: Frames, config: str) -> None:
    if config not in frames.panels:
        raise ValueError(f"unknown configuration {config!r}; the explorer has {sorted(frames.panels)}")


def pick_image(frames: Frames, config: str, how: str = "index", index: int = 0) -> int:
    """Which test image to classify: `index` itself, "most confused" (the highest posterior mass on one wrong class
    under the configuration's best weights), or "most OOD" (the lowest marginal log p(x))."""
    _check_config(frames, config)
    n = len(frames.y)
    if how == "index":
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < n:
            raise ValueError(f"index must be an int in [0, {n}), got {index!r}")
        return int(index)
    joint = frames.table[config] + frames.log_py[config]  # (N, K) log p(x, k)
    if how == "most confused":
        post = torch.softmax(joint, 1).clone()
        post[torch.arange(n), frames.y] = -1.0  # only wrong classes
        return int(post.max(1).values.argmax())
    if how == "most OOD":
        return int(torch.logsumexp(joint, 1).argmin())
    raise ValueError(f"unknown pick {how!r}; use one of {', '.join(PICKS)}")


def fig_epoch(frames: Frames, index: int) -> Figure:
    """Frame `index` of every configuration side by side (a configuration with fewer frames shows its last)."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < frames.n_frames:
        raise ValueError(f"frame index must be an int in [0, {frames.n_frames}), got {index!r}")
    configs = list(frames.panels)
    panels = [frames.panels[c][min(index, len(frames.panels[c]) - 1)] for c in configs]
    return fig_gaussian_ellipses(panels, frames.class_names, [frames.projections[c] for c in configs])


def _distances_sigma(model: MixtureFlow, z: torch.Tensor) -> torch.Tensor:
    """(K,) Mahalanobis distance of one latent to every class mean, in that class's covariance (σ units)."""
    with torch.no_grad():
        d2 = model.prior.mahalanobis_sq(z[None].to(model.prior.means.device, model.prior.means.dtype))[0]
    return d2.clamp(min=0).sqrt().cpu().double()


def fig_image(frames: Frames, config: str, i: int, nearest: int = 3) -> Figure:
    """Test image i under a configuration's best weights: the image, p(y|x) bars, its latent in the ellipse panel."""
    _check_config(frames, config)
    i = pick_image(frames, config, "index", i)
    model, names = frames.models[config], frames.class_names
    post = frames.posterior(config, i).double().numpy()
    z, _ = latents(model, [(frames.x[i], frames.y[i])], 1, model.prior.means.device)
    dist = _distances_sigma(model, z[0]).numpy()
    order = np.argsort(dist)[:nearest]
    true, pred = int(frames.y[i]), int(post.argmax())
    fig = Figure(figsize=(13, 4.2), dpi=100, layout="constrained")
    ax_img, ax_bar, ax_lat = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.4, 1.6]})
    if frames.levels is not None and len(frames.data_shape) in (1, 3):
        img = sample_images(frames.x[i:i + 1], frames.data_shape, frames.levels)[0]
        ax_img.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    else:
        ax_img.text(0.5, 0.5, "x = " + np.array2string(frames.x[i].numpy(), precision=3), ha="center", va="center")
    ax_img.set(xticks=[], yticks=[], title=f"test image {i}: {names[true]}")
    colors = ["tab:green" if k == true else ("tab:red" if k == pred else "tab:gray") for k in range(len(names))]
    ax_bar.barh(range(len(names)), post, color=colors)
    ax_bar.set(yticks=range(len(names)), yticklabels=names, xlim=(0, 1), xlabel="p(y | x)",
               title=f"{config}: predicted {names[pred]} ({post[pred]:.2f})")
    ax_bar.invert_yaxis()
    panel = dict(frames.panels[config][-1], highlight=z[0].double().numpy(), title="")
    draw_gaussians(ax_lat, panel, frames.projections[config], class_colors(len(names)))
    # a latent of class k lies about sqrt(D) sigma from mean k in D dimensions: say so, the distances read against it
    ax_lat.set_title("nearest means: " + ", ".join(f"{names[k]} {dist[k]:.1f}σ" for k in order)
                     + f"\n(a typical latent of a class: √D = {math.sqrt(z.shape[1]):.0f}σ from its mean)", fontsize="medium")
    return fig


def render_epoch(frames: Frames, index: int) -> bytes:
    """PNG bytes of fig_epoch."""
    return png_bytes(fig_epoch(frames, index))


def render_image(frames: Frames, config: str, i: int) -> bytes:
    """PNG bytes of fig_image."""
    return png_bytes(fig_image(frames, config, i))


class OverlapExplorer:
    """Epoch slider over the snapshots, and the classify-one-image view with its controls.

    Every control's `observe(..., names="value")` re-renders its image (render_epoch or
    render_image); `renders` counts them (two on construction, so no image is ever empty).
    Display it by leaving it as a cell's last expression.
    """

    def __init__(self, frames: Frames, config: str | None = None, pick: str = "most confused", index: int = 0) -> None:
        import ipywidgets as widgets

        self.frames = frames
        config = config if config is not None else list(frames.panels)[-1]
        _check_config(frames, config)
        self.renders, self._picking = 0, False
        style = {"description_width": "initial"}
        self.epoch_slider = widgets.IntSlider(value=frames.n_frames - 1, min=0, max=frames.n_frames - 1,
                                              description="snapshot", continuous_update=False, style=style)
        self.config_dropdown = widgets.Dropdown(options=list(frames.panels), value=config, description="weights",
                                                style=style)
        self.pick_dropdown = widgets.Dropdown(options=list(PICKS), value=pick, description="image", style=style)
        self.index_box = widgets.BoundedIntText(value=pick_image(frames, config, "index", index), min=0,
                                                max=len(frames.y) - 1, description="index", style=style)
        self.epoch_image, self.image_view = widgets.Image(format="png"), widgets.Image(format="png")
        self.epoch_status, self.image_status = widgets.Label(), widgets.Label()
        self.widget = widgets.VBox([
            self.epoch_slider, self.epoch_image, self.epoch_status,
            widgets.HBox([self.config_dropdown, self.pick_dropdown, self.index_box]), self.image_view,
            self.image_status,
        ])
        self.epoch_slider.observe(self.update_epoch, names="value")
        for control in (self.config_dropdown, self.pick_dropdown):
            control.observe(self.update_image, names="value")
        self.index_box.observe(self._index_changed, names="value")
        self.update_epoch()
        self.update_image()

    @property
    def epoch_png(self) -> bytes:
        return bytes(self.epoch_image.value)

    @property
    def image_png(self) -> bytes:
        return bytes(self.image_view.value)

    def update_epoch(self, change: Any = None) -> None:
        """Re-render the ellipse panels at the slider's snapshot."""
        i = int(self.epoch_slider.value)
        self.epoch_image.value = render_epoch(self.frames, i)
        self.epoch_status.value = " | ".join(f"{c}: {labels[min(i, len(labels) - 1)]}"
                                             for c, labels in self.frames.labels.items())
        self.renders += 1

    def _index_changed(self, change: Any = None) -> None:
        if not self._picking:  # a typed index: classify that image
            self.pick_dropdown.unobserve(self.update_image, names="value")
            self.pick_dropdown.value = "index"
            self.pick_dropdown.observe(self.update_image, names="value")
            self.update_image()

    def update_image(self, change: Any = None) -> None:
        """Re-render the classify view for the chosen weights and image."""
        config, how = self.config_dropdown.value, self.pick_dropdown.value
        i = pick_image(self.frames, config, how, int(self.index_box.value))
        self._picking = True
        try:
            self.index_box.value = i
        finally:
            self._picking = False
        self.image_view.value = render_image(self.frames, config, i)
        post = self.frames.posterior(config, i)
        names = self.frames.class_names
        self.image_status.value = (f"{config} · image {i} ({how}) · true {names[int(self.frames.y[i])]} · "
                                   f"predicted {names[int(post.argmax())]} ({float(post.max()):.2f})")
        self.renders += 1

    def save_static(self, figs: Any, prefix: str = "02_explorer") -> dict[str, str]:
        """The explorer's views as PNGs through a report.FigureLog (`figs.save(fig, name)`): the first and last
        snapshot, and per configuration the most confused and the most OOD test image. Returns {name: path}."""
        out = {}
        for i, tag in ((0, "first"), (self.frames.n_frames - 1, "last")):
            out[f"{prefix}_epochs_{tag}.png"] = str(figs.save(fig_epoch(self.frames, i), f"{prefix}_epochs_{tag}.png"))
        for config in self.frames.panels:
            for how in PICKS[1:]:
                name = f"{prefix}_{config}_{how.replace(' ', '_')}.png"
                out[name] = str(figs.save(fig_image(self.frames, config, pick_image(self.frames, config, how)), name))
        return out

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
