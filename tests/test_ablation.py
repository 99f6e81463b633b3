"""The seed configuration really is the student's, and the ablation runner writes every row."""

import json

import pytest
import torch

from mixflow_core import ActNorm, PowerSeries, ResidualBlock, build_model
from mixflow_core.__main__ import main
from mixflow_core.ablation import SEED_OVERRIDES, ablate, seed_config, variants
from mixflow_core.data import load_data
from mixflow_core.profiles import apply_overrides, get_profile
from mixflow_core.train import _optimizer

METRICS = ("accuracy", "bpd_conditional", "ece", "mean_dist_min_sigma", "mean_dist_median_sigma",
           "bhattacharyya_mean", "nearer_other_fraction")


def _flat(cfg) -> dict:
    return {f"{section}.{k}": v for section, fields in cfg.to_dict().items() for k, v in fields.items()}


def test_seed_config_has_the_students_properties() -> None:
    cfg = seed_config(get_profile("digits", "default"))
    data = load_data(get_profile("digits", "smoke").data)
    model = build_model(data.data_shape, 10, 17, cfg.model, cfg.prior, data.class_counts())
    # uniform [0, 1) means and log-std, both learned
    prior = model.prior
    assert isinstance(prior.means, torch.nn.Parameter) and isinstance(prior.log_scales, torch.nn.Parameter)
    for t in (prior.means.detach(), prior.log_scales.detach()):
        assert 0 <= float(t.min()) and float(t.max()) < 1 and float(t.std()) > 0.1
    # weight decay 5e-4 on every parameter, the prior's included, lr 0.01
    groups = {g["name"]: g for g in _optimizer(model, cfg.train).param_groups}
    assert groups["prior"]["weight_decay"] == 5e-4 and groups["flow"]["weight_decay"] == 5e-4
    assert groups["prior"]["lr"] == groups["flow"]["lr"] == 0.01
    assert {id(p) for p in groups["prior"]["params"]} == {id(prior.means), id(prior.log_scales)}
    # a 1-term log-det series, no ActNorm, no dequantisation noise
    blocks = [m for m in model.flow.layers if isinstance(m, ResidualBlock)]
    assert blocks and all(b.logdet == PowerSeries(n_terms=1) for b in blocks)
    assert not any(isinstance(m, ActNorm) for m in model.flow.layers)
    assert model.preprocess.dequantize is False
    # push-away loss with lambda 0.05, no cross-entropy
    assert cfg.train.objective == "push_away" and cfg.train.push_lambda == 0.05


def test_each_variant_changes_exactly_its_factor() -> None:
    base = get_profile("digits", "default")
    seed = _flat(seed_config(base))
    assert {k: seed[k] for k in SEED_OVERRIDES} == SEED_OVERRIDES
    for v in variants(64):
        if v.combined or not v.overrides:
            continue
        variant = _flat(apply_overrides(seed_config(base), v.overrides))
        changed = {k for k, val in seed.items() if val != variant[k]}
        assert changed and changed <= set(v.overrides), (v.name, changed)


def test_ablation_runs_every_variant_and_resumes(tmp_path) -> None:
    base = get_profile("digits", "smoke")
    rows = ablate(base, tmp_path, seeds=(0,), epochs=1)
    names = [v.name for v in variants(64)]
    assert [r["variant"] for r in rows] == names
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["meta"]["seed_overrides"] == SEED_OVERRIDES and len(saved["rows"]) == len(names)
    for row in rows:
        assert row["status"] in ("completed", "diverged")
        if row["status"] == "completed":
            assert all(row[k] is None or isinstance(row[k], float) for k in METRICS)
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["nearer_other_fraction"] <= 1
    table = (tmp_path / "ablation.md").read_text()
    assert all(name in table for name in names)
    # same seed and budget: the seed row's configuration differs from each variant's only in that variant's fields
    assert rows[0]["config"]["train"]["epochs"] == rows[-1]["config"]["train"]["epochs"] == 1
    again = ablate(base, tmp_path, seeds=(0,), epochs=1)  # nothing left to do: rows come back unchanged
    assert again == rows
    # the profile changes (as the combined fix's does when a profile is retuned): only its row is run again,
    # in place; the seed and the one-factor rows are derived by overrides that fix those fields, so they stay
    # (a beta the seed's push-away loss does not use does not make its rows stale either)
    changed = apply_overrides(base, {"prior.init": "moments", "prior.learn_scales": True, "train.beta": 3.0})
    third = ablate(changed, tmp_path, seeds=(0,), epochs=1)
    assert [r["variant"] for r in third] == names
    assert third[:-1] == rows[:-1]
    assert third[-1]["config"]["prior"]["init"] == "moments" and rows[-1]["config"]["prior"]["init"] == "separated"
    assert third[0]["config"]["train"]["beta"] != 3.0  # the seed row kept its saved config (its beta unused)


def test_ablate_command_line(tmp_path, capsys) -> None:
    out = tmp_path / "abl"
    assert main(["ablate", "--dataset", "digits", "--profile", "smoke", "--epochs", "1", "--out", str(out),
                 "--only", "seed", "ActNorm"]) == 0
    printed = capsys.readouterr().out
    assert "| seed |" in printed and "| ActNorm |" in printed and str(out / "ablation.json") in printed
    assert [r["variant"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == ["seed", "ActNorm"]
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--dataset", "digits", "--set", "train.nonsense=1", "--out", str(out)])
    assert exc.value.code == 2
