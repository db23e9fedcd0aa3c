"""What holds notebook 04's one-step students at about 1.8x the teacher's FD: a one-factor-at-a-time ablation.

Trains JS students (notebook 04's design, ``fdistill_lab.digits.design``) on the same data split, teacher and
classifier as the notebook with seed 0, changing one setting at a time (learning rate, GAN weight, discriminator
placement, network width), over several student seeds, and reports the final FD (classifier features, 1000 samples,
against the held-out digits) with its 95% interval, the paired change against the notebook's settings, and the FD
curve. Each finished run is written to ``<out>/runs/<setting>-seed<k>.json`` (atomically) and skipped when the
script is run again, so an interrupted ablation resumes. The teachers are cached in ``<out>``.

    python scripts/notebook04_ablation.py --out build/notebook04_ablation            # all settings, seeds 0-2
    python scripts/notebook04_ablation.py --out DIR --settings base lr_3e-3 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fdistill_lab import stats
from fdistill_lab.course.tables import comparison_table, markdown_table
from fdistill_lab.digits import design
from fdistill_lab.digits import metrics as dm
from fdistill_lab.digits.data import BatchSampler, load_digits
from fdistill_lab.digits.teacher import load_or_train_teacher
from fdistill_lab.edm import heun_sampler
from fdistill_lab.files import write_json_atomic
from fdistill_lab.train.trainer import FDistillTrainer, fit

# name -> (student settings over design.STUDENT_DEFAULTS, teacher width); "base" is notebook 04's design
SETTINGS: dict[str, tuple[dict[str, Any], int]] = {
    "base": ({}, 16),
    "lr_3e-4": ({"lr": 3e-4}, 16),
    "lr_3e-3": ({"lr": 3e-3}, 16),
    "gan_0": ({"gan_weight": 0.0}, 16),
    "gan_0.1": ({"gan_weight": 0.1}, 16),
    "disc_on_fake_score": ({"disc_placement": "fake_score"}, 16),
    "width_32": ({}, 32),  # teacher, student and fake score twice as wide (the teacher retrained at that width)
}
DATA_SEED = 0  # the notebook's seed for the split, the teachers, the classifier and the evaluation latents


def evaluate(clf: dm.DigitClassifier, x: torch.Tensor, labels: torch.Tensor, heldout: torch.Tensor) -> dict:
    rep = dm.evaluate_samples(clf, x, labels, heldout)
    return {"fd": rep.fd, "recall": rep.recall, "precision": rep.precision}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs, the teachers and results.json")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                    help=f"settings to run (default: all): {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="student seeds (default 0 1 2)")
    ap.add_argument("--steps", type=int, default=900, help="iterations per student (default 900: where the "
                    "notebook's FD curve levels)")
    ap.add_argument("--eval-every", type=int, default=300, help="iterations between FD evaluations")
    ap.add_argument("--teacher-steps", type=int, default=600, help="EDM steps of the teachers (notebook: 600)")
    ap.add_argument("--eval-samples", type=int, default=1000)
    args = ap.parse_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
    if "base" not in args.settings:
        ap.error("the settings must include 'base' (every change is compared with it)")
    for name in ("steps", "eval_every", "teacher_steps", "eval_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(1)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    train, heldout = load_digits(resolution=8, holdout_fraction=0.2, seed=DATA_SEED)
    img_shape = tuple(train.images.shape[1:])
    clf = dm.train_classifier(train.images, train.labels, steps=design.CLASSIFIER_STEPS, seed=DATA_SEED,
                              progress=False)
    n = args.eval_samples
    eval_labels = torch.arange(n) % 10
    eval_z = torch.randn(n, *img_shape, generator=torch.Generator().manual_seed(DATA_SEED + 1))
    teachers: dict[int, tuple[torch.nn.Module, dict]] = {}
    for width in sorted({SETTINGS[s][1] for s in args.settings}):
        net = design.teacher_net(img_shape, model_channels=width)
        teacher, info = load_or_train_teacher(design.teacher_config(net, args.teacher_steps, DATA_SEED), train.images,
                                              train.labels, args.out, progress=False, verbose=False)
        with torch.no_grad():
            x = heun_sampler(lambda x, s, t=teacher: t(x, s, eval_labels), eval_z, num_steps=design.HEUN_STEPS)
        teachers[width] = (teacher, evaluate(clf, x, eval_labels, heldout.images))
        how = "cached" if info["cached"] else f"trained in {info['train_time_s']:.0f} s"
        print(f"teacher width {width}: FD {teachers[width][1]['fd']:.2f} ({how})", flush=True)

    results: dict[str, list[dict]] = {}
    for name in args.settings:
        overrides, width = SETTINGS[name]
        teacher, teacher_metrics = teachers[width]
        for seed in args.seeds:
            path = runs_dir / f"{name}-seed{seed}.json"
            key = {"setting": name, "seed": seed, "steps": args.steps, "teacher_steps": args.teacher_steps,
                   "eval_samples": n, "overrides": overrides, "width": width}
            if path.is_file() and json.loads(path.read_text())["key"] == key:
                results.setdefault(name, []).append(json.loads(path.read_text()))
                continue
            t0 = time.perf_counter()
            trainer = FDistillTrainer(teacher, design.student_config("js", seed=seed, **overrides))
            batches = BatchSampler(train, 64, seed=seed)
            curve = []
            while trainer.step_count < args.steps:
                fit(trainer, batches, min(args.eval_every, args.steps - trainer.step_count), progress=False)
                m = evaluate(clf, trainer.sample(z=eval_z, labels=eval_labels), eval_labels, heldout.images)
                curve.append({"step": trainer.step_count, **m})
            run = {"key": key, "final": curve[-1], "curve": curve, "teacher": teacher_metrics,
                   "ratio": curve[-1]["fd"] / teacher_metrics["fd"], "seconds": time.perf_counter() - t0}
            write_json_atomic(path, run, durable=False)
            results.setdefault(name, []).append(run)
            print(f"{name} seed {seed}: FD {curve[-1]['fd']:.2f} ({run['ratio']:.2f}x its teacher's), "
                  f"curve {[round(c['fd'], 1) for c in curve]}, {run['seconds']:.0f} s", flush=True)

    measures = {"fd": False, "ratio": False, "recall": True, "precision": True}
    intervals = {}
    for m, higher in measures.items():
        per_setting = {s: [r["ratio"] if m == "ratio" else r["final"][m] for r in results[s]] for s in results}
        intervals[m] = stats.compare(per_setting, "base", higher_is_better=higher)
    summary = {"settings": {s: {"overrides": SETTINGS[s][0], "width": SETTINGS[s][1],
                                "teacher_fd": teachers[SETTINGS[s][1]][1]["fd"]} for s in results},
               "seeds": args.seeds, "steps": args.steps, "intervals": intervals,
               "per_seed": {s: [{"seed": r["key"]["seed"], **r["final"], "ratio": r["ratio"],
                                 "curve_fd": [c["fd"] for c in r["curve"]]} for r in results[s]] for s in results}}
    write_json_atomic(args.out / "results.json", summary, durable=False)
    print("\n## Final FD and its ratio to the teacher's (JS, paired against base)\n")
    print(comparison_table(intervals, against="minus base"))
    rows = [[s, f"{summary['settings'][s]['teacher_fd']:.2f}",
             "; ".join(", ".join(f"{v:.1f}" for v in p["curve_fd"]) for p in summary["per_seed"][s])]
            for s in results]
    print("\n## FD curves per seed (every --eval-every iterations)\n")
    print(markdown_table(["setting", "teacher FD", f"FD per seed ({', '.join(map(str, args.seeds))})"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
