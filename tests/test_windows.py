import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llm.data.corpus import SCHEMA, TOKENIZER_KEY
from llm.data.windows import TokenWindows, batch_indices, count_windows, write_splits
from llm.errors import LLMError
from llm.tokenizer import EOT_ID, tokenizer_fingerprint


def write_tokens(path: Path, tokens: np.ndarray) -> Path:
    tokens.astype(np.uint16).tofile(path)
    return path


@pytest.fixture
def stream(tmp_path: Path) -> tuple[Path, np.ndarray]:
    tokens = np.random.default_rng(0).integers(0, 50257, size=1001).astype(np.uint16)
    return write_tokens(tmp_path / "train.bin", tokens), tokens


@pytest.mark.parametrize(("T", "stride"), [(8, None), (8, 3), (1000, None), (7, 20)])
def test_windows_match_the_formula_and_slices(stream: tuple[Path, np.ndarray], T: int, stride: int | None) -> None:
    path, tokens = stream
    ds = TokenWindows(path, T, stride)
    s = stride or T
    assert ds.n_tokens == len(tokens) and len(ds) == count_windows(len(tokens), T, s)
    # the last window fits, one more would not
    assert (len(ds) - 1) * s + T + 1 <= len(tokens) < len(ds) * s + T + 1
    for i in (0, len(ds) // 2, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (T,)
        assert np.array_equal(x.numpy(), tokens[i * s : i * s + T]) and np.array_equal(
            y.numpy(), tokens[i * s + 1 : i * s + T + 1]
        )
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batch_gathers_the_same_windows(stream: tuple[Path, np.ndarray]) -> None:
    ds = TokenWindows(stream[0], 16, 5)
    idx = np.array([3, 0, len(ds) - 1, 3])
    x, y = ds.batch(idx)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    for row, i in enumerate(idx):
        assert torch.equal(x[row], ds[int(i)][0]) and torch.equal(y[row], ds[int(i)][1])
    with pytest.raises(IndexError):
        ds.batch([len(ds)])


def test_memmap_is_not_copied_and_pickles_by_path(stream: tuple[Path, np.ndarray]) -> None:
    ds = TokenWindows(stream[0], 8)
    assert isinstance(ds.tokens, np.memmap)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the 2 KB stream is not in the pickle
    again = pickle.loads(blob)
    assert torch.equal(again.batch([1, 2])[0], ds.batch([1, 2])[0])


def test_context_longer_than_stream_is_one_clear_error(stream: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="context_length 1001 does not fit"):
        TokenWindows(stream[0], 1001)
    with pytest.raises(LLMError, match="does not fit"):
        TokenWindows(write_tokens(tmp_path / "empty.bin", np.array([])), 4)
    with pytest.raises(LLMError, match="not found"):
        TokenWindows(tmp_path / "missing.bin", 4)
    with pytest.raises(LLMError, match="stride must be a positive integer"):
        TokenWindows(stream[0], 4, 0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_indices_cover_every_window_once_per_epoch(shuffle: bool) -> None:
    n, bs, world = 50, 4, 3
    per_step = [
        np.concatenate(
            [batch_indices(n, bs, step, seed=7, shuffle=shuffle, rank=r, world_size=world) for r in range(world)]
        )
        for step in range(25)
    ]
    stream = np.concatenate(per_step)  # 300 positions = 6 epochs
    epochs = stream.reshape(6, n)
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert shuffle != np.array_equal(epochs[0], np.arange(n))
    assert shuffle == (not np.array_equal(epochs[0], epochs[1]))


def test_batch_indices_are_a_pure_function() -> None:
    a = batch_indices(1000, 8, 123, seed=1)
    assert np.array_equal(a, batch_indices(1000, 8, 123, seed=1))
    assert not np.array_equal(a, batch_indices(1000, 8, 123, seed=2))
    # ranks split the same global batch that one big rank would see
    world = [batch_indices(1000, 8, 5, seed=1, rank=r, world_size=4) for r in range(4)]
    assert np.array_equal(np.concatenate(world), batch_indices(1000, 32, 5, seed=1))
    with pytest.raises(LLMError):
        batch_indices(10, 2, 0, seed=0, rank=2, world_size=2)


def write_corpus(path: Path, lengths: list[int], fingerprint: str | None = None) -> list[np.ndarray]:
    """A corpus Parquet file whose documents hold distinct token values (doc d, position p → d*1000 + p)."""
    docs = [(d * 1000 + np.arange(n)).astype(np.uint16) for d, n in enumerate(lengths)]
    table = pa.table(
        {
            "doc_id": pa.array(range(len(docs)), pa.int64()),
            "source": [f"d{d}.txt" for d in range(len(docs))],
            "n_tokens": pa.array(lengths, pa.int32()),
            "tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint16())),
        },
        schema=SCHEMA.with_metadata({TOKENIZER_KEY: (fingerprint or tokenizer_fingerprint()).encode()}),
    )
    pq.write_table(table, path, row_group_size=2)
    return docs


def split_run(corpus: Path, out: Path, **overrides: object) -> dict:
    kwargs: dict = {"val_fraction": 0.25, "chunk_tokens": 100, "seed": 3, "context_length": 16, "progress": False}
    return write_splits(corpus, out, **{**kwargs, **overrides})


def test_splits_partition_document_chunks(tmp_path: Path) -> None:
    docs = write_corpus(tmp_path / "c.parquet", [250, 999, 40, 310, 520])
    meta = split_run(tmp_path / "c.parquet", tmp_path / "w")
    streams = {s: np.fromfile(tmp_path / "w" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")}
    n_chunks = sum(-(-len(d) // 100) for d in docs)
    assert meta["n_chunks"] == {"train": n_chunks - round(0.25 * n_chunks), "val": round(0.25 * n_chunks)}
    pieces = []
    for name, stream in streams.items():
        assert meta["n_tokens"][name] == len(stream)
        assert (
            meta["n_windows"][name]
            == count_windows(len(stream), 16, 16)
            == len(TokenWindows(tmp_path / "w" / f"{name}.bin", 16))
        )
        # pieces are separated by EOT; each piece is a run of whole chunks of one document
        cuts = np.flatnonzero(stream == EOT_ID)
        pieces += np.split(stream, cuts)[:1] + [p[1:] for p in np.split(stream, cuts)[1:]]
    recovered = sorted(int(t) for p in pieces for t in p)
    assert recovered == sorted(int(t) for d in docs for t in d)  # every token exactly once
    for piece in pieces:
        doc, start = divmod(int(piece[0]), 1000)
        assert start % 100 == 0 and np.array_equal(piece, docs[doc][start : start + len(piece)])
        assert len(piece) % 100 == 0 or start + len(piece) == len(docs[doc])


def test_val_is_fixed_by_seed_not_by_window_size(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.parquet", [3000, 2000])
    split_run(tmp_path / "c.parquet", tmp_path / "a", context_length=8)
    split_run(tmp_path / "c.parquet", tmp_path / "b", context_length=64, stride=5)
    split_run(tmp_path / "c.parquet", tmp_path / "s", seed=4)
    val = {d: (tmp_path / d / "val.bin").read_bytes() for d in "abs"}
    assert val["a"] == val["b"] != val["s"]


def test_context_longer_than_a_split_writes_nothing(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.parquet", [900, 100])
    with pytest.raises(LLMError, match=r"context_length 300 does not fit the val split \(\d+ tokens\)"):
        split_run(tmp_path / "c.parquet", tmp_path / "w", context_length=300)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
        ({"chunk_tokens": 5000}, r"cannot split 1 chunk\(s\)"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive integer"),
    ],
)
def test_bad_split_settings(tmp_path: Path, overrides: dict, message: str) -> None:
    write_corpus(tmp_path / "c.parquet", [1000])
    with pytest.raises(LLMError, match=message):
        split_run(tmp_path / "c.parquet", tmp_path / "w", **overrides)


def test_corpus_from_another_tokenizer_is_refused(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.parquet", [1000], fingerprint="other:123")
    with pytest.raises(LLMError, match="was tokenized with other:123"):
        split_run(tmp_path / "c.parquet", tmp_path / "w")
    with pytest.raises(LLMError, match="corpus file not found"):
        split_run(tmp_path / "missing.parquet", tmp_path / "w")
