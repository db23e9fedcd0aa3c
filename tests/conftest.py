"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _shared_reference_dir() -> Path | None:
    """The read-only reference folder: $FDISTILL_SHARED_REFERENCE, else ``../shared/reference`` beside
    the repository root (CI clones the repo next to a copy of ``shared/``)."""
    env = os.environ.get("FDISTILL_SHARED_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "reference")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """Path of ``shared/reference``; skips (with the locations tried) only if it is truly absent."""
    path = _shared_reference_dir()
    if path is None:
        pytest.skip(
            "shared reference folder not found: set FDISTILL_SHARED_REFERENCE or place shared/reference "
            f"beside the repository root ({Path(__file__).resolve().parents[2] / 'shared' / 'reference'})"
        )
    return path


@pytest.fixture(scope="session")
def edm_fixtures(shared_reference: Path) -> Path:
    """Path of ``shared/reference/edm`` (EDM golden fixtures and state_dict name lists)."""
    path = shared_reference / "edm"
    if not (path / "adm_tiny.pt").is_file():
        pytest.skip(f"EDM fixtures missing: expected {path / 'adm_tiny.pt'}")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: tiny networks run fastest so and do not fight other jobs for cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def load_script():
    """Import a script of the repository (e.g. ``"scripts/gpu_check.py"``) as a module, to call its main()."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]

    def load(relpath: str):
        path = root / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


# Quiet progress bars in tests and in the notebook kernels they start (kernels inherit the environment).
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is unavailable, and ``slow`` tests unless selected with -m."""
    import torch

    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow (classroom-size) test: run with -m slow"))
