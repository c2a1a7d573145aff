"""Where things live: the repository a stage runs in (`repo_root`) and the local data mirror (`find_mirror`:
`$LLM_DATA_MIRROR`, else the nearest `shared/data` beside an ancestor)."""

from __future__ import annotations

import os
from pathlib import Path

from llm.errors import LLMError

MIRROR_ENV = "LLM_DATA_MIRROR"


def repo_root(start: Path | None = None) -> Path:
    """The repository a stage runs in: the real one for DVC's temporary experiment copies
    (`<repo>/.dvc/tmp/exps/...`), else the nearest ancestor holding `.dvc` or `.git` (else `start`)."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((p for p in (here, *here.parents) if (p / ".dvc").is_dir() or (p / ".git").exists()), here)


def find_mirror(start: Path | None = None, setting: str | None = "shared/data") -> Path | None:
    """The data mirror directory, or None (no mirror: download everything).

    `$LLM_DATA_MIRROR` wins when set (it must be a directory). Otherwise `setting`: None means no mirror; an
    absolute path is used if it is a directory; a relative one is tried against `start` (default: the working
    directory) and each of its ancestors. So the default finds `X/shared/data` from a checkout at `X/main`, and
    so does a temporary copy that `dvc exp run --temp` makes inside that checkout (.dvc/tmp/exps/…).
    """
    env = os.environ.get(MIRROR_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise LLMError(f"{MIRROR_ENV}={env} is not a directory")
        return path
    if setting is None:
        return None
    path = Path(setting).expanduser()
    if path.is_absolute():
        return path if path.is_dir() else None
    here = (start or Path.cwd()).resolve()
    return next(((base / path).resolve() for base in (here, *here.parents) if (base / path).is_dir()), None)
