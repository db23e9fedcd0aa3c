"""Evaluation of a one-step text-to-image student as in the paper's Table 4: zero-shot FID on MS-COCO captions
(30k; reference statistics from the user's COCO folder), CLIP score, fixed-prompt grids and latency per image
(one step against the teacher's 50).

FID uses the image trainer's Inception code (:mod:`fdistill_lab.train.fid`: the TorchScript detector, float64
statistics, ``scipy`` Frechet distance). CLIP score is the cosine similarity of CLIP's image and text embeddings
(transformers' ``CLIPModel`` with user-downloaded weights, e.g. ``openai/clip-vit-large-patch14``), averaged over
images (the paper's 0.29-0.31 scale, without the x100 some libraries apply). The teacher sampler is deterministic
DDIM (Euler in EDM variables) with classifier-free guidance.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..train.fid import FeatureStats, detector_features, frechet_distance, quantize_images, save_reference_stats
from .components import SDComponents
from .data import load_image
from .denoiser import GuidedDenoiser, SDDenoiser

COCO_CAPTIONS = "annotations/captions_val2014.json"
COCO_IMAGES = "val2014"
COCO_HINT = ("MS-COCO 2014 validation: images http://images.cocodataset.org/zips/val2014.zip and captions "
             "http://images.cocodataset.org/annotations/annotations_trainval2014.zip, unpacked into one folder "
             f"(<coco>/{COCO_IMAGES}/*.jpg and <coco>/{COCO_CAPTIONS})")


# ------------------------------------------------------------------ sampling


@torch.no_grad()
def teacher_sample(components: SDComponents, prompts: Sequence[str], steps: int = 50, guidance: float = 3.0,
                   z: torch.Tensor | None = None, seed: int = 0, decode: bool = True) -> torch.Tensor:
    """The teacher's images by deterministic DDIM with ``steps`` U-Net evaluations per branch and CFG weight
    ``guidance`` (Table 4's teacher row: 50 steps, CFG 3): x <- x0 + (sigma_next / sigma) (x - x0) in EDM
    variables, from timestep N-1 down to 0 evenly spaced, then x0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    device = next(components.unet.parameters()).device
    net = GuidedDenoiser(SDDenoiser(components.unet, components.schedule,
                                    components.encode_text([""], device)[0], components.prediction_type), guidance)
    emb = components.encode_text(list(prompts), device)
    n, r = emb.shape[0], components.latent_resolution
    if z is None:
        z = torch.randn(n, components.unet.config.in_channels, r, r, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    sigmas = components.schedule.sigma_at(t).tolist() + [0.0]
    x = z.to(device).float() * (1 + sigmas[0] ** 2) ** 0.5  # x_vp ~ N(0, I) at the last timestep
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = net(x, torch.full((n,), s, device=device), emb)
        x = x0 + (s_next / s) * (x - x0)
    return components.decode_latents(x) if decode else x


def latency(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------ CLIP score


class ClipScorer:
    """CLIP score = mean cosine similarity of CLIP image and text embeddings, through transformers' CLIPModel
    and its own tokenizer and image processor (:meth:`from_pretrained` reads a user-downloaded folder offline)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any) -> None:
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor

    @classmethod
    def from_pretrained(cls, source: str | Path, device: torch.device | str = "cpu") -> ClipScorer:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(source, local_files_only=True).to(device)
            tok = CLIPTokenizer.from_pretrained(source, local_files_only=True)
            proc = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(
                f"no CLIP model at {source!r} ({str(exc).splitlines()[0][:200]}); download one once, e.g. `hf download "
                "openai/clip-vit-large-patch14 --local-dir <folder>`, and pass that folder") from None
        return cls(model, tok, proc)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image cosine similarity [N] of [-1, 1] images [N, 3, H, W] with their prompts."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        arr = list(quantize_images(images.cpu()).permute(0, 2, 3, 1).numpy())
        pix = self.image_processor(images=arr, return_tensors="pt")["pixel_values"].to(device)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        img = _as_tensor(self.model.get_image_features(pixel_values=pix))
        txt = _as_tensor(self.model.get_text_features(input_ids=ids.input_ids.to(device),
                                                      attention_mask=ids.attention_mask.to(device)))
        return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu()


def _as_tensor(out: Any) -> torch.Tensor:
    """Features from ``get_*_features`` (a tensor, or a model output holding the pooled projection)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


# ------------------------------------------------------------------ MS-COCO zero-shot FID


def coco_prompts(coco: str | Path, n: int = 30_000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` (image file, caption) pairs of COCO 2014 val, one random caption per image, images drawn without
    replacement with ``seed`` (the zero-shot protocol Table 4 follows: 30k captions). FileNotFoundError naming
    what to download if the folder lacks the captions."""
    coco = Path(coco)
    ann = coco / COCO_CAPTIONS
    if not ann.is_file():
        raise FileNotFoundError(f"{ann} not found; {COCO_HINT}")
    data = json.loads(ann.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    ids = sorted(by_image)
    if n > len(ids):
        raise ValueError(f"asked for {n} captions but {ann} has {len(ids)} images")
    rng = random.Random(seed)
    chosen = rng.sample(ids, n)
    return [{"file": files[i], "caption": rng.choice(sorted(by_image[i]))} for i in chosen]


def coco_reference(coco: str | Path, out: str | Path, detector: Callable[..., torch.Tensor], n: int = 30_000,
                   resolution: int = 512, seed: int = 0, batch_size: int = 64, device: str = "cpu",
                   progress: bool = False) -> Path:
    """Inception statistics of the ``n`` COCO images :func:`coco_prompts` picks (centre-cropped and resized to
    ``resolution``), written to ``out`` (.npz, EDM's format) with the captions beside it (``<out>.prompts.json``),
    which :func:`evaluate_fid` then generates from."""
    from tqdm.auto import tqdm

    pairs = coco_prompts(coco, n, seed)
    folder = Path(coco) / COCO_IMAGES
    stats: FeatureStats | None = None  # sized by the detector's first output (Inception: 2048)
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc="COCO reference"):
        chunk = pairs[i:i + batch_size]
        missing = [p["file"] for p in chunk if not (folder / p["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder / missing[0]} not found ({len(missing)} of this batch); {COCO_HINT}")
        imgs = torch.stack([load_image(folder / p["file"], resolution) for p in chunk])
        feats = _features(detector, imgs, device)
        stats = stats or FeatureStats(feats.shape[1], device)
        stats.update(feats)
    mu, sigma = stats.mean_cov()
    out = save_reference_stats(out, mu, sigma)
    prompts_path(out).write_text(json.dumps({"seed": seed, "resolution": resolution, "pairs": pairs}))
    return out


def prompts_path(ref: str | Path) -> Path:
    return Path(str(ref) + ".prompts.json")


def _features(detector: Callable[..., torch.Tensor], images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return detector_features(detector, quantize_images(images).to(device))


@torch.no_grad()
def evaluate_fid(generate: Callable[[list[str], int], torch.Tensor], detector: Callable[..., torch.Tensor],
                 ref: str | Path, n: int | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
                 clip: ClipScorer | None = None, progress: bool = False, rank: int = 0,
                 world_size: int = 1) -> dict[str, float]:
    """FID (and CLIP score with ``clip``) of ``generate(prompts, first_index) -> [-1, 1] images`` on the first
    ``n`` captions (all by default) recorded beside the reference statistics ``ref``. Under torch.distributed,
    rank r of ``world_size`` generates batches r, r + W, ... and the statistics are summed over ranks (float64), so
    the result does not depend on the number of ranks (image i always comes from caption i and seed i)."""
    from tqdm.auto import tqdm

    from ..train.fid import load_reference_stats

    mu_r, sigma_r = load_reference_stats(ref)
    p = prompts_path(ref)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: compute the reference with `python -m fdistill_lab.t2i coco-ref`, "
                                "which writes the captions beside the statistics")
    prompts = [q["caption"] for q in json.loads(p.read_text())["pairs"]][:n]
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts for FID; got {len(prompts)}")
    stats = FeatureStats(mu_r.shape[0], device)
    clip_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of scores, count)
    starts = list(range(0, len(prompts), batch_size))[rank::world_size]
    for i in tqdm(starts, disable=not progress, desc="zero-shot FID"):
        chunk = prompts[i:i + batch_size]
        imgs = generate(chunk, i)
        stats.update(_features(detector, imgs, device))
        if clip is not None:
            s = clip(imgs, chunk).double()
            clip_sum += torch.stack([s.sum(), torch.tensor(float(s.numel()), dtype=torch.float64)]).to(device)
    stats.all_reduce()
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(clip_sum)
    mu, sigma = stats.mean_cov()
    out = {"fid": frechet_distance(mu, sigma, mu_r, sigma_r), "images": len(prompts)}
    if clip is not None:
        out["clip_score"] = float(clip_sum[0] / clip_sum[1])
    return out


def student_generator(trainer: Any, seed: int = 0) -> Callable[[list[str], int], torch.Tensor]:
    """``generate`` for :func:`evaluate_fid` from a trainer's EMA student: image i's latent from seed + i."""
    from ..train.fid import latents_from_seeds

    r, c = trainer.teacher.img_resolution, trainer.teacher.img_channels

    def generate(prompts: list[str], first: int) -> torch.Tensor:
        z = latents_from_seeds(range(seed + first, seed + first + len(prompts)), (c, r, r))
        return trainer.generate(prompts, z=z)
    return generate


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    from ..files import write_json_atomic

    write_json_atomic(path, results)
    return Path(path)
