"""A text-to-image training run in a run folder, in one process or under ``torchrun`` (DDP; gloo on CPUs).

The folder's layout and its safety are the EDM trainer's (:mod:`fdistill_lab.train.run_folder`): ``config.json``,
``logs/train.jsonl``, ``samples/step_*.png`` (fixed prompts and latents, EMA student), atomic checkpoints
``checkpoints/ckpt_*.pt`` named by ``latest.json`` with their sha256; rerunning the same command resumes exactly
(every rank's random states are in the checkpoint, and the data stream is addressed by step).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_save_digest, write_json_atomic
from ..train import dist as fdist
from ..train.cli import _MainOnly, _run_folder_lock, _SigtermFlag
from ..train.run_folder import (
    LogWindow,
    append_jsonl,
    checkpoint_path,
    commit_checkpoint,
    latest_checkpoint,
    save_grid_png,
    truncate_jsonl,
    verify_checkpoint,
)
from .components import SDComponents
from .config import T2IConfig, T2IRunConfig, resolve
from .data import CaptionDataset, latent_batches
from .trainer import T2ITrainer

SAMPLE_SEED = 20  # the grids' fixed latents


@dataclass
class T2IResult:
    status: str  # "done" or "interrupted"
    step: int
    out: Path
    checkpoint: Path | None


def batch_layout(batch_size: int, per_gpu_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps for a global batch over ``world_size`` ranks (ValueError if it does not split)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
    local = batch_size // world_size
    if per_gpu_batch and local % per_gpu_batch:
        raise ValueError(f"per_gpu_batch {per_gpu_batch} must divide the per-process batch {local}")
    return local // per_gpu_batch if per_gpu_batch else 1


def _save(trainer: T2ITrainer, ckpt_dir: Path, rcfg: T2IRunConfig, env: fdist.DistEnv) -> Path:
    trainer_rng = fdist.gather_objects(trainer.rng.state_dict())
    rank_rng = fdist.gather_objects(fdist.rng_state())
    path = checkpoint_path(ckpt_dir, trainer.step_count)
    main_only = _MainOnly(env)
    if env.is_main:
        with main_only:
            extra = {"world_size": env.world_size, "trainer_rng": trainer_rng, "rank_rng": rank_rng}
            digest = atomic_save_digest(trainer.checkpoint_state(extra), path)
            commit_checkpoint(ckpt_dir, path, trainer.step_count, rcfg.keep_checkpoints, digest)
    main_only.check()
    return path


def _resume(trainer: T2ITrainer, ckpt_dir: Path, env: fdist.DistEnv) -> Path | None:
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    main_only = _MainOnly(env)
    if env.is_main:
        with main_only:
            verify_checkpoint(ckpt_dir, path)
    main_only.check()
    extra = trainer.load_checkpoint(path, fix="it is not the checkpoint that was written; use a new --out")
    if extra.get("world_size") != env.world_size:
        raise ValueError(f"{path} was written by {extra.get('world_size')} processes, this run has {env.world_size}: "
                         "exact resume needs the same number (or train into a new --out)")
    trainer.rng.load_state_dict(extra["trainer_rng"][env.rank])
    fdist.set_rng_state(extra["rank_rng"][env.rank])
    trainer.history.clear()
    return path


def _fid_tools(rcfg: T2IRunConfig, device: torch.device) -> tuple[Any, Any]:
    """(Inception detector, CLIP scorer or None) for periodic evaluation, or (None, None) when it is off."""
    if not rcfg.fid_every:
        return None, None
    from ..train.fid import load_detector
    from .evaluate import ClipScorer

    clip = ClipScorer.from_pretrained(rcfg.clip_model, device) if rcfg.clip_model else None
    return load_detector(rcfg.fid_detector, device), clip


def train(pipeline: str | Path | SDComponents, data: str | Path, out: str | Path, preset: str = "sd15",
          overrides: dict[str, Any] | None = None, stop_at: int | None = None, progress: bool = True,
          callback: Callable[[int, dict[str, float]], None] | None = None) -> T2IResult:
    """Train (or resume) the run in ``out``: teacher ``pipeline`` (a folder, a cached repo id, or components
    already built, e.g. :func:`~fdistill_lab.t2i.tiny.tiny_components`), real pairs ``data``, settings ``preset`` +
    ``overrides``. ``stop_at``: stop (checkpointed) after that iteration, as a killed job would."""
    dcfg, rcfg = resolve(preset, overrides)
    env = fdist.init_distributed(rcfg.device)
    try:
        if rcfg.cpu_threads:
            torch.set_num_threads(rcfg.cpu_threads)
        dcfg = dcfg.replace(accum_steps=batch_layout(rcfg.batch_size, rcfg.per_gpu_batch, env.world_size))
        return _train(pipeline, data, Path(out), preset, dcfg, rcfg, env, stop_at, progress, callback, overrides)
    finally:
        fdist.cleanup()


def _train(pipeline: str | Path | SDComponents, data: str | Path, out: Path, preset: str, dcfg: T2IConfig,
           rcfg: T2IRunConfig, env: fdist.DistEnv, stop_at: int | None, progress: bool,
           callback: Callable[[int, dict[str, float]], None] | None, overrides: dict[str, Any] | None) -> T2IResult:
    from tqdm.auto import tqdm

    from .loader import load_components

    comps = pipeline if isinstance(pipeline, SDComponents) else load_components(pipeline, env.device)
    res = rcfg.resolution or comps.image_resolution
    if res != comps.image_resolution:
        raise ValueError(f"resolution {res} but the pipeline's U-Net takes {comps.latent_resolution}x"
                         f"{comps.latent_resolution} latents, i.e. {comps.image_resolution}-pixel images; set "
                         f"resolution={comps.image_resolution} (or 0)")
    dataset = CaptionDataset(data, res)
    trainer = T2ITrainer(comps, dcfg, env.device, env.rank, env.world_size, rcfg.rng_mode)
    with _run_folder_lock(out, env):
        ckpt_dir, log_path = out / "checkpoints", out / "logs" / "train.jsonl"
        fid_log = out / "logs" / "fid.jsonl"
        main_only = _MainOnly(env)
        if env.is_main:
            with main_only:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
        main_only.check()
        path = _resume(trainer, ckpt_dir, env)
        if path is not None and (out / "config.json").is_file():
            recorded = read_config(out)["run"].get("batch_size")
            if recorded != rcfg.batch_size:
                raise ValueError(f"{out} was trained with batch_size {recorded}, this command gives "
                                 f"{rcfg.batch_size}: the data stream would change; resume with batch_size={recorded} "
                                 "or train into a new --out")
        if env.is_main:
            with main_only:
                truncate_jsonl(log_path, trainer.step_count)
                truncate_jsonl(fid_log, trainer.step_count)
                write_json_atomic(out / "config.json", {
                    "trainer": "fdistill_lab.t2i", "preset": preset, "overrides": {k: str(v) for k, v in
                                                                                     (overrides or {}).items()},
                    "distill": dcfg.to_dict(), "run": {**rcfg.__dict__, "sample_prompts": list(rcfg.sample_prompts)},
                    "world_size": env.world_size, "pipeline": comps.source, "data": str(data), "pairs": len(dataset)})
        main_only.check()
        batches = latent_batches(dataset, comps, rcfg.batch_size, env.rank, env.world_size, dcfg.seed,
                                 start_batch=trainer.step_count, num_workers=rcfg.num_workers, device=env.device,
                                 micro_batch=rcfg.per_gpu_batch or None, bf16=dcfg.precision == "bf16")
        g = torch.Generator().manual_seed(SAMPLE_SEED)
        r = comps.latent_resolution
        sample_z = torch.randn(len(rcfg.sample_prompts), comps.unet.config.in_channels, r, r, generator=g)
        detector, clip = _fid_tools(rcfg, env.device)
        window, status, sigterm = LogWindow(), "done", _SigtermFlag()  # SIGTERM: checkpoint, then stop
        bar = tqdm(total=rcfg.steps, initial=trainer.step_count, desc=f"t2i f-distill {dcfg.divergence}",
                   disable=not (progress and env.is_main))
        try:
            while trainer.step_count < rcfg.steps:
                t0 = time.perf_counter()
                latents, text = next(batches)
                t_data = time.perf_counter() - t0
                logs = trainer.step(latents, text)
                logs.pop("step")
                trainer.history.clear()
                logs = fdist.all_reduce_mean(logs, env.device)
                logs["images_per_s"] = rcfg.batch_size / max(logs["time_s"] + t_data, 1e-9)
                done = trainer.step_count
                bad = [k for k, v in logs.items() if k.startswith("loss") and not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"iteration {done} gave non-finite {bad}; training stopped, the last "
                                             f"checkpoint ({path.name if path else 'none yet'}) is kept")
                window.add(logs)
                bar.update(1)
                main_only = _MainOnly(env)
                with main_only:
                    if env.is_main and callback is not None:
                        callback(done, logs)
                    if env.is_main and rcfg.log_every and done % rcfg.log_every == 0:
                        append_jsonl(log_path, {"step": done, "images": done * rcfg.batch_size, **window.mean()})
                        window.reset()
                    if env.is_main and rcfg.sample_every and (done % rcfg.sample_every == 0 or done == rcfg.steps):
                        imgs = trainer.generate(list(rcfg.sample_prompts), z=sample_z)
                        save_grid_png(imgs, out / "samples" / f"step_{done:07d}.png")
                if rcfg.fid_every and (done % rcfg.fid_every == 0 or done == rcfg.steps):
                    main_only.check()  # every rank agrees before the (collective) evaluation
                    from .evaluate import evaluate_fid, student_generator

                    record = evaluate_fid(student_generator(trainer), detector, rcfg.fid_ref, rcfg.fid_images,
                                          device=env.device, clip=clip, rank=env.rank, world_size=env.world_size)
                    with main_only:
                        if env.is_main:
                            append_jsonl(fid_log, {"step": done, **record})
                (signalled,) = main_only.check(sigterm.seen)
                stop = signalled or (stop_at is not None and done >= stop_at)
                if (rcfg.ckpt_every and done % rcfg.ckpt_every == 0) or stop or done == rcfg.steps:
                    path = _save(trainer, ckpt_dir, rcfg, env)
                if stop and done < rcfg.steps:
                    status = "interrupted"
                    break
        finally:
            bar.close()
            sigterm.close()
        if status == "done" and env.is_main:
            export_student(trainer, out / STUDENT_DIR)
        fdist.barrier()
    return T2IResult(status, trainer.step_count, out, path)


STUDENT_DIR = "student_final"


def export_student(trainer: T2ITrainer, folder: Path) -> Path:
    """The EMA student's U-Net as a diffusers folder (``save_pretrained``; load it with
    ``UNet2DConditionModel.from_pretrained`` and call it once at the last timestep for one-step images), written
    into a temporary folder first and renamed, so a crash never leaves a half-written one."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        trainer.student_ema.unet.save_pretrained(str(tmp))
        c = trainer.config
        (tmp / "fdistill.json").write_text(json.dumps({"step": trainer.step_count, "student_t": c.student_t,
                                                       "student_sigma": c.student_sigma, "divergence": c.divergence,
                                                       "guidance_scale": c.guidance_scale}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_config(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "config.json").read_text())


def train_command(pipeline: str | Path, data: str | Path, out: str | Path, preset: str, overrides: dict[str, Any],
                  gpus: int = 1, python: str = sys.executable) -> list[str]:
    """``python -m fdistill_lab.t2i train ...`` for one process, or under ``torchrun --standalone
    --nproc_per_node gpus``: what notebook 06 runs (and prints, to paste into a terminal or a cluster job)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be an integer >= 0; got {gpus!r}")
    args = ["train", "--pipeline", str(pipeline), "--data", str(data), "--out", str(out), "--preset", preset]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 \
        else [python]
    return [*launcher, "-m", "fdistill_lab.t2i", *args]
