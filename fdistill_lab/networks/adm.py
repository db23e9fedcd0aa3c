"""ADM U-Net (Dhariwal & Nichol 2021) as configured by EDM: ``DhariwalUNet``, the ImageNet-64 teacher.

Written from EDM's network appendix and its checkpoints' parameter names (order, widths); no EDM code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, check_decoder_mode

__all__ = ["DhariwalUNet", "run_encoder"]


def run_encoder(
    enc: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor, features: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the plain (non-aux) encoder blocks, returning the output and the skip stack.

    When ``features`` is a dict it is filled with the output of the last encoder block of each
    resolution (key ``'32x32'`` etc.) and ``'bottleneck'`` (last block at the lowest resolution).
    """
    skips = []
    for name, block in enc.items():
        x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        skips.append(x)
        if features is not None:
            features[name.split("_")[0]] = x
    if features is not None:
        features["bottleneck"] = x
    return x, skips


class DhariwalUNet(nn.Module):
    """ADM backbone F(x, c_noise, labels): positional noise embedding, label embedding after the mapping
    MLP (Linear without bias), encoder/decoder of ``UNetBlock`` with adaptive scale/shift, attention with
    64 channels per head at ``attn_resolutions``. Constructor arguments and defaults follow EDM."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
        decoder: str = "grad",
    ) -> torch.Tensor | None:
        """``decoder`` (see :data:`DECODER_MODES`): "grad" as usual, "no_grad" runs the decoder without autograd
        (features keep their graph), "skip" stops after the encoder and returns None (features only)."""
        check_decoder_mode(decoder)
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels")
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                tmp = tmp * keep.to(tmp.dtype)
            emb = emb + self.map_label(tmp)
        emb = F.silu(emb)

        x, skips = run_encoder(self.enc, x, emb, features)
        if decoder == "skip":
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and decoder == "grad"):
            for block in self.dec.values():
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
            return self.out_conv(self.out_norm.norm_act(x))
