"""End-to-end tests of `python -m mixflow_core` (train | evaluate | sample) on the smoke profiles.

main([...]) runs in-process (the conftest makes it float64, one thread); one subprocess
checks the module entry point. Each training run takes about a second.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from mixflow_core.cli import main
from mixflow_core.training.runs import read_config_file

# Deterministic evaluation: bin midpoints instead of dequantisation noise, exact log-det instead
# of Hutchinson probes, so train's metrics.json and `evaluate` must agree to rounding error.
EXACT = ["model.dequantize=false", "model.eval_logdet=exact"]


def _train(run_dir: Path, *extra: str, dataset: str = "digits") -> Path:
    assert main(["train", "--dataset", dataset, "--profile", "smoke", "--run-dir", str(run_dir), *extra]) == 0
    return run_dir


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _error(argv: list[str], capsys) -> str:
    """Run main expecting exit status 2; return the one-line message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "error" in err, err
    return err


def test_module_help_in_subprocess():
    """`python -m mixflow_core --help` works as a program and lists the three subcommands."""
    out = subprocess.run([sys.executable, "-m", "mixflow_core", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in ("train", "evaluate", "sample"))


def test_train_digits_writes_run_directory(tmp_path, capsys):
    """config.json, history.json, metrics.json, checkpoints with sensible contents; a summary on stdout."""
    run = _train(tmp_path / "run", "--set", *EXACT)
    expected = {"config.json", "history.json", "metrics.json", "checkpoint.pt", "best.pt"}
    assert expected <= {p.name for p in run.iterdir()}
    cfg = _json(run / "config.json")
    assert cfg["profile"] == "smoke" and cfg["data"]["name"] == "digits" and cfg["model"]["dequantize"] is False
    info = cfg["dataset_info"]
    assert info["data_shape"] == [64] and info["levels"] == 17 and info["num_classes"] == 10
    history = _json(run / "history.json")
    assert len(history["epochs"]) == 2 and history["stopped"] == "completed"
    metrics = _json(run / "metrics.json")
    for split, n in (("val", info["n_val"]), ("test", info["n_test"])):
        m = metrics[split]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
        assert all(math.isfinite(m[k]) and m[k] > 0 for k in ("bpd_conditional", "bpd_marginal"))
        assert m["n"] == n and sum(map(sum, m["confusion"])) == n and len(m["confusion"]) == 10
    assert info["n_test"] == 360  # 20% of sklearn's 1797 digits
    out = capsys.readouterr().out
    assert str(run) in out and f"accuracy {metrics['test']['accuracy']:.4f}" in out


def test_overrides_land_in_config_json_with_precedence(tmp_path, monkeypatch):
    """profile < --config file < --set < --seed; the default run directory is runs/<dataset>-<profile>-seed<N>."""
    monkeypatch.chdir(tmp_path)
    file_cfg = {"model": {"arch": {"type": "mlp", "hidden": [16], "n_blocks": 3}}, "train": {"lr": 0.002, "seed": 1}}
    (tmp_path / "c.json").write_text(json.dumps(file_cfg))
    assert main(["train", "--dataset", "digits", "--profile", "smoke", "--config", "c.json",
                 "--set", "model.arch.n_blocks=1", "runtime.epochs=1", "--set", "train.seed=4", "--seed", "5"]) == 0
    cfg = _json(tmp_path / "runs" / "digits-smoke-seed5" / "config.json")
    assert cfg["model"]["arch"]["hidden"] == [16] and cfg["train"]["lr"] == 0.002  # from the file
    assert cfg["model"]["arch"]["n_blocks"] == 1 and cfg["runtime"]["epochs"] == 1  # --set beats the file
    assert cfg["train"]["seed"] == 5  # the explicit flag beats --set
    assert cfg["model"]["logdet"] == {"type": "power_series", "n_terms": 2, "n_probes": 1, "probe": "gaussian",
                                      "neumann_gradient": False}  # untouched profile value


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
    """2 epochs, then --resume with runtime.epochs=3: 3 epochs, the first 2 records unchanged, the 3rd as if
    training had never stopped (a straight 3-epoch run)."""
    run = _train(tmp_path / "run")
    before = _json(run / "history.json")["epochs"]
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "runtime.epochs=3"]) == 0
    after = _json(run / "history.json")["epochs"]
    assert len(after) == 3 and after[:2] == before
    assert _json(run / "config.json")["runtime"]["epochs"] == 3
    straight = _json(_train(tmp_path / "straight", "--set", "runtime.epochs=3") / "history.json")["epochs"]
    for key in ("train_loss", "val_loss", "val_bpd", "val_acc"):
        assert after[2][key] == pytest.approx(straight[2][key], rel=1e-9, abs=1e-12), key


def test_resume_and_rerun_refusals(tmp_path, capsys):
    """--resume may not change what is trained; a fresh train may not overwrite a run; nothing to resume is an error;
    a run that fails before its first checkpoint leaves no config.json behind."""
    run = _train(tmp_path / "run", "--set", "runtime.epochs=1")
    err = _error(["train", "--run-dir", str(run), "--resume", "--set", "model.arch.n_blocks=3"], capsys)
    assert "model.arch.n_blocks" in err
    assert "--profile" in _error(["train", "--run-dir", str(run), "--resume", "--profile", "default"], capsys)
    assert "--resume" in _error(["train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(run)], capsys)
    assert "does not exist" in _error(["train", "--run-dir", str(tmp_path / "none"), "--resume"], capsys)
    failed = tmp_path / "failed"  # fails in fit before the first epoch: no config.json left to block a retry
    args = ["train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(failed),
            "--set", "train.batch_size=5000"]
    assert "batch_size" in _error(args, capsys)
    assert not (failed / "config.json").exists()


def test_evaluate_reproduces_train_metrics(tmp_path, capsys):
    """Without dequantisation noise and with the exact log-det, evaluate == train's metrics.json (both splits)."""
    run = _train(tmp_path / "run", "--set", *EXACT)
    saved = _json(run / "metrics.json")
    for split in ("test", "val"):
        out = tmp_path / f"{split}.json"
        assert main(["evaluate", str(run), "--split", split, "--out", str(out)]) == 0
        got = _json(out)
        assert got["split"] == split and got["checkpoint"] == "best.pt"
        assert got["confusion"] == saved[split]["confusion"]
        for key in ("accuracy", "bpd_conditional", "bpd_marginal", "ece"):
            assert got[key] == pytest.approx(saved[split][key], abs=1e-6), (split, key)
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_noise_is_seeded(tmp_path):
    """With dequantisation and Hutchinson probes on, the evaluation seed (default: train.seed) makes evaluate
    repeat metrics.json exactly; another --seed draws other noise, so bits/dim move (but only a little)."""
    run = _train(tmp_path / "run")
    saved = _json(run / "metrics.json")["test"]
    assert main(["evaluate", str(run)]) == 0
    assert _json(run / "eval-test.json")["bpd_conditional"] == pytest.approx(saved["bpd_conditional"], abs=1e-9)
    assert main(["evaluate", str(run), "--seed", "123", "--out", str(tmp_path / "other.json")]) == 0
    other = _json(tmp_path / "other.json")["bpd_conditional"]
    assert other != saved["bpd_conditional"] and other == pytest.approx(saved["bpd_conditional"], abs=0.1)


def test_sample_grid_png(tmp_path):
    """Rows = classes, columns = samples: a 3 x 5 grid of 8x8 digits (1-pixel gaps) keeps that aspect; seeded."""
    run = _train(tmp_path / "run", "--set", "runtime.epochs=1")
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (1, 1, 2)):
        argv = ["sample", str(run), "--classes", "0", "3", "7", "--n", "5", "--seed", str(seed), "--out", str(path)]
        assert main(argv) == 0
    image = matplotlib.image.imread(paths[0])
    height, width = image.shape[:2]
    assert height / width == pytest.approx((3 * 9 + 1) / (5 * 9 + 1), rel=0.02)
    assert height >= 3 * 8 * 4  # upscaled: cells are tens of pixels high
    assert (matplotlib.image.imread(paths[1]) == image).all()  # same seed, same picture
    assert (matplotlib.image.imread(paths[2]) != image).any()
    assert main(["sample", str(run)]) == 0  # defaults: all 10 classes x 8 into RUN_DIR/samples.png
    height, width = matplotlib.image.imread(run / "samples.png").shape[:2]
    assert height / width == pytest.approx((10 * 9 + 1) / (8 * 9 + 1), rel=0.02)


def test_toy2d_train_and_scatter(tmp_path):
    """Continuous 2-D data: training works and `sample` draws a scatter plot instead of a grid."""
    run = _train(tmp_path / "run", dataset="toy2d")
    assert _json(run / "config.json")["dataset_info"]["levels"] is None
    assert 0.0 <= _json(run / "metrics.json")["test"]["accuracy"] <= 1.0
    assert main(["sample", str(run), "--n", "50", "--out", str(tmp_path / "toy.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "toy.png").shape[:2] == (500, 500)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "mnist"], "invalid choice"),
    (["train", "--dataset", "digits", "--profile", "tiny"], "invalid choice"),
    (["train", "--profile", "smoke"], "--dataset"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "train.nope=1"], "train.nope"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "runtime.epochs=abc"], "runtime.epochs must be int"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "train.epochs=3"], "train.epochs is now runtime.epochs"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "model.logdet=series"], "model.logdet"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "model.logdet.max_dim=9"], "PowerSeries has"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "model.arch=transformer"], "model.arch"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--set", "epochs"], "section.field=value"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--config", "missing.json"], "does not exist"),
    (["train", "--dataset", "digits", "--profile", "smoke", "--device", "tpu"], "device"),
    (["evaluate", "no/such/run"], "does not exist"),
    (["sample", "no/such/run"], "does not exist"),
    ([], "required"),
])
def test_bad_arguments_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written by a refused command
    assert needle in _error(argv, capsys)
    assert not (tmp_path / "runs").exists()


def test_broken_run_directories_exit_2(tmp_path, capsys):
    """Bad classes, a corrupt best.pt, then no checkpoint at all: one-line errors, status 2."""
    run = _train(tmp_path / "run", "--set", "runtime.epochs=1")
    assert "class must lie in 0..9, got 10" in _error(["sample", str(run), "--classes", "10"], capsys)
    assert "temperature must be finite and >= 0" in _error(["sample", str(run), "--temperature", "-1"], capsys)
    assert "n must be an int >= 1" in _error(["sample", str(run), "--n", "0"], capsys)
    (run / "best.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in _error(["evaluate", str(run)], capsys)
    (run / "best.pt").unlink()
    (run / "checkpoint.pt").unlink()
    assert "checkpoint.pt" in _error(["evaluate", str(run)], capsys)
    assert "checkpoint.pt" in _error(["sample", str(run)], capsys)
    (run / "config.json").write_text("{not json")
    assert "config.json" in _error(["evaluate", str(run)], capsys)


def test_yaml_config(tmp_path, capsys, monkeypatch):
    """.yaml needs PyYAML: without it a clear message (exit 2); with it the same overrides as JSON."""
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  epochs: 1\ntrain:\n  lr: 0.002\nmodel:\n  arch: {type: mlp, hidden: [16]}\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        pass
    else:
        assert read_config_file(path) == {"runtime.epochs": 1, "train.lr": 0.002,
                                          "model.arch": {"type": "mlp", "hidden": [16]}}
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    err = _error(["train", "--dataset", "digits", "--profile", "smoke", "--config", str(path)], capsys)
    assert "pip install pyyaml" in err


def test_backbone_flag_picks_the_profile_family_and_names_the_run(tmp_path, capsys, monkeypatch):
    """--backbone coupling trains the coupling variant of the profile into a directory that says so; it cannot
    change a resumed run; an i-ResNet-only field set on it is refused with one line."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "digits", "--profile", "smoke", "--backbone", "coupling"]) == 0
    run = tmp_path / "runs" / "digits-smoke-coupling-seed0"
    cfg = _json(run / "config.json")
    assert cfg["model"]["arch"]["type"] == "coupling_mlp" and _json(run / "metrics.json")["test"]["n"] == 360
    assert main(["train", "--dataset", "digits", "--profile", "smoke", "--backbone", "iresnet",
                 "--set", "runtime.epochs=1"]) == 0  # the default family: no tag in the name
    assert _json(tmp_path / "runs" / "digits-smoke-seed0" / "config.json")["model"]["arch"]["type"] == "mlp"
    err = _error(["train", "--run-dir", str(run), "--resume", "--backbone", "iresnet"], capsys)
    assert "resumed run keeps its saved architecture" in err
    err = _error(["train", "--dataset", "digits", "--profile", "smoke", "--backbone", "coupling",
                  "--set", "model.coeff=0.5", "--run-dir", str(tmp_path / "x")], capsys)
    assert "model.coeff is an i-ResNet field" in err
    _error(["train", "--dataset", "digits", "--backbone", "glow"], capsys)
