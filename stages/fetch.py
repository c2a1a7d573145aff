"""fetch: every source of params `data` → data/raw/…, copied from the data mirror or downloaded, sha256-checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.data.sources import Source, fetch_all
from llm.paths import find_mirror
from stages.common import RAW, params_section, run, summary


@dataclass(frozen=True)
class DataParams:
    """mirror: folder laid out like data/raw (relative paths are also tried from ancestor folders; None: always
    download; $LLM_DATA_MIRROR overrides). sources: the files to fetch."""

    mirror: str | None = "../shared/data"
    sources: list[Source] = field(default_factory=list)


def main() -> None:
    params = params_section("data", DataParams)
    mirror = find_mirror(setting=params.mirror)
    counts = fetch_all(params.sources, RAW, mirror)
    summary(
        "fetch", {"files": len(params.sources), "from_mirror": counts["mirror"], "downloaded": counts["download"]}, RAW
    )


if __name__ == "__main__":
    run(main)
