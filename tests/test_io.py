"""llm.io: every way a file can fail to read is one LLMError naming the file; outputs written together."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.errors import LLMError
from llm.io import after_commit, as_written, outputs_together, read_json, read_utf8, replaced_dir, write_json


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


def test_outputs_together_swap_in_at_the_end_and_only_on_success(tmp_path: Path) -> None:
    write_json(tmp_path / "metrics.json", {"run": 1})
    with replaced_dir(tmp_path / "model") as folder:
        (folder / "weights").write_text("old")
    after: list[str] = []
    with outputs_together():
        write_json(tmp_path / "metrics.json", {"run": 2})
        write_json(tmp_path / "metrics.json", {"run": 3})  # written twice: the last one wins
        with replaced_dir(tmp_path / "model") as folder:
            write_json(folder / "config.json", {"in": "the new folder"})  # inside a folder being built: directly
            (folder / "weights").write_text("new")
        assert read_json(tmp_path / "metrics.json") == {"run": 1}  # nothing in place before the block ends
        assert (tmp_path / "model" / "weights").read_text() == "old"
        with as_written(tmp_path / "metrics.json") as view:
            assert view.name == "metrics.json" and read_json(view) == {"run": 3}
        with as_written(tmp_path / "model") as view:  # the new folder under its own name, for MLflow
            assert view.name == "model" and (view / "weights").read_text() == "new"
        with as_written(tmp_path / "model" / "config.json") as view:  # a file of a new folder
            assert view.name == "config.json" and read_json(view) == {"in": "the new folder"}
        with as_written(tmp_path / "elsewhere.json") as view:  # not an output of this block: the path itself
            assert view == tmp_path / "elsewhere.json"
        after_commit(lambda: after.append(read_json(tmp_path / "metrics.json")["run"]))
        assert after == []
    assert read_json(tmp_path / "metrics.json") == {"run": 3} and after == [3]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "weights"]
    assert (tmp_path / "model" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]  # no temporaries left


def test_outputs_together_leave_every_target_as_it_was_when_the_block_fails(tmp_path: Path) -> None:
    write_json(tmp_path / "metrics.json", {"run": 1})
    with pytest.raises(LLMError, match="late failure"), outputs_together():
        write_json(tmp_path / "metrics.json", {"run": 2})
        with replaced_dir(tmp_path / "model") as folder:
            (folder / "weights").write_text("new")
        after_commit(lambda: pytest.fail("ran although the block failed"))
        raise LLMError("late failure")
    assert read_json(tmp_path / "metrics.json") == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no model, no temporaries
    write_json(tmp_path / "metrics.json", {"run": 4})  # outside the block: in place at once
    assert read_json(tmp_path / "metrics.json") == {"run": 4}
