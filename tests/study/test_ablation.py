"""The student configuration really is the student's, and the ablation runner writes every row."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mixflow_core import (
    ModelConfig,
    ActNorm, Exact, Hybrid, Likelihood, PowerSeries, PushAway, ResidualBlock, RussianRoulette, build_model,
)
from mixflow_core.cli import main
from mixflow_core.data import load_data
from mixflow_core.study import ablation
from mixflow_core.study.ablation import STUDENT_OVERRIDES, ablate, read_rows, student_config, variants
from mixflow_core.training.config import RunConfig, apply_overrides, flatten
from mixflow_core.training.fit import make_optimizer
from mixflow_core.training.profiles import get_profile

ROOT = Path(__file__).resolve().parents[2]
OLD_ABLATION = ROOT / "tests" / "fixtures" / "v0_1" / "ablation-digits-default.json"  # mixflow 0.1 (variant "seed")

METRICS = ("accuracy", "bpd_conditional", "ece", "mean_dist_min_sigma", "mean_dist_median_sigma",
           "bhattacharyya_mean", "nearer_other_fraction")


def _flat(cfg) -> dict:
    """Every leaf of the config by dotted name (tagged values included: model.logdet.n_terms, ...)."""
    return flatten(cfg.to_dict())


def _lookup(cfg, key: str):
    """The (possibly tagged, dict-valued) field of cfg.to_dict() at a dotted override key."""
    node = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def _under(leaf: str, keys) -> bool:
    """Whether a dotted leaf is one of `keys` or inside one (model.logdet.n_terms is under model.logdet)."""
    return any(leaf == k or leaf.startswith(k + ".") for k in keys)


def test_student_config_has_the_students_properties() -> None:
    cfg = student_config(get_profile("digits", "default"))
    assert cfg.prior.init == "student"
    data = load_data(get_profile("digits", "smoke").data)
    model = build_model(data.data_shape, 10, 17, cfg.model, cfg.prior, data.class_counts())
    # uniform [0, 1) means and log-std, both learned
    prior = model.prior
    assert isinstance(prior.means, torch.nn.Parameter) and isinstance(prior.log_scales, torch.nn.Parameter)
    for t in (prior.means.detach(), prior.log_scales.detach()):
        assert 0 <= float(t.min()) and float(t.max()) < 1 and float(t.std()) > 0.1
    # weight decay 5e-4 on every parameter, the prior's included, lr 0.01
    groups = {g["name"]: g for g in make_optimizer(model, cfg.train).param_groups}
    assert groups["prior"]["weight_decay"] == 5e-4 and groups["flow"]["weight_decay"] == 5e-4
    assert groups["prior"]["lr"] == groups["flow"]["lr"] == 0.01
    assert {id(p) for p in groups["prior"]["params"]} == {id(prior.means), id(prior.log_scales)}
    # a 1-term log-det series, no ActNorm, no dequantisation noise
    blocks = [m for m in model.flow.layers if isinstance(m, ResidualBlock)]
    assert blocks and all(b.logdet == PowerSeries(n_terms=1) for b in blocks)
    assert not any(isinstance(m, ActNorm) for m in model.flow.layers)
    assert model.preprocess.dequantize is False
    # push-away loss with lambda 0.05, no cross-entropy
    assert cfg.train.objective == PushAway(lam=0.05)


def test_each_variant_changes_exactly_its_factor() -> None:
    base = get_profile("digits", "default")
    student = student_config(base)
    for key, value in STUDENT_OVERRIDES.items():  # every override holds in the student configuration
        got = _lookup(student, key)
        if isinstance(value, dict):  # a tagged value given by its type and some fields: the rest are defaults
            assert {k: got[k] for k in value} == value, (key, got)
        else:
            assert got == value, (key, got)
    assert apply_overrides(student, STUDENT_OVERRIDES) == student
    flat = _flat(student)
    for v in variants(64):
        if v.combined or not v.overrides:
            continue
        variant = _flat(apply_overrides(student, v.overrides))
        changed = {k for k in set(flat) | set(variant) if flat.get(k) != variant.get(k)}
        assert changed and all(_under(k, v.overrides) for k in changed), (v.name, changed)


def test_ablation_runs_every_variant_and_resumes(tmp_path) -> None:
    base = get_profile("digits", "smoke")
    rows = ablate(base, tmp_path, seeds=(0,), epochs=1)
    names = [v.name for v in variants(64)]
    assert [r["variant"] for r in rows] == names
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["meta"]["student_overrides"] == STUDENT_OVERRIDES and len(saved["rows"]) == len(names)
    for row in rows:
        assert row["status"] in ("completed", "diverged")
        if row["status"] == "completed":
            assert all(row[k] is None or isinstance(row[k], float) for k in METRICS)
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["nearer_other_fraction"] <= 1
    table = (tmp_path / "ablation.md").read_text()
    assert all(name in table for name in names)
    # same seed and budget: the student row's configuration differs from each variant's only in that variant's fields
    assert rows[0]["config"]["runtime"]["epochs"] == rows[-1]["config"]["runtime"]["epochs"] == 1
    assert rows[0]["config"]["train"]["seed"] == rows[-1]["config"]["train"]["seed"] == 0
    again = ablate(base, tmp_path, seeds=(0,), epochs=1)  # nothing left to do: rows come back unchanged
    assert again == rows
    # the profile changes (as the combined fix's does when a profile is retuned): only its row is run again,
    # in place; the student and the one-factor rows are derived by overrides that fix those fields, so they stay
    # (the base's hybrid beta does not reach them either: the student's objective is push-away, whole)
    changed = apply_overrides(base, {"prior.init": "moments", "prior.learn_scales": True,
                                     "train.objective.beta": 3.0})
    third = ablate(changed, tmp_path, seeds=(0,), epochs=1)
    assert [r["variant"] for r in third] == names
    assert third[:-1] == rows[:-1]
    assert third[-1]["config"]["prior"]["init"] == "moments" and rows[-1]["config"]["prior"]["init"] == "separated"
    assert third[-1]["config"]["train"]["objective"] == {"type": "hybrid", "beta": 3.0}
    # the student row kept its saved config (push-away, no beta)
    assert third[0]["config"]["train"]["objective"] == {"type": "push_away", "lam": 0.05}


def test_ablate_command_line(tmp_path, capsys) -> None:
    out = tmp_path / "abl"
    assert main(["ablate", "--dataset", "digits", "--profile", "smoke", "--epochs", "1", "--out", str(out),
                 "--only", "student", "ActNorm"]) == 0
    printed = capsys.readouterr().out
    assert "| student |" in printed and "| ActNorm |" in printed and str(out / "ablation.json") in printed
    assert [r["variant"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == ["student", "ActNorm"]
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--dataset", "digits", "--set", "train.nonsense=1", "--out", str(out)])
    assert exc.value.code == 2


def test_an_ablation_written_by_mixflow_0_1_still_loads(tmp_path, monkeypatch) -> None:
    """An ablation.json of mixflow 0.1 (variant "seed", flat configs) reads as today's rows and configs."""
    old = json.loads(OLD_ABLATION.read_text())
    assert old["rows"][0]["variant"] == "seed" and "n_terms" in old["rows"][0]["config"]["model"]  # the old format
    rows = read_rows(OLD_ABLATION)
    names = [v.name for v in variants(64)]
    assert len(rows) == len(old["rows"]) and {r["variant"] for r in rows} == set(names)
    assert [r["variant"] for r in rows[:len(names)]] == names  # seed 0 in table order, "seed" now "student"
    meta = old["meta"]
    base = RunConfig.from_dict(meta["base"])  # the profile the old ablation ran on, in today's shape
    by_name = {v.name: v for v in variants(64)}
    for row in rows:
        cfg = RunConfig.from_dict(row["config"])
        # exactly what today's ablation runs for this (variant, seed) on the same base and budget
        v = by_name[row["variant"]]
        today = base if v.combined else apply_overrides(student_config(base), v.overrides)
        today = ablation._budget(today, meta["epochs"], meta["max_minutes"], row["seed"])
        assert cfg == today, (row["variant"], row["seed"])
        assert cfg.runtime.epochs == 25 and cfg.train.early_stopping == "none" and cfg.model.eval_logdet == Exact()
    student = [RunConfig.from_dict(r["config"]) for r in rows if r["variant"] == "student"]
    assert len(student) == len(meta["seeds"]) == 3
    for cfg in student:
        assert cfg.prior.init == "student" and cfg.prior.learn_means and cfg.prior.learn_scales
        assert cfg.train.objective == PushAway(lam=0.05)
        assert cfg.train.lr == 0.01 and cfg.train.weight_decay == cfg.train.prior_weight_decay == 5e-4
        assert cfg.model.logdet == PowerSeries(n_terms=1) and not cfg.model.actnorm and not cfg.model.dequantize
    objective = {r["variant"]: RunConfig.from_dict(r["config"]).train.objective for r in rows}
    assert objective["likelihood loss"] == Likelihood()
    assert objective["hybrid loss (beta = D = 64)"] == Hybrid(beta=64.0)
    assert objective["combined fix (dataset profile)"] == Hybrid(beta=1.0)
    russian = [RunConfig.from_dict(r["config"]) for r in rows if r["variant"] == "log-det Russian roulette"][0]
    assert russian.model.logdet == RussianRoulette(n_exact_terms=2)
    # so rerunning that ablation over the old file has nothing to do: every row is recognised as done
    shutil.copy(OLD_ABLATION, tmp_path / "ablation.json")

    def no_training(*args, **kwargs):
        raise AssertionError("ablate reran a row that the old ablation.json already holds")

    monkeypatch.setattr(ablation, "_run_one", no_training)
    again = ablate(base, tmp_path, seeds=tuple(meta["seeds"]), epochs=meta["epochs"], max_minutes=meta["max_minutes"])
    assert again == rows


def test_the_backbone_is_a_factor_of_the_ablation(tmp_path) -> None:
    """With the other family's profile, the ablation adds the student on its architecture (only the model's
    architecture and the i-ResNet-only fields differ from the student row) and that profile itself, at equal steps."""
    base, other = get_profile("digits", "smoke", "iresnet"), get_profile("digits", "smoke", "coupling")
    names = [v.name for v in variants(64, "coupling")]
    assert names[-3:] == ["backbone: coupling", "combined fix (dataset profile)",
                          "combined fix, coupling backbone (its profile)"]
    rows = ablate(base, tmp_path, seeds=(0,), epochs=1, max_steps=3, other=other,
                  only=("student", "backbone: coupling", "combined fix, coupling backbone (its profile)"))
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == ["student", "backbone: coupling", "combined fix, coupling backbone (its profile)"]
    assert all(r["status"] == "step budget" and r["steps"] == 3 for r in rows)  # equal optimiser steps
    student, coupled = (RunConfig.from_dict(by[n]["config"]) for n in ("student", "backbone: coupling"))
    assert coupled.model.family == "coupling" and coupled.model.arch == other.model.arch
    assert (coupled.data, coupled.prior, coupled.train, coupled.runtime) == \
        (student.data, student.prior, student.train, student.runtime)  # the student's choices, all kept
    assert not coupled.model.actnorm and not coupled.model.dequantize
    assert coupled.model.logdet == ModelConfig().logdet  # the i-ResNet-only series has no meaning there
    fixed = RunConfig.from_dict(by["combined fix, coupling backbone (its profile)"]["config"])
    assert fixed.model == other.model.unbiased_eval() and fixed.prior == other.prior
    assert fixed.train.objective == other.train.objective
    with pytest.raises(ValueError, match="other backbone family"):
        ablate(base, tmp_path, other=base)


def test_ablate_command_line_adds_the_other_backbone(tmp_path, capsys) -> None:
    out = tmp_path / "abl"
    assert main(["ablate", "--dataset", "digits", "--profile", "smoke", "--epochs", "1", "--max-steps", "2",
                 "--out", str(out), "--only", "backbone: coupling"]) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["backbone: coupling"]
    assert rows[0]["config"]["model"]["arch"]["type"] == "coupling_mlp" and rows[0]["steps"] == 2
    none = tmp_path / "none"
    assert main(["ablate", "--dataset", "digits", "--profile", "smoke", "--epochs", "1", "--out", str(none),
                 "--only", "backbone: coupling", "--no-backbone-factor"]) == 0
    assert not (none / "ablation.json").exists()  # no variant left to run: nothing trained, nothing written


def test_ablate_builds_the_student_on_the_students_backbone_whatever_the_datasets_default(tmp_path, monkeypatch):
    """On a dataset whose profiles default to the coupling flow (Fashion-MNIST), `mixflow ablate` still starts from the
    i-ResNet profile: the student row is the original student's configuration, the coupling rows are the factor."""
    from mixflow_core.training import profiles

    monkeypatch.setitem(profiles.DEFAULT_BACKBONE, "digits", "coupling")  # digits standing in for fashion-mnist
    assert profiles.get_profile("digits", "smoke").model.family == "coupling"
    out = tmp_path / "abl"
    assert main(["ablate", "--dataset", "digits", "--profile", "smoke", "--epochs", "1", "--max-steps", "2",
                 "--out", str(out), "--only", "student", "backbone: coupling"]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert rows["student"]["config"]["model"]["arch"]["type"] == "mlp"  # the i-ResNet
    assert rows["student"]["config"]["model"]["logdet"] == {"type": "power_series", "n_terms": 1, "n_probes": 1,
                                                            "probe": "gaussian", "neumann_gradient": False}
    assert rows["backbone: coupling"]["config"]["model"]["arch"]["type"] == "coupling_mlp"
