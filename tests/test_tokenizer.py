import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.errors import LLMError
from llm.tokenizer import EOT_ID, get_tokenizer


def test_contract_example() -> None:
    enc = get_tokenizer()
    assert enc.encode("Hello, world <|endoftext|>", allowed_special="all") == [15496, 11, 995, 220, 50256]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID


def test_the_verdict_token_count(mirror: Path) -> None:
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    assert len(get_tokenizer().encode(text)) == 5145


def test_round_trip_on_every_corpus_file(mirror: Path) -> None:
    enc = get_tokenizer()
    files = sorted((mirror / "corpus").glob("*.txt")) + sorted((mirror / "heldout").glob("*.txt"))
    assert len(files) == 25
    texts = [f.read_text(encoding="utf-8-sig") for f in files]
    for path, text, ids in zip(files, texts, enc.encode_ordinary_batch(texts), strict=True):
        assert enc.decode(ids) == text, path.name


def test_explicit_file_must_match_sha256(tmp_path: Path, mirror: Path) -> None:
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes((mirror / "tokenizer" / "r50k_base.tiktoken").read_bytes()[:-10])
    with pytest.raises(LLMError, match=r"has sha256 .* expected 306cd27f"):
        get_tokenizer(bad)
    with pytest.raises(LLMError, match="tokenizer ranks file not found"):
        get_tokenizer(tmp_path / "missing.tiktoken")


def test_explicit_file_equals_tiktoken_ranks(mirror: Path) -> None:
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(mirror / "tokenizer" / "r50k_base.tiktoken"))
    assert get_tokenizer(mirror / "tokenizer" / "r50k_base.tiktoken")._mergeable_ranks == ranks
    assert isinstance(get_tokenizer(), tiktoken.Encoding)


def test_offline_without_file_gives_one_clear_error(tmp_path: Path) -> None:
    """No mirror, no env file, no network: the error says where to put the file."""
    env = {k: v for k, v in os.environ.items() if k != "LLM_TOKENIZER_FILE"}
    env.update(
        LLM_DATA_MIRROR=str(tmp_path / "nowhere"),
        TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"),
        HTTPS_PROXY="http://127.0.0.1:9",  # a closed port: any download attempt fails at once
        https_proxy="http://127.0.0.1:9",
    )
    code = (
        "from llm.tokenizer import get_tokenizer\n"
        "try:\n    get_tokenizer()\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("LLMError GPT-2 tokenizer ranks could not be downloaded"), out
    assert "LLM_TOKENIZER_FILE" in out.stdout
