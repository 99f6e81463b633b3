"""Files that never end up half written, and JSON that holds no NaN.

Every file the package writes (checkpoints, config.json, history, metrics, ablation tables)
goes through `atomic_write`: the content lands in a temporary file beside the target, which
then replaces it in one os.replace, so a crash or kill leaves the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "save_torch", "write_json", "write_text", "read_json", "json_safe"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# Lists of numbers go on one line (confusion matrices); JSON strings hold no raw newline, so they never match.
_NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN / inf float replaced by None (JSON has no such numbers), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically, NaN / inf as null, short number lists on one line."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    return write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    """JSON from `path`; ValueError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
