"""benchmarks/gpu_check.py: the CPU dry run (--tiny) writes one JSON with every step and sensible numbers.

The dry run is the device check's own plumbing at smoke sizes on generated data (a subprocess, as the GPU machine
runs it). Its pytest step runs tests/test_cuda.py when that exists, else a generated file with one cuda-marked test
(skipped without CUDA) and one unmarked test (deselected); it never collects this file (no recursion). Its report
step takes the device machine's path (papermill missing: skipped with the message), which keeps the run to ~20 s;
the report itself is tested in tests/study/test_notebooks.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ("environment", "pytest", "fashion", "fashion_coupling", "cifar", "precision", "report")

FAKE_CUDA_TESTS = '''
import pytest
import torch


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_marked_cuda():
    assert torch.zeros(1, device="cuda").item() == 0


def test_not_marked():
    raise AssertionError("-m cuda must deselect this")
'''


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    cuda_tests = ROOT / "tests" / "test_cuda.py"
    if not cuda_tests.is_file():
        cuda_tests = tmp / "test_fake_cuda.py"
        cuda_tests.write_text(FAKE_CUDA_TESTS)
    out = tmp / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "GPU_CHECK_REPORT_MODULES": "papermill,mixflow_no_such_module"}  # as on the GPU machine: no papermill
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out),
                           "--fashion-root", str(tmp / "no-such-dir"), "--cuda-tests", str(cuda_tests)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    record = json.loads((out / "gpu_check.json").read_text())
    return proc, record, out, cuda_tests


def test_dry_run_records_every_step(dry_run):
    proc, record, out, cuda_tests = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert record["finished"] and record["tiny"] and record["total_seconds"] > 0
    steps = record["steps"]
    assert list(steps) == list(STEPS)
    for name, rec in steps.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec)
        assert rec["seconds"] >= 0
    assert steps["environment"]["torch"] and steps["environment"]["resolved_device"] == "cpu"
    log = (out / "gpu_check.log").read_text()
    assert "| 2 fashion | ok |" in log and "| 3 fashion_coupling | ok |" in log and "| 4 cifar | ok |" in log and proc.stdout.count("| step |") == 1


def test_dry_run_pytest_step_runs_only_the_cuda_tests(dry_run):
    _, record, out, cuda_tests = dry_run
    rec = record["steps"]["pytest"]
    assert rec["status"] == "ok", rec
    assert rec["returncode"] == 0 and "-m cuda" in rec["command"] and "test_gpu_check" not in rec["command"]
    assert rec["counts"].get("skipped", 0) + rec["counts"].get("passed", 0) >= 1
    if cuda_tests.name == "test_fake_cuda.py":
        counts = {k: v for k, v in rec["counts"].items() if k != "warnings"}  # the unregistered cuda mark warns
        assert counts in ({"skipped": 1, "deselected": 1}, {"passed": 1, "deselected": 1})
    assert (out / "pytest_cuda.txt").read_text().startswith("$ ")


def test_dry_run_fashion_and_cifar_numbers(dry_run):
    _, record, _, _ = dry_run
    fashion = record["steps"]["fashion"]
    assert fashion["status"] == "ok", fashion
    assert fashion["profile"] == "smoke" and "generated" in fashion["data"]
    assert 0.0 <= fashion["test_accuracy"] <= 1.0 and math.isfinite(fashion["test_bpd"]) and fashion["test_bpd"] > 0
    assert fashion["test_n"] == fashion["n_test"] > 0 and fashion["img_per_s"] > 0 and fashion["eval_s"] > 0
    assert fashion["images_trained"] > 0 and fashion["peak_memory_gib"] is None  # CPU: no GPU memory
    coupling = record["steps"]["fashion_coupling"]  # both backbones' profiles, the same way
    assert coupling["status"] == "ok" and (fashion["backbone"], coupling["backbone"]) == ("iresnet", "coupling")
    assert coupling["model"].startswith("CouplingConv") and fashion["model"].startswith("Conv")
    assert 0.0 <= coupling["test_accuracy"] <= 1.0 and math.isfinite(coupling["test_bpd"]) and coupling["img_per_s"] > 0
    cifar = record["steps"]["cifar"]
    assert cifar["status"] == "ok", cifar
    assert [r["batch"] for r in cifar["rows"]] == [4, 8]
    assert all(r["img_per_s"] > 0 and r["steps"] >= 1 and "error" not in r for r in cifar["rows"])
    precision = record["steps"]["precision"]
    assert precision["status"] == "ok", precision
    assert [r["precision"] for r in precision["rows"]] == ["fp32", "tf32", "bf16"]
    for r in precision["rows"]:  # the bound and the inverse hold after training steps at every precision
        assert r["img_per_s"] > 0 and r["max_operator_norm"] <= precision["coeff"] + 1e-3 and r["inverse_error"] < 1e-3


def test_dry_run_report_ran_or_says_why_not(dry_run):
    _, record, out, _ = dry_run
    rec = record["steps"]["report"]
    gc = _gpu_check()
    if rec["status"] == "skipped":
        assert rec["reason"].startswith(gc.REPORT_MISSING) and "mixflow_no_such_module" in rec["reason"]
    else:
        assert rec["status"] == "ok" and rec["returncode"] == 0, rec
        assert Path(rec["results_md"]).is_file() and Path(rec["results_md"]).is_relative_to(out)


def test_pytest_summary_and_skip_parsing():
    gc = _gpu_check()
    output = "....\n=== 3 passed, 1 skipped, 2 deselected, 1 warning in 4.20s ===\n"
    assert gc.pytest_counts(output) == {"passed": 3, "skipped": 1, "deselected": 2, "warnings": 1}
    assert gc.pytest_counts("1 failed, 1 error in 0.3s") == {"failed": 1, "errors": 1}
    args = gc.parse_args(["--out", "x", "--skip", "report", "1"])
    assert args.skip == ["report", "pytest"] and args.device == "cuda" and args.minutes == 2.0
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", "x", "--skip", "nope"])
    assert json.loads(json.dumps(gc.json_safe({"a": float("nan"), "b": (1, float("inf"))}))) == {"a": None, "b": [1, None]}
