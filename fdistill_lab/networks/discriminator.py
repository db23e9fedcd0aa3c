"""Discriminator heads on a denoiser's encoder features (paper section 8; FastGen's design).

One head per feature resolution: Conv4x4 stride 2 (+ GroupNorm + SiLU) repeated down to 4x4, then
Conv4x4 stride 4 (+ GroupNorm + SiLU) to 1x1, then a 1x1 conv to one logit. The discriminator returns one
logit per head, [B, H], as FastGen's ``Discriminator_EDM``: the GAN losses apply to each head's logit and are
averaged over the heads, and the ratio comes from the heads' mean logit (:mod:`fdistill_lab.losses`,
:mod:`fdistill_lab.method`). Real images are the positive class, so at the optimum logit = log(p_t / q_t) and
the density ratio is r = exp(logit) (section 4). The heads sit either on the frozen teacher's features
(the authors' public implementation) or on the fake-score network's (DMD2); see ``train/trainer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

FINAL_RESOLUTION = 4


def _groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups, FastGen's rule (``_get_optimal_groups`` in its ``networks/discriminators.py``): above
    ``max_groups`` channels the largest divisor of ``channels`` <= ``max_groups``; up to ``max_groups`` channels
    ``channels // 4`` (at least 1), here lowered to a divisor where FastGen's would not divide (it asserts).
    Every group then has at least 2 channels (if ``channels`` >= 2): after the stride-4 conv the map is 1x1, and
    one channel per group would normalise every value to the bias and make the logit a constant."""
    limit = max_groups if channels > max_groups else max(1, channels // 4)
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int, padding: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 4, stride=stride, padding=padding),
                         nn.GroupNorm(_groups(cout), cout), nn.SiLU())


class DiscriminatorHead(nn.Module):
    """Head for one feature map [B, C, R, R] with R a power of two >= 4; returns logits [B]."""

    def __init__(self, in_channels: int, resolution: int, hidden_channels: int | None = None) -> None:
        super().__init__()
        if resolution < FINAL_RESOLUTION or resolution & (resolution - 1):
            raise ValueError(f"feature resolution must be a power of two >= {FINAL_RESOLUTION}; got {resolution}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1; got {in_channels}")
        hidden = hidden_channels or in_channels
        layers: list[nn.Module] = []
        c, r = in_channels, resolution
        while r > FINAL_RESOLUTION:
            layers.append(_ConvNormAct(c, hidden, stride=2, padding=1))
            c, r = hidden, r // 2
        layers.append(_ConvNormAct(c, hidden, stride=4, padding=0))
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.in_channels, self.resolution = in_channels, resolution
        self.net = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.ndim != 4 or feature.shape[1] != self.in_channels or feature.shape[-1] != self.resolution:
            raise ValueError(f"expected features [B, {self.in_channels}, {self.resolution}, {self.resolution}]; "
                             f"got {tuple(feature.shape)}")
        # NCHW even for channels-last networks: the head is small, and torch 2.13's CPU bf16 convolution of a
        # channels-last input to a 1x1 output (the last 4x4 -> 1x1 layer) returns wrong numbers
        return self.net(feature.contiguous()).flatten(1).mean(1)


class Discriminator(nn.Module):
    """Heads keyed by feature name ('bottleneck', '8x8', ...); ``forward(features)`` returns their logits
    [B, H], one column per head in the order of :attr:`keys` (FastGen's ``Discriminator_EDM``)."""

    def __init__(self, feature_shapes: Mapping[str, Sequence[int]], hidden_channels: int | None = None) -> None:
        super().__init__()
        if not feature_shapes:
            raise ValueError("need at least one feature key for the discriminator")
        self.heads = nn.ModuleDict()
        for key, shape in feature_shapes.items():
            if len(shape) != 3 or shape[1] != shape[2]:
                raise ValueError(f"feature {key!r} must have a square shape (C, R, R); got {tuple(shape)}")
            self.heads[key] = DiscriminatorHead(int(shape[0]), int(shape[1]), hidden_channels)

    @property
    def keys(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.heads if k not in features]
        if missing:
            raise KeyError(f"features lack {missing}; available: {sorted(features)}")
        logits = [head(features[key].float() if features[key].dtype == torch.float64 else features[key])
                  for key, head in self.heads.items()]
        return torch.stack(logits, 1)

    @classmethod
    def for_network(
        cls, net: nn.Module, keys: Sequence[str], hidden_channels: int | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> Discriminator:
        """Build heads for ``keys`` of ``net``'s features, found by one dummy forward pass.

        ``net`` follows the EDMPrecond interface: ``net(x, sigma, class_labels, return_features=True)``.
        """
        res, ch = int(net.img_resolution), int(net.img_channels)
        p = next(net.parameters())
        x = torch.zeros(1, ch, res, res, device=p.device)
        if class_labels is None and hasattr(net, "null_labels"):  # e.g. a text-conditioned network's empty prompt
            class_labels = net.null_labels(1)
        elif class_labels is None and getattr(net, "label_dim", 0):
            class_labels = torch.zeros(1, dtype=torch.long, device=p.device)
        with torch.no_grad():
            _, feats = net(x, torch.ones(1, device=p.device), class_labels, return_features=True)
        unknown = [k for k in keys if k not in feats]
        if unknown or not keys:
            raise ValueError(f"unknown feature key(s) {unknown or list(keys)}; the network provides {sorted(feats)}")
        return cls({k: tuple(feats[k].shape[1:]) for k in keys}, hidden_channels).to(p.device)


__all__ = ["Discriminator", "DiscriminatorHead"]
