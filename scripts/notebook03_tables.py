"""Markdown tables of notebook 03's results, as docs/notebook03_full_study.md shows them.

Reads the ``results.json`` and the grid's CSV that a run of ``notebooks/03_ratio_normalisation_and_sensitivity.ipynb``
wrote (``-p full True`` for the full study) and prints every table of the document, so that a rerun can be put into
it without copying numbers by hand:

    python scripts/full_study_tables.py notebooks/outputs/03_ratio_normalisation_and_sensitivity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from fdistill_lab import stats

DIVS = ("rkl", "srkl", "js", "sh", "fkl", "jeffreys")


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _g3(x: float) -> str:
    return f"{x:.3g}"


def _pm(values: pd.Series, digits: int = 2) -> str:
    mean = f"{values.mean():.{digits}f}"
    return f"{mean} ± {values.std():.{digits}f}" if len(values) > 1 else mean


def sensitivity(csv: Path) -> str:
    """One block per hyperparameter (the others at their defaults): mean ± std of the mode-mass TV over seeds."""
    d = pd.read_csv(csv)
    d = d[d.status == "done"]
    default = {"lr_student": 0.002, "gan_weight_gen": 0.0, "clip": "0.1-20", "student_update_freq": 3}
    d["clip"] = d.ratio_min.map("{:g}".format) + "-" + d.ratio_max.map("{:g}".format)
    blocks = [("lr_student", "lr"), ("gan_weight_gen", "GAN"), ("clip", "clip"), ("student_update_freq", "K")]
    header, cols = ["div"], []
    for key, label in blocks:
        others = [k for k in default if k != key]
        at_default = d[(d[others] == pd.Series({k: default[k] for k in others})).all(axis=1)]
        # numbers ascending; clip ranges from the narrowest to the widest, as the document shows them
        levels = sorted(at_default[key].unique(), key=lambda v: float(str(v).split("-")[-1]))
        for v in levels:
            header.append(f"{label} {v:g}" if key != "clip" else f"clip {v}")
            cols.append((key, v, at_default))
    rows = []
    for div in [v for v in DIVS if v in set(d["divergence"])]:
        rows.append([div] + [_pm(sub[(sub["divergence"] == div) & (sub[key] == v)]["metrics.mass_tv"])
                             for key, v, sub in cols])
    return _table(header, rows) + f"\n\n{len(d)} runs, {int((pd.read_csv(csv).status != 'done').sum())} failed."


def sensitivity_changes(csv: Path) -> str:
    """Each non-default cell's paired change of the mode-mass TV against its divergence's defaults (same seeds), with
    its 95% t interval; the cells whose interval excludes zero are listed first."""
    d = pd.read_csv(csv)
    d = d[d.status == "done"].copy()
    d["clip"] = d.ratio_min.map("{:g}".format) + "-" + d.ratio_max.map("{:g}".format)
    default = {"lr_student": 0.002, "gan_weight_gen": 0.0, "clip": "0.1-20", "student_update_freq": 3}
    at = (d[list(default)] == pd.Series(default)).all(axis=1)
    rows = []
    for key in default:
        others = [k for k in default if k != key]
        block = d[(d[others] == pd.Series({k: default[k] for k in others})).all(axis=1) & ~at]
        for (div, value), g in block.groupby(["divergence", key]):
            base = d[at & (d.divergence == div)].sort_values("seed")
            g = g.sort_values("seed")
            diff = stats.paired_difference(list(g["metrics.mass_tv"]), list(base["metrics.mass_tv"]))
            rows.append([div, f"{key} = {value}", f"{base['metrics.mass_tv'].mean():.2f}",
                         f"{g['metrics.mass_tv'].mean():.2f}", diff.format(digits=2, signed=True),
                         "measured" if diff.excludes_zero() else stats.NO_DIFFERENCE])
    rows.sort(key=lambda r: (r[-1] != "measured", DIVS.index(r[0]) if r[0] in DIVS else 99, r[1]))
    return _table(["div", "setting", "TV at defaults", "TV", "change [95% CI]", "verdict"], rows)


def interval_rows(rows: list[dict], label: str) -> list[list[str]]:
    return [[label, r["name"], stats.row_text(r, digits=2), stats.row_text(r, diff=True, digits=2), r["verdict"]]
            for r in rows]


def normalisation_changes(res: dict) -> str:
    out = []
    for name, rows in res.get("normalisation_intervals", {}).items():
        out += interval_rows(rows, name)
    return _table(["div / measure", "variant", "mean [95% CI]", "minus both stages", "verdict"], out)


def gan_changes(res: dict) -> str:
    rows = [[r["div"], r["metric"], r["w/ GAN minus w/o"], r["verdict"]] for r in res.get("gan_effect", [])]
    return _table(["div", "measure", "w/ GAN minus w/o [95% CI]", "verdict"], rows)


def ratio_calibration(res: dict) -> str:
    rows = pd.DataFrame(res["ratio_calibration"]["rows"])
    out = []
    for s, g in rows.groupby("sigma"):
        by = g.set_index("variant")
        out.append([f"{s:g}", _g3(by.abs_log_error["raw"]), _g3(by.abs_log_error["clipped"]),
                    _g3(by.abs_log_error["clipped+bins"]), _g3(by.mean_ratio["raw"]),
                    _g3(by.mean_ratio["clipped+bins"]), _g3(by.mean_ratio["true (KDE)"])])
    head = ["sigma", "raw", "clipped", "clipped+bins", "E_q[r] raw", "E_q[r] clipped+bins", "E_q[r] true (KDE)"]
    return f"KDE bandwidth {res['ratio_calibration']['kde_bandwidth']:g}\n\n" + _table(head, out)


def normalisation(res: dict) -> str:
    d = pd.DataFrame(res["normalisation"]).groupby(["div", "variant"], sort=False).mean(numeric_only=True)
    rows = [[f"{div} / {variant}", _g3(r.loss_cv), _g3(r.grad_cv), _g3(r.mass_tv), _g3(r.modes)]
            for (div, variant), r in d.iterrows()]
    return _table(["div / variant", "loss_cv", "grad_cv", "mass_tv", "modes"], rows)


def gradient_variance(res: dict) -> str:
    d = pd.DataFrame(res["gradient_variance"])
    states = list(dict.fromkeys(d.state))
    head = ["div"] + [f"Var h, {s}" for s in states] + [f"noise/signal, {s}" for s in states]
    rows = []
    for div in [v for v in DIVS if v in set(d["div"])]:
        sub = d[d["div"] == div].set_index("state")
        rows.append([div] + [_g3(sub.weight_var[s]) for s in states] + [_g3(sub.rel_var[s]) for s in states])
    return _table(head, rows)


def gan_ablation(res: dict) -> str:
    d = pd.DataFrame(res["gan_ablation"])
    rows = []
    for div in [v for v in DIVS if v in set(d["div"])]:
        off, on = (d[(d["div"] == div) & (d.GAN == g)] for g in ("w/o GAN", "w/ GAN"))
        rows.append([div, _pm(off.mass_tv), _pm(on.mass_tv), _pm(off.modes), _pm(on.modes)])
    return _table(["div", "mass_tv w/o GAN", "mass_tv w/ GAN", "modes w/o GAN", "modes w/ GAN"], rows)


def cost(res: dict, csv: Path) -> str:
    d = pd.DataFrame(res["cost"]).set_index("div")
    k = int(res["config"].get("student_update_freq", 3))  # iterations per cycle
    rows = [[div, f"{r.sec_per_iter * k * 1e3:.3g}", f"{r.gen_step_s * 1e3:.3g}", f"{r.weighting_s * 1e6:.3g}",
             f"{r.peak_tensor_mb:.3g}"] for div, r in d.iterrows()]
    first = _table(["div", "ms / cycle", "ms / generator step", "µs / weighting", "peak tensor MB"], rows)
    s = pd.read_csv(csv)
    s = s[s.status == "done"].groupby("divergence")[["cost.sec_per_iter", "cost.peak_rss_mb", "cost.seconds"]].median()
    rows = [[div, _g3(r["cost.sec_per_iter"]), f"{r['cost.peak_rss_mb']:.0f}", _g3(r["cost.seconds"])]
            for div, r in s.reindex([v for v in DIVS if v in s.index]).iterrows()]
    second = _table(["div", "s / iteration", "peak RSS MB", "training s"], rows)
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
    csv = Path(res["sweep"]["csv"])
    if not csv.is_file():
        csv = args.output_dir / "sweep" / "sweep.csv"
    print(f"seconds in all: {res['seconds_total']:.0f}; config {res['config']}\n")
    for title, text in (("Sensitivity (mode-mass TV)", sensitivity(csv)),
                        ("Sensitivity: paired changes against the defaults", sensitivity_changes(csv)),
                        ("Density ratio", ratio_calibration(res)),
                        ("Two-stage normalisation", normalisation(res)),
                        ("Two-stage normalisation: intervals", normalisation_changes(res)),
                        ("Gradient variance", gradient_variance(res)),
                        ("GAN ablation", gan_ablation(res)), ("GAN ablation: paired changes", gan_changes(res)),
                        ("Cost", cost(res, csv))):
        print(f"## {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
