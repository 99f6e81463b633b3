"""Shared test setup: float64 maths, one thread (fast and deterministic on 2-core CI), fixed seeds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_one_thread():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old_dtype)


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """The whole report (notebooks 01 three times, 02, 03, 04) run once per session on the digits smoke profile, into a
    tmp folder: (steps, summary, echoed lines, tmp). Committed frontier tables of the Fashion-MNIST shape stand in for
    benchmarks/backbones/ (digits has none), so 04 draws them too.
    Shared by tests/study/test_notebooks.py and tests/study/test_report_html.py.
    """
    import json

    from mixflow_core.study import report

    tmp = tmp_path_factory.mktemp("report")
    frontier = tmp / "frontier.json"  # a two-run frontier table of the shape benchmarks/backbones_fashion.py writes
    frontier.write_text(json.dumps({"runs": [
        {"backbone": b, "beta": beta, "minutes": 5.0, "seed": 0, "test_acc": acc, "test_bpd": bpd,
         "curve": [{"images": 64, "seconds": 1.0, "val_bpd": bpd + 1}, {"images": 128, "seconds": 1.0, "val_bpd": bpd}]}
        for b, beta, acc, bpd in (("coupling", 0.1, 0.86, 3.6), ("iresnet", 0.1, 0.8, 4.4))],
        "baselines": [{"method": "logistic regression (C)", "test_acc": 0.85, "test_bpd": None}]}))
    long_runs = tmp / "bar.json"  # one long run, drawn on the frontier and as the learning curves
    long_runs.write_text(json.dumps({"runs": [
        {"backbone": "coupling", "beta": 0.1, "minutes": 20.0, "seed": 0, "test_acc": 0.87, "test_bpd": 3.4,
         "curve": [{"images": 64 * i, "seconds": 1.0, "val_bpd": 3.4 + 1 / i} for i in (1, 2, 3)]}]}))
    spread = tmp / "spread.json"  # a committed spread the run cannot match (accuracy 2.0) and one it matches exactly
    spread.write_text(json.dumps({"summary": [
        {"method": "mixture flow: fixed", "n_seeds": 3, "accuracy_mean": 2.0, "accuracy_sd": 0.01,
         "bpd_conditional_mean": None, "bpd_conditional_sd": None},
        {"method": "mixture flow: student", "n_seeds": 3, "accuracy_mean": None, "accuracy_sd": None,
         "bpd_conditional_mean": None, "bpd_conditional_sd": None}]}))
    steps = report.plan("digits", "smoke", reports_dir=tmp / "reports", figures_dir=tmp / "figures",
                        runs_dir=tmp / "runs", ablation_json="", baselines="fast", frontier_json=frontier,
                        long_runs_json=long_runs, spread_json=spread)
    lines: list[str] = []
    summary = report.run_report(steps, echo=lines.append)
    return steps, summary, lines, tmp
