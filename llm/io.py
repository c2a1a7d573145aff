"""File helpers: atomic writes (temp file + fsync + rename), reads whose failures are LLMErrors, sha256 digests.

Files and directories written here get the modes the umask gives (0644 and 0755 under umask 022), not the 0600
and 0700 of Python's temporary files; a disk that fills up while writing is an LLMError naming the file and the
space left, and leaves no half-written file behind. Within `outputs_together` (a stage's whole run) the new files
and folders replace their targets all at once, at the end, and only if the block succeeds.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llm.errors import LLMError
from llm.signals import STOP_SIGNALS, held_back

PathLike = str | os.PathLike[str]
_DISK_FULL_MESSAGES = ("unexpected pos", "os error 28")  # torch.save's and safetensors' words for ENOSPC


class _Pending:
    """What `outputs_together` will swap in: target -> its finished temporary file or folder, in write order; and
    what to do once they are in place."""

    def __init__(self) -> None:
        self.outputs: dict[Path, Path] = {}
        self.after: list[Callable[[], None]] = []

    def hold(self, target: Path, new: Path) -> bool:
        """Keep `new` for `target` (True), unless `target` lies in a folder being built (a `.tmp` folder of ours:
        that folder's own swap carries it; False)."""
        if any(part.endswith(".tmp") for part in target.parent.parts):
            return False
        key = Path(os.path.abspath(target))
        if (earlier := self.outputs.pop(key, None)) is not None:  # the same output written again: the last wins
            _remove(earlier)
        self.outputs[key] = new
        return True


_pending: _Pending | None = None


@contextlib.contextmanager
def outputs_together() -> Iterator[None]:
    """Within the block `atomic_path` and `replaced_dir` write their files and folders in full but leave them
    beside their targets; when the block succeeds they all take their targets' places at once (SIGINT and SIGTERM
    held back for those renames), then the `after_commit` actions run. When it fails, or the process is killed,
    every target is left as it was (a killed run's leftovers go with the next write of the same target). Until
    then `as_written(path)` shows a target's new contents. A nested block belongs to the outer one."""
    global _pending
    if _pending is not None:
        yield
        return
    _pending = pending = _Pending()
    try:
        yield
    except BaseException:
        for new in pending.outputs.values():
            _remove(new)
        raise
    finally:
        _pending = None
    with held_back(STOP_SIGNALS):
        for target, new in pending.outputs.items():
            _swap_in(new, target)
    for action in pending.after:
        action()


def after_commit(action: Callable[[], None]) -> None:
    """Run `action` once the outputs of the enclosing `outputs_together` are in place (at once outside one)."""
    if _pending is None:
        action()
    else:
        _pending.after.append(action)


def _held(path: PathLike) -> Path | None:
    """Where `outputs_together` holds the new contents of `path`: its temporary, or the place within the temporary
    of a folder that holds it; None when it holds none."""
    if _pending is None:
        return None
    full = Path(os.path.abspath(path))
    for owner in (full, *full.parents):
        if (new := _pending.outputs.get(owner)) is not None:
            return new / full.relative_to(owner)
    return None


@contextlib.contextmanager
def as_written(path: PathLike) -> Iterator[Path]:
    """`path` as this process last wrote it, under its own name: the path itself, or, while `outputs_together`
    holds it back, a hard-linked copy of the new contents in a temporary folder beside them (for readers that take
    the name from the path, such as MLflow's artifact logging)."""
    target, new = Path(path), _held(path)
    if new is None:
        yield target
        return
    for stale in new.parent.glob(f".{glob.escape(target.name)}.view.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    holder = temporary_dir(new.parent, f".{target.name}.view.")  # beside the new contents: same filesystem
    try:
        view = holder / target.name
        if new.is_dir():
            shutil.copytree(new, view, copy_function=os.link)
        else:
            os.link(new, view)
        yield view
    finally:
        shutil.rmtree(holder, ignore_errors=True)


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
    tmp, held = Path(tmp_name), False
    try:
        with disk_full_is_an_error(target, tmp, needed):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o666 & ~umask())  # mkstemp made it 0600
        held = _pending is not None and _pending.hold(target, tmp)
        if not held:
            _swap_in(tmp, target)
    finally:
        if not held:
            tmp.unlink(missing_ok=True)


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
    tmp, held = temporary_dir(target.parent, f".{target.name}."), False
    try:
        yield tmp
        for written in tmp.rglob("*"):
            if written.is_file():
                with open(written, "rb") as f:
                    os.fsync(f.fileno())
        held = _pending is not None and _pending.hold(target, tmp)
        if not held:
            _swap_in(tmp, target)
    finally:
        if not held:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    """Rename the finished file or folder `new` onto `target` (a folder: the old one goes aside, then away)."""
    if new.is_dir():
        previous = target.parent / f".{target.name}.previous.tmp"
        if target.exists():
            os.replace(target, previous)
        os.replace(new, target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(new, target)
    _fsync_dir(target.parent)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
