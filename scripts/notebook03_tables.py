"""Markdown tables of notebook 03's results, as docs/notebook03_full_study.md shows them.

Reads the ``results.json`` that a run of ``notebooks/03_ratio_normalisation_and_sensitivity.ipynb`` wrote (``-p full
True`` for the full study) and the grid's CSV beside it, and prints every table of the document: the
normalisation, GAN and sensitivity comparisons (mean with its 95% interval over seeds, the paired difference against
the default with its verdict), the values per seed, the ratio calibration, the gradient variance and the cost.

    python scripts/notebook03_tables.py notebooks/outputs/03_ratio_normalisation_and_sensitivity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from fdistill_lab.course.tables import comparison_table, markdown_table

DIVS = ("rkl", "srkl", "js", "sh", "fkl", "jeffreys")


def _g3(x: float) -> str:
    return f"{x:.3g}"


def gan_ablation(res: dict) -> str:
    """Per divergence and measure: both arms with their intervals, the paired change of switching the term off."""
    rows = [[r["div"], r["metric"], r["w/ GAN"], r["w/o GAN"], r["w/o GAN minus w/"], r["verdict"]]
            for r in res["gan_effect"]]
    return markdown_table(["div", "measure", "w/ GAN [95% CI]", "w/o GAN [95% CI]", "w/o minus w/ [95% CI]",
                           "verdict"], rows)


def gan_per_seed(res: dict) -> str:
    d = pd.DataFrame(res["gan_ablation"])
    rows = []
    for (div, arm), g in d.groupby(["div", "GAN"], sort=False):
        g = g.sort_values("seed")
        rows.append([div, arm, *(", ".join(f"{v:.3g}" for v in g[k]) for k in ("precision", "mass_tv", "recall"))])
    return markdown_table([f"div (seeds {res['config']['seeds']})", "arm", "precision", "mass_tv", "recall"], rows)


def ratio_calibration(res: dict) -> str:
    rows = pd.DataFrame(res["ratio_calibration"]["rows"])
    out = []
    for s, g in rows.groupby("sigma"):
        by = g.set_index("variant")
        out.append([f"{s:g}", _g3(by.abs_log_error["raw"]), _g3(by.abs_log_error["clipped"]),
                    _g3(by.abs_log_error["clipped+bins"]), _g3(by.mean_ratio["raw"]),
                    _g3(by.mean_ratio["clipped+bins"]), _g3(by.mean_ratio["true (KDE)"])])
    head = ["sigma", "raw", "clipped", "clipped+bins", "E_q[r] raw", "E_q[r] clipped+bins", "E_q[r] true (KDE)"]
    return f"KDE bandwidth {res['ratio_calibration']['kde_bandwidth']:g}\n\n" + markdown_table(head, out)


def gradient_variance(res: dict) -> str:
    d = pd.DataFrame(res["gradient_variance"])
    states = list(dict.fromkeys(d.state))
    head = ["div"] + [f"Var h, {s}" for s in states] + [f"noise/signal, {s}" for s in states]
    rows = []
    for div in [v for v in DIVS if v in set(d["div"])]:
        sub = d[d["div"] == div].set_index("state")
        rows.append([div] + [_g3(sub.weight_var[s]) for s in states] + [_g3(sub.rel_var[s]) for s in states])
    return markdown_table(head, rows)


def cost(res: dict, csv: Path) -> str:
    d = pd.DataFrame(res["cost"]).set_index("div")
    k = int(res["config"]["student_update_freq"])  # iterations per cycle
    rows = [[div, f"{r.sec_per_iter * k * 1e3:.3g}", f"{r.gen_step_s * 1e3:.3g}", f"{r.weighting_s * 1e6:.3g}",
             f"{r.peak_tensor_mb:.3g}"] for div, r in d.iterrows()]
    first = markdown_table(["div", "ms / cycle", "ms / generator step", "µs / weighting", "peak tensor MB"], rows)
    s = pd.read_csv(csv)
    s = s[s.status == "done"].groupby("divergence")[["cost.sec_per_iter", "cost.peak_rss_mb", "cost.seconds"]].median()
    rows = [[div, _g3(r["cost.sec_per_iter"]), f"{r['cost.peak_rss_mb']:.0f}", f"{r['cost.seconds']:.0f}"]
            for div, r in s.reindex([v for v in DIVS if v in s.index]).iterrows()]
    second = markdown_table(["div", "s / iteration", "peak RSS MB", "training s"], rows)
    return first + "\n\nIn the grid's worker processes (median over runs):\n\n" + second


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", type=Path, help="the notebook's output_dir (holds results.json and sweep/)")
    args = ap.parse_args(argv)
    path = args.output_dir / "results.json"
    if not path.is_file():
        print(f"error: {path} not found; run notebook 03 with -p output_dir {args.output_dir} first", file=sys.stderr)
        return 2
    res = json.loads(path.read_text())
    if "sensitivity_intervals" not in res:
        print(f"error: {path} was written by an older notebook 03 (no sensitivity_intervals); rerun it",
              file=sys.stderr)
        return 2
    csv = Path(res["sweep"]["csv"])
    if not csv.is_file():
        csv = args.output_dir / "sweep" / "sweep.csv"
    config = res["config"]
    print(f"seconds in all: {res['seconds_total']:.0f}; {config['steps']} iterations per run, seeds {config['seeds']}, "
          f"{res['sweep']['runs']} grid runs, {res['sweep']['failed']} failed; design {json.dumps(config['design'])}\n")
    axes = config["axes"]
    sections = [("Two-stage normalisation (" + ", ".join(axes["normalisation"]["divergences"]) + ")",
                 comparison_table(res["normalisation_intervals"], against="minus both stages")),
                ("GAN ablation", gan_ablation(res)), ("GAN ablation: values per seed", gan_per_seed(res))]
    for axis, intervals in res["sensitivity_intervals"].items():
        div = ", ".join(axes[axis]["divergences"])
        sections.append((f"Sensitivity: {axis} ({div})", comparison_table(intervals, against="minus the default")))
    sections += [("Density ratio", ratio_calibration(res)), ("Gradient variance", gradient_variance(res)),
                 ("Cost", cost(res, csv))]
    for title, text in sections:
        print(f"## {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
