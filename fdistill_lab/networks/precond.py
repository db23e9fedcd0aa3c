"""EDM preconditioner around a U-Net backbone, model factory and the released configurations.

D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) (Karras et al. 2022, Table 1; coefficients from
:func:`fdistill_lab.edm.precond`). Constructor keywords equal EDM's ``EDMPrecond`` so that recorded
``_init_kwargs`` from a checkpoint rebuild the same network.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..edm import SIGMA_DATA, as_sigma, precond
from .adm import DhariwalUNet
from .ddpmpp import SongUNet
from .layers import check_decoder_mode

__all__ = [
    "EDMPrecond",
    "build_edm",
    "MODEL_TYPES",
    "PRECOND_KWARGS",
    "imagenet64_adm_config",
    "cifar10_ddpmpp_config",
    "tiny_adm_config",
    "tiny_ddpmpp_config",
]

MODEL_TYPES: dict[str, type[nn.Module]] = {"DhariwalUNet": DhariwalUNet, "SongUNet": SongUNet}
MODEL_ALIASES = {"adm": "DhariwalUNet", "ddpmpp": "SongUNet", "dhariwalunet": "DhariwalUNet",
                 "songunet": "SongUNet"}
PRECOND_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                  "sigma_data")
_BACKBONE_RESERVED = ("self", "img_resolution", "in_channels", "out_channels", "label_dim")


def _canonical_model_type(model_type: str) -> str:
    if model_type in MODEL_TYPES:
        return model_type
    key = MODEL_ALIASES.get(str(model_type).lower())
    if key is None:
        valid = sorted(MODEL_TYPES) + sorted(k for k in MODEL_ALIASES if k in ("adm", "ddpmpp"))
        raise ValueError(f"unknown model_type {model_type!r}; valid: {', '.join(valid)}")
    return key


def _backbone_kwarg_names(model_type: str) -> list[str]:
    sig = inspect.signature(MODEL_TYPES[model_type].__init__)
    return [n for n in sig.parameters if n not in _BACKBONE_RESERVED]


class EDMPrecond(nn.Module):
    """EDM-preconditioned denoiser returning the x0-prediction D(x; sigma, y).

    Attributes ``img_resolution``, ``img_channels``, ``label_dim``, ``sigma_data`` and the backbone
    ``model`` (state_dict names ``model.enc.64x64_conv.weight`` ... as in EDM). ``use_fp16`` is kept for
    reference only: precision is chosen by the caller (float32 by default, float64 if x is float64,
    bf16/fp16 through ``torch.autocast``). ``init_kwargs`` records the constructor keywords.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = SIGMA_DATA,
        model_type: str = "DhariwalUNet",
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        model_type = _canonical_model_type(model_type)
        valid = _backbone_kwarg_names(model_type)
        unknown = sorted(set(model_kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown keyword(s) {unknown} for {model_type}; valid: {', '.join(list(PRECOND_KWARGS) + valid)}"
            )
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = float(sigma_data)
        self.model_type = model_type
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                sigma_data=sigma_data, model_type=model_type, **model_kwargs)
        self.model = MODEL_TYPES[model_type](img_resolution=self.img_resolution, in_channels=self.img_channels,
                                             out_channels=self.img_channels, label_dim=self.label_dim,
                                             **model_kwargs)

    def _labels(self, class_labels: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], dtype=like.dtype, device=like.device)
        if torch.is_floating_point(class_labels) or (class_labels.ndim == 2 and class_labels.shape[1] == self.label_dim
                                                     and self.label_dim > 1):  # one-hot rows (float or integer)
            labels = class_labels.to(like.dtype).reshape(-1, self.label_dim)
        else:  # integer class indices -> one-hot
            labels = F.one_hot(class_labels.reshape(-1).long(), self.label_dim).to(like.dtype)
        if labels.shape[0] not in (1, batch):
            raise ValueError(f"class_labels give {labels.shape[0]} labels for a batch of {batch} (expected one-hot "
                             f"[B, {self.label_dim}] or indices [B])")
        return labels

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        return_features: bool = False,
        decoder: str = "grad",
    ) -> torch.Tensor | tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Denoise ``x`` [B,C,H,W] at noise level ``sigma`` (scalar or [B]).

        ``class_labels``: one-hot float [B, label_dim] or integer indices [B]; None gives zeros (EDM).
        Returns x0 in x's dtype, or ``(x0, features)`` with ``features`` = {'bottleneck', '32x32', ...}:
        the outputs of the last encoder block at each resolution (raw backbone activations).
        ``decoder`` (with ``return_features``) saves work when only the features matter: "no_grad" computes
        x0 without autograd (the features keep their graph; no decoder activations are stored), "skip" runs
        the encoder alone and returns ``(None, features)``. The features are the same in every mode.
        """
        check_decoder_mode(decoder)
        if decoder != "grad" and not return_features:
            raise ValueError(f"decoder={decoder!r} needs return_features=True (it only saves work on features)")
        out_dtype = x.dtype
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = precond(sigma, self.sigma_data)
        labels = self._labels(class_labels, x.shape[0], x)
        aug = augment_labels.to(dt) if augment_labels is not None else None
        features: dict[str, torch.Tensor] | None = {} if return_features else None
        f_x = self.model(c_in * x, c_noise.flatten(), class_labels=labels, augment_labels=aug,
                         features=features, decoder=decoder)
        if f_x is None:
            return None, features
        with torch.set_grad_enabled(torch.is_grad_enabled() and decoder == "grad"):
            d_x = (c_skip * x + c_out * f_x.to(dt)).to(out_dtype)
        return (d_x, features) if return_features else d_x

    def extra_repr(self) -> str:
        return f"model_type={self.model_type}, img_resolution={self.img_resolution}, label_dim={self.label_dim}"


def build_edm(model_type: str, **edm_kwargs: Any) -> EDMPrecond:
    """Build an :class:`EDMPrecond` from EDM's constructor keywords.

    ``model_type``: 'DhariwalUNet' (alias 'adm') or 'SongUNet' (alias 'ddpmpp'). Unknown types or
    keywords raise ValueError listing the valid ones. Example: ``build_edm(**imagenet64_adm_config())``.
    """
    model_type = _canonical_model_type(model_type)
    valid = list(PRECOND_KWARGS) + _backbone_kwarg_names(model_type)
    unknown = sorted(set(edm_kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown keyword(s) {unknown} for {model_type}; valid: {', '.join(valid)}")
    for req in ("img_resolution", "img_channels"):
        if req not in edm_kwargs:
            raise ValueError(f"build_edm needs {req}")
    return EDMPrecond(model_type=model_type, **edm_kwargs)


def imagenet64_adm_config() -> dict[str, Any]:
    """Keywords of ``edm-imagenet-64x64-cond-adm.pkl`` (EDM train.py --arch=adm --cond=1), dropout 0.1."""
    return dict(model_type="DhariwalUNet", img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1)


def cifar10_ddpmpp_config(cond: bool = True) -> dict[str, Any]:
    """Keywords of ``edm-cifar10-32x32-{cond,uncond}-vp.pkl`` (EDM train.py --arch=ddpmpp)."""
    return dict(model_type="SongUNet", img_resolution=32, img_channels=3, label_dim=10 if cond else 0,
                use_fp16=False, embedding_type="positional", encoder_type="standard", decoder_type="standard",
                channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                augment_dim=9, dropout=0.13)


def tiny_adm_config(img_resolution: int = 16, label_dim: int = 10, img_channels: int = 3,
                    model_channels: int = 32, **overrides: Any) -> dict[str, Any]:
    """Small ADM for CPU tests (the ``adm_tiny.pt`` fixture's configuration at the defaults): two levels,
    64 channels and 1 attention head at the lower resolution, dropout 0."""
    cfg = dict(model_type="DhariwalUNet", img_resolution=img_resolution, img_channels=img_channels,
               label_dim=label_dim, use_fp16=False, sigma_data=0.5, augment_dim=0,
               model_channels=model_channels, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=1,
               attn_resolutions=[img_resolution // 2], dropout=0.0)
    cfg.update(overrides)
    return cfg


def tiny_ddpmpp_config(img_resolution: int = 16, label_dim: int = 10, img_channels: int = 3,
                       **overrides: Any) -> dict[str, Any]:
    """Small DDPM++ for CPU tests (the ``ddpmpp_tiny.pt`` fixture's configuration at the defaults)."""
    cfg = dict(model_type="SongUNet", img_resolution=img_resolution, img_channels=img_channels,
               label_dim=label_dim, use_fp16=False, sigma_data=0.5, embedding_type="positional",
               encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=16, channel_mult=[1, 2], augment_dim=9, num_blocks=2,
               attn_resolutions=[img_resolution // 2], dropout=0.0)
    cfg.update(overrides)
    return cfg


def count_parameters(net: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(math.prod(p.shape) for p in net.parameters())
