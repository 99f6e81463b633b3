"""Objectives as functions of log p(x|k): likelihood, hybrid (beta), push-away (lam)."""

import math

import numpy as np
import pytest
import torch

from mixflow_core import (
    MLP, Hybrid, Likelihood, ModelConfig, PriorConfig, PushAway, build_model, hybrid, likelihood, push_away,
)
from mixflow_core.flows.config import parse_tagged, to_dict
from mixflow_core.flows.objectives import TrainingObjective

DIM = 7


def hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed (B=4, K=3) table of log p(x|k), labels and log p(k)."""
    log_px_all = torch.tensor(
        [
            [-10.0, -12.5, -30.0],
            [-8.0, -7.0, -9.5],
            [-20.0, -25.0, -15.0],
            [-3.0, -3.0, -4.0],
        ]
    )
    y = torch.tensor([0, 1, 2, 1])
    log_py = torch.log(torch.tensor([0.2, 0.3, 0.5]))
    return log_px_all, y, log_py


def hand_cross_entropy(log_px_all: torch.Tensor, y: torch.Tensor, log_py: torch.Tensor) -> float:
    """mean_i -log softmax(log p(x_i|k) + log p(k))[y_i], written out with numpy."""
    joint = (log_px_all + log_py).numpy()
    out = []
    for i, c in enumerate(y.tolist()):
        m = joint[i].max()
        log_norm = m + math.log(np.exp(joint[i] - m).sum())
        out.append(-(joint[i, c] - log_norm))
    return float(np.mean(out))


def test_likelihood_by_hand():
    log_px_all, y, log_py = hand_batch()
    want = -((-10.0) + (-7.0) + (-15.0) + (-3.0)) / 4 / DIM
    assert float(likelihood(log_px_all, y, log_py, DIM)) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 64.0])
def test_hybrid_is_likelihood_plus_beta_cross_entropy(beta):
    log_px_all, y, log_py = hand_batch()
    nll = -((-10.0) + (-7.0) + (-15.0) + (-3.0)) / 4 / DIM
    want = nll + beta * hand_cross_entropy(log_px_all, y, log_py)
    assert float(hybrid(log_px_all, y, log_py, DIM, beta=beta)) == pytest.approx(want, abs=1e-12)


def test_hybrid_cross_entropy_uses_class_prior():
    # equal likelihoods for classes 0 and 1 in row 3: only log p(k) separates them
    log_px_all, y, log_py = hand_batch()
    flat = torch.full((3,), -math.log(3))
    assert float(hybrid(log_px_all, y, log_py, DIM)) != pytest.approx(float(hybrid(log_px_all, y, flat, DIM)), abs=1e-6)


def test_hybrid_with_zero_beta_is_likelihood():
    log_px_all, y, log_py = hand_batch()
    assert torch.equal(hybrid(log_px_all, y, log_py, DIM, beta=0.0), likelihood(log_px_all, y, log_py, DIM))
    assert torch.equal(Hybrid(beta=0.0)(log_px_all, y, log_py, DIM), likelihood(log_px_all, y, log_py, DIM))


@pytest.mark.parametrize("lam", [0.05, 1.0])
def test_push_away_by_hand(lam):
    log_px_all, y, log_py = hand_batch()
    rows = [
        10.0 + lam * (-12.5 - 30.0),
        7.0 + lam * (-8.0 - 9.5),
        15.0 + lam * (-20.0 - 25.0),
        3.0 + lam * (-3.0 - 4.0),
    ]
    assert float(push_away(log_px_all, y, log_py, DIM, lam=lam)) == pytest.approx(np.mean(rows), abs=1e-12)


def test_push_away_is_unbounded_below():
    # lowering the other classes' log p(x|k) without bound lowers the loss without bound,
    # while the own-class density (and the likelihood) stay fixed
    log_px_all, y, log_py = hand_batch()
    own = torch.nn.functional.one_hot(y, 3).bool()
    losses = []
    for shift in (0.0, 1e2, 1e4, 1e6):
        shifted = torch.where(own, log_px_all, log_px_all - shift)
        losses.append(float(push_away(shifted, y, log_py, DIM)))
        assert float(likelihood(shifted, y, log_py, DIM)) == pytest.approx(float(likelihood(log_px_all, y, log_py, DIM)))
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # each row has two other classes: slope -lam * 2 per unit shift
    assert losses[-1] - losses[0] == pytest.approx(-0.05 * 2 * 1e6, rel=1e-9)
    assert losses[-1] < -1e4


def test_objectives_return_scalar_with_gradient():
    log_px_all, y, log_py = hand_batch()
    for objective in (Likelihood(), Hybrid(), PushAway()):
        leaf = log_px_all.clone().requires_grad_(True)
        loss = objective(leaf, y, log_py, DIM)
        assert loss.shape == ()
        loss.backward()
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_typed_objectives_equal_the_functions():
    log_px_all, y, log_py = hand_batch()
    args = (log_px_all, y, log_py, DIM)
    assert torch.equal(Likelihood()(*args), likelihood(*args))
    for beta in (0.5, 3.0, 64.0):
        assert torch.equal(Hybrid(beta)(*args), hybrid(*args, beta=beta))
    for lam in (0.05, 0.2, 1.0):
        assert torch.equal(PushAway(lam)(*args), push_away(*args, lam))
    # the defaults are the functions' defaults
    assert torch.equal(Hybrid()(*args), hybrid(*args))
    assert torch.equal(PushAway()(*args), push_away(*args))
    # the parameter is used, not ignored
    assert not torch.equal(Hybrid(beta=3.0)(*args), Hybrid(beta=1.0)(*args))
    assert not torch.equal(PushAway(lam=0.2)(*args), PushAway(lam=1.0)(*args))


def test_typed_objectives_reject_bad_arguments():
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        Hybrid(beta=-1)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        Hybrid(beta=-1.0)
    with pytest.raises(ValueError, match="unknown type 'nll'"):
        parse_tagged(TrainingObjective, "nll", "train.objective")


@pytest.mark.parametrize("objective", [Likelihood(), Hybrid(beta=784.0), PushAway(lam=0.2)], ids=lambda o: o.kind)
def test_typed_objectives_round_trip_as_tagged_dicts(objective):
    data = to_dict(objective)
    assert data["type"] == objective.kind
    assert parse_tagged(TrainingObjective, data, "train.objective") == objective
    assert parse_tagged(TrainingObjective, objective.kind, "train.objective") == type(objective)()  # a name: defaults


# -- a tiny end-to-end training run ------------------------------------------------------------


def two_blobs(n_per_class: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 1.0], [2.0, -1.0]])
    x = torch.cat([c + 0.6 * torch.randn(n_per_class, 2, generator=g) for c in centres])
    y = torch.arange(2).repeat_interleave(n_per_class)
    return x, y


def accuracy_of(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model.predict(x) == y).double().mean())


def test_hybrid_training_on_two_blobs_lowers_loss_and_classifies():
    x, y = two_blobs()
    # means start equal (zeros) and are learned: any class separation comes from training
    model_cfg, prior_cfg = ModelConfig(arch=MLP(hidden=(16,), n_blocks=2)), PriorConfig(init="zeros", learn_means=True)
    model = build_model((2,), 2, None, model_cfg, prior_cfg)
    assert accuracy_of(model, x, y) == 0.5  # identical components: argmax picks class 0 everywhere
    objective = Hybrid(beta=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(60):
        loss = objective(model.log_prob_all(x), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert accuracy_of(model, x, y) > 0.9
