"""One resume policy: `mixflow train --resume`, runs.ensure_run and fit(resume=True) accept and refuse the same changes;
run directories of mixflow 0.1 still evaluate and resume, or fail with one line."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixflow_core import build_model
from mixflow_core.cli import main
from mixflow_core.data import load_data
from mixflow_core.training.checkpoint import CheckpointError, load_checkpoint
from mixflow_core.training.config import RunConfig, apply_overrides
from mixflow_core.training.fit import fit
from mixflow_core.training.profiles import get_profile
from mixflow_core.training.runs import RunError, ensure_run, read_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1"
BASE = apply_overrides(get_profile("digits", "smoke"), {"runtime.epochs": 1, "data.train_limit": 130,
                                                       "model.eval_logdet": "exact"})

# (dotted override, allowed on resume): runtime fields and where the data lie may change, nothing else
CHANGES = [
    ("runtime.epochs", 2, True), ("runtime.max_minutes", 10.0, True), ("runtime.patience", 3, True),
    ("runtime.max_nonfinite", 5, True), ("runtime.threads", 2, True), ("runtime.progress", True, True),
    ("runtime.checkpoint_minutes", 0.5, True),
    ("runtime.eval_batch_size", 7, True), ("runtime.eval_draws", 2, True), ("data.root", "/nowhere", True),
    ("train.lr", 3e-3, False), ("train.batch_size", 32, False), ("train.seed", 1, False),
    ("train.objective", "likelihood", False), ("train.objective.beta", 2.0, False),
    ("train.early_stopping", "val_acc", False), ("train.schedule", "cosine", False),
    ("train.prior_weight_decay", 1e-3, False), ("model.logdet.n_terms", 3, False),
    ("model.arch.hidden", [16], False), ("prior.radius", 2.0, False), ("model.krylov_steps", None, False),
    ("model.krylov_steps", 6, False),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 1-epoch run directory written by ensure_run (config.json, checkpoint.pt, metrics.json)."""
    run = tmp_path_factory.mktemp("policy") / "run"
    ensure_run(BASE, run, "smoke")
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _cli(run: Path, key: str, value) -> tuple[int, str]:
    try:
        code = main(["train", "--run-dir", str(run), "--resume", "--set", f"{key}={json.dumps(value)}"])
    except SystemExit as err:
        code = err.code
    return code, ""


def _ensure(run: Path, cfg: RunConfig) -> bool:
    try:
        ensure_run(cfg, run, "smoke")
    except RunError:
        return False
    return True


def _fit(run: Path, cfg: RunConfig) -> bool:
    data = load_data(replace(cfg.data, root=None))
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    try:
        fit(model, data, cfg.train, cfg.runtime, run_dir=run, resume=True)
    except CheckpointError as err:
        assert "another configuration" in str(err) or "does not match" in str(err)
        return False
    return True


@pytest.mark.parametrize("key, value, allowed", CHANGES, ids=[c[0] for c in CHANGES])
def test_cli_ensure_run_and_fit_agree(finished, tmp_path, key, value, allowed, capsys):
    cfg = apply_overrides(BASE, {key: value})
    code, _ = _cli(_copy(finished, tmp_path / "cli"), key, value)
    err = capsys.readouterr().err
    assert (code == 0) == allowed, err
    if not allowed:
        assert code == 2 and key.split(".")[0] in err and err.count("\n") == 1
    assert _ensure(_copy(finished, tmp_path / "ensure"), cfg) == allowed
    if key.startswith(("train.", "runtime.")):  # what fit sees of a config
        assert _fit(_copy(finished, tmp_path / "fit"), cfg) == allowed


# -- run directories of mixflow 0.1 ------------------------------------------------------------------------------
@pytest.fixture
def old_run(finished, tmp_path):
    """`finished` rewritten as mixflow 0.1 left it: its config.json and a checkpoint with one flat train_config."""
    run = _copy(finished, tmp_path)
    old = json.loads((FIXTURES / "digits-smoke-config.json").read_text())
    old["train"]["epochs"], old["data"]["train_limit"], old["model"]["eval_logdet"] = 1, 130, "exact"
    old["train"]["eval_batch_size"] = BASE.runtime.eval_batch_size  # 0.1 wrote 500; today's batch, so numbers compare
    old["dataset_info"] = json.loads((run / "config.json").read_text())["dataset_info"]
    (run / "config.json").write_text(json.dumps(old))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt.pop("configs")
    ckpt["train_config"] = {**json.loads((FIXTURES / "digits-smoke-train_config.json").read_text()), "epochs": 1}
    for record in ckpt["history"]["epochs"]:  # 0.1's history keys
        record["mean_dist_min"] = record.pop("mean_dist_min_sigma")
        record["mean_dist_median"] = record.pop("mean_dist_median_sigma")
    torch.save(ckpt, run / "checkpoint.pt")
    history = json.loads((run / "history.json").read_text())
    history["epochs"] = ckpt["history"]["epochs"]
    (run / "history.json").write_text(json.dumps(history))
    return run


def test_a_v0_1_run_directory_reads_evaluates_and_resumes(old_run, finished, capsys):
    cfg, profile, _ = read_config(old_run)
    # 0.1 trained with power iteration to a tolerance (it wrote power_rtol and no krylov_steps); otherwise today's config
    assert cfg == apply_overrides(BASE, {"model.krylov_steps": None}) and profile == "smoke"
    assert main(["evaluate", str(old_run), "--out", str(old_run / "e.json")]) == 0
    assert main(["evaluate", str(finished), "--out", str(old_run / "today.json")]) == 0  # the same weights as today's
    old, today = (json.loads((old_run / f).read_text()) for f in ("e.json", "today.json"))
    assert old["confusion"] == today["confusion"] and old["bpd_conditional"] == today["bpd_conditional"]
    assert main(["train", "--run-dir", str(old_run), "--resume", "--set", "runtime.epochs=2"]) == 0
    history = json.loads((old_run / "history.json").read_text())["epochs"]
    assert len(history) == 2 and "mean_dist_min_sigma" in history[0]  # upgraded, then continued
    assert "--set runtime.epochs=2" not in capsys.readouterr().err


def test_a_v0_1_checkpoint_refuses_a_changed_trajectory(old_run):
    cfg = apply_overrides(BASE, {"train.lr": 0.5})
    with pytest.raises(RunError, match="train.lr"):
        ensure_run(cfg, old_run, "smoke")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(extra={"x": 1}), "Unknown config section(s) ['extra']"),
    (lambda c: c["model"].update(logdet="gauss_legendre"), "unknown type 'gauss_legendre'"),
    (lambda c: c["prior"].update(init="uniform"), "init"),
    (lambda c: c["train"].update(speed=3), "speed"),
])
def test_an_unreadable_config_fails_with_one_line_naming_it(old_run, edit, needle, capsys):
    content = json.loads((old_run / "config.json").read_text())
    edit(content)
    (old_run / "config.json").write_text(json.dumps(content))
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(old_run)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and "config.json" in err and err.count("\n") == 1
