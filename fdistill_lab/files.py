"""Files that survive crashes: atomic writes, checkpoints, locks.

``atomic_file`` writes to a fresh temporary name beside the target and ``os.replace``s it, so readers see the
old or the new file, never a partial one (a crash or SIGTERM mid-write leaves the old file). Checkpoints are
``torch.save``d through it and read with ``torch.load(weights_only=True)``; an unreadable one raises
``CheckpointError`` naming the file and what to do. ``lock_file`` is an ``flock`` that the system releases however
the process ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush ``folder``'s entries (a rename into it) to disk; a no-op only where folders cannot be synced."""
    if os.name == "nt":  # Windows cannot open a folder as a file
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # file systems without folder fsync
            raise
    finally:
        os.close(fd)


def lock_file(path: str | os.PathLike, wait: bool = True) -> int | None:
    """Open (creating) ``path`` and take an exclusive ``flock`` on it, then write this process's pid into it (for
    :func:`lock_holder`). Returns the file descriptor (closing it releases the lock, as does the end of the
    process, so the lock never goes stale), or None when ``wait`` is False and another process holds it.
    ImportError where fcntl is missing (Windows)."""
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)  # at the start, leaving the file offset where it was
    return fd


@contextlib.contextmanager
def held_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold :func:`lock_file` on ``path`` (waiting for it) for the ``with`` block; unlocked where fcntl is
    missing (Windows), which is fine for one process at a time."""
    try:
        fd = lock_file(path)
    except ImportError:
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def lock_holder(path: str | os.PathLike) -> str | None:
    """The pid that the holder of a :func:`lock_file` lock wrote into it (None if missing or empty), for messages."""
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yields a binary file opened on a fresh temporary name in the same folder; when
    the block ends without error the file is flushed (and fsynced if ``durable``), renamed over ``path`` with
    ``os.replace`` and the folder fsynced (if ``durable``); on error it is removed. Readers see the old or the new
    file, never a partial one; concurrent writers never share a temporary file (the last rename wins). The
    file's mode follows the umask like any newly created file (``0o666 & ~umask``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # not mkstemp, whose 0o600 would stick
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself survives a power loss


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and, if ``durable``, crash-safely (see :func:`atomic_file`)."""
    with atomic_file(path, durable) as fh:
        fh.write(text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, durable: bool = True) -> None:
    """JSON to ``path`` atomically and, if ``durable``, crash-safely (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable)



class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not hold what was expected."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically and durably (:func:`atomic_file`)."""
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
