"""FID as EDM measures it (EDM's ``fid.py`` protocol): Inception-v3 pool features [N, 2048] from
the TorchScript detector ``inception-2015-12-05.pt`` on uint8 NCHW images, float64 statistics
(mu, Sigma = (sum x x^T - N mu mu^T) / (N - 1)), Frechet distance with ``scipy.linalg.sqrtm``, against
EDM's reference ``.npz`` (``mu``, ``sigma``).

Sampling protocol (settings of :func:`evaluate_fid` / :func:`compute_fid`; defaults are EDM's):

* ``labels``: ``"random"`` (EDM ``generate.py``, FastGen): one uniform class per sample, drawn from the
  sample's seed alone (:func:`labels_from_seeds`); ``"balanced"`` (DMD2): sample i of a set has class
  i mod num_classes.
* ``seed_sets``: FID is computed on that many sets of ``num_images`` samples, set k holding seeds
  ``seed + k * num_images + i``, and the reported value is the minimum over sets. EDM's README computes
  each FID three times, with seeds 0-49999, 50000-99999 and 100000-149999, and reports the minimum
  (``seed=0``, ``num_images=50000``, ``seed_sets=3`` here).

Latents (:func:`latents_from_seeds`) and random labels depend on the seed only, so the result does not
depend on batch size or the number of ranks. Under ``torch.distributed`` each rank generates its share
and the running sums are all-reduced in float64.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist

__all__ = [
    "frechet_distance",
    "FeatureStats",
    "load_detector",
    "load_reference_stats",
    "save_reference_stats",
    "quantize_images",
    "detector_features",
    "compute_fid",
    "compute_image_stats",
    "latents_from_seeds",
    "labels_from_seeds",
    "evaluate_fid",
    "QUANTIZE_MODES",
    "LABEL_SCHEMES",
    "EDM_SEED_SETS",
]

QUANTIZE_MODES = ("round", "trunc")
LABEL_SCHEMES = ("random", "balanced")
EDM_SEED_SETS = 3  # EDM's README: every FID computed three times (seeds 0-49999, 50000-99999, 100000-149999), min
LABEL_STREAM = 0x6C616265  # second word of a label's SeedSequence: keeps it apart from any other use of the seed
GenerateFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), matrix square root by scipy.linalg.sqrtm (real
    part), all in float64 (EDM fid.py / Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"incompatible statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    m = float(np.square(mu1 - mu2).sum())
    root = scipy.linalg.sqrtm(s1 @ s2)
    value = float(np.real(m + np.trace(s1 + s2 - 2 * np.real(root))))
    if not np.isfinite(value):
        raise FloatingPointError(f"FID is {value}: the statistics hold non-finite values (mu finite: "
                                 f"{bool(np.isfinite(mu1).all())}, {bool(np.isfinite(mu2).all())})")
    return value


class FeatureStats:
    """Streaming float64 statistics of feature vectors: count, sum and sum of outer products.

    ``update`` accepts [N, D] torch or numpy arrays; ``all_reduce`` sums over torch.distributed ranks
    (float64); ``mean_cov`` gives (mu, Sigma) as float64 numpy arrays with the unbiased (N - 1) covariance.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(feats).to(device=self.sum.device, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum2 += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sum2 += other.sum2.to(self.sum2.device)
        return self

    def all_reduce(self, group: Any = None) -> FeatureStats:
        """Sum the statistics over all ranks (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.sum2):
                dist.all_reduce(t, group=group)
            self.n = int(round(float(n.item())))
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.n}")
        mu = self.sum / self.n
        cov = (self.sum2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


def load_detector(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load the TorchScript Inception detector (``inception-2015-12-05.pt``) with ``torch.jit.load``.

    It is called as ``detector(uint8 [N, 3, H, W], return_features=True)`` -> [N, 2048]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception detector not found: {path}. Get it with "
                                "`python -m fdistill_lab.download fid` (TorchScript inception-2015-12-05.pt).")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the detector is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise ValueError(f"{path}: not a TorchScript detector (expected inception-2015-12-05.pt): {exc}") from exc


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """EDM reference statistics ``.npz`` with ``mu`` [D] and ``sigma`` [D, D] -> float64 (mu, sigma)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics not found: {path}. Get them with "
                                "`python -m fdistill_lab.download fid` (EDM fid-refs .npz with mu, sigma).")
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except Exception as exc:
        raise ValueError(f"{path}: expected an .npz with arrays 'mu' [D] and 'sigma' [D, D] ({exc})") from exc
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


def save_reference_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write statistics in EDM's reference format (``np.savez`` with ``mu``, ``sigma``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


def quantize_images(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """[-1, 1] float images -> uint8. 'round' (EDM): (x * 127.5 + 128).clip(0, 255) then truncate, i.e.
    rounding; 'trunc' (DMD2): ((x + 1) * 127.5).clamp(0, 255) then truncate."""
    x = images if images.dtype == torch.float64 else images.to(torch.float32)  # EDM rounds its float64 samples
    if mode == "round":
        x = (x * 127.5 + 128).clip(0, 255)
    elif mode == "trunc":
        x = ((x + 1) * 127.5).clamp(0, 255)
    else:
        raise ValueError(f"unknown quantize mode {mode!r}; valid: {', '.join(QUANTIZE_MODES)}")
    return x.to(torch.uint8)


@torch.no_grad()
def detector_features(detector: Callable[..., torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """float64 features of uint8 images [N, C, H, W]; grayscale is repeated to 3 channels (EDM)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"detector input must be uint8, got {images.dtype}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return detector(images, return_features=True).to(torch.float64)


def latents_from_seeds(seeds: torch.Tensor | Sequence[int], shape: Sequence[int],
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One N(0, I) tensor of ``shape`` per seed, each from its own generator (independent of batching)."""
    out = []
    for s in torch.as_tensor(seeds).tolist():
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.randn(list(shape), generator=g, device=device, dtype=dtype))
    return torch.stack(out)


def labels_from_seeds(seeds: torch.Tensor | Sequence[int], num_classes: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """One uniform class label in [0, num_classes) per seed (int64 [N]), a function of the seed alone.

    Each label takes the first 64-bit word ``w`` of ``numpy.random.SeedSequence([seed, LABEL_STREAM])`` and
    maps it to ``(w * num_classes) >> 64`` (bias below num_classes / 2**64): integer arithmetic on the hash,
    no ``Generator`` method whose algorithm numpy may change (tests pin the values). The stream is apart from
    the seed's latent generator (a torch generator seeded with the same seed would tie the label to the first
    latent values). Same distribution as EDM's labels (uniform, independent per seed), not the same draws:
    EDM takes its label from the seed's CUDA generator after the latents."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    values = torch.as_tensor(seeds).tolist()
    if any(s < 0 for s in values):
        raise ValueError(f"seeds must be >= 0; got {min(values)}")
    out = [(int(np.random.SeedSequence([s, LABEL_STREAM]).generate_state(1, np.uint64)[0]) * num_classes) >> 64
           for s in values]
    return torch.tensor(out, dtype=torch.int64, device=device)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return rank, world_size


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")


def _check_protocol(num_images: int, batch_size: int, quantize: str, seed: int, labels: str,
                    seed_sets: int) -> None:
    """Raise ValueError naming the bad setting and its valid values."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; valid: {', '.join(QUANTIZE_MODES)}")
    if labels not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {labels!r}; valid: {', '.join(LABEL_SCHEMES)}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be >= 2; got {num_images!r}")
    _int_at_least("batch_size", batch_size, 1)
    _int_at_least("seed", seed, 0)
    _int_at_least("seed_sets", seed_sets, 1)


def _one_set(generate_fn: GenerateFn, detector: Callable[..., torch.Tensor], first_seed: int, num_images: int,
             batch_size: int, num_classes: int | None, labels: str, quantize: str, device: torch.device | str,
             rank: int, world_size: int, dim: int, progress: bool, tag: str) -> FeatureStats:
    """Statistics of the samples with seeds ``first_seed + i``, i < num_images, summed over the ranks."""
    stats = FeatureStats(dim, device=device)
    batches = torch.arange(num_images, dtype=torch.int64).split(batch_size)
    mine = batches[rank::world_size]
    bad = torch.zeros((), dtype=torch.int64, device=device)  # images with non-finite pixels
    for k, idx in enumerate(mine):
        seeds = idx + first_seed
        if not num_classes:
            y = None
        elif labels == "balanced":
            y = (idx % num_classes).to(device)
        else:
            y = labels_from_seeds(seeds, int(num_classes), device)
        images = generate_fn(y, seeds.to(device))
        if images.shape[0] != idx.shape[0]:
            raise ValueError(f"generate_fn returned {images.shape[0]} images for a batch of {idx.shape[0]}")
        bad += (~torch.isfinite(images)).flatten(1).any(1).sum()  # NaN would quantise to arbitrary pixels
        stats.update(detector_features(detector, quantize_images(images, quantize).to(device)))
        if progress and rank == 0 and (k + 1) % max(1, len(mine) // 10) == 0:
            print(f"FID{tag}: {min((k + 1) * batch_size * world_size, num_images)}/{num_images} images",
                  file=sys.stderr, flush=True)
    if world_size > 1:
        stats.all_reduce()
        dist.all_reduce(bad)
    if int(bad):  # every rank raises together, none is left waiting in a collective
        raise FloatingPointError(f"{int(bad)} of {num_images} generated images hold non-finite pixels (seeds "
                                 f"{first_seed}-{first_seed + num_images - 1}): the generator has diverged")
    if stats.n != num_images:
        raise RuntimeError(f"collected {stats.n} feature vectors, expected {num_images}")
    return stats


def _evaluate(generate_fn: GenerateFn, detector: Callable[..., torch.Tensor],
              ref_stats: tuple[np.ndarray, np.ndarray] | str | Path, num_images: int, batch_size: int,
              num_classes: int | None, quantize: str, seed: int, labels: str, seed_sets: int,
              device: torch.device | str, rank: int | None, world_size: int | None, feature_dim: int | None,
              progress: bool) -> tuple[dict[str, Any], FeatureStats]:
    """(record, statistics of the best set); see :func:`evaluate_fid`."""
    _check_protocol(num_images, batch_size, quantize, seed, labels, seed_sets)
    mu_ref, sigma_ref = load_reference_stats(ref_stats) if isinstance(ref_stats, (str, Path)) else ref_stats
    rank, world_size = _rank_world(rank, world_size)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):  # before any sampling work
        raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")
    if world_size > 1 and dist.get_backend() == "nccl" and torch.device(device).type != "cuda":
        raise ValueError(f"the process group uses NCCL, which all-reduces CUDA tensors only; pass device='cuda' "
                         f"(this rank's GPU), not {str(device)!r}")
    dim = feature_dim or int(np.asarray(mu_ref).shape[0])
    values: list[float] = []
    ranges: list[list[int]] = []
    best = FeatureStats(dim)
    for k in range(seed_sets):
        first = seed + k * num_images
        tag = f" (seed set {k + 1}/{seed_sets})" if seed_sets > 1 else ""
        stats = _one_set(generate_fn, detector, first, num_images, batch_size, num_classes, labels, quantize,
                         device, rank, world_size, dim, progress, tag)
        values.append(frechet_distance(*stats.mean_cov(), mu_ref, sigma_ref))
        ranges.append([first, first + num_images - 1])
        if values[-1] <= min(values):
            best = stats
    record = {"fid": min(values), "fid_per_set": values, "labels": labels if num_classes else "none",
              "seed_sets": seed_sets, "seeds": ranges, "images": num_images, "quantize": quantize}
    return record, best


@torch.no_grad()
def evaluate_fid(
    generate_fn: GenerateFn,
    detector: Callable[..., torch.Tensor],
    ref_stats: tuple[np.ndarray, np.ndarray] | str | Path,
    num_images: int = 50000,
    batch_size: int = 64,
    num_classes: int | None = 1000,
    quantize: str = "round",
    seed: int = 0,
    labels: str = "random",
    seed_sets: int = EDM_SEED_SETS,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    feature_dim: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FID of generated images against reference statistics, with the protocol that produced it.

    ``generate_fn(labels, seeds)`` gets int64 class labels [B] (None when ``num_classes`` is 0/None) and
    the int64 seeds [B] of the samples, and returns images in [-1, 1], [B, C, H, W]. Set k of ``seed_sets``
    holds ``num_images`` samples with seeds ``seed + k * num_images + i``; ``labels`` is ``"random"``
    (:func:`labels_from_seeds`, EDM/FastGen) or ``"balanced"`` (i mod num_classes within each set, DMD2).
    The defaults are EDM's protocol (random labels, 50,000 images, minimum over 3 seed sets: seeds 0-49999,
    50000-99999, 100000-149999). The global batches of a set are dealt round-robin to ranks
    (``rank``/``world_size`` default to torch.distributed's); statistics are all-reduced in float64, so every
    rank returns the same record.

    Returns a JSON-ready dict: ``fid`` (minimum over sets), ``fid_per_set``, ``labels`` (``"none"`` for an
    unconditional generator), ``seed_sets``, ``seeds`` ([first, last] per set), ``images`` (per set),
    ``quantize``.
    """
    return _evaluate(generate_fn, detector, ref_stats, num_images, batch_size, num_classes, quantize, seed,
                     labels, seed_sets, device, rank, world_size, feature_dim, progress)[0]


@torch.no_grad()
def compute_fid(
    generate_fn: GenerateFn,
    detector: Callable[..., torch.Tensor],
    ref_stats: tuple[np.ndarray, np.ndarray] | str | Path,
    num_images: int = 50000,
    batch_size: int = 64,
    num_classes: int | None = 1000,
    quantize: str = "round",
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    feature_dim: int | None = None,
    progress: bool = False,
    return_stats: bool = False,
    labels: str = "random",
    seed_sets: int = EDM_SEED_SETS,
) -> float | tuple[float, FeatureStats]:
    """The ``fid`` of :func:`evaluate_fid` (same arguments and defaults, EDM's protocol) as a float; with
    ``return_stats``, also the feature statistics of the set that gave it. ``labels="balanced",
    seed_sets=1`` is this package's protocol before the protocol became a setting."""
    record, stats = _evaluate(generate_fn, detector, ref_stats, num_images, batch_size, num_classes, quantize,
                              seed, labels, seed_sets, device, rank, world_size, feature_dim, progress)
    return (record["fid"], stats) if return_stats else record["fid"]


@torch.no_grad()
def compute_image_stats(images: Iterable[torch.Tensor], detector: Callable[..., torch.Tensor],
                        feature_dim: int = 2048, max_images: int | None = None,
                        device: torch.device | str = "cpu") -> FeatureStats:
    """Statistics of uint8 image batches [B, C, H, W] (e.g. a DataLoader over ``EDMImageDataset``), for
    writing reference statistics with :func:`save_reference_stats`. Stops after the first ``max_images``
    in iteration order: on a class-sorted zip read in order those are the first few classes only, so shuffle
    the loader (or use ``EDMImageDataset(max_size=...)``, a seeded random subset) for a partial reference."""
    stats = FeatureStats(feature_dim, device=device)
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if max_images is not None:
            batch = batch[: max_images - stats.n]
        if batch.shape[0] == 0:
            break
        stats.update(detector_features(detector, batch.to(device)))
        if max_images is not None and stats.n >= max_images:
            break
    return stats


