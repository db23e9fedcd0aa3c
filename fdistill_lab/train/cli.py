"""Distributed f-distill training of a one-step student from an EDM teacher (paper Table 5 runs).

Command line (one GPU, several GPUs, several nodes)::

    python -m fdistill_lab.train --preset imagenet64 --teacher downloads/edm/edm-imagenet-64x64-cond-adm.pkl \\
        --data datasets/imagenet-64x64.zip --out runs/in64_js \\
        --fid-detector downloads/edm/inception-2015-12-05.pt --fid-ref downloads/edm/imagenet-64x64.npz
    torchrun --nproc_per_node 8 -m fdistill_lab.train --preset imagenet64 ...      # 8 GPUs (NCCL)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m fdistill_lab.train ...

Any setting can be changed with ``--set key=value`` (see ``--describe``). Rerunning the same command
resumes exactly from ``<out>/checkpoints`` (step counter, every rank's RNG states, ratio bins, optimiser
states, EMAs, data position). SIGTERM saves a checkpoint and exits with code 143. Data-parallel: each
rank holds ``batch_size / world_size`` images, split into micro-batches of ``per_gpu_batch`` (gradient
accumulation); networks run under bf16 autocast while ratio, weight and loss maths stay in fp32.
Files written: see :mod:`fdistill_lab.train.run_folder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import CheckpointError, atomic_save_digest, lock_file, lock_holder, remove_stale_temporaries
from . import dist as fdist
from .config import DistillConfig
from .data import EDMImageDataset, ImageNetNpzDataset, to_model_range
from .fid import evaluate_fid, latents_from_seeds, load_detector, load_reference_stats
from .identity import resume_problems, run_identity
from .loader import open_batches, worker_init_for_this_process
from .presets import PRESETS, RunConfig, describe, get_preset, parse_overrides, resolve
from .run_folder import (
    LogWindow,
    StudentEMAs,
    append_jsonl,
    checkpoint_path,
    commit_checkpoint,
    export_student,
    latest_checkpoint,
    read_json,
    reconcile_fid_records,
    resume_hint,
    save_grid_png,
    truncate_jsonl,
    verify_checkpoint,
    write_json_atomic,
)
from .teachers import load_edm
from .trainer import FDistillTrainer

EXIT_INTERRUPTED = 143
SAMPLE_SEED = 20250221


@dataclass
class TrainResult:
    """Outcome of :func:`train`: ``status`` 'done' or 'interrupted', the step reached, FIDs, paths."""

    status: str
    step: int
    out: Path
    last_fid: float | None
    best_fid: float | None
    checkpoint: Path | None
    rank: int = 0


def open_dataset(path: str | Path, xflip: bool = False, npz_label_map: str = "") -> torch.utils.data.Dataset:
    """EDM-format zip/folder, or downsampled-ImageNet npz file/folder; clear error when missing.

    ``npz_label_map`` (npz data only): path of the devkit's ``map_clsloc.txt`` or ``identity``; see
    :class:`~fdistill_lab.train.data.ImageNetNpzDataset`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}. Build EDM's ImageNet-64 zip with "
                                "`python -m fdistill_lab.train.prepare_imagenet --source <ILSVRC train folder> "
                                "--dest datasets/imagenet-64x64.zip` (docs/edm_data_and_fid.md)")
    if path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz"))):
        if xflip:
            raise ValueError("xflip is supported for EDM-format zips only")
        return ImageNetNpzDataset(path, label_map=npz_label_map or None)
    if npz_label_map:
        raise ValueError(f"npz_label_map applies to downsampled-ImageNet npz data only; {path} is an EDM-format "
                         "dataset (its labels are already EDM's)")
    return EDMImageDataset(path, xflip=xflip)


def _check_data(ds: Any, teacher: torch.nn.Module) -> None:
    shape = tuple(ds.image_shape)
    want = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    if shape != want:
        raise ValueError(f"data images are {shape} but the teacher expects {want}")
    if teacher.label_dim and getattr(ds, "labels_mapped", True) is False:
        raise ValueError(
            "the teacher is class-conditional but the npz labels follow the downsampled-ImageNet class order "
            "(the devkit's map_clsloc.txt: label 1 is n02119789, kit fox), not the sorted-wnid order of EDM's "
            "teachers (label 0 is n01440764, tench). Pass --set npz_label_map=<path to map_clsloc.txt>, or "
            "--set npz_label_map=identity if your npz labels are already in sorted-wnid order, or train on "
            "the EDM zip built from the ImageNet JPEGs (docs/edm_data_and_fid.md)")
    if teacher.label_dim:
        labels = ds.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= teacher.label_dim):
            raise ValueError(f"the teacher is class-conditional with {teacher.label_dim} classes but the data labels "
                             f"span [{labels.min()}, {labels.max()}] (an unlabelled data set?)")


def batch_layout(batch_size: int, per_gpu_batch: int, world_size: int) -> tuple[int, int]:
    """(local batch per rank, accumulation steps) for a global ``batch_size`` on ``world_size`` ranks."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes; choose a "
                         f"multiple of {world_size}")
    local = batch_size // world_size
    micro = per_gpu_batch or local
    if local % micro:
        near = [d for d in range(1, local + 1) if local % d == 0]
        below, above = max(d for d in near if d < micro), min((d for d in near if d > micro), default=None)
        raise ValueError(f"per-process batch {local} (= batch_size {batch_size} / {world_size} processes) is not a "
                         f"multiple of per_gpu_batch {micro}; pick per_gpu_batch dividing {local}, e.g. {below}"
                         + (f" or {above}" if above else ""))
    return local, local // micro


def _batches(loader: Iterator[Any], conditional: bool, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches on ``device`` in [-1, 1]: the (pinned) uint8 batch is copied asynchronously, a quarter of the
    bytes of its float32 version, and converted there."""
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        yield to_model_range(images), (labels.to(device, non_blocking=True) if conditional else None)


class _SigtermFlag:
    """Sets ``seen`` on SIGTERM (installed only in the main thread); restores the old handler on close."""

    def __init__(self) -> None:
        self.seen = False
        self._old: Any = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a worker thread): no handler
            self._old = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity (a loss, a gradient norm or the weights to be checkpointed)."""


def _check_finite(logs: dict[str, float], step: int, last: Path | None) -> None:
    """NonFiniteError at the first non-finite loss or gradient norm, naming the step, the values and the last
    (finite) checkpoint; the run stops before it can checkpoint non-finite weights."""
    bad = {k: v for k, v in logs.items() if (k.startswith("loss") or k.startswith("grad_norm"))
           and isinstance(v, float) and not math.isfinite(v)}
    if bad:
        where = f"the last checkpoint, {last.name}, is finite and kept" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"iteration {step} gave non-finite values ({', '.join(f'{k} = {v}' for k, v in sorted(bad.items()))}); "
            f"training stopped: {where}. Rerunning the same command would meet them again; lower the learning rate, "
            "set grad_clip, or change the settings, in a new --out (--set init_from=<this run> to keep its networks)")


def _check_weights_finite(trainer: FDistillTrainer) -> None:
    for name in ("student", "student_ema", "fake_score", "disc"):
        for key, t in getattr(trainer, name).state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{name}.{key} is not finite at iteration {trainer.step_count}: no checkpoint "
                                     "written (the last one is kept)")


def _set_lr(trainer: FDistillTrainer, cfg: DistillConfig, step: int, warmup: int) -> None:
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    for opt, lr in ((trainer.opt_student, cfg.lr_student), (trainer.opt_fake, cfg.lr_fake),
                    (trainer.opt_disc, cfg.lr_disc)):
        for group in opt.param_groups:
            group["lr"] = lr * scale


OTHER_RANK_DELAY_S = 2.0


class OtherRankFailed(RuntimeError):
    """Another rank failed (its own error is in its output); this one stops with it."""


class _MainOnly:
    """Work that only rank 0 does (files), whose failure must stop every rank together: an error inside ``with
    main_only:`` is held, and :meth:`check` (a collective, on every rank) raises it on rank 0 and
    :class:`OtherRankFailed` elsewhere, so that no rank is left waiting in a collective for a rank that died."""

    def __init__(self, env: fdist.DistEnv) -> None:
        self.env, self.error = env, None

    def __enter__(self) -> _MainOnly:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception) and self.env.world_size > 1:
            self.error = exc
            return True  # held until check()
        return False

    def check(self, *flags: bool) -> list[bool]:
        """Raise a held error (every rank); else the all-ranks OR of ``flags`` (one all-reduce for both)."""
        failed, *rest = fdist.any_ranks([self.error is not None, *flags], self.env.device)
        if failed:
            if self.error is not None:
                raise self.error
            time.sleep(OTHER_RANK_DELAY_S)  # let rank 0 exit first: launchers report the first failure as the cause
            raise OtherRankFailed("rank 0 failed (its error is reported by rank 0); stopping this rank too")
        return rest


def _save(trainer: FDistillTrainer, emas: StudentEMAs, ckpt_dir: Path, rcfg: RunConfig, env: fdist.DistEnv,
          fid_state: dict[str, Any], identity: dict[str, Any]) -> Path:
    """Gather every rank's RNG states, write the checkpoint atomically on rank 0 (never with non-finite weights),
    then move the pointer, recording the file's sha256."""
    rank_rng = fdist.gather_objects(fdist.rng_state())
    trainer_rng = fdist.gather_objects(trainer.rng.state_dict())
    path = checkpoint_path(ckpt_dir, trainer.step_count)
    main_only = _MainOnly(env)
    if env.is_main:
        with main_only:
            _check_weights_finite(trainer)
            extra = {"world_size": env.world_size, "rank_rng": rank_rng,
                     "trainer_rng": [s["cpu"] for s in trainer_rng], "noise_rng": [s["device"] for s in trainer_rng],
                     "emas": emas.state_dict(), "fid": fid_state, "identity": identity}
            digest = atomic_save_digest(trainer.checkpoint_state(extra), path)
            commit_checkpoint(ckpt_dir, path, trainer.step_count, rcfg.keep_checkpoints, digest)
    main_only.check()  # also the barrier: the pointer has moved (or every rank stops)
    return path


def _new_run_hint(out: Path) -> str:
    return (f"to continue this run, rerun with its recorded settings ({out / 'config.json'}); to start a new run "
            f"from its networks, train into a new --out with --set init_from={out}")


def _resume(trainer: FDistillTrainer, emas: StudentEMAs, ckpt_dir: Path, env: fdist.DistEnv,
            identity: dict[str, Any]) -> dict[str, Any]:
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return {}
    out = ckpt_dir.parent
    main_only = _MainOnly(env)
    verified = False
    if env.is_main:  # hashing a 10 GB checkpoint once is enough; the ranks share the verdict
        with main_only:
            verified = verify_checkpoint(ckpt_dir, path)
    main_only.check()
    try:
        extra = trainer.load_checkpoint(path, fix="it is not the checkpoint that was written")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {resume_hint(ckpt_dir, path)}") from None
    except ValueError as err:
        raise ValueError(f"{err}; {_new_run_hint(out)}") from None
    if extra.get("world_size") != env.world_size:
        raise ValueError(f"{path} was written by {extra.get('world_size')} processes, this run has "
                         f"{env.world_size}: exact resume needs the same number (or start a new --out)")
    recorded = extra.get("identity")
    if recorded is None:
        notes = [f"{path.name} predates teacher/data records: cannot check that they are the run's"]
    else:
        refuse, notes = resume_problems(recorded, identity)
        if refuse:
            raise ValueError(f"{out} was trained with other inputs than this command gives: {'; '.join(refuse)}. "
                             f"{_new_run_hint(out).capitalize()}")
    if env.is_main and not verified:
        notes.append(f"{path.name} has no recorded sha256 (written by an older version): loaded unverified")
    if env.is_main:
        for note in notes:
            print(f"{out}: {note}", file=sys.stderr)
    noise = extra.get("noise_rng", [None] * env.world_size)[env.rank]
    try:
        trainer.rng.load_state_dict({"cpu": extra["trainer_rng"][env.rank], "device": noise})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    fdist.set_rng_state(extra["rank_rng"][env.rank])
    emas.load_state_dict(extra["emas"])
    trainer.history.clear()
    return extra.get("fid", {})


def init_checkpoint(source: Path) -> Path:
    """The checkpoint that ``init_from`` names: a checkpoint file, or a run folder's latest checkpoint."""
    if not source.exists():
        raise FileNotFoundError(f"init_from: {source} not found; give a trainer checkpoint "
                                "(<run>/checkpoints/ckpt_*.pt) or the run folder of the run to start from")
    if source.is_dir():
        path = latest_checkpoint(source / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"init_from: {source} holds no checkpoint ({source / 'checkpoints'} has no "
                                    "latest.json); give a run folder that has saved one, or a checkpoint file")
    else:
        path = source
    verify_checkpoint(path.parent, path)  # when the run that wrote it recorded its sha256
    return path


def _init_from(trainer: FDistillTrainer, extra_betas: tuple[float, ...], path: Path, env: fdist.DistEnv
               ) -> tuple[dict[str, Any], StudentEMAs]:
    """Load another run's networks into a fresh run (:meth:`FDistillTrainer.load_weights`). Extra EMAs of the
    same rates carry over; otherwise they start from the loaded student, as in a fresh run."""
    state = trainer.load_weights(path)
    emas = StudentEMAs(trainer.student, extra_betas)
    saved = state.get("extra", {}).get("emas")
    if saved is not None and [float(b) for b in saved["betas"]] == list(extra_betas):
        emas.load_state_dict(saved)
    mine = trainer.config.to_dict()
    changed = {k: [v, mine.get(k)] for k, v in state["config"].items() if k != "accum_steps" and mine.get(k) != v}
    if env.is_main:
        print(f"initialised from {path} (step {state['step']}); settings changed (then, now): {changed or 'none'}",
              file=sys.stderr)
    return {"checkpoint": str(path), "step": int(state["step"]), "changed": changed}, emas


def _fid(trainer: FDistillTrainer, rcfg: RunConfig, detector: Any, ref: Any) -> dict[str, Any]:
    """FID record of the EMA student (:func:`~fdistill_lab.train.fid.evaluate_fid`): ``fid`` (the minimum over
    ``fid_seed_sets`` sets) and the protocol it was measured with (labels, seed ranges, images, quantize)."""
    shape = (trainer.teacher.img_channels, trainer.teacher.img_resolution, trainer.teacher.img_resolution)

    def generate(labels: torch.Tensor | None, seeds: torch.Tensor) -> torch.Tensor:
        z = latents_from_seeds(seeds.cpu(), shape)
        return trainer.sample(z=z, labels=labels, use_ema=True)

    return evaluate_fid(generate, detector, ref, num_images=rcfg.fid_images, batch_size=rcfg.fid_batch,
                        num_classes=trainer.label_dim or None, quantize=rcfg.fid_quantize, seed=rcfg.fid_seed,
                        labels=rcfg.fid_labels, seed_sets=rcfg.fid_seed_sets, device=trainer.device)


def train(preset: str, teacher: str | Path, data: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
          progress: bool = True, stop_at: int | None = None,
          callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train with ``preset`` + ``overrides`` into ``out`` (resuming if it holds a checkpoint).

    ``stop_at``: stop with a checkpoint once this many iterations are done, as SIGTERM does (for tests
    and time-limited jobs). ``callback(step, logs)`` runs on rank 0 after every iteration.
    """
    dcfg, rcfg = resolve(preset, overrides)
    env = fdist.init_distributed(rcfg.device)
    try:
        with _run_folder_lock(Path(out), env):
            return _train(preset, dcfg, rcfg, Path(teacher), Path(data), Path(out), env, overrides or {}, progress,
                          stop_at, callback)
    finally:
        fdist.cleanup()


RUN_LOCK = ".train.lock"


class RunFolderBusy(RuntimeError):
    """Another training job holds the run folder."""


@contextmanager
def _run_folder_lock(out: Path, env: fdist.DistEnv) -> Iterator[None]:
    """One training job per run folder: a second one on the same ``out`` (say a requeued job overlapping the
    old one) would write the same checkpoint files. Rank 0 holds an flock on ``<out>/.train.lock`` (released
    by the system however the process ends, so it never goes stale); every rank stops if it is taken. Holding
    it, rank 0 removes the temporary files of writers that died mid-write (a checkpoint can be gigabytes).
    Without fcntl (Windows) the folder is not locked."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a run folder; give a folder (new or of an earlier run)")
    fd, holder = None, None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_file(out / RUN_LOCK, wait=False)
        except ImportError:  # no fcntl: the folder is not locked
            pass
        else:
            if fd is None:
                holder = lock_holder(out / RUN_LOCK) or "unknown"
    if fdist.any_rank(holder is not None, env.device):
        raise RunFolderBusy(f"another training job{f' (process {holder})' if holder else ''} is using {out}; "
                            "wait for it to exit (it checkpoints on SIGTERM) or train into another --out")
    try:
        if fd is not None:
            count, size = 0, 0
            for folder in (out, out / "checkpoints", out / "logs", out / "samples"):  # the trainer's own folders
                n, b = remove_stale_temporaries(folder, recursive=False)
                count, size = count + n, size + b
            if count:
                print(f"{out}: removed {count} temporary file(s) ({size / 2**20:.1f} MiB) left by a job killed "
                      "while writing", file=sys.stderr)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _train(preset: str, dcfg: DistillConfig, rcfg: RunConfig, teacher_path: Path, data_path: Path, out: Path,
           env: fdist.DistEnv, overrides: dict[str, Any], progress: bool, stop_at: int | None,
           callback: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    hints = get_preset(preset)
    if not teacher_path.is_file():
        raise FileNotFoundError(f"teacher not found: {teacher_path}. Get it with: {hints.teacher_hint}")
    if rcfg.fid_every and not (rcfg.fid_detector and rcfg.fid_ref):
        raise ValueError("fid_every > 0 needs --fid-detector (inception-2015-12-05.pt) and --fid-ref (EDM reference "
                         ".npz): `python -m fdistill_lab.download fid --root downloads/edm`; or --set fid_every=0")
    local, accum = batch_layout(rcfg.batch_size, rcfg.per_gpu_batch, env.world_size)
    dcfg = dcfg.replace(accum_steps=accum)
    resuming = latest_checkpoint(out / "checkpoints") is not None  # then init_from is history, not needed
    init_path = init_checkpoint(Path(rcfg.init_from)) if rcfg.init_from and not resuming else None
    if rcfg.cpu_threads:
        torch.set_num_threads(rcfg.cpu_threads)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = rcfg.tf32
        torch.backends.cudnn.allow_tf32 = rcfg.tf32
        torch.backends.cudnn.benchmark = True

    ds = open_dataset(data_path, rcfg.xflip, rcfg.npz_label_map)
    net = load_edm(teacher_path, device=env.device)
    _check_data(ds, net)
    detector = load_detector(rcfg.fid_detector, env.device) if rcfg.fid_every else None
    ref = load_reference_stats(rcfg.fid_ref) if rcfg.fid_every else None

    fdist.seed_for_rank(dcfg.seed, 0)  # identical initial weights (discriminator heads) on every rank
    trainer = FDistillTrainer(net, dcfg, env.device, env.rank, env.world_size, rcfg.rng_mode)
    emas = StudentEMAs(trainer.student, rcfg.extra_ema_betas)
    fdist.seed_for_rank(dcfg.seed, env.rank)  # dropout and other global randomness: distinct per rank

    ckpt_dir, log_path, fid_log = out / "checkpoints", out / "logs" / "train.jsonl", out / "logs" / "fid.jsonl"
    identity = run_identity(net, teacher_path, ds, data_path, rcfg)
    fid_state = _resume(trainer, emas, ckpt_dir, env, identity)
    start = trainer.step_count
    init = None
    if init_path is not None:
        init, emas = _init_from(trainer, rcfg.extra_ema_betas, init_path, env)
    elif start and (out / "config.json").is_file():  # keep the record of where the resumed run started from
        init = read_json(out / "config.json").get("initialised_from")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dropped = truncate_jsonl(log_path, start) + truncate_jsonl(fid_log, start)
        if dropped:  # rows past the checkpoint (they are logged again), or an earlier run without checkpoints
            print(f"{out / 'logs'}: dropped {dropped} log rows after step {start}, where this run "
                  f"{'resumes' if start else 'starts afresh'}", file=sys.stderr)
        for msg in reconcile_fid_records(out, fid_state, start):
            print(f"{out}: {msg}", file=sys.stderr)
        record = {"preset": preset, "overrides": {k: str(v) for k, v in overrides.items()}, "distill": dcfg.to_dict(),
                  "run": dataclasses.asdict(rcfg), "world_size": env.world_size, "device": str(env.device),
                  "local_batch": local, "accum_steps": accum, "teacher": str(teacher_path), "data": str(data_path),
                  "identity": identity, **({"initialised_from": init} if init else {})}
        if not start or not (out / "config.json").is_file():  # the run's record: written once, never rewritten
            write_json_atomic(out / "config.json", record)
        else:  # a restart: what changed (only settings that may change, or the resume was refused above)
            first = read_json(out / "config.json")
            then, now = first.get("run", {}), json.loads(json.dumps(record["run"]))  # as recorded: tuples as lists
            changed = {k: [then.get(k), now.get(k)] for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
            changed.update({k: [first.get(k), record[k]] for k in ("teacher", "data", "world_size", "device")
                            if first.get(k) != record[k]})
            append_jsonl(out / "logs" / "resumes.jsonl", {"step": start, "time": time.time(), "changed": changed})
            if "per_gpu_batch" in changed:
                print(f"{out}: per_gpu_batch changed on resume ({changed['per_gpu_batch'][0]} -> "
                      f"{changed['per_gpu_batch'][1]}): the same maths in other micro-batches, so the run continues "
                      "statistically, not bit for bit", file=sys.stderr)
            fid_changes = sorted(k for k in changed if k.startswith("fid_") and k not in ("fid_every", "fid_batch"))
            if fid_changes:
                print(f"{out}: FID settings changed on resume ({', '.join(fid_changes)}): later FIDs are measured "
                      "another way than the earlier ones in logs/fid.jsonl and metrics.json", file=sys.stderr)
    sampler = fdist.GlobalBatchSampler(len(ds), rcfg.batch_size, env.rank, env.world_size, seed=dcfg.seed,
                                       start_batch=start, micro_batch=local // accum)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=rcfg.num_workers,
                                         pin_memory=env.device.type == "cuda",
                                         persistent_workers=rcfg.num_workers > 0,
                                         worker_init_fn=worker_init_for_this_process(),
                                         generator=torch.Generator().manual_seed(dcfg.seed))  # not the global RNG
    with open_batches(loader) as loader_it:
        batches = _batches(loader_it, bool(net.label_dim), env.device)
        return _loop(trainer, emas, dcfg, rcfg, env, out, batches, fid_state, identity, detector, ref, start,
                     progress, stop_at, callback)


def _loop(trainer: FDistillTrainer, emas: StudentEMAs, dcfg: DistillConfig, rcfg: RunConfig, env: fdist.DistEnv,
          out: Path, batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]], fid_state: dict[str, Any],
          identity: dict[str, Any], detector: Any, ref: Any, start: int, progress: bool, stop_at: int | None,
          callback: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    """The training iterations from ``start`` to ``rcfg.steps``: log, sample, FID, checkpoint; stop on SIGTERM,
    at ``stop_at``, or with NonFiniteError at the first non-finite loss."""
    from tqdm.auto import tqdm

    net = trainer.teacher
    ckpt_dir, log_path, fid_log = out / "checkpoints", out / "logs" / "train.jsonl", out / "logs" / "fid.jsonl"
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    sample_z = torch.randn(rcfg.sample_count, *shape, generator=g)
    sample_labels = torch.arange(rcfg.sample_count) % net.label_dim if net.label_dim else None

    sigterm = _SigtermFlag()
    window = LogWindow()
    status, path = "done", latest_checkpoint(ckpt_dir)
    bar = tqdm(total=rcfg.steps, initial=start, desc=f"f-distill {dcfg.divergence}", disable=not (progress and
               env.is_main), dynamic_ncols=True)
    try:
        while trainer.step_count < rcfg.steps:
            _set_lr(trainer, dcfg, trainer.step_count, rcfg.warmup_steps)
            t0 = time.perf_counter()
            images, labels = next(batches)
            t_data = time.perf_counter() - t0
            logs = trainer.step(images, labels)
            logs.pop("step")
            if logs["generator_step"]:
                emas.update(trainer.student)
            trainer.history.clear()  # the JSONL log keeps the history; checkpoints stay small
            logs = fdist.all_reduce_mean(logs, env.device)
            logs["images_per_s"] = rcfg.batch_size / max(logs["time_s"] + t_data, 1e-9)
            logs["data_time_s"] = t_data
            done = trainer.step_count
            _check_finite(logs, done, path)  # the same on every rank: the logs are all-reduced
            window.add(logs)
            bar.update(1)
            main_only = _MainOnly(env)  # rank 0's files: a failure there stops every rank at the check below
            with main_only:
                if env.is_main and callback is not None:
                    callback(done, logs)
                if env.is_main and rcfg.log_every and done % rcfg.log_every == 0:
                    row = {"step": done, "kimg": done * rcfg.batch_size / 1000, **window.mean()}
                    append_jsonl(log_path, row)
                    window.reset()
                    if "loss_f" in row:
                        bar.set_postfix(loss_f=f"{row['loss_f']:.3g}", img_s=f"{row['images_per_s']:.0f}",
                                        ratio=f"{row.get('ratio_mean', math.nan):.2f}", refresh=False)
                if env.is_main and rcfg.sample_every and (done % rcfg.sample_every == 0 or done == rcfg.steps):
                    imgs = trainer.sample(z=sample_z, labels=sample_labels, use_ema=True)
                    save_grid_png(imgs, out / "samples" / f"step_{done:07d}.png")
            if rcfg.fid_every and (done % rcfg.fid_every == 0 or done == rcfg.steps):
                main_only.check()  # every rank agrees before a long evaluation (which is collective)
                record = _fid(trainer, rcfg, detector, ref)
                value = record["fid"]
                fid_state["last"] = {"step": done, "fid": value}
                with main_only:
                    if "best" not in fid_state or value < fid_state["best"]["fid"]:
                        fid_state["best"] = {"step": done, "fid": value}
                        if env.is_main:
                            export_student(trainer.student_ema, out / "student_best.pt", {"step": done, "fid": value})
                    if env.is_main:
                        append_jsonl(fid_log, {"step": done, **record, "ema_beta": dcfg.ema_beta})
                        write_json_atomic(out / "metrics.json", fid_state)
            (signalled,) = main_only.check(sigterm.seen)
            stop = signalled or (stop_at is not None and done >= stop_at)
            if (rcfg.ckpt_every and done % rcfg.ckpt_every == 0) or stop or done == rcfg.steps:
                path = _save(trainer, emas, ckpt_dir, rcfg, env, fid_state, identity)
            if stop and done < rcfg.steps:
                status = "interrupted"
                break
    finally:
        bar.close()
        sigterm.close()
    if status == "done" and env.is_main:
        export_student(trainer.student_ema, out / "student_final.pt", {"step": trainer.step_count})
    fdist.barrier()
    last, best = fid_state.get("last"), fid_state.get("best")
    return TrainResult(status, trainer.step_count, out, last["fid"] if last else None,
                       best["fid"] if best else None, path, env.rank)


def build_parser() -> argparse.ArgumentParser:
    prog = "fdistill-train" if Path(sys.argv[0]).name == "fdistill-train" else "python -m fdistill_lab.train"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="imagenet64", choices=sorted(PRESETS), help="recipe (default imagenet64)")
    p.add_argument("--teacher", help="EDM teacher pickle (or a load_edm .pt)")
    p.add_argument("--data", help="EDM-format dataset zip/folder or npz batches")
    p.add_argument("--out", help="run folder (reused for resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting; repeatable (see --describe)")
    for flag, key, typ in (("--div", "divergence", str), ("--steps", "steps", int), ("--batch-size", "batch_size", int),
                           ("--per-gpu-batch", "per_gpu_batch", int), ("--lr", "lr", float),
                           ("--fid-detector", "fid_detector", str), ("--fid-ref", "fid_ref", str),
                           ("--device", "device", str), ("--seed", "seed", int)):
        p.add_argument(flag, dest=f"flag_{key}", type=typ, default=None, help=f"same as --set {key}=...")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop after this many iterations")
    p.add_argument("--describe", action="store_true", help="print the preset's settings and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker (whose message carries the worker's
    traceback), the original error's last line."""
    text = str(exc)
    if "Original Traceback" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1]
    return text


def _os_error(exc: OSError) -> str:
    where = exc.filename or "a file it reads or writes"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk (or quota) while writing {where}: free space or move --out to a disk "
                "with room, then rerun the same command; it resumes from the last complete checkpoint")
    text = _one_line(exc)
    return f"{text}{'' if exc.filename else f' ({where})'}; fix the path or its permissions and rerun the same command"


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``fdistill-train``); returns 0 when done, 143 when stopped early (SIGTERM), and
    after a one-line error 2 for bad settings, inputs or checkpoints, 3 for a run gone non-finite, 1 for a
    system error (disk full). Other exceptions (bugs) keep their traceback and exit with 1."""
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = parse_overrides(args.overrides)
        for key, value in vars(args).items():
            if key.startswith("flag_") and value is not None:
                overrides[key[len("flag_"):]] = value
        if args.describe:
            print(describe(args.preset, overrides))
            return 0
        missing = [f"--{k}" for k in ("teacher", "data", "out") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        result = train(args.preset, args.teacher, args.data, args.out, overrides, progress=not args.no_progress,
                       stop_at=args.stop_at)
    except (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError, RunFolderBusy,
            fdist.DeviceUnavailable) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (NonFiniteError, FloatingPointError) as exc:  # FloatingPointError: non-finite images at an FID
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 3
    except OSError as exc:  # a full disk, a read-only or vanished folder, permissions
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); the last committed checkpoint is kept, and rerunning the same command "
              "resumes from it (SIGTERM instead also saves the current iteration)", file=sys.stderr)
        return 130
    msg = f"{result.status} at step {result.step}; checkpoint {result.checkpoint}"
    if result.last_fid is not None:
        msg += f"; FID last {result.last_fid:.4g}, best {result.best_fid:.4g}"
    if result.rank == 0:
        print(msg, flush=True)
    return 0 if result.status == "done" else EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["train", "main", "TrainResult", "batch_layout", "open_dataset", "build_parser", "read_json",
           "init_checkpoint", "NonFiniteError", "RunFolderBusy"]
