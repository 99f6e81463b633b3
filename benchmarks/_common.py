"""Shared helpers for the benchmark scripts: the header (command, machine) and Markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import torch

from mixflow_core.eval.tables import markdown_table


def header(threads: int) -> str:
    """Command line, date and machine facts as Markdown lines."""
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return "\n".join([
        f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {threads}, load average at start (1/5/15 min) {load}",
    ])


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dicts (floats to 4 significant digits, None empty): eval.tables.markdown_table."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    return markdown_table(columns, ([fmt(r.get(c)) for c in columns] for r in rows))


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timed(f, spent: list[float]):
    """f, wrapped to add its wall-clock seconds per call to spent[0] (for monkeypatching a library function)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = f(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out
    return wrapper


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of an n x n float32 matmul on this machine now (the reference a step's achieved GFLOP/s is set against)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9
