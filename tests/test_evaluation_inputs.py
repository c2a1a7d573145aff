"""Reading the evaluation's inputs: the held-out books as tokens and the saved test responses."""

import json
import re
from pathlib import Path

import pytest
import torch

from llm.data.instructions import Instruction, read_responses
from llm.errors import LLMError
from llm.evaluation import heldout_tokens
from llm.tokenizer import EOT_ID


class CharTokenizer:
    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_heldout_books_are_joined_by_end_of_text_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("yz", encoding="utf-8")
    (tmp_path / "a.txt").write_text(
        "*** START OF THE PROJECT GUTENBERG EBOOK A ***\nab\n*** END OF THE PROJECT GUTENBERG EBOOK A ***\n"
    )
    (tmp_path / "notes.md").write_text("not a book")
    tokens = heldout_tokens(tmp_path, CharTokenizer())  # type: ignore[arg-type]
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokens.tolist() == [ord("a"), ord("b"), EOT_ID, ord("y"), ord("z"), EOT_ID]
    assert heldout_tokens(tmp_path, CharTokenizer(), max_tokens=4).tolist() == tokens.tolist()[:4]  # type: ignore[arg-type]


def test_no_heldout_books_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=re.escape(f"no held-out text in {tmp_path}/")):
        heldout_tokens(tmp_path, CharTokenizer())  # type: ignore[arg-type]


TEST = [Instruction("Name a colour.", "", "Blue."), Instruction("Add.", "2 and 3", "5")]


def test_responses_are_read_in_test_order(tmp_path: Path) -> None:
    rows = [{"instruction": e.instruction, "input": e.input, "output": e.output, "response": r}
            for e, r in zip(TEST, ["Red.", "6"], strict=True)]  # fmt: skip
    (tmp_path / "responses.json").write_text(json.dumps(rows), encoding="utf-8")
    assert read_responses(tmp_path / "responses.json", TEST) == ["Red.", "6"]


def test_stale_or_missing_responses_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "responses.json"
    with pytest.raises(LLMError, match=r"cannot read .*responses\.json \(.*\); run: dvc repro finetune_instructions"):
        read_responses(path, TEST)
    path.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 3", "response": "5"}]), encoding="utf-8")
    with pytest.raises(LLMError, match=r"responses\.json does not match the test split; run: dvc repro"):
        read_responses(path, TEST)
