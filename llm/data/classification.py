"""Labelled text sets for classification: where a set comes from (`LabeledSet`: one file, or given
train/val/test files), label names from the data or the params, class balancing by undersampling, a seeded
stratified split, token datasets and a right-padding collate. Reading the files (CSV, TSV, JSONL, Parquet,
SMS-style `label<TAB>text`) is `llm.data.labeled_files`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
from torch.utils.data import Dataset

from llm.data import SPLITS
from llm.data.labeled_files import FORMATS, ClassificationExample, read_rows, resolve_labels
from llm.errors import LLMError
from llm.tokenizer import EOT_ID


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
            for name, path in self.files().items():  # scores such as ROC-AUC are undefined on a single class
                if len({e.label for e in splits[name]}) < 2:
                    raise LLMError(f"{path} holds a single class: a classifier needs at least two")
        return splits, names, sum(len(rows.skipped) for rows in files.values())


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
