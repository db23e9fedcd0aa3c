"""Load released EDM teachers (``edm-imagenet-64x64-cond-adm.pkl``, ``edm-cifar10-32x32-*-vp.pkl``) into
our own :class:`fdistill_lab.networks.EDMPrecond`, safely and with a fast-reload cache.

The pickle is read by :mod:`fdistill_lab.train.edm_pickle` (allowlisting unpickler, stored source code never
runs); the architecture comes from the recorded ``EDMPrecond`` constructor keywords; weights load with
``strict=True``. A plain ``.pt`` cache ({config, state_dict}) is written to the cache directory and
reloaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_file
from ..networks import EDMPrecond, build_edm
from .edm_pickle import EDMPickleError, PersistentRecord, read_edm_pickle, record_init_kwargs, record_state_dict

__all__ = ["load_edm", "convert_edm_pickle", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = "fdistill_lab.edm_state_dict.v1"


def default_cache_dir() -> Path:
    """``$FDISTILL_CACHE_DIR/edm`` if set, else ``~/.cache/fdistill_lab/edm``."""
    root = os.environ.get("FDISTILL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "fdistill_lab") / "edm"


def _source_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_path(path: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"{path.stem}-{key}.pt"


def convert_edm_pickle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an EDM network pickle safely; return (EDMPrecond constructor keywords, state_dict) of ``'ema'``."""
    path = Path(path)
    data = read_edm_pickle(path)
    if "ema" not in data:
        raise EDMPickleError(f"{path}: no key 'ema' (the network of an EDM snapshot); top-level keys: "
                             f"{sorted(map(str, data))}")
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord) or ema.class_name != "EDMPrecond":
        found = type(ema).__name__ if not isinstance(ema, PersistentRecord) else ema.class_name
        raise EDMPickleError(f"{path}: key 'ema' must hold an EDMPrecond network, found {found} "
                             f"(top-level keys: {sorted(map(str, data))})")
    config = record_init_kwargs(ema)
    state = record_state_dict(ema)
    return config, {k: v.clone() if not v.is_contiguous() else v for k, v in state.items()}


def _build_and_load(config: dict[str, Any], state: dict[str, torch.Tensor], dropout: float | None,
                    source: Path) -> EDMPrecond:
    cfg = dict(config)
    model_type = cfg.pop("model_type", "DhariwalUNet")
    if dropout is not None:
        cfg["dropout"] = dropout
    try:
        with torch.device("meta"):  # no random init of ~300M parameters; the weights are assigned below
            net = build_edm(model_type, **cfg)
    except (TypeError, ValueError) as exc:
        raise EDMPickleError(f"{source}: unsupported EDM configuration {config}: {exc}") from exc
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise EDMPickleError(f"{source}: weights do not match the recorded architecture: {exc}") from exc
    return net


def load_edm(
    path: str | Path,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    use_cache: bool = True,
    dropout: float | None = 0.0,
) -> EDMPrecond:
    """Load an EDM network pickle (or a cache ``.pt`` written by this function) as an :class:`EDMPrecond`.

    Returns the network in eval mode with ``requires_grad`` False, on ``device``; ``forward(x, sigma,
    class_labels)`` gives the denoised x0. ``dropout`` overrides the pickled dropout (EDM's 0.1/0.13;
    distillers use 0); pass None to keep it. The pickled ``use_fp16`` flag is recorded but precision is
    the caller's choice. Unsafe or malformed files raise ``EDMPickleError`` (``UnsafePickleError`` when
    the file references code); nothing in the file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"EDM teacher not found: {path}. Download it with `python -m fdistill_lab.download imagenet64 --root "
            "downloads/edm` (or `cifar10`; see docs/edm_data_and_fid.md).")
    config = state = None
    if path.suffix == ".pt":
        config, state = _read_cache(path, fingerprint=None)
        if config is None:
            raise EDMPickleError(f"{path}: not an fdistill_lab EDM cache file (format {CACHE_FORMAT})")
    cache = None
    if config is None and use_cache:
        cache = _cache_path(path, Path(cache_dir) if cache_dir is not None else default_cache_dir())
        if cache.is_file():
            config, state = _read_cache(cache, fingerprint=_source_fingerprint(path))
    if config is None:
        config, state = convert_edm_pickle(path)
        if cache is not None:
            _write_cache(cache, config, state, _source_fingerprint(path))
    net = _build_and_load(config, state, dropout, path)
    net.edm_source = str(path)
    return net.eval().requires_grad_(False).to(device)


def _read_cache(cache: Path, fingerprint: dict[str, Any] | None) -> tuple[Any, Any]:
    try:
        blob = torch.load(cache, weights_only=True, map_location="cpu")
    except Exception as exc:
        warnings.warn(f"ignoring unreadable EDM cache {cache}: {exc}", stacklevel=3)
        return None, None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        return None, None
    if fingerprint is not None and blob.get("source") != fingerprint:
        return None, None  # stale: the pickle changed since the cache was written
    return blob["config"], blob["state_dict"]


def _write_cache(cache: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                 fingerprint: dict[str, Any]) -> None:
    try:  # a cache: atomic (never half-written) but not fsynced (rebuilt from the pickle if lost)
        with atomic_file(cache, durable=False) as fh:
            torch.save({"format": CACHE_FORMAT, "source": fingerprint, "config": config, "state_dict": state}, fh)
    except OSError as exc:
        warnings.warn(f"could not write EDM cache {cache}: {exc}", stacklevel=3)
