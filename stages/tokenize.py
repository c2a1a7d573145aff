"""tokenize: the corpus inputs of params → data/tokens/corpus.parquet; stats → metrics/data.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from llm.data.corpus import tokenize_corpus
from llm.data.inputs import CorpusInput
from llm.errors import LLMError
from llm.io import write_json
from llm.tokenizer import get_tokenizer
from stages.common import RANKS_FILE, RAW, params_section, run, summary

OUT = Path("data/tokens/corpus.parquet")
METRICS = Path("metrics/data.json")
PIPELINE = Path("dvc.yaml")


@dataclass(frozen=True)
class TokenizeParams:
    """inputs: the corpus, in order (llm.data.inputs.CorpusInput: path or hf_dataset, format, text_column, split).
    strip_gutenberg: drop Project Gutenberg headers/footers. allow_replacement: decode invalid UTF-8 as U+FFFD
    instead of failing. row_group_tokens: Parquet row group size. num_threads: encoder threads (0: all CPUs)."""

    inputs: list[CorpusInput] = field(default_factory=lambda: [CorpusInput(path=str(RAW / "corpus"))])
    strip_gutenberg: bool = True
    allow_replacement: bool = False
    row_group_tokens: int = 1 << 20
    num_threads: int = 0


def check_deps(inputs: list[CorpusInput], pipeline: Path = PIPELINE) -> None:
    """Every local input must lie inside a dep of the tokenize stage in dvc.yaml, or DVC would not rerun tokenize
    when it changes (DVC cannot take a deps list from params): name the line to add."""
    if not pipeline.is_file():
        return
    deps = yaml.safe_load(pipeline.read_text(encoding="utf-8"))["stages"]["tokenize"].get("deps", [])
    for item in inputs:
        root = item.local_root
        if root is not None and not any(PurePosixPath(root.as_posix()).is_relative_to(dep) for dep in deps):
            raise LLMError(
                f"corpus input {item.name} is not among the tokenize stage's deps, so DVC would not rerun tokenize "
                f"when it changes: add `- {root.as_posix()}` under stages.tokenize.deps in {pipeline}"
            )


def main() -> None:
    params = params_section("tokenize", TokenizeParams)
    check_deps(params.inputs)
    stats = tokenize_corpus(
        params.inputs,
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
