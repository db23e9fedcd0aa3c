"""Markdown tables of notebook 02's results, as docs/notebook02_full_study.md shows them.

Reads the ``results.json`` that a run of ``notebooks/02_toy_mode_coverage.ipynb`` wrote (``-p full True`` for the
full study) and prints the ring table and, for the light-mode design, the tables with learned and with exact
critics: mean with its 95% interval over seeds, the paired difference against reverse KL with its verdict, and the
values per seed. A rerun goes into the document without copying numbers by hand:

    python scripts/notebook02_tables.py notebooks/outputs/02_toy_mode_coverage
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fdistill_lab import stats
from fdistill_lab.course.tables import markdown_table as _table
from fdistill_lab.course.tables import run_records

RING = ("modes_covered", "precision", "recall", "mass_tv")
LIGHT = ("light_found", "light_mass", "mass_tv", "recall", "precision")


def interval_tables(intervals: dict[str, list[dict]], metrics: tuple[str, ...]) -> str:
    """Means with intervals, then the paired differences against the baseline (when there is another name)."""
    names = [r["name"] for r in intervals[metrics[0]]]
    by = {k: {r["name"]: r for r in intervals[k]} for k in metrics}
    out = _table(["divergence", *metrics], [[n, *(stats.row_text(by[k][n]) for k in metrics)] for n in names])
    others = [n for n in names if by[metrics[0]][n]["verdict"] != "baseline"]
    if others:
        base = next(n for n in names if by[metrics[0]][n]["verdict"] == "baseline")
        rows = [[f"{n} minus {base}", *(f"{stats.row_text(by[k][n], diff=True)} ({by[k][n]['verdict']})"
                                       for k in metrics)] for n in others]
        out += "\n\n" + _table(["paired difference", *metrics], rows)
    return out


def per_seed_table(per_run: dict[str, list[dict]], names: list[str], metrics: tuple[str, ...]) -> str:
    rows = [[d, *(", ".join(f"{m[k]:.3g}" for m in per_run[d]) for k in metrics)] for d in names]
    seeds = [m["seed"] for m in per_run[names[0]]]
    return _table([f"divergence (seeds {seeds[0]}-{seeds[-1]})", *metrics], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the notebook's output folder (holding results.json)")
    args = parser.parse_args(argv)
    try:
        rec = run_records(args.run, "02", ("light_mode",))
    except ValueError as exc:
        parser.error(str(exc))
    design = rec["design"]
    print(f"Design: {json.dumps(design['converged'])}; light-mode start {json.dumps(design['light_mode_start'])}, "
          f"{design['light_steps']} iterations; full={design['full']}; training {rec['train_seconds']:.0f} s.\n")
    print(f"## Ring, seeds {rec['config']['seeds']}\n")
    print(interval_tables(rec["intervals"], RING) + "\n")
    light = rec["light_mode"]
    for critics in ("learned", "oracle"):
        print(f"## Light mode, {critics} critics, seeds {light['seeds']}\n")
        print(interval_tables(light["intervals"][critics], LIGHT) + "\n")
        print(per_seed_table(light["per_run"][critics], light["divergences"], ("light_mass", "recall", "precision"))
              + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
