"""Command line of the text-to-image trainer (``python -m fdistill_lab.t2i``; ``torchrun ... -m fdistill_lab.t2i
train`` for DDP):

* ``train --pipeline <SD1.5 folder or cached repo id> --data <image-caption folder or shards> --out <run>``
  [``--preset sd15``] [``--set key=value`` ...]: train or resume;
* ``coco-ref --coco <COCO 2014 folder> --detector inception-2015-12-05.pt --out coco30k.npz``: zero-shot FID
  reference statistics (30k captions) and the captions beside them;
* ``evaluate --run <run> --pipeline ... --detector ... --ref coco30k.npz [--clip <CLIP folder>]``: FID, CLIP score
  and latency of the run's EMA student -> ``<run>/results.json``;
* ``grid --run <run> --pipeline ... --prompt "a cat" [--prompt ...] --out grid.png [--teacher-steps 50]``: one-step
  images of the EMA student (and the teacher's, for comparison) for fixed prompts and seeds;
* ``describe [--preset sd15] [--set ...]``: the resolved settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..train.cli import EXIT_INTERRUPTED
from ..train.presets import parse_overrides

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, TypeError)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fdistill_lab.t2i", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or resume a run (torchrun for several processes)")
    t.add_argument("--pipeline", required=True, help="SD1.5 diffusers folder, or a repo id in the HF cache")
    t.add_argument("--data", required=True, help="folder of <key>.jpg + <key>.txt pairs, or .tar shards")
    t.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    t.add_argument("--preset", default="sd15", help="sd15 (paper Table 5) or tiny")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    t.add_argument("--stop-at", type=int, default=None, help="stop (checkpointed) after this iteration")
    c = sub.add_parser("coco-ref", help="zero-shot FID reference statistics from a COCO 2014 folder")
    c.add_argument("--coco", required=True)
    c.add_argument("--detector", required=True, help="inception-2015-12-05.pt (python -m fdistill_lab.download fid)")
    c.add_argument("--out", required=True, help="statistics .npz (captions go to <out>.prompts.json)")
    c.add_argument("--n", type=int, default=30_000)
    c.add_argument("--resolution", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = sub.add_parser("evaluate", help="FID, CLIP score and latency of a run's EMA student")
    e.add_argument("--run", required=True)
    e.add_argument("--pipeline", required=True)
    e.add_argument("--detector", required=True)
    e.add_argument("--ref", required=True)
    e.add_argument("--clip", default="", help="CLIP model folder (e.g. openai/clip-vit-large-patch14, downloaded)")
    e.add_argument("--n", type=int, default=None, help="first n captions (default: all of the reference's)")
    e.add_argument("--batch", type=int, default=32)
    g = sub.add_parser("grid", help="one-step images of a run's EMA student for given prompts, as one PNG")
    g.add_argument("--run", required=True)
    g.add_argument("--pipeline", required=True)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--out", required=True, help="PNG file")
    g.add_argument("--seed", type=int, default=0, help="image i's latent comes from seed + i")
    g.add_argument("--teacher-steps", type=int, default=0, help="also the teacher's DDIM images (CFG 3), a second row")
    d = sub.add_parser("describe", help="print the resolved settings")
    d.add_argument("--preset", default="sd15")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return ap


def load_run(run: str | Path, pipeline: str | Path, device: torch.device | str = "cpu"):
    """A :class:`~fdistill_lab.t2i.trainer.T2ITrainer` at the run's latest checkpoint (for evaluation)."""
    from ..train.run_folder import latest_checkpoint
    from .config import T2IConfig
    from .loader import load_components
    from .trainer import T2ITrainer

    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a text-to-image run folder (no config.json)")
    cfg = T2IConfig.from_dict(json.loads((run / "config.json").read_text())["distill"])
    comps = pipeline if not isinstance(pipeline, (str, Path)) else load_components(pipeline, device)
    trainer = T2ITrainer(comps, cfg, device)
    path = latest_checkpoint(run / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet")
    trainer.load_checkpoint(path)
    return trainer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "describe":
            from .config import resolve

            d, r = resolve(args.preset, parse_overrides(args.set))
            print(json.dumps({"distill": d.to_dict(), "run": {**r.__dict__, "sample_prompts":
                                                               list(r.sample_prompts)}}, indent=1))
        elif args.command == "train":
            from .run import train

            res = train(args.pipeline, args.data, args.out, args.preset, parse_overrides(args.set), args.stop_at)
            if os.environ.get("RANK", "0") == "0":  # once, not per torchrun process
                print(f"{res.status} at step {res.step}: {res.out}")
            if res.status == "interrupted":
                return EXIT_INTERRUPTED
        elif args.command == "coco-ref":
            from ..train.fid import load_detector
            from .evaluate import coco_reference

            out = coco_reference(args.coco, args.out, load_detector(args.detector, args.device), args.n,
                                 args.resolution, args.seed, device=args.device, progress=True)
            print(f"wrote {out}")
        elif args.command == "grid":
            _grid(args)
        else:
            _evaluate(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    from ..train.fid import load_detector
    from .evaluate import ClipScorer, evaluate_fid, latency, student_generator, teacher_sample, write_results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = load_run(args.run, args.pipeline, device)
    clip = ClipScorer.from_pretrained(args.clip, device) if args.clip else None
    res = evaluate_fid(student_generator(trainer), load_detector(args.detector, device), args.ref, args.n,
                       args.batch, device, clip, progress=True)
    prompt = ["a photo of a cat"]
    res["latency_student_s"] = latency(lambda: trainer.generate(prompt))
    res["latency_teacher50_s"] = latency(lambda: teacher_sample(trainer.components, prompt, 50, 3.0), repeats=2)
    res["step"] = trainer.step_count
    write_results(Path(args.run) / "results.json", res)
    print(json.dumps(res, indent=1))


def _grid(args: argparse.Namespace) -> None:
    from ..train.fid import latents_from_seeds
    from ..train.run_folder import save_grid_png
    from .evaluate import teacher_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = load_run(args.run, args.pipeline, device)
    r, c = trainer.teacher.img_resolution, trainer.teacher.img_channels
    z = latents_from_seeds(range(args.seed, args.seed + len(args.prompt)), (c, r, r))
    rows = [trainer.generate(args.prompt, z=z)]
    if args.teacher_steps:
        rows.append(teacher_sample(trainer.components, args.prompt, args.teacher_steps, 3.0, z=z))
    out = save_grid_png(torch.cat(rows).cpu(), Path(args.out), nrow=len(args.prompt))
    print(f"wrote {out} ({len(rows)} row(s): student" + (", teacher" if args.teacher_steps else "") + ")")
