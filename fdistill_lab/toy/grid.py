"""Grids of toy runs, in parallel and resumable (notebook 03's sensitivity study).

    python -m fdistill_lab.sweep --grid divergence=js,fkl --grid lr_student=0.001,0.005 --set steps=1000 \\
        --out outputs/my_grid --jobs 2

A grid is a list of points, each a dict of :class:`~fdistill_lab.toy.trainer.ToyConfig` settings laid over a base
config. :func:`run_grid` trains every point that has no finished result yet in a pool of ``jobs`` processes (one
torch thread each) and writes ``<out>/runs/<name>.json`` when a run ends (atomically: a file there is a whole
result). A run that raises, or whose process dies, is written with ``status`` "failed" and its error and does not
stop the others; running the grid again retries exactly the failed and missing runs. :func:`table` reads the
results into a DataFrame (one row per run, its settings as columns plus ``metrics.*`` and ``cost.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
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


def run_name(params: Mapping[str, Any], varying: Sequence[str]) -> str:
    """File name of a run: a readable slug of the ``varying`` settings plus a hash of all of them."""
    digest = hashlib.sha1(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(f"{k}-{params[k]}" for k in varying if k in params))
    return f"{slug.strip('-_.')[:60]}-{digest}" if slug else digest


def run_point(params: dict[str, Any], eval_samples: int) -> dict[str, Any]:
    """Train one run with ``ToyConfig(**params)`` and evaluate it: the grid's unit of work (and a worker's)."""
    from . import analysis, default_teacher

    res = analysis.train_and_evaluate(default_teacher(), ToyConfig(**params), eval_samples=eval_samples,
                                      progress=False)
    run = res["run"]
    steps, tv = run.curve("mass_tv")
    return {"metrics": {k: res["metrics"][k] for k in METRIC_KEYS},
            "cost": {"seconds": res["seconds"], "sec_per_iter": res["sec_per_iter"],
                     "peak_rss_mb": analysis.peak_rss_mb()},
            "fluctuation": res["fluctuation"],
            "curve": {"step": steps, "mass_tv": tv, "modes_covered": run.curve("modes_covered")[1]}}


def _worker(params: dict[str, Any], eval_samples: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        return {"status": "done", **run_point(params, eval_samples), "seconds": time.perf_counter() - t0}
    except Exception as exc:  # the grid records it and goes on
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}


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
             worker: Callable[[dict[str, Any], int], dict[str, Any]] | None = None):
    """Train every point of the grid that has no finished result in ``out``; returns :func:`table` of all of them
    (its ``attrs["failed"]`` counts the failed runs). ``worker(params, eval_samples)``: what a pool process does with
    a point (a module-level function; default: train and evaluate it, catching its errors)."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    planned = plan(points, base)
    varying = [k for k in planned[0] if len({json.dumps(p.get(k)) for p in planned}) > 1] if planned else []
    runs = Path(out) / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    todo = {}
    for params in planned:
        path = runs / f"{run_name(params, varying)}.json"
        if not (path.is_file() and json.loads(path.read_text()).get("status") == "done"):
            todo[path] = params
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"grid ({len(planned) - len(todo)} of {len(planned)} done before)",
                   disable=not progress)
        context = multiprocessing.get_context("spawn")  # safe in a Jupyter kernel and beside torch's threads
        pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context, initializer=_one_thread)
        try:
            futures = {pool.submit(worker or _worker, params, eval_samples): path for path, params in todo.items()}
            for future in as_completed(futures):
                path = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # the worker process died (out of memory, killed)
                    result = {"status": "failed", "error": f"the run's process died: {type(exc).__name__}: {exc}"}
                write_json_atomic(path, {"params": todo[path], **result}, durable=False)
                bar.update(1)
        except BaseException:  # interrupted: stop the runs now instead of waiting for them to finish
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
        pool.shutdown()
    return table(out)


def table(out: str | Path):
    """One row per result in ``out``: ``run``, ``status``, ``error``, the settings, ``metrics.*`` and ``cost.*``."""
    import pandas as pd

    rows = []
    for path in sorted((Path(out) / RUNS_DIR).glob("*.json")):
        res = json.loads(path.read_text())
        row = {"run": path.stem, "status": res["status"], "error": res.get("error", ""), **res["params"]}
        for group in ("metrics", "cost"):
            row.update({f"{group}.{k}": v for k, v in res.get(group, {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["failed"] = int((frame["status"] != "done").sum()) if rows else 0
    return frame


class BackgroundGrid:
    """A :func:`run_grid` running in a thread of this process (its runs in their own processes); :meth:`wait`
    returns its table, or raises its error."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self):
        return self._future.result()


def start_grid(*args: Any, **kwargs: Any) -> BackgroundGrid:
    """:func:`run_grid` in the background (no progress bar), so a notebook can go on meanwhile."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="toy-grid")
    future = executor.submit(run_grid, *args, **{"progress": False, **kwargs})
    executor.shutdown(wait=False)
    return BackgroundGrid(future)


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
