"""Time each notebook with papermill at classroom defaults (and, with --smoke, in smoke mode).

Usage: python scripts/time_notebooks.py [--smoke] [--only 01_f_divergences ...] [-p full=True ...] [--out DIR]
Prints a Markdown table (wall seconds, including kernel start-up) for the README's syllabus. ``-p NAME=VALUE``
sets a notebook parameter of the classroom runs (``-p full True`` of papermill; values are read as Python literals,
else kept as text). Outputs go to a temporary folder, or to ``--out DIR/<nb>_<mode>`` to keep them (the results
documents are made from such folders); executed copies to build/executed/<nb>_<mode>.ipynb.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from pathlib import Path

import papermill as pm

from fdistill_lab.course.handouts import select_notebooks
from fdistill_lab.train.dist import NEEDS_CUDA

ROOT = Path(__file__).resolve().parents[1]


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (name, value as a Python literal, or the text itself)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. full=True); got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def time_notebook(path: Path, smoke: bool, out_root: Path, extra: dict | None = None) -> float:
    mode = "smoke" if smoke else "full"
    executed = ROOT / "build" / "executed" / f"{path.stem}_{mode}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {**(extra or {}), "smoke": smoke, "output_dir": str((out_root / f"{path.stem}_{mode}").resolve())}
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
    parser.add_argument("-p", "--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE",
                        help="a parameter of the classroom runs, e.g. -p full=True (repeatable)")
    parser.add_argument("--out", type=Path, help="keep every run's output folder under this folder")
    args = parser.parse_args(argv)
    extra = dict(args.param)
    if "smoke" in extra or "output_dir" in extra:
        parser.error("smoke and output_dir are set by the script (--smoke, --out)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    modes = [True] if args.smoke_only else ([False, True] if args.smoke else [False])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = args.out or Path(tmp)
        for path in select_notebooks(ROOT / "notebooks", args.only):
            times = {}
            for smoke in modes:
                mode = "smoke" if smoke else "full"
                try:
                    times[mode] = time_notebook(path, smoke, out_root, None if smoke else extra)
                except pm.PapermillExecutionError as err:
                    if NEEDS_CUDA not in str(err.evalue):
                        raise
                    times[mode] = None  # a GPU-only run on a machine without one: report, go on
                shown = NEEDS_CUDA if times[mode] is None else f"{times[mode]:.1f} s"
                print(f"{path.name} {mode}: {shown}", file=sys.stderr)
            rows.append((path.name, times))
    cpus = os.cpu_count()
    shown = " ".join(f"-p {k} {v}" for k, v in extra.items())
    label = f"classroom, {shown}" if shown else "classroom defaults"
    print(f"\n| notebook | {label} (s) | smoke (s) |   ({cpus} CPU cores)\n|---|---|---|")
    for name, t in rows:
        full, smoke = (_cell(t, m) for m in ("full", "smoke"))
        print(f"| {name} | {full} | {smoke} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
