"""Download the public files the EDM experiments need: teacher pickles, the Inception detector and FID
reference statistics (EDM's published URLs, in ``KNOWN_FILES``). Files go to ``<root>/<name>``.

Resumable (HTTP Range on a ``.part`` file, atomic rename when complete) and with a clear message when offline.
Files whose sha256 (and size) is published are pinned in ``KNOWN_FILES``: a download or a file already in the
folder that differs is refused, whatever ``<root>/SHA256SUMS`` says. NVIDIA publishes no checksums for the
EDM pickles and FID references, and none was found elsewhere, so for those the sha256 of a download that this
code completed itself (its length checked against the server's) is recorded in ``SHA256SUMS`` (``sha256sum``
format) and later runs check the file against it. A file found in the folder with neither a pin nor a record is
used but never recorded: ``fetch`` warns that it cannot be verified (delete it and run again to download and
record it). ``--verify`` re-checks every recorded or pinned file (compare ``SHA256SUMS`` with a colleague's to
be sure of the originals). The weights are NVIDIA's (CC BY-NC-SA 4.0): they are downloaded to the user's disk,
never shipped with this package.

Usage::

    python -m fdistill_lab.download imagenet64 --root downloads/edm
    python -m fdistill_lab.download cifar10 --root downloads/edm
    python -m fdistill_lab.download --verify --root downloads/edm
    python -m fdistill_lab.download --list
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..files import file_sha256, held_lock, write_text_atomic

__all__ = ["RemoteFile", "KNOWN_FILES", "GROUPS", "MANIFEST", "DownloadError", "ChecksumError",
           "UnverifiedFileWarning", "download", "fetch", "read_manifest", "verify", "sha256_file", "main"]

EDM_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm"
MANIFEST = "SHA256SUMS"  # in the download root: "<sha256>  <file name>" per line, as sha256sum writes


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    sha256: str | None = None  # published digest (pinned); None: recorded in SHA256SUMS by the first download
    description: str = ""
    size: int | None = None  # published size in bytes, checked before hashing; None: the server's length only


KNOWN_FILES: dict[str, RemoteFile] = {f.name: f for f in [
    # EDM pickles and FID references: NVIDIA publishes no checksum, and none was found in public code, issues
    # or pages (searched 2026-12), so they stay unpinned (the first complete download is recorded).
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
               # sha256 of this URL as pinned by crowsonkb/k-diffusion, k_diffusion/evaluation.py
               # (InceptionV3FeatureExtractor, commit 0f9902fcbf06414cb53d9a1db99b3a61205b0ca7), and by other public
               # FID code; the size is stated beside the same digest in two public repositories' FID scripts/reports
               sha256="f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
               size=95_607_719,
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
    """A file's sha256 or size differs from the expected one (a partial download is deleted)."""


class UnverifiedFileWarning(UserWarning):
    """A file is used although nothing can confirm it is the published one (no pin, no record)."""


sha256_file = file_sha256  # hex sha256 of a file (the checkpoints' routine, under the name this module exports)


def _offline_hint(url: str, dest: Path, sha256: str | None) -> str:
    check = f" and check its sha256 is {sha256}" if sha256 else ""
    return (f"If this machine is offline, download {url} on another machine, copy it to {dest}{check}; "
            "it will then be used as is.")


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


# how a file came to be there: already present, downloaded with its length checked against the server's, or
# downloaded from a server that sent no length (complete as far as anyone can tell)
_Outcome = Literal["present", "complete", "unsized"]


def download(url: str, dest: str | Path, sha256: str | None = None, *, size: int | None = None,
             timeout: float = 60.0, chunk_size: int = 1 << 20, resume: bool = True, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless it already exists (and matches ``sha256`` and ``size`` when given).

    Data is written to ``dest.part``; an existing ``.part`` is resumed with an HTTP Range request, guarded by
    If-Range with the ETag (or Last-Modified) of the first response, so a file replaced on the server restarts
    instead of being spliced (as does a server that ignores Range, and a ``.part`` whose first response had no
    validator). One process downloads a file at a time (``dest.lock``); a second waits, then finds it done.
    On completion the size is checked against the server's length and ``size``, the sha256 against ``sha256``
    (if given), and the file is renamed atomically to ``dest``. A mismatch raises :class:`ChecksumError`.
    """
    return _obtain(url, Path(dest), sha256, size=size, timeout=timeout, chunk_size=chunk_size, resume=resume,
                   progress=progress)[0]


def _obtain(url: str, dest: Path, sha256: str | None = None, *, size: int | None = None, timeout: float = 60.0,
            chunk_size: int = 1 << 20, resume: bool = True, progress: bool = True,
            on_complete: Callable[[Path, _Outcome], None] | None = None) -> tuple[Path, _Outcome]:
    """:func:`download`, also saying how the file came to be there; ``on_complete`` runs under the file's lock
    right after this call downloaded it (so that a process waiting for the lock sees what it recorded)."""
    if _present(dest, sha256, size):
        return dest, "present"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download of a file at a time: a second would append to the first's .part (two groups share files)
    with held_lock(dest.with_name(dest.name + ".lock")):
        if _present(dest, sha256, size):  # the download we waited for has just finished it
            return dest, "present"
        path, outcome = _download(url, dest, sha256, size, timeout, chunk_size, resume, progress)
        if on_complete is not None:
            on_complete(path, outcome)
        return path, outcome


def _present(dest: Path, sha256: str | None, size: int | None = None) -> bool:
    """True if ``dest`` exists (and matches ``size`` and ``sha256`` when given); ChecksumError if it exists but
    does not."""
    if not dest.is_file():
        return False
    if size is not None and (have := dest.stat().st_size) != size:
        raise ChecksumError(f"{dest} exists but has {have} bytes, not the published {size} (truncated or another "
                            "file); delete it to download again")
    if sha256 is None or sha256_file(dest) == sha256.lower():
        return True
    raise ChecksumError(f"{dest} exists but its sha256 is not {sha256}; delete it to download again")


def _download(url: str, dest: Path, sha256: str | None, size: int | None, timeout: float, chunk_size: int,
              resume: bool, progress: bool) -> tuple[Path, _Outcome]:
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
                return _finish(part, dest, sha256, size, url), "complete"
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
    return _finish(part, dest, sha256, size, url), ("complete" if total is not None else "unsized")


def _validator_path(part: Path) -> Path:
    """Where the ETag (or Last-Modified) of the response that started ``part`` is kept, for If-Range."""
    return part.with_name(part.name + ".validator")


def _finish(part: Path, dest: Path, sha256: str | None, size: int | None, url: str) -> Path:
    _validator_path(part).unlink(missing_ok=True)
    if size is not None and (have := part.stat().st_size) != size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"size mismatch for {url}: got {have} bytes, expected {size}; "
                            "the partial file was deleted")
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
    """Download a file of :data:`KNOWN_FILES` by name into ``root`` (unless present); returns its path.

    A pinned (published) sha256 and size are always checked, and a file that differs is refused with
    :class:`ChecksumError` whatever ``<root>/SHA256SUMS`` says (a disagreeing line there is corrected, with a
    warning). Otherwise the file is checked against its line in ``SHA256SUMS``; without one, only a file this
    call downloaded completely (length checked against the server's) gets its sha256 recorded, and a file that
    was already there is used with an :class:`UnverifiedFileWarning` and left unrecorded.
    """
    if name not in KNOWN_FILES:
        raise ValueError(f"unknown file {name!r}; known: {', '.join(KNOWN_FILES)}")
    f, root = KNOWN_FILES[name], Path(root)
    dest = root / f.name
    recorded = read_manifest(root).get(f.name)
    if f.sha256 is not None:
        pinned = f.sha256.lower()
        path = download(f.url, dest, pinned, size=f.size, **kwargs)
        if recorded != pinned:
            if recorded is not None:
                warnings.warn(f"{root / MANIFEST} lists {recorded} for {f.name}, not its published sha256 "
                              f"{pinned}; the file matches the published one, so the line was corrected",
                              stacklevel=2)
            _record(root, f.name, pinned)
        return path
    if recorded is not None:
        return download(f.url, dest, recorded, size=f.size, **kwargs)

    def record(path: Path, outcome: _Outcome) -> None:  # under the file's lock: a waiting fetch sees the line
        if outcome == "complete":
            _record(root, f.name, sha256_file(path))

    path, outcome = _obtain(f.url, dest, None, size=f.size, on_complete=record, **kwargs)
    if outcome == "present":
        recorded = read_manifest(root).get(f.name)  # another fetch may have downloaded and recorded it meanwhile
        if recorded is not None:
            if sha256_file(path) != recorded:
                raise ChecksumError(f"{path} exists but its sha256 is not {recorded}; delete it to download again")
            return path
        warnings.warn(f"cannot verify {path}: it was already there, no sha256 is published for it and "
                      f"{root / MANIFEST} has no line for it, so it is used as is and not recorded. To verify it, "
                      f"delete it and run `python -m fdistill_lab.download {f.name} --root {root}` to download "
                      "it again (the download is checked against the server's length and recorded)",
                      UnverifiedFileWarning, stacklevel=2)
    elif outcome == "unsized":
        warnings.warn(f"cannot verify {path}: the server sent no length, so its completeness is unknown and its "
                      f"sha256 was not recorded in {root / MANIFEST}; delete it and run again to retry",
                      UnverifiedFileWarning, stacklevel=2)
    return path


def verify(root: str | Path) -> dict[str, str]:
    """Check every file listed in ``<root>/SHA256SUMS`` and every file of :data:`KNOWN_FILES` present in
    ``root``; name -> "ok", "MISMATCH", "missing" or "unverified" (present, but no digest to check it by).

    A file with a pinned sha256 (and size) is checked against that, whatever ``SHA256SUMS`` says; a line there
    that disagrees with the published digest is itself reported as "MISMATCH".
    """
    root = Path(root)
    sums = read_manifest(root)
    names = list(sums) + [n for n in KNOWN_FILES if n not in sums and (root / n).is_file()]
    if not names:
        raise ValueError(f"nothing to verify: no {MANIFEST} in {root} (it is written by the first download)")
    status: dict[str, str] = {}
    for n in names:
        path, known = root / n, KNOWN_FILES.get(n)
        pinned = known.sha256.lower() if known is not None and known.sha256 else None
        expected = pinned or sums.get(n)
        if not path.is_file():
            status[n] = "missing"
        elif pinned is not None and sums.get(n, pinned) != pinned:
            status[n] = "MISMATCH"  # the record disagrees with the published digest
        elif known is not None and known.size is not None and path.stat().st_size != known.size:
            status[n] = "MISMATCH"
        elif expected is None:
            status[n] = "unverified"
        else:
            status[n] = "ok" if sha256_file(path) == expected else "MISMATCH"
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help=f"groups ({', '.join(GROUPS)}) or file names")
    parser.add_argument("--root", default="downloads/edm", help="destination folder (default downloads/edm)")
    parser.add_argument("--list", action="store_true", help="list known files and groups")
    parser.add_argument("--verify", action="store_true",
                        help=f"re-check the files in --root against their published sha256 or {MANIFEST}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.verify:
        try:
            status = verify(args.root)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for n, st in status.items():
            print(f"{st:10s} {Path(args.root) / n}")
        if "unverified" in status.values():
            print("unverified: no published or recorded sha256; delete such a file and download it again to "
                  "record one", file=sys.stderr)
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
