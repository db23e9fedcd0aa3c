"""The training data loader's worker processes: they outlive a SIGTERM, never their parent, and never the run.

A cluster's time limit (Slurm, ``scancel``) sends SIGTERM to the whole process group, loader workers included;
a worker killed by it would fail the step before the main process can checkpoint, so workers ignore SIGTERM.
That alone makes them hard to stop: Python's exit handler ends child processes with SIGTERM and then waits for
them without a limit, so a run failing with its loader still open would never exit. Hence
:func:`open_batches`: however its block ends (done, an exception, an interrupt), the workers are shut down
and any left are killed (SIGKILL). And on Linux each worker asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the trainer takes its workers with it at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["open_batches", "worker_init"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h
SHUTDOWN_WAIT_S = 5.0


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: the loader's own watchdog remains (seconds)
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (a reused pid): not ours, but alive
        return True
    return True


def worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent_pid``, the trainer, with :func:`functools.partial`): ignore
    SIGTERM, die with the trainer where it is this worker's parent (fork and spawn start methods; under forkserver
    the parent is the server and torch's own watchdog notices the trainer's death), and exit at once if the trainer
    is already gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() == parent_pid:
        _die_with_parent()
    if not _alive(parent_pid):
        os._exit(1)


def _children() -> set[Any]:
    return set(multiprocessing.active_children())


def _end(workers: list[Any]) -> None:
    """Wait (one shared deadline of :data:`SHUTDOWN_WAIT_S`) for ``workers`` to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    for proc in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in workers if p.is_alive()]
    for proc in alive:
        proc.kill()
    for proc in alive:
        proc.join(timeout=SHUTDOWN_WAIT_S)


@contextlib.contextmanager
def open_batches(loader: torch.utils.data.DataLoader) -> Iterator[Iterator[Any]]:
    """An iterator over ``loader`` whose workers are gone when the block ends, however it ends (even if starting
    them fails half-way): the loader's own shutdown first (workers exit cleanly), then SIGKILL for any still alive
    after :data:`SHUTDOWN_WAIT_S`."""
    before = _children()
    it = None
    try:
        try:
            it = iter(loader)
        except BaseException as exc:  # failed after starting workers: find the half-built iterator to shut down
            it = _iterator_in(exc)
            raise
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's orderly shutdown (queues, pin-memory thread)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - the kill below still ends them
                pass
        _end([p for p in _children() - before])


def _iterator_in(exc: BaseException) -> Any:
    """The DataLoader iterator whose construction raised ``exc`` (from the traceback's frames), or None. Its own
    shutdown must end its workers: killing them while torch still watches their pids makes torch's SIGCHLD handler
    raise "worker killed" over the real error."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if hasattr(obj, "_shutdown_workers") and hasattr(obj, "_workers"):
            return obj
    return None


def worker_init_for_this_process() -> functools.partial:
    """:func:`worker_init` bound to this process's pid."""
    return functools.partial(worker_init, os.getpid())
