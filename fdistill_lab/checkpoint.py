"""Atomic checkpoint files: write to a temporary file beside ``<path>``, flush to disk, then ``os.replace``.

A crash (or SIGTERM) mid-write therefore never leaves a truncated checkpoint under the real name.
Loading uses ``torch.load(weights_only=True)``; an unreadable file raises ``CheckpointError`` naming
the file and what to do, and is never silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .records import atomic_file


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not hold what was expected."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically and durably (:func:`~fdistill_lab.records.atomic_file`)."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def load_file(path: str | os.PathLike, what: str = "checkpoint", fix: str = "delete it and rerun",
              required_keys: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """Load a dict saved by :func:`atomic_save` (tensors and plain containers only).

    Raises ``FileNotFoundError`` if absent and ``CheckpointError`` (naming the file, ``what`` it should
    be and the ``fix``) if it is corrupted, not a dict, or lacks ``required_keys``. ``mmap``: map the file
    instead of reading it into memory (every rank of a resumed multi-GPU run loads the same checkpoint; mapped,
    they share the page cache instead of each holding a copy).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, random bytes, pickle of forbidden globals, ...
        raise CheckpointError(
            f"cannot read {what} {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"the file is corrupted or not a {what}: {fix}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a dict: {fix}")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise CheckpointError(f"{what} {path} lacks the entries {missing}: {fix}")
    return obj
