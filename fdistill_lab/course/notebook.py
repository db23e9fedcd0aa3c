"""Notebook setup: validate papermill parameters, seed, fix threads, set plot style.

Every notebook has one cell tagged ``parameters`` holding annotated literals only
(``steps: int = 3000  # help``) and calls ``cfg = setup_notebook(globals())`` in the next cell.
papermill injects overrides as plain assignments in a cell starting with ``# Parameters`` and only
*warns* about unknown names; ``setup_notebook`` turns that into an error.

Validation happens before anything is written: ``cfg.output_dir`` is created only after every
parameter has been checked. Relative paths start in ``notebooks/`` however a notebook is launched: Jupyter runs
it there, and a papermill run started from the repository root moves there first (:func:`use_notebooks_folder`).
"""

from __future__ import annotations

import ast
import os
import platform
import random
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REQUIRED = ("smoke", "seed", "output_dir")
SUPPORTED_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
INJECTED_MARKER = "# Parameters"
SMOKE_ENV = "FDISTILL_SMOKE"
THREADS_ENV = "FDISTILL_THREADS"


@dataclass
class NotebookConfig:
    """Validated notebook parameters. ``pick(full=, smoke=)`` chooses a size by mode."""

    smoke: bool
    seed: int
    output_dir: Path
    params: dict[str, Any] = field(default_factory=dict)
    threads: int = 1

    def pick(self, *, full: T, smoke: T) -> T:
        """Return ``smoke`` in smoke mode, else ``full`` (smoke shrinks sizes, never skips cells)."""
        return smoke if self.smoke else full


def _annotation_type(name: str, annotation: Any) -> type:
    key = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    if key not in SUPPORTED_TYPES:
        raise TypeError(
            f"parameter {name!r} is annotated {key!r}; parameters must be one of "
            f"{', '.join(SUPPORTED_TYPES)} literals")
    return SUPPORTED_TYPES[key]


def injected_names(history: list[str] | None) -> list[str]:
    """Names assigned in the latest papermill-injected cell (``# Parameters`` header) of the history."""
    for source in reversed(history or []):
        if source.lstrip().startswith(INJECTED_MARKER):
            try:
                tree = ast.parse(source)
            except SyntaxError as err:  # pragma: no cover - papermill writes valid Python
                raise ValueError(f"cannot parse the injected parameters cell: {err}") from None
            names: list[str] = []
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
                names += [t.id for t in targets if isinstance(t, ast.Name)]
            return names
    return []


def check_value(name: str, value: Any, expected: type) -> Any:
    """Return ``value`` if it matches ``expected`` (int is accepted, and converted, for float)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is not bool and isinstance(value, bool) or not isinstance(value, expected):
        hint = ""
        if expected is bool and isinstance(value, str):
            hint = f" (a string is not a bool: on the command line write -p {name} True or -y '{name}: true')"
        raise TypeError(
            f"parameter {name!r} must be {expected.__name__}; got {type(value).__name__} {value!r}{hint}")
    return value


def validate_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Check injected names and value types against the annotated parameters; return the values."""
    annotations = dict(namespace.get("__annotations__", {}))
    if not annotations:
        raise ValueError("no annotated parameters found: run the `parameters` cell before setup_notebook(globals())")
    missing = [n for n in REQUIRED if n not in annotations]
    if missing:
        raise ValueError(f"the parameters cell must declare {', '.join(REQUIRED)}; missing {', '.join(missing)}")
    valid = sorted(annotations)
    unknown = [n for n in injected_names(namespace.get("In")) if n not in annotations]
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid parameter names: {', '.join(valid)}")
    values = {}
    for name, annotation in annotations.items():
        if name not in namespace:
            raise ValueError(f"parameter {name!r} is annotated but has no value in the parameters cell")
        values[name] = check_value(name, namespace[name], _annotation_type(name, annotation))
    return values


def _smoke_from_env() -> bool | None:
    raw = os.environ.get(SMOKE_ENV)
    if raw is None or raw == "":
        return None
    if raw.strip().lower() in ("1", "true", "yes"):
        return True
    if raw.strip().lower() in ("0", "false", "no"):  # no forcing: the notebook's own smoke parameter decides
        return None
    raise ValueError(f"{SMOKE_ENV} must be 1 or 0; got {raw!r}")


def _threads() -> int:
    raw = os.environ.get(THREADS_ENV)
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer; got {raw!r}")
        return int(raw)
    return max(1, min(4, os.cpu_count() or 1))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_plot_style() -> None:
    """Seaborn whitegrid theme with notebook-sized figures; inline backend inside IPython."""
    import matplotlib
    import seaborn as sns

    shell = _ipython()
    if shell is not None and "inline" not in matplotlib.get_backend().lower():
        shell.run_line_magic("matplotlib", "inline")
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 90, "figure.figsize": (7.0, 4.0), "axes.titlesize": "medium"})


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return None
    shell = get_ipython()
    return shell if shell is not None and hasattr(shell, "kernel") else None


def versions() -> dict[str, str]:
    """Versions of Python and the main libraries, for the printout."""
    import matplotlib
    import numpy as np
    import torch

    import fdistill_lab

    return {"python": platform.python_version(), "fdistill_lab": fdistill_lab.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "matplotlib": matplotlib.__version__}


NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"  # in a checkout (editable install)


def use_notebooks_folder() -> Path | None:
    """Change the working folder to ``notebooks/`` when it is this checkout's root (``papermill notebooks/NN.ipynb
    out.ipynb`` from the root), so that relative paths (``../downloads/...`` defaults, output folders) mean the
    same as under Jupyter; returns the new folder, or None if nothing changed."""
    if NOTEBOOKS_DIR.is_dir() and Path.cwd().resolve() == NOTEBOOKS_DIR.parent:
        os.chdir(NOTEBOOKS_DIR)
        return NOTEBOOKS_DIR
    return None


def setup_notebook(namespace: MutableMapping[str, Any], *, validate: Callable[[dict[str, Any]], None] | None = None,
                   quiet: bool = False) -> NotebookConfig:
    """Validate the parameters in ``namespace`` (pass ``globals()``), then seed and configure.

    Raises ValueError for unknown injected names (listing the valid ones) and TypeError for values
    that do not match their annotation. Honours ``FDISTILL_SMOKE=1`` (and writes ``smoke`` back into
    the namespace), seeds torch/numpy/random from ``seed``, sets torch threads (``FDISTILL_THREADS``,
    default min(4, cores)), the plot style, prints versions, and finally creates ``output_dir``.
    ``validate(values)`` runs the notebook's own checks (e.g. a divergence name) before anything is created.
    """
    import torch

    moved = use_notebooks_folder()
    values = validate_parameters(namespace)
    env_smoke = _smoke_from_env()
    if env_smoke is not None:
        values["smoke"] = env_smoke
    if validate is not None:
        validate(dict(values))
    namespace.update(values)
    threads = _threads()
    torch.set_num_threads(threads)
    seed_everything(values["seed"])
    set_plot_style()
    output_dir = Path(values["output_dir"]).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = NotebookConfig(smoke=values["smoke"], seed=values["seed"], output_dir=output_dir,
                         params=values, threads=threads)
    if not quiet:
        info = ", ".join(f"{k} {v}" for k, v in versions().items())
        mode = "SMOKE (sizes shrunk)" if cfg.smoke else "full"
        print(f"{info} | device cpu, {threads} threads | mode {mode} | seed {cfg.seed} | output {output_dir}"
              + (f" | working folder {moved} (relative paths start there)" if moved else ""), file=sys.stdout)
    return cfg
