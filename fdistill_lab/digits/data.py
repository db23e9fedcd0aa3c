"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as an EDM image data set.

Offline (the data ships with scikit-learn). Pixels 0..16 map to [-1, 1] (x / 8 - 1), the range EDM
assumes (sigma_data = 0.5). A seeded, class-stratified split keeps a held-out set for the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NATIVE_RESOLUTION = 8
RESOLUTIONS = (8, 16)


@dataclass
class DigitsSplit:
    """Images [N, 1, R, R] in [-1, 1] (float32) and integer labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _check_resolution(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}; got {resolution!r}")


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] images back to the data set's 0..16 grey levels (float, clipped)."""
    return ((x.float() + 1.0) * 8.0).clamp(0.0, 16.0)


def load_digits(
    resolution: int = 8, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[DigitsSplit, DigitsSplit]:
    """Return (train, held_out) splits, stratified by class with a seeded permutation.

    ``resolution`` 16 upsamples bilinearly (align_corners=False) from the native 8x8.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    _check_resolution(resolution)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
    bunch = _sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)) / 8.0 - 1.0
    y = torch.from_numpy(bunch.target.astype(np.int64))
    x = x[:, None]
    if resolution != NATIVE_RESOLUTION:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    rng = np.random.default_rng(seed)
    train_idx, hold_idx = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(bunch.target == c)
        rng.shuffle(idx)
        n_hold = int(round(holdout_fraction * len(idx)))
        hold_idx.append(idx[:n_hold])
        train_idx.append(idx[n_hold:])
    tr = torch.from_numpy(np.sort(np.concatenate(train_idx)))
    ho = torch.from_numpy(np.sort(np.concatenate(hold_idx)))
    return DigitsSplit(x[tr].contiguous(), y[tr]), DigitsSplit(x[ho].contiguous(), y[ho])


def subsample_classes(split: DigitsSplit, rare: Sequence[int], keep: float, seed: int = 0) -> DigitsSplit:
    """A class-imbalanced copy of ``split``: of each class in ``rare`` keep a seeded random ``keep`` fraction of its
    images (rounded, at least one); the other classes stay whole. Notebook 04's image-scale test of mode coverage:
    a teacher trained on it has rare classes that a mode-seeking student may drop."""
    classes = sorted({int(c) for c in rare})
    if not classes or classes[0] < 0 or classes[-1] >= NUM_CLASSES:
        raise ValueError(f"rare must be a non-empty list of classes in [0, {NUM_CLASSES - 1}]; got {list(rare)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1]; got {keep}")
    g = torch.Generator().manual_seed(seed)
    kept = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(split.labels == c).flatten()
        if c in classes and len(idx):
            n = max(1, int(round(keep * len(idx))))
            idx = idx[torch.randperm(len(idx), generator=g)[:n]]
        kept.append(idx)
    order = torch.sort(torch.cat(kept)).values
    return DigitsSplit(split.images[order].contiguous(), split.labels[order].clone())


class BatchSampler:
    """Endless random batches (with replacement across epochs, without within one) from a split.

    Its own ``torch.Generator`` makes the stream reproducible; ``state_dict``/``load_state_dict``
    carry the generator state and the position in the current epoch, so a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(self, split: DigitsSplit, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if batch_size > len(split):
            raise ValueError(f"batch_size {batch_size} exceeds the split size {len(split)}")
        self.split, self.batch_size = split, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._perm = torch.randperm(len(split), generator=self.generator)
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (images, labels) batch."""
        if self._pos + self.batch_size > len(self._perm):
            self._perm = torch.randperm(len(self.split), generator=self.generator)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.split.images[idx], self.split.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self._perm.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"].clone(), int(state["pos"])
