"""Figures as functions of data: fig_* return a matplotlib Figure (no pyplot state, no display)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["sample_images", "fig_sample_grid", "fig_samples_2d"]


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
