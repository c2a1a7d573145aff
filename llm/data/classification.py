"""Labelled text sets: reading CSV, TSV, JSONL, Parquet or SMS-style `label<TAB>text` files, label names from the
data or the params, class balancing by undersampling, a seeded stratified split (or the user's own train/val/test
files), token datasets and a right-padding collate.

The SMS format (the SMS Spam Collection: no header, `label<TAB>text` per line) is read line by line with no quoting
rules: a `"` is an ordinary character. (pandas' default CSV quoting joins lines between unbalanced quotes and loses
two of the 5,574 SMS messages.) TSV is likewise unquoted, with a header row; CSV follows RFC 4180 (quoted fields
may hold commas and newlines).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch
from torch.utils.data import Dataset

from llm.data import SPLITS
from llm.errors import LLMError
from llm.tokenizer import EOT_ID

FORMATS = ("auto", "sms", "csv", "tsv", "jsonl", "parquet")
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled text; `label` indexes the label names; `line` is the 1-based line it starts on in its file (for
    Parquet: its row)."""

    text: str
    label: int
    line: int


@dataclass(frozen=True)
class LabeledFile:
    """The examples of a file, plus the bad rows that were skipped ("line N: reason") when skipping is allowed."""

    examples: list[ClassificationExample]
    skipped: list[str]


@dataclass(frozen=True)
class LabeledSet:
    """Where a labelled set comes from and how it is split (params `finetune_classifier.data`).

    path: the file to split, or, with `train`/`val`/`test`, the folder holding those three files (the path
    dvc.yaml lists as the stage's data dependency). format: auto (by extension; a `.tsv` whose first line is two
    fields, neither named like a column, is the SMS format) | sms | csv | tsv | jsonl | parquet. text_column,
    label_column: the columns (JSON keys) holding each row's text and label (labels: strings or integers).
    skip_bad_rows: skip (and count) malformed rows instead of failing on the first. balance: undersample every
    class to the smallest (the whole file before splitting; with given files, the train file only). split:
    train/val/test fractions of every class. seed: the balancing and the split.
    """

    path: str = "data/raw/sms_spam_collection.tsv"
    format: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    train: str | None = None
    val: str | None = None
    test: str | None = None
    skip_bad_rows: bool = False
    balance: bool = True
    split: tuple[float, ...] = (0.7, 0.1, 0.2)
    seed: int = 123

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LLMError(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        given = [name for name in SPLITS if getattr(self, name) is not None]
        if given and len(given) != len(SPLITS):
            raise LLMError(f"data: give all of train, val and test files or none (got only {', '.join(given)})")

    def files(self) -> dict[str, Path]:
        """{"all": path}, or {"train", "val", "test"} files, each of which must lie inside `path`."""
        if self.train is None:
            return {"all": Path(self.path)}
        files = {name: Path(getattr(self, name)) for name in SPLITS}
        root = Path(self.path).resolve()
        for name, file in files.items():
            if not file.resolve().is_relative_to(root):
                raise LLMError(
                    f"data.{name} {file} is not inside data.path {self.path} (the stage's DVC dependency): "
                    "put the three files in one folder and set data.path to it"
                )
        return files

    def read(self, labels: Sequence[str] | None) -> tuple[dict[str, list[ClassificationExample]], tuple[str, ...], int]:
        """The train / val / test examples, the label names in class-index order (`labels`, or the data's own
        sorted), and the number of bad rows skipped."""
        files = {name: read_rows(path, self) for name, path in self.files().items()}
        names = resolve_labels(list(files.values()), labels)
        examples = {name: rows.examples(names) for name, rows in files.items()}
        if "all" in examples:
            chosen = balance_classes(examples["all"], self.seed) if self.balance else examples["all"]
            splits = stratified_split(chosen, self.split, self.seed)
        else:
            splits = examples | ({"train": balance_classes(examples["train"], self.seed)} if self.balance else {})
            if len({e.label for e in splits["train"]}) < 2:
                raise LLMError(f"{self.train} holds a single class: a classifier needs at least two")
        return splits, names, sum(len(rows.skipped) for rows in files.values())


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


def read_labeled_tsv(path: str | Path, labels: Sequence[str], *, skip_bad_rows: bool = False) -> LabeledFile:
    """Parse `label<TAB>text` lines (UTF-8, LF or CRLF, no header, no quoting).

    A bad row (invalid UTF-8, not exactly two tab-separated fields, a label not in `labels`, empty text) is an
    LLMError naming the file and line number, or, with `skip_bad_rows`, skipped and listed in `skipped`.
    """
    rows = read_rows(Path(path), LabeledSet(format="sms", skip_bad_rows=skip_bad_rows))
    examples = rows.examples(labels)
    return LabeledFile(examples, rows.skipped)


def balance_classes(examples: Sequence[ClassificationExample], seed: int) -> list[ClassificationExample]:
    """Undersample every class to the size of the smallest one (a seeded random choice; file order kept)."""
    by_class = _by_class(examples)
    smallest = min(len(group) for group in by_class.values())
    rng = random.Random(seed)
    kept = [e for group in by_class.values() for e in rng.sample(group, smallest)]
    return sorted(kept, key=lambda e: e.line)


def stratified_split(
    examples: Sequence[ClassificationExample], fractions: Sequence[float], seed: int
) -> dict[str, list[ClassificationExample]]:
    """Split into train/val/test with `fractions` (summing to 1) of every class, after a seeded shuffle.

    Per class of n examples, train gets round(n * f_train), val round(n * f_val), test the rest. Each split
    is returned in file order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise LLMError(
            f"split fractions must be three non-negative numbers (train, val, test) summing to 1, got {list(fractions)}"
        )
    rng = random.Random(seed)
    splits: dict[str, list[ClassificationExample]] = {name: [] for name in SPLITS}
    for group in _by_class(examples).values():
        group = list(group)
        rng.shuffle(group)
        n_train, n_val = round(len(group) * fractions[0]), round(len(group) * fractions[1])
        splits["train"] += group[:n_train]
        splits["val"] += group[n_train : n_train + n_val]
        splits["test"] += group[n_train + n_val :]
    for name, split in splits.items():
        if not split:
            raise LLMError(f"the {name} split is empty: use more data or larger split fractions")
        split.sort(key=lambda e: e.line)
    return splits


def _by_class(examples: Sequence[ClassificationExample]) -> dict[int, list[ClassificationExample]]:
    groups: dict[int, list[ClassificationExample]] = {}
    for e in examples:
        groups.setdefault(e.label, []).append(e)
    return dict(sorted(groups.items()))


def encode_text(tokenizer: tiktoken.Encoding, text: str, max_length: int, append_eot: bool = False) -> list[int]:
    """Token ids of `text` (special-token strings treated as plain text), cut to its first `max_length` ids.

    append_eot: end with <|endoftext|> (within max_length), a fixed last position to read the text's summary
    from, like GPT-1's extract token.
    """
    ids = tokenizer.encode(text, disallowed_special=())[: max_length - append_eot]
    return [*ids, EOT_ID] if append_eot and ids else ids


class ClassificationDataset(Dataset):
    """Tokenised examples: `ds[i]` → (ids: list[int] of 1..max_length tokens, label: int)."""

    def __init__(
        self,
        examples: Sequence[ClassificationExample],
        tokenizer: tiktoken.Encoding,
        max_length: int,
        append_eot: bool = False,
    ) -> None:
        self.examples = list(examples)
        self.ids = [encode_text(tokenizer, e.text, max_length, append_eot) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.examples[i].label

    def batch(self, indices: Iterable[int]) -> ClassificationBatch:
        """The examples at `indices` (any integer type, e.g. a numpy array), collated in that order."""
        return collate_classification([self[int(i)] for i in indices])

    def batches(self, batch_size: int) -> list[ClassificationBatch]:
        """The whole dataset in order, as batches of `batch_size` examples (the last one may be smaller)."""
        return [self.batch(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]


class ClassificationBatch(NamedTuple):
    """ids (B, T) int64 right-padded with <|endoftext|>; lengths (B,) real tokens per row; labels (B,) int64."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    @property
    def pad_mask(self) -> torch.Tensor:
        """Bool (B, T): True on real tokens, False on padding."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :] < self.lengths[:, None]


def collate_classification(items: Sequence[tuple[list[int], int]], pad_id: int = EOT_ID) -> ClassificationBatch:
    """Right-pad token lists to the longest in the batch (so a row's last real token is at `lengths - 1`)."""
    lengths = [len(ids) for ids, _ in items]
    ids = torch.full((len(items), max(lengths)), pad_id, dtype=torch.long)
    for row, (tokens, _) in enumerate(items):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ClassificationBatch(ids, torch.tensor(lengths), torch.tensor([label for _, label in items]))
