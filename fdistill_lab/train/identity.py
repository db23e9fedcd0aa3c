"""What a run is: its teacher, its data and the run settings that change results, recorded in every checkpoint
so that a resumed run can refuse to continue with anything else.

A resume that silently swapped the teacher, the data set or the batch size would write a run that no setting on
record describes. :func:`run_identity` hashes the teacher's weights (not its path: a teacher moved to another
disk is the same teacher) and takes the data set's :meth:`identity` (its image names, labels and shape; a
repaired image keeps it, see :mod:`.data`); :func:`resume_problems` compares two of them. Settings that only
change speed or bookkeeping (``steps``, intervals, ``num_workers``, FID settings, ...) may change on resume, and so
may ``per_gpu_batch`` (the same maths over the whole batch, in other micro-batches: statistically the same run, not
the same bits).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["RESULT_SETTINGS", "network_digest", "run_identity", "resume_problems"]

# RunConfig settings that change what a run computes (DistillConfig's are checked by the trainer itself; the npz
# label map is part of the data's identity through the labels it gives)
RESULT_SETTINGS = ("batch_size", "warmup_steps", "xflip", "rng_mode", "extra_ema_betas")


@torch.no_grad()
def network_digest(net: nn.Module) -> str:
    """sha256 of a network's tensors (names, dtypes, shapes and values, in ``state_dict`` order)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_identity(teacher: nn.Module, teacher_path: Any, data: Any, data_path: Any, run: Any) -> dict[str, Any]:
    """The record stored in each checkpoint: teacher digest, data identity, and :data:`RESULT_SETTINGS`."""
    settings = {k: getattr(run, k) for k in RESULT_SETTINGS}
    settings["extra_ema_betas"] = list(settings["extra_ema_betas"])
    return {"teacher": {"sha256": network_digest(teacher), "path": str(teacher_path)},
            "data": {**data.identity(), "path": str(data_path)}, "settings": settings}


def resume_problems(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refusals, notes) for resuming a run recorded as ``recorded`` with ``current``: each refusal names what
    differs and both values; notes are differences that are allowed (a moved file, a repaired image)."""
    refuse, notes = [], []
    rt, ct = recorded.get("teacher", {}), current["teacher"]
    if rt.get("sha256") != ct["sha256"]:
        refuse.append(f"teacher: the run was trained from {rt.get('path')} (weights sha256 {str(rt.get('sha256'))[:12]}"
                      f"...), this is {ct['path']} (sha256 {ct['sha256'][:12]}...), another network")
    elif rt.get("path") != ct["path"]:
        notes.append(f"teacher read from {ct['path']} (recorded: {rt.get('path')}); same weights")
    rd, cd = recorded.get("data", {}), current["data"]
    if (rd.get("format"), rd.get("images"), rd.get("structure")) != (cd["format"], cd["images"], cd["structure"]):
        refuse.append(f"data: the run was trained on {rd.get('path')} ({rd.get('images')} images), this is "
                      f"{cd['path']} ({cd['images']} images) with other image names, labels or image shape")
    else:
        if rd.get("content") != cd["content"]:
            notes.append(f"data {cd['path']}: same images and labels as recorded, but some files' contents differ "
                         "(a repaired or re-encoded image?); continuing")
        if rd.get("path") != cd["path"]:
            notes.append(f"data read from {cd['path']} (recorded: {rd.get('path')})")
    for key, value in current["settings"].items():
        old = recorded.get("settings", {}).get(key, value)
        if old != value:
            refuse.append(f"{key}: recorded {old!r}, now {value!r}")
    return refuse, notes
