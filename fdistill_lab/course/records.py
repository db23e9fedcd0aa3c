"""Record a notebook's key numbers in ``<output_dir>/results.json`` (a tiny scrapbook replacement).

``record(output_dir, name, value)`` merges one entry into the file (atomically replaced, so a reader never sees
half a file) and displays it; ``read_records(output_dir)`` returns the dict. Tests and later notebooks read
these numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import write_json_atomic

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


def record(output_dir: str | os.PathLike, name: str, value: Any, *, show: bool = True) -> Any:
    """Merge ``name: value`` into ``<output_dir>/results.json`` (rewritten atomically) and display it; return
    the JSON value. One process writes a notebook's records.

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
    data = read_records(out) if path.is_file() else {}
    data[name] = jsonable
    write_json_atomic(path, data, durable=False)
    if show:
        _display(name, jsonable)
    return jsonable


def is_finite_number(x: Any) -> bool:
    """True for a real, finite number (helper for tests on records)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
