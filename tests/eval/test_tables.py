"""The one Markdown table writer (eval.tables.markdown_table): its format, that the project's tables go through it,
and that the committed tables are what the writers make of their committed inputs."""

import ast
import json
import re
from pathlib import Path

import pytest

from mixflow_core.eval.ood import markdown_ood_table
from mixflow_core.eval.tables import markdown_table
from mixflow_core.study import ablation
from mixflow_core.study.analysis import markdown_results, markdown_sample_quality
from mixflow_core.study.generative import markdown_calibration

ROOT = Path(__file__).resolve().parents[2]


def test_header_rule_and_rows():
    md = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert md == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
    assert markdown_table(["only"], []) == "| only |\n|---|"  # no rows: the header and the rule
    assert markdown_table(("x",), iter([("y",)])) == "| x |\n|---|\n| y |"  # any sequences, a generator of rows


def test_cells_are_written_as_str_and_pipes_are_escaped():
    md = markdown_table(["method", "n", "value"], [["p(y|x)", 360, None]]).splitlines()
    assert md[2] == "| p(y\\|x) | 360 | None |"  # "\|" renders as "|" and keeps the row at three cells
    assert len(re.split(r"(?<!\\)\|", md[2])) == len(re.split(r"(?<!\\)\|", md[0]))


def test_a_row_of_the_wrong_width_and_no_columns_raise():
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table([], [])


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module's code: its docstrings (and their doctest output) left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_other_module_assembles_a_markdown_table():
    """A Markdown rule ("|---|") is written in one place: every other writer passes its cells to markdown_table."""
    writers = sorted(p.relative_to(ROOT).as_posix()
                     for top in ("mixflow_core", "benchmarks") for p in (ROOT / top).rglob("*.py")
                     if any("---|" in s for s in _code_strings(p)))
    assert writers == ["mixflow_core/eval/tables.py"]


# -- the committed tables: the same inputs give the same bytes -------------------------------------------------
REPORTS = sorted(p.parent for p in (ROOT / "figures").rglob("results.json") if (p.parent / "results.md").is_file())


@pytest.mark.parametrize("folder", REPORTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_reports_tables_are_reproduced(folder):
    record, md = json.loads((folder / "results.json").read_text()), (folder / "results.md").read_text()
    assert markdown_results(record["rows"]) in md
    assert markdown_calibration(record["calibration"]) in md
    assert markdown_ood_table(record["ood"]) in md


# digits-default.md was written before the table's "steps" column (its rows, converted from mixflow 0.1, have no step
# counts, so today's writer gives that column "—"): strict, so that regenerating the file turns this into a failure
ABLATIONS = sorted((ROOT / "benchmarks" / "ablation").glob("*.json"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.name)
def test_the_ablation_tables_are_reproduced(path):
    assert ablation.markdown_table(ablation.read_rows(path)) + "\n" == path.with_suffix(".md").read_text()


def test_sample_quality_and_empty_tables():
    row = {"method": "flow", "temperature": 0.7, "c2st_knn_accuracy": 0.6, "c2st_logistic_accuracy": 0.7,
           "class_fidelity": 0.99, "frechet": 0.25, "n": 1000, "real_class_fidelity": 0.986}
    assert markdown_sample_quality([row]).splitlines() == [
        "| method | T | C2ST 1-NN | C2ST logistic | class fidelity (real: 0.986) | Fréchet (PCA-50) | samples |",
        "|---|---|---|---|---|---|---|",
        "| flow | 0.7 | 0.600 | 0.700 | 0.990 | 0.250 | 1000 |"]
    empty = markdown_sample_quality([]).splitlines()
    assert empty[0].endswith("| class fidelity (real: —) | Fréchet (PCA-50) | samples |") and len(empty) == 2
    assert markdown_results([]).count("\n") == 1 and markdown_calibration([]).count("\n") == 1
