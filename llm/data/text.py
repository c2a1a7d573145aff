"""Reading corpus text: strict UTF-8 with normalised line ends, and optional Project Gutenberg boilerplate removal."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from llm.errors import LLMError

# Where the PG header ends: the `*** START OF THE/THIS PROJECT GUTENBERG EBOOK … ***` line (spaces vary), or in
# old "Etext" releases the `*END*THE SMALL PRINT! …` line closing the licence.
_HEADER_END = re.compile(r"^\*+ ?START OF.*GUTENBERG|^\*END\*? ?THE SMALL PRINT", re.IGNORECASE | re.MULTILINE)
# Where the footer starts (searched after the header): `*** END OF THE/THIS PROJECT GUTENBERG EBOOK …`,
# `End of (the) Project Gutenberg('s) …`, or an old release's closing `*Project Gutenberg Etext of …*` line.
_FOOTER_START = re.compile(
    r"^[*\s]*END OF (?:THE |THIS )?PROJECT GUTENBERG|^\*?(?:THE )?PROJECT GUTENBERG ETEXT OF",
    re.IGNORECASE | re.MULTILINE,
)
# Markers are looked for in the first / last this many characters (PG headers and licence footers span up to
# ~21 K characters), so stripping costs the same whatever the book's length.
MARKER_WINDOW = 1 << 16


def decode_text(data: bytes, source: str | Path, *, allow_replacement: bool = False) -> str:
    """UTF-8 `data` as text with a leading BOM dropped and CRLF turned into LF.

    Invalid bytes raise LLMError naming `source` and the byte offset, unless `allow_replacement` (then each
    becomes U+FFFD).
    """
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8", errors="replace" if allow_replacement else "strict")
    except UnicodeDecodeError as err:
        bad = data[start + err.start : start + err.end].hex(" ")
        raise LLMError(
            f"{source}: invalid UTF-8 at byte offset {start + err.start} (bytes {bad}); fix the file or allow "
            f"replacement characters (tokenize.allow_replacement: true)"
        ) from None
    return text.replace("\r\n", "\n")


def read_text(path: str | Path, *, allow_replacement: bool = False) -> str:
    """The normalised text of file `path` (see `decode_text`)."""
    return decode_text(Path(path).read_bytes(), path, allow_replacement=allow_replacement)


def strip_gutenberg(text: str) -> str:
    """`text` without a Project Gutenberg header and licence footer; text without the markers is unchanged.

    Everything up to and including the header's end line goes, and everything from the footer's first line;
    the kept body is trimmed of surrounding blank lines. Markers are searched within MARKER_WINDOW characters
    of either end.
    """
    header = _HEADER_END.search(text, 0, MARKER_WINDOW)
    start = 0 if header is None else _next_line(text, header.end())
    footer = _FOOTER_START.search(text, max(start, len(text) - MARKER_WINDOW))
    if header is None and footer is None:
        return text
    end = len(text) if footer is None else footer.start()
    return text[start:end].strip("\n")


def _next_line(text: str, pos: int) -> int:
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline + 1
