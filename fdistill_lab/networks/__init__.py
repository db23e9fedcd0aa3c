"""EDM-compatible networks (own implementation): EDMPrecond with ADM (DhariwalUNet) or DDPM++ (SongUNet), whose
names and shapes equal EDM's so released checkpoints load strictly; and the discriminator heads (``discriminator``).
"""

from .adm import DhariwalUNet
from .ddpmpp import SongUNet
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from .precond import (
    MODEL_TYPES,
    PRECOND_KWARGS,
    EDMPrecond,
    build_edm,
    cifar10_ddpmpp_config,
    count_parameters,
    imagenet64_adm_config,
    tiny_adm_config,
    tiny_ddpmpp_config,
)

__all__ = [
    "EDMPrecond",
    "build_edm",
    "DhariwalUNet",
    "SongUNet",
    "UNetBlock",
    "Conv2d",
    "Linear",
    "GroupNorm",
    "PositionalEmbedding",
    "FourierEmbedding",
    "MODEL_TYPES",
    "PRECOND_KWARGS",
    "imagenet64_adm_config",
    "cifar10_ddpmpp_config",
    "tiny_adm_config",
    "tiny_ddpmpp_config",
    "count_parameters",
]
