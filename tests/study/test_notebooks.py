"""The notebook sequence: committed clean, thin and lint-free; executed end to end on the smoke profile.

The whole report (notebooks 01 twice, 02, 03, 04) runs once per session with papermill into
tmp folders, and the tests read the JSON the notebooks wrote and check it against the run
directories (metrics.json, the models themselves), not just that files exist.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mixflow_core import PowerSeries, PushAway, study
from mixflow_core.eval.diagnostics import off_diagonal
from mixflow_core.study import report
from mixflow_core.training.checkpoint import snapshot_path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_sequence_is_there():
    assert [p.name for p in NOTEBOOKS] == list(report.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
        assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{path.name}: the first code cell must be the only parameters cell"
    # the parameters cell holds plain assignments only (papermill appends its overrides after it)
    for line in tagged[0].source.splitlines():
        assert not line.strip() or line.lstrip().startswith("#") or "=" in line.split("#")[0], line


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_hold_no_model_code(path):
    """Thin notebooks: no classes, functions, training steps or optimisers, no torch; the package does the work."""
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), (
                f"{path.name} defines code ({type(node).__name__}): move it into mixflow_core")
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("backward", "step", "zero_grad"), f"{path.name} trains by hand"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] == "torch" for m in modules), f"{path.name} imports torch"


def test_notebooks_lint_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT / "notebooks")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the sequence, executed ---------------------------------------------------------------------
# the report itself: the session fixture `smoke_report` in tests/conftest.py (shared with test_report_html.py)


def _json(step: report.Step) -> dict:
    return json.loads(Path(step.parameters["results_json"]).read_text())


def _is_png(path: str | Path) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_runs_every_notebook_and_says_so(smoke_report):
    steps, summary, lines, tmp = smoke_report
    assert [s["notebook"] for s in summary["steps"]] == [s.notebook for s in steps]
    assert len(steps) == 6 and all(Path(s.output).is_file() for s in steps)
    assert any("done in" in line for line in lines) and lines[0].startswith("[1/6]")
    saved = json.loads((tmp / "reports" / "report.json").read_text())
    assert saved["table"] == summary["table"] and "mixture flow: fixed" in saved["table"]


def test_train_notebook_writes_the_run_and_its_metrics(smoke_report):
    steps = smoke_report[0]
    for step in steps[:3]:
        out = _json(step)
        run_dir = Path(out["run_dir"])
        saved = json.loads((run_dir / "metrics.json").read_text())
        assert out["config"] == step.parameters["config"]
        assert out["metrics"]["test"]["accuracy"] == saved["test"]["accuracy"]
        assert 0.0 <= out["metrics"]["test"]["accuracy"] <= 1.0 and math.isfinite(out["metrics"]["test"]["bpd_conditional"])
        assert Path(out["checkpoint"]).is_file() and all(_is_png(f) for f in out["figures"])
        for epoch in out["snapshot_epochs"]:
            if epoch <= out["epochs"]:
                assert snapshot_path(run_dir, epoch).is_file()
    student_cfg = json.loads((Path(_json(steps[1])["run_dir"]) / "config.json").read_text())
    assert student_cfg["prior"]["init"] == "student"
    assert student_cfg["train"]["objective"] == {"type": "push_away", "lam": 0.05}
    assert student_cfg["model"]["logdet"]["type"] == "power_series" and student_cfg["model"]["logdet"]["n_terms"] == 1
    assert student_cfg["train"]["prior_weight_decay"] == 5e-4
    fixed_cfg, other_cfg = (json.loads((Path(_json(steps[i])["run_dir"]) / "config.json").read_text()) for i in (0, 2))
    assert fixed_cfg["model"]["arch"]["type"] == "mlp" and other_cfg["model"]["arch"]["type"] == "coupling_mlp"
    assert (fixed_cfg["prior"], fixed_cfg["train"]) == (other_cfg["prior"], other_cfg["train"])  # only the backbone


def test_rerunning_train_reuses_the_finished_run(smoke_report):
    step = smoke_report[0][0]
    before = Path(_json(step)["checkpoint"]).read_bytes()
    report.execute(step)
    assert _json(step)["trained_now"] is False
    assert Path(_json(step)["checkpoint"]).read_bytes() == before


def test_overlap_notebook_numbers_match_the_models(smoke_report):
    steps = smoke_report[0]
    out = _json(steps[3])
    runs = study.load_runs({"fixed": steps[3].parameters["fixed_run"], "student": steps[3].parameters["student_run"]})
    for config, run in runs.items():
        d = off_diagonal(run.model.prior.mean_distances().detach().double())
        assert out[config]["overlap"]["mean_dist_min_sigma"] == pytest.approx(float(d.min()), rel=1e-6)  # float32 model
        assert out[config]["test"]["accuracy"] == run.metrics["test"]["accuracy"]
        assert len(out[config]["most_confused"]) == 5
    names = {Path(f).name for f in out["figures"]}
    for config in ("fixed", "student"):
        assert {f"02_gaussians_{config}.png", f"02_pca_{config}.png", f"02_tsne_{config}.png",
                f"02_confusion_{config}.png", f"02_bhattacharyya_{config}.png"} <= names
    assert all(_is_png(f) for f in out["figures"])


def test_sampling_notebook_saves_what_it_lists(smoke_report):
    out = _json(smoke_report[0][4])
    paths = out["figures"]
    assert {Path(p).name for p in paths} == {"03_samples_per_class.png", "03_interpolation.png"}
    assert all(_is_png(p) for p in paths)
    for p in paths:
        assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == out["sha256"][Path(p).name]


def test_report_table_matches_the_runs_and_baselines(smoke_report):
    steps = smoke_report[0]
    out = _json(steps[5])
    rows = {r["method"]: r for r in out["rows"]}
    for config, key in (("fixed", "mixture flow: fixed"), ("student", "mixture flow: student"),
                        ("other", "mixture flow: fixed-coupling")):  # both backbones side by side
        metrics = json.loads((Path(steps[5].parameters[f"{config}_run"]) / "metrics.json").read_text())
        assert rows[key]["accuracy"] == metrics["test"]["accuracy"]
        assert rows[key]["ece"] == metrics["test"]["ece"]
    baselines = [r for r in out["rows"] if r["kind"] == "baseline"]
    assert len(baselines) >= 2 and all(0.5 < r["accuracy"] <= 1 for r in baselines)  # digits is easy for them
    table = Path(out["table_md"]).read_text()
    assert all(r["method"] in table for r in out["rows"])
    assert json.loads(Path(out["table_md"]).with_suffix(".json").read_text())["rows"] == out["rows"]
    assert all(_is_png(p) for p in out["samples"].values())


def test_report_draws_the_committed_frontier_table(smoke_report):
    out = _json(smoke_report[0][5])
    assert out["frontier_json"] == str(smoke_report[0][5].parameters["frontier_json"])
    drawn = {Path(f).name: f for f in out["figures"]}
    assert _is_png(drawn["04_frontier.png"]) and _is_png(drawn["04_bpd_per_image.png"])
    assert out["long_runs_json"] == str(smoke_report[0][5].parameters["long_runs_json"])
    executed = Path(smoke_report[0][5].output).read_text()
    assert "| coupling flow | 0.1 | 20 | 1 | 0.8700 | 3.400 |" in executed  # the long run, a frontier point too
    plain = report.plan("digits", "smoke")[-1].parameters
    assert plain["frontier_json"] == plain["long_runs_json"] == ""  # no committed digits tables
    fashion = report.plan("fashion-mnist", "default")[-1].parameters  # the committed Fashion-MNIST frontier
    assert fashion["frontier_json"].endswith("benchmarks/backbones/fashion-mnist-frontier.json")


def test_a_failing_cell_names_notebook_cell_and_partial_output(tmp_path):
    step = report.plan("digits", "smoke", reports_dir=tmp_path, figures_dir=tmp_path / "f",
                       runs_dir=tmp_path / "no-such-runs", ablation_json="")[3]
    with pytest.raises(report.ReportError) as err:
        report.execute(step)
    message = str(err.value)
    assert "02_overlap_diagnosis.ipynb" in message and "cell" in message and str(step.output) in message
    assert "does not exist" in message  # the RunError of the missing run directory
    assert Path(step.output).is_file()


def test_plan_rejects_unknown_profiles():
    with pytest.raises(ValueError, match="No profile"):
        report.plan("digits", "huge")


@pytest.mark.parametrize("dataset, baselines, student_minutes", [("digits", "full", None), ("fashion-mnist", "fast", 3.0)])
def test_plan_sizes_the_student_run_and_the_baselines_by_dataset(dataset, baselines, student_minutes):
    """The student run gets at most STUDENT_MAX_EPOCHS epochs, and at most STUDENT_MAX_MINUTES where the profile has a
    time budget (the image sets); the baselines' grids default to full on the small sets, fast on the image sets."""
    steps = report.plan(dataset, "default")
    student = next(s for s in steps if s.parameters.get("config") == "student").parameters["overrides"]
    fixed = next(s for s in steps if s.parameters.get("config") == "fixed").parameters["overrides"]
    assert student.get("runtime.max_minutes") == student_minutes and "runtime.max_minutes" not in fixed
    assert student["runtime.epochs"] <= report.STUDENT_MAX_EPOCHS
    assert steps[-1].parameters["baselines"] == baselines
    assert report.plan(dataset, "default", baselines="none")[-1].parameters["baselines"] == "none"


def test_report_checks_its_numbers_against_the_committed_spread(smoke_report):
    """04 sets this run's rows beside the committed mean ± sd over seeds and says which lie outside."""
    out = _json(smoke_report[0][5])
    checks = out["spread_check"]
    assert [(c["method"], c["metric"], c["within"]) for c in checks] == [("mixture flow: fixed", "accuracy", False)]
    table = Path(smoke_report[0][5].parameters["table_md"]).read_text()
    assert "### This run against the committed spread over seeds" in table
    assert "Outside the committed spread: mixture flow: fixed (accuracy)." in table
    fashion = report.plan("fashion-mnist", "default")[-1].parameters
    assert fashion["spread_json"] in ("", str(report.project_root() / "benchmarks/spread/fashion-mnist-default.json"))
    assert report.plan("digits", "default", classes=[4, 9])[-1].parameters["spread_json"] == ""  # all ten classes


def test_snapshot_epochs_are_spread_and_bounded():
    assert study.snapshot_epochs(120, 4) == (1, 5, 24, 120)
    assert study.snapshot_epochs(2, 4) == (1, 2)
    assert study.snapshot_epochs(30, 1) == (30,)
    with pytest.raises(ValueError):
        study.snapshot_epochs(0)


def test_run_config_student_has_the_students_choices():
    cfg = study.run_config("digits", "smoke", "student", seed=3)
    assert cfg.prior.init == "student" and cfg.train.objective == PushAway(lam=0.05)
    assert cfg.model.logdet == PowerSeries(n_terms=1)
    assert cfg.train.prior_weight_decay == 5e-4 and cfg.train.early_stopping == "none" and cfg.train.seed == 3
    assert study.run_config("digits", "smoke", "fixed").prior.init == "separated"
    with pytest.raises(ValueError, match="config must be"):
        study.run_config("digits", "smoke", "other")


def test_cli_report_failure_is_one_line_naming_the_notebook(tmp_path, capsys):
    """`mixflow report` over a run directory of another configuration: 01 refuses it, the CLI says where."""
    from mixflow_core.cli import main
    from mixflow_core.training.config import apply_overrides
    from mixflow_core.training.runs import write_config

    other = apply_overrides(study.run_config("digits", "smoke", "fixed"), {"train.lr": 0.5})
    write_config(tmp_path / "runs" / "digits-smoke-seed0-fixed", other, "smoke", {})
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--profile", "smoke", "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
              str(tmp_path / "reports"), "--figures-dir", str(tmp_path / "figures"), "--quiet"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mixflow: error: 01_train.ipynb failed in code cell")
    # the one resume policy's RunError (runs.refuse_resume_changes): the refused change, and what to do instead
    assert "train.lr 0.5 -> 0.001" in err and "different configuration" in err
    assert str(tmp_path / "reports" / "01_train_fixed.ipynb") in err


@pytest.mark.parametrize("argv, message", [
    (["report", "--profile", "huge"], "invalid choice"),
    (["report", "--device", "cuda:7"], "CUDA is not available"),
])
def test_cli_report_rejects_bad_input(argv, message, capsys):
    from mixflow_core.cli import main

    if torch_cuda_available() and "cuda:7" in argv:
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_report_runs_on_cifar10_shaped_images(tmp_path):
    """The image path of every notebook (conv model, RGB 3x32x32 samples, 3072-D latents) on generated
    pickles of CIFAR-10's exact layout: random pixels, so only the code path is under test, not quality."""
    from tests.data.test_data import write_cifar

    write_cifar(tmp_path / "data", n=20)  # 5 x 20 training images, 20 test images
    steps = report.plan("cifar10", "smoke", reports_dir=tmp_path / "reports", figures_dir=tmp_path / "figures",
                        runs_dir=tmp_path / "runs", data_root=str(tmp_path / "data"), ablation_json="",
                        baselines="none")  # the baselines' 3072-D Gaussian costs minutes; the flow's path is under test
    report.run_report(steps, echo=lambda _: None)
    trained = _json(steps[0])
    assert trained["metrics"]["test"]["n"] == 20 and math.isfinite(trained["metrics"]["test"]["bpd_conditional"])
    sampled = _json(steps[4])
    assert all(_is_png(p) for p in sampled["figures"])
    out = _json(steps[5])
    assert {r["method"] for r in out["rows"]} == {"mixture flow: fixed", "mixture flow: student", "mixture flow: fixed-coupling"}
    assert {r["model"] for r in out["ood"]["rows"]} == {"mixture flow"}  # no baselines: the flow's OOD rows only
    assert {r["ood_set"] for r in out["ood"]["rows"]} >= {"uniform noise", "flipped"}
    assert all(r["n_in"] == 20 for r in out["ood"]["rows"])


def test_parameter_defaults_point_where_make_report_writes():
    """Opening a notebook after `make report` finds that report's runs: defaults equal plan()'s paths."""
    steps = report.plan("digits", "default", ablation_json="")
    for path in NOTEBOOKS:
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        defaults: dict = {}
        exec(compile(cell.source, str(path), "exec"), {}, defaults)  # plain assignments (checked above)
        planned = [s.parameters for s in steps if s.notebook == path.name]
        for key in ("run_dir", "fixed_run", "student_run", "other_run", "figures_dir"):
            if key in defaults and key in planned[0]:
                expected = {str(Path(p[key]).relative_to(ROOT)) for p in planned}
                assert defaults[key] in expected, f"{path.name}: {key} = {defaults[key]!r}, make report writes {expected}"


def test_project_relative_paths_inside_the_project_are_relative(tmp_path, monkeypatch):
    """Committed JSON (figures/results.json) must not carry this machine's absolute paths."""
    root = report.project_root(Path(__file__).parent)
    monkeypatch.chdir(root / "notebooks")  # project_root() searches upward from the cwd
    assert report.project_relative(root / "runs" / "report" / "x") == "runs/report/x"
    assert report.project_relative("../figures/results.md") == "figures/results.md"
    outside = tmp_path / "elsewhere"
    assert report.project_relative(outside) == str(outside.resolve())
