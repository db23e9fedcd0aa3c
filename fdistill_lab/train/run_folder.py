"""Files of a training run folder (see :mod:`fdistill_lab.train`): JSONL logs, sample grids, checkpoint
pointers, FID records, extra student EMAs.

Layout of ``<out>``::

    config.json              preset, overrides, resolved settings, world size
    logs/train.jsonl         one line per log interval: step, every loss, ratio statistics, images/s
    logs/fid.jsonl           one line per FID evaluation
    metrics.json             {"last": {step, fid}, "best": {step, fid}}
    samples/step_0002000.png sample grids of the EMA student (fixed latents and labels)
    checkpoints/ckpt_0002000.pt, checkpoints/latest.json   full state for exact resume (atomic); latest.json,
                             written after the file, names it and holds the sha256 of every kept checkpoint
    logs/resumes.jsonl       one line per restart: the step it resumed from and the settings that changed
    student_best.pt, student_final.pt                      EMA student weights + network config
    student_best_step0004000.pt  a best student from past the checkpoint a run resumed from (kept, renamed)
    .train.lock              flock'ed by the running job (a second job on the folder is refused)
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import CheckpointError, atomic_file, file_sha256, verify_digest, write_json_atomic, write_text_atomic
from ..image_grid import make_grid

CKPT_POINTER = "latest.json"


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL log ([] if the file does not exist). A torn last line (a crash mid-write) is skipped
    quietly; an unreadable line before it is skipped with a warning naming the file and line."""
    path = Path(path)
    return _parse_jsonl(path.read_text(), path) if path.is_file() else []


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) and line.strip():
                warnings.warn(f"{path}:{i}: skipping an unreadable log line (the file is damaged)", stacklevel=3)
    return rows


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop rows with ``step > max_step`` (written after the checkpoint a run resumes from); returns how many.
    A damaged file (a torn last line from a crash mid-write) is rewritten too, so the next row starts a line."""
    if not path.is_file():
        return 0
    text = path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged lines are dropped by the rewrite below
        rows = _parse_jsonl(text, path)
    kept = [r for r in rows if r.get("step", 0) <= max_step]
    if len(kept) < len(rows) or len(rows) != len(text.splitlines()) or (text and not text.endswith("\n")):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


class LogWindow:
    """Means of the logged numbers over a log interval (keys may differ between iterations)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.sums[k] += float(v)
                self.counts[k] += 1
            elif isinstance(v, float):  # NaN / inf are worth seeing in the log
                self.sums[k] = v
                self.counts[k] = 1

    def mean(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def save_grid_png(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """[-1, 1] images [N, C, H, W] -> one PNG grid (the package's own make_grid, no torchvision)."""
    import numpy as np
    import PIL.Image

    arr = (make_grid(images, nrow=nrow, padding=1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    with atomic_file(path, durable=False) as fh:  # a preview: never half-written, not fsynced
        PIL.Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(fh, format="PNG")
    return path


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt_{step:07d}.pt"


def _checkpoints_by_step(ckpt_dir: Path) -> dict[int, Path]:
    found = {}
    for p in ckpt_dir.glob("ckpt_*.pt"):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _student_info(path: Path) -> dict[str, Any]:
    """The ``info`` that :func:`export_student` stored in ``path`` ({} if absent or unreadable)."""
    if not path.is_file():
        return {}
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged file simply has no readable record
        return {}
    return blob.get("info", {}) if isinstance(blob, dict) else {}


def reconcile_fid_records(out: Path, fid_state: dict[str, Any], start: int) -> list[str]:
    """Make ``metrics.json`` and ``student_best.pt`` agree with the checkpoint a run resumes from at ``start``.

    A run that stopped between an FID evaluation and the next checkpoint left records of steps that the resumed
    run computes again. ``metrics.json`` is rewritten from the checkpoint's FID state (removed when that has
    none). A ``student_best.pt`` from such a later step is a real evaluated model: it is kept, renamed to
    ``student_best_step<S>.pt``, so that ``student_best.pt`` only ever names the resumed run's best. Returns
    one message per change (nothing when the records already agree).
    """
    metrics, best_file = out / "metrics.json", out / "student_best.pt"
    try:
        old = read_json(metrics) if metrics.is_file() else {}
    except (OSError, ValueError):
        old = None  # damaged: rewrite it
    old_best = (old or {}).get("best") or {}
    step = old_best.get("step")
    saved = _student_info(best_file)  # the file's own record wins: metrics.json may predate it (a crash)
    if isinstance(saved.get("step"), int) and saved["step"] != step:
        step, old_best = saved["step"], {"step": saved["step"], "fid": saved.get("fid")}
    elif old == fid_state:
        return []
    msgs = []
    if isinstance(step, int) and step > start and best_file.is_file():
        kept = out / f"student_best_step{step:07d}.pt"
        os.replace(best_file, kept)
        msg = (f"{best_file.name} held the EMA student of step {step} (FID {old_best.get('fid')}), later than "
               f"the checkpoint of step {start} this run resumes from: kept as {kept.name}")
        if fid_state.get("best"):
            msg += f" (the checkpoint's best, step {fid_state['best']['step']}, had been overwritten by it)"
        msgs.append(msg)
    if fid_state:
        write_json_atomic(metrics, fid_state)
        msgs.append(f"{metrics.name} rewritten to the FID records of the checkpoint of step {start}")
    elif metrics.is_file():
        metrics.unlink()
        msgs.append(f"{metrics.name} removed: the checkpoint of step {start} has no FID evaluation yet")
    return msgs


def _load_pointer(ckpt_dir: Path) -> dict[str, Any] | None:
    pointer = ckpt_dir / CKPT_POINTER
    if not pointer.is_file():
        return None
    data = read_json(pointer)
    if not isinstance(data, dict) or not isinstance(data.get("file"), str):
        raise ValueError("no 'file' entry")
    return data


def read_pointer(ckpt_dir: Path) -> dict[str, Any] | None:
    """``latest.json`` ({"file", "step", "checksums": {name: sha256}}), or None if there is none; CheckpointError
    naming the file and the fix when it is empty or damaged."""
    try:
        return _load_pointer(ckpt_dir)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"the checkpoint pointer {ckpt_dir / CKPT_POINTER} is empty or damaged ({exc}; a crash "
                              f"or a full disk while it was written?): {resume_hint(ckpt_dir, None)}") from None


def _recorded_digest(ckpt_dir: Path, name: str) -> str | None:
    try:
        pointer = _load_pointer(ckpt_dir)
    except (ValueError, OSError):
        return None
    return ((pointer or {}).get("checksums") or {}).get(name)


def _intact(ckpt_dir: Path, path: Path) -> bool:
    digest = _recorded_digest(ckpt_dir, path.name)
    return digest is None or file_sha256(path) == digest


def resume_hint(ckpt_dir: Path, bad: Path | None) -> str:
    """What to do when the checkpoint ``latest.json`` names (``bad``; None: the pointer itself is unreadable) is
    missing, unreadable or damaged: resume from the newest other checkpoint whose recorded sha256 still holds (the
    exact pointer to write), or start afresh."""
    others = [p for p in _checkpoints_by_step(ckpt_dir).items() if bad is None or p[1].name != bad.name]
    good = [(s, p) for s, p in others if _intact(ckpt_dir, p)]
    pointer = ckpt_dir / CKPT_POINTER
    if not good:
        return (f"no other intact checkpoint in {ckpt_dir}; to start afresh, use a new --out folder (or delete "
                f"{ckpt_dir})")
    step, path = good[-1]
    digest = _recorded_digest(ckpt_dir, path.name)
    entry = {"file": path.name, "step": step, **({"checksums": {path.name: digest}} if digest else {})}
    names = ", ".join(p.name for _, p in good)
    return (f"intact checkpoints in {ckpt_dir}: {names}. To resume from the newest of them, write "
            f"{json.dumps(entry)} into {pointer} and rerun (do not delete "
            f"{pointer} to start afresh in this folder: the old checkpoints would be overwritten)")


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by ``latest.json`` (written after the file itself), or None for a fresh run."""
    pointer = read_pointer(ckpt_dir)
    if pointer is None:
        return None
    path = ckpt_dir / pointer["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir / CKPT_POINTER} names {path.name}, which is missing; restore the file, or "
                                f"{resume_hint(ckpt_dir, path)}")
    return path


def verify_checkpoint(ckpt_dir: Path, path: Path) -> bool:
    """Check ``path`` against the sha256 that ``latest.json`` recorded for it: CheckpointError (saying which
    earlier checkpoint to resume from) if it differs; False if none was recorded (a checkpoint of an older
    version), True if it holds."""
    digest = _recorded_digest(ckpt_dir, path.name)
    if digest is None:
        return False
    try:
        verify_digest(path, digest, "checkpoint", "a disk or memory fault, or an edit")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {resume_hint(ckpt_dir, path)}") from None
    return True


def commit_checkpoint(ckpt_dir: Path, path: Path, step: int, keep: int, digest: str | None = None) -> None:
    """Point ``latest.json`` at ``path`` (recording its sha256 ``digest`` beside those of the other kept
    checkpoints); keep the newest ``keep`` checkpoints up to ``step`` and delete the rest, including any of a later
    step (left by a run that died before moving the pointer to it)."""
    ckpts = _checkpoints_by_step(ckpt_dir)
    committed = [s for s in ckpts if s <= step]
    keep_steps = set(committed[-keep:]) | {step}
    try:
        old = (read_pointer(ckpt_dir) or {}).get("checksums") or {}
    except CheckpointError:
        old = {}
    sums = {p.name: old[p.name] for s, p in ckpts.items() if s in keep_steps and p.name in old and p != path}
    if digest is not None:
        sums[path.name] = digest
    write_json_atomic(ckpt_dir / CKPT_POINTER, {"file": path.name, "step": step, "checksums": sums})
    for s, p in ckpts.items():
        if s not in keep_steps:
            p.unlink(missing_ok=True)


class StudentEMAs:
    """Extra constant-rate EMAs of the student (FastGen keeps 0.9999, 0.99995 and 0.9996), updated after
    each generator step, besides the trainer's own ``student_ema``."""

    def __init__(self, student: nn.Module, betas: tuple[float, ...]) -> None:
        self.betas = tuple(betas)
        self.nets = [copy.deepcopy(student).eval().requires_grad_(False) for _ in self.betas]

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for beta, net in zip(self.betas, self.nets):
            for p_ema, p in zip(net.parameters(), student.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - beta)

    def state_dict(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "nets": [n.state_dict() for n in self.nets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(b) for b in state["betas"]] != list(self.betas):
            raise ValueError(f"checkpoint has extra EMAs {state['betas']}, this run {list(self.betas)}")
        for net, sd in zip(self.nets, state["nets"]):
            net.load_state_dict(sd)


def export_student(net: nn.Module, path: Path, info: dict[str, Any]) -> Path:
    """Save a student's weights (on the CPU, so the file loads anywhere) with its EDMPrecond constructor
    keywords (loadable with build_edm)."""
    from ..files import atomic_save

    blob = {"format": "fdistill-student-v1", "config": dict(getattr(net, "init_kwargs", {})),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "info": info}
    return atomic_save(blob, path)
