"""study.spread: the seed table reuses the report's runs, its summary is the sample mean and sd, and a rerun check
flags a number outside the committed spread."""

import math
import statistics

import pytest

from mixflow_core.study import spread
from mixflow_core.training.runs import read_config


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    rows = spread.seed_table("digits", "smoke", seeds=(0, 1), runs_dir=runs, baselines="fast", log=lines.append)
    return rows, runs, lines


def test_seed_table_trains_each_configuration_per_seed_in_the_reports_run_directories(smoke_rows):
    rows, runs, lines = smoke_rows
    flows = [r for r in rows if r["kind"] == "mixture flow"]
    assert [(r["method"], r["seed"]) for r in flows] == [
        ("mixture flow: fixed", 0), ("mixture flow: fixed", 1),
        ("mixture flow: fixed-coupling", 0), ("mixture flow: fixed-coupling", 1)]
    for config in ("fixed", "fixed-coupling"):
        for seed in (0, 1):  # the names report.plan gives its runs, so the report's seed-0 run is shared
            cfg = read_config(runs / f"digits-smoke-seed{seed}-{config}")[0]
            assert cfg.train.seed == seed
    assert flows[0]["accuracy"] != flows[1]["accuracy"] or flows[0]["bpd_conditional"] != flows[1]["bpd_conditional"]
    gauss = [r for r in rows if r["method"].startswith("per-class Gaussian")]
    assert [r["seed"] for r in gauss] == [0, 1]
    sk = [r for r in rows if r["kind"] == "baseline" and r["seed"] is None]
    assert {r["method"].split(" (")[0] for r in sk} >= {"logistic regression"}
    assert len(lines) == len(rows)  # one progress line per row


def test_seed_table_reuses_finished_runs(smoke_rows, monkeypatch):
    rows, runs, _ = smoke_rows
    import mixflow_core.training.runs as runs_module

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs_module, "fit", no_training)
    again = spread.seed_table("digits", "smoke", seeds=(0, 1), runs_dir=runs, baselines="none", log=lambda _: None)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows if r["kind"] == "mixture flow"]


def test_summary_is_the_sample_mean_and_sd(smoke_rows):
    rows, _, _ = smoke_rows
    summary = {s["method"]: s for s in spread.summarise(rows)}
    fixed = [r for r in rows if r["method"] == "mixture flow: fixed"]
    s = summary["mixture flow: fixed"]
    assert s["n_seeds"] == 2
    assert math.isclose(s["accuracy_mean"], statistics.fmean(r["accuracy"] for r in fixed))
    assert math.isclose(s["bpd_conditional_sd"], statistics.stdev(r["bpd_conditional"] for r in fixed))
    logistic = next(v for k, v in summary.items() if k.startswith("logistic"))
    assert logistic["n_seeds"] == 0 and logistic["accuracy_sd"] == 0.0  # deterministic: one fit
    md = spread.markdown_spread(list(summary.values()))
    assert "| mixture flow: fixed | 2 |" in md and " ± " in md and "deterministic" in md


def test_reference_check_flags_numbers_outside_the_spread():
    summary = [{"method": "m", "n_seeds": 3, "accuracy_mean": 0.870, "accuracy_sd": 0.002,
                "bpd_conditional_mean": 3.50, "bpd_conditional_sd": 0.0}]
    inside = spread.reference_check([{"method": "m", "accuracy": 0.876, "bpd_conditional": 3.52}], summary)
    assert [c["within"] for c in inside] == [True, True]  # sd below the floors: 3 x 0.005 and 3 x 0.01
    outside = spread.reference_check([{"method": "m", "accuracy": 0.850, "bpd_conditional": 3.60},
                                      {"method": "not committed", "accuracy": 0.1}], summary)
    assert [(c["metric"], c["within"]) for c in outside] == [("accuracy", False), ("bpd_conditional", False)]
    assert "**no**" in spread.markdown_reference_check(outside)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        spread.seed_table("digits", "smoke", seeds=(), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="baselines"):
        spread.seed_table("digits", "smoke", seeds=(0,), runs_dir=tmp_path, baselines="some")
    with pytest.raises(ValueError, match="config"):
        spread.seed_table("digits", "smoke", seeds=(0,), configs=("fixed-nothing",), runs_dir=tmp_path)
