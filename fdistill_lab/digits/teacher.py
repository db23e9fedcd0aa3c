"""Train a small EDM teacher (EDM loss, Karras et al. 2022 section 5) and cache it by configuration.

The cache file ``<cache_dir>/teacher_<hash>.pt`` is keyed by a hash of the configuration and a
fingerprint of the training data. A cache that cannot be read raises ``TeacherCacheError`` naming the
file and the fix (delete it, or retrain); it is never silently used or silently replaced. A cache
of another configuration is reported with the settings that differ.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..edm import loss_weight, sample_sigma_lognormal
from ..files import CheckpointError, atomic_save, load_file

CACHE_FORMAT = "fdistill-teacher-v1"


class TeacherCacheError(RuntimeError):
    """A cached teacher that is unreadable or belongs to another configuration."""


@dataclass
class TeacherConfig:
    """Teacher network (``build_edm`` keywords) and EDM training settings.

    EDM loss: ln sigma ~ N(p_mean, p_std^2), weight lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2.
    Adam with a linear learning-rate warm-up; the returned teacher is the EMA of the weights, with rate
    min(ema_beta, (1 + step) / (10 + step)) so that short runs do not keep the random initialisation.
    """

    net: dict[str, Any] = field(default_factory=dict)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_beta: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.net, dict) or "model_type" not in self.net:
            raise ValueError("TeacherConfig.net must be a dict of build_edm keywords including 'model_type'")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1); got {self.ema_beta}")
        if not self.p_std > 0:
            raise ValueError(f"p_std must be > 0; got {self.p_std}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """Short SHA-256 of the training tensors (shape, dtype and values)."""
    h = hashlib.sha256()
    for t in (images, labels):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(config: TeacherConfig, fingerprint: str) -> str:
    blob = json.dumps({"config": config.to_dict(), "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def edm_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """EDM training loss: mean of lambda(sigma) * (D(y + sigma n; sigma, labels) - y)^2."""
    s = sigma.view(-1, 1, 1, 1).to(images.dtype)
    x0 = net(images + s * noise, s.flatten(), labels)
    sd = float(getattr(net, "sigma_data", 0.5))
    return (loss_weight(s, sd) * (x0 - images) ** 2).mean()


def train_teacher(
    config: TeacherConfig, images: torch.Tensor, labels: torch.Tensor | None = None, progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``build_edm(**config.net)`` with the EDM loss; return (EMA teacher in eval mode, info).

    ``info`` has ``loss`` (per-step history), ``train_time_s`` (wall clock), ``train_cpu_s`` (CPU time of
    this process: on a shared machine with one thread, the better estimate of the unloaded wall time) and
    ``steps``.
    """
    from tqdm.auto import tqdm

    from ..networks import build_edm

    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(images.shape)}")
    if config.batch_size > images.shape[0]:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {images.shape[0]} training images")
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # network initialisation
    net = build_edm(**config.net).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="teacher (EDM loss)", disable=not progress)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=g)
        y = labels[idx] if labels is not None else None
        sigma = sample_sigma_lognormal(config.batch_size, config.p_mean, config.p_std, generator=g).float()
        noise = torch.randn(images[idx].shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        loss = edm_loss(net, images[idx], y, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        beta = min(config.ema_beta, (1.0 + step) / (10.0 + step))  # warm-up: short runs forget the init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - beta)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    info = {"loss": losses, "train_time_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
            "steps": config.steps}
    return ema, info


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def load_cached_teacher(path: str | Path, config: TeacherConfig, fingerprint: str) -> tuple[nn.Module, dict]:
    """Load a cached teacher, checking that it matches ``config`` and the data; clear errors otherwise."""
    from ..networks import build_edm

    path = Path(path)
    fix = f"delete {path} or retrain (notebook: -p retrain_teacher True)"
    try:
        obj = load_file(path, "cached teacher", fix, required_keys=("format", "config", "data", "state_dict"))
    except CheckpointError as exc:
        raise TeacherCacheError(str(exc)) from exc
    if obj["format"] != CACHE_FORMAT:
        raise TeacherCacheError(f"cached teacher {path} has format {obj['format']!r}, expected {CACHE_FORMAT!r}: {fix}")
    diff = _diff(obj["config"], config.to_dict())
    if diff or obj["data"] != fingerprint:
        what = f"settings (cached, requested): {diff}" if diff else "the same settings but other training data"
        raise TeacherCacheError(f"cached teacher {path} was trained with another configuration, {what}: {fix}")
    net = build_edm(**config.net)
    try:
        net.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise TeacherCacheError(f"cached teacher {path} does not fit the network ({exc}): {fix}") from exc
    return net.eval().requires_grad_(False), dict(obj.get("info", {}))


def load_or_train_teacher(
    config: TeacherConfig, images: torch.Tensor, labels: torch.Tensor | None, cache_dir: str | Path,
    retrain: bool = False, progress: bool = True, verbose: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return (teacher, info) from ``cache_dir/teacher_<hash>.pt``, training and caching it if absent
    or if ``retrain``. ``info['cached']`` tells which happened; ``info['path']`` names the file."""
    cache_dir = Path(cache_dir)
    fp = data_fingerprint(images, labels)
    path = cache_dir / f"teacher_{cache_key(config, fp)}.pt"
    if path.exists() and not retrain:
        net, info = load_cached_teacher(path, config, fp)
        if verbose:
            print(f"loaded cached teacher {path} (trained in {info.get('train_time_s', float('nan')):.1f} s)")
        return net, {**info, "cached": True, "path": str(path)}
    if verbose:
        others = sorted(p for p in cache_dir.glob("teacher_*.pt") if p != path)
        for other in others:
            print(f"note: {other} is a cached teacher of another configuration or data; training a new one "
                  f"for this configuration ({path.name})")
        if retrain and path.exists():
            print(f"retrain requested: replacing {path}")
    net, info = train_teacher(config, images, labels, progress=progress)
    atomic_save({"format": CACHE_FORMAT, "config": config.to_dict(), "data": fp,
                 "state_dict": net.state_dict(), "info": info}, path)
    if verbose:
        print(f"trained teacher in {info['train_time_s']:.1f} s; cached at {path}")
    return net, {**info, "cached": False, "path": str(path)}
