"""Metrics from the (N, K) table of log p(x|k): accuracy, bits/dim, ECE, confusion; evaluate(model, data)."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mixflow_core import MLP, Exact, ModelConfig, PowerSeries, PriorConfig, build_model
from mixflow_core.eval.metrics import (
    accuracy,
    bits_per_dim,
    confusion_matrix,
    evaluate,
    expected_calibration_error,
    log_likelihood_table,
    over_dataset,
)

LN2 = math.log(2.0)


def log(values) -> torch.Tensor:
    return torch.log(torch.tensor(values, dtype=torch.float64))


def posterior_table(probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A table whose posterior p(k|x) is `probs` under a uniform class prior."""
    k = len(probs[0])
    return log(probs), torch.full((k,), -math.log(k), dtype=torch.float64)


# -- accuracy -----------------------------------------------------------------------------------


def test_accuracy_by_hand():
    table = log([[0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    uniform = torch.full((3,), -math.log(3))
    y = torch.tensor([0, 2, 2, 1])  # predictions 0, 2, 1, 0: two right
    assert accuracy(table, y, uniform) == 0.5


def test_accuracy_uses_bayes_rule():
    """p(x|0) = 0.3 < p(x|1) = 0.4, but p(0) = 0.9: p(0|x) ∝ 0.27 > 0.04, so class 0 wins."""
    table = log([[0.3, 0.4]])
    y = torch.tensor([0])
    assert accuracy(table, y, log([0.5, 0.5])) == 0.0
    assert accuracy(table, y, log([0.9, 0.1])) == 1.0


# -- bits per dimension ---------------------------------------------------------------------------


def test_bits_per_dim_conditional_by_hand():
    dim = 4
    table = torch.tensor([[-10.0, -20.0], [-30.0, -5.0], [-8.0, -9.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    expected = (10.0 + 30.0 + 9.0) / 3 / (dim * LN2)
    assert bits_per_dim(table, y, log([0.5, 0.5]), dim) == pytest.approx(expected, rel=1e-14)
    # the class prior plays no part in the conditional
    assert bits_per_dim(table, y, log([0.9, 0.1]), dim) == pytest.approx(expected, rel=1e-14)


def test_bits_per_dim_marginal_by_hand():
    """p(x) = sum_k p(x|k) p(k): rows (0.5, 0.25) and (0.125, 0.5) with p(k) = (0.75, 0.25)."""
    dim = 2
    table = log([[0.5, 0.25], [0.125, 0.5]])
    log_py = log([0.75, 0.25])
    p_x = [0.75 * 0.5 + 0.25 * 0.25, 0.75 * 0.125 + 0.25 * 0.5]  # 0.4375, 0.21875
    expected = -np.mean(np.log2(p_x)) / dim
    assert bits_per_dim(table, None, log_py, dim) == pytest.approx(expected, rel=1e-14)


def test_bits_per_dim_of_a_uniform_density():
    """log p = -D log L for every class: exactly log2(L) bits per dimension, either way."""
    dim, levels = 64, 17
    table = torch.full((5, 3), -dim * math.log(levels), dtype=torch.float64)
    log_py = log([0.2, 0.3, 0.5])
    y = torch.tensor([0, 1, 2, 0, 1])
    assert bits_per_dim(table, y, log_py, dim) == pytest.approx(math.log2(levels), rel=1e-14)
    assert bits_per_dim(table, None, log_py, dim) == pytest.approx(math.log2(levels), rel=1e-14)


def test_marginal_bits_stable_for_very_small_densities():
    table = torch.tensor([[-5000.0, -5001.0]], dtype=torch.float64)  # exp underflows; logsumexp must not
    log_py = log([0.5, 0.5])
    expected = -(-5000.0 + math.log(0.5 * (1 + math.exp(-1.0)))) / (3 * LN2)
    assert bits_per_dim(table, None, log_py, 3) == pytest.approx(expected, rel=1e-14)


# -- expected calibration error ---------------------------------------------------------------------


def test_ece_zero_when_confidence_matches_accuracy():
    """Every confidence 0.8 and 8 of 10 right: |0.8 - 0.8| = 0."""
    table, log_py = posterior_table([[0.8, 0.2]] * 10)
    y = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(table, y, log_py) == pytest.approx(0.0, abs=1e-12)


def test_ece_half_when_certain_and_half_right():
    """Confidence 1.0 (clamped into the last bin), 50% right: ECE = 0.5."""
    table = torch.tensor([[0.0, -1000.0]] * 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    assert expected_calibration_error(table, y, log([0.5, 0.5])) == pytest.approx(0.5, abs=1e-12)


def test_ece_two_bins_by_hand():
    """Four at confidence 0.9, all right (gap 0.1); four at 0.6, two right (gap 0.1): 0.5 * 0.1 + 0.5 * 0.1."""
    table, log_py = posterior_table([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    assert expected_calibration_error(table, y, log_py) == pytest.approx(0.1, abs=1e-12)


def test_ece_gaps_of_different_bins_do_not_cancel():
    """Over-confident bin (0.9, half right: gap 0.4), under-confident bin (0.6, all right: gap 0.4)."""
    table, log_py = posterior_table([[0.9, 0.1]] * 2 + [[0.6, 0.4]] * 2)
    y = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(table, y, log_py) == pytest.approx(0.4, abs=1e-12)
    # a single bin averages the over- and under-confidence first: |0.75 - 0.75| = 0
    assert expected_calibration_error(table, y, log_py, n_bins=1) == pytest.approx(0.0, abs=1e-12)


def test_ece_within_unit_interval_on_random_tables():
    gen = torch.Generator().manual_seed(0)
    table = 3 * torch.randn(200, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (200,), generator=gen)
    ece = expected_calibration_error(table, y, torch.full((4,), -math.log(4), dtype=torch.float64))
    assert 0.0 <= ece <= 1.0


# -- confusion matrix ----------------------------------------------------------------------------------


def test_confusion_matrix_by_hand():
    table = log([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    uniform = torch.full((3,), -math.log(3))
    y = torch.tensor([0, 0, 1, 1, 2])  # predictions 0, 2, 1, 0, 2
    expected = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1]])
    cm = confusion_matrix(table, y, uniform)
    assert torch.equal(cm, expected)
    assert cm.trace() / cm.sum() == accuracy(table, y, uniform)


def test_confusion_matrix_keeps_absent_classes():
    table = log([[0.9, 0.05, 0.05]] * 3)
    cm = confusion_matrix(table, torch.tensor([0, 0, 0]), log([1 / 3] * 3))
    assert cm.shape == (3, 3) and cm[0, 0] == 3 and cm.sum() == 3


# -- evaluate on a model -----------------------------------------------------------------------------


def tiny_model(dequantize: bool = False, logdet: str = "power_series"):
    """A 6-D, 17-level, 3-class MLP i-ResNet (ActNorm initialised), and a small labelled dataset.

    logdet names the eval-mode estimator: "exact", or "power_series" (a 10-term series, stochastic).
    """
    torch.manual_seed(0)
    eval_logdet = {"exact": Exact(), "power_series": PowerSeries(n_terms=10)}[logdet]
    cfg = ModelConfig(arch=MLP(hidden=(8,), n_blocks=2), logdet=PowerSeries(n_terms=3), dequantize=dequantize,
                      eval_logdet=eval_logdet)
    model = build_model((6,), 3, 17, cfg, PriorConfig(radius=1.0), class_counts=torch.tensor([5, 7, 11]))
    x = torch.randint(0, 17, (23, 6), dtype=torch.uint8)
    y = torch.randint(0, 3, (23,))
    model.train()
    with torch.no_grad():
        model.log_prob_all(x)
    return model, TensorDataset(x, y)


def test_evaluate_equals_the_metric_functions():
    model, data = tiny_model(dequantize=False, logdet="exact")
    result = evaluate(model, data, batch_size=5)  # several batches
    table, y = log_likelihood_table(model, data, batch_size=23)
    assert table.shape == (23, 3) and torch.equal(y, data.tensors[1])
    log_py = model.prior.log_class_probs
    assert result["n"] == 23
    assert result["accuracy"] == accuracy(table, y, log_py)
    assert result["bpd_conditional"] == pytest.approx(bits_per_dim(table, y, log_py, 6), rel=1e-12)
    assert result["bpd_marginal"] == pytest.approx(bits_per_dim(table, None, log_py, 6), rel=1e-12)
    assert result["ece"] == pytest.approx(expected_calibration_error(table, y, log_py), abs=1e-12)
    assert result["confusion"] == confusion_matrix(table, y, log_py).tolist()
    cm = torch.tensor(result["confusion"])
    assert int(cm.sum()) == 23
    assert cm.sum(1).tolist() == torch.bincount(y, minlength=3).tolist()  # rows are the true classes
    assert float(cm.trace()) / 23 == pytest.approx(result["accuracy"])
    json.dumps(result)  # JSON-ready


def test_evaluate_matches_model_densities():
    """Deterministic model (bin midpoints, exact log-det): evaluate's bpd is the model's own."""
    model, data = tiny_model(dequantize=False, logdet="exact")
    result = evaluate(model, data)
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        assert result["bpd_conditional"] == pytest.approx(float(model.bits_per_dim(x, y).mean()), rel=1e-12)
        assert result["bpd_marginal"] == pytest.approx(float(model.bits_per_dim(x).mean()), rel=1e-12)
        assert result["accuracy"] == pytest.approx(float((model.predict(x) == y).double().mean()))
    assert model.training is False  # evaluate restores the mode it found (eval here)


def test_log_likelihood_table_restores_training_mode():
    model, data = tiny_model()
    model.train()
    log_likelihood_table(model, data)
    assert model.training


def test_evaluate_with_dequantisation_is_reproducible_from_the_seed():
    model, data = tiny_model(dequantize=True)
    torch.manual_seed(3)
    a = evaluate(model, data)
    torch.manual_seed(3)
    b = evaluate(model, data)
    torch.manual_seed(4)
    c = evaluate(model, data)
    assert a == b
    assert a["bpd_conditional"] != c["bpd_conditional"]


# -- several dequantisation draws (importance-weighted) -------------------------------------------


def test_draws_average_probabilities_over_dequantisation_noise():
    """log (1/S) sum_s p(x + u_s | k), with exactly the noise S single-draw passes would use, and >= their mean log."""
    model, data = tiny_model(dequantize=True, logdet="exact")
    torch.manual_seed(3)
    iw, y = log_likelihood_table(model, data, batch_size=50, draws=4)
    torch.manual_seed(3)  # the same noise: one batch, four single-draw passes in order, through the same loader
    singles, _ = over_dataset(model, data, lambda x: torch.stack([model.log_prob_all(x) for _ in range(4)], 1), 50)
    singles = singles.transpose(0, 1)  # (S, N, K)
    assert torch.allclose(iw, torch.logsumexp(singles, 0) - math.log(4), rtol=0, atol=1e-5)  # float32 model
    assert (iw >= singles.mean(0) - 1e-12).all()  # Jensen: never below the average of single draws
    assert not torch.allclose(singles[0], singles[1])  # the draws differ
    torch.manual_seed(3)
    assert evaluate(model, data, batch_size=50, draws=4)["draws"] == 4


def test_draws_without_noise_or_with_a_series_estimator():
    model, data = tiny_model(dequantize=False, logdet="exact")
    one, _ = log_likelihood_table(model, data)
    many, _ = log_likelihood_table(model, data, draws=8)
    assert torch.equal(one, many) and evaluate(model, data, draws=8)["draws"] == 1  # nothing to average
    noisy_logdet, data = tiny_model(dequantize=True, logdet="power_series")
    with pytest.raises(ValueError, match="exact evaluation log-det"):
        log_likelihood_table(noisy_logdet, data, draws=2)
    with pytest.raises(ValueError, match="draws must be"):
        log_likelihood_table(model, data, draws=0)
