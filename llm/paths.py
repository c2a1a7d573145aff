"""Where the local data mirror lives: `$LLM_DATA_MIRROR`, else the nearest `shared/data` beside an ancestor."""

from __future__ import annotations

import os
from pathlib import Path

MIRROR_ENV = "LLM_DATA_MIRROR"


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
