"""Interactive sampling: z ~ N(mu_y, T^2 sigma_y^2), x = f^{-1}(z), drawn as PNG bytes.

`render_png` and `interpolation` are pure functions of (model, arguments), so they are tested
in plain pytest; `SamplerWidget` is a thin ipywidgets shell whose `observe` callbacks call
`render_png` and put the bytes into a `widgets.Image`. ipywidgets is imported only when a
widget is built (it is an optional, notebook-only dependency).
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..flows.model import MixtureFlow
from .plotting import fig_sample_grid, fig_samples_2d

__all__ = [
    "fig_class_samples", "fig_interpolation", "png_bytes", "render_png", "interpolation", "SamplerWidget",
]


# -- validation --------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_class(model: MixtureFlow, cls: Any, what: str = "class") -> int:
    if not _is_int(cls):
        raise ValueError(f"{what} must be an int class index, got {cls!r}")
    if not 0 <= cls < model.num_classes:
        raise ValueError(f"{what} must lie in 0..{model.num_classes - 1}, got {cls}")
    return int(cls)


def _check_drawable(model: MixtureFlow, data_shape: Sequence[int], levels: int | None, class_names: Sequence[str]):
    data_shape = tuple(int(s) for s in data_shape)
    if data_shape != model.data_shape:
        raise ValueError(f"data_shape {data_shape} differs from the model's {model.data_shape}")
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
    if levels is None and data_shape != (2,):
        raise ValueError(f"continuous samples can only be drawn in 2-D, not of shape {data_shape}")
    if levels is not None and levels < 2:
        raise ValueError(f"levels must be >= 2 (or None for continuous data), got {levels}")
    return data_shape


def _check_sampling(n: Any, temperature: Any, seed: Any) -> None:
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


# -- figures -----------------------------------------------------------------------------------
def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, rendered on an Agg canvas (no pyplot, no display)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # The figure's own size and dpi whatever the rcParams (set_style's tight bbox would pad the sample grid);
    # no "Software" metadata, so the bytes depend on the pixels only, not on the matplotlib version.
    with mpl.rc_context({"savefig.bbox": "standard"}):
        fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def fig_class_samples(
    model: MixtureFlow,
    classes: Sequence[int],
    n: int,
    temperature: float,
    seed: int,
    data_shape: Sequence[int],
    levels: int | None,
    class_names: Sequence[str],
) -> Figure:
    """n samples x ~ f^{-1}(N(mu_c, T^2 sigma_c^2)) of each class c, one row per class (a scatter plot in 2-D).

    One torch.Generator seeded with `seed` on the model's device draws the rows in order,
    as `mixflow sample` does.
    """
    shape = _check_drawable(model, data_shape, levels, class_names)
    classes = [_check_class(model, c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one class")
    _check_sampling(n, temperature, seed)
    gen = torch.Generator(device=model.prior.means.device).manual_seed(int(seed))
    rows = [model.sample(c, n=int(n), temperature=float(temperature), generator=gen).cpu() for c in classes]
    names = [str(class_names[c]) for c in classes]
    if levels is None:
        return fig_samples_2d(rows, names, float(temperature))
    return fig_sample_grid(rows, shape, levels, names)


def render_png(
    model: MixtureFlow,
    cls: int,
    temperature: float,
    n: int,
    seed: int,
    data_shape: Sequence[int],
    levels: int | None,
    class_names: Sequence[str],
) -> bytes:
    """PNG of n samples of class `cls` at temperature T (one row; a scatter plot for 2-D continuous data).

    Pure: the same arguments and weights give the same bytes. T = 0 draws the decoded class
    mean f^{-1}(mu_cls) n times.
    """
    return png_bytes(fig_class_samples(model, [cls], n, temperature, seed, data_shape, levels, class_names))


@torch.no_grad()
def interpolation(model: MixtureFlow, a: int, b: int, steps: int = 10) -> Tensor:
    """x_t = f^{-1}((1 - t) mu_a + t mu_b) for t in linspace(0, 1, steps): (steps, *data_shape)."""
    a, b = _check_class(model, a, "a"), _check_class(model, b, "b")
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (the path's two ends included), got {steps!r}")
    means = model.prior.means  # (K, D)
    t = torch.linspace(0.0, 1.0, steps, dtype=means.dtype, device=means.device)[:, None]  # (steps, 1)
    z = (1.0 - t) * means[a] + t * means[b]  # (steps, D)
    return model.decode(z).reshape(steps, *model.data_shape)


def fig_interpolation(
    model: MixtureFlow,
    a: int,
    b: int,
    steps: int,
    data_shape: Sequence[int],
    levels: int | None,
    class_names: Sequence[str],
) -> Figure:
    """The latent path from mu_a to mu_b, decoded: a strip of `steps` images (a path in the plane for 2-D)."""
    shape = _check_drawable(model, data_shape, levels, class_names)
    frames = interpolation(model, a, b, steps).cpu()
    label = f"{class_names[a]} \u2192 {class_names[b]}"
    if levels is not None:
        return fig_sample_grid([frames], shape, levels, [label])
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    xy = frames.double().numpy()
    ax.plot(xy[:, 0], xy[:, 1], "-o", ms=4, color="0.3")
    for i, end in ((0, a), (-1, b)):
        ax.scatter(xy[i, 0], xy[i, 1], s=60, zorder=3, label=f"f\u207b\u00b9(\u03bc) of {class_names[end]}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"decoded latent path {label}, {steps} steps")
    ax.legend()
    return fig


# -- the widget --------------------------------------------------------------------------------
class SamplerWidget:
    """Class dropdown, temperature / sample-count / seed controls and the PNG they produce.

    Every control's `observe(update, names="value")` re-renders `image` with render_png and
    rewrites `status`; `renders` counts the renders (one on construction, so the image is
    never empty). Display it by leaving it as a cell's last expression.
    """

    def __init__(
        self,
        model: MixtureFlow,
        class_names: Sequence[str],
        data_shape: Sequence[int],
        levels: int | None,
        n: int = 8,
        temperature: float = 0.7,
        seed: int = 0,
        max_n: int = 32,
        class_index: int = 0,
    ) -> None:
        import ipywidgets as widgets

        self.model, self.class_names, self.levels = model, [str(c) for c in class_names], levels
        self.data_shape = _check_drawable(model, data_shape, levels, self.class_names)
        _check_class(model, class_index)
        _check_sampling(n, temperature, seed)
        if not _is_int(max_n) or max_n < n:
            raise ValueError(f"max_n must be an int >= n = {n}, got {max_n!r}")
        self.renders = 0
        style = {"description_width": "initial"}  # show "temperature" in full
        self.class_dropdown = widgets.Dropdown(
            options=[(name, i) for i, name in enumerate(self.class_names)], value=class_index, description="class",
            style=style,
        )
        self.temperature_slider = widgets.FloatSlider(
            value=temperature, min=0.0, max=max(1.5, float(temperature)), step=0.05, description="temperature",
            readout_format=".2f", continuous_update=False, style=style,
        )
        self.n_slider = widgets.IntSlider(
            value=n, min=1, max=max_n, description="samples", continuous_update=False, style=style,
        )
        self.seed_slider = widgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed", style=style)
        self.image = widgets.Image(format="png")
        self.status = widgets.Label()
        self.widget = widgets.VBox([
            widgets.HBox([self.class_dropdown, self.temperature_slider]),
            widgets.HBox([self.n_slider, self.seed_slider]),
            self.image,
            self.status,
        ])
        for control in self.controls:
            control.observe(self.update, names="value")
        self.update()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", **kw: Any) -> SamplerWidget:
        """A widget on the best weights of a run directory (see runs.load_run_model)."""
        from ..training.runs import load_run_model

        model, _, info, _ = load_run_model(Path(run_dir), device)
        return cls(model, info["class_names"], tuple(info["data_shape"]), info["levels"], **kw)

    @property
    def controls(self) -> tuple[Any, ...]:
        return (self.class_dropdown, self.temperature_slider, self.n_slider, self.seed_slider)

    @property
    def png(self) -> bytes:
        """The image shown now (widgets.Image keeps its value as a memoryview)."""
        return bytes(self.image.value)

    def describe(self) -> str:
        """What the image shows, e.g. "class 3 · T=0.70 · 8 samples · seed 0"."""
        k = self.class_dropdown.value
        name = self.class_names[k]
        label = name if name == str(k) else f"{k} ({name})"
        n = self.n_slider.value
        return (f"class {label} \u00b7 T={self.temperature_slider.value:.2f} \u00b7 "
                f"{n} sample{'s' if n != 1 else ''} \u00b7 seed {self.seed_slider.value}")

    def update(self, change: Any = None) -> None:
        """Re-render the image from the controls' current values (the observe callback)."""
        self.image.value = render_png(
            self.model, int(self.class_dropdown.value), float(self.temperature_slider.value),
            int(self.n_slider.value), int(self.seed_slider.value), self.data_shape, self.levels, self.class_names,
        )
        self.status.value = self.describe()
        self.renders += 1

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
