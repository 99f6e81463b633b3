"""Each rule has one home: the places that use a rule give the same answer (and the same message) because they
call the same function. One test per rule the restructure folded into one place."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixflow_core import ModelConfig, SpectralConv2d, SpectralLinear, build_model
from mixflow_core.cli import main
from mixflow_core.data import load_data
from mixflow_core.eval.diagnostics import overlap_summary, prior_overlap
from mixflow_core.flows.preprocess import LogitPreprocess
from mixflow_core.study import report
from mixflow_core.study.widgets import fig_class_samples, render_png
from mixflow_core.training.distributed import resolve_device
from mixflow_core.training.fit import fit
from mixflow_core.training.io import json_safe, write_json
from mixflow_core.training.profiles import get_profile
from mixflow_core.training.runs import RunError, device_or_error

ROOT = Path(__file__).resolve().parents[1]


def _message(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.fixture(scope="module")
def trained():
    cfg = get_profile("digits", "smoke")
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    history = fit(model, data, cfg.train, cfg.runtime)  # no early stopping: ends with the last epoch's weights
    return model, data, history


def test_overlap_statistics_in_the_history_are_those_of_the_diagnostics(trained):
    model, data, history = trained
    last = history.epochs[-1]
    stats = prior_overlap(model.prior)
    assert set(stats) == {"mean_dist_min_sigma", "mean_dist_median_sigma", "bhattacharyya_mean", "bhattacharyya_max"}
    assert {k: last[k] for k in stats} == stats  # same keys, same numbers
    summary = overlap_summary(model, data.test)
    assert {k: summary[k] for k in stats} == stats


def test_validation_numbers_are_the_metrics_functions(trained):
    from mixflow_core.eval.metrics import accuracy, bits_per_dim, log_likelihood_table

    model, data, history = trained
    torch.manual_seed(123)
    table, y = log_likelihood_table(model, data.val)
    log_py = model.prior.log_class_probs.detach()
    # dequantisation noise differs from fit's draw, so compare accuracy loosely and bits/dim to a few 1e-3
    assert history.epochs[-1]["val_bpd"] == pytest.approx(bits_per_dim(table, y, log_py, model.dim), abs=0.05)
    assert abs(history.epochs[-1]["val_acc"] - accuracy(table, y, log_py)) <= 0.1


def test_one_device_resolution():
    cfg = get_profile("toy2d", "smoke")
    data = load_data(cfg.data)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior)
    direct = _message(lambda: resolve_device("tpu"))
    assert "unknown device 'tpu'" in direct
    in_fit = _message(lambda: fit(model, data, cfg.train, replace(cfg.runtime, device="tpu")))
    with pytest.raises(RunError) as info:
        device_or_error("tpu")
    assert direct == in_fit and direct in str(info.value)
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_train_reports_the_same_device_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "toy2d", "--profile", "smoke", "--device", "tpu"])
    assert _message(lambda: resolve_device("tpu")) in capsys.readouterr().err


def test_json_without_nan_everywhere(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan", "e": 2}
    assert json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 2}
    path = write_json(tmp_path / "x.json", obj)
    assert json.loads(path.read_text()) == json_safe(obj)
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_a_failed_json_write_leaves_the_old_file(tmp_path):
    path = write_json(tmp_path / "x.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}


def test_one_sampling_validation_for_cli_and_widget(trained, tmp_path, capsys):
    model, data, _ = trained
    shape, levels, names = data.data_shape, data.levels, data.class_names
    for bad, flag in (({"n": 0}, ["--n", "0"]), ({"temperature": -1.0}, ["--temperature", "-1"]),
                      ({"classes": [10]}, ["--classes", "10"])):
        kw = {"classes": [0], "n": 2, "temperature": 0.7, **bad}
        direct = _message(lambda kw=kw: fig_class_samples(model, kw["classes"], kw["n"], kw["temperature"], 0, shape,
                                                          levels, names))
        run = tmp_path / "run"
        if not run.exists():
            assert main(["train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(run)]) == 0
        with pytest.raises(SystemExit):
            main(["sample", str(run), *flag])
        assert direct in capsys.readouterr().err
    widget_message = _message(lambda: render_png(model, 0, 0.7, 0, 0, shape, levels, names))  # the widget's renderer
    assert widget_message == _message(lambda: fig_class_samples(model, [0], 0, 0.7, 0, shape, levels, names))


def test_one_notebook_list():
    steps = report.plan("digits", "smoke")
    assert [s.notebook for s in steps] == [report.TRAIN] * 3 + [report.OVERLAP, report.SAMPLING, report.FIGURES]
    assert tuple(sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))) == report.NOTEBOOKS


def test_one_check_for_alpha_and_one_for_coeff():
    alpha = _message(lambda: ModelConfig(alpha=0.5))
    assert alpha == _message(lambda: LogitPreprocess(17, alpha=0.5)) == "alpha must lie in [0, 0.5), got 0.5"
    coeff = _message(lambda: ModelConfig(coeff=1.0))
    assert coeff == _message(lambda: SpectralLinear(2, 2, coeff=1.0)) == _message(
        lambda: SpectralConv2d(1, 1, 3, input_hw=(4, 4), coeff=1.0))
    assert "coeff (the Lipschitz bound) must lie in (0, 1)" in coeff
