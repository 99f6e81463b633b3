"""mixflow_core.study.widgets on a smoke-trained digits model, without a browser.

render_png is a pure function of its arguments; the SamplerWidget's observe callbacks must
re-render its Image when a control's value changes (set .value, compare the PNG bytes);
notebook 03 runs under papermill and records PNGs whose hashes match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from mixflow_core.cli import main
from mixflow_core.training.runs import load_run_model
from mixflow_core.study.widgets import SamplerWidget, fig_interpolation, interpolation, png_bytes, render_png
from tests.helpers import float64_one_thread

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require(module: str):
    """Import an optional (notebook) dependency: skip without it locally, fail under CI."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI must run the widget tests")
        raise



@pytest.fixture(scope="module", params=["iresnet", "coupling"])
def run_dir(tmp_path_factory, request) -> Path:
    """A digits smoke run (about 2 s), on each backbone family: the sampler decodes through either's inverse."""
    run = tmp_path_factory.mktemp("widgets") / "run"
    with float64_one_thread():
        assert main(["train", "--dataset", "digits", "--profile", "smoke", "--backbone", request.param,
                     "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    """(model, (data_shape, levels, class_names)) with float64 weights, as `mixflow sample` loads them in tests."""
    with float64_one_thread():
        model, _, info, _ = load_run_model(run_dir, "cpu")
    return model, (tuple(info["data_shape"]), info["levels"], info["class_names"])


def _pixels(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _cells(png: bytes, n: int, side: int = 8) -> list[np.ndarray]:
    """The n sample cells of a one-row fig_sample_grid PNG (1-pixel gaps between side x side images)."""
    pix = _pixels(png)
    scale = pix.shape[0] // (side + 2)
    assert pix.shape[:2] == ((side + 2) * scale, (n * (side + 1) + 1) * scale), "unexpected grid geometry"
    top = scale
    return [pix[top: top + side * scale, (1 + c * (side + 1)) * scale: (1 + c * (side + 1) + side) * scale]
            for c in range(n)]


# -- render_png ----------------------------------------------------------------------------------
def test_render_png_is_a_deterministic_png(loaded):
    model, args = loaded
    png = render_png(model, 3, 0.7, 8, 0, *args)
    assert png.startswith(PNG_SIGNATURE)
    assert png == render_png(model, 3, 0.7, 8, 0, *args)
    assert len(_cells(png, 8)) == 8  # one row of 8 digits


@pytest.mark.parametrize("change", [{"cls": 4}, {"seed": 1}, {"temperature": 1.0}, {"n": 5}])
def test_render_png_changes_with_each_argument(loaded, change):
    model, args = loaded
    base = {"cls": 3, "temperature": 0.7, "n": 8, "seed": 0}
    a = render_png(model, base["cls"], base["temperature"], base["n"], base["seed"], *args)
    new = {**base, **change}
    b = render_png(model, new["cls"], new["temperature"], new["n"], new["seed"], *args)
    assert a != b
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape != pb.shape or not np.array_equal(pa, pb), "different arguments, same picture"


def test_temperature_zero_draws_the_decoded_class_mean(loaded):
    """T = 0: every column is f^{-1}(mu_y); at T > 0 the columns differ."""
    model, args = loaded
    mean = model.decode(model.prior.means[3:4])  # (1, 64)
    assert torch.equal(model.sample(3, n=5, temperature=0.0), mean.expand(5, -1))
    cells = _cells(render_png(model, 3, 0.0, 5, 0, *args), 5)
    half = cells[0].shape[0] // 2  # the class name is written over the first cell's top-left corner
    assert all(np.array_equal(cells[1], c) for c in cells[2:])
    assert np.array_equal(cells[0][half:], cells[1][half:])
    warm = _cells(render_png(model, 3, 0.7, 5, 0, *args), 5)
    assert not np.array_equal(warm[1], warm[2])
    # the seed does not matter at T = 0
    assert _cells(render_png(model, 3, 0.0, 5, 7, *args), 5)[1].tobytes() == cells[1].tobytes()


def test_render_png_matches_the_cli_sampler(loaded, run_dir, tmp_path):
    """One class through render_png == the same class through `mixflow sample` (same seeding, same pixels)."""
    model, args = loaded
    out = tmp_path / "cli.png"
    with matplotlib.rc_context({"savefig.bbox": "standard", "savefig.dpi": "figure"}):  # whatever set_style did
        assert main(["sample", str(run_dir), "--classes", "3", "--n", "6", "--temperature", "0.5",
                     "--seed", "2", "--out", str(out)]) == 0
    cli = matplotlib.image.imread(out)
    ours = _pixels(render_png(model, 3, 0.5, 6, 2, *args))
    assert cli.shape == ours.shape and np.array_equal(cli, ours)


@pytest.mark.parametrize("kwargs, match", [
    ({"cls": -1}, "class"), ({"cls": 10}, "class"), ({"cls": 1.0}, "class"), ({"n": 0}, "n must"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"seed": -1}, "seed"),
])
def test_render_png_rejects_bad_input(loaded, kwargs, match):
    model, args = loaded
    full = {"cls": 0, "temperature": 0.7, "n": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        render_png(model, full["cls"], full["temperature"], full["n"], full["seed"], *args)


def test_render_png_rejects_mismatched_data_description(loaded):
    model, (shape, levels, names) = loaded
    with pytest.raises(ValueError, match="class names"):
        render_png(model, 0, 0.7, 4, 0, shape, levels, names[:-1])
    with pytest.raises(ValueError, match="data_shape"):
        render_png(model, 0, 0.7, 4, 0, (8, 8), levels, names)
    with pytest.raises(ValueError, match="2-D"):
        render_png(model, 0, 0.7, 4, 0, shape, None, names)


def test_two_dimensional_continuous_data_are_scatter_plots():
    """levels None (toy2d): render_png and fig_interpolation draw in the plane; only 2-D is drawable."""
    from mixflow_core.flows.config import MLP, ModelConfig
    from mixflow_core.flows.iresnet.logdet import PowerSeries
    from mixflow_core.flows.model import build_model

    cfg = ModelConfig(arch=MLP(hidden=(8,), n_blocks=1), logdet=PowerSeries(n_terms=2))
    model = build_model((2,), 2, None, cfg).eval()
    png = render_png(model, 1, 0.5, 20, 0, (2,), None, ["a", "b"])
    assert png.startswith(PNG_SIGNATURE) and png == render_png(model, 1, 0.5, 20, 0, (2,), None, ["a", "b"])
    assert png != render_png(model, 1, 0.5, 20, 1, (2,), None, ["a", "b"])
    assert interpolation(model, 0, 1, 4).shape == (4, 2)
    assert png_bytes(fig_interpolation(model, 0, 1, 4, (2,), None, ["a", "b"])).startswith(PNG_SIGNATURE)


# -- interpolation -------------------------------------------------------------------------------
def test_interpolation_ends_at_the_decoded_class_means(loaded):
    model, args = loaded
    frames = interpolation(model, 2, 7, steps=6)
    assert frames.shape == (6, *model.data_shape)
    means = model.prior.means
    assert torch.equal(frames[0], model.decode(means[2:3])[0])
    assert torch.equal(frames[-1], model.decode(means[7:8])[0])
    assert not torch.equal(frames[0], frames[-1])
    assert frames.min() >= 0 and frames.max() <= args[1] - 1  # levels
    assert png_bytes(fig_interpolation(model, 2, 7, 6, *args)).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("a, b, steps, match", [(-1, 1, 5, "a must"), (0, 10, 5, "b must"), (0, 1, 1, "steps")])
def test_interpolation_rejects_bad_input(loaded, a, b, steps, match):
    model, _ = loaded
    with pytest.raises(ValueError, match=match):
        interpolation(model, a, b, steps)


# -- the widget ----------------------------------------------------------------------------------
@pytest.fixture
def widget(loaded):
    _require("ipywidgets")
    model, (shape, levels, names) = loaded
    return SamplerWidget(model, names, shape, levels, n=8, temperature=0.7, seed=0)


def test_widget_renders_on_construction(widget):
    assert widget.renders == 1
    assert widget.image.format == "png" and widget.png.startswith(PNG_SIGNATURE)
    assert widget.status.value == "class 0 \u00b7 T=0.70 \u00b7 8 samples \u00b7 seed 0"
    assert widget.class_dropdown.options[3] == ("3", 3)
    assert (widget.temperature_slider.min, widget.temperature_slider.max, widget.temperature_slider.step) == (
        0.0, 1.5, 0.05)
    assert (widget.n_slider.min, widget.n_slider.max) == (1, 32)
    bundle = widget._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.widget.model_id


def test_widget_controls_rerender_the_image(widget, loaded):
    """Each control's .value change re-renders: the bytes change and equal render_png of the new values."""
    model, args = loaded
    seen = [widget.png]
    for control, value, status in [
        (widget.class_dropdown, 3, "class 3 \u00b7 T=0.70 \u00b7 8 samples \u00b7 seed 0"),
        (widget.temperature_slider, 1.2, "class 3 \u00b7 T=1.20 \u00b7 8 samples \u00b7 seed 0"),
        (widget.n_slider, 3, "class 3 \u00b7 T=1.20 \u00b7 3 samples \u00b7 seed 0"),
        (widget.seed_slider, 5, "class 3 \u00b7 T=1.20 \u00b7 3 samples \u00b7 seed 5"),
    ]:
        control.value = value
        assert widget.png not in seen, f"changing {control.description} left the image unchanged"
        assert widget.status.value == status
        seen.append(widget.png)
    assert widget.renders == 5
    assert widget.png == render_png(model, 3, 1.2, 3, 5, *args)
    assert len(_cells(widget.png, 3)) == 3


def test_widget_from_run_and_bad_arguments(run_dir, loaded):
    _require("ipywidgets")
    w = SamplerWidget.from_run(run_dir, n=4, temperature=0.0, seed=1, class_index=2)
    assert w.renders == 1 and w.status.value == "class 2 \u00b7 T=0.00 \u00b7 4 samples \u00b7 seed 1"
    model, (shape, levels, names) = loaded
    with pytest.raises(ValueError, match="max_n"):
        SamplerWidget(model, names, shape, levels, n=40, max_n=32)
    with pytest.raises(ValueError, match="class"):
        SamplerWidget(model, names, shape, levels, class_index=10)


# -- notebook 03 ---------------------------------------------------------------------------------
def test_notebook_03_runs_under_papermill(run_dir, tmp_path):
    papermill = _require("papermill")
    _require("ipywidgets")
    out = tmp_path / "03_sampling.out.ipynb"
    results = tmp_path / "results" / "03.json"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "03_sampling.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT),
        parameters={"run_dir": str(run_dir), "figures_dir": str(tmp_path / "figures"), "results_json": str(results),
                    "n_samples": 4, "interpolate": [1, 2], "steps": 5},
        progress_bar=False, execution_timeout=300,
    )
    got = json.loads(results.read_text())
    assert got["run_dir"] == str(run_dir) and got["class_names"] == [str(k) for k in range(10)]
    assert (got["temperature"], got["n_samples"], got["seed"]) == (0.7, 4, 0)
    names = ["03_samples_per_class.png", "03_interpolation.png"]
    assert got["figures"] == [str(tmp_path / "figures" / name) for name in names]
    assert sorted(got["sha256"]) == sorted(names)
    for path in got["figures"]:
        png = Path(path).read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert hashlib.sha256(png).hexdigest() == got["sha256"][Path(path).name]
    # the executed copy holds the widget (papermill stores widget state) and no error
    executed = json.loads(out.read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
