"""Run a notebook over a grid of papermill parameters and collect every run's records into one table.

    python -m fdistill_lab.sweep notebooks/runners/toy_run.ipynb --grid div=js,fkl --grid seed=0,1 \\
        --out outputs/sweep --jobs 2 [--smoke] [--param steps=200]

Each run gets its own folder ``<out>/runs/<slug>-<hash>`` (the hash of all its parameters identifies
it across sessions and grids; the slug of the varied ones is for people) and the notebook's
``output_dir`` points there. A run is *finished* only when
its ``results.json`` (written atomically by ``fdistill_lab.records.record``) is readable and the status
file ``sweep_status.json``, written last, says ``done``. Finished runs are skipped, so a sweep can be
interrupted and resumed; unfinished folders are wiped and rerun. A failing run is kept with its error
(``status failed`` plus ``error.txt``) and does not stop the sweep. A run whose worker process dies (e.g.
killed by the out-of-memory killer) fails the same way; the runs that this death interrupts in other workers
rerun in a fresh process pool. ``collect(out)`` gathers the parameters, status and scalar records of every
run into ``<out>/sweep.csv``.

Each run's status file also records ``notebook_sha256``, the ``notebook_hash`` of the notebook it ran: sha256
over the sources of its code cells only, so editing markdown or stripping outputs is not a change, while
editing code or a parameter default is. A resumed sweep keeps finished runs made with another version of the
notebook (or before hashes were recorded) but warns about them (``NotebookChangedWarning``);
``--rerun-changed`` (``rerun_changed=True``) reruns exactly those. The table's ``notebook_hash`` column (short
form) shows which version made each run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

from ..files import lock_file, lock_holder, write_json_atomic, write_text_atomic
from .notebook import SUPPORTED_TYPES, check_value
from .records import RESULTS_FILE, read_records

RUNS_DIR = "runs"
PARAMS_FILE = "params.json"
STATUS_FILE = "sweep_status.json"
ERROR_FILE = "error.txt"
EXECUTED_FILE = "executed.ipynb"
WORKER_FILE = ".worker.pid"
RUN_LOCK_SUFFIX = ".lock"  # runs/<run>.lock, flock'ed by the process executing that run
TABLE_FILE = "sweep.csv"
MAX_LIST_LEN = 16  # longer lists (histories) stay out of the table; read them with read_records(run_dir)
RESERVED = ("output_dir",)
HASH_KEY = "notebook_sha256"  # in the status file: notebook_hash() of the notebook the run executed
HASH_COLUMN = "notebook_hash"  # in the table: its first SHORT_HASH hex digits ("" if not recorded)
SHORT_HASH = 10
# kernels started at the same moment by parallel workers can pick the same free TCP port (jupyter_client picks
# ports before the kernel binds them); the loser dies at start-up with this message and is started again
KERNEL_DIED = "Kernel died before replying to kernel_info"
KERNEL_START_TRIES = 3


class NotebookChangedWarning(UserWarning):
    """A resumed sweep keeps finished runs made with another version of the notebook's code."""


# ---------------------------------------------------------------------------------------- grid and names
def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``{name: [values]}`` as a list of dicts (first key varies slowest)."""
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must be a dict of name -> list of values; got {type(grid).__name__}")
    for name, values in grid.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"grid keys must be parameter names (non-empty str); got {name!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"grid[{name!r}] must be a list of values; got {type(values).__name__} {values!r}")
        if len(values) == 0:
            raise ValueError(f"grid[{name!r}] is empty; give at least one value")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"grid[{name!r}] repeats a value: {list(values)}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _points(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Grid dict -> cartesian points; list of dicts -> those points, duplicates dropped (order kept)."""
    if isinstance(grid, Mapping):
        return expand_grid(grid)
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise TypeError("grid must be a dict name -> list of values, or a non-empty list of parameter dicts")
    points, seen = [], set()
    for p in grid:
        if not isinstance(p, Mapping):
            raise TypeError(f"grid points must be dicts of parameters; got {type(p).__name__} {p!r}")
        key = json.dumps(dict(p), sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(dict(p))
    return points


def params_hash(params: Mapping[str, Any]) -> str:
    """Stable 10-hex-digit hash of the parameters (sorted JSON)."""
    text = json.dumps(dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_name(params: Mapping[str, Any], varying: Sequence[str] | None = None, max_len: int = 60) -> str:
    """Folder name: a readable slug of the ``varying`` parameters plus the hash of all of them."""
    keys = list(varying) if varying is not None else sorted(params)
    slug = "_".join(f"{k}-{params[k]}" for k in keys if k in params)
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", slug).strip("-_.")[:max_len]
    return f"{slug}-{params_hash(params)}" if slug else params_hash(params)


# ---------------------------------------------------------------------------------------- notebook parameters
def notebook_hash(notebook: str | os.PathLike) -> str:
    """sha256 (hex) of the notebook's code-cell sources, in order (as a JSON list).

    Markdown and raw cells, outputs, execution counts and metadata do not count, so editing prose or
    stripping outputs keeps the hash; any edit to code, parameter defaults included, changes it.
    """
    import nbformat

    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"notebook {str(path)!r} not found")
    nb = nbformat.read(path, as_version=4)
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def declared_parameters(notebook: str | os.PathLike) -> dict[str, str]:
    """``{name: type name}`` of the notebook's ``parameters`` cell (papermill's inspection)."""
    import papermill as pm

    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"notebook {str(path)!r} not found")
    return {n: info.get("inferred_type_name", "None") for n, info in pm.inspect_notebook(str(path)).items()}


def parse_value(text: str, type_name: str, name: str = "value") -> Any:
    """Convert a command-line string to the notebook's declared type (int, float, bool, str)."""
    if type_name == "bool":
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}: {text!r} is not a bool (use True or False)")
    if type_name in ("int", "float"):
        try:
            return SUPPORTED_TYPES[type_name](text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a{'n' if type_name == 'int' else ''} {type_name}") from None
    return text


def check_parameters(declared: Mapping[str, str], params: Mapping[str, Any], where: str = "parameter"
                     ) -> dict[str, Any]:
    """Names must be declared (not ``output_dir``, which the sweep sets) and values must match their types.
    Returns the values as the notebook receives them (an int given for a float parameter becomes a float, so
    ``lr=1`` from Python and ``--grid lr=1`` from the command line name the same run)."""
    valid = sorted(n for n in declared if n not in RESERVED)
    out = dict(params)
    for name, value in params.items():
        if name in RESERVED:
            raise ValueError(f"{where} {name!r} is set by the sweep (each run writes to its own folder)")
        if name not in declared:
            raise ValueError(f"unknown {where} {name!r}; the notebook declares: {', '.join(valid)}")
        kind = declared[name]
        if kind in SUPPORTED_TYPES:
            out[name] = check_value(name, value, SUPPORTED_TYPES[kind])
    return out


# ---------------------------------------------------------------------------------------- run folders
def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"status": "done" | "failed" | "pending", ...}``; done requires a readable results.json too."""
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "pending"}
    if status.get("status") == "done":
        try:
            read_records(run_dir)
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            return {"status": "pending", "note": "status done but results.json missing or unreadable"}
    return status


def is_finished(run_dir: str | os.PathLike) -> bool:
    return run_status(run_dir)["status"] == "done"


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_run(notebook: str, run_dir: str, params: dict[str, Any], cwd: str, kernel_name: str,
                timeout_s: float | None, env: dict[str, str]) -> dict[str, Any]:
    """Execute one run in a fresh folder; write the status file (with the notebook's code hash) last.

    Never raises for notebook errors. The hash is taken as the run starts, so it names the code that ran.
    """
    run = Path(run_dir)
    # A lock beside the folder (the wipe below must not remove it), held while this run executes: a worker of a
    # killed sweep may still be running it, and wiping the folder under it would mix the two runs' files.
    run.parent.mkdir(parents=True, exist_ok=True)
    lock = run.with_name(run.name + RUN_LOCK_SUFFIX)
    fd = lock_file(lock, wait=False)
    if fd is None:
        return {"status": "failed", "seconds": None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), HASH_KEY: None,
                "error": f"process {lock_holder(lock) or '?'} (a worker of an earlier, interrupted sweep?) is still "
                         "running this run; its folder was left alone. Rerun the sweep when that process has ended "
                         "(or stop it)"}
    try:
        return _execute_locked(notebook, run, params, cwd, kernel_name, timeout_s, env)
    finally:
        os.close(fd)


def _execute_locked(notebook: str, run: Path, params: dict[str, Any], cwd: str, kernel_name: str,
                    timeout_s: float | None, env: dict[str, str]) -> dict[str, Any]:
    import papermill as pm

    if run.exists():
        shutil.rmtree(run)  # leftovers of an interrupted or failed attempt
    run.mkdir(parents=True)
    (run / WORKER_FILE).write_text(str(os.getpid()))  # which process ran it, should that process die
    write_json_atomic(run / PARAMS_FILE, params)
    t0 = time.perf_counter()
    error, code_hash = None, None
    try:
        code_hash = notebook_hash(notebook)
        with _environment(env):
            for attempt in range(1, KERNEL_START_TRIES + 1):
                try:
                    pm.execute_notebook(notebook, str(run / EXECUTED_FILE),
                                        parameters={**params, "output_dir": str(run)}, kernel_name=kernel_name,
                                        cwd=cwd, progress_bar=False, log_output=False, execution_timeout=timeout_s)
                    break
                except RuntimeError as err:  # the kernel never started: no cell ran, so trying again is safe
                    if KERNEL_DIED not in str(err) or attempt == KERNEL_START_TRIES:
                        raise
                    time.sleep(0.5 * attempt)
        if not (run / RESULTS_FILE).is_file():
            error = f"the notebook recorded no results ({RESULTS_FILE} missing; use fdistill_lab.records.record)"
    except Exception as err:  # noqa: BLE001 - a failing run is reported, never fatal to the sweep
        ename = getattr(err, "ename", type(err).__name__)
        evalue = getattr(err, "evalue", str(err))
        error = f"{ename}: {evalue}".strip()
        (run / ERROR_FILE).write_text(f"{error}\n\n{traceback.format_exc()}")
    return _write_status(run, error, round(time.perf_counter() - t0, 3), code_hash)


def _write_status(run: Path, error: str | None, seconds: float | None, code_hash: str | None) -> dict[str, Any]:
    """Write a finished run's status file (last, so it marks the run complete), plus error.txt for a failure
    unless a fuller one (with the traceback) is there already."""
    status = {"status": "failed" if error else "done", "seconds": seconds, "error": error or "",
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), HASH_KEY: code_hash}
    if error and not (run / ERROR_FILE).exists():
        (run / ERROR_FILE).write_text(error + "\n")
    write_json_atomic(run / STATUS_FILE, status)
    return status


# ---------------------------------------------------------------------------------------- the sweep
def _pythonpath() -> str:
    """PYTHONPATH whose first entry is the folder holding this fdistill_lab, so kernels import the same copy."""
    root = str(Path(__file__).resolve().parents[2])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


def default_jobs(num_runs: int) -> int:
    """One process per core, at most one per run."""
    return max(1, min(num_runs, os.cpu_count() or 1))


def run_sweep(notebook: str | os.PathLike, grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
              out_dir: str | os.PathLike, *,
              jobs: int | None = None, base_params: Mapping[str, Any] | None = None, smoke: bool | None = None,
              retry_failed: bool = True, timeout_s: float | None = 600, kernel_name: str = "python3",
              cwd: str | os.PathLike | None = None, threads_per_run: int | None = None, progress: bool = True,
              verbose: bool = True, rerun_changed: bool = False):
    """Run ``notebook`` for every point of ``grid`` (merged over ``base_params``); return this grid's table.

    ``grid`` is ``{name: [values]}`` (cartesian product, see ``expand_grid``) or an explicit list of
    parameter dicts (e.g. a one-factor-at-a-time design); duplicate points run once.

    ``jobs`` parallel processes (default: one per core); ``smoke`` sets the notebook's ``smoke``
    parameter; finished runs are skipped, failed ones rerun if ``retry_failed``. Finished runs made with
    another version of the notebook's code (see ``notebook_hash``) are kept with a ``NotebookChangedWarning``,
    or rerun if ``rerun_changed``. Each run's kernel
    gets ``FDISTILL_THREADS`` = ``threads_per_run`` (default cores // jobs), ``TQDM_DISABLE=1`` and
    this fdistill_lab's folder first on ``PYTHONPATH``;
    ``cwd`` defaults to the notebook's folder; ``timeout_s`` limits each cell. Also writes
    ``<out_dir>/sweep.csv`` with every run found under ``out_dir`` (see ``collect``).
    """
    notebook, planned = plan(notebook, grid, out_dir, base_params, smoke)
    jobs = default_jobs(len(planned)) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}")
    if threads_per_run is not None and (isinstance(threads_per_run, bool) or not isinstance(threads_per_run, int)
                                        or threads_per_run < 1):
        raise ValueError(f"threads_per_run must be an integer >= 1 (or None: cores // jobs); got {threads_per_run!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds per cell (or None: no limit); got {timeout_s!r}")
    threads = threads_per_run or max(1, (os.cpu_count() or 1) // jobs)
    env = {"FDISTILL_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONPATH": _pythonpath()}
    out = Path(out_dir)
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    run_cwd = str(Path(cwd) if cwd is not None else notebook.parent)

    with _lock(out):
        return _execute_planned(notebook, planned, out, jobs, env, run_cwd, kernel_name, timeout_s, retry_failed,
                                progress, verbose, rerun_changed)


LOCK_FILE = ".sweep.lock"  # flock'ed by the running sweep (released when its process ends, however it ends)


def _refuse(out: Path, pid: str | None) -> RuntimeError:
    who = f" (process {pid})" if pid is not None else ""
    return RuntimeError(f"another sweep{who} is running in {out}; wait for it or stop it first")


def _try_lock(out: Path) -> int | None:
    """flock ``out``'s lock file without waiting (:func:`~fdistill_lab.records.lock_file`, which writes this pid
    into it); the descriptor (close it to let go), or None if another sweep holds it, in this process or another."""
    try:
        fd = lock_file(out / LOCK_FILE, wait=False)
    except ImportError:
        raise RuntimeError(f"sweeps need fcntl.flock to lock their folder (Linux, macOS); {sys.platform} "
                           "lacks it") from None
    return fd


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep per folder at a time: two would wipe each other's unfinished runs. The lock is a flock, so a
    crashed or killed sweep never leaves a stale one (its pid in the file only names the holder in the error)."""
    fd = _try_lock(out)
    if fd is None:
        raise _refuse(out, lock_holder(out / LOCK_FILE))
    try:
        yield
    finally:
        os.close(fd)


def _execute_planned(notebook: Path, planned: list[tuple[dict[str, Any], Path]], out: Path, jobs: int,
                     env: dict[str, str], run_cwd: str, kernel_name: str, timeout_s: float | None,
                     retry_failed: bool, progress: bool, verbose: bool, rerun_changed: bool = False):
    from tqdm.auto import tqdm

    current = notebook_hash(notebook)
    todo, rows, skipped, changed = [], {}, 0, []
    for params, run_dir in planned:
        status = run_status(run_dir)
        if status["status"] == "done" and status.get(HASH_KEY) != current:
            changed.append(run_dir)
            if rerun_changed:
                todo.append((params, run_dir))
                continue
        if status["status"] == "done" or (status["status"] == "failed" and not retry_failed):
            skipped += 1
            rows[str(run_dir)] = (params, status)
        else:
            todo.append((params, run_dir))
    if verbose:
        note = f"; {len(changed)} made with another notebook version, {'rerun' if rerun_changed else 'kept'}"
        print(f"sweep {notebook.name}: {len(planned)} runs, {skipped} already finished or kept, "
              f"{len(todo)} to run with {min(jobs, max(1, len(todo)))} process(es) -> {out}{note if changed else ''}")
    if changed and not rerun_changed:
        warnings.warn(f"{len(changed)} finished run(s) of this sweep in {out} were made with another version of "
                      f"{notebook.name} (their code-cell hash is not the current {current[:SHORT_HASH]}, or they "
                      f"predate recorded hashes); their results are kept next to new ones. To rerun them, pass "
                      f"rerun_changed=True (command line: --rerun-changed); the {HASH_COLUMN} column of the table "
                      f"shows which version made each run", NotebookChangedWarning, stacklevel=3)
    args = [(str(notebook), str(d), p, run_cwd, kernel_name, timeout_s, env) for p, d in todo]
    bar = tqdm(total=len(todo), desc="sweep runs", **({} if progress else {"disable": True}))
    try:
        if jobs == 1 or len(todo) <= 1:
            for a in args:
                rows[a[1]] = (a[2], execute_run(*a))
                bar.update()
        else:
            while args:  # a fresh pool for the runs a dead worker process took down with it
                broken, workers = _pool_round(args, jobs, rows, bar)
                args = _after_break(broken, workers, rows, bar, verbose)
    finally:
        bar.close()
    failed = [(d, s["error"]) for d, (_, s) in rows.items() if s["status"] == "failed"]
    if verbose and failed:
        print(f"{len(failed)} run(s) failed (kept with their error; rerun the sweep to retry):")
        for d, e in failed:
            print(f"  {Path(d).name}: {e.splitlines()[0] if e else '?'}")
    collect(out)
    table = _table([(d, *rows[str(d)]) for _, d in planned])
    table.attrs.update(skipped=skipped, ran=len(todo), failed=len(failed))
    return table


def _pool_round(args: list[tuple], jobs: int, rows: dict, bar) -> tuple[list[tuple], dict[int, Any]]:
    """Run ``args`` in one process pool, filling ``rows``; return the runs lost when a worker process died
    (the pool is then broken) and the pool's processes by pid."""
    for a in args:
        (Path(a[1]) / WORKER_FILE).unlink(missing_ok=True)  # present afterwards = started in this pool
    before = set(active_children())
    workers: dict[int, Any] = {}
    broken: list[tuple] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(args)), mp_context=get_context("spawn")) as pool:
        try:
            pending: dict[Future, tuple] = {}
            for i, a in enumerate(args):
                try:
                    pending[pool.submit(execute_run, *a)] = a
                except BrokenProcessPool:
                    broken.extend(args[i:])
                    break
            while pending:
                workers.update((p.pid, p) for p in active_children() if p not in before)
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    a = pending.pop(fut)
                    try:
                        rows[a[1]] = (a[2], fut.result())
                        bar.update()
                    except BrokenProcessPool:
                        broken.append(a)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return broken, workers


def _after_break(broken: list[tuple], workers: dict[int, Any], rows: dict, bar, verbose: bool) -> list[tuple]:
    """Sort the runs of a broken pool: finished ones go to ``rows``; those whose own worker died are marked
    failed; those interrupted (their worker terminated by the pool: SIGTERM) or not started are returned to
    rerun. If no dead worker can be matched to a run, every started run is marked failed (every queued one
    if none started), so each broken pool retires at least one run."""
    if not broken:
        return []
    started, dead = [], {}
    for a in broken:
        run = Path(a[1])
        try:
            pid = int((run / WORKER_FILE).read_text())
        except (FileNotFoundError, ValueError):
            continue  # never started in that pool
        status = run_status(run)
        if status["status"] in ("done", "failed"):  # finished just before the pool broke
            rows[a[1]] = (a[2], status)
            bar.update()
            continue
        started.append(a)
        proc = workers.get(pid)
        if proc is None or proc.exitcode != -signal.SIGTERM:
            dead[a[1]] = proc.exitcode if proc is not None else None
    if not dead:
        dead = dict.fromkeys(a[1] for a in (started or [a for a in broken if a[1] not in rows]))
    for a in broken:
        if a[1] in dead:
            rows[a[1]] = (a[2], _mark_died(Path(a[1]), a[2], dead[a[1]]))
            bar.update()
    rerun = [a for a in broken if a[1] not in rows]
    if verbose:
        print(f"a worker process died: {len(dead)} run(s) marked failed, {len(rerun)} to rerun in a fresh pool")
    return rerun


def _mark_died(run: Path, params: dict[str, Any], exitcode: int | None) -> dict[str, Any]:
    """Write the failed status (and error.txt) of a run whose worker process died with ``exitcode``."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}, out of memory?"
        except ValueError:  # a signal number without a name
            how = f"killed by signal {-exitcode}, out of memory?"
    elif exitcode is not None:
        how = f"exit code {exitcode}"
    else:
        how = "killed, out of memory?"
    marker = run / WORKER_FILE
    seconds = round(time.time() - marker.stat().st_mtime, 3) if marker.exists() else None
    run.mkdir(parents=True, exist_ok=True)
    if not (run / PARAMS_FILE).exists():
        write_json_atomic(run / PARAMS_FILE, params)
    (run / ERROR_FILE).unlink(missing_ok=True)  # the death is the error to report
    return _write_status(run, f"worker process died ({how}); rerun the sweep to retry", seconds, None)


def plan(notebook: str | os.PathLike, grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
         out_dir: str | os.PathLike, base_params: Mapping[str, Any] | None = None,
         smoke: bool | None = None) -> tuple[Path, list[tuple[dict[str, Any], Path]]]:
    """Validate a sweep and return (notebook path, [(parameters, run folder)]) without running anything."""
    notebook = Path(notebook).resolve()
    declared = declared_parameters(notebook)
    if "output_dir" not in declared:
        raise ValueError(f"{notebook.name} must declare an output_dir parameter (each run writes to its own folder)")
    base = dict(base_params or {})
    if smoke is not None:
        if not isinstance(smoke, bool):
            raise ValueError(f"smoke must be True, False or None; got {type(smoke).__name__} {smoke!r}")
        if "smoke" not in declared:
            raise ValueError(f"smoke={smoke} given but {notebook.name} declares no smoke parameter")
        base["smoke"] = smoke
    base = check_parameters(declared, base, "base parameter")
    points = _points([check_parameters(declared, p, "grid parameter") for p in _points(grid)])
    keys = list(dict.fromkeys(k for p in points for k in p))
    varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in points}) > 1] or keys
    overlap = sorted(set(base) & set(keys))
    if overlap:
        raise ValueError(f"{overlap} appear both in grid and base_params; give each parameter once")
    runs = Path(out_dir) / RUNS_DIR
    return notebook, [({**base, **p}, _run_dir(runs, {**base, **p}, varying)) for p in points]


def _run_dir(runs: Path, params: dict[str, Any], varying: list[str]) -> Path:
    """The folder of these parameters: an existing one with the same hash (whatever its slug), else a new name."""
    h = params_hash(params)
    existing = sorted(p for p in runs.glob(f"*{h}") if p.is_dir() and (p.name == h or p.name.endswith(f"-{h}")))
    return existing[0] if existing else runs / run_name(params, varying=varying)


class BackgroundSweep:
    """A sweep running in a separate process (``start_sweep``); ``wait()`` returns its table."""

    def __init__(self, process, out_dir: Path, planned: list[tuple[dict[str, Any], Path]]) -> None:
        self.process, self.out_dir, self.planned = process, out_dir, planned
        self.log = out_dir / "sweep.log"

    def done(self) -> bool:
        return not self.process.is_alive()

    def wait(self, timeout: float | None = None):
        """Block until the sweep ends; return the table of its runs (RuntimeError if the sweep itself crashed)."""
        self.process.join(timeout)
        if self.process.is_alive():
            raise TimeoutError(f"sweep still running after {timeout} s (log: {self.log})")
        if self.process.exitcode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"the sweep process exited with code {self.process.exitcode}; log {self.log}:\n{tail}")
        table = _table([(d, p, run_status(d)) for p, d in self.planned])
        table.attrs.update(failed=int((table["status"] == "failed").sum()))
        return table


def _background(log: str, args: tuple, kwargs: dict) -> None:
    with open(log, "w", buffering=1) as fh:
        os.dup2(fh.fileno(), 1)  # also the kernels' output: keep it out of the caller's terminal or notebook
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
        run_sweep(*args, **kwargs)


def start_sweep(notebook: str | os.PathLike, grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                out_dir: str | os.PathLike, **kwargs: Any) -> BackgroundSweep:
    """Like ``run_sweep`` but in a background process, so the caller can keep working; see ``BackgroundSweep``.

    Parameters are validated here, before the process starts. Its printout goes to ``<out_dir>/sweep.log``.
    """
    _, planned = plan(notebook, grid, out_dir, kwargs.get("base_params"), kwargs.get("smoke"))
    out = Path(out_dir)
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    fd = _try_lock(out)  # refuse now, in the caller, if a sweep runs there (the background one locks for itself)
    if fd is None:
        raise _refuse(out, lock_holder(out / LOCK_FILE))
    os.close(fd)
    kwargs = {**kwargs, "progress": False}
    proc = get_context("spawn").Process(target=_background, args=(str(out / "sweep.log"), (notebook, grid, out_dir),
                                                                 kwargs), daemon=False)
    proc.start()
    return BackgroundSweep(proc, out, planned)


# ---------------------------------------------------------------------------------------- the table
def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``a.b`` keys; short lists -> JSON text; long lists are left out (MAX_LIST_LEN)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            if len(value) <= MAX_LIST_LEN:
                out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _table(entries: list[tuple[Path, dict[str, Any], dict[str, Any]]]):
    import pandas as pd

    rows = []
    for run_dir, params, status in entries:
        row: dict[str, Any] = {"run": run_dir.name, **params, "status": status["status"],
                               "seconds": status.get("seconds"), "error": status.get("error", ""),
                               HASH_COLUMN: (status.get(HASH_KEY) or "")[:SHORT_HASH]}
        if status["status"] == "done":
            for k, v in flatten(read_records(run_dir)).items():
                row[f"result.{k}" if k in row else k] = v
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return pd.DataFrame(rows)


def collect(out_dir: str | os.PathLike, write: bool = True):
    """Table of every run folder under ``<out_dir>/runs``: parameters, status, seconds, error, notebook_hash, records.

    Parameters come from each run's params.json; records only from finished runs; ``notebook_hash`` is the
    short code hash of the notebook version that made the run ("" if not recorded). Written to
    ``<out_dir>/sweep.csv`` when ``write``.
    """
    out = Path(out_dir)
    runs = out / RUNS_DIR
    if not runs.is_dir():
        raise FileNotFoundError(f"no sweep at {out} (expected a {RUNS_DIR}/ folder)")
    entries = []
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        try:
            params = json.loads((run_dir / PARAMS_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # a folder being created right now
        entries.append((run_dir, params, run_status(run_dir)))
    table = _table(entries)
    if write:
        write_text_atomic(out / TABLE_FILE, table.to_csv(index=False))
    return table


# ---------------------------------------------------------------------------------------- command line
def _parse_assignments(items: Sequence[str], declared: Mapping[str, str], multi: bool, flag: str) -> dict:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} {item!r}: expected key=value{',value2,...' if multi else ''}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in declared:
            raise SystemExit(f"{flag} {key!r}: unknown parameter; the notebook declares: {', '.join(sorted(declared))}")
        if key in out:
            once = f"give all its values in one {flag} {key}=V1,V2,..." if multi else f"give one {flag} {key}=VALUE"
            raise SystemExit(f"{flag} {key!r} is given more than once; {once}")
        kind = declared[key]
        texts = [t for t in raw.split(",")] if multi else [raw]
        try:
            values = [parse_value(t.strip(), kind, key) for t in texts]
        except ValueError as err:
            raise SystemExit(f"{flag} {item!r}: {err}") from None
        out[key] = values if multi else values[0]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="notebook with a `parameters` cell declaring output_dir")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept parameter and its values (repeat for a cartesian grid)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a fixed parameter for every run (repeatable)")
    parser.add_argument("--out", required=True, help="sweep folder (runs/ and sweep.csv go here)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core)")
    parser.add_argument("--smoke", action="store_true", help="run the notebook with smoke=True")
    parser.add_argument("--keep-failed", action="store_true", help="do not rerun failed runs on resume")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun finished runs made with another version of the notebook's code cells")
    parser.add_argument("--timeout", type=float, default=600, help="per-cell time limit in seconds")
    args = parser.parse_args(argv)
    if not args.grid:
        parser.error("give at least one --grid KEY=V1,V2")
    declared = declared_parameters(args.notebook)
    grid = _parse_assignments(args.grid, declared, True, "--grid")
    base = _parse_assignments(args.param, declared, False, "--param")
    try:
        table = run_sweep(args.notebook, grid, args.out, jobs=args.jobs, base_params=base,
                          smoke=True if args.smoke else None, retry_failed=not args.keep_failed,
                          timeout_s=args.timeout, rerun_changed=args.rerun_changed)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"table: {Path(args.out) / TABLE_FILE} ({len(table)} runs of this grid; "
          f"{table.attrs['failed']} failed)")
    return 1 if table.attrs["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
