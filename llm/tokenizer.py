"""GPT-2 byte-pair encoding through tiktoken, usable offline.

The ranks file (`r50k_base.tiktoken`, identical to tiktoken's `gpt2` ranks) is looked up in this order:
an explicit path (argument or `$LLM_TOKENIZER_FILE`), the data mirror's `tokenizer/r50k_base.tiktoken`
(see `llm.paths.find_mirror`), then tiktoken's own cached download. Its sha256 is always verified.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path

import tiktoken

from llm.errors import LLMError
from llm.paths import find_mirror

RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_FILE_ENV = "LLM_TOKENIZER_FILE"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenisation regex, as tiktoken defines it for r50k_base.
_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def get_tokenizer(ranks_file: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer (`<|endoftext|>` = 50256, 50,257 ids). Cached per resolved ranks source."""
    path = ranks_file or os.environ.get(RANKS_FILE_ENV)
    if path:
        return _from_file(Path(path).expanduser().resolve())
    try:
        mirror = find_mirror()
    except LLMError:  # $LLM_DATA_MIRROR names no directory: there is no mirror file to read
        mirror = None
    if mirror is not None and (mirror / "tokenizer" / "r50k_base.tiktoken").is_file():
        return _from_file((mirror / "tokenizer" / "r50k_base.tiktoken").resolve())
    return _from_download()


@functools.cache
def _from_file(path: Path) -> tiktoken.Encoding:
    if not path.is_file():
        raise LLMError(f"tokenizer ranks file not found: {path} (set {RANKS_FILE_ENV} or pass ranks_file)")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != RANKS_SHA256:
        raise LLMError(f"tokenizer ranks file {path} has sha256 {actual}, expected {RANKS_SHA256}")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    return _encoding(ranks)


@functools.cache
def _from_download() -> tiktoken.Encoding:
    import tiktoken.load

    try:
        ranks = tiktoken.load.load_tiktoken_bpe(RANKS_URL, expected_hash=RANKS_SHA256)
    except Exception as err:  # network errors come in many types (requests, urllib3, OSError)
        raise LLMError(
            f"GPT-2 tokenizer ranks could not be downloaded from {RANKS_URL} ({type(err).__name__}). "
            f"Offline? Put r50k_base.tiktoken (sha256 {RANKS_SHA256[:12]}…) in the data mirror's tokenizer/ "
            f"folder or point {RANKS_FILE_ENV} at it."
        ) from err
    return _encoding(ranks)


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def tokenizer_fingerprint() -> str:
    """Identifies the token ids this module produces (recorded next to tokenized data)."""
    return f"gpt2-r50k_base:{RANKS_SHA256}"
