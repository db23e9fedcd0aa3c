"""Markdown tables of notebook 04's results, as docs/notebook04_full_study.md shows them.

Reads the ``results.json`` that a run of ``notebooks/04_digits.ipynb`` wrote (``-p full True`` for the full study)
and prints the teacher and students, each student's FD curve, and the class-imbalanced study: the mean of each
measure with its 95% interval over seeds, the paired differences against reverse KL and the rare-class mass per
seed. (The ablation's tables are printed by ``scripts/notebook04_ablation.py``.)

    python scripts/notebook04_tables.py notebooks/outputs/04_digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fdistill_lab import stats
from fdistill_lab.course.tables import markdown_table, run_records

IMBALANCED = ("rare_mass", "rare_recall", "common_recall", "mass_tv_teacher")


def models(rec: dict) -> str:
    rows = [["real training digits", f"{rec['real']['fd']:.2f}", f"{rec['real']['recall']:.2f}", "-"],
            ["teacher (Heun 18)", f"{rec['teacher']['fd']:.2f}", f"{rec['teacher']['recall']:.2f}",
             f"{rec['teacher']['precision']:.2f}"]]
    rows += [[f"{name} (1 step)", f"{s['fd']:.2f}", f"{s['recall']:.2f}", f"{s['precision']:.2f}"]
             for name, s in rec["students"].items()]
    return markdown_table(["model", "FD", "recall", "precision"], rows)


def fd_curves(rec: dict) -> str:
    out = []
    for name, curve in rec["fd_curves"].items():
        header = ["iteration", *(str(c["step"]) for c in curve)]
        rows = [["FD", *(f"{c['fd']:.1f}" for c in curve)], ["recall", *(f"{c['recall']:.2f}" for c in curve)]]
        out.append(f"{name}:\n\n" + markdown_table(header, rows))
    return "\n\n".join(out)


def imbalanced(rec: dict) -> str:
    imb = rec["imbalanced"]
    by = {k: {r["name"]: r for r in imb["intervals"][k]} for k in IMBALANCED}
    names = [r["name"] for r in imb["intervals"][IMBALANCED[0]]]
    base = next(n for n in names if by[IMBALANCED[0]][n]["verdict"] == "baseline")
    rows = [[n, *(stats.row_text(by[k][n]) for k in IMBALANCED)] for n in names]
    rows += [[f"{n} minus {base}", *(f"{stats.row_text(by[k][n], diff=True)} ({by[k][n]['verdict']})"
                                      for k in IMBALANCED)] for n in names if n != base]
    rare = imb["rare_classes"]
    head = (f"Teacher: mass on classes {rare[0]}-{rare[-1]} {imb['teacher']['rare_mass']:.3f} (data "
            f"{sum(imb['data_mass'][k] for k in rare):.3f}), recall {imb['teacher']['rare_recall']:.2f} on them and "
            f"{imb['teacher']['common_recall']:.2f} on the others; students {imb['steps']} iterations, seeds "
            f"{imb['seeds']}.\n\n")
    per_seed = markdown_table([f"divergence (seeds {imb['seeds']})", "mass on the rare classes"],
                              [[n, ", ".join(f"{r['rare_mass']:.3f}" for r in imb["runs"][n])] for n in names])
    return head + markdown_table(["divergence", *IMBALANCED], rows) + "\n\n" + per_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the notebook's output folder (holding results.json)")
    args = parser.parse_args(argv)
    try:
        rec = run_records(args.run, "04", ("fd_curves", "imbalanced", "students"))
    except ValueError as exc:
        parser.error(str(exc))
    config = {k: rec["config"][k] for k in ("divergences", "steps", "teacher_steps", "smoke")}
    print(f"config {json.dumps(config)}\n")
    for title, text in (("Teacher and students", models(rec)), ("FD curves", fd_curves(rec)),
                        ("Rare classes", imbalanced(rec))):
        print(f"## {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
