"""Calibration of p(y|x): reliability bins (the ECE's own bins), temperature scaling fitted by NLL, the diagram."""

import json
import math

import pytest
import torch
from matplotlib.figure import Figure

from mixflow_core.eval.metrics import (
    accuracy,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from mixflow_core.study.plotting import fig_reliability


def log(values) -> torch.Tensor:
    return torch.log(torch.tensor(values, dtype=torch.float64))


def tempered(true_t: float, n: int = 20000, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ 3 N(0, 1) and labels drawn from softmax(z / true_t): the calibrated temperature is true_t."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / true_t, 1), 1, generator=gen).squeeze(1)
    return z, y


def nll(z: torch.Tensor, y: torch.Tensor, t: float) -> float:
    return float(-torch.log_softmax(z / t, 1).gather(1, y[:, None]).mean())


# -- reliability bins ---------------------------------------------------------------------------------


def test_reliability_bins_by_hand():
    """Two at confidence 0.9 (one right), two at 0.7 (both right), in 5 bins: bins 4 and 3."""
    table = log([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.3, 0.7]])
    y = torch.tensor([0, 0, 0, 1])
    b = reliability_bins(table, y, n_bins=5)
    assert b["n_bins"] == 5 and b["n"] == 4
    assert b["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert b["counts"] == [0, 0, 0, 2, 2]
    assert b["accuracy"] == [None, None, None, 1.0, 0.5]
    assert b["confidence"][:3] == [None] * 3 and b["confidence"][3:] == pytest.approx([0.7, 0.9])
    assert b["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.4, abs=1e-12)
    json.dumps(b)  # JSON-ready


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_reliability_bins_sum_to_the_ece(n_bins):
    """sum_b count_b / N |acc_b - conf_b| is expected_calibration_error's value; counts cover every example."""
    gen = torch.Generator().manual_seed(1)
    table = 4 * torch.randn(500, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (500,), generator=gen)
    log_py = log([0.1, 0.2, 0.3, 0.4])
    b = reliability_bins(table, y, log_py, n_bins=n_bins)
    assert sum(b["counts"]) == 500 and len(b["counts"]) == n_bins
    by_hand = sum(c / 500 * abs(a - conf) for c, a, conf in zip(b["counts"], b["accuracy"], b["confidence"]) if c)
    assert by_hand == pytest.approx(expected_calibration_error(table, y, log_py, n_bins=n_bins), abs=1e-12)
    assert b["ece"] == expected_calibration_error(table, y, log_py, n_bins=n_bins)
    # the bins' accuracies, weighted by their counts, are the accuracy
    right = sum(c * a for c, a in zip(b["counts"], b["accuracy"]) if c)
    assert right / 500 == pytest.approx(accuracy(table, y, log_py), abs=1e-12)
    for lo, hi, conf in zip(b["edges"], b["edges"][1:], b["confidence"]):
        assert conf is None or lo - 1e-12 <= conf <= hi + 1e-12


def test_reliability_bins_table_or_log_posteriors():
    """(log p(x|k), log p(k)) and the log posteriors alone (log_py None, or zeros) give the same bins."""
    gen = torch.Generator().manual_seed(2)
    table = 2 * torch.randn(50, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    log_py = log([0.5, 0.3, 0.2])
    log_post = torch.log_softmax(table + log_py, 1)
    a, b = reliability_bins(table, y, log_py), reliability_bins(log_post, y)
    c = reliability_bins(log_post, y, torch.zeros(3, dtype=torch.float64))
    for other in (b, c):
        assert other["counts"] == a["counts"] and other["ece"] == pytest.approx(a["ece"], abs=1e-12)


@pytest.mark.parametrize("what", ["1-d table", "one class", "label shape", "label range", "prior shape", "n_bins"])
def test_reliability_bins_rejects(what):
    table, y, log_py, n_bins = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), torch.zeros(3), 15
    if what == "1-d table":
        table = torch.zeros(4)
    elif what == "one class":
        table, y, log_py = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(1)
    elif what == "label shape":
        y = torch.tensor([0, 1, 2])
    elif what == "label range":
        y = torch.tensor([0, 1, 3, 0])
    elif what == "prior shape":
        log_py = torch.zeros(4)
    else:
        n_bins = 0
    with pytest.raises(ValueError):
        reliability_bins(table, y, log_py, n_bins=n_bins)


# -- temperature scaling ------------------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_the_generating_temperature(true_t):
    z, y = tempered(true_t)
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_minimises_the_nll():
    z, y = tempered(2.0, n=3000, seed=3)
    t = fit_temperature(z, y)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert nll(z, y, t) <= nll(z, y, t * factor)


def test_fit_temperature_of_the_table_with_its_prior():
    """T scales log p(x|k) + log p(k) together: the table with a prior fits the same T as the joint logits."""
    z, y = tempered(2.0, n=5000, seed=4)
    log_py = log([0.1, 0.2, 0.3, 0.15, 0.25])
    assert fit_temperature(z - log_py, y, log_py) == pytest.approx(fit_temperature(z, y), rel=1e-9)
    # a per-row shift (log p(x), the same for every class) changes nothing
    shift = 1000 * torch.randn(5000, 1, dtype=torch.float64)
    assert fit_temperature(z + shift, y) == pytest.approx(fit_temperature(z, y), rel=1e-6)


def test_fit_temperature_stops_at_the_bounds():
    z = torch.tensor([[10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    assert fit_temperature(z, torch.tensor([0, 1]), bounds=(0.1, 10.0)) == 0.1  # all right: sharper is always better
    assert fit_temperature(z, torch.tensor([1, 0]), bounds=(0.1, 10.0)) == 10.0  # all wrong: as flat as allowed


def test_temperature_one_changes_nothing():
    gen = torch.Generator().manual_seed(5)
    table = 5 * torch.randn(40, 4, generator=gen, dtype=torch.float64)
    log_py = log([0.4, 0.3, 0.2, 0.1])
    cal = apply_temperature(table, 1.0, log_py)
    assert torch.allclose(cal.exp(), torch.softmax(table + log_py, 1), rtol=0, atol=1e-14)
    assert torch.allclose(cal.exp().sum(1), torch.ones(40, dtype=torch.float64))


def test_temperature_scaling_keeps_the_argmax_and_lowers_the_ece():
    z, y = tempered(2.0)  # the logits are over-confident by a factor 2
    t = fit_temperature(z, y)
    cal = apply_temperature(z, t)
    assert torch.equal(cal.argmax(1), z.argmax(1))
    zeros = torch.zeros(5, dtype=torch.float64)
    assert accuracy(cal, y, zeros) == accuracy(z, y, zeros)
    before, after = expected_calibration_error(z, y), expected_calibration_error(cal, y)
    assert after < before / 4, (before, after)
    for other_t in (0.3, 7.0):  # argmax never changes, whatever T > 0
        assert torch.equal(apply_temperature(z, other_t).argmax(1), z.argmax(1))


@pytest.mark.parametrize("t", [0.0, -1.0, math.inf, math.nan, True, "2"])
def test_apply_temperature_rejects_bad_temperatures(t):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.zeros(3, 2), t)


@pytest.mark.parametrize("what", ["label shape", "prior shape", "nan", "bounds", "empty"])
def test_fit_temperature_rejects(what):
    z, y, log_py, bounds = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), None, (1e-3, 1e4)
    if what == "label shape":
        y = y[:5]
    elif what == "prior shape":
        log_py = torch.zeros(2)
    elif what == "nan":
        z[2, 1] = math.nan
    elif what == "bounds":
        bounds = (2.0, 1.0)
    else:
        z, y = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError):
        fit_temperature(z, y, log_py, bounds=bounds)


def test_apply_temperature_rejects_mismatched_prior():
    with pytest.raises(ValueError, match="log_py"):
        apply_temperature(torch.zeros(3, 2), 2.0, torch.zeros(3))


# -- the reliability diagram ------------------------------------------------------------------------------


def test_fig_reliability_draws_every_model_with_its_ece():
    z, y = tempered(2.0, n=2000)
    bins = {"flow": reliability_bins(z, y), "flow, T fitted": reliability_bins(apply_temperature(z, 2.0), y)}
    fig = fig_reliability(bins, title="digits")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # reliability panel above, counts below
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for name, b in bins.items():
        assert any(name in lab and f"{b['ece']:.3f}" in lab for lab in labels), labels
    # the counts panel holds every model's counts
    heights = sorted(round(p.get_height()) for p in fig.axes[1].patches)
    assert heights == sorted(c for b in bins.values() for c in b["counts"])
    fig_reliability({"one": bins["flow"]})  # one model works too


def test_fig_reliability_rejects_no_models():
    with pytest.raises(ValueError):
        fig_reliability({})
