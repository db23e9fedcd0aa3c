"""Readers for ImageNet-64 (and any EDM-format dataset) and for downsampled-ImageNet npz batches.

EDM dataset format (written by EDM's ``dataset_tool.py``): an uncompressed ZIP (or a
folder) of PNGs named ``{idx//1000:05d}/img{idx:08d}.png`` plus ``dataset.json`` =
``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``. Images are read in sorted
name order as uint8 [C, H, W]; training maps pixels to [-1, 1] with x / 127.5 - 1.

Downsampled ImageNet (Chrabaszcz et al. 2017, "Imagenet64_train_npz"): files ``train_data_batch_K.npz``
with ``data`` uint8 [N, 3*R*R] (channel-major, i.e. CHW flattened) and ``labels`` 1-based class ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "EDMImageDataset",
    "ImageNetNpzDataset",
    "DatasetFormatError",
    "read_label_map",
    "to_model_range",
    "EDM_FORMAT",
    "NPZ_FORMAT",
]

EDM_FORMAT = ("EDM dataset format: an uncompressed .zip (or a folder) of PNG images with optional "
              "dataset.json {'labels': [[name, int], ...] | null}, as written by "
              "`python -m fdistill_lab.train.prepare_imagenet` or EDM's dataset_tool.py")
NPZ_FORMAT = ("downsampled-ImageNet npz batches: train_data_batch_*.npz (or one .npz) with 'data' uint8 "
              "[N, 3*R*R] in CHW-flattened order and 'labels' 1-based class ids [N]")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetFormatError(ValueError):
    """A dataset file is malformed; the message names the path and the expected format."""


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [.., C, H, W] -> float32 in [-1, 1] (x / 127.5 - 1, as EDM's training loop)."""
    return images.to(torch.float32) / 127.5 - 1


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part).encode())
    return h.hexdigest()


def _zip_crcs(path: Path, names: Sequence[str] | None = None) -> list[list[Any]]:
    """(name, CRC-32, size) of a zip's members (all, or ``names``), read from its directory (no decompression)."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    return [[n, infos[n].CRC, infos[n].file_size] for n in (names if names is not None else sorted(infos))]


def _subset(n: int, max_size: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.int64)
    if max_size is not None and max_size < n:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:max_size])
    return idx


class EDMImageDataset(Dataset):
    """Images and labels from an EDM-format zip or folder.

    ``dataset[i]`` returns ``(image uint8 [C, H, W], label int64 scalar)`` (label -1 when the dataset has
    no labels or ``use_labels`` is False). ``max_size`` takes a seeded random subset (EDM's convention);
    ``xflip`` doubles the dataset with mirrored copies. Safe with DataLoader workers (one zip handle per
    process).
    """

    def __init__(self, path: str | Path, use_labels: bool = True, max_size: int | None = None,
                 xflip: bool = False, random_seed: int = 0) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset not found: {self.path}. Expected {EDM_FORMAT}.")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if self.path.is_dir():
            names = sorted(str(p.relative_to(self.path)).replace(os.sep, "/") for p in self.path.rglob("*")
                           if p.is_file())
        elif zipfile.is_zipfile(self.path):
            names = sorted(self._open_zip().namelist())
        else:
            raise DatasetFormatError(f"{self.path}: not a zip file or folder. Expected {EDM_FORMAT}.")
        self._image_names = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
        if not self._image_names:
            raise DatasetFormatError(f"{self.path}: contains no images. Expected {EDM_FORMAT}.")
        self._labels = self._load_labels(names) if use_labels else None
        self._raw_idx = _subset(len(self._image_names), max_size, random_seed)
        self.xflip = xflip
        first = self._load_raw_image(0)
        self.image_shape = tuple(first.shape)  # [C, H, W]

    # -- properties
    @property
    def resolution(self) -> int:
        return self.image_shape[1]

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def label_dim(self) -> int:
        """Number of classes (max label + 1), 0 without labels."""
        return int(self._labels.max()) + 1 if self._labels is not None else 0

    @property
    def labels(self) -> np.ndarray:
        """int64 labels of the (subset) images, without the xflip duplication."""
        if self._labels is None:
            return np.full(len(self._raw_idx), -1, dtype=np.int64)
        return self._labels[self._raw_idx]

    def __len__(self) -> int:
        return len(self._raw_idx) * (2 if self.xflip else 1)

    # -- internals
    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _read(self, name: str) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        return self._open_zip().read(name)

    def _load_labels(self, names: list[str]) -> np.ndarray | None:
        if "dataset.json" not in names:
            return None
        try:
            meta = json.loads(self._read("dataset.json"))
            labels = meta["labels"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetFormatError(f"{self.path}: dataset.json is malformed ({exc}). Expected {EDM_FORMAT}.") \
                from exc
        if labels is None:
            return None
        try:
            table = {str(name).replace("\\", "/"): int(lab) for name, lab in labels}
        except (ValueError, TypeError) as exc:
            raise DatasetFormatError(f"{self.path}: dataset.json labels must be [[name, int], ...] ({exc})") \
                from exc
        missing = [n for n in self._image_names if n not in table]
        if missing:
            raise DatasetFormatError(f"{self.path}: dataset.json has no label for {len(missing)} image(s), "
                                     f"e.g. {missing[0]!r}. Expected {EDM_FORMAT}.")
        out = np.array([table[n] for n in self._image_names], dtype=np.int64)
        if out.min() < 0:
            raise DatasetFormatError(f"{self.path}: negative class label in dataset.json")
        return out

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        import PIL.Image

        name = self._image_names[raw_idx]
        try:
            with PIL.Image.open(io.BytesIO(self._read(name))) as img:
                arr = np.array(img)
        except Exception as exc:
            raise DatasetFormatError(f"{self.path}: cannot decode image {name!r} ({exc})") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr.transpose(2, 0, 1)  # HWC -> CHW

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < len(self):  # also ends plain iteration (for x in ds)
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} items")
        n = len(self._raw_idx)
        flip = idx >= n
        raw = int(self._raw_idx[idx % n])
        img = self._load_raw_image(raw)
        if img.shape != self.image_shape:
            raise DatasetFormatError(f"{self.path}: image {self._image_names[raw]!r} has shape {img.shape}, "
                                     f"expected {self.image_shape} like the first image")
        if flip:
            img = img[:, :, ::-1]
        label = int(self._labels[raw]) if self._labels is not None else -1
        return torch.from_numpy(np.ascontiguousarray(img)), torch.tensor(label, dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None  # reopened lazily in each worker
        return state

    def identity(self) -> dict[str, Any]:
        """What a resumed run checks: ``structure``, a hash of the image names, subset, labels and shape (another
        data set), and ``content``, a hash of the files' CRC-32s (zip) or sizes (folder), which a repaired image
        changes too. Neither reads an image."""
        labels = self._labels if self._labels is not None else np.zeros(0, np.int64)
        structure = _digest(self._image_names, self._raw_idx.astype(np.int64), labels.astype(np.int64),
                            list(self.image_shape), self.xflip)
        names = self._image_names + (["dataset.json"] if self._labels is not None else [])
        if self.path.is_dir():
            files = [[n, (self.path / n).stat().st_size] for n in names]
        else:
            files = _zip_crcs(self.path, names)
        return {"format": "edm", "images": len(self), "structure": structure, "content": _digest(files)}


_WNID = re.compile(r"n\d{8}")


def read_label_map(path: str | Path) -> np.ndarray:
    """Map from 0-based npz label to EDM's class index, read from a list of ImageNet wnids.

    The downsampled-ImageNet npz release numbers its classes 1..1000 in the order of the ILSVRC devkit's
    ``map_clsloc.txt`` (label 1 is n02119789, kit fox), while EDM's teachers were trained on labels in
    sorted-wnid order (label 0 is n01440764, tench: the sorted class folders of ``dataset_tool.py``).
    ``path`` is a text file with one class per line: a wnid, optionally followed by its 1-based npz id and
    a name (``map_clsloc.txt`` as shipped); without ids, line k is npz label k. Returns ``m`` with
    ``m[npz_label - 1]`` = rank of that wnid among all wnids in the file, sorted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}. Expected a text file with one ImageNet wnid per "
                                "line in npz label order, e.g. the devkit's map_clsloc.txt ('n02119789 1 kit_fox')")
    wnids: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if not _WNID.fullmatch(tokens[0]):
            raise DatasetFormatError(f"{path}:{lineno}: {tokens[0]!r} is not an ImageNet wnid (n + 8 digits)")
        ident = len(wnids) + 1
        if len(tokens) > 1 and tokens[1].isdigit():
            ident = int(tokens[1])
        if ident in wnids:
            raise DatasetFormatError(f"{path}:{lineno}: npz id {ident} appears twice")
        wnids[ident] = tokens[0]
    if not wnids:
        raise DatasetFormatError(f"{path}: no wnids found")
    if sorted(wnids) != list(range(1, len(wnids) + 1)):
        raise DatasetFormatError(f"{path}: npz ids must be 1..{len(wnids)}, each once")
    if len(set(wnids.values())) != len(wnids):
        raise DatasetFormatError(f"{path}: a wnid appears twice")
    rank = {w: k for k, w in enumerate(sorted(wnids.values()))}
    return np.array([rank[wnids[i]] for i in range(1, len(wnids) + 1)], dtype=np.int64)


def _npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an .npz from its .npy header, without reading the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


def _batch_number(p: Path) -> tuple[int, str]:
    m = re.search(r"(\d+)(?=\.npz$)", p.name)
    return (int(m.group(1)) if m else 0, p.name)


class ImageNetNpzDataset(Dataset):
    """Downsampled-ImageNet npz batches (``Imagenet64_train_npz``), as a second ImageNet-64 reader.

    ``path``: one ``.npz`` file or a folder of ``*.npz`` batches (sorted by batch number). Items are
    ``(image uint8 [3, R, R], label int64)`` with labels converted to 0-based. The published labels are
    1-based ids in the devkit's ``map_clsloc.txt`` order, not the sorted-wnid order of EDM's ImageNet zip
    and teachers: pass ``label_map``, either that file's path (see :func:`read_label_map`), an array
    mapping 0-based npz label -> EDM label, or ``"identity"`` for npz files whose labels already follow
    EDM's order. ``labels_mapped`` says whether one was given. Batches are loaded
    on first use and kept in memory (about 1.6 GB per ImageNet-64 batch file; ``max_cached_files`` >= 1
    limits how many).
    """

    def __init__(self, path: str | Path, label_map: Sequence[int] | np.ndarray | str | Path | None = None,
                 max_cached_files: int | None = None) -> None:
        if max_cached_files is not None and max_cached_files < 1:
            raise ValueError(f"max_cached_files must be >= 1 (or None for no limit); got {max_cached_files}")
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"npz dataset not found: {self.path}. Expected {NPZ_FORMAT}.")
        # a folder: its training batches only (the release's val_data.npz may sit beside them)
        files = sorted(self.path.glob("train_data_batch_*.npz"), key=_batch_number) if self.path.is_dir() \
            else [self.path]
        if not files:
            found = sorted(p.name for p in self.path.glob("*.npz"))[:5]
            raise DatasetFormatError(f"{self.path}: no train_data_batch_*.npz files (found {found or 'no .npz'}); "
                                     f"give one .npz file to read just that. Expected {NPZ_FORMAT}.")
        self.files = files
        self.max_cached_files = max_cached_files
        self._cache: dict[int, np.ndarray] = {}
        labels, counts, dim = [], [], None
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    if "data" not in z.files or "labels" not in z.files:
                        missing = sorted({"data", "labels"} - set(z.files))
                        raise DatasetFormatError(f"{f}: missing key(s) {missing}. Expected {NPZ_FORMAT}.")
                    lab = np.asarray(z["labels"]).reshape(-1).astype(np.int64)
                shape = _npz_array_shape(f, "data")
            except DatasetFormatError:
                raise
            except Exception as exc:
                raise DatasetFormatError(f"{f}: cannot read ({exc}). Expected {NPZ_FORMAT}.") from exc
            if shape is None or len(shape) != 2 or shape[0] != len(lab):
                raise DatasetFormatError(f"{f}: 'data' has shape {shape} for {len(lab)} labels. Expected {NPZ_FORMAT}.")
            if dim is not None and shape[1] != dim:
                raise DatasetFormatError(f"{f}: rows of length {shape[1]} differ from {dim} in {files[0]}")
            dim = shape[1]
            if lab.size and lab.min() < 1:
                raise DatasetFormatError(f"{f}: labels must be 1-based (found {lab.min()}). Expected {NPZ_FORMAT}.")
            labels.append(lab - 1)
            counts.append(len(lab))
        res = math.isqrt(dim // 3)
        if 3 * res * res != dim:
            raise DatasetFormatError(f"{files[0]}: row length {dim} is not 3*R*R. Expected {NPZ_FORMAT}.")
        self.resolution = res
        self.image_shape = (3, res, res)
        lab_all = np.concatenate(labels)
        self.labels_mapped = label_map is not None
        if isinstance(label_map, str) and label_map == "identity":  # the npz labels already follow EDM's order
            label_map = None
        if label_map is not None:
            lm = read_label_map(label_map) if isinstance(label_map, (str, Path)) else np.asarray(label_map, np.int64)
            if lab_all.size and lab_all.max() >= len(lm):
                raise ValueError(f"label_map has {len(lm)} entries but labels go up to {lab_all.max()}")
            lab_all = lm[lab_all]
        self._labels = lab_all
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def label_dim(self) -> int:
        return int(self._labels.max()) + 1 if len(self._labels) else 0

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _data(self, k: int) -> np.ndarray:
        if k not in self._cache:
            if self.max_cached_files is not None and len(self._cache) >= self.max_cached_files:
                self._cache.pop(next(iter(self._cache)))
            try:
                with np.load(self.files[k], allow_pickle=False) as z:
                    data = z["data"]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:  # a damaged or truncated batch file
                raise DatasetFormatError(f"{self.files[k]}: cannot read its 'data' ({type(exc).__name__}: {exc}); "
                                         f"the file is damaged: replace it. Expected {NPZ_FORMAT}.") from exc
            if data.dtype != np.uint8:
                raise DatasetFormatError(f"{self.files[k]}: 'data' is {data.dtype}, expected uint8")
            self._cache[k] = data
        return self._cache[k]

    def identity(self) -> dict[str, Any]:
        """As :meth:`EDMImageDataset.identity`: ``structure`` hashes the batch files' names and sizes of rows, the
        (mapped) labels and the shape; ``content`` the CRC-32s of the arrays in each file."""
        counts = np.diff(self._offsets).astype(np.int64)
        structure = _digest([f.name for f in self.files], counts, self._labels.astype(np.int64),
                            list(self.image_shape))
        return {"format": "npz", "images": len(self), "structure": structure,
                "content": _digest([_zip_crcs(f) for f in self.files])}

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        k = int(np.searchsorted(self._offsets, idx, side="right") - 1)
        row = self._data(k)[idx - self._offsets[k]]
        img = torch.from_numpy(np.array(row.reshape(self.image_shape)))
        return img, torch.tensor(int(self._labels[idx]), dtype=torch.int64)
