import io
import zipfile
from pathlib import Path

import pytest
import yaml

from llm.data import sources
from llm.data.sources import Source, fetch_all, fetch_source
from llm.errors import LLMError
from llm.io import sha256_file
from llm.paths import find_mirror

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "https://127.0.0.1:9/nothing-here"  # a closed local port: fails at once, offline


def source_for(mirror: Path, path: str, url: str = UNREACHABLE, **kw: str) -> Source:
    return Source(name=Path(path).stem, url=url, sha256=sha256_file(mirror / path), path=path, **kw)


def test_params_list_every_mirror_file_with_its_hash(mirror: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["data"]
    listed = {s["path"]: s["sha256"] for s in params["sources"]}
    sums = dict(line.split()[::-1] for line in (mirror / "SHA256SUMS").read_text().splitlines())
    assert len([p for p in listed if p.startswith("corpus/")]) == 24
    assert {"heldout/pg00289_the_wind_in_the_willows.txt", "sms_spam_collection.tsv", "instruction-data.json",
            "tokenizer/r50k_base.tiktoken", "the-verdict.txt"} <= set(listed)  # fmt: skip
    for path, digest in listed.items():
        assert sums[path] == digest, path
    assert all(Source(**s).url.startswith("https://") for s in params["sources"])


def test_copy_from_mirror_verifies_hash(mirror: Path, tmp_path: Path) -> None:
    src = source_for(mirror, "the-verdict.txt")
    assert fetch_source(src, tmp_path / "v.txt", mirror) == "mirror"
    assert (tmp_path / "v.txt").read_bytes() == (mirror / "the-verdict.txt").read_bytes()


def test_hash_mismatch_names_file_expected_and_actual(mirror: Path, tmp_path: Path) -> None:
    actual = sha256_file(mirror / "the-verdict.txt")
    src = Source(name="verdict", url=UNREACHABLE, sha256="0" * 64, path="the-verdict.txt")
    (tmp_path / "v.txt").write_text("old")
    with pytest.raises(LLMError, match=rf"the-verdict\.txt .*sha256 mismatch: expected 0{{64}}, got {actual}"):
        fetch_source(src, tmp_path / "v.txt", mirror)
    assert (tmp_path / "v.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_missing_source_is_one_clear_error(tmp_path: Path) -> None:
    src = Source(name="book", url=UNREACHABLE, sha256="0" * 64, path="corpus/book.txt")
    with pytest.raises(LLMError, match=r"source 'book' \(corpus/book\.txt\) is missing: not in the mirror .* download"):
        fetch_source(src, tmp_path / "out" / "book.txt", tmp_path)
    assert not list((tmp_path / "out").iterdir())


class FakeResponse(io.BytesIO):
    def __enter__(self) -> "FakeResponse":
        return self


def test_download_and_zip_member_extraction(mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme", "about")
        zf.write(mirror / "sms_spam_collection.tsv", "SMSSpamCollection")
    served = {
        "https://x.test/sms.zip": archive.getvalue(),
        "https://x.test/v.txt": (mirror / "the-verdict.txt").read_bytes(),
    }
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: FakeResponse(served[url]))
    sms = source_for(mirror, "sms_spam_collection.tsv", "https://x.test/sms.zip", member="SMSSpamCollection")
    verdict = source_for(mirror, "the-verdict.txt", "https://x.test/v.txt")
    assert fetch_source(sms, tmp_path / "sms.tsv", None) == "download"
    assert fetch_source(verdict, tmp_path / "v.txt", tmp_path / "empty-mirror") == "download"
    assert sha256_file(tmp_path / "sms.tsv") == sms.sha256 and sha256_file(tmp_path / "v.txt") == verdict.sha256
    wrong = Source(name="sms", url="https://x.test/sms.zip", sha256=sms.sha256, path="s.tsv", member="nope")
    with pytest.raises(LLMError, match="KeyError"):
        fetch_source(wrong, tmp_path / "s.tsv", None)


def test_fetch_all_is_all_or_nothing(mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [
        source_for(mirror, "the-verdict.txt"),
        source_for(mirror, "corpus/pg00011_alices_adventures_in_wonderland.txt"),
    ]
    raw = tmp_path / "data" / "raw"
    assert fetch_all(good, raw, mirror) == {"mirror": 2, "download": 0}
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.txt")) == [
        "corpus/pg00011_alices_adventures_in_wonderland.txt",
        "the-verdict.txt",
    ]
    missing = Source(name="gone", url=UNREACHABLE, sha256="0" * 64, path="gone.txt")
    with pytest.raises(LLMError, match="is missing"):
        fetch_all(good, tmp_path / "fresh" / "raw", tmp_path / "no-mirror")
    with pytest.raises(LLMError, match="is missing"):
        fetch_all([*good, missing], tmp_path / "fresh" / "raw", mirror)
    assert list((tmp_path / "fresh").iterdir()) == []  # nothing in raw/, no staging folder left

    def interrupted(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(sources.shutil, "copyfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_all(good, tmp_path / "cut" / "raw", mirror)
    assert list((tmp_path / "cut").iterdir()) == []
    with pytest.raises(LLMError, match=r"duplicate name 'the-verdict'"):
        fetch_all([good[0], good[0]], raw, mirror)


def test_find_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_DATA_MIRROR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    exp_copy = tmp_path / "main" / ".dvc" / "tmp" / "exps" / "tmpabc"  # where `dvc exp run --temp` runs stages
    exp_copy.mkdir(parents=True)
    assert find_mirror(tmp_path / "main", "../shared/data") == tmp_path / "shared" / "data"
    assert find_mirror(exp_copy, "../shared/data") == tmp_path / "shared" / "data"
    assert find_mirror(exp_copy) == tmp_path / "shared" / "data"  # the default setting, shared/data
    assert find_mirror(exp_copy, str(tmp_path / "shared")) == tmp_path / "shared"
    assert find_mirror(exp_copy, "../nowhere") is None and find_mirror(exp_copy, None) is None
    monkeypatch.setenv("LLM_DATA_MIRROR", str(tmp_path / "main"))
    assert find_mirror(setting=None) == tmp_path / "main"
    monkeypatch.setenv("LLM_DATA_MIRROR", str(tmp_path / "missing"))
    with pytest.raises(LLMError, match=r"LLM_DATA_MIRROR=.* is not a directory"):
        find_mirror(setting="../shared/data")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sha256": "abc"}, "64 lowercase hex digits"),
        ({"url": "http://example.com/a"}, "must start with https://"),
        ({"path": "../escape.txt"}, "must be relative inside data/raw/"),
        ({"path": "/abs.txt"}, "must be relative inside data/raw/"),
    ],
)
def test_source_validation(fields: dict[str, str], message: str) -> None:
    base = {"name": "s", "url": "https://example.com/a", "sha256": "a" * 64, "path": "a.txt"}
    with pytest.raises(LLMError, match=message):
        Source(**{**base, **fields})


def test_fetch_stops_at_a_file_it_does_not_own_and_deletes_nothing(mirror: Path, tmp_path: Path) -> None:
    book = source_for(mirror, "corpus/pg00011_alices_adventures_in_wonderland.txt")
    raw = tmp_path / "raw"
    fetch_all([book], raw, mirror)
    (raw / "corpus/sub").mkdir()
    (raw / "corpus/sub/mine.txt").write_text("my own book", encoding="utf-8")
    (raw / "corpus/.gitignore").write_text("/x\n", encoding="utf-8")  # DVC's own files are not strays
    (raw / "elsewhere.txt").write_text("not in a folder fetch fills", encoding="utf-8")
    with pytest.raises(LLMError, match=r"raw/corpus/sub/mine\.txt: not fetched .*move your files to data/corpus/"):
        fetch_all([book], raw, mirror)
    assert (raw / "corpus/sub/mine.txt").read_text(encoding="utf-8") == "my own book"
    (raw / "corpus/sub/mine.txt").unlink()
    assert fetch_all([book], raw, mirror) == {"mirror": 1, "download": 0}
