"""Load a user-downloaded Stable Diffusion 1.5 pipeline (diffusers layout) from a folder or the Hugging Face
cache, offline (``local_files_only``): nothing is ever downloaded here, and the package ships no weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .components import SDComponents
from .schedule import VPSchedule

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DOWNLOAD_HINT = (f"download it once with `hf download {SD15_REPO} --include 'model_index.json' 'unet/*' 'vae/*' "
                 "'text_encoder/*' 'tokenizer/*' 'scheduler/*' --exclude '*.bin' '*.ckpt' --local-dir <folder>` "
                 f"(https://huggingface.co/{SD15_REPO}; accept its licence first) and pass that folder")
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}


def missing_files(folder: str | Path) -> list[str]:
    """What a pipeline folder lacks (relative paths; [] if complete): model_index.json, each part's config and
    weights, the tokenizer (tokenizer.json, or vocab.json + merges.txt) and the scheduler's config."""
    root = Path(folder)
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for part, names in WEIGHTS.items():
        if not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
        if not any((root / part / n).is_file() for n in names):
            missing.append(f"{part}/{names[0]}")
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    return missing


def resolve_pipeline(source: str | Path) -> Path:
    """A pipeline folder: ``source`` itself if it is a folder, else a Hugging Face repo id looked up in the local
    cache only. FileNotFoundError naming what to download when neither holds a complete pipeline."""
    path = Path(source).expanduser()
    if not path.exists():
        if "/" in str(source) and not str(source).startswith((".", "/", "~")):
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(source), local_files_only=True))
            except Exception as exc:  # LocalEntryNotFoundError and kin: not in the cache
                raise FileNotFoundError(f"{source!r} is neither a folder nor a model in the local Hugging Face cache "
                                        f"({type(exc).__name__}); {DOWNLOAD_HINT}") from None
        else:
            raise FileNotFoundError(f"pipeline folder {path} does not exist; {DOWNLOAD_HINT}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the pipeline folder (with model_index.json); "
                                 f"{DOWNLOAD_HINT}")
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(f"{path} is not a complete Stable Diffusion pipeline folder: missing "
                                f"{', '.join(missing)}; {DOWNLOAD_HINT}")
    return path


def schedule_from_config(path: str | Path) -> VPSchedule:
    """The :class:`VPSchedule` of a ``scheduler_config.json`` (any diffusers DDPM-family scheduler)."""
    cfg = json.loads(Path(path).read_text())
    if cfg.get("trained_betas"):
        raise ValueError(f"{path}: schedules with trained_betas are not supported; valid: beta_schedule "
                         "'scaled_linear' or 'linear'")
    return VPSchedule(float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02)),
                      cfg.get("beta_schedule", "linear"), int(cfg.get("num_train_timesteps", 1000)))


def load_components(source: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> SDComponents:
    """U-Net, VAE, CLIP text encoder, tokenizer and noise schedule of a SD pipeline folder or cached repo id,
    loaded with ``local_files_only=True`` (see :func:`resolve_pipeline` for the errors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_pipeline(source)

    def variant(part: str) -> str | None:
        plain = [n for n in WEIGHTS[part] if ".fp16." not in n]
        return None if any((root / part / n).is_file() for n in plain) else "fp16"

    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant=variant("unet"), **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", variant=variant("vae"), **kw)
    text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", variant=variant("text_encoder"),
                                         local_files_only=True, dtype=dtype)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    schedule = schedule_from_config(root / "scheduler" / "scheduler_config.json")
    pred = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type", "epsilon")
    comps = SDComponents(unet.eval(), vae.eval(), text.eval(), tok, schedule, pred,
                         float(getattr(vae.config, "scaling_factor", 0.18215)), source=str(root))
    return comps.to(device)
