"""Training windows: the train/val token streams cut from the corpus, windows over them, and the (resumable)
order in which training visits them.

Window i of a stream with context length T and stride S is `tokens[i*S : i*S + T + 1]`: its first T tokens are
the input and its last T the target (shifted by one). A stream of N tokens holds `(N - T - 1) // S + 1`
windows when N > T, else none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from llm.data.corpus import read_tokenizer_fingerprint
from llm.errors import LLMError
from llm.io import atomic_path
from llm.tokenizer import EOT_ID, tokenizer_fingerprint

TOKEN_DTYPE = np.uint16
WINDOW_FORMULA = "n_windows = (n_tokens - context_length - 1) // stride + 1 if n_tokens > context_length else 0"


def count_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """Number of windows of `context_length + 1` tokens, `stride` apart, in a stream of `n_tokens` tokens."""
    return (n_tokens - context_length - 1) // stride + 1 if n_tokens > context_length else 0


class TokenWindows:
    """Windows over a flat uint16 token file opened with np.memmap (no copy of the stream).

    `ds[i]` → (input, target), int64 tensors of shape (context_length,); `ds.batch(idx)` → two (B, T) tensors.
    Picklable (DataLoader workers reopen the file instead of copying the stream).
    """

    def __init__(self, path: str | Path, context_length: int, stride: int | None = None) -> None:
        self.path = Path(path)
        self.context_length = _positive(context_length, "context_length")
        self.stride = _positive(context_length if stride is None else stride, "stride")
        if not self.path.is_file():
            raise LLMError(f"token file not found: {self.path} (run the sample stage: dvc repro sample)")
        size = self.path.stat().st_size
        if size % np.dtype(TOKEN_DTYPE).itemsize:
            raise LLMError(f"token file {self.path} has {size} bytes, not a whole number of uint16 tokens")
        self.n_tokens: int = size // np.dtype(TOKEN_DTYPE).itemsize
        self._n_windows = count_windows(self.n_tokens, self.context_length, self.stride)
        if self._n_windows == 0:
            raise LLMError(
                f"context_length {self.context_length} does not fit in {self.path} ({self.n_tokens} tokens): "
                f"a window needs context_length + 1 tokens; lower context_length or use more data"
            )
        self._open()

    def _open(self) -> None:
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._n_windows <= i < self._n_windows:
            raise IndexError(f"window {i} out of range for {self._n_windows} windows")
        start = (i % self._n_windows) * self.stride
        chunk = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather windows `indices` at once: (inputs, targets), each int64 of shape (B, context_length)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise LLMError(f"batch indices must be one-dimensional, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self._n_windows):
            raise IndexError(f"window indices must be in [0, {self._n_windows}), got {idx.min()}..{idx.max()}")
        offsets = idx[:, None] * self.stride + np.arange(self.context_length + 1)
        chunk = torch.from_numpy(self.tokens[offsets].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def batch_indices(
    n_windows: int,
    batch_size: int,
    step: int,
    *,
    seed: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Window indices (int64, shape (batch_size,)) for one rank at optimizer micro-step `step`.

    A pure function of its arguments, so a resumed run continues exactly. The windows form an endless stream
    of epochs, each a seeded permutation of all windows (sequential order when shuffle=False); micro-step s
    takes the global batch at stream positions [s*G, (s+1)*G) with G = batch_size*world_size, and rank r
    takes slice [r*batch_size : (r+1)*batch_size] of it. Every window is seen once per epoch.
    """
    for name, value in (("n_windows", n_windows), ("batch_size", batch_size), ("world_size", world_size)):
        _positive(value, name)
    if step < 0 or not 0 <= rank < world_size:
        raise LLMError(f"need step >= 0 and 0 <= rank < world_size, got step={step}, rank={rank}/{world_size}")
    start = step * batch_size * world_size + rank * batch_size
    positions = np.arange(start, start + batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n_windows)
    if not shuffle:
        return offsets
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = _permutation(n_windows, seed, int(epoch))[offsets[here]]
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False  # shared by every call for this epoch
    return perm


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise LLMError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def write_splits(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float,
    chunk_tokens: int,
    seed: int,
    context_length: int,
    stride: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cut the corpus Parquet file into `out_dir/train.bin` and `out_dir/val.bin`; return their description.

    Every document is cut into chunks of `chunk_tokens` tokens; a seeded choice of round(val_fraction * chunks)
    chunks is val, the rest train, so val is a fixed set whatever the window size. Within a split, consecutive
    chunks of one document stay joined and the other pieces are separated by EOT_ID. Both splits must hold a
    window of `context_length` (checked before anything is written). Streams the corpus row group by row group.
    Returns meta: context_length, stride, per-split n_tokens / n_windows / n_chunks, formula, tokenizer, ….
    """
    stride = context_length if stride is None else stride
    for name, value in (("context_length", context_length), ("stride", stride), ("chunk_tokens", chunk_tokens)):
        _positive(value, name)
    if not 0.0 < val_fraction < 1.0:
        raise LLMError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    parquet = _open_corpus(corpus)
    doc_tokens = parquet.read(columns=["n_tokens"]).column(0).to_numpy().astype(np.int64)
    doc_chunks = -(-doc_tokens // chunk_tokens)
    n_chunks = int(doc_chunks.sum())
    n_val = round(val_fraction * n_chunks)
    if not 0 < n_val < n_chunks:
        raise LLMError(
            f"cannot split {n_chunks} chunk(s) of {chunk_tokens} tokens with val_fraction {val_fraction} "
            f"(val would get {n_val}): lower chunk_tokens or change val_fraction"
        )
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_chunks, n_val, replace=False)] = True
    chunk_doc = np.repeat(np.arange(len(doc_tokens)), doc_chunks)
    chunk_start = (np.arange(n_chunks) - np.repeat(np.cumsum(doc_chunks) - doc_chunks, doc_chunks)) * chunk_tokens
    chunk_size = np.minimum(chunk_tokens, doc_tokens[chunk_doc] - chunk_start)
    new_piece = np.ones(n_chunks, dtype=bool)
    new_piece[1:] = (chunk_doc[1:] != chunk_doc[:-1]) | (is_val[1:] != is_val[:-1])

    meta: dict[str, Any] = {
        "context_length": context_length,
        "stride": stride,
        "formula": WINDOW_FORMULA,
        "tokenizer": tokenizer_fingerprint(),
        "eot_id": EOT_ID,
        "val_fraction": val_fraction,
        "chunk_tokens": chunk_tokens,
        "seed": seed,
        "documents": len(doc_tokens),
        "n_tokens": {},
        "n_windows": {},
        "n_chunks": {},
    }
    for name, mask in (("train", ~is_val), ("val", is_val)):
        n_tokens = int(chunk_size[mask].sum()) + int(new_piece[mask].sum()) - 1
        meta["n_tokens"][name], meta["n_chunks"][name] = n_tokens, int(mask.sum())
        meta["n_windows"][name] = count_windows(n_tokens, context_length, stride)
        if meta["n_windows"][name] == 0:
            raise LLMError(
                f"context_length {context_length} does not fit the {name} split ({n_tokens} tokens): a window "
                f"needs context_length + 1 tokens; lower sample.context_length or use more data"
            )

    out = Path(out_dir)
    eot = np.array([EOT_ID], dtype=TOKEN_DTYPE).tobytes()
    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
        with open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f:
            files, written = (train_f, val_f), [0, 0]
            chunk = 0
            for group in tqdm(
                range(parquet.num_row_groups), desc="sample", unit="group", disable=None if progress else True
            ):
                column = _read_tokens(parquet, group, corpus)
                values, offsets = column.values.to_numpy(), column.offsets.to_numpy()
                for doc in range(len(column)):
                    start = offsets[doc]
                    while start < offsets[doc + 1]:
                        split = int(is_val[chunk])
                        if new_piece[chunk] and written[split]:
                            files[split].write(eot)
                            written[split] += 1
                        piece = values[start : start + chunk_size[chunk]]
                        files[split].write(piece)  # a contiguous uint16 slice: written as-is
                        written[split] += piece.size
                        start, chunk = start + piece.size, chunk + 1
        if written != [meta["n_tokens"]["train"], meta["n_tokens"]["val"]]:
            raise LLMError(f"{corpus}: token counts disagree with its n_tokens column; re-run the tokenize stage")
    return meta


def _read_tokens(parquet: pq.ParquetFile, group: int, path: str | Path) -> pa.ListArray:
    """The `tokens` column of row group `group`; a damaged page is an LLMError naming the file."""
    try:
        return parquet.read_row_group(group, columns=["tokens"]).column(0).combine_chunks()
    except (pa.ArrowException, OSError) as err:
        raise LLMError(f"{path}: row group {group} is corrupt ({err}); re-run it: dvc repro tokenize") from err


def _open_corpus(path: str | Path) -> pq.ParquetFile:
    if not Path(path).is_file():
        raise LLMError(f"corpus file not found: {path} (run the tokenize stage: dvc repro tokenize)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise LLMError(f"{path} is corrupt or truncated ({err}); re-run it: dvc repro tokenize") from err
    names = set(parquet.schema_arrow.names)
    if not {"n_tokens", "tokens"} <= names:
        raise LLMError(f"{path} is not a tokenized corpus: it lacks n_tokens/tokens columns (has {sorted(names)})")
    stored = read_tokenizer_fingerprint(path)
    if stored != tokenizer_fingerprint():
        raise LLMError(
            f"{path} was tokenized with {stored or 'an unknown tokenizer'}, expected "
            f"{tokenizer_fingerprint()}; re-run the tokenize stage"
        )
    return parquet
