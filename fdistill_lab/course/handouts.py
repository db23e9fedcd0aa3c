"""Handouts: execute the workbook with papermill and render instructor and student HTML with nbconvert.

``python -m fdistill_lab.handouts [--smoke] [--only 01_f_divergences ...] [--build build]`` writes, under
``<build>/handouts/<full|smoke>/``, ``executed/<nb>.ipynb``, ``html/instructor/<nb>.html`` and
``html/student/<nb>.html`` (solution regions replaced by the exercise stub, as :mod:`.student_copies` does). Each
notebook runs in a fresh ``outputs/<nb>`` folder there, so a handout shows a complete run (notebook 04 retrains its
small teacher). Notebooks in ``ALWAYS_SMOKE`` (05 and 06: their full runs are multi-GPU training)
run in smoke mode in both builds. A notebook that fails is still rendered, with its error, and the next
ones run; the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .student_copies import student_notebook

ROOT = Path(__file__).resolve().parents[2]
ALWAYS_SMOKE = {"05_imagenet": "its full run is days of multi-GPU ImageNet training",
                "06_text_to_image": "its full run is a multi-GPU Stable Diffusion distillation"}


@dataclass
class Handout:
    name: str
    executed: Path
    instructor_html: Path
    student_html: Path
    seconds: float
    smoke: bool
    error: str | None = None


def select_notebooks(notebooks_dir: Path, only: list[str] | None) -> list[Path]:
    """Notebooks in ``notebooks_dir`` (all ``NN_*.ipynb``, or those named in ``only``, with or without .ipynb)."""
    available = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        if not available:
            raise FileNotFoundError(f"no NN_*.ipynb notebooks in {notebooks_dir}")
        return available
    by_stem = {p.stem: p for p in available}
    chosen = []
    for name in only:
        stem = name.removesuffix(".ipynb")
        if stem not in by_stem:
            raise ValueError(f"unknown notebook {name!r}; available: {', '.join(by_stem) or 'none'}")
        chosen.append(by_stem[stem])
    return chosen


def render_html(nb: nbformat.NotebookNode, out: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def make_handout(path: Path, build: Path, smoke: bool, cell_timeout: int = 600) -> Handout:
    """Execute one notebook (cwd: its folder) in a fresh output folder and render both HTML versions."""
    import papermill as pm

    root = build / "handouts" / ("smoke" if smoke else "full")
    executed = root / "executed" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    output_dir = root / "outputs" / path.stem
    shutil.rmtree(output_dir, ignore_errors=True)  # no stale records, no resumed runs
    run_smoke = smoke or path.stem in ALWAYS_SMOKE
    params = {"smoke": run_smoke, "output_dir": str(output_dir.resolve())}
    start = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(str(path), str(executed), parameters=params, kernel_name="python3",
                            cwd=str(path.parent), progress_bar=False, execution_timeout=cell_timeout)
    except pm.PapermillExecutionError as exc:  # the executed copy holds the traceback: render it anyway
        error = f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # noqa: BLE001 - a cell timeout or a dead kernel: render what ran, go on with the next
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
        if not executed.is_file():
            raise
    seconds = time.perf_counter() - start
    nb = nbformat.read(executed, as_version=4)
    instructor = render_html(nb, root / "html" / "instructor" / f"{path.stem}.html")
    student = render_html(student_notebook(nb, path.name, clear_outputs=False),
                          root / "html" / "student" / f"{path.stem}.html")
    return Handout(path.stem, executed, instructor, student, seconds, run_smoke, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.handouts", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run with -p smoke True (small sizes)")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook names, e.g. 01_f_divergences")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder of the notebooks")
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="build folder")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    for path in select_notebooks(args.notebooks, args.only):
        h = make_handout(path, args.build, args.smoke, args.cell_timeout)
        note = f" (smoke mode: {ALWAYS_SMOKE[h.name]})" if h.smoke and not args.smoke and h.name in ALWAYS_SMOKE else ""
        status = f"FAILED ({h.error})" if h.error else "executed"
        print(f"{h.name}: {status} in {h.seconds:.1f} s{note} -> {h.instructor_html}, {h.student_html}")
        if h.error:
            failed.append(h.name)
    if failed:
        print(f"error: {len(failed)} notebook(s) failed: {', '.join(failed)}; their handouts show the error",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
