"""Download the public files the EDM experiments need: teacher pickles, the Inception detector and FID
reference statistics (EDM's published URLs, in ``KNOWN_FILES``). Files go to ``<root>/<name>``.

Resumable (HTTP Range on a ``.part`` file, atomic rename when complete), verified by sha256 when a
checksum is known, and with a clear message when offline. NVIDIA publishes no checksums for these
files, so the first complete download records each file's sha256 in ``<root>/SHA256SUMS``
(``sha256sum`` format); later runs check the files against it, and ``--verify`` re-checks them all
(compare the file with a colleague's to be sure of the originals). The weights are NVIDIA's (CC BY-NC-SA 4.0):
they are downloaded to the user's disk, never shipped with this package.

Usage::

    python -m fdistill_lab.download imagenet64 --root downloads/edm
    python -m fdistill_lab.download cifar10 --root downloads/edm
    python -m fdistill_lab.download --verify --root downloads/edm
    python -m fdistill_lab.download --list
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..files import held_lock, write_text_atomic

__all__ = ["RemoteFile", "KNOWN_FILES", "GROUPS", "MANIFEST", "DownloadError", "ChecksumError", "download",
           "fetch", "read_manifest", "verify", "sha256_file", "main"]

EDM_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm"
MANIFEST = "SHA256SUMS"  # in the download root: "<sha256>  <file name>" per line, as sha256sum writes


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    sha256: str | None = None  # None: not pinned (the download is still size-checked)
    description: str = ""


KNOWN_FILES: dict[str, RemoteFile] = {f.name: f for f in [
    RemoteFile("edm-imagenet-64x64-cond-adm.pkl", f"{EDM_CDN}/pretrained/edm-imagenet-64x64-cond-adm.pkl",
               description="EDM ImageNet-64 class-conditional ADM teacher"),
    RemoteFile("edm-cifar10-32x32-cond-vp.pkl", f"{EDM_CDN}/pretrained/edm-cifar10-32x32-cond-vp.pkl",
               description="EDM CIFAR-10 class-conditional DDPM++ teacher"),
    RemoteFile("edm-cifar10-32x32-uncond-vp.pkl", f"{EDM_CDN}/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
               description="EDM CIFAR-10 unconditional DDPM++ teacher"),
    RemoteFile("imagenet-64x64.npz", f"{EDM_CDN}/fid-refs/imagenet-64x64.npz",
               description="FID reference statistics, ImageNet-64 (EDM)"),
    RemoteFile("cifar10-32x32.npz", f"{EDM_CDN}/fid-refs/cifar10-32x32.npz",
               description="FID reference statistics, CIFAR-10 (EDM)"),
    RemoteFile("inception-2015-12-05.pt",
               "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
               description="Inception-v3 feature detector, TorchScript"),
]}

GROUPS: dict[str, list[str]] = {
    "imagenet64": ["edm-imagenet-64x64-cond-adm.pkl", "inception-2015-12-05.pt", "imagenet-64x64.npz"],
    "cifar10": ["edm-cifar10-32x32-cond-vp.pkl", "edm-cifar10-32x32-uncond-vp.pkl", "inception-2015-12-05.pt",
                "cifar10-32x32.npz"],
    "fid": ["inception-2015-12-05.pt", "imagenet-64x64.npz", "cifar10-32x32.npz"],
}


class DownloadError(RuntimeError):
    """A download failed; the message says what to do (e.g. copy the file by hand when offline)."""


class ChecksumError(DownloadError):
    """The downloaded file's sha256 differs from the expected one (the partial file is deleted)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _offline_hint(url: str, dest: Path, sha256: str | None) -> str:
    check = f" and check its sha256 is {sha256}" if sha256 else ""
    return (f"If this machine is offline, download {url} on another machine, copy it to {dest}{check}; "
            "it will then be used as is.")


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def download(url: str, dest: str | Path, sha256: str | None = None, *, timeout: float = 60.0,
             chunk_size: int = 1 << 20, resume: bool = True, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless it already exists (and matches ``sha256`` when given).

    Data is written to ``dest.part``; an existing ``.part`` is resumed with an HTTP Range request, guarded by
    If-Range with the ETag (or Last-Modified) of the first response, so a file replaced on the server restarts
    instead of being spliced (as does a server that ignores Range, and a ``.part`` whose first response had no
    validator). One process downloads a file at a time (``dest.lock``); a second waits, then finds it done.
    On completion the size is checked against the server's length, the sha256 against ``sha256`` (if given),
    and the file is renamed atomically to ``dest``.
    """
    dest = Path(dest)
    if _present(dest, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download of a file at a time: a second would append to the first's .part (two groups share files)
    with held_lock(dest.with_name(dest.name + ".lock")):
        if _present(dest, sha256):  # the download we waited for has just finished it
            return dest
        return _download(url, dest, sha256, timeout, chunk_size, resume, progress)


def _present(dest: Path, sha256: str | None) -> bool:
    """True if ``dest`` exists (and matches ``sha256`` when given); ChecksumError if it exists but does not."""
    if not dest.is_file():
        return False
    if sha256 is None or sha256_file(dest) == sha256.lower():
        return True
    raise ChecksumError(f"{dest} exists but its sha256 is not {sha256}; delete it to download again")


def _download(url: str, dest: Path, sha256: str | None, timeout: float, chunk_size: int, resume: bool,
              progress: bool) -> Path:
    part = dest.with_name(dest.name + ".part")
    validator_file = _validator_path(part)
    # resume only what a validator (strong ETag or Last-Modified) guards: without one, a file replaced on the
    # server would be spliced onto the old bytes unnoticed, so start again from byte 0
    offset = part.stat().st_size if (resume and part.is_file() and validator_file.is_file()) else 0
    headers = {"User-Agent": "fdistill_lab-downloader"}
    if offset:  # a file changed on the server since then comes back whole (200), not spliced
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator_file.read_text().strip()
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the .part may already be complete
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return _finish(part, dest, sha256, url)
            part.unlink(missing_ok=True)
            raise DownloadError(f"could not resume {url}: server rejected the range; partial file removed, "
                                "run again to restart") from exc
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}. "
                            f"{_offline_hint(url, dest, sha256)}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}). {_offline_hint(url, dest, sha256)}") from exc

    with resp:
        status = getattr(resp, "status", 200)
        if offset and status == 206:
            start = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(f"{url}: server resumed at the wrong offset "
                                    f"({resp.headers.get('Content-Range')!r}, expected {offset})")
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # full content (also when the server ignored Range, or the file changed: If-Range)
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if validator and not validator.startswith("W/"):  # weak ETags cannot validate byte ranges
                validator_file.write_text(validator)
            else:
                validator_file.unlink(missing_ok=True)
        done = offset
        last_report = -1
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(chunk_size)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if progress and total:
                        pct = int(100 * done / total)
                        if pct // 10 != last_report:
                            last_report = pct // 10
                            print(f"{dest.name}: {pct}% of {total / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise DownloadError(f"download of {url} interrupted at {done} bytes ({exc}); "
                                f"run again to resume from {part}") from exc
    if total is not None and done != total:
        raise DownloadError(f"download of {url} incomplete: {done} of {total} bytes; run again to resume "
                            f"from {part}")
    return _finish(part, dest, sha256, url)


def _validator_path(part: Path) -> Path:
    """Where the ETag (or Last-Modified) of the response that started ``part`` is kept, for If-Range."""
    return part.with_name(part.name + ".validator")


def _finish(part: Path, dest: Path, sha256: str | None, url: str) -> Path:
    _validator_path(part).unlink(missing_ok=True)
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink(missing_ok=True)
            raise ChecksumError(f"sha256 mismatch for {url}: got {got}, expected {sha256}; "
                                "the partial file was deleted")
    os.replace(part, dest)
    return dest


def read_manifest(root: str | Path) -> dict[str, str]:
    """File name -> sha256 recorded in ``<root>/SHA256SUMS`` (empty if there is none)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return {}
    sums: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if m is None:
            raise ValueError(f"{path}:{i}: expected '<64 hex digits>  <file name>', got {line!r}")
        sums[m.group(2)] = m.group(1).lower()
    return sums


def _record(root: Path, name: str, digest: str) -> None:
    """Add ``name``'s sha256 to ``<root>/SHA256SUMS``: under a lock, so that downloads running side by side into
    one folder each keep their line, and written atomically."""
    with held_lock(root / f".{MANIFEST}.lock"):
        sums = read_manifest(root)
        sums[name] = digest
        write_text_atomic(root / MANIFEST, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def fetch(name: str, root: str | Path, **kwargs) -> Path:
    """Download a file of :data:`KNOWN_FILES` by name into ``root``; returns its path.

    The expected sha256 is the pinned one, else the one recorded in ``<root>/SHA256SUMS`` by an earlier
    download; a file with neither gets its sha256 recorded there once it is complete.
    """
    if name not in KNOWN_FILES:
        raise ValueError(f"unknown file {name!r}; known: {', '.join(KNOWN_FILES)}")
    f, root = KNOWN_FILES[name], Path(root)
    recorded = read_manifest(root).get(f.name)
    expected = f.sha256 or recorded
    path = download(f.url, root / f.name, expected, **kwargs)
    if recorded is None:
        _record(root, f.name, expected.lower() if expected else sha256_file(path))
    return path


def verify(root: str | Path) -> dict[str, str]:
    """Check every file in ``<root>/SHA256SUMS`` (``fetch`` writes pinned sums there too); name -> "ok",
    "MISMATCH" or "missing"."""
    root = Path(root)
    sums = read_manifest(root)
    if not sums:
        raise ValueError(f"nothing to verify: no {MANIFEST} in {root} (it is written by the first download)")
    return {n: "missing" if not (root / n).is_file() else ("ok" if sha256_file(root / n) == d else "MISMATCH")
            for n, d in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help=f"groups ({', '.join(GROUPS)}) or file names")
    parser.add_argument("--root", default="downloads/edm", help="destination folder (default downloads/edm)")
    parser.add_argument("--list", action="store_true", help="list known files and groups")
    parser.add_argument("--verify", action="store_true", help=f"re-check the files in --root against {MANIFEST}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.verify:
        try:
            status = verify(args.root)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for n, st in status.items():
            print(f"{st:8s} {Path(args.root) / n}")
        return 0 if all(st == "ok" for st in status.values()) else 1
    if args.list or not args.items:
        for f in KNOWN_FILES.values():
            print(f"{f.name:36s} {f.description}\n{'':36s} {f.url}")
        for g, names in GROUPS.items():
            print(f"group {g}: {', '.join(names)}")
        return 0
    names: list[str] = []
    for item in args.items:
        for n in GROUPS.get(item, [item]):
            if n not in names:
                names.append(n)
    try:
        for n in names:
            path = fetch(n, args.root, progress=not args.quiet)
            print(path)
    except (DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
