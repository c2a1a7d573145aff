"""Text classification data (the SMS Spam Collection): strict `label<TAB>text` parsing, class balancing by
undersampling, a seeded stratified split, token datasets and a right-padding collate.

The file is read line by line with no quoting rules: a `"` is an ordinary character. (pandas' default CSV
quoting joins lines between unbalanced quotes and loses two of the 5,574 SMS messages.)
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
from llm.errors import LLMError
from llm.tokenizer import EOT_ID


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled text; `label` indexes the label names; `line` is its 1-based line in the source file."""

    text: str
    label: int
    line: int


@dataclass(frozen=True)
class LabeledFile:
    """The examples of a file, plus the bad rows that were skipped ("line N: reason") when skipping is allowed."""

    examples: list[ClassificationExample]
    skipped: list[str]


def read_labeled_tsv(path: str | Path, labels: Sequence[str], *, skip_bad_rows: bool = False) -> LabeledFile:
    """Parse `label<TAB>text` lines (UTF-8, LF or CRLF, no header, no quoting).

    A bad row (invalid UTF-8, not exactly two tab-separated fields, a label not in `labels`, empty text) is an
    LLMError naming the file and line number, or, with `skip_bad_rows`, skipped and listed in `skipped`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise LLMError(f"labelled text file {path} not found") from err
    index = {name: i for i, name in enumerate(labels)}
    rows = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if rows[-1] == b"":
        rows.pop()  # the newline ending the last line
    examples: list[ClassificationExample] = []
    skipped: list[str] = []
    for number, raw in enumerate(rows, start=1):
        problem = None
        try:
            fields = raw.removesuffix(b"\r").decode("utf-8").split("\t")
        except UnicodeDecodeError as err:
            problem = f"not valid UTF-8 at byte {err.start}"
        else:
            if len(fields) != 2:
                problem = f"expected 2 tab-separated fields (label, text), found {len(fields)}"
            elif fields[0] not in index:
                problem = f"unknown label {fields[0][:40]!r}; expected one of {', '.join(labels)}"
            elif not fields[1].strip():
                problem = "empty text"
        if problem is None:
            examples.append(ClassificationExample(fields[1], index[fields[0]], number))
        elif skip_bad_rows:
            skipped.append(f"line {number}: {problem}")
        else:
            raise LLMError(f"{path} line {number}: {problem} (set skip_bad_rows to skip bad rows)")
    if not examples:
        raise LLMError(f"{path} holds no usable examples")
    return LabeledFile(examples, skipped)


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
