import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.data.windows import TokenWindows, batch_indices, count_windows
from llm.errors import LLMError


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
