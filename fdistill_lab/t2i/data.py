"""Image-caption pairs for the GAN loss's real side (section 8), as SD latents and CLIP text embeddings.

Two layouts, both what ``img2dataset`` writes: a folder (searched recursively) of images with a caption file of
the same stem (``0001.jpg`` + ``0001.txt``), or webdataset ``.tar`` shards with members ``<key>.jpg`` /
``<key>.txt`` (read with Python's ``tarfile``, so a shard is indexed once and read at random). Images are
resized (shorter side, Lanczos) and centre-cropped to the training resolution with Pillow and mapped to [-1, 1].
:func:`latent_batches` deals global batches to ranks (:class:`~fdistill_lab.train.dist.GlobalBatchSampler`,
addressed by step, so a resumed run reads the batches an uninterrupted one would) and encodes them on the device.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..train.dist import GlobalBatchSampler
from .components import SDComponents

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(data: bytes | str | Path, resolution: int) -> torch.Tensor:
    """An image file (or its bytes) -> [3, R, R] float32 in [-1, 1]: RGB, shorter side to R (Lanczos), centre crop."""
    import PIL.Image

    with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), PIL.Image.LANCZOS)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        arr = np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


class CaptionDataset(torch.utils.data.Dataset):
    """(image [3, R, R] in [-1, 1], caption) pairs from a folder or webdataset ``.tar`` shards (a folder of them,
    or one file). Items are sorted by key; images without a caption are an error naming the first few."""

    def __init__(self, root: str | Path, resolution: int) -> None:
        self.root, self.resolution = Path(root), int(resolution)
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels; got {resolution}")
        if not self.root.exists():
            raise FileNotFoundError(f"image-caption data not found: {self.root} (a folder of <key>.jpg + <key>.txt "
                                    "pairs, or webdataset .tar shards, e.g. from img2dataset)")
        shards = [self.root] if self.root.is_file() else sorted(self.root.rglob("*.tar"))
        self.items: list[tuple[Path, str, str]] = []  # (file or shard, image member, caption member or text)
        if shards:
            for shard in shards:
                self.items += _index_shard(shard)
        else:
            self.items = _index_folder(self.root)
        if not self.items:
            raise ValueError(f"{self.root} holds no image-caption pairs ({'/'.join(IMAGE_SUFFIXES)} images with a "
                             ".txt caption of the same name, or .tar shards of them)")
        self._tars: dict[Path, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, i: int) -> str:
        src, _, cap = self.items[i]
        if src.suffix == ".tar":
            return self._member(src, cap).decode("utf-8").strip()
        return Path(cap).read_text(encoding="utf-8").strip()

    def _member(self, shard: Path, name: str) -> bytes:
        tar = self._tars.get(shard)
        if tar is None:  # one handle per shard and process (DataLoader workers open their own)
            tar = self._tars[shard] = tarfile.open(shard)
        fh = tar.extractfile(name)
        if fh is None:
            raise ValueError(f"{shard}: member {name} is not a file")
        return fh.read()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        src, img, _ = self.items[i]
        data = self._member(src, img) if src.suffix == ".tar" else Path(img)
        return load_image(data, self.resolution), self.caption(i)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tars": {}}


def _index_folder(root: Path) -> list[tuple[Path, str, str]]:
    items, lacking = [], []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            cap = p.with_suffix(".txt")
            if cap.is_file():
                items.append((p, str(p), str(cap)))
            else:
                lacking.append(p.name)
    if lacking:
        raise ValueError(f"{root}: {len(lacking)} image(s) without a caption file of the same name "
                         f"(first: {', '.join(lacking[:3])}); add <name>.txt beside each image")
    return items


def _index_shard(shard: Path) -> list[tuple[Path, str, str]]:
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    by_key: dict[str, dict[str, str]] = {}
    for n in names:
        stem, dot, ext = n.rpartition(".")
        if dot:
            by_key.setdefault(stem, {})["." + ext.lower()] = n
    items = []
    for key in sorted(by_key):
        parts = by_key[key]
        img = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
        if img is not None and ".txt" in parts:
            items.append((shard, img, parts[".txt"]))
    return items


def _collate(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def latent_batches(dataset: CaptionDataset, components: SDComponents, global_batch: int, rank: int = 0,
                   world_size: int = 1, seed: int = 0, start_batch: int = 0, num_workers: int = 0,
                   device: torch.device | str = "cpu", micro_batch: int | None = None, bf16: bool = False,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (latents [b, 4, h, w], text embeddings [b, L, D]) of this rank's share b = global_batch /
    world_size of each global batch, starting after ``start_batch`` batches; with ``micro_batch`` (gradient
    accumulation) rank r holds slice r of each global micro-batch, as the trainer's shared random draws expect.
    ``bf16``: the frozen VAE encoder and text encoder run under bf16 autocast (their outputs are float32)."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, rank, world_size, seed, start_batch,
                                 micro_batch=micro_batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=_collate, persistent_workers=num_workers > 0)
    dev = torch.device(device)
    for images, captions in loader:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):  # closed before the yield
            batch = components.encode_images(images.to(dev)), components.encode_text(captions, dev)
        yield batch


def write_caption_folder(folder: str | Path, images: torch.Tensor, captions: list[str]) -> Path:
    """Write [-1, 1] images [N, 3, H, W] as PNGs with caption files (tests, the notebook's smoke data)."""
    import PIL.Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (a, cap) in enumerate(zip(arr, captions)):
        PIL.Image.fromarray(a, "RGB").save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(cap + "\n", encoding="utf-8")
    return folder
