"""File helpers: atomic writes (temp file + fsync + rename), reads whose failures are LLMErrors, sha256 digests.

Files and directories written here get the modes the umask gives (0644 and 0755 under umask 022), not the 0600
and 0700 of Python's temporary files; a disk that fills up while writing is an LLMError naming the file and the
space left, and leaves no half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import LLMError

PathLike = str | os.PathLike[str]
_DISK_FULL_MESSAGES = ("unexpected pos", "os error 28")  # torch.save's and safetensors' words for ENOSPC


@contextlib.contextmanager
def atomic_path(path: PathLike, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any exception the temporary file is removed and `path` is left as it was, so readers never
    see a half-written file. Parent directories are created. Temporary files of `path` left by a killed
    writer (SIGKILL runs no cleanup) are removed first: there is one writer per path. A full disk is an
    LLMError (see `disk_full_is_an_error`; `needed`: the file's size in bytes when the writer knows it).
    """
    target = Path(path)
    with writable(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{glob.escape(target.name)}.{'?' * 8}.tmp"):  # mkstemp: 8 random chars
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_is_an_error(target, tmp, needed):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o666 & ~umask())  # mkstemp made it 0600
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def temporary_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory `parent/<prefix><random>.tmp` (`parent` created if needed) with the mode the umask
    gives (mkdtemp's is 0700); a directory that cannot be written is an LLMError naming it."""
    with writable(parent):
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def replaced_dir(path: PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside `path` to write into; when the block succeeds it takes the place of
    `path` whole (files the new contents lack are gone with the old directory), otherwise it is removed and `path`
    is left exactly as it was.

    The swap is two renames (`path` → `.<name>.previous.tmp`, the new one → `path`); the leftovers of a killed
    writer are cleaned up on the next call: its unfinished directories are removed, and an old `path` caught
    between the two renames is put back first.
    """
    target = Path(path)
    previous = target.parent / f".{target.name}.previous.tmp"
    if previous.is_dir() and not target.exists():
        os.replace(previous, target)
    for stale in [previous, *target.parent.glob(f".{glob.escape(target.name)}.{'?' * 8}.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_dir(target.parent, f".{target.name}.")
    try:
        yield tmp
        for written in tmp.rglob("*"):
            if written.is_file():
                with open(written, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():
            os.replace(target, previous)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def writable(directory: Path) -> Iterator[None]:
    """Within the block, failing to create or write into `directory` (permissions, read-only filesystem, a file
    in its place) is an LLMError naming it."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        raise LLMError(f"cannot write into {directory}: {err.strerror or err}") from err


def umask() -> int:
    """The process's umask: from /proc on Linux (setting it to read it back would race with other threads)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def disk_full_is_an_error(
    target: PathLike, written: PathLike | None = None, needed: int | None = None
) -> Iterator[None]:
    """Within the block, running out of disk space while writing `target` raises an LLMError naming it, the
    space it needs (`needed` bytes, else more than the bytes already in `written`, the temporary file) and the
    space left.

    torch.save and safetensors report a full disk as a RuntimeError ("unexpected pos ...") and a SafetensorError
    ("... os error 28"), not as an OSError.
    """
    try:
        yield
    except Exception as err:
        full = getattr(err, "errno", None) == errno.ENOSPC or any(s in str(err) for s in _DISK_FULL_MESSAGES)
        if not full:
            raise
        parent = Path(target).parent
        free = shutil.disk_usage(parent).free if parent.is_dir() else 0
        size = Path(written).stat().st_size if written is not None and Path(written).is_file() else 0
        need = f"{needed:,} bytes" if needed else f"more than {size:,} bytes"
        raise LLMError(
            f"no space left on the device writing {target}: it needs {need}, {free:,} bytes are free in {parent}"
        ) from err


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
    except RecursionError as err:  # json's parser recurses once per nesting level
        raise LLMError(f"{path} is not valid JSON: nested too deeply") from err
    if not isinstance(data, dict):
        raise LLMError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_destination(out: PathLike, source: PathLike | None = None, *, force: bool = False) -> None:
    """Refuse to write a directory `out` that holds files (unless `force`), or that is, or lies inside, the directory
    `source` it is made from (even with `force`: that would rewrite the source while reading it). Paths are
    compared resolved (symlinks, `..`)."""
    target = Path(out).resolve()
    if source is not None and Path(source).exists():
        origin = Path(source).resolve()
        if target == origin or target.is_relative_to(origin):
            raise LLMError(f"{out} is (inside) the source {source}: write to another directory")
    if target.exists() and not target.is_dir():
        raise LLMError(f"{out} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise LLMError(f"{out} is not empty: choose an empty or new directory, or pass --force to write into it")


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
