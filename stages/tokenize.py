"""tokenize: data/raw/corpus/*.txt → data/tokens/corpus.parquet (GPT-2 BPE), stats → metrics/data.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm.data.corpus import tokenize_corpus
from llm.io import write_json
from llm.tokenizer import get_tokenizer
from stages.common import RANKS_FILE, RAW, params_section, run, summary

OUT = Path("data/tokens/corpus.parquet")
METRICS = Path("metrics/data.json")


@dataclass(frozen=True)
class TokenizeParams:
    """strip_gutenberg: drop Project Gutenberg headers/footers. allow_replacement: decode invalid UTF-8 as U+FFFD
    instead of failing. row_group_tokens: Parquet row group size. num_threads: encoder threads (0: all CPUs)."""

    strip_gutenberg: bool = True
    allow_replacement: bool = False
    row_group_tokens: int = 1 << 20
    num_threads: int = 0


def main() -> None:
    params = params_section("tokenize", TokenizeParams)
    stats = tokenize_corpus(
        RAW / "corpus",
        OUT,
        get_tokenizer(RANKS_FILE),
        strip_boilerplate=params.strip_gutenberg,
        allow_replacement=params.allow_replacement,
        row_group_tokens=params.row_group_tokens,
        num_threads=params.num_threads or None,
    )
    write_json(METRICS, stats.to_dict())
    summary("tokenize", {"documents": stats.documents, "tokens": stats.tokens, "tokens_per_s": stats.tokens_per_s}, OUT)


if __name__ == "__main__":
    run(main)
