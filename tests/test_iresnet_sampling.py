"""benchmarks/iresnet_sampling.py on a smoke i-ResNet run: a looser inverse tolerance takes fewer fixed-point
iterations, the tight one solves f(x) = z, and the script prints its table (the reference row changes no pixel)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("iresnet_sampling", ROOT / "benchmarks" / "iresnet_sampling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sampling") / "run"
    subprocess.run([sys.executable, "-m", "mixflow_core", "train", "--dataset", "digits", "--profile", "smoke",
                    "--backbone", "iresnet", "--run-dir", str(run)], check=True, cwd=ROOT, capture_output=True)
    return run


def test_a_looser_tolerance_takes_fewer_iterations_and_the_tight_one_inverts(smoke_run):
    from mixflow_core.training.runs import load_run_model

    bench = _bench()
    model, _, info, _ = load_run_model(smoke_run, "cpu")
    z = model.prior.sample(torch.arange(info["num_classes"]).repeat(3), 1.0, torch.Generator().manual_seed(0))
    tight, its_tight, _ = bench.invert(model, z, 1e-10)
    loose, its_loose, _ = bench.invert(model, z, 1e-2)
    assert len(its_tight) == len(bench.blocks(model)) > 0
    assert all(a <= b for a, b in zip(its_loose, its_tight)) and sum(its_loose) < sum(its_tight)
    with torch.no_grad():
        back, _ = model.flow(tight)
        back_loose, _ = model.flow(loose)
    assert float((back.reshape(len(z), -1) - z).abs().max()) < 1e-6
    assert float((back_loose.reshape(len(z), -1) - z).abs().max()) > float((back.reshape(len(z), -1) - z).abs().max())


def test_the_script_prints_its_table(smoke_run):
    out = subprocess.run([sys.executable, "benchmarks/iresnet_sampling.py", "--run-dir", str(smoke_run), "--n", "2",
                          "--rounds", "2", "--threads", "1", "--tols", "1e-6", "1e-2"],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| inverse_tol"))
    rows = [line.split("|")[1:-1] for line in lines[start + 2:start + 4]]
    assert [r[0].strip() for r in rows] == ["1e-06 (reference)", "0.01"]
    assert rows[0][6].strip() == "0"  # the reference changes no pixel of itself


def test_a_coupling_run_is_refused_with_one_line(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "mixflow_core", "train", "--dataset", "digits", "--profile", "smoke",
                    "--backbone", "coupling", "--run-dir", str(run)], check=True, cwd=ROOT, capture_output=True)
    res = subprocess.run([sys.executable, "benchmarks/iresnet_sampling.py", "--run-dir", str(run)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "not an i-ResNet run" in res.stderr
