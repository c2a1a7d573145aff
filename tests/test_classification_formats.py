"""Labelled sets in every format: columns, label names from the data or the params, given splits, bad rows."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.classifier import classification_metrics
from llm.classifier_tuning import flat_metrics
from llm.data.classification import LabeledSet
from llm.data.labeled_files import read_rows
from llm.errors import LLMError

ROWS = [("the match ended 3-1", "sport"), ("shares fell 2%", "business"), ("a new phone, with 5G", "tech")] * 4


def write(path: Path, rows: list[tuple[object, object]], fmt: str) -> Path:
    """`rows` of (body, topic) in `fmt`, with an extra id column."""
    if fmt == "csv":
        body = "".join(f'{i},"{t}",{c}\n' for i, (t, c) in enumerate(rows))
        path.write_text("id,body,topic\n" + body, encoding="utf-8")
    elif fmt == "tsv":
        path.write_text("id\tbody\ttopic\n" + "".join(f"{i}\t{t}\t{c}\n" for i, (t, c) in enumerate(rows)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "body": t, "topic": c}) + "\n" for i, (t, c) in enumerate(rows)))
    else:
        columns = {"id": list(range(len(rows))), "body": [t for t, _ in rows], "topic": [c for _, c in rows]}
        pq.write_table(pa.table(columns), path)
    return path


def labeled(path: Path, **settings: object) -> LabeledSet:
    return LabeledSet(path=str(path), text_column="body", label_column="topic", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"news.{fmt}", ROWS, fmt)
    for chosen in ("auto", fmt):
        rows = read_rows(path, labeled(path, format=chosen))
        assert [(t, c) for t, c, _ in rows.rows] == ROWS
        assert [n for *_, n in rows.rows] == list(range(1, 13) if fmt in ("jsonl", "parquet") else range(2, 14))
    splits, labels, skipped = labeled(path, split=(0.5, 0.25, 0.25)).read(None)
    assert labels == ("business", "sport", "tech") and skipped == 0  # sorted
    assert {name: Counter(e.label for e in split) for name, split in splits.items()} == {
        "train": {0: 2, 1: 2, 2: 2},
        "val": {0: 1, 1: 1, 2: 1},
        "test": {0: 1, 1: 1, 2: 1},
    }
    _, ordered, _ = labeled(path, split=(0.5, 0.25, 0.25)).read(["tech", "sport", "business"])
    assert ordered == ("tech", "sport", "business")


def test_csv_quoting_and_integer_labels(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('body,topic\n"one, with ""quotes""\nand a newline",1\nplain,0\n', encoding="utf-8")
    assert read_rows(path, labeled(path)).rows == [('one, with "quotes"\nand a newline', "1", 2), ("plain", "0", 4)]
    parquet = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "topic": [2, 10]}), parquet)
    assert [label for _, label, _ in read_rows(parquet, labeled(parquet)).rows] == ["2", "10"]


def test_sms_tsv_is_detected_without_a_header(tmp_path: Path) -> None:
    path = tmp_path / "sms.tsv"
    path.write_text('ham\tsee you "later\nspam\tWIN now\n', encoding="utf-8")
    assert read_rows(path, LabeledSet(path=str(path))).rows == [('see you "later', "ham", 1), ("WIN now", "spam", 2)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_a_wrong_column_lists_the_columns(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"news.{fmt}", ROWS, fmt)
    wrong = LabeledSet(path=str(path), text_column="body", label_column="label")
    expected = "line 1: no key 'label'.*keys: id, body" if fmt == "jsonl" else "has no column 'label'.*columns: id"
    with pytest.raises(LLMError, match=rf"news\.{fmt} {expected}"):
        wrong.read(None)


BAD = {
    "csv": ('id,body,topic\n0,fine,a\n1,"oops",b,x\n\n2,"",b\n', ["line 3: expected 3 fields", "line 5: empty text"]),
    "tsv": ("body\ttopic\nfine\ta\nno tab here\n\tb\n", ["line 3: expected 2 fields, found 1", "line 4: empty text"]),
    "jsonl": (
        '{"body": "fine", "topic": "a"}\n{"body": "x", "topic": \n{"body": "y", "topic": null}\n\n["body"]\n',
        ["line 2: not valid JSON", "line 3: the label is missing (null)", "line 5: expected a JSON object"],
    ),
}


@pytest.mark.parametrize("fmt", BAD)
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path: Path, fmt: str) -> None:
    text, problems = BAD[fmt]
    path = tmp_path / f"bad.{fmt}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LLMError, match=rf"bad\.{fmt} {problems[0]}.*set skip_bad_rows"):
        labeled(path).read(["a"])
    rows = read_rows(path, labeled(path, skip_bad_rows=True))
    assert rows.examples(["a", "b"]) and [s.split(":")[0] for s in rows.skipped] == [p.split(":")[0] for p in problems]
    assert all(s.startswith(p) for s, p in zip(rows.skipped, problems, strict=True))


def test_parquet_nulls_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"body": ["a", None, "c"], "topic": ["x", "y", None]}), path)
    with pytest.raises(LLMError, match=r"nulls\.parquet row 2: the text is missing \(null\)"):
        labeled(path).read(None)
    assert len(read_rows(path, labeled(path, skip_bad_rows=True)).skipped) == 2
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"body,topic\nok,a\ncaf\xe9,b\n")
    with pytest.raises(LLMError, match=r"latin\.csv line 3: not valid UTF-8 at byte 19"):
        labeled(latin).read(None)
    with pytest.raises(LLMError, match=r"not\.parquet is not a readable Parquet file"):
        labeled(latin.rename(tmp_path / "not.parquet")).read(None)


def test_label_checks_before_training(tmp_path: Path) -> None:
    path = write(tmp_path / "news.csv", ROWS, "csv")
    with pytest.raises(LLMError, match=r"label 'weather' of classifier.labels: no row of .*news\.csv has it"):
        labeled(path).read(["sport", "weather"])
    single = write(tmp_path / "one.csv", [("a", "sport"), ("b", "sport")], "csv")
    with pytest.raises(LLMError, match=r"one\.csv holds a single class \['sport'\]"):
        labeled(single).read(None)
    with pytest.raises(LLMError, match=r"news\.csv line 3: unknown label 'business'; expected one of sport, tech"):
        labeled(path).read(["sport", "tech"])  # a row whose label is not listed: a bad row


def test_given_train_val_test_files(tmp_path: Path) -> None:
    folder = tmp_path / "news"
    folder.mkdir()
    files = {name: str(write(folder / f"{name}.jsonl", ROWS[:n], "jsonl")) for name, n in [("train", 9), ("val", 3)]}
    files["test"] = str(write(folder / "test.jsonl", ROWS[:6], "jsonl"))
    splits, labels, _ = labeled(folder, **files).read(None)
    assert labels == ("business", "sport", "tech")
    assert [len(splits[name]) for name in ("train", "val", "test")] == [9, 3, 6]  # balanced already; used as given
    unbalanced = labeled(folder, **files | {"train": str(write(folder / "t2.jsonl", ROWS[:11], "jsonl"))})
    assert Counter(e.label for e in unbalanced.read(None)[0]["train"]) == {0: 3, 1: 3, 2: 3}  # train balanced
    with pytest.raises(LLMError, match="give all of train, val and test files or none"):
        labeled(folder, train=files["train"])
    with pytest.raises(LLMError, match=r"data.val .* is not inside data.path"):
        labeled(folder / "train.jsonl", **files).read(None)
    with pytest.raises(LLMError, match=r"data\.format must be one of auto, sms"):
        labeled(folder, format="xlsx")


def test_flat_metrics_per_class_names() -> None:
    scores = {"test": classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a:b", "c d"])}
    flat = flat_metrics(scores, {"method": "full", "steps": 3})
    assert flat["test_accuracy"] == 1.0 and flat["test_macro_f1"] == 1.0 and flat["train_steps"] == 3.0
    assert flat["test_f1.a_b"] == 1.0 and flat["test_n.c d"] == 1 and "test_confusion" not in flat
    assert all(isinstance(v, int | float) for v in flat.values())
