"""A diffusers SD U-Net behind the EDM denoiser interface that the image trainer and ``fdistill_lab.method`` use.

:class:`SDDenoiser` turns ``unet(x_vp, timestep, text)`` (epsilon- or v-prediction) into EDM's
``net(x, sigma, class_labels, return_features) -> x0`` with x = x0 + sigma eps (:mod:`.schedule`); the "class
labels" are CLIP text embeddings [B, L, D]. Features for the discriminator (section 8) are the outputs of the
U-Net's down blocks (``down0`` ...) and of its mid block (``mid``: 1280 x 8 x 8 for SD1.5 at 64x64 latents, the
paper's Table 5 choice). :class:`GuidedDenoiser` wraps the frozen teacher with classifier-free guidance, the
distillation target x0 = x0_uncond + w (x0_cond - x0_uncond) with w = 1.75 (Table 5).
"""

from __future__ import annotations

import torch
from torch import nn

from .schedule import VPSchedule, timestep_from_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction")
DECODER_MODES = ("grad", "no_grad", "skip")


class SDDenoiser(nn.Module):
    """EDM-interface wrapper of a ``UNet2DConditionModel`` (its weights are this module's ``unet.*``).

    ``null_embedding`` [L, D]: the empty prompt's text embedding, used where no text is given (``class_labels``
    None) and as the unconditional branch of guidance. Attributes ``img_resolution`` (latent size),
    ``img_channels`` (latent channels) and ``label_dim`` follow EDMPrecond's.
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, null_embedding: torch.Tensor,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if null_embedding.ndim != 2:
            raise ValueError(f"null_embedding must be [tokens, dim]; got shape {tuple(null_embedding.shape)}")
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type
        self.img_resolution = int(unet.config.sample_size)
        self.img_channels = int(unet.config.in_channels)
        self.label_dim = int(null_embedding.shape[-1])  # > 0: conditional (labels are text embeddings)
        self.register_buffer("log_sigmas", schedule.log_sigmas(), persistent=False)
        self.register_buffer("null_embedding", null_embedding.detach().float().clone(), persistent=False)

    def _blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"down{i}", b) for i, b in enumerate(self.unet.down_blocks)] + [("mid", self.unet.mid_block)]

    def null_labels(self, n: int) -> torch.Tensor:
        """The empty prompt's embedding for ``n`` samples [n, L, D]."""
        return self.null_embedding.unsqueeze(0).expand(n, -1, -1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the U-Net's block activations in the backward pass (diffusers' checkpointing)."""
        self.unet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_features: bool = False, features_only: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """x0 [B, C, H, W] in float32 (and the feature maps if ``return_features``) of x = x0 + sigma eps. With
        ``features_only`` the U-Net stops after its mid block (the decoder's work is skipped) and x0 is None."""
        b = x.shape[0]
        sigma = sigma.float().reshape(-1).expand(b) if sigma.numel() == 1 else sigma.float().reshape(b)
        text = self.null_labels(b) if class_labels is None else class_labels
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.label_dim:
            raise ValueError(f"class_labels must be text embeddings [B={b}, tokens, {self.label_dim}]; "
                             f"got shape {tuple(text.shape)}")
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = (1.0 + s * s).rsqrt()  # sqrt(a_bar): x_vp = sqrt(a_bar) x
        tau = timestep_from_sigma(sigma, self.log_sigmas).float()
        feats: dict[str, torch.Tensor] = {}
        # hooks live for one call only (a deep copy of this module, the student, must not write into our dict)
        handles = [block.register_forward_hook(_capture(feats, key, stop=features_only and key == "mid"))
                   for key, block in self._blocks()] if return_features or features_only else []
        try:
            dtype = self.unet.dtype
            out = self.unet((x.float() * c_in).to(dtype), tau, encoder_hidden_states=text.to(dtype)).sample.float()
        except _FeaturesDone:
            return None, feats
        finally:
            for h in handles:
                h.remove()
        if features_only:
            raise RuntimeError("the U-Net did not run its mid block; features_only needs a UNet2DConditionModel")
        x = x.float()
        if self.prediction_type == "epsilon":
            x0 = x - s * out
        else:  # v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0_vp, with sqrt(1 - a_bar) = sigma sqrt(a_bar)
            x0 = c_in * (c_in * x) - s * c_in * out
        return (x0, feats) if return_features else x0


class _FeaturesDone(Exception):
    """Raised by the mid block's hook to end a features-only forward pass early."""


def _capture(store: dict[str, torch.Tensor], key: str, stop: bool = False):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        store[key] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _FeaturesDone
    return hook


class GuidedDenoiser(nn.Module):
    """The frozen teacher with classifier-free guidance (the distillation target of section 6, Table 5's CFG
    weight): x0 = x0(empty prompt) + ``scale`` (x0(text) - x0(empty prompt)); features come from the text pass.

    ``decoder`` (as EDMPrecond's, which the trainer passes to networks that set ``decoder_modes``): "grad" runs
    both branches in one batched call, "no_grad" keeps a graph only through the text branch (its features feed the
    generator's GAN loss; x0 is used detached), "skip" runs the text branch's encoder and mid block only (the
    discriminator's input) and returns x0 None.
    """

    decoder_modes = True

    def __init__(self, net: SDDenoiser, scale: float = 1.75) -> None:
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 1.0:
            raise ValueError(f"guidance scale must be a number >= 1 (1 = no guidance); got {scale!r}")
        self.net, self.scale = net, float(scale)
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim

    def null_labels(self, n: int) -> torch.Tensor:
        return self.net.null_labels(n)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_features: bool = False, decoder: str = "grad"):
        if decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}; got {decoder!r}")
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(b)
        text = self.net.null_labels(b) if class_labels is None else class_labels
        if decoder == "skip":  # the features only: the U-Net stops after its mid block
            _, feats = self.net(x, sigma, text, features_only=True)
            return (None, feats) if return_features else None
        if self.scale == 1.0:
            return self.net(x, sigma, text, return_features=return_features)
        if decoder == "grad":
            both, feats = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                   torch.cat([text, self.net.null_labels(b).to(text.dtype)]), return_features=True)
            x0_c, x0_u = both.split(b)
            feats = {k: v[:b] for k, v in feats.items()}
        else:
            x0_c, feats = self.net(x, sigma, text, return_features=True)
            with torch.no_grad():
                x0_u = self.net(x, sigma, self.net.null_labels(b).to(text.dtype))
            x0_c = x0_c.detach()
        x0 = x0_u + self.scale * (x0_c - x0_u)
        return (x0, feats) if return_features else x0
