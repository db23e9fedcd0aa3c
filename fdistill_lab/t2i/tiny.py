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


def tiny_clip_scorer(seed: int = 0):
    """A randomly initialised small CLIPModel with the tiny tokenizer and a 32-pixel image processor, as a
    :class:`~fdistill_lab.t2i.evaluate.ClipScorer` (smoke runs: its scores mean nothing)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .evaluate import ClipScorer

    tok = tiny_tokenizer()
    eos, bos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(text_config=dict(layers, vocab_size=len(tok), max_position_embeddings=TINY_TOKENS,
                                      eos_token_id=eos, bos_token_id=bos, pad_token_id=eos),
                     vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipScorer(model, tok, proc)


class RandomFeatureDetector(torch.nn.Module):
    """Stand-in for the Inception detector in smoke runs: a fixed random projection of 8x8-pooled pixels to
    ``dim`` features, called as ``detector(uint8 [N, 3, H, W], return_features=True)``. FIDs it gives check the
    pipeline only; they are not comparable with any published FID."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 64, dim, generator=g) / 8)

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 127.5 - 1, 8).flatten(1)
        return torch.tanh(x @ self.proj)


def write_fake_coco(folder: str | Path, n: int = 16, resolution: int = 48, seed: int = 0) -> Path:
    """A COCO-2014-val-shaped folder (``annotations/captions_val2014.json``, ``val2014/*.png``) of synthetic
    captioned images, for tests and the smoke run of the zero-shot FID command."""
    import PIL.Image

    folder = Path(folder)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "val2014").mkdir(exist_ok=True)
    images, captions = synthetic_pairs(n, resolution, seed)
    arr = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    entries, anns = [], []
    for i, (a, cap) in enumerate(zip(arr, captions)):
        name = f"COCO_val2014_{i:012d}.png"
        PIL.Image.fromarray(a, "RGB").save(folder / "val2014" / name)
        entries.append({"id": i, "file_name": name})
        anns.append({"id": 2 * i, "image_id": i, "caption": cap})
        anns.append({"id": 2 * i + 1, "image_id": i, "caption": cap.replace("a ", "one ", 1)})
    (folder / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": entries,
                                                                              "annotations": anns}))
    return folder


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_clip_scorer`'s model, tokenizer and image processor with ``save_pretrained`` into
    ``folder``, the layout :meth:`~fdistill_lab.t2i.evaluate.ClipScorer.from_pretrained` reads."""
    scorer = tiny_clip_scorer(seed)
    for part in (scorer.model, scorer.tokenizer, scorer.image_processor):
        part.save_pretrained(str(folder))
    return Path(folder)


def save_detector(path: str | Path, dim: int = 64, seed: int = 0) -> Path:
    """Write :class:`RandomFeatureDetector` as TorchScript, loadable like the Inception detector file."""
    import warnings

    with warnings.catch_warnings():  # TorchScript is deprecated in torch >= 2.10; the Inception detector is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(RandomFeatureDetector(dim, seed)).save(str(path))
    return Path(path)
