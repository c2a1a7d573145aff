from pathlib import Path

import pytest

from llm.data.text import decode_text, read_text, strip_gutenberg
from llm.errors import LLMError


def test_bom_dropped_and_crlf_normalised(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n\r\n\xc3\xa9\n")
    assert read_text(path) == "line one\nline two\n\né\n"
    assert decode_text("\ufeffx".encode() * 2, "mem") == "x\ufeffx"  # only a leading BOM is dropped


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xef\xbb\xbfgood\r\nbad \xff here")
    with pytest.raises(LLMError, match=r"bad\.txt: invalid UTF-8 at byte offset 13 \(bytes ff\)"):
        read_text(path)
    assert read_text(path, allow_replacement=True) == "good\nbad \ufffd here"


MODERN = (
    "The Project Gutenberg eBook of X\n\nlicence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody.\n\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter licence\n"
)
OLD = (
    "*Project Gutenberg Etext of Y*\nsmall print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*"
    "\n\nOld body.\n\n*Project Gutenberg Etext of Y*\n"
)


@pytest.mark.parametrize(
    ("text", "body"),
    [
        (MODERN, "Body."),
        (MODERN.replace("*** START OF THE", "***START OF THE").replace(" ***\n\nBody", "***\n\nBody"), "Body."),
        (
            MODERN.replace(
                "*** END OF THE PROJECT", "End of the Project Gutenberg EBook of X\n\n*** END OF THE PROJECT"
            ),
            "Body.",
        ),
        (OLD, "Old body."),
        (
            OLD.replace("*END*THE", "*END THE").replace(
                "*Project Gutenberg Etext of Y*\n", "End of The Project Gutenberg Etext of Y\n"
            ),
            "Old body.",
        ),
        ("*** START OF THE PROJECT GUTENBERG EBOOK 55 ***\nOnly a start line.\n", "Only a start line."),
        ("No markers at all.\n\n", "No markers at all.\n\n"),
    ],
)
def test_strip_gutenberg_variants(text: str, body: str) -> None:
    assert strip_gutenberg(text) == body


def test_strip_gutenberg_on_the_real_corpus(mirror: Path) -> None:
    files = sorted((mirror / "corpus").glob("*.txt")) + sorted((mirror / "heldout").glob("*.txt"))
    stripped = 0
    for path in files:
        text = read_text(path)
        body = strip_gutenberg(text)
        assert body and body in text
        assert body.lower().count("project gutenberg") <= 1 and "small print" not in body.lower(), path.name
        if text.lower().count("gutenberg") > 10:  # the GITenberg copies carry the full licence
            assert len(body) < 0.98 * len(text), path.name
            stripped += 1
    assert stripped == 13  # 12 GITenberg books in corpus/ + the held-out one
    tiny = read_text(mirror / "corpus" / "tinyshakespeare.txt")
    assert strip_gutenberg(tiny) == tiny
