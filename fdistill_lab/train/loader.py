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


def worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent_pid`` with :func:`functools.partial`): ignore SIGTERM, die
    with the parent, and exit at once if the parent is already gone (it died before the request took effect)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)


def _children() -> set[Any]:
    return set(multiprocessing.active_children())


@contextlib.contextmanager
def open_batches(loader: torch.utils.data.DataLoader) -> Iterator[Iterator[Any]]:
    """An iterator over ``loader`` whose workers are gone when the block ends, however it ends: the loader's own
    shutdown first (workers exit cleanly), then SIGKILL for any still alive after :data:`SHUTDOWN_WAIT_S`."""
    before = _children()
    it = iter(loader)
    workers = [p for p in _children() - before]
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's orderly shutdown (queues, pin-memory thread)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - the kill below still ends them
                pass
        for proc in workers:
            proc.join(timeout=SHUTDOWN_WAIT_S if proc.is_alive() else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=SHUTDOWN_WAIT_S)


def worker_init_for_this_process() -> functools.partial:
    """:func:`worker_init` bound to this process's pid."""
    return functools.partial(worker_init, os.getpid())
