"""fetch: every source of params `data` → data/raw/…, copied from the data mirror or downloaded, sha256-checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm.data.sources import Source, fetch_all
from llm.paths import find_mirror
from stages.common import params_section, run

RAW_DIR = Path("data/raw")


@dataclass(frozen=True)
class DataParams:
    """mirror: folder laid out like data/raw (relative paths are also tried from ancestor folders; None: always
    download; $LLM_DATA_MIRROR overrides). sources: the files to fetch."""

    mirror: str | None = "../shared/data"
    sources: list[Source] = field(default_factory=list)


def main() -> None:
    params = params_section("data", DataParams)
    mirror = find_mirror(setting=params.mirror)
    counts = fetch_all(params.sources, RAW_DIR, mirror)
    print(
        f"fetch: {len(params.sources)} files → {RAW_DIR}: {counts['mirror']} from mirror {mirror}, "
        f"{counts['download']} downloaded"
    )


if __name__ == "__main__":
    run(main)
