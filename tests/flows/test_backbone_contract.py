"""The backbone contract, per family (zuko's style: one parametrised test per property, every family a case).

For each backbone family (i-ResNet, coupling) on vectors and on images, through build_model:
(a) every parameter gets a gradient from the training loss;
(b) decode(latent(x)) = x in the flow's input space (preprocessing without noise);
(c) the flow's log-det is log|det J| from jacrev (float64, small dims; the i-ResNet with its exact estimator);
(d) two fit steps lower nothing unexpectedly, save a checkpoint, and a resume continues to the same weights as an
    uninterrupted run;
and the backbone hooks say what they should: exact_logdet, training_state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from torch.utils.data import TensorDataset

from mixflow_core import MLP, Conv, CouplingConv, CouplingMLP, Exact, ModelConfig, PriorConfig, build_model
from mixflow_core.data import Splits
from mixflow_core.flows.objectives import Hybrid
from mixflow_core.training.checkpoint import load_checkpoint
from mixflow_core.training.config import RuntimeConfig, TrainConfig
from mixflow_core.training.fit import fit
from tests.helpers import exact_flow_logdet


@dataclass(frozen=True)
class Backbone:
    id: str
    cfg: ModelConfig
    shape: tuple[int, ...]
    inverse_atol: float


BACKBONES = [
    Backbone("iresnet_vector", ModelConfig(arch=MLP(hidden=(8,), n_blocks=2), eval_logdet=Exact(),
                                           inverse_tol=1e-11, inverse_max_iter=500), (4,), 1e-8),
    Backbone("iresnet_image", ModelConfig(arch=Conv(channels=3, n_blocks=1, n_scales=2), eval_logdet=Exact(),
                                          inverse_tol=1e-11, inverse_max_iter=500), (1, 4, 4), 1e-8),
    Backbone("coupling_vector", ModelConfig(arch=CouplingMLP(hidden=(8,), n_steps=3)), (4,), 1e-10),
    Backbone("coupling_image", ModelConfig(arch=CouplingConv(channels=4, n_steps=2, n_scales=2)), (1, 4, 4), 1e-10),
    Backbone("coupling_image_factor_out",
             ModelConfig(arch=CouplingConv(channels=4, n_steps=1, n_scales=2, factor_out=True)), (1, 4, 4), 1e-10),
]
IDS = [b.id for b in BACKBONES]
LEVELS, K = 17, 3


def _splits(shape: tuple[int, ...], n: int = 48) -> Splits:
    g = torch.Generator().manual_seed(1)

    def ds(m: int) -> TensorDataset:
        x = torch.randint(0, LEVELS, (m, *shape), generator=g)
        return TensorDataset(x, torch.arange(m) % K)

    return Splits(ds(n), ds(12), ds(12), shape, K, LEVELS, tuple(f"c{i}" for i in range(K)))


def _model(b: Backbone, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(b.shape, K, LEVELS, b.cfg, PriorConfig(init="separated", learn_means=True, learn_scales=True),
                       torch.full((K,), 16))


def _trained_a_little(b: Backbone):
    """A model after 2 fit steps (ActNorm initialised, weights away from their zero / identity init)."""
    model = _model(b)
    fit(model, _splits(b.shape), TrainConfig(batch_size=16, lr=1e-2, early_stopping="none"),
        RuntimeConfig(epochs=1, max_steps=2, progress=False))
    return model


@pytest.mark.parametrize("b", BACKBONES, ids=IDS)
def test_every_parameter_gets_a_gradient(b):
    # after 2 steps: at init a coupling net's zero last layer passes no gradient to the layers before it (by design:
    # every coupling starts as a fixed scaling), and the first step moves it
    model = _trained_a_little(b).train()
    x, y = _splits(b.shape).train.tensors
    loss = Hybrid(beta=1.0)(model.log_prob_all(x[:8]), y[:8], model.prior.log_class_probs, model.dim)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without a gradient: {missing}"


@pytest.mark.parametrize("b", BACKBONES, ids=IDS)
def test_decode_inverts_latent(b):
    model = _trained_a_little(b).eval()
    model.preprocess.dequantize = False  # h(x) deterministic: compare in the flow's input space
    x = _splits(b.shape).test.tensors[0]
    h, _ = model.preprocess(x.to(torch.float64))
    z = model.latent(x)
    back = model.flow.inverse(z.reshape(z.shape[0], *model.latent_shape))
    assert torch.allclose(back, h, atol=b.inverse_atol, rtol=0)
    assert torch.equal(model.decode(z), x.to(torch.float64))  # and back to the same integer levels


@pytest.mark.parametrize("b", BACKBONES, ids=IDS)
def test_flow_logdet_matches_jacrev(b):
    model = _trained_a_little(b).eval()
    h, _ = model.preprocess(_splits(b.shape).test.tensors[0][:3].to(torch.float64))
    logdet = model.flow(h)[1].detach()
    reference = exact_flow_logdet(model.flow, h)
    assert torch.allclose(logdet, reference, atol=1e-8, rtol=0)
    assert float(reference.abs().max()) > 1e-2


@pytest.mark.parametrize("b", BACKBONES, ids=IDS)
def test_backbone_hooks(b):
    model = _trained_a_little(b)
    assert model.exact_logdet  # both cases here evaluate exactly
    state = model.flow.training_state()
    if b.cfg.family == "coupling":
        assert state == {}  # no machinery beyond the weights
    else:
        assert state and all(k.endswith((".u", ".v")) for k in state)  # the power vectors
        assert not build_model(b.shape, K, LEVELS, replace(b.cfg, eval_logdet=None)).exact_logdet


@pytest.mark.parametrize("b", BACKBONES, ids=IDS)
def test_two_steps_and_a_resume_equal_an_uninterrupted_run(b, tmp_path):
    data = _splits(b.shape)
    train = TrainConfig(batch_size=16, lr=1e-2, early_stopping="none")
    whole = _model(b)
    fit(whole, data, train, RuntimeConfig(epochs=2, progress=False), run_dir=tmp_path / "whole")
    part = _model(b)
    history = fit(part, data, train, RuntimeConfig(epochs=2, max_steps=2, progress=False), run_dir=tmp_path / "part")
    assert history.stopped == "step budget"
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["resume_at"] == [0, 2]
    resumed = _model(b, seed=5)  # other initial weights: everything must come from the checkpoint
    fit(resumed, data, train, RuntimeConfig(epochs=2, progress=False), run_dir=tmp_path / "part", resume=True)
    for (name, a), (_, c) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, c, atol=1e-12, rtol=0), name
    assert whole.state_dict().keys() == resumed.state_dict().keys()
