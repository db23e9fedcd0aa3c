"""FID: Frechet distance against scipy, streaming float64 statistics, quantisation, the whole pipeline
with a small stand-in TorchScript detector written here (also sharded over 2 gloo ranks), and the sampling
protocol settings (random or class-balanced labels, minimum over seed sets)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdistill_lab.train import fid, presets

RES, FEAT = 8, 12
OLD = {"labels": "balanced", "seed_sets": 1}  # the protocol before it became a setting


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


def _reference_fid(detector, n, num_classes, mu_ref, sigma_ref, mode="round", seed=0, labels="balanced") -> float:
    """Straightforward float64 computation: all images at once, numpy mean / np.cov, scipy sqrtm."""
    idx = torch.arange(n)
    if labels == "random":  # one seed at a time: the label depends on its seed alone
        y = torch.cat([fid.labels_from_seeds([s], num_classes) for s in (idx + seed).tolist()])
    else:
        y = idx % num_classes if num_classes else None
    imgs = _generate(y, idx + seed)
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
                                 return_stats=True, **OLD)
    assert stats.n == 50
    assert torch.cat([c[0] for c in calls]).tolist() == [i % 7 for i in range(50)]  # class-balanced
    assert torch.cat([c[1] for c in calls]).tolist() == list(range(50))
    ref = _reference_fid(det, 50, 7, mu_ref, sigma_ref)
    assert abs(got - ref) < 1e-6
    assert got > 0.1  # not trivially zero
    # batch size and shards do not change the statistics
    again = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=50, batch_size=13, num_classes=7, **OLD)
    assert abs(again - got) < 1e-9
    trunc = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=50, batch_size=8, num_classes=7,
                            quantize="trunc", **OLD)
    assert abs(trunc - _reference_fid(det, 50, 7, mu_ref, sigma_ref, mode="trunc")) < 1e-6
    assert abs(trunc - got) > 1e-6
    uncond = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=20, batch_size=8, num_classes=0, **OLD)
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
    single = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=30, batch_size=4, num_classes=5, **OLD)
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
                                       return_stats=True, **OLD)
        torch.save({"fid": value, "n": stats.n, "sum": stats.sum, "sum2": stats.sum2},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path, detector_path):
    ref_path = _ref_stats(tmp_path)
    det = fid.load_detector(detector_path)
    single, sstats = fid.compute_fid(_generate, det, ref_path, num_images=50, batch_size=8, num_classes=7,
                                     return_stats=True, **OLD)
    args = (2, str(tmp_path / "store"), str(detector_path), str(ref_path), str(tmp_path))
    mp.start_processes(_gloo_worker, args=args, nprocs=2, join=True, start_method="fork")
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert res["n"] == 50
        torch.testing.assert_close(res["sum"], sstats.sum, rtol=0, atol=1e-9)
        torch.testing.assert_close(res["sum2"], sstats.sum2, rtol=0, atol=1e-9)
        assert abs(res["fid"] - single) < 1e-9


# ---- sampling protocol: label scheme and seed sets ----

def test_labels_from_seeds_depend_on_the_seed_only():
    labels = fid.labels_from_seeds(torch.arange(12), 1000)
    assert labels.dtype == torch.int64
    # pinned: recorded FIDs depend on these draws (a change of numpy's SeedSequence hash would show here)
    assert labels.tolist() == [482, 991, 70, 700, 642, 404, 613, 618, 90, 52, 560, 989]
    assert fid.labels_from_seeds([0, 49999, 50000, 149999, 2**40], 10).tolist() == [4, 4, 0, 2, 6]
    seeds = list(range(3000, 10000))
    many = fid.labels_from_seeds(seeds, 7)
    assert torch.equal(many[[5, 900, 6999]], torch.cat([fid.labels_from_seeds([s], 7) for s in (3005, 3900, 9999)]))
    counts = torch.bincount(many, minlength=7)
    assert counts.numel() == 7 and (counts - 1000).abs().max() < 100  # uniform: 1000 +- 3 sd per class
    assert not torch.equal(many, torch.tensor(seeds) % 7)  # not class-balanced
    for bad_classes in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
            fid.labels_from_seeds([1], bad_classes)
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        fid.labels_from_seeds([3, -1], 5)


def _recording(log: dict[int, int | None]):
    def gen(labels, seeds):
        for s, y in zip(seeds.tolist(), labels.tolist() if labels is not None else [None] * len(seeds)):
            assert s not in log, f"seed {s} generated twice"
            log[s] = y
        return _generate(labels, seeds)
    return gen


def test_random_labels_follow_the_seed_whatever_the_batch_size(tmp_path, detector_path):
    det = fid.load_detector(detector_path)
    mu_ref, sigma_ref = fid.load_reference_stats(_ref_stats(tmp_path))
    values, logs = [], []
    for bs in (1, 8, 13, 50):
        log: dict[int, int | None] = {}
        values.append(fid.compute_fid(_recording(log), det, (mu_ref, sigma_ref), num_images=50, batch_size=bs,
                                      num_classes=7, labels="random", seed_sets=1, seed=100))
        logs.append(log)
    assert all(log == logs[0] for log in logs)
    assert sorted(logs[0]) == list(range(100, 150))
    assert list(logs[0].values()) != [i % 7 for i in range(50)]
    assert [logs[0][s] for s in range(100, 150)] == fid.labels_from_seeds(range(100, 150), 7).tolist()
    assert max(values) - min(values) < 1e-9
    ref = _reference_fid(det, 50, 7, mu_ref, sigma_ref, seed=100, labels="random")
    assert abs(values[0] - ref) < 1e-6
    balanced = fid.compute_fid(_generate, det, (mu_ref, sigma_ref), num_images=50, batch_size=8, num_classes=7,
                               labels="balanced", seed_sets=1, seed=100)
    assert abs(balanced - _reference_fid(det, 50, 7, mu_ref, sigma_ref, seed=100)) < 1e-6
    assert abs(balanced - values[0]) > 1e-6


@pytest.mark.parametrize("labels", ["random", "balanced"])
def test_seed_sets_report_the_minimum_of_separate_sets(tmp_path, detector_path, labels):
    det = fid.load_detector(detector_path)
    ref = fid.load_reference_stats(_ref_stats(tmp_path))
    log: dict[int, int | None] = {}
    rec = fid.evaluate_fid(_recording(log), det, ref, num_images=20, batch_size=8, num_classes=7, seed=5,
                           labels=labels, seed_sets=3)
    assert rec["seeds"] == [[5, 24], [25, 44], [45, 64]] and sorted(log) == list(range(5, 65))
    singles = [fid.compute_fid(_generate, det, ref, num_images=20, batch_size=6, num_classes=7, seed=5 + 20 * k,
                               labels=labels, seed_sets=1) for k in range(3)]
    assert np.allclose(rec["fid_per_set"], singles, rtol=0, atol=1e-9)
    assert rec["fid"] == min(rec["fid_per_set"]) and np.ptp(rec["fid_per_set"]) > 1e-6  # the sets differ
    if labels == "balanced":  # every set is balanced on its own
        assert [log[s] for s in range(25, 45)] == [i % 7 for i in range(20)]
    value, stats = fid.compute_fid(_generate, det, ref, num_images=20, batch_size=8, num_classes=7, seed=5,
                                   labels=labels, seed_sets=3, return_stats=True)
    assert value == rec["fid"] and stats.n == 20
    assert abs(fid.frechet_distance(*stats.mean_cov(), *ref) - value) < 1e-9  # the best set's statistics


def test_the_record_holds_the_protocol_and_defaults_are_edms(tmp_path, detector_path):
    det = fid.load_detector(detector_path)
    ref = fid.load_reference_stats(_ref_stats(tmp_path))
    log: dict[int, int | None] = {}
    rec = fid.evaluate_fid(_recording(log), det, ref, num_images=10, batch_size=4, num_classes=7)
    assert set(rec) == {"fid", "fid_per_set", "labels", "seed_sets", "seeds", "images", "quantize"}
    assert (rec["labels"], rec["seed_sets"], rec["seeds"], rec["images"], rec["quantize"]) == (
        "random", 3, [[0, 9], [10, 19], [20, 29]], 10, "round")  # EDM: random labels, min over 3 seed sets
    assert [log[s] for s in range(30)] == fid.labels_from_seeds(range(30), 7).tolist()
    assert json.loads(json.dumps(rec)) == rec  # goes into logs/fid.jsonl as it is
    assert fid.compute_fid(_generate, det, ref, num_images=10, batch_size=4, num_classes=7) == rec["fid"]
    uncond = fid.evaluate_fid(_generate, det, ref, num_images=10, batch_size=4, num_classes=0, quantize="trunc",
                              seed_sets=1)
    assert (uncond["labels"], uncond["quantize"], uncond["seeds"]) == ("none", "trunc", [[0, 9]])


def test_bad_protocol_settings_name_the_valid_choices(tmp_path, detector_path):
    det = fid.load_detector(detector_path)
    ref = (np.zeros(FEAT), np.eye(FEAT))
    calls = []

    def counting(labels, seeds):
        calls.append(len(seeds))
        return _generate(labels, seeds)

    for kwargs, match in (({"labels": "uniform"}, "unknown label scheme 'uniform'; valid: random, balanced"),
                          ({"seed_sets": 0}, "seed_sets must be an integer >= 1; got 0"),
                          ({"seed_sets": 1.5}, "seed_sets must be an integer >= 1"),
                          ({"seed_sets": True}, "seed_sets must be an integer >= 1"),
                          ({"seed": -1}, "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=match):
            fid.evaluate_fid(counting, det, ref, num_images=8, batch_size=4, num_classes=2, **kwargs)
        with pytest.raises(ValueError, match=match):
            fid.compute_fid(counting, det, ref, num_images=8, batch_size=4, num_classes=2, **kwargs)
    assert calls == []
    assert presets.FID_LABELS == fid.LABEL_SCHEMES and presets.FID_QUANTIZE == fid.QUANTIZE_MODES
    with pytest.raises(ValueError, match=r"fid_labels must be one of \('random', 'balanced'\); got 'uniform'"):
        presets.resolve("imagenet64", {"fid_labels": "uniform"})
    for raw in ("0", "-2"):
        with pytest.raises(ValueError, match="fid_seed_sets must be an integer >= 1"):
            presets.resolve("imagenet64", {"fid_seed_sets": raw})
    with pytest.raises(ValueError, match="setting 'fid_seed_sets' must be an integer"):
        presets.resolve("imagenet64", {"fid_seed_sets": "1.5"})


def test_presets_carry_each_references_protocol():
    assert (presets.RunConfig().fid_labels, presets.RunConfig().fid_seed_sets) == ("random", fid.EDM_SEED_SETS)
    for name in ("imagenet64", "cifar10"):  # EDM's protocol (the paper's numbers)
        r = presets.resolve(name)[1]
        assert (r.fid_labels, r.fid_seed_sets, r.fid_quantize, r.fid_images, r.fid_seed) == (
            "random", 3, "round", 50_000, 0)
    r = presets.resolve("dmd2")[1]  # DMD2's: class-balanced labels, one set, truncation
    assert (r.fid_labels, r.fid_seed_sets, r.fid_quantize) == ("balanced", 1, "trunc")
    r = presets.resolve("imagenet64", {"fid_labels": "balanced", "fid_seed_sets": "1"})[1]
    assert (r.fid_labels, r.fid_seed_sets) == ("balanced", 1)
    text = presets.describe("dmd2")
    assert "fid_labels = 'balanced'" in text and "fid_seed_sets = 1" in text


def _gloo_protocol_worker(rank: int, world: int, init_file: str, det_path: str, ref_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        log: dict[int, int | None] = {}
        rec = fid.evaluate_fid(_recording(log), fid.load_detector(det_path), ref_path, num_images=30, batch_size=4,
                               num_classes=7, seed=7, labels="random", seed_sets=2)
        (Path(out_dir) / f"proto{rank}.json").write_text(json.dumps({"record": rec, "labels": log}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_random_labels_and_seed_sets_equal_single_process(tmp_path, detector_path):
    ref_path = _ref_stats(tmp_path)
    log: dict[int, int | None] = {}
    single = fid.evaluate_fid(_recording(log), fid.load_detector(detector_path), ref_path, num_images=30,
                              batch_size=8, num_classes=7, seed=7, labels="random", seed_sets=2)
    args = (2, str(tmp_path / "store"), str(detector_path), str(ref_path), str(tmp_path))
    mp.start_processes(_gloo_protocol_worker, args=args, nprocs=2, join=True, start_method="fork")
    runs = [json.loads((tmp_path / f"proto{r}.json").read_text()) for r in range(2)]
    shards = [{int(s): y for s, y in run["labels"].items()} for run in runs]
    assert not set(shards[0]) & set(shards[1]) and {**shards[0], **shards[1]} == log  # same label per seed
    for run in runs:
        rec = run["record"]
        assert rec["seeds"] == single["seeds"] == [[7, 36], [37, 66]]
        assert np.allclose(rec["fid_per_set"], single["fid_per_set"], rtol=0, atol=1e-9)
        assert rec["fid"] == min(rec["fid_per_set"])
