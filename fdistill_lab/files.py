"""Files that survive crashes: atomic writes, checkpoints, locks.

``atomic_file`` writes to a fresh temporary name beside the target and ``os.replace``s it, so readers see the
old or the new file, never a partial one (a crash or SIGTERM mid-write leaves the old file). Checkpoints are
``torch.save``d through it and read with ``torch.load(weights_only=True)``; an unreadable one raises
``CheckpointError`` naming the file and what to do. ``lock_file`` is an ``flock`` that the system releases however
the process ends. ``atomic_save_digest`` hashes a checkpoint (sha256) while writing it, so that a reader can
verify its content later (``verify_digest``); ``remove_stale_temporaries`` clears the temporary files of writers
that died mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
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


TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # atomic_file's temporary names: .<target>.<16 hex>.tmp


class _Writer:
    """A binary file's ``write`` that also feeds a sha256 and keeps the first OSError it met (torch's zip writer
    reports a failed write, e.g. a full disk, as a RuntimeError of its own)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha256, self.error = fh, hashlib.sha256(), None

    def write(self, data: Any) -> int:
        try:
            n = self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(memoryview(data)[:n] if n is not None else data)
        return n

    def flush(self) -> None:
        self.fh.flush()

    def seekable(self) -> bool:  # the hash covers the bytes in the order written: no going back
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yields a binary file opened on a fresh temporary name in the same folder; when
    the block ends without error the file is flushed (and fsynced if ``durable``), renamed over ``path`` with
    ``os.replace`` and the folder fsynced (if ``durable``); on error it is removed. Readers see the old or the new
    file, never a partial one; concurrent writers never share a temporary file (the last rename wins). The
    file's mode follows the umask like any newly created file (``0o666 & ~umask``). A failed write (a full disk)
    raises OSError naming ``path``, however the code writing through the file reported it. The yielded file's
    ``sha256`` is the hash of what was written through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # not mkstemp, whose 0o600 would stick
    writer = None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:  # closing flushes too: a full disk may show only there
                writer = _Writer(fh)
                yield writer  # type: ignore[misc]
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
        except Exception as exc:
            err = (writer.error if writer is not None else None) or (exc if isinstance(exc, OSError) else None)
            if err is None:
                raise
            raise OSError(err.errno, f"{err.strerror or err} while writing {path}", str(path)) from exc
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself survives a power loss


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> tuple[int, int]:
    """Delete :func:`atomic_file`'s temporary files under ``folder`` (those of writers killed mid-write; call it
    only while no writer can be at work there, e.g. holding the folder's lock). Returns (files, bytes) removed."""
    count = size = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    for p in folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}"):
        if _TEMP_NAME.fullmatch(p.name) and p.is_file():
            try:
                n = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            count, size = count + 1, size + n
    return count, size


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
    atomic_save_digest(obj, path)
    return Path(path)


def atomic_save_digest(obj: Any, path: str | os.PathLike) -> str:
    """:func:`atomic_save`, returning the sha256 of the file written (hashed on the way to the disk, not re-read)."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)
    return fh.sha256.hexdigest()  # type: ignore[attr-defined]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_digest(path: str | os.PathLike, expected: str, what: str = "checkpoint", fix: str = "delete it and rerun"
                  ) -> None:
    """CheckpointError naming ``path`` if its sha256 is not ``expected`` (the file changed after it was written:
    a bad disk, a bit flip, an edit)."""
    got = file_sha256(path)
    if got != expected.lower():
        raise CheckpointError(f"{what} {path} is damaged: its sha256 is {got[:16]}..., not the {expected[:16]}... "
                              f"recorded when it was written; {fix}")


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
