"""The text-to-image f-distill trainer: the image trainer (:class:`~fdistill_lab.train.trainer.FDistillTrainer`,
the same objectives, schedule, mixed precision, DDP, EMA and checkpoints) on SD latents and CLIP text embeddings.

Student and fake score start as copies of the teacher U-Net (section 9); the frozen teacher gives the CFG-guided
target (Table 5: w = 1.75); the discriminator heads read U-Net features (``disc_features``, default the mid block;
``disc_placement`` teacher or fake score). Noise times are uniform in [t_min, t_max] of SD's schedule (FastGen).
Batches are (latents [B, 4, h, w], text embeddings [B, L, D]); :mod:`.data` makes them from image-caption pairs.
"""

from __future__ import annotations

import copy

import torch

from ..train.trainer import FDistillTrainer
from .components import SDComponents
from .config import T2IConfig
from .denoiser import GuidedDenoiser, SDDenoiser


class T2ITrainer(FDistillTrainer):
    """f-distill of the SD U-Net in ``components`` into a one-step student (rank ``rank`` of ``world_size``)."""

    def __init__(self, components: SDComponents, config: T2IConfig | None = None,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 rng_mode: str = "shared") -> None:
        cfg = config if config is not None else T2IConfig()
        if not isinstance(cfg, T2IConfig):
            raise TypeError(f"config must be a T2IConfig; got {type(cfg).__name__}")
        if cfg.noise_schedule != components.schedule:
            raise ValueError(f"the config's noise schedule {cfg.noise_schedule} is not the pipeline's "
                             f"{components.schedule}; set beta_start, beta_end, beta_schedule and num_train_timesteps "
                             "to the pipeline's (scheduler/scheduler_config.json)")
        if cfg.prediction_type != components.prediction_type:
            raise ValueError(f"prediction_type {cfg.prediction_type!r} but the pipeline's U-Net predicts "
                             f"{components.prediction_type!r}; set prediction_type={components.prediction_type!r}")
        device = torch.device(device) if device is not None else next(components.unet.parameters()).device
        components.to(device)
        null = components.encode_text([""], device)[0]
        base = SDDenoiser(components.unet, components.schedule, null, components.prediction_type)
        student, fake = copy.deepcopy(base), copy.deepcopy(base)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        self.components = components
        super().__init__(GuidedDenoiser(base, cfg.guidance_scale), cfg, device, rank, world_size, rng_mode,
                         student=student, fake_score=fake)

    def draw_sigma(self, n: int, critic: bool) -> torch.Tensor:
        """sigma(t), t ~ U[t_min, t_max] (generator) or U[fake_t_min, fake_t_max] (critic), float32."""
        cfg = self.config
        lo, hi = (cfg.fake_t_min, cfg.fake_t_max) if critic else (cfg.t_min, cfg.t_max)
        t = self.rng.uniform(n, lo, hi)
        return cfg.noise_schedule.sigma_at(t).to(self.device, torch.float32)

    @torch.no_grad()
    def generate(self, prompts: list[str], z: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 use_ema: bool = True, decode: bool = True) -> torch.Tensor:
        """One-step images [N, 3, H, W] in [-1, 1] (or latents if not ``decode``) for ``prompts``."""
        emb = self.components.encode_text(prompts, self.device)
        lat = self.sample(labels=emb, z=z, use_ema=use_ema, generator=generator) if z is not None or \
            generator is not None else self.sample(n=len(prompts), labels=emb, use_ema=use_ema)
        return self.components.decode_latents(lat) if decode else lat
