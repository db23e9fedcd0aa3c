"""Safe reader for EDM network pickles (``edm-*.pkl``, also SiD/SiDA snapshots in the same format).

EDM stores every network object through ``torch_utils.persistence._reconstruct_persistent_obj(meta)``,
whose ``meta`` carries the Python source of the defining module; the stock loader executes it. This
reader never does: :class:`EDMUnpickler` resolves globals from an allowlist only (``ALLOWED_GLOBALS``: the
containers, numpy scalars and torch storage classes that EDM's pickles hold), the persistence hook becomes a
passive :class:`PersistentRecord` (class name + state), and tensor storages are decoded with
``torch.load(weights_only=True)``. Any other global raises :class:`UnsafePickleError` before anything runs.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "UnsafePickleError",
    "EDMPickleError",
    "PersistentRecord",
    "ModuleDictRecord",
    "EDMUnpickler",
    "read_edm_pickle",
    "record_state_dict",
    "record_init_kwargs",
]

_PRECOND_SIGNATURE = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                      "sigma_data", "model_type")


class EDMPickleError(ValueError):
    """The file is not a readable EDM network pickle."""


class UnsafePickleError(EDMPickleError, pickle.UnpicklingError):
    """The pickle references a global outside the EDM allowlist; nothing from it was executed."""


@dataclass
class PersistentRecord:
    """Passive stand-in for an EDM persistent object: its class name and ``__dict__`` state.

    The stored module source is dropped unread (only its length is kept, for diagnostics)."""

    class_name: str
    state: dict
    module_src_len: int = 0


@dataclass
class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict`` (written by NEWOBJ + BUILD); keeps its state dict."""

    state: dict = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise EDMPickleError(f"ModuleDict state must be a dict, got {type(state).__name__}")
        self.state = state


class _FrozenClass(type):
    """Metaclass of the stand-in classes: a pickle's BUILD opcode cannot set attributes on them, so a
    crafted file cannot change how later loads in the same process behave."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {cls.__name__} (BUILD on a global)")

    def __delattr__(cls, name: str) -> None:
        raise UnsafePickleError(f"refusing to delete attribute {name!r} of {cls.__name__}")


class _FrozenFunction:
    """Callable wrapper of an allowlisted function with no attributes a pickle could set (BUILD)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {self._fn.__name__} (BUILD on a global)")

    def __delattr__(self, name: str) -> None:
        raise UnsafePickleError(f"refusing to delete attribute {name!r} of {self._fn.__name__}")


class _ModuleDictStub(metaclass=_FrozenClass):
    """Class object handed to NEWOBJ for ``torch.nn.modules.container.ModuleDict``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ModuleDictRecord:  # type: ignore[misc]
        return ModuleDictRecord()


class _EasyDict(dict, metaclass=_FrozenClass):
    """Stand-in for ``dnnlib.EasyDict`` (a dict subclass); accepts BUILD with an attribute dict."""


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise EDMPickleError("persistent object record is not an EDM class record (expected type='class')")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise EDMPickleError(f"persistent object {meta['class_name']!r} has no state dict")
    src = meta.get("module_src")
    return PersistentRecord(meta["class_name"], state, len(src) if isinstance(src, str) else 0)


def _load_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """Decode a legacy ``torch.save`` storage blob without executing anything (weights_only=True)."""
    if not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError("tensor storage blob must be bytes")
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # the weights-only unpickler refuses any unexpected global
        # keep torch's reason, not its advice to retry with weights_only=False (that would run the file)
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln
                       and not ln.startswith(("Please file", "Check the documentation"))), type(exc).__name__)
        raise UnsafePickleError(f"refusing a tensor storage blob that holds more than plain tensor data ({reason}); "
                                "nothing from it was executed") from exc
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise EDMPickleError(f"tensor storage blob decoded to {type(storage).__name__}, not a storage")
    return storage


def _as_int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and i >= 0 for i in v):
        raise EDMPickleError(f"tensor {what} must be a tuple of non-negative ints, got {v!r}")
    return tuple(v)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    elif isinstance(storage, torch.UntypedStorage):
        dtype, untyped = torch.uint8, storage
    else:
        raise EDMPickleError(f"tensor storage has unexpected type {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise EDMPickleError(f"bad storage offset {storage_offset!r}")
    size_t, stride_t = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise EDMPickleError("tensor size and stride lengths differ")
    needed = storage_offset + sum((s - 1) * st for s, st in zip(size_t, stride_t) if s) + 1
    if math.prod(size_t) and needed * dtype.itemsize > untyped.nbytes():
        raise EDMPickleError("tensor extends past the end of its storage")
    t = torch.empty((0,), dtype=dtype)
    return t.set_(untyped, storage_offset, size_t, stride_t)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       *state: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise EDMPickleError("parameter data is not a tensor")
    return data


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype spec must be a string, got {type(spec).__name__}")
    dt = np.dtype(spec, align=False, copy=True)  # a copy: BUILD must never mutate numpy's singletons
    if dt.kind not in "biuf" or dt.fields is not None:
        raise UnsafePickleError(f"numpy dtype {spec!r} is not a plain numeric dtype")
    return dt


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        raise UnsafePickleError("numpy scalar with a non-numeric dtype")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise EDMPickleError("numpy scalar payload has the wrong length")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


# functions are wrapped and classes frozen: a BUILD opcode after a global must not mutate shared objects
# (collections.OrderedDict is a built-in type, immutable already)
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _FrozenFunction(_reconstruct_persistent_obj),
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _FrozenFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _FrozenFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_tensor_v2"): _FrozenFunction(_rebuild_tensor_v2),
    ("torch.storage", "_load_from_bytes"): _FrozenFunction(_load_from_bytes),
    ("numpy.core.multiarray", "scalar"): _FrozenFunction(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _FrozenFunction(_numpy_scalar),
    ("numpy", "dtype"): _FrozenFunction(_numpy_dtype),
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
}


class EDMUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only the globals of an EDM network pickle,
    each mapped to a local, side-effect-free function (never the original callable)."""

    def __init__(self, file: BinaryIO, source: str = "<stream>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}'; an EDM network pickle only "
                f"references: {allowed}. Nothing from the file was executed."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: unexpected persistent id in an EDM network pickle")


def read_edm_pickle(path: str | Path) -> dict:
    """Unpickle an EDM snapshot safely. Returns the top-level dict with :class:`PersistentRecord` values
    (``'ema'`` is the network). Raises :class:`UnsafePickleError` or :class:`EDMPickleError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM network pickle not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
        if head[:1] != b"\x80":
            kind = "a zip archive (torch.save?)" if head == b"PK" else "not a pickle"
            raise EDMPickleError(f"{path}: expected an EDM network pickle (plain pickle stream), found {kind}")
        f.seek(0)
        try:
            data = EDMUnpickler(f, str(path)).load()
        except (UnsafePickleError, EDMPickleError) as exc:
            if str(exc).startswith(str(path)):
                raise
            raise type(exc)(f"{path}: {exc}") from exc
        except Exception as exc:
            raise EDMPickleError(f"{path}: could not read as an EDM network pickle: {exc}") from exc
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path}: top level is {type(data).__name__}, expected a dict with key 'ema'")
    return data


def _children(node: PersistentRecord | ModuleDictRecord) -> Mapping[str, Any]:
    mods = node.state.get("_modules", {})
    if not isinstance(mods, Mapping):
        raise EDMPickleError("module state '_modules' is not a dict")
    return mods


def record_state_dict(node: PersistentRecord | ModuleDictRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """PyTorch ``state_dict()`` of a record tree: per node ``_parameters`` then ``_buffers`` (None
    entries skipped), then children in ``_modules`` order, dotted names."""
    out: dict[str, torch.Tensor] = {}
    for key in ("_parameters", "_buffers"):
        entries = node.state.get(key, {})
        if not isinstance(entries, Mapping):
            raise EDMPickleError(f"{prefix or '<root>'}: module state {key!r} is not a dict")
        for name, t in entries.items():
            if t is None:
                continue
            if key == "_buffers" and name in node.state.get("_non_persistent_buffers_set", set()):
                continue
            if not isinstance(t, torch.Tensor):
                raise EDMPickleError(f"{prefix}{name}: expected a tensor, got {type(t).__name__}")
            out[prefix + name] = t
    for name, child in _children(node).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleDictRecord)):
            raise EDMPickleError(f"{prefix}{name}: unexpected child module type {type(child).__name__}")
        out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def record_init_kwargs(rec: PersistentRecord) -> dict[str, Any]:
    """Constructor keywords of an ``EDMPrecond`` record (``_init_args`` mapped onto EDM's signature)."""
    args = rec.state.get("_init_args", ())
    kwargs = rec.state.get("_init_kwargs", {})
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, Mapping):
        raise EDMPickleError(f"{rec.class_name}: missing or malformed _init_args/_init_kwargs")
    if len(args) > len(_PRECOND_SIGNATURE):
        raise EDMPickleError(f"{rec.class_name}: too many positional constructor arguments")
    out = dict(zip(_PRECOND_SIGNATURE, args))
    out.update(dict(kwargs))
    return out
