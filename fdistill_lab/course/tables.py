"""Markdown tables for the results documents in ``docs/`` (printed by the ``scripts/notebookNN_tables.py``
scripts from a run's ``results.json``, so a rerun goes into a document without copying numbers by hand)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import stats
from .records import RESULTS_FILE


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; ValueError when a row's length differs from the header's."""
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {list(row)}")
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def comparison_table(intervals: Mapping[str, Sequence[Mapping[str, Any]]], first: str = "measure",
                     against: str = "minus the baseline", digits: int = 3) -> str:
    """``{measure: stats.compare rows}`` as one table: measure, setting, mean [95% CI], the paired difference
    against the baseline [95% CI] and the verdict."""
    rows = []
    for measure, compared in intervals.items():
        for r in compared:
            diff = stats.row_text(r, diff=True, digits=digits) if r["verdict"] != "baseline" else "-"
            rows.append([measure, r["name"], stats.row_text(r, digits=digits), diff, r["verdict"]])
    return markdown_table([first, "setting", "mean [95% CI]", against, "verdict"], rows)


def run_records(run: str | Path, notebook: str, required: Sequence[str]) -> dict[str, Any]:
    """The ``results.json`` of a notebook's output folder ``run``; ValueError naming what to do when the file is
    missing or lacks one of the ``required`` records (written by an older version of the notebook)."""
    path = Path(run) / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"no {RESULTS_FILE} in {run}: run notebook {notebook} with -p output_dir {run} first")
    rec = json.loads(path.read_text())
    missing = [k for k in required if k not in rec]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} record: it was written by an older notebook "
                         f"{notebook}; rerun it")
    return rec
