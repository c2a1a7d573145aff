"""Raw data files: copied from a local mirror when it has them, else downloaded over HTTPS; sha256 checked either way.

A source's `path` is relative both to the destination folder (`data/raw/`) and to the mirror, whose layout is
the same (see ../shared/data/README.md). All files land atomically: a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from llm.errors import LLMError
from llm.io import atomic_path, sha256_file
from llm.paths import MIRROR_ENV

DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Source:
    """One raw file. `member`: when `url` is a zip archive, the archive member that is the file."""

    name: str
    url: str
    sha256: str
    path: str
    member: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise LLMError(f"source {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not self.url.startswith("https://"):
            raise LLMError(f"source {self.name!r}: url must start with https://, got {self.url!r}")
        rel = PurePosixPath(self.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise LLMError(f"source {self.name!r}: path must be relative inside data/raw/, got {self.path!r}")


def fetch_source(source: Source, dest: str | Path, mirror: Path | None = None) -> str:
    """Write `source` to `dest` atomically, from `mirror/source.path` if that exists, else from its URL.

    Returns "mirror" or "download". LLMError when neither works or the sha256 differs (naming file, expected
    and actual hash); `dest` is then untouched.
    """
    local = mirror / source.path if mirror is not None else None
    with atomic_path(dest) as tmp:
        if local is not None and local.is_file():
            shutil.copyfile(local, tmp)
            origin, where = "mirror", local
        else:
            _download(source, tmp, mirror)
            origin, where = "download", source.url
        actual = sha256_file(tmp)
        if actual != source.sha256:
            raise LLMError(
                f"{source.path} ({source.name}, from {where}): sha256 mismatch: expected {source.sha256}, got {actual}"
            )
    return origin


def fetch_all(sources: Sequence[Source], raw_dir: str | Path, mirror: Path | None = None) -> dict[str, int]:
    """Fetch every source under `raw_dir`; all or nothing: files are staged, then moved into place.

    Returns how many files came from the mirror and from downloads.
    """
    raw_dir = Path(raw_dir)
    for attr in ("name", "path"):
        seen = [getattr(s, attr) for s in sources]
        dupes = sorted({v for v in seen if seen.count(v) > 1})
        if dupes:
            raise LLMError(f"data sources: duplicate {attr} {dupes[0]!r}")
    check_no_strays(sources, raw_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.parent.glob(".fetch-*"):  # staging left by a killed fetch (SIGKILL runs no cleanup)
        shutil.rmtree(stale, ignore_errors=True)
    counts = {"mirror": 0, "download": 0}
    with tempfile.TemporaryDirectory(prefix=".fetch-", suffix=".tmp", dir=raw_dir.parent) as staging:
        for source in tqdm(sources, desc="fetch", unit="file", disable=None):
            counts[fetch_source(source, Path(staging) / source.path, mirror)] += 1
        for source in sources:
            (raw_dir / source.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(staging) / source.path, raw_dir / source.path)
    return counts


def check_no_strays(sources: Sequence[Source], raw_dir: str | Path) -> None:
    """LLMError naming the files in fetch's folders (`raw_dir/<first part of a source's path>/`) that no source
    writes (other than DVC's .gitignore files): DVC rewrites these folders, so a file of yours there would be
    lost. Nothing is deleted."""
    raw_dir, own = Path(raw_dir), {PurePosixPath(s.path) for s in sources}
    folders = sorted({raw_dir / path.parts[0] for path in own if len(path.parts) > 1})
    strays = [
        p for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".gitignore" and PurePosixPath(p.relative_to(raw_dir).as_posix()) not in own
    ]  # fmt: skip
    if strays:
        more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
        shown = ", ".join(p.as_posix() for p in strays[:3]) + more
        raise LLMError(
            f"{shown}: not fetched by any data.sources entry, and fetch's folders are DVC's to rewrite; fetch stops so "
            f"nothing of yours is lost: move your files to data/corpus/ and track them with `dvc add data/corpus` "
            f"(docs/data.md: Use your own data), or delete them if they are old downloads"
        )


def _download(source: Source, dest: Path, mirror: Path | None) -> None:
    """Stream `source.url` into `dest` (extracting `source.member` from a zip archive)."""
    try:
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            if source.member is None:
                _copy(response, dest)
                return
            with tempfile.TemporaryFile() as archive:
                shutil.copyfileobj(response, archive)
                archive.seek(0)
                with zipfile.ZipFile(archive) as zf, zf.open(source.member) as member:
                    _copy(member, dest)
    except (OSError, zipfile.BadZipFile, KeyError) as err:  # URLError and socket errors are OSErrors
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise  # a full disk, not a missing source: atomic_path names the file and the space left
        where = f"not in the mirror {mirror}" if mirror is not None else "no data mirror"
        raise LLMError(
            f"source {source.name!r} ({source.path}) is missing: {where} and download from {source.url} "
            f"failed ({type(err).__name__}: {err}); put the file in the mirror or set {MIRROR_ENV}"
        ) from err


def _copy(stream: BinaryIO, dest: Path) -> None:
    with open(dest, "wb") as f:
        shutil.copyfileobj(stream, f, 1 << 20)
