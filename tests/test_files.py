"""Atomic files (fdistill_lab.files) and the records written through them: file mode, folder fsync, no partial or
temporary files left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from fdistill_lab import files
from fdistill_lab.course import records


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.write_json_atomic(tmp_path / "a.json", {"x": 1})
        records.record(tmp_path, "loss", 0.5, show=False)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("a.json", records.RESULTS_FILE, "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_atomic_write_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.write_text_atomic(tmp_path / "t.csv", "a,b\n1,2\n")
    assert synced == [False, True]  # the file's data, then the folder holding the rename
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    files.write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError, match="not JSON serializable"):
        files.write_json_atomic(path, {"bad": object()})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        files.write_json_atomic(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["r.json"]  # no temporary file left


def test_folder_fsync_tolerates_only_unsupported(tmp_path, monkeypatch):
    def fsync(err):
        def fail(fd):
            raise OSError(err, os.strerror(err))
        return fail

    monkeypatch.setattr(files.os, "fsync", fsync(errno.EINVAL))  # a file system that cannot sync folders
    files.fsync_dir(tmp_path)
    monkeypatch.setattr(files.os, "fsync", fsync(errno.EIO))
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        files.fsync_dir(tmp_path)


def test_every_writer_goes_through_one_atomic_file(tmp_path, monkeypatch):
    """Checkpoints, the EDM cache, sample grids and text all write through files.atomic_file: a failure mid-write
    keeps the old file and leaves no temporary file; two writers open on one path at once never share a temporary
    (the last rename wins); only the caches and previews skip the fsyncs."""
    import torch

    from fdistill_lab.files import atomic_save, load_file
    from fdistill_lab.train import run_folder as train_io
    from fdistill_lab.train import teachers

    ckpt = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, ckpt)
    real_save = torch.save

    def dies_mid_write(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C while saving

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_file(ckpt)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]

    with files.atomic_file(tmp_path / "x.txt") as a, files.atomic_file(tmp_path / "x.txt") as b:
        a.write(b"first")
        b.write(b"second")
    assert (tmp_path / "x.txt").read_bytes() == b"first"  # a's rename came last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "x.txt"]

    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd))
    teachers._write_cache(tmp_path / "cache.pt", {"a": 1}, {"w": torch.zeros(2)}, {"size": 1})
    train_io.save_grid_png(torch.zeros(4, 3, 8, 8), tmp_path / "grid.png")
    assert not synced  # caches and previews: atomic but not fsynced
    atomic_save({"step": 3}, ckpt)
    assert len(synced) == 2  # the checkpoint's data and its folder
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(tmp_path / "cache.pt", weights_only=True)["config"] == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checksum_manifest_keeps_every_line_of_concurrent_downloads(tmp_path, monkeypatch):
    """Downloads side by side into one folder each add their sha256 under a lock (read-modify-write of SHA256SUMS;
    the slowed read below loses lines without it)."""
    import threading
    import time

    from fdistill_lab.train import download

    real_read = download.read_manifest

    def slow_read(root):
        sums = real_read(root)
        time.sleep(0.05)
        return sums

    monkeypatch.setattr(download, "read_manifest", slow_read)
    names = [f"file{i}.pkl" for i in range(6)]
    threads = [threading.Thread(target=download._record, args=(tmp_path, n, f"{i:064x}")) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert real_read(tmp_path) == {n: f"{i:064x}" for i, n in enumerate(names)}


def test_a_full_disk_names_the_file_even_when_only_the_final_flush_fails(tmp_path, monkeypatch):
    """On a full disk the buffered bytes may fail only when the file is flushed or closed; the error must still be
    an OSError naming the target (not the folder), and no temporary file may be left."""
    import errno
    import io

    from fdistill_lab import files

    class FullDisk(io.BufferedWriter):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = files.os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(io.FileIO(fd, "w")))
    target = tmp_path / "ckpt.pt"
    with pytest.raises(OSError) as err:
        files.write_text_atomic(target, "x" * 100)
    monkeypatch.setattr(files.os, "fdopen", real)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert "while writing" in str(err.value) and not list(tmp_path.iterdir())
