"""Where things live: the repository a stage runs in (`repo_root`) and the local data mirror (`find_mirror`:
`$LLM_DATA_MIRROR`, else the nearest `shared/data` beside an ancestor)."""

from __future__ import annotations

import os
from pathlib import Path

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


def find_mirror(start: Path | None = None) -> Path | None:
    """The data mirror directory, or None.

    `$LLM_DATA_MIRROR` wins when set. Otherwise the first `<ancestor>/shared/data` of `start` (default: the
    working directory) is used, so a checkout at `X/main` finds `X/shared/data`, and so does a temporary
    copy that `dvc exp run --temp` makes inside that checkout.
    """
    env = os.environ.get(MIRROR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for ancestor in (here, *here.parents):
        candidate = ancestor / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None
