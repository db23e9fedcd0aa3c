"""Time each notebook with papermill at classroom defaults (and, with --smoke, in smoke mode).

Usage: python scripts/time_notebooks.py [--smoke] [--only 01_f_divergences ...]
Prints a Markdown table (wall seconds, including kernel start-up) for the README's syllabus. Outputs go
to a temporary folder; executed copies to build/executed/<nb>_<mode>.ipynb.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import papermill as pm

from fdistill_lab.course.handouts import select_notebooks
from fdistill_lab.train.dist import NEEDS_CUDA

ROOT = Path(__file__).resolve().parents[1]


def time_notebook(path: Path, smoke: bool, out_root: Path) -> float:
    mode = "smoke" if smoke else "full"
    executed = ROOT / "build" / "executed" / f"{path.stem}_{mode}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {"smoke": smoke, "output_dir": str(out_root / f"{path.stem}_{mode}")}
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(executed), parameters=params, kernel_name="python3", cwd=str(path.parent),
                        progress_bar=False)
    return time.perf_counter() - start


def _cell(times: dict[str, float | None], mode: str) -> str:
    if mode not in times:
        return "-"
    return "GPU only" if times[mode] is None else f"{times[mode]:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="also time smoke mode")
    parser.add_argument("--smoke-only", action="store_true", help="time smoke mode only")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook names, e.g. 01_f_divergences")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    modes = [True] if args.smoke_only else ([False, True] if args.smoke else [False])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in select_notebooks(ROOT / "notebooks", args.only):
            times = {}
            for smoke in modes:
                mode = "smoke" if smoke else "full"
                try:
                    times[mode] = time_notebook(path, smoke, Path(tmp))
                except pm.PapermillExecutionError as err:
                    if NEEDS_CUDA not in str(err.evalue):
                        raise
                    times[mode] = None  # a GPU-only run on a machine without one: report, go on
                shown = NEEDS_CUDA if times[mode] is None else f"{times[mode]:.1f} s"
                print(f"{path.name} {mode}: {shown}", file=sys.stderr)
            rows.append((path.name, times))
    cpus = os.cpu_count()
    print(f"\n| notebook | classroom defaults (s) | smoke (s) |   ({cpus} CPU cores)\n|---|---|---|")
    for name, t in rows:
        full, smoke = (_cell(t, m) for m in ("full", "smoke"))
        print(f"| {name} | {full} | {smoke} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
