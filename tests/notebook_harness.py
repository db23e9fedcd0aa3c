"""Shared papermill-in-pytest harness (notebook_conventions.md section 4).

``run_notebook(name, tmp_path, parameters=..., budget_s=...)`` executes ``notebooks/<name>`` in smoke
mode with cwd ``notebooks/`` (or ``cwd``), kernel ``python3``, ``output_dir=tmp_path``; rejects parameter names the
notebook does not declare; checks the time budget (printing the slowest cells) and that a figure was
drawn; keeps the executed copy in ``build/executed/``; returns ``(executed notebook, records)``.
``run_notebook_expecting_error`` runs a bad configuration and returns the papermill error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm

from fdistill_lab.course.records import read_records

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "build" / "executed"
CELL_TIMEOUT_S = 300


def notebook_path(name: str) -> Path:
    path = NOTEBOOKS / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; notebooks: {sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))}")
    return path


def declared_parameters(name: str) -> dict[str, Any]:
    """Parameters of the notebook's `parameters` cell as papermill sees them."""
    return pm.inspect_notebook(str(notebook_path(name)))


def prepare_environment() -> None:
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.pop("MPLBACKEND", None)
    os.environ.setdefault("FDISTILL_THREADS", "2")
    # the kernel must import this checkout even if the editable install points elsewhere (e.g. a CI clone)
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def _execute(name: str, tmp_path: Path, parameters: dict[str, Any], suffix: str,
             cwd: Path = NOTEBOOKS, cell_timeout_s: float = CELL_TIMEOUT_S) -> tuple[Path, Any]:
    path = notebook_path(name)
    params = {"smoke": True, "output_dir": str(tmp_path), **parameters}
    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / f"{path.stem}{suffix}.ipynb"
    prepare_environment()
    try:
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name="python3", cwd=str(cwd),
                            progress_bar=False, execution_timeout=cell_timeout_s, log_output=False)
    except pm.PapermillExecutionError as err:
        return out, err
    return out, None


def slowest_cells(nb: nbformat.NotebookNode, n: int = 5) -> list[tuple[float, int, str]]:
    """(seconds, index, first line) of the n slowest code cells, from papermill's metadata."""
    rows = []
    for i, cell in enumerate(nb.cells):
        dur = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.cell_type == "code" and dur is not None:
            rows.append((float(dur), i, cell.source.strip().splitlines()[0] if cell.source.strip() else ""))
    return sorted(rows, reverse=True)[:n]


def count_images(nb: nbformat.NotebookNode) -> int:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return sum("image/png" in o.get("data", {}) for o in outputs)


def run_notebook(name: str, tmp_path: Path, parameters: dict[str, Any] | None = None, budget_s: float = 60.0,
                 min_images: int = 1, cwd: Path = NOTEBOOKS, cell_timeout_s: float = CELL_TIMEOUT_S
                 ) -> tuple[nbformat.NotebookNode, dict[str, Any]]:
    """Execute a notebook in smoke mode (launched from ``cwd``) and return (executed notebook, recorded results).
    ``cell_timeout_s``: the longest one cell may run (a full study's cell that waits for its grid needs more)."""
    parameters = dict(parameters or {})
    declared = declared_parameters(name)
    unknown = sorted(set(parameters) - set(declared))
    assert not unknown, f"unknown parameter(s) {unknown} for {name}; declared: {sorted(declared)}"
    out, err = _execute(name, Path(tmp_path), parameters, "", cwd, cell_timeout_s)
    nb = nbformat.read(out, as_version=4)
    if err is not None:
        raise AssertionError(f"{name} failed (executed copy: {out}):\n{err}")
    duration = float(nb.metadata.get("papermill", {}).get("duration") or 0.0)
    slow = "\n".join(f"  {s:6.1f} s  cell {i}: {line}" for s, i, line in slowest_cells(nb))
    assert duration <= budget_s, f"{name} took {duration:.1f} s > budget {budget_s} s; slowest cells:\n{slow}"
    images = count_images(nb)
    assert images >= min_images, f"{name} drew {images} figure(s) (image/png outputs); expected >= {min_images}"
    return nb, read_records(tmp_path)


def run_notebook_expecting_error(name: str, tmp_path: Path, parameters: dict[str, Any]) -> pm.PapermillExecutionError:
    """Execute with (deliberately bad) parameters, without the harness's own name check; return the error."""
    out, err = _execute(name, Path(tmp_path), dict(parameters), "_error")
    assert err is not None, f"{name} ran without error with parameters {parameters}"
    return err


def assert_rejected_before_writing(name: str, tmp_path: Path, parameters: dict[str, Any], message: str) -> None:
    """Bad parameters stop the notebook in its setup cell (the first code cell after the parameters) with
    an error containing ``message``, before anything is written to ``output_dir``."""
    out = Path(tmp_path) / "out"
    err = run_notebook_expecting_error(name, out, parameters)
    assert message in str(err.evalue), f"expected {message!r} in the error; got {err.ename}: {err.evalue}"
    assert "setup_notebook(globals()" in err.source, f"the error must come from the setup cell, not:\n{err.source}"
    assert not out.exists(), f"output_dir was created on bad input: {sorted(out.rglob('*'))}"
