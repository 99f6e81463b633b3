"""The README's library examples run as written (every ```python block, in order, in one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its library examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    assert namespace["p"].sum(1).allclose(namespace["p"].new_ones(32))  # posterior rows sum to 1
    assert namespace["samples"].shape == (16, 64)
    history = namespace["history"]
    assert len(history.epochs) == 3 and history.stopped == "completed"
