"""Every name of the package that the documentation mentions exists, so stale text cannot survive a rename.

The documents: README.md, docs/*.md (globbed when the test runs) and benchmarks/RESULTS.md. In them, a
backticked span `...` is a *reference* (and must resolve) by exactly these rules; every other span is ordinary
code (a command, a value, a formula, a config override) and is not checked:

1. A dotted name `a.b.c` (a trailing call `(...)` is dropped: `baselines.gaussian_baseline(data, seed=s)`)
   whose first part is `mixflow_core`, the name of a module or subpackage of the package at any depth
   (`fit`, `runs`, `ood`, `eval`, `study`, `lipschitz`, ...) or a name the package root exports (`MixtureFlow`,
   `ModelConfig`, ...). Resolves when some module of that name (`config` is flows.config and training.config)
   has the rest as attributes or submodules; on a class also a dataclass field or an attribute its code assigns
   (`self.name`). Not references: spans whose first part is a section of RunConfig (`data`, `model`, `prior`,
   `train`, `runtime`: `--set` paths such as `data.seed`, even where `data` or `model` is also a module's name),
   and file names (`config.json`, `tables.pt`: the last part is a file extension).
2. A path ending in .py or .ipynb (`flows/coupling.py`, `benchmarks/gpu_check.py`, `fit.py`): resolves when a
   file of the source folders (SOURCES) has that path or ends with "/" + it.
3. A folder path ending in "/" that starts with a source folder (`tests/flows/`, `benchmarks/ablation/`):
   resolves when that folder exists. Other folders (`flows/`, `runs/report/`, `data/fashion-mnist/`) are not
   checked: they are relative to a context, or made by running the project.
4. In a Markdown table row that names package files (rule 2 spans under mixflow_core/ or benchmarks/; where the
   row names no file, the package folders it names, rule 3 or like `iresnet/`), every other span that is a bare
   identifier (`_save`, `ensure_run`, `settled()`, `load_run(s)`: the part before any "(") must occur as a word in
   one of those files. This is what catches the layout table's "fit.py: ... `_save`" after `_save` is renamed.
   Signatures (spans with "->", `est(g, x) -> (g(x), logdet)`) are left out: their names may be placeholders.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mixflow_core"
SOURCES = ("mixflow_core", "benchmarks", "tests", "notebooks")  # the folders a path reference may point into
CODE_SOURCES = ("mixflow_core", "benchmarks")  # the folders whose files a table row's names are looked up in
EXTENSIONS = {"py", "ipynb", "json", "md", "pt", "png", "txt", "log", "sh", "yml", "yaml", "toml", "csv", "npz",
              "pdf", "html"}
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
FILE = re.compile(r"[\w.\-/]*\w\.(?:py|ipynb)")
FOLDER = re.compile(r"[\w.\-/]+/")


def documents(root: Path = ROOT) -> list[Path]:
    """README.md, docs/*.md and benchmarks/RESULTS.md, those that exist."""
    found = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "RESULTS.md"]
    return [p for p in found if p.is_file()]


def _without_call(span: str) -> str:
    """`f(x, y=1)` -> `f`; `load_run(s)` -> `load_run`; `settled()` -> `settled`; anything else as it is."""
    return span.split("(", 1)[0] if "(" in span else span


# -- what exists --------------------------------------------------------------------------------------------
@cache
def source_files(root: Path = ROOT) -> tuple[str, ...]:
    """Repository-relative paths of every file under the source folders (caches and hidden folders left out)."""
    out = []
    for top in SOURCES:
        for p in (root / top).rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                out.append(rel.as_posix())
    return tuple(sorted(out))


@cache
def module_names(root: Path = ROOT) -> dict[str, tuple[str, ...]]:
    """{short name: dotted modules}: "fit" -> ("mixflow_core.training.fit",), "config" -> flows' and training's."""
    names: dict[str, list[str]] = {}
    for rel in source_files(root):
        if rel.startswith(PACKAGE + "/") and rel.endswith(".py"):
            parts = rel[:-3].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] != "__main__":
                names.setdefault(parts[-1], []).append(".".join(parts))
    return {k: tuple(v) for k, v in names.items()}


@cache
def config_sections() -> frozenset[str]:
    """RunConfig's sections (data, model, prior, train, runtime): the first part of a `--set` path."""
    from mixflow_core.training.config import RunConfig

    return frozenset(f.name for f in dataclasses.fields(RunConfig))


@cache
def root_exports() -> frozenset[str]:
    import mixflow_core

    return frozenset(mixflow_core.__all__)


def _has(obj: object, name: str) -> bool:
    """obj.name exists: an attribute, a submodule, a dataclass field, or an attribute a class's code assigns."""
    if hasattr(obj, name):
        return True
    if inspect.ismodule(obj):
        try:
            importlib.import_module(f"{obj.__name__}.{name}")
            return True
        except ModuleNotFoundError:
            return False
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            return True
        for cls in obj.__mro__:  # instance attributes: nn.Module submodules, buffers, plain self.x = ...
            try:
                if re.search(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]*)?=", inspect.getsource(cls)):
                    return True
            except (OSError, TypeError):  # builtins and C types have no source
                continue
    return False


def _get(obj: object, name: str) -> object:
    if hasattr(obj, name):
        return getattr(obj, name)
    if inspect.ismodule(obj):
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ModuleNotFoundError:
            pass
    return None  # a field or instance attribute: nothing further to walk into


def _walks(obj: object, rest: list[str]) -> bool:
    for name in rest:
        if obj is None or not _has(obj, name):
            return False
        obj = _get(obj, name)
    return True


def resolve_dotted(span: str) -> bool:
    """Rule 1: the dotted name exists in the package."""
    first, *rest = span.split(".")
    if first == PACKAGE:
        return _walks(importlib.import_module(PACKAGE), rest)
    if first in module_names():
        return any(_walks(importlib.import_module(m), rest) for m in module_names()[first])
    import mixflow_core

    return _walks(getattr(mixflow_core, first), rest)


def file_matches(span: str, root: Path = ROOT) -> list[str]:
    """Rule 2: the source files whose path is `span` or ends with "/" + `span`."""
    return [f for f in source_files(root) if f == span or f.endswith("/" + span)]


def folder_matches(span: str, under: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """Source folders (under the given top folders) whose path is `span` or ends with "/" + `span` (span ends in /)."""
    folders = {f.rsplit("/", 1)[0] + "/" for f in source_files(root) if "/" in f}
    folders |= {"/".join(f.split("/")[:i]) + "/" for f in list(folders) for i in range(1, f.count("/"))}
    return sorted(d for d in folders if d.split("/")[0] in under and (d == span or d.endswith("/" + span)))


# -- which spans are references -----------------------------------------------------------------------------
def classify(span: str) -> str | None:
    """"dotted", "file", "folder" (rules 1-3) or None: an ordinary code span."""
    span = span.strip()
    if FILE.fullmatch(span):
        return "file"
    if FOLDER.fullmatch(span):
        return "folder" if span.split("/")[0] in SOURCES else None
    name = _without_call(span)
    if DOTTED.fullmatch(name):
        first, last = name.split(".")[0], name.split(".")[-1]
        if last in EXTENSIONS or first in config_sections():
            return None
        if first == PACKAGE or first in module_names() or first in root_exports():
            return "dotted"
    return None


def check_span(span: str, root: Path = ROOT) -> str | None:
    """Why a reference does not resolve (None: it does, or it is no reference)."""
    span = span.strip()
    kind = classify(span)
    if kind == "dotted" and not resolve_dotted(_without_call(span)):
        return "no such module or attribute in the package"
    if kind == "file" and not file_matches(span, root):
        return f"no such file under {', '.join(SOURCES)}"
    if kind == "folder" and not (root / span).is_dir():
        return "no such folder"
    return None


def _row_files(spans: list[str], root: Path = ROOT) -> list[str]:
    """The package / benchmark files a table row names (rule 4): its .py files, else its folders' files."""
    files = [f for s in spans if FILE.fullmatch(s) for f in file_matches(s, root) if f.split("/")[0] in CODE_SOURCES]
    if files:
        return files
    folders = [d for s in spans if FOLDER.fullmatch(s) for d in folder_matches(s, CODE_SOURCES, root)]
    return [f for f in source_files(root) if f.endswith(".py") and any(f.startswith(d) for d in folders)]


def stale_names(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: `span` (why)' for every reference of one document that does not resolve."""
    out = []
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    in_fence = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence  # code blocks are examples (tests/test_readme.py runs the README's)
            continue
        if in_fence:
            continue
        spans = [s.strip() for s in SPAN.findall(line)]
        for span in spans:
            why = check_span(span, root)
            if why:
                out.append(f"{rel}:{number}: `{span}` ({why})")
        if line.lstrip().startswith("|"):
            files = _row_files(spans, root)
            if not files:
                continue
            text = "\n".join((root / f).read_text() for f in files)
            for span in spans:
                name = _without_call(span).strip()
                if "->" in span:  # a signature shows a protocol, its name may be a placeholder: `est(g, x) -> ...`
                    continue
                if IDENTIFIER.fullmatch(name) and not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text):
                    out.append(f"{rel}:{number}: `{span}` (not in {', '.join(files)}, which the row describes)")
    return out


# -- the documents ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_name_the_documents_mention_exists(doc):
    stale = stale_names(doc)
    assert stale == [], "stale references:\n" + "\n".join(stale)


def test_the_documents_are_found():
    names = [p.relative_to(ROOT).as_posix() for p in documents()]
    assert names[0] == "README.md" and names[-1] == "benchmarks/RESULTS.md"


# -- the rule itself ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("span", [
    "fit.fit", "study.report.plan", "mixflow_core.eval.ood.ood_table", "runs.ensure_run", "ood.ood_table",
    "config.RunConfig", "lipschitz.operator_norm", "MixtureFlow.log_prob_all", "ModelConfig.alpha",
    "baselines.gaussian_baseline(data, seed=s)", "eval.tables.markdown_table", "flows/coupling.py", "fit.py",
    "benchmarks/gpu_check.py", "tests/flows/", "notebooks/04_report_figures.ipynb",
])
def test_references_that_resolve(span):
    assert classify(span) is not None, span
    assert check_span(span) is None, span


@pytest.mark.parametrize("span", [
    "fit._save", "mixflow_core.eval.ood.no_such_name", "runs.no_such_function", "flows/lipschitz.py",
    "ModelConfig.no_such_field", "tests/no_such_folder/", "benchmarks/no_such_script.py",
])
def test_stale_references_are_found(span):
    assert check_span(span) is not None, span


@pytest.mark.parametrize("span", [
    "data.seed", "model.n_terms", "train.beta", "runtime.*", "config.json", "tables.pt", "metrics.json",
    "torch.equal", "nf.flows.Residual", "student", "--set", "make test", "runs/report/", "data/fashion-mnist/",
    "figures/*/results.md", "python -m mixflow_core", "x + g(x)", "p(y|x)",
])
def test_ordinary_code_spans_are_no_references(span):
    assert classify(span) is None, span


def test_a_table_row_names_only_what_its_file_has(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("| layer | module | contents |\n|---|---|---|\n"
                   "| | `fit.py` | `fit(model, data) -> History` in steps (`_validate`, `_save`), `est(g) -> x` |\n"
                   "```\n`fit._save` in a code block is an example\n```\n")
    assert stale_names(doc) == [f"{doc}:3: `_save` (not in mixflow_core/training/fit.py, which the row describes)"]
