"""The overlap explorer on two smoke-trained digits runs (student and fixed, with snapshots), without a browser.

render_epoch / render_image are pure functions of the precomputed Frames; the OverlapExplorer's
observe callbacks must re-render its images when a control's value changes.
"""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest
import torch

from mixflow_core import study
from mixflow_core.eval.metrics import log_likelihood_table
from mixflow_core.study.explorer import (
    PICKS, explorer_frames, fig_epoch, fig_image, pick_image, render_epoch, render_image,
)
from mixflow_core.training import runs
from tests.helpers import float64_one_thread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Student and fixed digits smoke runs, 3 epochs, snapshots after epochs 1 and 2; 120 test points."""
    root = tmp_path_factory.mktemp("explorer")
    with float64_one_thread():
        loaded = {}
        for config in ("student", "fixed"):
            cfg = study.run_config("digits", "smoke", config, progress=False, overrides={"runtime.epochs": 3})
            runs.ensure_run(cfg, root / config, "smoke", (1, 2))
            loaded[config] = root / config
        runs_ = study.load_runs(loaded)
        points = study.test_subset(runs_["fixed"].data.test, 120, 0)
        return explorer_frames(runs_, points)


def _pixels(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_frames_hold_every_snapshot_then_the_best_weights(frames):
    for config in ("student", "fixed"):
        assert frames.labels[config][:2] == ["epoch 1", "epoch 2"] and frames.labels[config][-1].startswith("best")
        assert len(frames.panels[config]) == 3 and frames.projections[config].shape == (2, 64)
        # the stored table is the seeded log_likelihood_table of the best weights; posteriors are distributions
        model = frames.models[config]
        with runs.seeded_rng(0, torch.device("cpu")):
            table, _ = log_likelihood_table(model, torch.utils.data.TensorDataset(frames.x, frames.y), 500)
        assert torch.equal(table, frames.table[config])
        post = torch.stack([frames.posterior(config, i) for i in range(5)])
        expected = torch.softmax(table[:5] + model.prior.log_class_probs.detach().to(table.dtype), 1)
        assert torch.allclose(post, expected) and torch.allclose(post.sum(1), torch.ones(5, dtype=post.dtype))
    assert frames.n_frames == 3


def test_epoch_frames_differ_and_are_pngs(frames):
    first, last = render_epoch(frames, 0), render_epoch(frames, frames.n_frames - 1)
    assert first.startswith(PNG_SIGNATURE) and last.startswith(PNG_SIGNATURE)
    assert not np.array_equal(_pixels(first), _pixels(last))
    assert len(fig_epoch(frames, 0).axes) == 2  # student and fixed side by side
    for bad in (-1, frames.n_frames, 1.5, True):
        with pytest.raises(ValueError, match="frame index"):
            fig_epoch(frames, bad)


def test_picks_are_what_they_say(frames):
    for config in ("student", "fixed"):
        joint = frames.table[config] + frames.log_py[config]
        ood = pick_image(frames, config, "most OOD")
        assert torch.logsumexp(joint[ood], 0) == torch.logsumexp(joint, 1).min()
        confused = pick_image(frames, config, "most confused")
        post = torch.softmax(joint, 1)
        wrong = post.clone()
        wrong[torch.arange(len(frames.y)), frames.y] = 0
        assert wrong[confused].max() == wrong.max()  # the largest posterior mass on a wrong class anywhere
        assert pick_image(frames, config, "index", 7) == 7
    with pytest.raises(ValueError, match="unknown pick"):
        pick_image(frames, "fixed", "most typical")
    with pytest.raises(ValueError, match="index"):
        pick_image(frames, "fixed", "index", len(frames.y))
    with pytest.raises(ValueError, match="unknown configuration"):
        pick_image(frames, "seed", "index", 0)


def test_image_view_shows_the_image_bars_and_a_star(frames):
    fig = fig_image(frames, "fixed", 3)
    ax_img, ax_bar, ax_lat = fig.axes[:3]
    assert len(ax_bar.patches) == 10 and abs(sum(p.get_width() for p in ax_bar.patches) - 1) < 1e-9
    assert [line.get_gid() for line in ax_lat.lines].count("highlight") == 1
    assert "σ" in ax_lat.get_title()
    assert render_image(frames, "fixed", 3) != render_image(frames, "fixed", 4)


def test_widget_callbacks_re_render(frames):
    pytest.importorskip("ipywidgets")
    from mixflow_core.study.explorer import OverlapExplorer

    w = OverlapExplorer(frames, config="fixed", pick="most confused")
    assert w.renders == 2 and w.index_box.value == pick_image(frames, "fixed", "most confused")
    epoch_before, image_before = w.epoch_png, w.image_png
    w.epoch_slider.value = 0
    assert w.renders == 3 and w.epoch_png != epoch_before and "epoch 1" in w.epoch_status.value
    w.pick_dropdown.value = "most OOD"
    assert w.renders == 4 and w.index_box.value == pick_image(frames, "fixed", "most OOD")
    w.index_box.value = (w.index_box.value + 1) % len(frames.y)  # a typed index switches the pick to "index"
    assert w.pick_dropdown.value == "index" and w.renders == 5 and w.image_png != image_before
    w.config_dropdown.value = "student"
    assert w.renders == 6 and "student" in w.image_status.value


def test_static_pngs(frames, tmp_path):
    pytest.importorskip("ipywidgets")
    from mixflow_core.study.explorer import OverlapExplorer
    from mixflow_core.study.report import FigureLog

    saved = OverlapExplorer(frames).save_static(FigureLog(tmp_path, show=False))
    assert len(saved) == 2 + 2 * (len(PICKS) - 1)
    assert all((tmp_path / name).read_bytes().startswith(PNG_SIGNATURE) for name in saved)


def test_the_explorer_shows_a_coupling_flow(tmp_path):
    """The overlap explorer works on the coupling backbone: its snapshots, the table behind p(y|x), the views."""
    with float64_one_thread():
        cfg = study.run_config("digits", "smoke", "fixed-coupling", progress=False, overrides={"runtime.epochs": 2})
        assert cfg.model.family == "coupling"
        runs.ensure_run(cfg, tmp_path / "coupling", "smoke", (1,))
        loaded = study.load_runs({"fixed-coupling": tmp_path / "coupling"})
        points = study.test_subset(loaded["fixed-coupling"].data.test, 60, 0)
        frames = explorer_frames(loaded, points)
    assert frames.labels["fixed-coupling"][0] == "epoch 1" and frames.n_frames == 2
    post = torch.stack([frames.posterior("fixed-coupling", i) for i in range(5)])
    assert torch.allclose(post.sum(1), torch.ones(5, dtype=post.dtype))
    assert render_epoch(frames, 1).startswith(PNG_SIGNATURE)
    ood = pick_image(frames, "fixed-coupling", "most OOD")
    assert render_image(frames, "fixed-coupling", ood).startswith(PNG_SIGNATURE)
