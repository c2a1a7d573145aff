"""llm.io's readers: every way a file can fail to read is one LLMError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.errors import LLMError
from llm.io import read_json, read_utf8, write_json


def test_json_round_trip(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "x.json", {"k": [1, 2.5, None]})
    assert read_json(tmp_path / "a" / "x.json") == {"k": [1, 2.5, None]}
    assert not list((tmp_path / "a").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, r"x\.json not found: run the fetch stage"),
        (b"\xff\xfe{}", r"x\.json is not valid UTF-8 \(byte 0\)"),
        (b'{"k": ', r"x\.json is not valid JSON"),
        (b"[1, 2]", r"x\.json must hold a JSON object, got list"),
    ],
)
def test_read_json_errors(tmp_path: Path, content: bytes | None, error: str) -> None:
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LLMError, match=error):
        read_json(path, missing=": run the fetch stage")


def test_a_directory_is_not_readable_text(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=f"cannot read {tmp_path}"):
        read_utf8(tmp_path)
