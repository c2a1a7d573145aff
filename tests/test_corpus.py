from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.data.corpus import CorpusStats, read_tokenizer_fingerprint, split_text, tokenize_corpus
from llm.data.text import read_text, strip_gutenberg
from llm.errors import LLMError
from llm.tokenizer import get_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def enc(mirror: Path) -> tiktoken.Encoding:
    return get_tokenizer(mirror / "tokenizer" / "r50k_base.tiktoken")


@pytest.fixture(scope="module")
def real(mirror: Path, enc: tiktoken.Encoding, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusStats]:
    out = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    return out, tokenize_corpus(mirror / "corpus", out, enc, row_group_tokens=500_000, progress=False)


def test_real_corpus_matches_tiktoken_on_the_normalised_text(
    real: tuple[Path, CorpusStats], mirror: Path, enc: tiktoken.Encoding
) -> None:
    out, stats = real
    files = sorted((mirror / "corpus").glob("*.txt"))
    expected = enc.encode_ordinary_batch([strip_gutenberg(read_text(f)) for f in files], num_threads=2)
    table = pq.read_table(out)
    assert stats.documents == table.num_rows == len(files) == 24
    assert stats.tokens == sum(map(len, expected)) == sum(table["n_tokens"].to_pylist())
    assert stats.bytes == sum(f.stat().st_size for f in files) and stats.empty_documents == 0
    assert table["doc_id"].to_pylist() == list(range(24))
    assert table["source"].to_pylist() == [f.name for f in files]
    for ids, row in zip(expected, table["tokens"].to_pylist(), strict=True):
        assert row == ids


def test_parquet_contract_and_row_groups(real: tuple[Path, CorpusStats]) -> None:
    out, stats = real
    parquet = pq.ParquetFile(out)
    schema = parquet.schema_arrow
    assert [(f.name, f.type) for f in schema] == [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),
        ("tokens", pa.list_(pa.uint16())),
    ]
    assert read_tokenizer_fingerprint(out) == tokenizer_fingerprint()
    assert parquet.metadata.num_row_groups == stats.row_groups > 1
    for i in range(parquet.metadata.num_row_groups):
        n_tokens = parquet.read_row_group(i, columns=["n_tokens"]).column(0).to_numpy()
        assert n_tokens[:-1].sum() < 500_000  # a group closes as soon as it reaches row_group_tokens


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"ab 1.\n\t'’é—", "  ", "'s", "\r\n", "<|endoftext|>"]), max_size=120).map("".join)
)
def test_split_pieces_encode_like_the_whole_text(enc: tiktoken.Encoding, text: str) -> None:
    pieces = split_text(text, piece_chars=7)
    assert "".join(pieces) == text
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_split_real_text_into_many_pieces(mirror: Path, enc: tiktoken.Encoding) -> None:
    text = read_text(mirror / "the-verdict.txt")
    pieces = split_text(text, piece_chars=200)
    assert len(pieces) > 50 and all(len(p) >= 200 for p in pieces[:-1])
    assert np.concatenate([enc.encode_ordinary(p) for p in pieces]).tolist() == enc.encode_ordinary(text)


def test_special_tokens_are_plain_text_and_empty_documents_skipped(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Hello <|endoftext|> world", encoding="utf-8")
    (corpus / "b.txt").write_bytes(b"")
    (corpus / "sub" / "c.txt").write_text("x" * 5000, encoding="utf-8")
    (corpus / ".notes.md").write_text("a hidden file: skipped", encoding="utf-8")
    stats = tokenize_corpus(corpus, tmp_path / "c.parquet", enc, num_threads=1, piece_chars=64, progress=False)
    table = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [r["source"] for r in table] == ["a.txt", "sub/c.txt"] and stats.empty_documents == 1
    assert table[0]["tokens"] == enc.encode_ordinary("Hello <|endoftext|> world")
    assert 50256 not in table[0]["tokens"]
    assert table[1]["tokens"] == enc.encode_ordinary("x" * 5000)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (None, "corpus folder not found"),
        ({}, "has no files to read; it is empty"),
        ({".readme.md": b"hi"}, r"has no files to read; it holds \.readme\.md \(hidden files are skipped\)"),
        ({"a.txt": b"", "b.txt": b"\xef\xbb\xbf"}, r"is empty: its 2 text file\(s\) hold no text"),
        ({"a.txt": b"fine", "b.txt": b"ok \xc3\x28"}, r"b\.txt: invalid UTF-8 at byte offset 3"),
    ],
)
def test_bad_corpora_fail_without_output(
    tmp_path: Path, enc: tiktoken.Encoding, files: dict[str, bytes] | None, message: str
) -> None:
    corpus = tmp_path / "corpus"
    if files is not None:
        corpus.mkdir()
        for name, data in files.items():
            (corpus / name).write_bytes(data)
    out = tmp_path / "out" / "corpus.parquet"
    out.parent.mkdir()
    with pytest.raises(LLMError, match=message):
        tokenize_corpus(corpus, out, enc, progress=False)
    assert not out.exists() and not list(out.parent.iterdir())  # no temporary file left either


def test_replacement_allowed_by_flag(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_bytes(b"ok \xff")
    tokenize_corpus(tmp_path / "corpus", tmp_path / "c.parquet", enc, allow_replacement=True, progress=False)
    assert pq.read_table(tmp_path / "c.parquet")["tokens"][0].as_py() == enc.encode_ordinary("ok \ufffd")
