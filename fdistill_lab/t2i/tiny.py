"""Tiny randomly initialised SD-style components built in code, for CPU tests and notebook 06's smoke run.

A small ``UNet2DConditionModel`` (8x8 latents, two levels, cross-attention), ``AutoencoderKL`` (32x32 pixels,
4 latent channels), ``CLIPTextModel`` and a CLIP tokenizer whose vocabulary is the 256 byte symbols (no BPE
merges), all built from configs: nothing is downloaded, and no weights are shipped.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .components import SDComponents
from .schedule import VPSchedule

TINY_TOKENS = 16  # tokenizer length (SD1.5: 77)
TINY_TEXT_DIM = 32


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's byte-level alphabet: printable bytes map to themselves, the others to code points >= 256."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_tokenizer(model_max_length: int = TINY_TOKENS):
    """A ``CLIPTokenizer`` over single byte symbols (each with and without the end-of-word mark) plus CLIP's
    start and end tokens: 514 ids, no merges (every character is a token)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                             model_max_length=model_max_length)


def tiny_components(seed: int = 0, latent_resolution: int = 8) -> SDComponents:
    """Tiny U-Net, VAE, text encoder and tokenizer, initialised from ``seed``, with SD1.5's noise schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent_resolution, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_TEXT_DIM,
            norm_num_groups=8, attention_head_dim=4)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=latent_resolution * 4)
        eos, bos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
        text = CLIPTextModel(CLIPTextConfig(
            hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tok), max_position_embeddings=TINY_TOKENS, eos_token_id=eos, bos_token_id=bos,
            pad_token_id=eos))
    return SDComponents(unet.eval(), vae.eval(), text.eval(), tok, VPSchedule(), "epsilon",
                        float(vae.config.scaling_factor), source="tiny (random, built in code)")


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save the tiny components as a diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``), the
    layout :func:`~fdistill_lab.t2i.loader.load_components` reads."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    c = tiny_components(seed)
    s = c.schedule
    scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                              beta_end=s.beta_end, beta_schedule=s.beta_schedule, clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return Path(folder)


COLOURS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 0.8, -0.8), "blue": (-0.8, -0.8, 1.0), "yellow": (1.0, 1.0, -0.8)}
SHAPES = ("square", "circle")


def synthetic_pairs(n: int, resolution: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``n`` images [n, 3, R, R] in [-1, 1] of a coloured square or disc on grey, captioned "a red circle" etc.:
    text-conditional data whose captions say something checkable about the image (smoke runs and tests)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    images, captions = torch.zeros(n, 3, resolution, resolution), []
    names = list(COLOURS)
    for i in range(n):
        colour = names[int(torch.randint(len(names), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        r = resolution * (0.2 + 0.15 * float(torch.rand((), generator=g)))
        cy, cx = (resolution * (0.3 + 0.4 * torch.rand(2, generator=g))).tolist()
        if shape == "square":
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = torch.full((3, resolution, resolution), -0.2)
        img[:, mask] = torch.tensor(COLOURS[colour]).unsqueeze(1)
        images[i] = img
        captions.append(f"a {colour} {shape}")
    return images, captions
