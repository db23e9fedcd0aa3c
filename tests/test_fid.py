"""FID: Frechet distance against scipy, streaming float64 statistics, quantisation, and the whole
pipeline with a small stand-in TorchScript detector written here (also sharded over 2 gloo ranks)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdistill_lab.train import fid

RES, FEAT = 8, 12


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_distance_against_scipy_and_closed_forms():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(ref, rel=1e-10, abs=1e-10)
        # independent route: tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2 (symmetric eigendecompositions)
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(w)) @ v.T
        tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
        assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * tr_root, rel=1e-8)
        assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])  # diagonal: sum (sqrt a - sqrt b)^2
    assert fid.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1 + 4)
    with pytest.raises(ValueError, match="incompatible"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 7)) * 3 + 5
    stats = fid.FeatureStats(7)
    x[:1] = x[:1].astype(np.float32)  # the first chunk goes in as a float32 tensor: make it exact
    for k, chunk in enumerate(np.split(x, [1, 10, 50, 51])):
        stats.update(torch.from_numpy(chunk).float() if k == 0 else chunk)
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=0, atol=1e-11)
    other = fid.FeatureStats(7)
    other.update(x[:3])
    merged = fid.FeatureStats(7).merge(other)
    assert merged.n == 3
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        stats.update(np.zeros((2, 6)))


def test_quantize_modes():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 1 / 255, 0.5, 1.0, 1.2])
    r = fid.quantize_images(x, "round")
    t = fid.quantize_images(x, "trunc")
    assert r.dtype == torch.uint8 and t.dtype == torch.uint8
    assert r.tolist() == [0, 0, 0, 128, 128, 191, 255, 255]
    assert t.tolist() == [0, 0, 0, 127, 128, 191, 255, 255]
    with pytest.raises(ValueError, match="round, trunc"):
        fid.quantize_images(x, "floor")
    # float64 samples (EDM's Heun output) are scaled in float64, as EDM does; in float32 this one becomes 1
    near = torch.tensor([(1 - 128) / 127.5 - 1e-9], dtype=torch.float64)
    assert fid.quantize_images(near, "round").item() == int(near.item() * 127.5 + 128) == 0
    assert fid.quantize_images(near.float(), "round").item() == 1


class _StandIn(torch.nn.Module):
    """Fixed random projection of uint8 pixels; same call signature as the Inception detector."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(FEAT, 3 * RES * RES, generator=g, dtype=torch.float64) / 20)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        assert return_features
        f = x.reshape(x.shape[0], -1).to(torch.float64) / 255.0
        return (f @ self.w.t() + torch.tanh(f @ self.w.t())).to(torch.float32)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        torch.jit.save(torch.jit.script(_StandIn()), str(path))
    return path


def _generate(labels: torch.Tensor | None, seeds: torch.Tensor) -> torch.Tensor:
    x = fid.latents_from_seeds(seeds, (3, RES, RES)) * 0.6
    if labels is not None:
        x = x + (labels.float() / 10 - 0.3).reshape(-1, 1, 1, 1)
    return x  # some pixels outside [-1, 1]: exercises clipping


def _reference_fid(detector, n, num_classes, mu_ref, sigma_ref, mode="round", seed=0) -> float:
    """Straightforward float64 computation: all images at once, numpy mean / np.cov, scipy sqrtm."""
    idx = torch.arange(n)
    imgs = _generate(idx % num_classes if num_classes else None, idx + seed)
    if mode == "round":
        q = torch.clamp(imgs * 127.5 + 128, 0, 255).floor().to(torch.uint8)
    else:
        q = torch.clamp((imgs + 1) * 127.5, 0, 255).floor().to(torch.uint8)
    feats = detector(q, return_features=True).double().numpy()
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    return float(np.sum((mu - mu_ref) ** 2) + np.trace(cov + sigma_ref - 2 * scipy.linalg.sqrtm(cov @ sigma_ref).real))


def _ref_stats(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    return fid.save_reference_stats(tmp_path / "ref.npz", rng.normal(size=FEAT) * 0.1, _random_spd(rng, FEAT))


def test_pipeline_matches_reference_within_1e6(tmp_path, detector_path):
    det = fid.load_detector(detector_path)
    ref_path = _ref_stats(tmp_path)
    mu_ref, sigma_ref = fid.load_reference_stats(ref_path)
    calls = []

    def gen(labels, seeds):
        calls.append((labels.clone(), seeds.clone()))
        return _generate(labels, seeds)

    got, stats = fid.compute_fid(gen, det, ref_path, num_images=50, batch_size=8, num_classes=7,
                                 return_stats=True)
    assert stats.n == 50
    assert torch.cat([c[0] for c in calls]).tolist() == [i % 7 for i in range(50)]  # class-balanced
    assert torch.cat([c[1] for c in calls]).tolist() == list(range(50))
    ref = _reference_fid(det, 50, 7, mu_ref, sigma_ref)
    assert abs(got - ref) < 1e-6
    assert got > 0.1  # not trivially zero
    # batch size and shards do not change the statistics
    again = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=50, batch_size=13, num_classes=7)
    assert abs(again - got) < 1e-9
    trunc = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=50, batch_size=8, num_classes=7,
                            quantize="trunc")
    assert abs(trunc - _reference_fid(det, 50, 7, mu_ref, sigma_ref, mode="trunc")) < 1e-6
    assert abs(trunc - got) > 1e-6
    uncond = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=20, batch_size=8, num_classes=0)
    assert abs(uncond - _reference_fid(det, 20, 0, mu_ref, sigma_ref)) < 1e-6


def test_manual_shards_sum_to_the_whole(tmp_path, detector_path):
    det = fid.load_detector(detector_path)
    mu_ref, sigma_ref = fid.load_reference_stats(_ref_stats(tmp_path))
    whole = fid.FeatureStats(FEAT)
    for r in range(3):  # rank r of 3, without a process group: just its share of the batches
        idx = torch.arange(30).split(4)[r::3]
        for b in idx:
            whole.update(fid.detector_features(det, fid.quantize_images(_generate(b % 5, b))))
    mu, cov = whole.mean_cov()
    single = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=30, batch_size=4, num_classes=5)
    assert abs(fid.frechet_distance(mu, cov, mu_ref, sigma_ref) - single) < 1e-9


def test_errors(tmp_path, detector_path):
    with pytest.raises(FileNotFoundError, match="inception"):
        fid.load_detector(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match="fid-refs"):
        fid.load_reference_stats(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu'"):
        fid.load_reference_stats(bad)
    det = fid.load_detector(detector_path)
    with pytest.raises(TypeError, match="uint8"):
        fid.detector_features(det, torch.zeros(1, 3, RES, RES))
    gray = fid.detector_features(det, torch.full((2, 1, RES, RES), 7, dtype=torch.uint8))
    rgb = fid.detector_features(det, torch.full((2, 3, RES, RES), 7, dtype=torch.uint8))
    assert torch.equal(gray, rgb) and gray.dtype == torch.float64
    calls = []

    def counting(labels, seeds):
        calls.append(len(seeds))
        return _generate(labels, seeds)

    with pytest.raises(RuntimeError, match="process group"):
        fid.compute_fid(counting, det, (np.zeros(FEAT), np.eye(FEAT)), num_images=8, batch_size=4,
                        num_classes=2, rank=0, world_size=2)
    assert calls == []  # refused before generating anything
    with pytest.MonkeyPatch.context() as mp_:  # an NCCL group all-reduces CUDA tensors only: say so up front
        mp_.setattr(dist, "is_initialized", lambda: True)
        mp_.setattr(dist, "get_backend", lambda *a: "nccl")
        with pytest.raises(ValueError, match="NCCL.*device='cuda'"):
            fid.compute_fid(counting, det, (np.zeros(FEAT), np.eye(FEAT)), num_images=8, batch_size=4,
                            num_classes=2, rank=0, world_size=2)
    assert calls == []

    def diverged(labels, seeds):
        out = _generate(labels, seeds)
        out[0, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="2 of 8 generated images hold non-finite pixels"):
        fid.compute_fid(diverged, det, (np.zeros(FEAT), np.eye(FEAT)), num_images=8, batch_size=4,
                        num_classes=2, seed=4)
    with pytest.raises(FloatingPointError, match="FID is nan"):
        fid.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def _gloo_worker(rank: int, world: int, init_file: str, det_path: str, ref_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        det = fid.load_detector(det_path)
        value, stats = fid.compute_fid(_generate, det, ref_path, num_images=50, batch_size=8, num_classes=7,
                                       return_stats=True)
        torch.save({"fid": value, "n": stats.n, "sum": stats.sum, "sum2": stats.sum2},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path, detector_path):
    ref_path = _ref_stats(tmp_path)
    det = fid.load_detector(detector_path)
    single, sstats = fid.compute_fid(_generate, det, ref_path, num_images=50, batch_size=8, num_classes=7,
                                     return_stats=True)
    args = (2, str(tmp_path / "store"), str(detector_path), str(ref_path), str(tmp_path))
    mp.start_processes(_gloo_worker, args=args, nprocs=2, join=True, start_method="fork")
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert res["n"] == 50
        torch.testing.assert_close(res["sum"], sstats.sum, rtol=0, atol=1e-9)
        torch.testing.assert_close(res["sum2"], sstats.sum2, rtol=0, atol=1e-9)
        assert abs(res["fid"] - single) < 1e-9
