"""Reading labelled text files: CSV, TSV, JSONL, Parquet or SMS-style `label<TAB>text` rows, each with the file
and line (Parquet: row) it came from, and the label names they use. A bad row is an LLMError naming the file and
line, or, when skipping is allowed, a "line N: reason" in `LabeledRows.skipped`.

The SMS format (the SMS Spam Collection: no header, `label<TAB>text` per line) is read line by line with no quoting
rules: a `"` is an ordinary character. (pandas' default CSV quoting joins lines between unbalanced quotes and loses
two of the 5,574 SMS messages.) TSV is likewise unquoted, with a header row; CSV follows RFC 4180 (quoted fields
may hold commas and newlines).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm.errors import LLMError

if TYPE_CHECKING:
    from llm.data.classification import LabeledSet

FORMATS = ("auto", "sms", "csv", "tsv", "jsonl", "parquet")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled text; `label` indexes the label names; `line` is the 1-based line it starts on in its file (for
    Parquet: its row)."""

    text: str
    label: int
    line: int


class LabeledRows:
    """The rows read from one file, before their labels are mapped to class indices. A bad row is an LLMError
    naming the file and its line or row, or, when skipping, recorded in `skipped` ("line N: reason")."""

    def __init__(self, path: Path, skip_bad_rows: bool, unit: str) -> None:
        self.path, self.skip_bad_rows, self.unit = path, skip_bad_rows, unit
        self.rows: list[tuple[str, str, int]] = []  # (text, label, line or row)
        self.skipped: list[str] = []

    def bad(self, number: int, problem: str) -> None:
        where = f"{self.unit} {number}"
        if not self.skip_bad_rows:
            raise LLMError(f"{self.path} {where}: {problem} (set skip_bad_rows to skip bad rows)")
        self.skipped.append(f"{where}: {problem}")

    def add(self, number: int, text: Any, label: Any) -> None:
        """Keep a row whose text is a string and whose label a string or an integer (as its decimal string)."""
        if not isinstance(text, str):
            self.bad(number, f"the text is {_kind(text)}, not a string")
        elif isinstance(label, bool) or not isinstance(label, str | int) or label == "":
            self.bad(number, f"the label is {_kind(label)}, not a string or an integer")
        else:
            self.rows.append((text, str(label), number))

    def examples(self, labels: Sequence[str]) -> list[ClassificationExample]:
        """The rows as examples; an unknown label or an empty text makes a row bad."""
        index, examples = {name: i for i, name in enumerate(labels)}, []
        for text, label, number in self.rows:
            if label not in index:
                self.bad(number, f"unknown label {label[:40]!r}; expected one of {', '.join(labels)}")
            elif not text.strip():
                self.bad(number, "empty text")
            else:
                examples.append(ClassificationExample(text, index[label], number))
        if not examples:
            raise LLMError(f"{self.path} holds no usable examples")
        return examples


def _kind(value: Any) -> str:
    return "missing (null)" if value is None else "empty" if value == "" else f"{type(value).__name__} {value!r:.40}"


def resolve_labels(files: Sequence[LabeledRows], labels: Sequence[str] | None) -> tuple[str, ...]:
    """`labels` if given (each must occur in the data), else the data's label names sorted; at least two."""
    found = {label for rows in files for _, label, _ in rows.rows}
    where = ", ".join(str(rows.path) for rows in files)
    if labels is not None:
        missing = [name for name in labels if name not in found]
        if missing:
            raise LLMError(f"label {missing[0]!r} of classifier.labels: no row of {where} has it")
        return tuple(labels)
    if len(found) < 2:
        raise LLMError(f"{where} holds a single class {sorted(found)}: a classifier needs at least two")
    return tuple(sorted(found))


def read_rows(path: Path, data: LabeledSet) -> LabeledRows:
    """The rows of `path` in `data.format` (auto: by extension), text and label from `data`'s columns."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise LLMError(f"labelled text file {path} not found") from err
    fmt = data.format if data.format != "auto" else _detect_format(path, raw, data)
    if fmt == "sms":
        return _sms_rows(path, raw, data.skip_bad_rows)
    rows = LabeledRows(path, data.skip_bad_rows, "row" if fmt == "parquet" else "line")
    columns = (data.text_column, data.label_column)
    if fmt == "parquet":
        _parquet_rows(rows, columns)
    else:
        text = _utf8(path, raw)
        if fmt == "jsonl":
            _jsonl_rows(rows, text, columns)
        else:
            _delimited_rows(rows, text, columns, tsv=fmt == "tsv")
    return rows


def _detect_format(path: Path, raw: bytes, data: LabeledSet) -> str:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower(), "sms")
    header = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0].rstrip(b"\r").split(b"\t")
    named = {data.text_column.encode(), data.label_column.encode()} & set(header)
    return "sms" if fmt == "tsv" and len(header) == 2 and not named else fmt


def _utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise LLMError(f"{path} line {line}: not valid UTF-8 at byte {err.start} (convert the file to UTF-8)") from err


def _missing_columns(path: Path, columns: Sequence[str], present: Sequence[str]) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        raise LLMError(
            f"{path} has no column {missing[0]!r} (set data.text_column / data.label_column); "
            f"its columns: {', '.join(map(str, present))}"
        )


def _sms_rows(path: Path, raw: bytes, skip_bad_rows: bool) -> LabeledRows:
    """`label<TAB>text` lines (UTF-8, LF or CRLF, no header, no quoting)."""
    rows = LabeledRows(path, skip_bad_rows, "line")
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    for number, line in enumerate(lines, start=1):
        try:
            fields = line.removesuffix(b"\r").decode("utf-8").split("\t")
        except UnicodeDecodeError as err:
            rows.bad(number, f"not valid UTF-8 at byte {err.start}")
            continue
        if len(fields) != 2:
            rows.bad(number, f"expected 2 tab-separated fields (label, text), found {len(fields)}")
        else:
            rows.rows.append((fields[1], fields[0], number))
    return rows


def _jsonl_rows(rows: LabeledRows, text: str, columns: tuple[str, str]) -> None:
    """One JSON object per line; blank lines are ignored."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            rows.bad(number, f"not valid JSON: {err.msg} (column {err.colno})")
            continue
        except (ValueError, RecursionError) as err:  # an integer too long for Python; nesting too deep
            problem = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
            rows.bad(number, f"not valid JSON: {problem}")
            continue
        if not isinstance(entry, dict):
            rows.bad(number, f"expected a JSON object, got {type(entry).__name__}")
        elif not set(columns) <= entry.keys():
            missing = next(c for c in columns if c not in entry)
            rows.bad(number, f"no key {missing!r} (set data.text_column / data.label_column); keys: {', '.join(entry)}")
        else:
            rows.add(number, entry[columns[0]], entry[columns[1]])


def _delimited_rows(rows: LabeledRows, text: str, columns: tuple[str, str], *, tsv: bool) -> None:
    """CSV (RFC 4180: quoted fields may hold commas and newlines) or TSV (no quoting), with a header row; blank
    lines are ignored. A row is numbered by the line it starts on."""
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, **dialect)
    try:
        header = next(reader, [])
        _missing_columns(rows.path, columns, header)
        where, start = [header.index(column) for column in columns], reader.line_num
        for fields in reader:
            number, start = start + 1, reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                rows.bad(number, f"expected {len(header)} fields, found {len(fields)}")
            else:
                rows.add(number, *(fields[i] for i in where))
    except csv.Error as err:
        raise LLMError(f"{rows.path} line {reader.line_num}: not valid CSV: {err}") from err


def _parquet_rows(rows: LabeledRows, columns: tuple[str, str]) -> None:
    try:
        _missing_columns(rows.path, columns, pq.read_schema(rows.path).names)
        table = pq.read_table(rows.path, columns=list(columns))
    except pa.ArrowException as err:
        raise LLMError(f"{rows.path} is not a readable Parquet file: {err}") from err
    for number, (text, label) in enumerate(zip(*table.to_pydict().values(), strict=True), start=1):
        rows.add(number, text, label)
