"""Build EDM's ImageNet-64 dataset zip from an ImageNet train folder (or from npz batches).

Same result as EDM's ``dataset_tool.py convert --transform=center-crop --resolution=64x64``: images in sorted
path order; labels = index of the sorted top-level
folder names (wnids, 0..999); each image converted to RGB, center-cropped to a square of side
min(H, W), resized with PIL LANCZOS, stored as an uncompressed PNG ``{idx//1000:05d}/img{idx:08d}.png``
in an uncompressed zip with ``dataset.json``. EDM's FID reference statistics were computed on this zip.

Usage::

    python -m fdistill_lab.train.prepare_imagenet --source ILSVRC/Data/CLS-LOC/train \\
        --dest datasets/imagenet-64x64.zip --resolution 64 --workers 16
    python -m fdistill_lab.train.prepare_imagenet --source Imagenet64_train_npz/ --label-map map_clsloc.txt \\
        --dest datasets/imagenet-64x64.zip
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from ..files import atomic_file
from .data import IMAGE_EXTS, DatasetFormatError, ImageNetNpzDataset

__all__ = ["center_crop_resize", "find_images", "build_zip", "prepare_from_folder", "prepare_from_npz", "main"]

SOURCE_FORMAT = ("an ImageNet train folder: one sub-folder per class (wnid, e.g. n01440764/) holding "
                 "JPEG images, as ILSVRC/Data/CLS-LOC/train")


def center_crop_resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """EDM's 'center-crop' transform: square crop of side min(H, W) at the center, PIL LANCZOS resize.

    ``img``: uint8 [H, W, 3]. Returns uint8 [resolution, resolution, 3]."""
    import PIL.Image

    crop = min(img.shape[:2])
    h, w = img.shape[:2]
    img = img[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    out = PIL.Image.fromarray(img, "RGB").resize((resolution, resolution), PIL.Image.LANCZOS)
    return np.array(out)


def _load_rgb(path: str) -> np.ndarray:
    import PIL.Image

    with PIL.Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _encode_png(img: np.ndarray) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(img, "RGB").save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def find_images(source: str | Path) -> tuple[list[Path], list[int]]:
    """Image files under ``source`` in sorted relative-path order, and their labels: the index of the
    top-level folder name in sorted order (ImageNet: the standard sorted-wnid class index)."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"ImageNet source folder not found: {source}. Expected {SOURCE_FORMAT}.")
    # path parts compared one by one, as EDM's dataset_tool sorts its Path objects ("a/x" before "a-b/y")
    files = sorted((p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                   key=lambda p: p.relative_to(source).parts)
    if not files:
        raise DatasetFormatError(f"{source}: no images found. Expected {SOURCE_FORMAT}.")
    tops = [p.relative_to(source).parts[0] if len(p.relative_to(source).parts) > 1 else "" for p in files]
    if "" in tops:
        raise DatasetFormatError(f"{source}: images directly in the source folder; expected {SOURCE_FORMAT}.")
    classes = {name: i for i, name in enumerate(sorted(set(tops)))}
    return files, [classes[t] for t in tops]


def _process(args: tuple[str, int]) -> bytes:
    path, resolution = args
    try:
        return _encode_png(center_crop_resize(_load_rgb(path), resolution))
    except Exception as exc:
        raise DatasetFormatError(f"cannot convert image {path}: {exc}") from exc


def build_zip(dest: str | Path, pngs: Iterable[bytes], labels: list[int] | None, total: int,
              progress: bool = True) -> Path:
    """Write EDM's dataset zip (ZIP_STORED) atomically (:func:`~fdistill_lab.files.atomic_file`: an error or an
    interruption leaves no partial zip behind)."""
    dest = Path(dest)
    names = []
    with atomic_file(dest) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for idx, png in enumerate(pngs):
            name = f"{idx // 1000:05d}/img{idx:08d}.png"
            zf.writestr(name, png)
            names.append(name)
            if progress and (idx + 1) % 10000 == 0:
                print(f"{idx + 1}/{total} images", file=sys.stderr, flush=True)
        if len(names) != total:
            raise RuntimeError(f"wrote {len(names)} images, expected {total}")
        meta = {"labels": [[n, int(lab)] for n, lab in zip(names, labels)] if labels is not None else None}
        zf.writestr("dataset.json", json.dumps(meta))
    return dest


def prepare_from_folder(source: str | Path, dest: str | Path, resolution: int = 64, max_images: int | None = None,
                        workers: int = 1, progress: bool = True) -> Path:
    """ImageNet train folder -> EDM zip (see module docstring)."""
    files, labels = find_images(source)
    if max_images is not None:
        files, labels = files[:max_images], labels[:max_images]
    jobs = [(str(f), resolution) for f in files]
    if workers > 1:
        with Pool(workers) as pool:
            return build_zip(dest, pool.imap(_process, jobs, chunksize=64), labels, len(jobs), progress)
    return build_zip(dest, map(_process, jobs), labels, len(jobs), progress)


def prepare_from_npz(source: str | Path, dest: str | Path, max_images: int | None = None,
                     progress: bool = True, label_map: str | Path | None = None) -> Path:
    """Downsampled-ImageNet npz batches -> EDM zip (pixels unchanged, labels in EDM's sorted-wnid order).

    ``label_map``: the devkit's ``map_clsloc.txt`` (the npz class order) or ``"identity"`` when the npz
    labels already follow EDM's order; required, since the zip's labels must match EDM's teachers.
    """
    if label_map is None:
        raise ValueError("npz labels follow the devkit's map_clsloc.txt order, not the sorted-wnid order of EDM's "
                         "teachers: pass --label-map <path to map_clsloc.txt> (or --label-map identity if your "
                         "npz labels are already in sorted-wnid order)")
    ds = ImageNetNpzDataset(source, label_map=label_map)
    n = len(ds) if max_images is None else min(max_images, len(ds))

    def pngs() -> Iterator[bytes]:
        for i in range(n):
            img, _ = ds[i]
            yield _encode_png(img.permute(1, 2, 0).numpy())

    return build_zip(dest, pngs(), [int(v) for v in ds.labels[:n]], n, progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.train.prepare_imagenet",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True,
                        help="ImageNet train folder (ILSVRC/Data/CLS-LOC/train) or folder/file of npz batches")
    parser.add_argument("--dest", required=True, help="output zip, e.g. datasets/imagenet-64x64.zip")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images (for tests)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--label-map", default=None,
                        help="npz sources only: the ImageNet devkit's map_clsloc.txt (npz class order), or "
                             "'identity' if the npz labels already follow the sorted-wnid order")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    src = Path(args.source)
    is_npz = src.suffix == ".npz" or (src.is_dir() and any(src.glob("*.npz")))
    if args.label_map and not is_npz:
        print("error: --label-map applies to npz sources only (a folder's labels come from its sorted class "
              "folders, as EDM's)", file=sys.stderr)
        return 2
    try:
        if is_npz:
            out = prepare_from_npz(src, args.dest, args.max_images, not args.quiet, args.label_map)
        else:
            out = prepare_from_folder(src, args.dest, args.resolution, args.max_images, args.workers,
                                      not args.quiet)
    except (FileNotFoundError, ValueError) as exc:  # DatasetFormatError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
