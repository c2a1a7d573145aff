"""File helpers: atomic writes (temp file + fsync + rename), reads whose failures are LLMErrors, sha256 digests."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import LLMError

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any exception the temporary file is removed and `path` is left as it was, so readers never
    see a half-written file. Parent directories are created. Temporary files of `path` left by a killed
    writer (SIGKILL runs no cleanup) are removed first: there is one writer per path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.{'?' * 8}.tmp"):  # mkstemp: 8 random chars
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def write_json(path: PathLike, data: Any) -> None:
    """Atomically write `data` as indented JSON with a trailing newline."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_utf8(path: PathLike, *, missing: str = "") -> str:
    """The UTF-8 text of file `path`; a missing, unreadable or undecodable file is an LLMError.

    missing: what to say after "<path> not found" (e.g. which stage makes the file).
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise LLMError(f"{path} not found{missing}") from err
    except UnicodeDecodeError as err:
        raise LLMError(f"{path} is not valid UTF-8 (byte {err.start})") from err
    except OSError as err:
        raise LLMError(f"cannot read {path}: {err.strerror or err}") from err


def read_json(path: PathLike, *, missing: str = "") -> dict[str, Any]:
    """The JSON object in file `path` (see `read_utf8`); invalid JSON or another top-level value is an LLMError."""
    try:
        data = json.loads(read_utf8(path, missing=missing))
    except json.JSONDecodeError as err:
        raise LLMError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise LLMError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
