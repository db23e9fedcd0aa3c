"""Sample-quality metrics for the digits notebook, in the feature space of a digit classifier.

A small CNN trained on the real training digits plays the role Inception plays for FID:
* class coverage and class-frequency error of generated samples (mode coverage over 10 classes);
* Frechet distance (FID formula, Heusel et al. 2017) between classifier features of samples and of
  held-out real digits;
* precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, k = 3);
* sampling speed in images per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


class DigitClassifier(nn.Module):
    """conv3x3(32) - conv3x3 s2(64) - avgpool 4x4 - linear(128) = features - linear(10) = logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Random +-1 pixel shifts and Gaussian pixel noise, so the classifier tolerates imperfect samples."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + noise * torch.randn(x.shape, generator=g)


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
    noise: float = 0.1, seed: int = 0, progress: bool = True,
) -> DigitClassifier:
    """Train :class:`DigitClassifier` with Adam on real digits (augmented); returned in eval mode."""
    from tqdm.auto import tqdm

    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitClassifier(images.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="digit classifier", disable=not progress):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=g)
        loss = F.cross_entropy(clf(_augment(images[idx], g, noise)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((clf(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def features(clf: DigitClassifier, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Classifier features [N, 128] as float64 numpy."""
    return torch.cat([clf.features(b) for b in images.split(batch_size)]).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64.

    tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), computed with symmetric eigendecompositions
    (stable for the singular covariances of ReLU features).
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"need two [N, D] arrays with the same D; got {feats_a.shape}, {feats_b.shape}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    s_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(half @ s_b @ half), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)


def _knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1 skips the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): a sample is inside a manifold if it lies
    within the k-th-nearest-neighbour radius of some point of that set."""
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"need 1 <= k < number of samples; got k={k} with {len(real)} real, {len(fake)} fake")
    r, f = torch.from_numpy(real), torch.from_numpy(fake)
    if not (bool(torch.isfinite(r).all()) and bool(torch.isfinite(f).all())):
        raise ValueError("features contain NaN or inf (a diverged generator?)")
    rad_r, rad_f = _knn_radii(r, k), _knn_radii(f, k)
    precision = (torch.cdist(f, r) <= rad_r[None, :]).any(1).double().mean()
    recall = (torch.cdist(r, f) <= rad_f[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def class_statistics(pred: torch.Tensor, target: torch.Tensor | None = None, num_classes: int = NUM_CLASSES,
                     min_share: float = 0.25) -> dict[str, float]:
    """Coverage, frequency error and (with conditioning labels ``target``) label agreement.

    coverage: fraction of classes that receive at least ``min_share`` of their expected share of the
    predictions; freq_error: total-variation distance between predicted and expected class frequencies
    (expected = ``target``'s histogram, or uniform); label_agreement: mean(pred == target).
    """
    if pred.numel() == 0:
        raise ValueError("pred holds no predictions")
    counts = torch.bincount(pred.flatten().long(), minlength=num_classes).double()
    freq = counts / counts.sum()
    if target is not None:
        expect = torch.bincount(target.flatten().long(), minlength=num_classes).double()
        expect = expect / expect.sum()
    else:
        expect = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    out = {"coverage": float((freq >= min_share * expect).double().mean()),
           "freq_error": float(0.5 * (freq - expect).abs().sum())}
    if target is not None:
        out["label_agreement"] = float((pred.flatten() == target.flatten()).double().mean())
    return out


@torch.no_grad()
def per_class_coverage(clf: DigitClassifier, samples: torch.Tensor, real_images: torch.Tensor,
                       real_labels: torch.Tensor, k: int = 3, num_classes: int = NUM_CLASSES) -> dict[str, list[float]]:
    """Per class: ``mass``, the share of ``samples`` the classifier assigns to it, and ``recall``, the fraction of the
    real images of that class that lie inside the samples' k-NN manifold (Kynkaanniemi et al. 2019's recall,
    restricted to one class: a dropped class has recall near 0 whatever the others do). Classes without real images
    get recall NaN."""
    samples = samples.float().clamp(-1, 1)
    if len(real_images) != len(real_labels):
        raise ValueError(f"{len(real_images)} real images but {len(real_labels)} labels")
    pred = clf(samples).argmax(1)
    mass = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    fake = torch.from_numpy(features(clf, samples))
    real = torch.from_numpy(features(clf, real_images))
    if k < 1 or k >= len(fake):
        raise ValueError(f"need 1 <= k < number of samples; got k={k} with {len(fake)} samples")
    inside = (torch.cdist(real, fake) <= _knn_radii(fake, k)[None, :]).any(1).double()
    recall = [float(inside[real_labels == c].mean()) if bool((real_labels == c).any()) else float("nan")
              for c in range(num_classes)]
    return {"mass": mass.tolist(), "recall": recall}


@dataclass
class SampleReport:
    """Metrics of one set of samples against held-out real digits."""

    fd: float
    precision: float
    recall: float
    coverage: float
    freq_error: float
    label_agreement: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def evaluate_samples(clf: DigitClassifier, samples: torch.Tensor, cond_labels: torch.Tensor | None,
                     real_heldout: torch.Tensor, k: int = 3) -> SampleReport:
    """All quality metrics of ``samples`` (in [-1, 1]; clipped) against held-out real images."""
    samples = samples.float().clamp(-1, 1)
    pred = clf(samples).argmax(1)
    cls = class_statistics(pred, cond_labels)
    fs, fr = features(clf, samples), features(clf, real_heldout)
    p, r = precision_recall(fr, fs, k)
    return SampleReport(frechet_distance(fs, fr), p, r, cls["coverage"], cls["freq_error"],
                        cls.get("label_agreement", float("nan")))


def images_per_second(sample_fn: Callable[[int], torch.Tensor], n: int = 256, repeats: int = 3) -> float:
    """Best-of-``repeats`` throughput of ``sample_fn(n)`` after one warm-up call."""
    if n < 1 or repeats < 1:
        raise ValueError(f"need n >= 1 and repeats >= 1; got {n}, {repeats}")
    with torch.no_grad():
        sample_fn(n)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample_fn(n)
            best = min(best, time.perf_counter() - t0)
    return n / max(best, 1e-9)
