"""Record a notebook's key numbers in ``<output_dir>/results.json`` (a tiny scrapbook replacement).

``record(output_dir, name, value)`` merges one entry atomically (write a temporary file in the same
folder, fsync, ``os.replace``, fsync the folder) and displays it; ``read_records(output_dir)`` returns the dict. Tests
and later notebooks read these numbers (notebook_conventions.md section 7).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

RESULTS_FILE = "results.json"
MIME_TYPE = "application/vnd.fdistill.record+json"


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Convert numbers, tensors, arrays, paths, lists and dicts to plain JSON types, or raise TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be strings; got {type(k).__name__} {k!r}")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays/scalars, torch tensors
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_jsonable(value.tolist(), where)
    raise TypeError(f"{where}: cannot record a {type(value).__name__}; use numbers, strings, lists or dicts")


def results_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / RESULTS_FILE


def read_records(output_dir: str | os.PathLike) -> dict[str, Any]:
    """All records of ``output_dir`` (its ``results.json``) as a dict; FileNotFoundError if none."""
    path = results_path(output_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no records at {path}: run the notebook with output_dir={str(output_dir)!r} first")
    with path.open() as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


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


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON to ``path`` atomically and durably (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _display(name: str, value: Any) -> None:
    text = f"record {name} = {json.dumps(value)}"
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display({MIME_TYPE: {name: value}, "text/plain": text}, raw=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` itself (no lock file left in it); unlocked where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def record(output_dir: str | os.PathLike, name: str, value: Any, *, show: bool = True) -> Any:
    """Merge ``name: value`` into ``<output_dir>/results.json`` atomically (and under a lock, so processes
    sharing a folder keep each other's entries) and display it; return the JSON value.

    ``value`` may be a number, string, bool, list, dict, numpy array or torch tensor. NaN and inf are
    stored as JSON ``NaN``/``Infinity`` (Python's json reads them back).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"record name must be a non-empty string; got {name!r}")
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output_dir {str(out)!r} does not exist (setup_notebook creates it)")
    jsonable = to_jsonable(value, name)
    path = results_path(out)
    with _folder_lock(out):  # read-modify-write: two processes recording into one folder keep every entry
        data = read_records(out) if path.is_file() else {}
        data[name] = jsonable
        write_json_atomic(path, data)
    if show:
        _display(name, jsonable)
    return jsonable


def is_finite_number(x: Any) -> bool:
    """True for a real, finite number (helper for tests on records)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
