"""Where a corpus's documents come from: text files, JSONL/Parquet/CSV tables and Hugging Face datasets, streamed.

A `CorpusInput` names one input (params `tokenize.inputs`); `read_documents` yields its documents one at a time,
normalised like `llm.data.text.decode_text` (UTF-8, BOM dropped, CRLF → LF), so memory holds one text file or
one table batch, whatever the input's size. A document's `source` is its file's path relative to the input's
folder (or glob base), plus `:<line>` (JSONL) or `:<row>` (CSV, Parquet, datasets; 1-based) for a table's rows.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq

from llm.data.text import decode_text, read_text
from llm.errors import LLMError

# A format's file extensions (lower case); text is every file that is not one of the others.
FORMATS = {"text": (), "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",), "csv": (".csv",)}
TABLE_BATCH_ROWS = 4096  # rows per Parquet/datasets batch read
CSV_BLOCK_BYTES = 8 << 20  # bytes per CSV batch read


@dataclass(frozen=True)
class CorpusInput:
    """One corpus input: exactly one of `path` (a folder, a file or a glob such as `data/corpus/**/*.md`) or
    `hf_dataset` (a folder written by `datasets`' save_to_disk, else a hub name, read with `split`).

    format: text | jsonl | parquet | csv. Omitted, every file (of a folder: every file below it, hidden files and
    folders skipped) is read as its extension says (anything unknown is UTF-8 text). Given, a folder yields the
    files with that format's extensions (text: all of them), each read as that format. text_column: the column
    (JSON key) holding the text of a table's rows.
    """

    path: str | None = None
    hf_dataset: str | None = None
    format: str | None = None
    text_column: str = "text"
    split: str = "train"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hf_dataset is None):
            raise LLMError(f"corpus input {self.name}: give exactly one of `path` and `hf_dataset`")
        if self.format is not None and self.format not in FORMATS:
            raise LLMError(f"corpus input {self.name}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    @property
    def name(self) -> str:
        return str(self.path if self.path is not None else self.hf_dataset)

    @property
    def local_root(self) -> Path | None:
        """The file or folder holding this input on disk (a glob's fixed base; None for a hub dataset)."""
        if self.path is not None:
            return _glob_base(self.path) if glob.has_magic(self.path) else Path(self.path)
        local = Path(str(self.hf_dataset))
        return local if local.is_dir() else None


class Document(NamedTuple):
    """One document: where it came from, its normalised text, and the input bytes it stands for (progress)."""

    source: str
    text: str
    size: int


def input_files(item: CorpusInput) -> list[tuple[Path, str]]:
    """The files of a `path` input, sorted, each with its source name; LLMError when there are none."""
    assert item.path is not None
    if glob.has_magic(item.path):
        base = _glob_base(item.path)
        files = sorted(Path(p) for p in glob.glob(item.path, recursive=True) if Path(p).is_file())
        if not files:
            raise LLMError(f"corpus glob {item.path} matches no files")
        return [(f, f.relative_to(base).as_posix()) for f in files]
    path = Path(item.path)
    if path.is_file():
        return [(path, path.name)]
    if path.suffix and not path.exists():
        raise LLMError(f"corpus file not found: {path}")
    files = list_files(path, FORMATS[item.format] if item.format else ())
    return [(f, f.relative_to(path).as_posix()) for f in files]


def list_files(folder: str | Path, suffixes: Sequence[str] = ()) -> list[Path]:
    """The files below `folder` (recursively; hidden files and folders skipped) ending in one of `suffixes` (any
    ending when empty), sorted; LLMError when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise LLMError(f"corpus folder not found: {root} (fetch's books: dvc repro fetch; your own: docs/data.md)")
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    visible = [p for p in everything if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files = [p for p in visible if not suffixes or p.suffix.lower() in suffixes]
    if not files:
        others = [p.relative_to(root).as_posix() for p in everything][:5]
        found = f"; it holds {', '.join(others)}" if others else "; it is empty"
        hidden = " (hidden files are skipped)" if everything and not visible else ""
        kind = f"{' or '.join(suffixes)} files" if suffixes else "files to read"
        raise LLMError(f"corpus folder {root} has no {kind}{found}{hidden}")
    return files


def input_bytes(inputs: Sequence[CorpusInput]) -> int:
    """The size in bytes of every file the inputs read (a dataset counts as 0)."""
    return sum(f.stat().st_size for item in inputs if item.path is not None for f, _ in input_files(item))


def read_documents(inputs: Sequence[CorpusInput], *, allow_replacement: bool = False) -> Iterator[Document]:
    """Every document of `inputs`, in order: inputs as listed, files sorted, rows in file order."""
    for item in inputs:
        if item.hf_dataset is not None:
            yield from _dataset_documents(item)
            continue
        for path, source in input_files(item):
            fmt = item.format or next((f for f, ext in FORMATS.items() if path.suffix.lower() in ext), "text")
            if fmt == "text":
                yield Document(source, read_text(path, allow_replacement=allow_replacement), path.stat().st_size)
            elif fmt == "jsonl":
                yield from _jsonl_documents(path, source, item.text_column, allow_replacement)
            else:
                batches = _parquet_batches(path, item.text_column) if fmt == "parquet" else _csv_batches(path, item)
                yield from _table_documents(batches, source, item.text_column, allow_replacement)


def _jsonl_documents(path: Path, source: str, column: str, allow_replacement: bool) -> Iterator[Document]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            try:  # the usual line (UTF-8, no BOM, valid JSON) parses as it is: a CRLF at its end is JSON whitespace
                row = json.loads(line.decode())
            except RecursionError:  # json's parser recurses once per nesting level
                raise LLMError(f"{where}: JSON nested too deeply") from None
            except ValueError:  # else it is decoded like a text file, for the same errors and replacements
                if not line.strip():
                    continue
                row = _json_row(decode_text(line, where, allow_replacement=allow_replacement), where)
            if not isinstance(row, dict):
                raise LLMError(f"{where}: expected a JSON object with a {column!r} key, got {type(row).__name__}")
            if column not in row:
                raise LLMError(f"{where}: no {column!r} key (set text_column); keys: {', '.join(map(str, row))}")
            yield Document(f"{source}:{number}", _text_value(row[column], where, column), len(line))


def _json_row(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise LLMError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise LLMError(f"{where}: invalid JSON ({str(err)[:200]})") from None


def _text_value(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise LLMError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    return value.replace("\r\n", "\n")


def _parquet_batches(path: Path, column: str) -> Iterator[tuple[str, pa.Array]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise LLMError(f"{path}: not a readable Parquet file ({err})") from None
    _check_column(path, parquet.schema_arrow, column)
    for batch in parquet.iter_batches(TABLE_BATCH_ROWS, columns=[column]):
        yield str(path), batch.column(0)


def _csv_batches(path: Path, item: CorpusInput) -> Iterator[tuple[str, pa.Array]]:
    # Only the text column is converted: read as bytes, decoded (and its errors reported by row) like a text file's.
    # Quoted values may span lines, also across the reader's blocks.
    column = item.text_column

    def reader(**convert: Any) -> pv.CSVStreamingReader:
        read, parse = pv.ReadOptions(block_size=CSV_BLOCK_BYTES), pv.ParseOptions(newlines_in_values=True)
        return pv.open_csv(path, read_options=read, parse_options=parse, convert_options=pv.ConvertOptions(**convert))

    try:
        try:
            batches = reader(column_types={column: pa.binary()}, strings_can_be_null=False, include_columns=[column])
        except KeyError:  # pa.ArrowKeyError: the file has no such column
            _check_column(path, reader().schema, column)
            raise
        for batch in batches:
            yield str(path), batch.column(0)
    except pa.ArrowInvalid as err:
        raise LLMError(f"{path}: malformed CSV ({str(err).splitlines()[0]})") from None


def _check_column(path: Path | str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise LLMError(f"{path}: no column {column!r} (set text_column); columns: {', '.join(schema.names)}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise LLMError(f"{path}: column {column!r} holds {kind}, not text")


def _table_documents(
    batches: Iterator[tuple[str, pa.Array]], source: str, column: str, allow_replacement: bool
) -> Iterator[Document]:
    row = 0
    for path, values in batches:
        binary = pa.types.is_binary(values.type)
        for value in values.to_pylist():
            row += 1
            where = f"{path}:{row}"
            if value is None:
                raise LLMError(f"{where}: {column!r} is missing (null)")
            text = decode_text(value, where, allow_replacement=allow_replacement) if binary else value
            yield Document(f"{source}:{row}", _text_value(text, where, column), len(text))


def _dataset_documents(item: CorpusInput) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        needs = "hf_dataset needs the `datasets` package: pip install -e '.[hf]'"
        raise LLMError(f"corpus input {item.name}: {needs}") from None
    local = item.local_root
    try:
        data = datasets.load_from_disk(str(local)) if local else datasets.load_dataset(item.name, streaming=True)
    except Exception as err:  # datasets raises many kinds (offline, missing, bad format): one line says which
        hint = "" if local else "; offline? save it with save_to_disk() and set hf_dataset to that folder"
        raise LLMError(f"hf_dataset {item.name}: cannot load ({type(err).__name__}: {err}){hint}") from None
    if isinstance(data, datasets.DatasetDict | datasets.IterableDatasetDict):
        if item.split not in data:
            raise LLMError(f"hf_dataset {item.name}: no split {item.split!r}; splits: {', '.join(data)}")
        data = data[item.split]
    names = list(data.column_names or [])  # empty when a streamed dataset does not declare its columns
    if names and item.text_column not in names:
        columns = ", ".join(names)
        raise LLMError(f"hf_dataset {item.name}: no column {item.text_column!r} (set text_column); columns: {columns}")
    rows = data.select_columns([item.text_column]).iter(batch_size=TABLE_BATCH_ROWS)
    batches = ((f"hf_dataset {item.name}", pa.array(b[item.text_column])) for b in rows)
    yield from _table_documents(batches, Path(item.name).name, item.text_column, allow_replacement=False)


def _glob_base(pattern: str) -> Path:
    """The folders of `pattern` before its first wildcard (`data/corpus/**/*.md` → data/corpus)."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed]) if fixed else Path(".")
