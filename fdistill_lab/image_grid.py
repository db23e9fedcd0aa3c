"""Tile a batch of images into one grid image (our own small replacement for torchvision's make_grid)."""

from __future__ import annotations

import math

import torch


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Arrange ``images`` [N, C, H, W] in rows of ``nrow`` (default ceil(sqrt(N))) with ``padding`` pixels.

    Values are mapped from ``value_range`` to [0, 1] and clipped. Returns [H', W'] for one channel,
    [H', W', C] otherwise, ready for ``plt.imshow`` (``cmap='gray'`` for one channel).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor; got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow}")
    rows = math.ceil(n / nrow)
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0.0, 1.0)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0] if c == 1 else grid.permute(1, 2, 0)
