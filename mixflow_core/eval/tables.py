"""Markdown tables: the one writer of the package's result tables (and the benchmarks').

Every table the project writes (OOD detection, results, sample quality, calibration, ablation, the benchmark
scripts' tables) is a GitHub-flavoured Markdown "pipe table": a header line, a rule `|---|---|`, one line per
row, each line `| a | b |`. `markdown_table` assembles one; what goes into a cell (digits, units, "—" for a
missing number) is the caller's choice, because each table formats its numbers its own way.

It lives in eval/ because eval is the lowest layer that writes tables (eval.ood), so every writer above it
(study.analysis, study.generative, study.ablation, the benchmark scripts) may import it
(tests/test_layering.py: flows, data <- eval <- training <- study <- cli); flows/ and data/ write none.
The module imports nothing, so importing it costs nothing beyond the package itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_table"]


def _cell(value: object) -> str:
    # a "|" inside a cell would end it early and shift the row's columns: escape it (rendered as "|")
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown pipe table: `| h1 | h2 |`, `|---|---|`, then `| c1 | c2 |` per row, joined by newlines.

    Args:
        header: the column titles, one per column (at least one).
        rows: the rows, each a sequence of exactly len(header) cells, already formatted: a cell is written as
            str(cell), so pass "0.986" rather than 0.9861 and "—" (or "") for a missing value. A "|" in a cell
            or title is escaped as "\\|", which Markdown renders as "|".

    Returns:
        The table without a trailing newline (2 + len(rows) lines).

    Raises:
        ValueError: no columns, or a row whose number of cells is not the header's.

    Example:
        >>> print(markdown_table(["method", "accuracy"], [["flow", f"{0.98611:.4f}"], ["p(y|x)", "—"]]))
        | method | accuracy |
        |---|---|
        | flow | 0.9861 |
        | p(y\\|x) | — |
    """
    header = list(header)
    if not header:
        raise ValueError("a Markdown table needs at least one column")
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {row!r}")
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    return "\n".join(lines)
