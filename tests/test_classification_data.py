import csv
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from llm.data.classification import (
    ClassificationDataset,
    balance_classes,
    collate_classification,
    read_labeled_tsv,
    stratified_split,
)
from llm.data.labeled_files import ClassificationExample
from llm.errors import LLMError
from llm.tokenizer import EOT_ID, get_tokenizer

LABELS = ("ham", "spam")


@pytest.fixture(scope="module")
def sms(mirror: Path) -> list[ClassificationExample]:
    return read_labeled_tsv(mirror / "sms_spam_collection.tsv", LABELS).examples


def test_real_file_counts_and_quotes(mirror: Path, sms: list[ClassificationExample]) -> None:
    path = mirror / "sms_spam_collection.tsv"
    assert len(sms) == 5574
    assert Counter(e.label for e in sms) == {0: 4827, 1: 747}
    raw = path.read_text(encoding="utf-8").split("\n")
    assert all(raw[e.line - 1] == f"{LABELS[e.label]}\t{e.text}" for e in sms)
    assert sum(e.text.count('"') % 2 for e in sms) > 0  # unbalanced quotes are kept as ordinary characters
    # why quoting must be off: pandas' default quoting merges lines; QUOTE_NONE agrees with us
    assert len(pd.read_csv(path, sep="\t", header=None)) == 5572
    assert len(pd.read_csv(path, sep="\t", header=None, quoting=csv.QUOTE_NONE)) == len(sms)


def test_crlf_and_bom_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "crlf.tsv"
    path.write_bytes(b'\xef\xbb\xbfham\tHello "there\r\nspam\tWIN \xe2\x82\xac1000 now\r\n')
    examples = read_labeled_tsv(path, LABELS).examples
    assert examples == [ClassificationExample('Hello "there', 0, 1), ClassificationExample("WIN €1000 now", 1, 2)]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("junk\tsome text", r"line 3: unknown label 'junk'; expected one of ham, spam"),
        ("ham no tab here", r"line 3: expected 2 tab-separated fields \(label, text\), found 1"),
        ("ham\tone\ttwo", r"line 3: expected 2 tab-separated fields \(label, text\), found 3"),
        ("spam\t   ", r"line 3: empty text"),
        ("", r"line 3: expected 2 tab-separated fields"),
    ],
)
def test_bad_rows_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(f"ham\tok one\nspam\tok two\n{bad_line}\nham\tok four\n", encoding="utf-8")
    with pytest.raises(LLMError, match=rf"bad\.tsv {message}"):
        read_labeled_tsv(path, LABELS)
    parsed = read_labeled_tsv(path, LABELS, skip_bad_rows=True)
    assert [e.line for e in parsed.examples] == [1, 2, 4]
    assert len(parsed.skipped) == 1 and parsed.skipped[0].startswith("line 3: ")


def test_invalid_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"ham\tok\nspam\tcaf\xe9\n")
    with pytest.raises(LLMError, match=r"line 2: not valid UTF-8 at byte 8"):
        read_labeled_tsv(path, LABELS)
    with pytest.raises(LLMError, match="not found"):
        read_labeled_tsv(tmp_path / "nope.tsv", LABELS)


def test_balance_and_stratified_split(sms: list[ClassificationExample]) -> None:
    balanced = balance_classes(sms, seed=123)
    assert Counter(e.label for e in balanced) == {0: 747, 1: 747}
    assert balanced == balance_classes(sms, seed=123)
    assert balanced != balance_classes(sms, seed=124)
    splits = stratified_split(balanced, (0.7, 0.1, 0.2), seed=123)
    sizes = {name: Counter(e.label for e in split) for name, split in splits.items()}
    assert sizes == {"train": {0: 523, 1: 523}, "val": {0: 75, 1: 75}, "test": {0: 149, 1: 149}}
    lines = [{e.line for e in split} for split in splits.values()]
    assert set.union(*lines) == {e.line for e in balanced}
    assert sum(map(len, lines)) == len(balanced)  # disjoint
    assert splits == stratified_split(balanced, (0.7, 0.1, 0.2), seed=123)
    assert splits["test"] != stratified_split(balanced, (0.7, 0.1, 0.2), seed=7)["test"]
    with pytest.raises(LLMError, match="summing to 1"):
        stratified_split(balanced, (0.7, 0.1, 0.1), seed=0)


def test_dataset_and_collate_pad_right() -> None:
    tokenizer = get_tokenizer()
    examples = [
        ClassificationExample("Hello, world", 0, 1),
        ClassificationExample("Call now <|endoftext|> to win", 1, 2),
        ClassificationExample("a " * 50, 0, 3),
    ]
    ds = ClassificationDataset(examples, tokenizer, max_length=8)
    assert ds[0] == ([15496, 11, 995], 0)
    assert EOT_ID not in ds[1][0]  # special-token text is plain text
    assert len(ds[2][0]) == 8  # truncated
    with_eot = ClassificationDataset(examples, tokenizer, max_length=8, append_eot=True)
    assert with_eot[0] == ([15496, 11, 995, EOT_ID], 0)
    assert with_eot[2][0] == [*ds[2][0][:7], EOT_ID]  # still at most max_length tokens
    batch = collate_classification([ds[0], ds[1]])
    n = len(ds[1][0])
    assert batch.ids.shape == (2, n) and batch.ids.dtype == torch.long
    assert batch.lengths.tolist() == [3, n] and batch.labels.tolist() == [0, 1]
    assert batch.ids[0, :3].tolist() == [15496, 11, 995] and torch.all(batch.ids[0, 3:] == EOT_ID)
    assert batch.pad_mask.tolist()[0] == [True] * 3 + [False] * (n - 3)
    assert batch.pad_mask[1].all()
