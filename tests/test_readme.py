"""The README's and docs/library.md's Python examples run as written (every ```python block of a file, in order,
in one namespace per file)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_blocks(path: Path, at_least: int) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= at_least, f"{path.name} lost its library examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - the docs are ours
    return namespace


def test_readme_python_blocks_run():
    namespace = run_blocks(ROOT / "README.md", 1)
    assert 0.0 <= namespace["accuracy"] <= 1.0


def test_library_doc_python_blocks_run():
    namespace = run_blocks(ROOT / "docs" / "library.md", 2)
    assert namespace["p"].sum(1).allclose(namespace["p"].new_ones(32))  # posterior rows sum to 1
    assert namespace["samples"].shape == (16, 64)
    history = namespace["history"]
    assert len(history.epochs) == 3 and history.stopped == "completed"
