"""The notebooks' calibration and OOD glue on smoke-trained digits runs: the numbers behind metrics.json are the
ones reused (tables.pt), temperature scaling is fit on validation and keeps the accuracy, OOD rows and
histograms come from one set of scores, and failures are stated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixflow_core import study
from mixflow_core.data import DatasetNotFoundError
from mixflow_core.eval.metrics import (
    accuracy, apply_temperature, bits_per_dim, expected_calibration_error, fit_temperature, reliability_bins,
)
from mixflow_core.eval.ood import FLOW_METHOD, IN_DISTRIBUTION, flow_scores, ood_rows
from mixflow_core.study import generative
from mixflow_core.training import runs
from tests.helpers import float64_one_thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{config: run dir} of the student and fixed digits smoke runs (2 epochs each)."""
    root = tmp_path_factory.mktemp("generative")
    with float64_one_thread():
        out = {}
        for config in ("student", "fixed"):
            cfg = study.run_config("digits", "smoke", config, progress=False)
            runs.ensure_run(cfg, root / config, "smoke")
            out[config] = root / config
    return out


@pytest.fixture()
def loaded(trained):
    return study.load_runs(trained)


def test_training_writes_the_tables_behind_its_metrics(trained):
    for run_dir in trained.values():
        t = runs.read_tables(run_dir)
        metrics = runs.read_json(run_dir / runs.METRICS)
        assert t["checkpoint"] == metrics["checkpoint"] and t["eval_seed"] == metrics["eval_seed"]
        for split in ("val", "test"):
            table, y = t["splits"][split]["table"], t["splits"][split]["y"]
            assert table.dtype == torch.float64 and table.shape == (metrics[split]["n"], 10)
            assert accuracy(table, y, t["log_py"]) == metrics[split]["accuracy"]
            assert bits_per_dim(table, y, t["log_py"], 64) == pytest.approx(metrics[split]["bpd_conditional"], rel=1e-12)
            assert expected_calibration_error(table, y, t["log_py"]) == pytest.approx(metrics[split]["ece"], rel=1e-12)


def test_eval_tables_recomputes_a_missing_file_exactly(loaded):
    run = loaded["fixed"]
    written = runs.read_tables(run.run_dir)
    (run.run_dir / runs.TABLES).unlink()
    with float64_one_thread():
        again = generative.eval_tables(run)
    assert (run.run_dir / runs.TABLES).is_file()  # cached for the next notebook
    for split in ("val", "test"):
        assert torch.equal(again["splits"][split]["y"], written["splits"][split]["y"])
        torch.testing.assert_close(again["splits"][split]["table"], written["splits"][split]["table"], rtol=0, atol=1e-9)


def test_read_tables_absent_or_corrupt(tmp_path):
    assert runs.read_tables(tmp_path) is None
    (tmp_path / runs.TABLES).write_bytes(b"not a torch file")
    with pytest.raises(runs.RunError, match="not a readable tables file"):
        runs.read_tables(tmp_path)


def test_calibration_fits_on_validation_and_keeps_the_accuracy(loaded):
    cal = generative.calibration({"fixed": loaded["fixed"]}, n_bins=10)
    (row,) = cal["rows"]
    t = runs.read_tables(loaded["fixed"].run_dir)
    val, test, log_py = t["splits"]["val"], t["splits"]["test"], t["log_py"]
    temperature = fit_temperature(val["table"], val["y"], log_py)
    assert row["temperature"] == pytest.approx(temperature, rel=1e-12)
    assert row["accuracy"] == loaded["fixed"].metrics["test"]["accuracy"]
    scaled = apply_temperature(test["table"], temperature, log_py)
    assert row["ece"] == pytest.approx(reliability_bins(test["table"], test["y"], log_py, 10)["ece"], rel=1e-12)
    assert row["ece_scaled"] == pytest.approx(reliability_bins(scaled, test["y"], None, 10)["ece"], rel=1e-12)
    nll = float(-torch.log_softmax(test["table"] + log_py, 1).gather(1, test["y"][:, None]).mean())
    assert row["nll"] == pytest.approx(nll, rel=1e-12)
    # T minimises the validation NLL, so it can only lower it; on test it must still be finite
    assert math.isfinite(row["nll_scaled"]) and set(cal["bins"]) == {"fixed", f"fixed, T = {temperature:.3g}"}
    assert sum(cal["bins"]["fixed"]["counts"]) == row["n"] == len(test["y"])
    md = generative.markdown_calibration(cal["rows"])
    assert md.count("\n") == 2 and f"{temperature:.3f}" in md


def test_calibration_of_both_configurations_and_json_safe(loaded):
    cal = generative.calibration(loaded)
    assert [r["method"] for r in cal["rows"]] == ["student", "fixed"]
    for r in cal["rows"]:
        assert r["ece"] == pytest.approx(loaded[r["method"]].metrics["test"]["ece"], rel=1e-12)  # 15 bins, as metrics
        assert r["temperature"] is None or r["temperature"] > 0
    # a search interval that excludes the fitted T: the bound is returned, flagged, and said in the table
    (row,) = generative.calibration({"fixed": loaded["fixed"]}, bounds=(1e-3, 1e-2))["rows"]
    assert row["temperature"] == 1e-2 and row["temperature_at_bound"] is True
    assert "0.010 (search bound)" in generative.markdown_calibration([row])


def test_ood_sets_subsample_and_the_other_data_set(loaded, monkeypatch):
    data = loaded["fixed"].data
    sets, notes = generative.ood_sets(data, "digits", n=50, seed=1, other=None)
    assert list(sets) == ["uniform noise", "blurred", "inverted", "flipped"] and notes == []
    assert all(x.shape == (50, 64) and x.dtype == data.test.tensors[0].dtype for x in sets.values())
    x = data.test.tensors[0]
    inverted_rows = {tuple(r.tolist()) for r in (16 - x.long())}
    assert all(tuple(r.tolist()) in inverted_rows for r in sets["inverted"].long())  # transforms of test images

    def missing(cfg):
        raise DatasetNotFoundError(f"no {cfg.name} here")

    monkeypatch.setattr(generative, "load_data", missing)
    sets, notes = generative.ood_sets(data, "digits", n=50)
    assert "fashion-mnist (resampled)" not in sets and len(notes) == 1 and "no fashion-mnist here" in notes[0]


def test_ood_sets_with_fashion_mnist_resampled(loaded):
    sets, notes = generative.ood_sets(loaded["fixed"].data, "digits", n=30)
    if notes:
        pytest.skip(notes[0])  # Fashion-MNIST's files are not on this machine (CI installs them)
    x = sets["fashion-mnist (resampled)"]
    assert x.shape == (30, 64) and int(x.max()) <= 16 and int(x.min()) >= 0


def test_ood_study_reuses_the_test_table_and_matches_its_rows(loaded):
    run = loaded["fixed"]
    sets, _ = generative.ood_sets(run.data, "digits", n=60, other=None)
    with float64_one_thread():
        out = generative.ood_study(run, sets, seed=0, train_sample=100, sklearn=())
        fresh = flow_scores(run.model, run.data, sets, run.cfg.runtime.eval_batch_size, 0, 100)
    t = runs.read_tables(run.run_dir)
    # the in-distribution scores are those of tables.pt, which equal a fresh seeded evaluation of the test set
    bpd_in = out["bpd"][FLOW_METHOD][IN_DISTRIBUTION]
    log_px = torch.logsumexp(t["splits"]["test"]["table"] + t["log_py"], 1).numpy()
    np.testing.assert_allclose(bpd_in, -log_px / (64 * math.log(2)), rtol=1e-12)
    np.testing.assert_allclose(-fresh[IN_DISTRIBUTION]["neg_bpd"], bpd_in, rtol=0, atol=1e-9)
    flow_rows = [r for r in out["rows"] if r["model"] == FLOW_METHOD]
    assert len(flow_rows) == 5 * len(sets) and {r["model"] for r in out["rows"]} == {
        FLOW_METHOD, "per-class Gaussian (logit space)"}
    assert set(out["bpd"]) == set(generative.FIGURE_TAGS)
    for by_set in out["bpd"].values():
        assert set(by_set) == {IN_DISTRIBUTION, *sets} and all(len(by_set[s]) == 60 for s in sets)
    # rows recomputed from the returned bits/dim agree (neg_bpd rows)
    again = ood_rows(FLOW_METHOD, {s: {"neg_bpd": -b} for s, b in out["bpd"][FLOW_METHOD].items()})
    assert [r["auroc"] for r in again] == [r["auroc"] for r in flow_rows if r["score"] == "neg_bpd"]


def test_ood_findings_state_failures_plainly():
    rows = [{"model": "m", "score": "log_px", "ood_set": "simple", "auroc": 0.2, "aupr": 0.3},
            {"model": "m", "score": "max_posterior", "ood_set": "noise", "auroc": 0.52, "aupr": 0.5},
            {"model": "m", "score": "log_px", "ood_set": "noise", "auroc": 0.99, "aupr": 0.99}]
    findings = generative.ood_findings(rows)
    assert len(findings) == 2
    assert "simple" in findings[0] and "MORE in-distribution" in findings[0] and "0.200" in findings[0]
    assert "noise" in findings[1] and "chance" in findings[1]
