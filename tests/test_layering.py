"""The package's layers import one way only: flows, data <- eval <- training <- study <- cli.

The check walks every module's imports with `ast` (absolute and relative, at any depth of the
file, including imports inside functions), so it needs no third-party tool and sees what
Python would import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixflow_core"

# rank of each top-level part of mixflow_core; a module may import its own part or parts of lower rank.
# flows and data share rank 0 but are separate parts: neither may import the other.
RANKS = {"version": -1, "flows": 0, "data": 0, "eval": 1, "training": 2, "study": 3, "cli": 4, "__main__": 5,
         "__init__": 5}


def _part(module: tuple[str, ...]) -> str:
    """('training', 'fit') -> 'training'; () (the package itself) -> '__init__'."""
    return module[0] if module else "__init__"


def _imported_modules(path: Path, package_root: Path, name: str) -> list[tuple[tuple[str, ...], int]]:
    """(module path inside the package, line) for every import of the package that `path` makes."""
    own = path.relative_to(package_root).with_suffix("").parts
    own_pkg = own[:-1]  # the package a relative import starts from (also for __init__.py)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb node.level - 1 packages from the module's own package
                base = own_pkg[: len(own_pkg) - (node.level - 1)]
                target = base + tuple(node.module.split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == name:
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if not target:  # `from . import x` / `from mixflow_core import x`: x may be a submodule
                found.extend(((a.name,), node.lineno) for a in node.names)
            else:
                found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == name:
                    found.append((tuple(parts[1:]), node.lineno))
    return found


def layering_violations(package_root: Path, name: str = "mixflow_core") -> list[str]:
    """'file:line imports X (part, rank r) from part p (rank q)' for every import that goes up or sideways."""
    out = []
    for path in sorted(package_root.rglob("*.py")):
        own = path.relative_to(package_root).with_suffix("").parts
        own_part = _part(own) if own != ("__init__",) else "__init__"
        if own_part not in RANKS:
            out.append(f"{path.relative_to(package_root)}: not in a known layer {sorted(RANKS)}")
            continue
        for target, line in _imported_modules(path, package_root, name):
            part = _part(target)
            if part == own_part or part not in RANKS:
                continue  # within its own layer (or a name that is not a module of the package)
            if RANKS[part] >= RANKS[own_part] and part != "version":
                out.append(f"{path.relative_to(package_root)}:{line} imports {'.'.join(target)} "
                           f"({part}, rank {RANKS[part]}) from {own_part} (rank {RANKS[own_part]})")
    return out


def test_the_package_imports_one_way():
    assert layering_violations(PACKAGE) == []


def test_every_layer_exists():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts == {"flows", "data", "eval", "training", "study"}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mixflow_core"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for folder in {(root / rel).parent for rel in files}:
        (folder / "__init__.py").touch()
    return root


@pytest.mark.parametrize("source", [
    "from ..training.fit import fit\n",  # relative, upward
    "from mixflow_core.study import plotting\n",  # absolute, upward
    "import mixflow_core.eval.metrics\n",  # plain import, upward
    "def f():\n    from ..cli import main\n",  # hidden inside a function
    "from ..data import load_data\n",  # sideways: flows and data are separate parts
    "from .. import cli\n",  # a submodule named through the package
])
def test_the_check_fails_on_an_upward_import(tmp_path, source):
    root = _tree(tmp_path, {"flows/model.py": source, "training/fit.py": "", "study/plotting.py": "",
                            "eval/metrics.py": "", "cli.py": "", "data/datasets.py": ""})
    violations = layering_violations(root)
    assert len(violations) == 1 and violations[0].startswith("flows/model.py:"), violations


def test_the_check_allows_downward_and_own_layer_imports(tmp_path):
    root = _tree(tmp_path, {
        "flows/model.py": "from .priors import x\nfrom ..version import __version__\n",
        "flows/priors.py": "",
        "eval/metrics.py": "from ..flows.model import MixtureFlow\nfrom ..data import Splits\n",
        "study/report.py": "from ..training import runs\nfrom mixflow_core.eval.metrics import evaluate\n",
        "cli.py": "from .study.report import plan\n",
        "data/datasets.py": "", "training/runs.py": "", "version.py": "",
    })
    assert layering_violations(root) == []


SHARED_FLOWS = ("layers", "preprocess", "priors", "objectives")  # used by both backbone families
FAMILIES = ("iresnet", "coupling")  # flows/iresnet/ (a package) and flows/coupling.py


def family_imports(package_root: Path, name: str = "mixflow_core") -> list[str]:
    """'flows/X.py:line imports flows.F...' for every import of a backbone family by a shared flows module, and of one
    family by the other."""
    out = []
    flows = package_root / "flows"
    sources = [(flows / f"{m}.py", None) for m in SHARED_FLOWS]
    sources += [(p, "iresnet") for p in sorted((flows / "iresnet").glob("*.py"))] + [(flows / "coupling.py", "coupling")]
    for path, own in sources:
        if not path.exists():
            continue
        for target, line in _imported_modules(path, package_root, name):
            if len(target) >= 2 and target[0] == "flows" and target[1] in FAMILIES and target[1] != own:
                out.append(f"{path.relative_to(package_root)}:{line} imports {'.'.join(target)}")
    return out


def test_shared_flows_modules_import_neither_backbone_family():
    assert all((PACKAGE / "flows" / f"{m}.py").exists() for m in SHARED_FLOWS)
    assert family_imports(PACKAGE) == []


def test_training_and_evaluation_import_no_backbone_family():
    """training/ and eval/ reach a backbone through its hooks (flows.layers.Flow), never by its family's names."""
    found = []
    for part in ("training", "eval"):
        for path in sorted((PACKAGE / part).rglob("*.py")):
            for target, line in _imported_modules(path, PACKAGE, "mixflow_core"):
                if len(target) >= 2 and target[0] == "flows" and target[1] in FAMILIES:
                    found.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)}")
    allowed = {"training/profiles.py"}  # the named profiles choose a family's estimators, by design
    assert [f for f in found if f.split(":")[0] not in allowed] == []


def test_the_family_check_fails_on_a_shared_module_importing_a_family(tmp_path):
    root = _tree(tmp_path, {"flows/layers.py": "from .iresnet.logdet import Exact\n", "flows/preprocess.py": "",
                            "flows/priors.py": "", "flows/objectives.py": "", "flows/coupling.py": "",
                            "flows/iresnet/network.py": "from ..coupling import build_coupling\n"})
    assert sorted(v.split(":")[0] for v in family_imports(root)) == ["flows/iresnet/network.py", "flows/layers.py"]
