"""Downloader against a local threaded HTTP server on 127.0.0.1 (never the internet): full download,
resume with Range after a cut connection, servers that ignore Range, checksums, errors, offline."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from fdistill_lab.train import download as dl

PAYLOAD = bytes(range(256)) * 1000  # 256 kB


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    log: list[dict] = []
    cut_after: int | None = None  # send only this many body bytes, then drop the connection (once)
    honour_range = True
    delay = 0.0  # seconds to wait before sending a body
    send_length = True  # False: no Content-Length (the body ends when the connection closes)

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        cls = type(self)
        cls.log.append({"path": self.path, "range": self.headers.get("Range"),
                        "if_range": self.headers.get("If-Range")})
        data = cls.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != etag:  # the file changed: send it whole (RFC 9110 If-Range)
            rng = None
        if rng and cls.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if cls.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        time.sleep(cls.delay)
        if cls.cut_after is not None:
            self.wfile.write(body[:cls.cut_after])
            self.wfile.flush()
            cls.cut_after = None
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"files": {"/f.bin": PAYLOAD}, "log": [], "cut_after": None,
                                       "honour_range": True, "delay": 0.0, "send_length": True})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_full_download_with_checksum(tmp_path, server):
    handler, base = server
    dest = tmp_path / "sub" / "f.bin"
    out = dl.download(f"{base}/f.bin", dest, SHA, progress=False, chunk_size=10000)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_name("f.bin.part").exists()
    n = len(handler.log)
    dl.download(f"{base}/f.bin", dest, SHA, progress=False)  # present and valid: no request
    assert len(handler.log) == n


def test_resume_after_cut_connection(tmp_path, server):
    handler, base = server
    dest = tmp_path / "f.bin"
    handler.cut_after = 100_000
    with pytest.raises(dl.DownloadError, match="resume"):
        dl.download(f"{base}/f.bin", dest, SHA, progress=False, chunk_size=4096)
    part = dest.with_name("f.bin.part")
    assert not dest.exists() and 0 < part.stat().st_size <= 100_000
    have = part.stat().st_size
    dl.download(f"{base}/f.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert handler.log[-1]["range"] == f"bytes={have}-"


def test_resume_of_a_file_changed_on_the_server_restarts_instead_of_splicing(tmp_path, server):
    handler, base = server
    dest = tmp_path / "f.bin"
    handler.cut_after = 100_000
    with pytest.raises(dl.DownloadError, match="resume"):
        dl.download(f"{base}/f.bin", dest, progress=False, chunk_size=4096)
    assert dest.with_name("f.bin.part.validator").is_file()
    new = bytes(reversed(PAYLOAD))
    handler.files = {"/f.bin": new}  # a new upload under the same URL
    dl.download(f"{base}/f.bin", dest, progress=False)
    assert dest.read_bytes() == new  # not the old prefix + the new tail
    assert handler.log[-1]["if_range"] is not None
    assert not dest.with_name("f.bin.part.validator").exists()


ETAG = f'"{SHA[:16]}"'  # what the test server sends for PAYLOAD


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    handler, base = server
    handler.honour_range = False
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"garbage-prefix")
    dest.with_name("f.bin.part.validator").write_text(ETAG)
    dl.download(f"{base}/f.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert handler.log[-1]["range"] == "bytes=14-"


def test_part_file_without_a_validator_restarts_instead_of_splicing(tmp_path, server):
    """A .part whose first response had no ETag/Last-Modified cannot be guarded by If-Range: a file replaced on
    the server would be appended to the old bytes unnoticed (and recorded in SHA256SUMS), so it restarts."""
    handler, base = server
    new = bytes(reversed(PAYLOAD))
    handler.files = {"/f.bin": new}
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(PAYLOAD[:50_000])  # the old version's first bytes
    dl.download(f"{base}/f.bin", dest, progress=False)
    assert dest.read_bytes() == new and handler.log[-1]["range"] is None


def test_two_downloads_of_one_file_at_once_do_not_corrupt_it(tmp_path, server):
    handler, base = server
    handler.delay = 0.5
    dest = tmp_path / "f.bin"
    results, errors = [], []

    def fetch():
        try:
            results.append(dl.download(f"{base}/f.bin", dest, progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert not errors and results == [dest, dest]
    assert dest.read_bytes() == PAYLOAD and len(handler.log) == 1  # the second waited and found it done


def test_complete_part_file_is_finished_on_416(tmp_path, server):
    handler, base = server
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(PAYLOAD)
    dest.with_name("f.bin.part.validator").write_text(ETAG)
    dl.download(f"{base}/f.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and handler.log[-1]["range"] == f"bytes={len(PAYLOAD)}-"


def test_checksum_mismatch_deletes_partial_and_unknown_checksum_is_optional(tmp_path, server):
    _, base = server
    dest = tmp_path / "f.bin"
    with pytest.raises(dl.ChecksumError, match="sha256 mismatch"):
        dl.download(f"{base}/f.bin", dest, "0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("f.bin.part").exists()
    dl.download(f"{base}/f.bin", dest, None, progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(dl.ChecksumError, match="exists"):
        dl.download(f"{base}/f.bin", dest, "1" * 64, progress=False)


def test_http_error_and_offline_messages(tmp_path, server):
    _, base = server
    with pytest.raises(dl.DownloadError, match="HTTP 404.*offline"):
        dl.download(f"{base}/missing.bin", tmp_path / "m.bin", progress=False)
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.DownloadError, match=r"cannot reach .*copy it to .*x\.pkl"):
        dl.download(f"http://127.0.0.1:{port}/x.pkl", tmp_path / "x.pkl", progress=False, timeout=5)


def test_known_files_groups_and_cli(tmp_path, server, monkeypatch, capsys):
    handler, base = server
    for group in dl.GROUPS.values():
        assert all(n in dl.KNOWN_FILES for n in group)
    assert dl.KNOWN_FILES["edm-imagenet-64x64-cond-adm.pkl"].url.startswith("https://nvlabs-fi-cdn.nvidia.com/")
    fake = {n: dl.RemoteFile(n, f"{base}/f.bin") for n in dl.KNOWN_FILES}
    monkeypatch.setattr(dl, "KNOWN_FILES", fake)
    assert dl.main(["fid", "--root", str(tmp_path), "--quiet"]) == 0
    for n in dl.GROUPS["fid"]:
        assert (tmp_path / n).read_bytes() == PAYLOAD
    assert dl.main(["nonexistent.pkl", "--root", str(tmp_path)]) == 1
    assert "unknown file" in capsys.readouterr().err
    assert dl.main(["--list"]) == 0
    with pytest.raises(ValueError, match="known"):
        dl.fetch("nope", Path(tmp_path))


def test_first_download_records_sha256_and_later_runs_check_it(tmp_path, server, monkeypatch, capsys):
    handler, base = server
    monkeypatch.setattr(dl, "KNOWN_FILES", {"a.pkl": dl.RemoteFile("a.pkl", f"{base}/f.bin")})
    path = dl.fetch("a.pkl", tmp_path, progress=False)
    assert dl.read_manifest(tmp_path) == {"a.pkl": SHA}
    assert (tmp_path / dl.MANIFEST).read_text() == f"{SHA}  a.pkl\n"  # sha256sum -c reads it
    assert dl.main(["--verify", "--root", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    n = len(handler.log)
    dl.fetch("a.pkl", tmp_path, progress=False)  # present and matching its record: no request
    assert len(handler.log) == n
    path.write_bytes(PAYLOAD[:-1] + b"x")  # silently damaged on disk
    assert dl.verify(tmp_path) == {"a.pkl": "MISMATCH"}
    assert dl.main(["--verify", "--root", str(tmp_path)]) == 1
    with pytest.raises(dl.ChecksumError, match="a.pkl exists but its sha256 is not"):
        dl.fetch("a.pkl", tmp_path, progress=False)
    path.unlink()
    assert dl.verify(tmp_path) == {"a.pkl": "missing"}
    dl.fetch("a.pkl", tmp_path, progress=False)  # downloaded again and checked against the record
    assert path.read_bytes() == PAYLOAD


def test_manifest_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="nothing to verify"):
        dl.verify(tmp_path)
    assert dl.main(["--verify", "--root", str(tmp_path)]) == 1
    assert "nothing to verify" in capsys.readouterr().err
    (tmp_path / dl.MANIFEST).write_text("not a checksum line\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS:1: expected '<64 hex digits>  <file name>'"):
        dl.read_manifest(tmp_path)


def _one_known_file(monkeypatch, base, **pins):
    pins = {k: v for k, v in pins.items() if v is not None}
    monkeypatch.setattr(dl, "KNOWN_FILES", {"a.pkl": dl.RemoteFile("a.pkl", f"{base}/f.bin", **pins)})


@pytest.mark.parametrize("size", [len(PAYLOAD), None])
def test_truncated_file_with_a_pinned_digest_is_refused_whatever_the_manifest_says(tmp_path, server, monkeypatch,
                                                                                   size):
    """A truncated copy already in the folder, its (wrong) sha256 in SHA256SUMS: the pinned digest wins."""
    handler, base = server
    _one_known_file(monkeypatch, base, sha256=SHA, size=size)
    truncated = PAYLOAD[:100_000]
    (tmp_path / "a.pkl").write_bytes(truncated)
    (tmp_path / dl.MANIFEST).write_text(f"{hashlib.sha256(truncated).hexdigest()}  a.pkl\n")
    with pytest.raises(dl.ChecksumError, match=r"a\.pkl exists but"):
        dl.fetch("a.pkl", tmp_path, progress=False)
    assert dl.verify(tmp_path) == {"a.pkl": "MISMATCH"}
    assert dl.main(["--verify", "--root", str(tmp_path)]) == 1
    assert handler.log == []  # refused without downloading anything


def test_manifest_line_that_disagrees_with_the_pinned_digest(tmp_path, server, monkeypatch):
    handler, base = server
    _one_known_file(monkeypatch, base, sha256=SHA, size=len(PAYLOAD))
    (tmp_path / "a.pkl").write_bytes(PAYLOAD)
    (tmp_path / dl.MANIFEST).write_text(f"{'0' * 64}  a.pkl\n")
    assert dl.verify(tmp_path) == {"a.pkl": "MISMATCH"}  # the record itself is wrong
    with pytest.warns(UserWarning, match="not its published sha256"):
        dl.fetch("a.pkl", tmp_path, progress=False)  # the file is the published one: the line is corrected
    assert dl.read_manifest(tmp_path) == {"a.pkl": SHA} and dl.verify(tmp_path) == {"a.pkl": "ok"}
    assert handler.log == []


def test_pinned_file_present_but_unrecorded_is_checked_by_verify(tmp_path, server, monkeypatch):
    _, base = server
    _one_known_file(monkeypatch, base, sha256=SHA, size=len(PAYLOAD))
    (tmp_path / "a.pkl").write_bytes(PAYLOAD[:-1] + b"x")  # same size, other bytes, no SHA256SUMS at all
    assert dl.verify(tmp_path) == {"a.pkl": "MISMATCH"}


def test_preexisting_unrecorded_file_is_not_recorded_as_verified(tmp_path, server, monkeypatch, capsys):
    """No published digest, no record: a file found in the folder is used with a warning, never recorded."""
    handler, base = server
    _one_known_file(monkeypatch, base)
    path = tmp_path / "a.pkl"
    path.write_bytes(PAYLOAD[:100_000])  # e.g. a copy cut short
    with pytest.warns(dl.UnverifiedFileWarning, match=r"cannot verify .*a\.pkl.*delete it"):
        assert dl.fetch("a.pkl", tmp_path, progress=False) == path
    assert dl.read_manifest(tmp_path) == {} and handler.log == []
    assert dl.verify(tmp_path) == {"a.pkl": "unverified"}
    assert dl.main(["--verify", "--root", str(tmp_path)]) == 1
    assert "unverified" in capsys.readouterr().out
    path.unlink()  # the advice: delete it and download again; the download is recorded
    dl.fetch("a.pkl", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and dl.read_manifest(tmp_path) == {"a.pkl": SHA}


def test_download_without_a_server_length_is_not_recorded(tmp_path, server, monkeypatch):
    handler, base = server
    handler.send_length = False
    _one_known_file(monkeypatch, base)
    with pytest.warns(dl.UnverifiedFileWarning, match="no length"):
        path = dl.fetch("a.pkl", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and dl.read_manifest(tmp_path) == {}


def test_pinned_size_is_checked_on_download(tmp_path, server, monkeypatch):
    _, base = server
    _one_known_file(monkeypatch, base, size=len(PAYLOAD) + 1)
    with pytest.raises(dl.ChecksumError, match="size mismatch"):
        dl.fetch("a.pkl", tmp_path, progress=False)
    assert not (tmp_path / "a.pkl").exists() and not (tmp_path / "a.pkl.part").exists()
    assert dl.read_manifest(tmp_path) == {}


def test_published_inception_digest_is_pinned():
    f = dl.KNOWN_FILES["inception-2015-12-05.pt"]
    assert f.sha256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4" and f.size == 95_607_719
