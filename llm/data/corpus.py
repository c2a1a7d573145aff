"""A corpus (text files, tables, datasets: `llm.data.inputs`) → one Parquet file of GPT-2 token ids, streamed.

Schema (one row per non-empty document, in input order): `doc_id` int64 (0, 1, …), `source` string (file
path relative to its input's folder, `:<line>`/`:<row>` added for a table's rows), `n_tokens` int32, `tokens`
list<uint16>. Row groups hold about `row_group_tokens` tokens each. Memory is bounded by two text batches
(`batch_chars`: one encoding, the next being read), one row group and the largest single document, whatever the
size of the corpus.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tqdm import tqdm

from llm.data.inputs import CorpusInput, Document, input_bytes, read_documents
from llm.data.text import strip_gutenberg
from llm.errors import LLMError
from llm.io import atomic_path
from llm.tokenizer import tokenizer_fingerprint

SCHEMA = pa.schema(
    [("doc_id", pa.int64()), ("source", pa.string()), ("n_tokens", pa.int32()), ("tokens", pa.list_(pa.uint16()))]
)
SEPARATOR = "<|endoftext|>"  # joins the pieces of one encoder call (a special token: the pieces encode apart)
TOKENIZER_KEY = b"tokenizer"  # Parquet key-value metadata: which token ids these are
# A space right after a non-space character always starts a new pre-tokenizer piece of the GPT-2 regex (no
# piece can run across it), so text cut before such a space encodes to exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S) ")


@dataclass(frozen=True)
class CorpusStats:
    """What `tokenize_corpus` did: counts, input bytes (before normalisation), and wall time in seconds."""

    documents: int
    empty_documents: int
    tokens: int
    bytes: int
    row_groups: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def split_text(text: str, piece_chars: int) -> list[str]:
    """Cut `text` into pieces of about `piece_chars` characters (or more) that encode independently.

    Each cut is placed before the first space after the target length that follows a non-space character,
    so `sum(encode(piece) for piece in pieces) == encode(text)` for the GPT-2 tokenizer.
    """
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _SAFE_CUT.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def tokenize_corpus(
    corpus: str | Path | Sequence[CorpusInput],
    out_path: str | Path,
    enc: tiktoken.Encoding,
    *,
    strip_boilerplate: bool = True,
    allow_replacement: bool = False,
    row_group_tokens: int = 1 << 20,
    num_threads: int | None = None,
    batch_chars: int = 8 << 20,
    piece_chars: int = 1 << 16,
    progress: bool = True,
) -> CorpusStats:
    """Tokenize every document of `corpus` (a folder, or inputs) into the Parquet file `out_path`.

    The file is written atomically: an error (a bad file or row) leaves no output. Documents are read
    `batch_chars` characters at a time (the next while one encodes), cut into `piece_chars` pieces and encoded on
    `num_threads` threads (default: all CPUs) exactly like `enc.encode_ordinary` (special tokens are plain text).
    Empty documents (after boilerplate removal) are skipped; a corpus with no tokens at all is an error.
    """
    inputs = [CorpusInput(path=str(corpus))] if isinstance(corpus, str | Path) else list(corpus)
    if not inputs:
        raise LLMError("the corpus has no inputs (params tokenize.inputs)")
    if row_group_tokens < 1:
        raise LLMError(f"row_group_tokens (params tokenize.row_group_tokens) must be positive, got {row_group_tokens}")
    if num_threads is not None and num_threads < 1:
        raise LLMError(f"num_threads (params tokenize.num_threads, 0: all CPUs) must be positive, got {num_threads}")
    threads = num_threads or os.cpu_count() or 1
    started = time.perf_counter()
    n_docs = n_empty = n_tokens = n_groups = pending_tokens = 0
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal n_docs, n_groups, pending_tokens
        if pending:
            writer.write_table(_table(pending, first_id=n_docs))
            n_docs, n_groups, pending_tokens = n_docs + len(pending), n_groups + 1, 0
            pending.clear()

    def encode(piece: str) -> np.ndarray:
        # = encode_ordinary (no special token is allowed, none is refused), but straight into a numpy buffer:
        # no Python int per token. Runs without the GIL, so the threads encode in parallel.
        return enc.encode_to_numpy(piece, disallowed_special=()).astype(np.uint16)

    def encode_all(pieces: list[str]) -> list[np.ndarray]:
        # One encoder call (one stretch without the GIL) for a task's many small pieces: joined by <|endoftext|>,
        # allowed there as the special token, each piece encodes on its own (tiktoken encodes the text between
        # special tokens separately); the tokens are cut again at its id. A piece holding that text is plain text.
        if any(SEPARATOR in piece for piece in pieces):
            return [encode(piece) for piece in pieces]
        tokens = enc.encode_to_numpy(SEPARATOR.join(pieces), allowed_special={SEPARATOR}, disallowed_special=())
        first, *rest = np.split(tokens.astype(np.uint16), np.flatnonzero(tokens == separator_id))
        return [first, *(part[1:] for part in rest)]

    separator_id = enc.encode_single_token(SEPARATOR)
    schema = SCHEMA.with_metadata({TOKENIZER_KEY: tokenizer_fingerprint().encode()})
    total_bytes = input_bytes(inputs)
    n_read, from_text_files = 0, all(item.path is not None and (item.format or "text") == "text" for item in inputs)
    with (
        atomic_path(out_path) as tmp,
        pq.ParquetWriter(tmp, schema) as writer,
        ThreadPoolExecutor(threads) as pool,
        ThreadPoolExecutor(1) as reader,
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=None if progress else True) as bar,
    ):
        documents = read_documents(inputs, allow_replacement=allow_replacement)
        for batch in _read_ahead(_batches(documents, batch_chars, strip_boilerplate), reader):
            n_read += len(batch)
            pieces = [split_text(doc.text, piece_chars) for doc in batch]
            flat = [p for doc in pieces for p in doc]
            size = -(-len(flat) // (4 * threads))  # a few tasks per thread: many small rows cost one task each
            encoded = chain.from_iterable(pool.map(encode_all, (flat[i : i + size] for i in range(0, len(flat), size))))
            for (source, _, size), doc_pieces in zip(batch, pieces, strict=True):
                tokens = next(encoded) if len(doc_pieces) == 1 else np.concatenate([next(encoded) for _ in doc_pieces])
                bar.update(size)
                if tokens.size == 0:
                    n_empty += 1
                    continue
                pending.append((source, tokens))
                n_tokens += tokens.size
                pending_tokens += tokens.size
                if pending_tokens >= row_group_tokens:
                    flush()
        flush()
        if n_docs == 0:
            what = "text file(s)" if from_text_files else "document(s)"
            names = ", ".join(item.name for item in inputs)
            raise LLMError(f"corpus {names} is empty: its {n_read} {what} hold no text")
    return CorpusStats(n_docs, n_empty, n_tokens, total_bytes, n_groups, time.perf_counter() - started)


def _batches(documents: Iterable[Document], batch_chars: int, strip_boilerplate: bool) -> Iterator[list[Document]]:
    """Groups of documents (boilerplate stripped if asked) holding about `batch_chars` characters (or one)."""
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        if strip_boilerplate:
            doc = doc._replace(text=strip_gutenberg(doc.text))
        batch.append(doc)
        chars += len(doc.text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_ahead(batches: Iterator[list[Document]], reader: ThreadPoolExecutor) -> Iterator[list[Document]]:
    """`batches`, each read (files, parsing, boilerplate removal) on `reader` while the caller encodes the one before.

    The reading holds the GIL while the encoder threads run without it, so the two overlap. A reading error is
    raised here, when the caller asks for that batch.
    """
    ahead = reader.submit(next, batches, None)
    while (batch := ahead.result()) is not None:
        ahead = reader.submit(next, batches, None)
        yield batch


def _table(rows: list[tuple[str, np.ndarray]], first_id: int) -> pa.Table:
    lengths = np.array([t.size for _, t in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([t for _, t in rows])))
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(first_id, first_id + len(rows), dtype=np.int64)),
            pa.array([source for source, _ in rows], pa.string()),
            pa.array(lengths.astype(np.int32)),
            tokens,
        ],
        schema=SCHEMA,
    )


def read_tokenizer_fingerprint(path: str | Path) -> str | None:
    """The tokenizer fingerprint stored in a corpus Parquet file's metadata (None if absent)."""
    metadata = pq.read_schema(path).metadata or {}
    value = metadata.get(TOKENIZER_KEY)
    return value.decode() if value is not None else None
