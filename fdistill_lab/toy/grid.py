"""Grids of toy runs, in parallel and resumable (notebook 03's sensitivity study).

    python -m fdistill_lab.sweep --grid divergence=js,fkl --grid lr_student=0.001,0.005 --set steps=1000 \\
        --out outputs/my_grid --jobs 2

A grid is a list of points, each a dict of :class:`~fdistill_lab.toy.trainer.ToyConfig` settings laid over a base
config. :func:`run_grid` trains every point that has no finished result yet in a pool of ``jobs`` processes (one
torch thread each) and writes ``<out>/runs/<name>.json`` when a run ends (atomically: a file there is a whole
result; the name comes from the run's whole configuration, so grids that share a run share its file). A run that
raises, or whose process dies, is written with ``status`` "failed" and its error and does not stop the others;
running the grid again retries exactly the failed and missing runs. :func:`table` reads the results into a
DataFrame (one row per run, its settings as columns plus ``metrics.*``, ``cost.*`` and ``fluctuation.*``);
:func:`load_run` reads one run's whole result, its curves included.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .trainer import ToyConfig

RUNS_DIR = "runs"
METRIC_KEYS = ("modes_covered", "precision", "recall", "mass_tv", "fkl", "rkl")
SETTINGS = {f.name: f for f in dataclasses.fields(ToyConfig)}


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``{setting: [values]}`` (the first setting varies slowest)."""
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values; got {values!r}")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def run_name(params: Mapping[str, Any]) -> str:
    """File name of a run, fixed by its configuration alone: a readable slug of the settings that differ from
    ToyConfig's defaults plus a hash of the whole configuration (so ``steps=1300`` written out or left at its
    default name the same run, whatever grid it belongs to)."""
    config = json.loads(json.dumps(ToyConfig(**params).to_dict()))  # defaults filled in, tuples as lists
    defaults = json.loads(json.dumps(ToyConfig().to_dict()))
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    changed = "_".join(f"{k}-{v}" for k, v in config.items() if v != defaults[k])
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", changed).strip("-_.")[:60]
    return f"{slug}-{digest}" if slug else digest


def run_point(params: dict[str, Any], eval_samples: int) -> dict[str, Any]:
    """Train one run with ``ToyConfig(**params)`` and evaluate it: the grid's unit of work (and a worker's)."""
    from . import analysis, default_teacher

    res = analysis.train_and_evaluate(default_teacher(), ToyConfig(**params), eval_samples=eval_samples,
                                      progress=False)
    run = res["run"]
    steps, tv = run.curve("mass_tv")
    gen_steps, loss = run.curve("loss_f")
    return {"metrics": {k: res["metrics"][k] for k in METRIC_KEYS},
            "cost": {"seconds": res["seconds"], "sec_per_iter": res["sec_per_iter"],
                     "peak_rss_mb": analysis.peak_rss_mb()},
            "fluctuation": res["fluctuation"],
            "curve": {"step": steps, "mass_tv": tv, "modes_covered": run.curve("modes_covered")[1],
                      "precision": run.curve("precision")[1]},
            "generator_curve": {"step": gen_steps, "loss_f": loss,
                                "grad_norm_student": run.curve("grad_norm_student")[1]}}


def _worker(params: dict[str, Any], eval_samples: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        return {"status": "done", **run_point(params, eval_samples), "seconds": time.perf_counter() - t0}
    except Exception as exc:  # the grid records it and goes on
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}


def _started(path: Path) -> Path:
    return path.with_suffix(".started")


def _run_one(worker: Callable[[dict[str, Any], int], dict[str, Any]], path: Path, params: dict[str, Any],
             eval_samples: int) -> dict[str, Any]:
    """What a pool process runs: mark the run as started (to tell, if a process dies, which runs were in flight),
    then the worker."""
    _started(path).write_text(str(os.getpid()))
    return worker(params, eval_samples)


def spawn_pool(jobs: int) -> ProcessPoolExecutor:
    """A pool of ``jobs`` spawned processes with one torch thread each (spawn: safe in a Jupyter kernel and beside
    torch's threads)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now: terminate its processes (runs in flight included) and drop the queued work."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the toy's MLPs are fastest on one thread; the pool gives the cores to the runs


def plan(points: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each point over ``base``, validated (a bad setting raises ValueError naming it and the valid ones),
    duplicates dropped."""
    out, seen = [], set()
    for point in points:
        params = {**(base or {}), **point}
        unknown = sorted(set(params) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown toy setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
        ToyConfig(**params)  # validates the values
        key = json.dumps(params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(params)
    return out


def run_grid(points: Sequence[Mapping[str, Any]], out: str | Path, base: Mapping[str, Any] | None = None,
             jobs: int = 1, eval_samples: int = 4000, progress: bool = True,
             worker: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
             stop: threading.Event | None = None):
    """Train every point of the grid that has no finished result in ``out``; returns the :func:`table` of the grid's
    runs (its ``attrs["failed"]`` counts the failed ones). ``worker(params, eval_samples)``: what a pool process does
    with a point (a module-level function; default: train and evaluate it, catching its errors). ``stop``: an event
    that ends the grid (its runs in flight are stopped, what finished stays)."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    planned = {Path(out) / RUNS_DIR / f"{run_name(params)}.json": params for params in plan(points, base)}
    (Path(out) / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    todo = {path: params for path, params in planned.items() if _status(path) != "done"}
    if todo:
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc=f"grid ({len(planned) - len(todo)} of {len(planned)} done before)",
                  disable=not progress) as bar:
            _execute(todo, jobs, eval_samples, worker or _worker, bar, stop or threading.Event())
    return table(out, planned)


def _status(path: Path) -> str | None:
    return json.loads(path.read_text()).get("status") if path.is_file() else None


def _execute(todo: dict[Path, dict[str, Any]], jobs: int, eval_samples: int, worker: Callable, bar: Any,
             stop: threading.Event) -> None:
    """Run ``todo`` in pools of ``jobs`` processes. When a process dies (out of memory, killed), the pool breaks and
    every run in it with it: the runs not yet started go on in a fresh pool, and those that were in flight rerun one
    at a time, so that only the run whose process dies is written as failed."""
    pending = dict(todo)
    while pending and not stop.is_set():
        broken = _pool_round(pending, min(jobs, len(pending)), eval_samples, worker, bar, stop)
        in_flight = [path for path in broken if _started(path).exists()]
        pending = {path: todo[path] for path in broken if path not in in_flight}
        for path in in_flight:
            if not stop.is_set() and _pool_round({path: todo[path]}, 1, eval_samples, worker, bar, stop):
                _finish(path, todo[path], {"status": "failed", "error": "the run's process died (out of memory or "
                                           "killed); it died again when it ran alone"}, bar)


def _pool_round(todo: dict[Path, dict[str, Any]], jobs: int, eval_samples: int, worker: Callable, bar: Any,
               stop: threading.Event) -> list[Path]:
    """One process pool over ``todo``; writes every result that comes back, returns the runs a broken pool lost
    (none when ``stop`` ends the round: those runs stay to do)."""
    for path in todo:
        _started(path).unlink(missing_ok=True)
    pool = spawn_pool(jobs)
    broken = []
    try:
        futures = {pool.submit(_run_one, worker, path, params, eval_samples): path for path, params in todo.items()}
        remaining = set(futures)
        while remaining and not stop.is_set():
            done, remaining = wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                path = futures[future]
                try:
                    _finish(path, todo[path], future.result(), bar)
                except BrokenProcessPool:
                    broken.append(path)
    finally:  # stopped or interrupted: end the runs now instead of waiting for them to finish
        if stop.is_set() or sys.exc_info()[0] is not None:
            stop_pool(pool)
            for path in todo:
                _started(path).unlink(missing_ok=True)
            broken = []
        else:
            pool.shutdown()
    return broken


def _finish(path: Path, params: dict[str, Any], result: dict[str, Any], bar: Any) -> None:
    write_json_atomic(path, {"params": params, **result}, durable=False)
    _started(path).unlink(missing_ok=True)
    bar.update(1)


def table(out: str | Path, runs: Mapping[Path, Any] | None = None):
    """One row per result in ``out`` (or per run of ``runs``, result files to settings, that has one): ``run``,
    ``status``, ``error``, the settings, ``metrics.*``, ``cost.*`` and ``fluctuation.<quantity>.<measure>``."""
    import pandas as pd

    paths = sorted(runs) if runs is not None else sorted((Path(out) / RUNS_DIR).glob("*.json"))
    rows = []
    for path in paths:
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        row = {"run": path.stem, "status": res["status"], "error": res.get("error", ""), **res["params"]}
        for group in ("metrics", "cost"):
            row.update({f"{group}.{k}": v for k, v in res.get(group, {}).items()})
        for quantity, measures in res.get("fluctuation", {}).items():
            row.update({f"fluctuation.{quantity}.{k}": v for k, v in measures.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["failed"] = int((frame["status"] != "done").sum()) if rows else 0
    return frame


def load_run(out: str | Path, params: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole result file of the grid run with settings ``base`` + ``params`` in ``out`` (its curves included);
    FileNotFoundError naming the run when the grid has none."""
    path = Path(out) / RUNS_DIR / f"{run_name(plan([params], base)[0])}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no result for this run in {Path(out) / RUNS_DIR}: {path.name} (settings "
                                f"{dict(params)}); run the grid first")
    return json.loads(path.read_text())


class BackgroundGrid:
    """A :func:`run_grid` running in a thread of this process (its runs in their own processes). :meth:`wait`
    returns its table or raises its error; interrupting the wait, or :meth:`cancel`, stops the grid (the finished
    runs stay, the rest runs again next time)."""

    def __init__(self, out: Path, thread: threading.Thread, stop: threading.Event, result: dict[str, Any]) -> None:
        self.out, self._thread, self._stop, self._result = out, thread, stop, result

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def wait(self):
        try:
            while self._thread.is_alive():
                self._thread.join(0.2)
        except BaseException:
            self.cancel()
            raise
        if "error" in self._result:
            raise self._result["error"]
        return self._result["table"]


_RUNNING: dict[Path, BackgroundGrid] = {}


def start_grid(points: Sequence[Mapping[str, Any]], out: str | Path, **kwargs: Any) -> BackgroundGrid:
    """:func:`run_grid` in the background (no progress bar), so a notebook can go on meanwhile. One at a time per
    folder: a second start on a folder whose grid still runs is refused."""
    folder = Path(out).resolve()
    if folder in _RUNNING and not _RUNNING[folder].done():
        raise RuntimeError(f"a grid is already running into {folder}: wait() for it or cancel() it first")
    stop, result = threading.Event(), {}

    def target() -> None:
        try:
            result["table"] = run_grid(points, out, **{"progress": False, **kwargs, "stop": stop})
        except BaseException as exc:  # handed to wait()
            result["error"] = exc

    thread = threading.Thread(target=target, name="toy-grid", daemon=True)
    grid = _RUNNING[folder] = BackgroundGrid(folder, thread, stop, result)
    thread.start()
    return grid


def parse_value(name: str, text: str) -> Any:
    """A command-line value for the toy setting ``name``, converted to its type (ValueError naming both)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown toy setting {name!r}; valid: {', '.join(SETTINGS)}")
    kind = str(SETTINGS[name].type)
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind == "int":
            return int(text)
        if kind.startswith("float"):
            return None if text.lower() == "none" else float(text)
        if kind.startswith("tuple"):
            return tuple(float(v) for v in text.split(":"))
        return text
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a {kind} value") from None


def _assignments(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} takes KEY=VALUE; got {item!r}")
        out[name.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings: " + ", ".join(SETTINGS))
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a setting and its values (repeatable; the grid is their product)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of every run")
    parser.add_argument("--out", required=True, help="folder of the results (rerun to resume)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--eval-samples", type=int, default=4000, help="samples per final evaluation")
    args = parser.parse_args(argv)
    try:
        grid = {k: [parse_value(k, v) for v in values.split(",")]
                for k, values in _assignments(args.grid, "--grid").items()}
        base = {k: parse_value(k, v) for k, v in _assignments(args.set, "--set").items()}
        result = run_grid(expand_grid(grid) if grid else [{}], args.out, base, args.jobs, args.eval_samples)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cols = [c for c in result.columns if c in ("run", "status") or c.startswith("metrics.")]
    print(result[cols].to_string(index=False))
    failed = result.attrs["failed"]
    if failed:
        print(f"{failed} run(s) failed (see their error in {Path(args.out) / RUNS_DIR}); rerun to retry them",
              file=sys.stderr)
    return 1 if failed else 0
