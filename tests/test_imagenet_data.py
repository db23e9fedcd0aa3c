"""ImageNet-64 data: EDM-format zip reader, downsampled-ImageNet npz reader and the preparation command,
on small synthetic datasets written here."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fdistill_lab.train import prepare_imagenet
from fdistill_lab.train.data import (
    DatasetFormatError,
    EDMImageDataset,
    ImageNetNpzDataset,
    read_label_map,
    to_model_range,
)


def _rand_img(rng: np.random.Generator, h: int, w: int, mode: str) -> PIL.Image.Image:
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = PIL.Image.fromarray(arr, "RGB")
    return img.convert(mode)


@pytest.fixture
def imagenet_folder(tmp_path: Path) -> Path:
    """Tiny ImageNet-like train folder: 3 wnid folders (created out of order), mixed sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    spec = {"n03000000": [(70, 90, "RGB"), (90, 70, "L")],
            "n01000000": [(80, 80, "RGB"), (75, 101, "RGB"), (66, 98, "RGBA")],
            "n02000000": [(100, 67, "L")]}
    for wnid, imgs in spec.items():
        (root / wnid).mkdir(parents=True)
        for i, (h, w, mode) in enumerate(imgs):
            ext = "png" if mode == "RGBA" else "JPEG"
            _rand_img(rng, h, w, mode).save(root / wnid / f"{wnid}_{i}.{ext}")
    return root


def _reference_preprocess(path: Path, res: int) -> np.ndarray:
    """Straightforward EDM center-crop: RGB, square crop of side min(H, W) centred, LANCZOS resize."""
    img = PIL.Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((res, res), PIL.Image.LANCZOS)
    return np.asarray(img)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_from_folder_matches_edm_preprocessing(tmp_path, imagenet_folder, workers):
    dest = tmp_path / "out" / "imagenet-16x16.zip"
    rc = prepare_imagenet.main(["--source", str(imagenet_folder), "--dest", str(dest), "--resolution", "16",
                                "--workers", str(workers), "--quiet"])
    assert rc == 0 and dest.is_file() and not dest.with_name(dest.name + ".part").exists()
    other = tmp_path / "other.zip"  # a folder's labels are its sorted class folders: no npz label map
    assert prepare_imagenet.main(["--source", str(imagenet_folder), "--dest", str(other), "--label-map",
                                  "identity", "--quiet"]) == 2 and not other.exists()
    with zipfile.ZipFile(dest) as zf:
        infos = zf.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        names = sorted(i.filename for i in infos)
        meta = json.loads(zf.read("dataset.json"))
    expected_names = [f"00000/img{i:08d}.png" for i in range(6)]
    assert names == sorted(expected_names + ["dataset.json"])
    # sorted relative paths; labels = sorted wnid index
    files = sorted(p for p in imagenet_folder.rglob("*") if p.is_file())
    wnid_label = {"n01000000": 0, "n02000000": 1, "n03000000": 2}
    assert meta["labels"] == [[n, wnid_label[f.parent.name]] for n, f in zip(expected_names, files)]

    ds = EDMImageDataset(dest)
    assert len(ds) == 6 and ds.image_shape == (3, 16, 16) and ds.label_dim == 3
    for i, f in enumerate(files):
        img, label = ds[i]
        assert img.dtype == torch.uint8
        assert int(label) == wnid_label[f.parent.name]
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), _reference_preprocess(f, 16))


def test_edm_dataset_reader_options(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        order = [3, 0, 4, 1, 2]  # written out of order: the reader sorts names
        for i in order:
            buf = io.BytesIO()
            PIL.Image.fromarray(imgs[i]).save(buf, format="png")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 2] for i in range(5)]}))
    ds = EDMImageDataset(zpath, xflip=True)
    assert len(ds) == 10
    for i in range(5):
        img, lab = ds[i]
        np.testing.assert_array_equal(img.numpy(), imgs[i].transpose(2, 0, 1))
        assert int(lab) == i % 2
        flipped, _ = ds[i + 5]
        np.testing.assert_array_equal(flipped.numpy(), imgs[i].transpose(2, 0, 1)[:, :, ::-1])
    x = to_model_range(torch.stack([ds[i][0] for i in range(5)]))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0], torch.from_numpy(imgs[0].transpose(2, 0, 1)).float() / 127.5 - 1)
    sub = EDMImageDataset(zpath, max_size=3, random_seed=7)
    assert len(sub) == 3 and len(set(sub.labels.tolist()) | {0, 1}) == 2
    assert EDMImageDataset(zpath, max_size=3, random_seed=7).labels.tolist() == sub.labels.tolist()
    with pytest.raises(IndexError):  # out of range, not a wrapped-around flipped copy
        ds[10]
    with pytest.raises(IndexError):
        ds[-1]
    assert len(list(EDMImageDataset(zpath))) == 5  # plain iteration ends
    nolab = EDMImageDataset(zpath, use_labels=False)
    assert not nolab.has_labels and int(nolab[0][1]) == -1
    # a folder in the same layout reads identically; batches through a DataLoader with workers
    folder = tmp_path / "folder"
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(folder)
    fds = EDMImageDataset(folder)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    batch, labels = next(iter(loader))
    assert torch.equal(batch, torch.stack([fds[i][0] for i in range(5)]))
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_edm_dataset_errors_name_path_and_format(tmp_path):
    missing = tmp_path / "missing.zip"
    with pytest.raises(FileNotFoundError, match="missing.zip.*EDM dataset format"):
        EDMImageDataset(missing)
    notzip = tmp_path / "notzip.zip"
    notzip.write_bytes(b"hello")
    with pytest.raises(DatasetFormatError, match="notzip.zip.*not a zip"):
        EDMImageDataset(notzip)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(DatasetFormatError, match="no images"):
        EDMImageDataset(empty)
    partial = tmp_path / "partial.zip"
    with zipfile.ZipFile(partial, "w") as zf:
        for i in range(2):
            buf = io.BytesIO()
            PIL.Image.new("RGB", (4, 4)).save(buf, format="png")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [["00000/img00000000.png", 1]]}))
    with pytest.raises(DatasetFormatError, match="partial.zip.*no label.*img00000001"):
        EDMImageDataset(partial)
    with pytest.raises(FileNotFoundError, match="nowhere.*ImageNet train folder"):
        prepare_imagenet.find_images(tmp_path / "nowhere")
    order = tmp_path / "order"  # EDM's dataset_tool sorts Path objects, part by part: "a/x" before "a-b/y"
    for rel in ("a-b/y.png", "a/x.png"):
        (order / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(order / rel)
    files, labels = prepare_imagenet.find_images(order)
    assert [p.relative_to(order).as_posix() for p in files] == sorted(["a-b/y.png", "a/x.png"], key=Path) \
        == ["a/x.png", "a-b/y.png"] and labels == [0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    PIL.Image.new("RGB", (4, 4)).save(flat / "a.png")
    assert prepare_imagenet.main(["--source", str(flat), "--dest", str(tmp_path / "o.zip"), "--quiet"]) == 2


def _write_npz_batches(root: Path, rng: np.random.Generator, res: int = 8) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir()
    all_data, all_labels = [], []
    for k, n in [(1, 4), (2, 3), (10, 2)]:  # batch 10 must sort after batch 2
        data = rng.integers(0, 256, size=(n, 3 * res * res), dtype=np.uint8)
        labels = rng.integers(1, 6, size=n).tolist()  # 1-based, stored as a list like the release
        np.savez(root / f"train_data_batch_{k}.npz", data=data, labels=labels, mean=np.zeros(3 * res * res))
        all_data.append(data)
        all_labels.append(labels)
    return np.concatenate(all_data), np.concatenate(all_labels)


def test_npz_reader_layout_labels_and_conversion(tmp_path):
    rng = np.random.default_rng(2)
    data, labels = _write_npz_batches(tmp_path / "npz", rng)
    ds = ImageNetNpzDataset(tmp_path / "npz")
    assert len(ds) == 9 and ds.image_shape == (3, 8, 8)
    for i in range(9):
        img, lab = ds[i]
        assert img.dtype == torch.uint8
        # CHW-flattened rows: channel c of pixel (y, x) is data[i, c*64 + y*8 + x]
        assert int(img[1, 2, 3]) == int(data[i, 1 * 64 + 2 * 8 + 3])
        np.testing.assert_array_equal(img.numpy(), data[i].reshape(3, 8, 8))
        assert int(lab) == labels[i] - 1
    with pytest.raises(IndexError):
        ds[9]
    assert not ds.labels_mapped
    mapped = ImageNetNpzDataset(tmp_path / "npz", label_map=[4, 3, 2, 1, 0], max_cached_files=1)
    assert mapped.labels.tolist() == [4 - (v - 1) for v in labels]
    np.testing.assert_array_equal(mapped[8][0].numpy(), data[8].reshape(3, 8, 8))
    np.testing.assert_array_equal(mapped[0][0].numpy(), data[0].reshape(3, 8, 8))
    single = ImageNetNpzDataset(tmp_path / "npz" / "train_data_batch_2.npz")
    assert len(single) == 3
    np.savez(tmp_path / "npz" / "val_data.npz", data=data[:2], labels=[1, 2])  # the release's validation file
    assert len(ImageNetNpzDataset(tmp_path / "npz")) == 9  # a folder reads its training batches only

    out = tmp_path / "from_npz.zip"
    assert prepare_imagenet.main(["--source", str(tmp_path / "npz"), "--dest", str(out), "--quiet"]) == 2
    assert not out.exists()  # refused: the labels would not be EDM's
    assert prepare_imagenet.main(["--source", str(tmp_path / "npz"), "--dest", str(out), "--quiet",
                                  "--label-map", "identity"]) == 0
    zds = EDMImageDataset(out)
    assert len(zds) == 9
    for i in range(9):
        assert torch.equal(zds[i][0], ds[i][0]) and int(zds[i][1]) == int(ds[i][1])
    # with the devkit's class list the zip carries EDM's sorted-wnid labels
    clsloc = tmp_path / "map_clsloc.txt"
    clsloc.write_text("".join(f"{w} {k} name_{k}\n" for k, w in enumerate(WNIDS_NPZ_ORDER, 1)))
    out2 = tmp_path / "from_npz_mapped.zip"
    assert prepare_imagenet.main(["--source", str(tmp_path / "npz"), "--dest", str(out2), "--quiet",
                                  "--label-map", str(clsloc)]) == 0
    assert EDMImageDataset(out2).labels.tolist() == [SORTED_RANK[v - 1] for v in labels]


# five wnids in a made-up npz order; EDM's label is the rank among them sorted
WNIDS_NPZ_ORDER = ["n02119789", "n02100735", "n01440764", "n03255030", "n01443537"]
SORTED_RANK = [sorted(WNIDS_NPZ_ORDER).index(w) for w in WNIDS_NPZ_ORDER]


def test_read_label_map_formats_and_errors(tmp_path):
    assert SORTED_RANK == [3, 2, 0, 4, 1]
    with_ids = tmp_path / "map_clsloc.txt"  # ids given, lines shuffled: the ids decide
    lines = [f"{w} {k} some_name" for k, w in enumerate(WNIDS_NPZ_ORDER, 1)]
    with_ids.write_text("\n".join(lines[::-1]) + "\n\n")
    assert read_label_map(with_ids).tolist() == SORTED_RANK
    plain = tmp_path / "wnids.txt"  # one wnid per line, line order = npz order
    plain.write_text("\n".join(WNIDS_NPZ_ORDER))
    assert read_label_map(plain).tolist() == SORTED_RANK
    bad = tmp_path / "bad.txt"
    for text, msg in [("kit_fox 1\n", "bad.txt:1.*not an ImageNet wnid"),
                      ("n02119789 1\nn02100735 1\n", "bad.txt:2.*id 1 appears twice"),
                      ("n02119789 1\nn02100735 3\n", "ids must be 1..2"),
                      ("n02119789\nn02119789\n", "wnid appears twice"),
                      ("\n", "no wnids")]:
        bad.write_text(text)
        with pytest.raises(DatasetFormatError, match=msg):
            read_label_map(bad)
    with pytest.raises(FileNotFoundError, match="map_clsloc.txt"):
        read_label_map(tmp_path / "missing.txt")


def test_npz_errors_name_path_and_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz.*npz batches"):
        ImageNetNpzDataset(tmp_path / "nothing.npz")
    bad_key = tmp_path / "bad_key.npz"
    np.savez(bad_key, images=np.zeros((2, 12), np.uint8), labels=[1, 2])
    with pytest.raises(DatasetFormatError, match="bad_key.npz.*'data'"):
        ImageNetNpzDataset(bad_key)
    bad_len = tmp_path / "bad_len.npz"
    np.savez(bad_len, data=np.zeros((2, 10), np.uint8), labels=[1, 2])
    with pytest.raises(DatasetFormatError, match="bad_len.npz.*3\\*R\\*R"):
        ImageNetNpzDataset(bad_len)
    zero_based = tmp_path / "zero.npz"
    np.savez(zero_based, data=np.zeros((2, 12), np.uint8), labels=[0, 1])
    with pytest.raises(DatasetFormatError, match="zero.npz.*1-based"):
        ImageNetNpzDataset(zero_based)
    good = tmp_path / "good.npz"
    np.savez(good, data=np.zeros((2, 12), np.uint8), labels=[1, 2])
    with pytest.raises(ValueError, match="max_cached_files must be >= 1"):
        ImageNetNpzDataset(good, max_cached_files=0)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(DatasetFormatError, match="garbage.npz"):
        ImageNetNpzDataset(garbage)


def test_build_zip_leaves_nothing_behind_on_error(tmp_path):
    """A failed conversion (here fewer images than announced) keeps no partial zip, under any name."""
    from fdistill_lab.train.prepare_imagenet import build_zip

    with pytest.raises(RuntimeError, match="wrote 1 images, expected 2"):
        build_zip(tmp_path / "out.zip", iter([b"png"]), [0], total=2, progress=False)
    assert list(tmp_path.iterdir()) == []
    build_zip(tmp_path / "out.zip", iter([b"a", b"b"]), [0, 1], total=2, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zip"]
