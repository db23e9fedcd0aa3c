"""Handouts: execute the workbook with papermill and render instructor and student HTML with nbconvert.

``python -m fdistill_lab.handouts [--smoke] [--only 01_f_divergences ...] [--build build]`` writes
``build/executed/<nb>.ipynb``, ``build/html/instructor/<nb>.html`` and ``build/html/student/<nb>.html``
(solution regions replaced by the exercise stub; notebook_conventions.md sections 5 and 6).
Each notebook gets ``output_dir=<build>/outputs/<nb>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .student import student_notebook

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Handout:
    name: str
    executed: Path
    instructor_html: Path
    student_html: Path
    seconds: float


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
    """Execute one notebook (cwd: its folder) and render both HTML versions."""
    import papermill as pm

    executed = build / "executed" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {"smoke": smoke, "output_dir": str((build / "outputs" / path.stem).resolve())}
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(executed), parameters=params, kernel_name="python3", cwd=str(path.parent),
                        progress_bar=False, execution_timeout=cell_timeout)
    seconds = time.perf_counter() - start
    nb = nbformat.read(executed, as_version=4)
    instructor = render_html(nb, build / "html" / "instructor" / f"{path.stem}.html")
    student = render_html(student_notebook(nb, path.name, clear_outputs=False),
                          build / "html" / "student" / f"{path.stem}.html")
    return Handout(path.stem, executed, instructor, student, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.handouts", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run with -p smoke True (small sizes)")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook names, e.g. 01_f_divergences")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder of the notebooks")
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="build folder")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in select_notebooks(args.notebooks, args.only):
        h = make_handout(path, args.build, args.smoke, args.cell_timeout)
        print(f"{h.name}: executed in {h.seconds:.1f} s -> {h.instructor_html}, {h.student_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
