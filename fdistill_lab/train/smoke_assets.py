"""Synthetic stand-ins for the ImageNet-64 pipeline, so that it runs end to end on a CPU in seconds.

``make_smoke_assets(folder)`` writes, in the real files' formats:

* ``data.zip``: an EDM-format dataset zip of small labelled images (class k = a coloured square of
  colour k at a random place on a dark background);
* ``teacher.pt``: a randomly initialised tiny ADM ``EDMPrecond`` in :func:`fdistill_lab.train.teachers.load_edm`'s
  ``.pt`` format (it is *not* a trained model: it only exercises the code path);
* ``detector.pt``: a TorchScript stand-in for the Inception detector (fixed random projection of the pixels,
  called as ``detector(uint8 images, return_features=True)``);
* ``reference.npz``: FID reference statistics of the data under that detector (EDM's ``mu``/``sigma`` format).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..networks import build_edm, tiny_adm_config
from .data import EDMImageDataset
from .fid import compute_image_stats, load_detector, save_reference_stats
from .prepare_imagenet import build_zip
from .teachers import CACHE_FORMAT

__all__ = ["make_smoke_assets", "smoke_teacher_config", "StandInDetector", "SMOKE_FILES"]

SMOKE_FILES = {"data": "data.zip", "teacher": "teacher.pt", "detector": "detector.pt", "ref": "reference.npz"}
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def smoke_teacher_config(resolution: int = 8, num_classes: int = 10) -> dict:
    """Tiny class-conditional ADM: two levels (8 and 16 channels), no attention, bottleneck at res/2."""
    return tiny_adm_config(img_resolution=resolution, label_dim=num_classes, img_channels=3, model_channels=8,
                           attn_resolutions=[])


class StandInDetector(nn.Module):
    """Fixed random features of uint8 pixels (same call signature as EDM's Inception detector)."""

    def __init__(self, resolution: int, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(dim, 3 * resolution * resolution, generator=g) / resolution)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        f = x.reshape(x.shape[0], -1).to(torch.float32) / 127.5 - 1.0
        h = f @ self.w.t()
        return h + torch.tanh(h)


def _images(n: int, resolution: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [int(k) for k in rng.integers(0, num_classes, n)]
    side = max(2, resolution // 2)
    imgs = np.full((n, resolution, resolution, 3), 20, np.uint8)
    imgs += rng.integers(0, 20, imgs.shape, dtype=np.uint8)
    for i, k in enumerate(labels):
        top, left = rng.integers(0, resolution - side + 1, 2)
        imgs[i, top:top + side, left:left + side] = PALETTE[k % len(PALETTE)]
    return imgs, labels


def _png(img: np.ndarray) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(img, "RGB").save(buf, format="png")
    return buf.getvalue()


def make_smoke_assets(folder: str | Path, num_images: int = 256, resolution: int = 8, num_classes: int = 10,
                      seed: int = 0) -> dict[str, Path]:
    """Write the four stand-in files (module docstring) into ``folder``; return {role: path}.

    Existing files are reused (delete the folder to rebuild)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / v for k, v in SMOKE_FILES.items()}
    if not paths["data"].is_file():
        imgs, labels = _images(num_images, resolution, num_classes, seed)
        build_zip(paths["data"], (_png(im) for im in imgs), labels, num_images, progress=False)
    if not paths["teacher"].is_file():
        cfg = smoke_teacher_config(resolution, num_classes)
        torch.manual_seed(seed)
        net = build_edm(**cfg)
        blob = {"format": CACHE_FORMAT, "source": None, "config": cfg, "state_dict": net.state_dict()}
        torch.save(blob, paths["teacher"])
    if not paths["detector"].is_file():
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; EDM's detector is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(StandInDetector(resolution)), str(paths["detector"]))
    if not paths["ref"].is_file():
        ds = EDMImageDataset(paths["data"])
        det = load_detector(paths["detector"])
        batch = torch.stack([ds[i][0] for i in range(len(ds))])
        stats = compute_image_stats([batch], det, feature_dim=16)
        save_reference_stats(paths["ref"], *stats.mean_cov())
    return paths
