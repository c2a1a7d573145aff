"""Corpus inputs (llm.data.inputs) into tokenize_corpus: text folders and globs, JSONL, Parquet, CSV, datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from llm.data import inputs
from llm.data.corpus import tokenize_corpus
from llm.data.inputs import CorpusInput, read_documents
from llm.errors import LLMError
from llm.tokenizer import get_tokenizer
from stages.tokenize import check_deps

ROWS = ["First row.\r\nSecond line.", "", "Third <|endoftext|> text — ünïcode."]


@pytest.fixture(scope="module")
def enc(mirror: Path) -> tiktoken.Encoding:
    return get_tokenizer(mirror / "tokenizer" / "r50k_base.tiktoken")


def tokenize(tmp_path: Path, enc: tiktoken.Encoding, *inputs: CorpusInput) -> list[dict[str, object]]:
    out = tmp_path / "out" / "corpus.parquet"
    tokenize_corpus(list(inputs), out, enc, num_threads=1, piece_chars=16, progress=False)
    return pq.read_table(out).to_pylist()


def expected(enc: tiktoken.Encoding, texts: list[str]) -> list[list[int]]:
    return [enc.encode_ordinary(t.replace("\r\n", "\n")) for t in texts if t]


def test_every_format_in_one_corpus_matches_tiktoken(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    (tmp_path / "books/nested/deeper").mkdir(parents=True)
    (tmp_path / "books/a.txt").write_bytes(b"\xef\xbb\xbfA book.\r\nThe end.")
    (tmp_path / "books/nested/deeper/b.txt").write_text("Nested book.", encoding="utf-8")
    (tmp_path / "books/nested/c.md").write_text("# A folder reads every file", encoding="utf-8")
    (tmp_path / "books/.git").mkdir()
    (tmp_path / "books/.git/skipped.txt").write_text("hidden folders are skipped", encoding="utf-8")
    (tmp_path / "books/.skipped.txt").write_text("hidden files too", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/one.md").write_text("# Notes\n\nMarkdown is text.", encoding="utf-8")
    jsonl = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(ROWS)) + "\n"
    (tmp_path / "rows.jsonl").write_text(jsonl, encoding="utf-8")
    pq.write_table(pa.table({"text": ROWS, "n": [1, 2, 3]}), tmp_path / "rows.parquet", row_group_size=2)
    (tmp_path / "rows.csv").write_text(
        'n,text\n1,"First row.\r\nSecond line."\n2,\n3,Third <|endoftext|> text — ünïcode.\n'
    )
    inputs = [
        CorpusInput(path=str(tmp_path / "books")),
        CorpusInput(path=str(tmp_path / "notes/**/*.md")),
        CorpusInput(path=str(tmp_path / "rows.jsonl"), text_column="body"),
        CorpusInput(path=str(tmp_path / "rows.parquet")),
        CorpusInput(path=str(tmp_path / "rows.csv"), format="csv"),
    ]
    rows = tokenize(tmp_path, enc, *inputs)
    tables = [f"rows.{ext}:{n}" for ext in ("jsonl", "parquet", "csv") for n in (1, 3)]
    assert [r["source"] for r in rows] == ["a.txt", "nested/c.md", "nested/deeper/b.txt", "one.md", *tables]
    texts = ["A book.\nThe end.", "# A folder reads every file", "Nested book.", "# Notes\n\nMarkdown is text."]
    assert [r["tokens"] for r in rows] == expected(enc, [*texts, *ROWS, *ROWS, *ROWS])
    assert [r["doc_id"] for r in rows] == list(range(10)) and all(r["n_tokens"] == len(r["tokens"]) for r in rows)


def test_a_folder_reads_each_file_as_its_extension_says(tmp_path: Path) -> None:
    (tmp_path / "t/sub").mkdir(parents=True)
    (tmp_path / "t/sub/x.JSONL").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "t/notes.md").write_text("# notes", encoding="utf-8")
    (tmp_path / "t/rows.csv").write_text("id,text\n1,c\n", encoding="utf-8")
    (tmp_path / "t/book").write_text("no extension: text", encoding="utf-8")
    docs = list(read_documents([CorpusInput(path=str(tmp_path / "t"))]))
    assert [(d.source, d.text) for d in docs] == [
        ("book", "no extension: text"), ("notes.md", "# notes"), ("rows.csv:1", "c"),
        ("sub/x.JSONL:1", "a"), ("sub/x.JSONL:2", "b"),
    ]


def test_csv_values_span_lines_and_blocks_and_other_columns_are_not_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "CSV_BLOCK_BYTES", 256)  # many blocks, quoted values across their boundaries
    texts = [f"row {i}:\n" + "a long line, quoted. " * 3 for i in range(20)]
    ids = [str(i) if i < 10 else f"id-{i}" for i in range(20)]  # ints, then strings: never converted
    lines = [f'{i},"{t}"\n' for i, t in zip(ids, texts, strict=True)]
    (tmp_path / "x.csv").write_text("id,text\n" + "".join(lines), encoding="utf-8")
    docs = list(read_documents([CorpusInput(path=str(tmp_path / "x.csv"))]))
    assert [d.text for d in docs] == texts and [d.source for d in docs] == [f"x.csv:{n}" for n in range(1, 21)]


def test_a_folder_of_tables_with_a_format(tmp_path: Path) -> None:
    (tmp_path / "t/sub").mkdir(parents=True)
    (tmp_path / "t/sub/x.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "t/readme.txt").write_text("not a table", encoding="utf-8")
    docs = list(read_documents([CorpusInput(path=str(tmp_path / "t"), format="jsonl")]))
    assert [(d.source, d.text) for d in docs] == [("sub/x.jsonl:1", "a"), ("sub/x.jsonl:2", "b")]


def test_jsonl_lines_read_like_text_files(tmp_path: Path) -> None:
    # A BOM on any line, CRLF line ends, blank lines and (when allowed) invalid bytes: decoded like a text file's.
    lines = [b'\xef\xbb\xbf{"text": "bom"}\r\n', b"\r\n", b" \t \n", b'{"text": "a\\r\\nb"}\r\n', b'{"text": "\xe9"}']
    (tmp_path / "x.jsonl").write_bytes(b"".join(lines))
    docs = list(read_documents([CorpusInput(path=str(tmp_path / "x.jsonl"))], allow_replacement=True))
    assert [(d.source, d.text, d.size) for d in docs] == [
        ("x.jsonl:1", "bom", 20), ("x.jsonl:4", "a\nb", 20), ("x.jsonl:5", "\ufffd", 13)
    ]  # fmt: skip
    (tmp_path / "y.jsonl").write_bytes(b'{"text": "a"}\r\n\xef\xbb\xbf{"text": oops}\r\n')
    with pytest.raises(LLMError, match=r"^.*y\.jsonl:2: invalid JSON \(Expecting value at column 10\)$"):
        list(read_documents([CorpusInput(path=str(tmp_path / "y.jsonl"))]))


def test_an_error_in_a_later_batch_writes_nothing(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    # Batches are read one ahead of the encoding: the error still ends the run, naming its row, with no output.
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50))
    (tmp_path / "x.jsonl").write_text(rows + '{"text": 5}\n', encoding="utf-8")
    out = tmp_path / "out" / "corpus.parquet"
    with pytest.raises(LLMError, match=r"x\.jsonl:51: 'text' must be a string, got int"):
        tokenize_corpus([CorpusInput(path=str(tmp_path / "x.jsonl"))], out, enc, batch_chars=8, progress=False)
    assert not out.exists()
    (tmp_path / "x.jsonl").write_text(rows, encoding="utf-8")
    tokenize_corpus([CorpusInput(path=str(tmp_path / "x.jsonl"))], out, enc, batch_chars=8, progress=False)
    table = pq.read_table(out).to_pylist()
    assert [r["tokens"] for r in table] == [enc.encode_ordinary(f"row {i}") for i in range(50)]
    assert [r["source"] for r in table] == [f"x.jsonl:{i}" for i in range(1, 51)]


def test_small_documents_encoded_together_encode_each_on_its_own(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    # One encoder call takes a task's pieces joined by <|endoftext|>: each must still give its own tokens, also
    # where joined text would merge (spaces, newlines, a special token's halves); one holding it is plain text.
    texts = ["a  ", "  b", "", "\n\n", "x<|endof", "text|>y", "end.\n", " <|endoftext|> ", "ü ", "'s"] * 3
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    rows = tokenize(tmp_path, enc, CorpusInput(path=str(tmp_path / "x.jsonl")))
    assert [r["source"] for r in rows] == [f"x.jsonl:{i}" for i, t in enumerate(texts, 1) if t]
    assert [r["tokens"] for r in rows] == [enc.encode_ordinary(t) for t in texts if t]


BAD = {
    "bad json": ("x.jsonl", b'{"text": "ok"}\n{"text": oops}\n', {}, r"x\.jsonl:2: invalid JSON"),
    "not an object": ("x.jsonl", b'["a"]\n', {}, r"x\.jsonl:1: expected a JSON object"),
    "jsonl column": ("x.jsonl", b'{"body": "a", "id": 1}\n', {}, r"x\.jsonl:1: no 'text' key .*; keys: body, id"),
    "jsonl number": ("x.jsonl", b'{"text": 3}\n', {}, r"x\.jsonl:1: 'text' must be a string, got int"),
    "jsonl utf-8": ("x.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', {}, r"x\.jsonl:2: invalid UTF-8"),
    "csv column": ("x.csv", b"a,b\n1,2\n", {}, r"x\.csv: no column 'text' \(set text_column\); columns: a, b"),
    "csv utf-8": ("x.csv", b"text\nfine\ncaf\xe9\n", {}, r"x\.csv:2: invalid UTF-8"),
    "csv ragged": ("x.csv", b"text,b\n1,2\n3\n", {}, r"x\.csv: malformed CSV"),
    "missing file": ("x.txt", None, {"path": "gone.jsonl"}, r"corpus file not found: .*gone\.jsonl"),
    "empty glob": ("x.txt", b"a", {"path": "*.md"}, r"corpus glob .*\*\.md matches no files"),
    "bad format": ("x.txt", b"a", {"format": "xml"}, r"format must be one of text, jsonl, parquet, csv"),
    "two sources": ("x.txt", b"a", {"hf_dataset": "x"}, r"give exactly one of `path` and `hf_dataset`"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_file_and_row_and_writes_nothing(tmp_path: Path, enc: tiktoken.Encoding, case: str) -> None:
    name, data, settings, message = BAD[case]
    if data is not None:
        (tmp_path / name).write_bytes(data)
    path = str(tmp_path / settings.pop("path", name))
    with pytest.raises(LLMError, match=message):
        tokenize(tmp_path, enc, CorpusInput(**{"path": path, **settings}))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_parquet_errors(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1]}), tmp_path / "c.parquet")
    for name, message in [
        ("a", r"a\.parquet: no column 'text' \(set text_column\); columns: body, n"),
        ("b", r"b\.parquet:2: 'text' is missing \(null\)"),
        ("c", r"c\.parquet: column 'text' holds int64, not text"),
    ]:
        with pytest.raises(LLMError, match=message):
            tokenize(tmp_path, enc, CorpusInput(path=str(tmp_path / f"{name}.parquet")))


def test_hf_dataset_saved_to_disk(tmp_path: Path, enc: tiktoken.Encoding) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ROWS})}).save_to_disk(tmp_path / "ds")
    rows = tokenize(tmp_path, enc, CorpusInput(hf_dataset=str(tmp_path / "ds"), text_column="content"))
    assert [r["source"] for r in rows] == ["ds:1", "ds:3"] and [r["tokens"] for r in rows] == expected(enc, ROWS)
    with pytest.raises(LLMError, match=r"no split 'test'; splits: train"):
        tokenize(tmp_path, enc, CorpusInput(hf_dataset=str(tmp_path / "ds"), split="test"))
    with pytest.raises(LLMError, match=r"no column 'text' \(set text_column\); columns: content"):
        tokenize(tmp_path, enc, CorpusInput(hf_dataset=str(tmp_path / "ds")))


def test_hf_hub_dataset_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LLMError, match=r"hf_dataset nobody/no-such-set: cannot load .*offline\? save it"):
        list(read_documents([CorpusInput(hf_dataset="nobody/no-such-set")]))


def test_tokenize_refuses_inputs_dvc_does_not_track(tmp_path: Path) -> None:
    pipeline = tmp_path / "dvc.yaml"
    pipeline.write_text("stages:\n  tokenize:\n    deps: [data/raw/corpus, data/corpus]\n", encoding="utf-8")
    check_deps([CorpusInput(path="data/raw/corpus"), CorpusInput(path="data/corpus/**/*.md")], pipeline)
    check_deps([CorpusInput(path="data/corpus/sub/x.jsonl"), CorpusInput(hf_dataset="user/hub-set")], pipeline)
    with pytest.raises(LLMError, match=r"corpus input data/more is not among .*add `- data/more` under stages"):
        check_deps([CorpusInput(path="data/more")], pipeline)
