"""Digits data, digit metrics and the cached EDM teacher training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdistill_lab.digits import metrics as M
from fdistill_lab.digits.data import BatchSampler, load_digits, to_pixels
from fdistill_lab.digits.teacher import TeacherCacheError, TeacherConfig, edm_loss, load_or_train_teacher
from fdistill_lab.networks import tiny_adm_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_load_digits_split(digits):
    tr, ho = digits
    assert len(tr) + len(ho) == 1797 and abs(len(ho) - 0.2 * 1797) < 10
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.float32
    assert float(tr.images.min()) == -1.0 and float(tr.images.max()) == 1.0
    assert torch.equal(torch.bincount(ho.labels) > 30, torch.ones(10, dtype=torch.bool))  # stratified
    assert torch.equal(to_pixels(tr.images), to_pixels(tr.images).round())  # grey levels 0..16 survive
    tr2, _ = load_digits()
    assert torch.equal(tr.images, tr2.images)
    other, _ = load_digits(seed=1)
    assert not torch.equal(tr.labels, other.labels)
    up, _ = load_digits(resolution=16)
    assert up.images.shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match=r"resolution must be one of \(8, 16\)"):
        load_digits(resolution=32)
    with pytest.raises(ValueError, match="holdout_fraction"):
        load_digits(holdout_fraction=1.0)


def test_batch_sampler_resume(digits):
    tr, _ = digits
    a = BatchSampler(tr, 500, seed=3)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    expect = [a.next()[1] for _ in range(4)]
    b = BatchSampler(tr, 500, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next()[1]) for x in expect)
    with pytest.raises(ValueError, match="exceeds the split size"):
        BatchSampler(tr, 10_000)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert M.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    # N(0, I) vs N(0, 4 I) in 3-D: tr(I + 4I - 2*2I) = 3
    assert M.frechet_distance(a, 2 * rng.standard_normal((4000, 3))) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        M.frechet_distance(a, a[:, :2])


def test_precision_recall_extremes():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 4))
    assert M.precision_recall(real, real.copy()) == (1.0, 1.0)
    p, r = M.precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    # a collapsed generator: precise but low recall
    collapsed = real[:1] + 0.01 * rng.standard_normal((300, 4))
    p, r = M.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1
    with pytest.raises(ValueError, match="1 <= k"):
        M.precision_recall(real[:3], real[:3], k=3)
    broken = real.copy()
    broken[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.precision_recall(real, broken)


def test_class_statistics():
    target = torch.arange(100) % 10
    perfect = M.class_statistics(target.clone(), target)
    assert perfect == {"coverage": 1.0, "freq_error": 0.0, "label_agreement": 1.0}
    collapsed = M.class_statistics(torch.zeros(100, dtype=torch.long), target)
    assert collapsed["coverage"] == pytest.approx(0.1) and collapsed["freq_error"] == pytest.approx(0.9)
    assert collapsed["label_agreement"] == pytest.approx(0.1)
    assert "label_agreement" not in M.class_statistics(target)
    with pytest.raises(ValueError, match="no predictions"):
        M.class_statistics(target[:0])


def test_classifier_learns_digits_and_speed_helper(digits):
    tr, ho = digits
    clf = M.train_classifier(tr.images, tr.labels, steps=150, progress=False)
    acc = M.accuracy(clf, ho.images, ho.labels)
    assert acc > 0.85
    rep = M.evaluate_samples(clf, ho.images[:200], ho.labels[:200], ho.images[200:])
    assert rep.label_agreement == pytest.approx(M.accuracy(clf, ho.images[:200], ho.labels[:200]))
    assert rep.coverage == 1.0 and rep.fd < 50 and rep.precision > 0.5
    noise = M.evaluate_samples(clf, torch.rand(200, 1, 8, 8) * 2 - 1, ho.labels[:200], ho.images[200:])
    assert noise.fd > 3 * rep.fd
    assert M.images_per_second(lambda n: torch.zeros(n), n=8, repeats=1) > 0


def _tiny_teacher_config(steps: int = 3) -> TeacherConfig:
    net = tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=8, attn_resolutions=[])
    return TeacherConfig(net=net, steps=steps, batch_size=16)


def test_teacher_cache_roundtrip_and_errors(digits, tmp_path, capsys):
    tr, _ = digits
    cfg = _tiny_teacher_config()
    net, info = load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, progress=False)
    assert not info["cached"] and len(info["loss"]) == 3
    path = tmp_path / info["path"].split("/")[-1]
    net2, info2 = load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, progress=False)
    assert info2["cached"] and info2["path"] == info["path"]
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)

    # another configuration: a new file, and the old one is reported
    capsys.readouterr()
    _, info3 = load_or_train_teacher(_tiny_teacher_config(steps=2), tr.images, tr.labels, tmp_path, progress=False)
    assert info3["path"] != info["path"] and "another configuration" in capsys.readouterr().out

    # a file under this configuration's name that holds another configuration
    path.write_bytes((tmp_path / info3["path"].split("/")[-1]).read_bytes())
    with pytest.raises(TeacherCacheError, match=r"another configuration.*steps.*retrain_teacher True"):
        load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, progress=False)

    # a corrupted file is never used; the message names the file and both fixes
    path.write_bytes(b"\x00garbage")
    with pytest.raises(TeacherCacheError, match=rf"{path.name}.*corrupted.*delete .*retrain_teacher True"):
        load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, progress=False)
    _, info4 = load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, retrain=True, progress=False)
    assert not info4["cached"] and load_or_train_teacher(cfg, tr.images, tr.labels, tmp_path, progress=False)[1][
        "cached"]


def test_teacher_config_errors_and_edm_loss():
    with pytest.raises(ValueError, match="build_edm keywords"):
        TeacherConfig(net={})
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        _tiny_teacher_config(steps=0)
    from fdistill_lab.networks import build_edm

    net = build_edm(**_tiny_teacher_config().net)
    x = torch.zeros(4, 1, 8, 8)
    loss = edm_loss(net, x, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.randn(4, 1, 8, 8))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_make_grid_layout_and_errors():
    from fdistill_lab.image_grid import make_grid

    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(imgs, nrow=2, padding=1, pad_value=0.5)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert float(grid[1, 1]) == 0.0 and float(grid[1, 4]) == 0.5 and float(grid[4, 1]) == 1.0
    assert float(grid[4, 4]) == 0.5 and float(grid[0, 0]) == 0.5  # empty slot and border are padding
    rgb = make_grid(torch.zeros(4, 3, 2, 2), padding=0)
    assert rgb.shape == (4, 4, 3) and float(rgb.max()) == 0.5
    with pytest.raises(ValueError, match=r"non-empty \[N, C, H, W\]"):
        make_grid(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="value_range"):
        make_grid(imgs, value_range=(1.0, 1.0))


def test_subsample_classes_keeps_a_seeded_fraction_of_the_rare_ones(digits):
    from fdistill_lab.digits.data import subsample_classes

    train, _ = digits
    rare = subsample_classes(train, [5, 6, 7, 8, 9], keep=0.1, seed=0)
    before = torch.bincount(train.labels, minlength=10)
    after = torch.bincount(rare.labels, minlength=10)
    assert after[:5].tolist() == before[:5].tolist()
    assert after[5:].tolist() == [max(1, round(0.1 * int(n))) for n in before[5:]]
    again = subsample_classes(train, [9, 5, 6, 7, 8], keep=0.1, seed=0)
    assert torch.equal(again.images, rare.images) and torch.equal(again.labels, rare.labels)
    assert not torch.equal(subsample_classes(train, [5, 6, 7, 8, 9], keep=0.1, seed=1).images, rare.images)
    kept = {tuple(x.flatten().tolist()) for x in rare.images}
    assert kept <= {tuple(x.flatten().tolist()) for x in train.images}  # a subset, images unchanged
    with pytest.raises(ValueError, match="rare must be a non-empty list of classes in"):
        subsample_classes(train, [10], keep=0.1)
    with pytest.raises(ValueError, match="keep must be in"):
        subsample_classes(train, [5], keep=0.0)


def test_per_class_coverage_sees_a_dropped_class(digits):
    from fdistill_lab.digits import metrics as dm

    train, held = digits
    clf = dm.train_classifier(train.images, train.labels, steps=150, seed=0)
    full = dm.per_class_coverage(clf, train.images, held.images, held.labels)
    assert sum(full["mass"]) == pytest.approx(1.0) and min(full["recall"]) > 0.5
    without_3 = train.images[train.labels != 3]  # samples that never draw a 3
    dropped = dm.per_class_coverage(clf, without_3, held.images, held.labels)
    assert dropped["mass"][3] < 0.02 and dropped["recall"][3] < 0.5 * full["recall"][3]
    others = [c for c in range(10) if c != 3]
    assert min(dropped["recall"][c] for c in others) > 0.5
    with pytest.raises(ValueError, match="real images but"):
        dm.per_class_coverage(clf, train.images, held.images, held.labels[:5])


def test_design_is_the_notebook_04_settings_and_rejects_unknown_ones():
    from fdistill_lab.digits import design
    from fdistill_lab.networks import tiny_adm_config

    net = design.teacher_net((1, 8, 8))
    assert net == tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    assert design.teacher_net((1, 8, 8), label_dim=0)["label_dim"] == 0
    t = design.teacher_config(net, 600, seed=3)
    assert (t.steps, t.batch_size, t.lr, t.warmup_steps, t.ema_beta, t.seed) == (600, 128, 2e-3, 50, 0.999, 3)
    c = design.student_config("js", seed=2, lr=3e-3)
    assert (c.lr_student, c.lr_fake, c.lr_disc, c.gan_weight_gen, c.disc_placement, c.ema_beta, c.seed) == (
        3e-3, 3e-3, 3e-3, 0.01, "teacher", 0.9, 2)
    with pytest.raises(ValueError, match="unknown student setting.*valid: lr, gan_weight"):
        design.student_config("js", learning_rate=1e-3)
    with pytest.raises(ValueError, match="disc_placement"):
        design.student_config("js", disc_placement="nowhere")
