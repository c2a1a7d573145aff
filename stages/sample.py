"""sample: data/tokens/corpus.parquet → data/windows/{train,val}.bin + meta.json; counts → metrics/sample.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm.data.windows import write_splits
from llm.io import write_json
from stages.common import WINDOWS, params_section, run, summary

CORPUS = Path("data/tokens/corpus.parquet")
METRICS = Path("metrics/sample.json")


@dataclass(frozen=True)
class SampleParams:
    """context_length: tokens per training window. stride: tokens between window starts (None: context_length).
    val_fraction: share of document chunks (chunk_tokens tokens each) held out for validation, chosen by seed."""

    context_length: int = 128
    stride: int | None = None
    val_fraction: float = 0.1
    chunk_tokens: int = 8192
    seed: int = 1337


def main() -> None:
    params = params_section("sample", SampleParams)
    meta = write_splits(
        CORPUS,
        WINDOWS,
        val_fraction=params.val_fraction,
        chunk_tokens=params.chunk_tokens,
        seed=params.seed,
        context_length=params.context_length,
        stride=params.stride,
    )
    write_json(WINDOWS / "meta.json", meta)
    write_json(
        METRICS, {f"{key}_{split}": meta[key][split] for key in ("n_tokens", "n_windows") for split in ("train", "val")}
    )
    summary("sample", {f"{split}_windows": meta["n_windows"][split] for split in ("train", "val")}, WINDOWS)


if __name__ == "__main__":
    run(main)
