"""The parts of a Stable Diffusion pipeline that f-distill uses, and text encoding (CLIP, frozen)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .schedule import VPSchedule


@dataclass
class SDComponents:
    """U-Net (teacher weights), VAE, CLIP text encoder and tokenizer, the noise schedule and the U-Net's
    ``prediction_type``; ``scaling_factor`` maps VAE latents to the U-Net's (0.18215 for SD1.5)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    schedule: VPSchedule
    prediction_type: str = "epsilon"
    scaling_factor: float = 0.18215
    source: str = ""

    def to(self, device: torch.device | str) -> SDComponents:
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        return self

    @property
    def latent_resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along each side (8 for SD1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_resolution(self) -> int:
        return self.latent_resolution * self.vae_factor

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """CLIP last hidden states [B, L, D] (float32) of ``prompts`` padded to the tokenizer's length, as SD1.5's
        pipeline conditions its U-Net."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        device = device or next(self.text_encoder.parameters()).device
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 3, H, W] -> scaled latents [B, 4, H/8, W/8] (the VAE posterior's mean)."""
        p = next(self.vae.parameters())
        lat = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
        return lat.float() * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [-1, 1] images (float32, clamped)."""
        p = next(self.vae.parameters())
        img = self.vae.decode((latents / self.scaling_factor).to(p.device, p.dtype)).sample
        return img.float().clamp(-1, 1)
