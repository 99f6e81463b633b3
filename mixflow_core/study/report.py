"""The study's report: run the notebook sequence headlessly with papermill.

Paths in the notebooks' `parameters` cells are relative to the project root (the folder with
pyproject.toml and notebooks/); `project_path` resolves them the same way whether a notebook
runs in JupyterLab (cwd notebooks/), under papermill, or from a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import classes_tag
from ..training.io import write_json
from . import html_report

__all__ = ["project_root", "project_path", "project_relative", "NOTEBOOKS", "ReportError", "Step", "plan", "execute", "run_report",
           "default_figures_dir", "default_baselines", "run_name", "FigureLog"]


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding pyproject.toml and notebooks/; else cwd."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return here


def project_path(path: str | Path | None) -> Path | None:
    """An absolute path: `path` itself if absolute, else relative to project_root(); None stays None."""
    if path is None or path == "":
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def project_relative(path: str | Path) -> str:
    """`path` relative to project_root() when it lies inside it (committed files stay machine-independent), else absolute."""
    p, root = Path(path).expanduser().resolve(), project_root()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


# -- the notebook sequence -----------------------------------------------------------------------
NOTEBOOKS = ("01_train.ipynb", "02_overlap_diagnosis.ipynb", "03_sampling.ipynb", "04_report_figures.ipynb")
TRAIN, OVERLAP, SAMPLING, FIGURES = NOTEBOOKS  # the sequence, in order; plan() names them only through these
KERNEL = "python3"
STUDENT_MAX_EPOCHS = 30  # the student configuration collapses within a few epochs; more only costs time
STUDENT_MAX_MINUTES = 3.0  # ... or minutes, where the profile has a time budget (the image sets)
SMALL_DATASETS = ("digits", "toy2d")  # the full baseline grids take seconds there; on the image sets, "fast"


class ReportError(RuntimeError):
    """A notebook of the report failed; the message names the notebook, the cell and the partial output."""


@dataclass(frozen=True)
class Step:
    notebook: str  # file name in notebooks/
    output: Path  # executed copy
    parameters: dict[str, Any] = field(default_factory=dict)
    title: str = ""


def default_baselines(dataset: str) -> str:
    """"full" baseline grids on the small data sets (seconds); "fast" on the image sets (tens of thousands of images:
    2 noise copies, short sklearn grids: minutes, not an hour)."""
    return "full" if dataset in SMALL_DATASETS else "fast"


def run_name(dataset: str, profile: str, seed: int, config: str, tag: str = "") -> str:
    """A report run's directory name under runs_dir (tag: data.classes_tag of a class subset).

    Example:
        >>> run_name("fashion-mnist", "default", 0, "fixed-iresnet")
        'fashion-mnist-default-seed0-fixed-iresnet'
    """
    return f"{dataset}-{profile}{tag}-seed{seed}-{config}"


def default_figures_dir(dataset: str, profile: str) -> str:
    """figures/ for the study's default (digits, default profile); figures/<dataset>-<profile>/ otherwise."""
    return "figures" if (dataset, profile) == ("digits", "default") else f"figures/{dataset}-{profile}"


def plan(
    dataset: str = "digits", profile: str = "default", device: str = "cpu", seed: int = 0,
    reports_dir: str | Path = "reports", figures_dir: str | Path | None = None, runs_dir: str | Path = "runs/report",
    data_root: str | None = None, retrain: bool = False, ablation_json: str | Path | None = None,
    tsne: bool = True, baselines: str | None = None, classes: list[str | int] | None = None,
    frontier_json: str | Path | None = None, long_runs_json: str | Path | None = None,
    spread_json: str | Path | None = None,
) -> list[Step]:
    """The six notebook executions of a report (01 three times: the fixed configuration, the student's, and the fixed
    configuration on the other backbone family), with absolute paths.

    classes: study only these classes (data.classes of both configurations, names or labels); the run and
    default figures directories then carry data.classes_tag (e.g. "fashion-mnist-default-classes-6-0-2-seed0").
    ablation_json, frontier_json, long_runs_json, spread_json: the committed tables notebooks 02 and 04 draw or check
    against (None: benchmarks/ablation/<dataset>-<profile>.json, benchmarks/backbones/<dataset>-{frontier,bar}.json,
    benchmarks/spread/<dataset>-<profile>.json where they exist and no class subset is asked for; "": none).

    Example:
        >>> [(s.notebook, s.parameters.get("config")) for s in plan("digits", "smoke")]  # doctest: +NORMALIZE_WHITESPACE
        [('01_train.ipynb', 'fixed'), ('01_train.ipynb', 'student'), ('01_train.ipynb', 'fixed-coupling'),
         ('02_overlap_diagnosis.ipynb', None), ('03_sampling.ipynb', None), ('04_report_figures.ipynb', None)]
    """
    from ..training.profiles import get_profile
    from .analysis import STUDENT_BACKBONE, configs

    get_profile(dataset, profile)  # ValueError for an unknown pair
    baselines = baselines or default_baselines(dataset)
    tag = classes_tag(dataset, classes)  # ValueError for an unknown class
    reports = project_path(reports_dir)
    figures = project_path(figures_dir or (default_figures_dir(dataset, profile) if not tag
                                           else f"figures/{dataset}-{profile}{tag}"))
    runs = project_path(runs_dir)
    run = {c: str(runs / run_name(dataset, profile, seed, c, tag)) for c in configs(dataset)}
    if ablation_json is None and not tag:  # the committed ablation of this dataset, when there is one
        committed = project_root() / "benchmarks" / "ablation" / f"{dataset}-{profile}.json"
        ablation_json = committed if committed.is_file() else ""
    ablation = str(project_path(ablation_json)) if ablation_json else ""
    committed = {}  # the committed hybrid frontier and long runs of both backbones (benchmarks/backbones_*.py),
    # and the spread of the report's numbers over seeds (benchmarks/report_seeds.py)
    for kind, given, folder, name in (("frontier", frontier_json, "backbones", f"{dataset}-frontier"),
                                      ("bar", long_runs_json, "backbones", f"{dataset}-bar"),
                                      ("spread", spread_json, "spread", f"{dataset}-{profile}")):
        path = project_root() / "benchmarks" / folder / f"{name}.json"
        if given is None:
            given = path if path.is_file() and not tag else ""
        committed[kind] = str(project_path(given)) if given else ""
    common = {"figures_dir": str(figures), "device": device}
    steps = []
    for config in configs(dataset):
        overrides: dict[str, Any] = {} if classes is None else {"data.classes": list(classes)}
        if config == "student":
            student = get_profile(dataset, profile, STUDENT_BACKBONE)
            overrides["runtime.epochs"] = min(student.runtime.epochs, STUDENT_MAX_EPOCHS)
            if student.runtime.max_minutes is not None:
                overrides["runtime.max_minutes"] = min(student.runtime.max_minutes, STUDENT_MAX_MINUTES)
        steps.append(Step(TRAIN, reports / f"{Path(TRAIN).stem}_{config}.ipynb", {
            **common, "dataset": dataset, "profile": profile, "config": config, "seed": seed, "overrides": overrides,
            "run_dir": run[config], "results_json": str(reports / f"{Path(TRAIN).stem}_{config}.json"), "data_root": data_root,
            "retrain": retrain, "progress_bars": False,
        }, f"train the {config} configuration"))
    steps.append(Step(OVERLAP, reports / OVERLAP, {
        **common, "fixed_run": run["fixed"], "student_run": run["student"], "ablation_json": ablation,
        "results_json": str(reports / "02_overlap.json"), "tsne": tsne, "seed": seed,
    }, "diagnose class overlap"))
    steps.append(Step(SAMPLING, reports / SAMPLING, {
        **common, "run_dir": run["fixed"], "results_json": str(reports / "03_sampling.json"), "seed": seed,
    }, "sample per class"))
    steps.append(Step(FIGURES, reports / FIGURES, {
        **common, "fixed_run": run["fixed"], "student_run": run["student"], "ablation_json": ablation,
        "other_run": run[configs(dataset)[2]],
        "results_json": str(reports / "04_report.json"), "table_md": str(figures / "results.md"),
        "baselines": baselines, "seed": seed, "frontier_json": committed["frontier"], "long_runs_json": committed["bar"],
        "spread_json": committed["spread"],
    }, "results table and summary figures"))
    return steps


def execute(step: Step, kernel_name: str = KERNEL, stream: bool = False) -> float:
    """Run one notebook with papermill; seconds taken. ReportError names the failing cell and the partial output.

    `stream`: copy the kernel's stdout / stderr (e.g. one line per training epoch) to ours as it runs.
    """
    import sys

    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = project_root() / "notebooks" / step.notebook
    if not source.is_file():
        raise ReportError(f"notebook {source} does not exist")
    step.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source), str(step.output), parameters=step.parameters, kernel_name=kernel_name,
            cwd=str(source.parent), progress_bar=False,
            stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None,
            # the kernel's own log at ERROR: ipykernel 7 warns once per kernel that its local TCP sockets are not
            # encrypted; warnings raised in cells still reach the output
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as err:
        raise ReportError(
            f"{step.notebook} failed in code cell [{err.exec_count}] (cell {err.cell_index} of the executed copy): "
            f"{err.ename}: {str(err.evalue).rstrip('.')}. The partially executed notebook is {step.output}"
        ) from err
    return time.perf_counter() - t0


def run_report(
    steps: list[Step], kernel_name: str = KERNEL, stream: bool = False, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Execute `steps` (from `plan`) in order with papermill, echoing progress; export each as HTML and index them.

    Each executed notebook is also written as HTML beside it (html_report.export_html: figures inline, no network
    needed) as soon as it finishes, and <reports>/index.html links them in order with the results table; the index is
    written even when a notebook fails or the run is interrupted, marking the notebooks that did not finish.

    Args:
        steps: the notebook executions, e.g. plan("digits", "default").
        kernel_name: the Jupyter kernel (python3).
        stream: copy the kernels' output (one line per epoch) to ours.
        echo: where progress lines go.

    Returns:
        {steps, seconds, figures_dir, table_md, table, index_html, html_seconds (the HTML export's share)}, also
        written to <reports>/report.json.

    Raises:
        ReportError: a notebook failed; the message names it, the cell and the partial output.

    Example (not a doctest: it executes the notebooks, a minute on the smoke profile; tests/study/
    test_notebooks.py runs exactly this and checks what it writes)::

        summary = run_report(plan("digits", "smoke", baselines="fast"))
        print(summary["table"])
    """
    t0, done, html_seconds, finished = time.perf_counter(), [], 0.0, False
    final = steps[-1].parameters
    table_md = Path(final["table_md"]) if "table_md" in final else None
    for step in steps:  # an earlier report's pages would pass for this one's on the index
        html_report.html_path(step.output).unlink(missing_ok=True)
    no_html = html_report.missing_exporter()  # the notebooks and their results do not need the pages
    if no_html:
        echo(f"no HTML pages: {no_html}")
    try:
        for i, step in enumerate(steps, 1):
            echo(f"[{i}/{len(steps)}] {step.notebook}: {step.title} ...")
            try:
                seconds = execute(step, kernel_name, stream)
            except ReportError as err:
                if err.__cause__ is not None and not no_html:  # papermill wrote the partial notebook, error marked
                    html_report.export_html(step.output)
                raise
            t1 = time.perf_counter()
            page = None if no_html else html_report.export_html(step.output)  # now: an interrupted report keeps them
            html_seconds += time.perf_counter() - t1
            done.append({"notebook": step.notebook, "output": str(step.output), "html": page and str(page),
                         "seconds": round(seconds, 1), "results_json": step.parameters.get("results_json")})
            also = "" if page is None else f" and {page.name}"
            echo(f"[{i}/{len(steps)}] {step.notebook}: done in {seconds:.0f} s -> {step.output}{also}")
        finished = True
    finally:  # also after a failure or Ctrl-C: the finished notebooks linked, the rest marked
        index = html_report.write_index(steps, table_md if finished else None)
    summary = {
        "steps": done, "seconds": round(time.perf_counter() - t0, 1),
        "figures_dir": final.get("figures_dir"),
        "table_md": str(table_md) if table_md else None,
        "table": table_md.read_text() if table_md and table_md.is_file() else "",
        "index_html": str(index), "html_seconds": round(html_seconds, 2),
    }
    write_json(steps[-1].output.parent / "report.json", summary)
    return summary


class FigureLog:
    """Save figures into one folder, remember their paths, and show the saved PNG (what the report ships)."""

    def __init__(self, folder: str | Path, show: bool = True) -> None:
        self.folder, self.show, self.paths = Path(folder), show, []

    def save(self, fig, name: str) -> Path:
        from .plotting import save_figure

        path = save_figure(fig, self.folder / name)
        self.paths.append(path)
        if self.show:
            from IPython.display import Image, display

            display(Image(filename=str(path)))
        return path

    def listing(self) -> list[str]:
        return [str(p) for p in self.paths]
