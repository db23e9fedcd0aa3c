"""Load released EDM teachers (``edm-imagenet-64x64-cond-adm.pkl``, ``edm-cifar10-32x32-*-vp.pkl``) into
our own :class:`fdistill_lab.networks.EDMPrecond`, safely and with a fast-reload cache.

The pickle is read by :mod:`fdistill_lab.train.edm_pickle` (allowlisting unpickler, stored source code never
runs); the architecture comes from the recorded ``EDMPrecond`` constructor keywords; weights load with
``strict=True``. A plain ``.pt`` cache ({config, state_dict, source}) is written to the cache directory and
reloaded with ``torch.load(weights_only=True)`` (torch >= 2.10 is required for both: older versions have
published ``weights_only`` bypasses).

The cache is validated by content: it stores the sha256 of the pickle it was converted from, and is served only
for a source with that sha256. Hashing a 1.2 GB pickle on every load would cost a second or more, so the cache
also stores the source's (device, inode, size, mtime_ns, ctime_ns) as seen when the hash was taken; when they
are all unchanged the stored hash is trusted, otherwise the source is hashed again (and a match refreshes the
stored key). Size and mtime alone do not rule out a change: another snapshot of the same network has the
same size, and ``cp -p``, ``rsync -t`` or unpacking an archive restore the old mtime. The ctime (inode change
time) cannot be set that way: on Linux every write, ``utime``, rename or chmod sets it to the current time, so
a file replaced in place changes it (one renamed over the source also changes the inode). On Windows, where
``st_ctime`` is the creation time, the source is always hashed. A damaged or malformed cache is rebuilt with a
warning naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_file
from ..networks import EDMPrecond, build_edm
from .download import sha256_file
from .edm_pickle import EDMPickleError, PersistentRecord, read_edm_pickle, record_init_kwargs, record_state_dict

__all__ = ["load_edm", "convert_edm_pickle", "default_cache_dir", "CACHE_FORMAT", "SAFE_TORCH"]

CACHE_FORMAT = "fdistill_lab.edm_state_dict.v2"  # v2: validated by the source's sha256 (v1: by size and mtime)
_CACHE_FORMAT_V1 = "fdistill_lab.edm_state_dict.v1"  # loadable when named directly; rebuilt in the cache folder
SAFE_TORCH = (2, 10)  # torch.load(weights_only=True) has bypasses before 2.6 (CVE-2025-32434), 2.10 (CVE-2026-24747)


def _require_safe_torch(path: Path) -> None:
    """RuntimeError if this torch's ``weights_only`` loading has published bypasses (then ``path`` is not read)."""
    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])
    if found < SAFE_TORCH:
        need = ".".join(map(str, SAFE_TORCH))
        raise RuntimeError(f"refusing to read {path} with torch {torch.__version__}: torch.load(weights_only=True) "
                           f"has published bypasses before {need} (CVE-2025-32434, CVE-2026-24747); "
                           f"upgrade with `pip install 'torch>={need}'`")


def default_cache_dir() -> Path:
    """``$FDISTILL_CACHE_DIR/edm`` if set, else ``~/.cache/fdistill_lab/edm``."""
    root = os.environ.get("FDISTILL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "fdistill_lab") / "edm"


def _stat_key(path: Path) -> list[int]:
    """What changes whenever the file's content can have changed (see the module docstring)."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _source_digest(path: Path, source: Any) -> tuple[str, list[int] | None]:
    """(sha256 of ``path``, its stat key), trusting the sha256 recorded in ``source`` (a cache's record of its
    pickle) when the stat key is unchanged; the key is None if the file changed while it was being hashed."""
    key = _stat_key(path)
    if (os.name != "nt" and isinstance(source, dict) and source.get("stat") == key
            and isinstance(source.get("sha256"), str)):
        return source["sha256"], key
    digest = sha256_file(path)
    return digest, key if _stat_key(path) == key else None


def _cache_path(path: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"{path.stem}-{key}.pt"


def convert_edm_pickle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an EDM network pickle safely; return (EDMPrecond constructor keywords, state_dict) of ``'ema'``."""
    path = Path(path)
    _require_safe_torch(path)
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
    the file references code); nothing in the file is ever executed. The cache in ``cache_dir`` is reused only
    for a pickle with the sha256 it was converted from (see the module docstring); a damaged one is rebuilt with
    a warning. RuntimeError, before anything is read, with torch older than :data:`SAFE_TORCH`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"EDM teacher not found: {path}. Download it with `python -m fdistill_lab.download imagenet64 --root "
            "downloads/edm` (or `cifar10`; see docs/edm_data_and_fid.md).")
    _require_safe_torch(path)
    if path.suffix == ".pt":
        try:
            blob = _read_cache(path, (CACHE_FORMAT, _CACHE_FORMAT_V1))
        except _DamagedCache as exc:
            raise EDMPickleError(f"{path}: damaged EDM cache file ({exc}); delete it and load the pickle") from exc
        if blob is None:
            raise EDMPickleError(f"{path}: not an fdistill_lab EDM cache file (format {CACHE_FORMAT})")
        net = _build_and_load(blob["config"], blob["state_dict"], dropout, path)
    else:
        net = _load_pickle(path, Path(cache_dir) if cache_dir is not None else default_cache_dir(), use_cache,
                           dropout)
    net.edm_source = str(path)
    return net.eval().requires_grad_(False).to(device)


def _load_pickle(path: Path, cache_dir: Path, use_cache: bool, dropout: float | None) -> EDMPrecond:
    """The network of pickle ``path``: from its cache when that was converted from a file with the same sha256,
    else converted (and the cache rewritten)."""
    if not use_cache:
        return _build_and_load(*convert_edm_pickle(path), dropout, path)
    cache = _cache_path(path, cache_dir)
    blob = None
    if cache.is_file():
        try:
            blob = _read_cache(cache, (CACHE_FORMAT,))  # None for an older format: replaced without a word
            if blob is not None and not isinstance(blob.get("source"), dict):
                raise _DamagedCache("malformed: no record of the pickle it was converted from")
        except _DamagedCache as exc:
            blob = None
            warnings.warn(f"rebuilding damaged EDM cache {cache} from {path}: {exc}", stacklevel=3)
    digest, key = _source_digest(path, blob["source"] if blob is not None else None)
    if blob is not None and blob["source"].get("sha256") == digest:
        try:
            net = _build_and_load(blob["config"], blob["state_dict"], dropout, cache)
        except EDMPickleError as exc:
            warnings.warn(f"rebuilding damaged EDM cache {cache} from {path}: {exc}", stacklevel=3)
        else:
            if key is not None and blob["source"].get("stat") != key:  # same content, touched or copied:
                _write_cache(cache, blob["config"], blob["state_dict"], _source_record(path, digest, key))
            return net
    config, state = convert_edm_pickle(path)
    net = _build_and_load(config, state, dropout, path)
    if key is not None and _stat_key(path) == key:  # not changed since it was hashed: the cache matches it
        _write_cache(cache, config, state, _source_record(path, digest, key))
    return net


def _source_record(path: Path, digest: str, key: list[int]) -> dict[str, Any]:
    return {"name": path.name, "sha256": digest, "stat": key}


class _DamagedCache(Exception):
    """A cache file that cannot be read or does not hold a cache's entries; the message says what is wrong."""


def _read_cache(cache: Path, formats: tuple[str, ...]) -> dict[str, Any] | None:
    """The cache's dict; None if it is of another format; :class:`_DamagedCache` if unreadable or malformed."""
    _require_safe_torch(cache)
    try:
        blob = torch.load(cache, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated, not a zip, forbidden globals, unreadable ...
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise _DamagedCache(f"unreadable: {type(exc).__name__}: {first_line}") from exc
    if not isinstance(blob, dict) or blob.get("format") not in formats:
        return None
    config, state = blob.get("config"), blob.get("state_dict")
    if not (isinstance(config, dict) and isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise _DamagedCache("malformed: lacks a config dict or a state_dict of tensors")
    return blob


def _write_cache(cache: Path, config: dict[str, Any], state: dict[str, torch.Tensor], source: dict[str, Any]
                 ) -> None:
    try:  # a cache: atomic (never half-written) but not fsynced (rebuilt from the pickle if lost)
        with atomic_file(cache, durable=False) as fh:
            torch.save({"format": CACHE_FORMAT, "source": source, "config": config, "state_dict": state}, fh)
    except OSError as exc:
        warnings.warn(f"could not write EDM cache {cache}: {exc}", stacklevel=4)
