"""Atomic writes of records: file mode, folder fsync, no partial or temporary files left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from fdistill_lab import records


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        records.write_json_atomic(tmp_path / "a.json", {"x": 1})
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

    monkeypatch.setattr(records.os, "fsync", fsync)
    records.write_text_atomic(tmp_path / "t.csv", "a,b\n1,2\n")
    assert synced == [False, True]  # the file's data, then the folder holding the rename
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    records.write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError, match="not JSON serializable"):
        records.write_json_atomic(path, {"bad": object()})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        records.write_json_atomic(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["r.json"]  # no temporary file left


def test_folder_fsync_tolerates_only_unsupported(tmp_path, monkeypatch):
    def fsync(err):
        def fail(fd):
            raise OSError(err, os.strerror(err))
        return fail

    monkeypatch.setattr(records.os, "fsync", fsync(errno.EINVAL))  # a file system that cannot sync folders
    records.fsync_dir(tmp_path)
    monkeypatch.setattr(records.os, "fsync", fsync(errno.EIO))
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        records.fsync_dir(tmp_path)
