"""The data stages end to end: as `python -m stages.<name>` (bad input) and under DVC in temporary git repos."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from llm.data.windows import count_windows
from llm.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
DATA_STAGES = ("fetch", "tokenize", "sample")
SMALL_BOOKS = (
    "corpus/pg00011_alices_adventures_in_wonderland.txt",
    "corpus/pg00902_the_happy_prince_and_other_tales.txt",
)
OUTPUTS = ("data/raw", "data/tokens", "data/windows")
UNREACHABLE = "https://127.0.0.1:9/nothing-here"


def make_env(tmp: Path, code: Path = ROOT, **extra: str) -> dict[str, str]:
    """The environment of a stage or DVC run in a temporary repo: this venv's `python`, the `llm` package from
    `code`, a git identity, DVC without analytics; nothing inherited that points at a mirror, MLflow or DVC."""
    inherited = ("LLM_DATA_MIRROR", "LLM_MLFLOW", "MLFLOW_", "DVC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in dvc.yaml is this venv's
        PYTHONPATH=str(code),
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        GIT_AUTHOR_NAME="Test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="Test",
        GIT_COMMITTER_EMAIL="test@example.com",
        **extra,
    )
    return env


def sh(*cmd: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def small_params(mirror_setting: str | None) -> dict[str, Any]:
    """The repository's params with every non-corpus source but only two small books."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    sources = params["data"]["sources"]
    params["data"] = {
        "mirror": mirror_setting,
        "sources": [s for s in sources if not s["path"].startswith("corpus/") or s["path"] in SMALL_BOOKS],
    }
    params["sample"].update({"context_length": 64, "chunk_tokens": 2048})
    return {k: params[k] for k in ("data", "tokenize", "sample")}


def make_repo(path: Path, env: dict[str, str], params: dict[str, Any]) -> Path:
    """A git + DVC repo with the library, the stages, the data stages of dvc.yaml and our .dvc/config."""
    path.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "llm", path / "llm", ignore=ignore)
    shutil.copytree(ROOT / "stages", path / "stages", ignore=ignore)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    pipeline["stages"] = {name: pipeline["stages"][name] for name in DATA_STAGES}
    (path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (path / ".gitignore").write_text("__pycache__/\n", encoding="utf-8")
    sh("git", "init", "-q", cwd=path, env=env)
    sh(DVC, "init", "-q", cwd=path, env=env)
    shutil.copyfile(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    sh("git", "add", "-A", cwd=path, env=env)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=path, env=env)
    return path


def ran(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [s for s in DATA_STAGES if f"Running stage '{s}'" in result.stdout]


def snapshot(repo: Path) -> dict[str, bytes]:
    """The DVC-tracked data files (not the .gitignore files DVC writes beside them) and their bytes."""
    files = [p for d in OUTPUTS for p in (repo / d).rglob("*") if p.is_file() and p.name != ".gitignore"]
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in files}


@pytest.mark.slow
def test_repro_is_cached_and_a_context_change_reruns_only_sample(tmp_path: Path, mirror: Path) -> None:
    env = make_env(tmp_path, LLM_DATA_MIRROR=str(mirror))
    repo = make_repo(tmp_path / "repo", env, small_params(None))
    assert ran(sh(DVC, "repro", "sample", cwd=repo, env=env)) == ["fetch", "tokenize", "sample"]
    second = sh(DVC, "repro", cwd=repo, env=env)
    assert ran(second) == [] and "Data and pipelines are up to date" in second.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["sample"]["context_length"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    assert ran(sh(DVC, "repro", cwd=repo, env=env)) == ["sample"]

    meta = json.loads((repo / "data/windows/meta.json").read_text(encoding="utf-8"))
    data = json.loads((repo / "metrics/data.json").read_text(encoding="utf-8"))
    assert meta["context_length"] == meta["stride"] == 32 and data["documents"] == 2
    for split in ("train", "val"):
        n_tokens = (repo / f"data/windows/{split}.bin").stat().st_size // 2
        assert meta["n_tokens"][split] == n_tokens
        assert meta["n_windows"][split] == count_windows(n_tokens, 32, 32) > 0
    assert meta["n_tokens"]["train"] + meta["n_tokens"]["val"] > data["tokens"]  # + EOT separators


@pytest.mark.slow
def test_remote_round_trip_restores_identical_files(tmp_path: Path, mirror: Path) -> None:
    env = make_env(tmp_path, LLM_DATA_MIRROR=str(mirror))
    origin = make_repo(tmp_path / "origin", env, small_params(None))
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, env=env)
    sh(DVC, "repro", "sample", cwd=clone, env=env)
    sh("git", "add", "-A", cwd=clone, env=env)  # dvc.lock, metrics and DVC's .gitignore files
    sh("git", "commit", "-q", "-m", "data", cwd=clone, env=env)
    before = snapshot(clone)
    assert len([p for p in before if p.startswith("data/raw/corpus/")]) == 2 and "data/windows/train.bin" in before

    sh(DVC, "remote", "modify", "--local", "storage", "url", str(tmp_path / "remote"), cwd=clone, env=env)
    sh(DVC, "push", cwd=clone, env=env)
    assert any((tmp_path / "remote").rglob("*")) and not (tmp_path / "dvc-storage").exists()
    shutil.rmtree(clone / ".dvc" / "cache")
    for name in before:
        (clone / name).unlink()
    missing = sh(DVC, "status", cwd=clone, env=env)
    assert "deleted" in missing.stdout

    sh(DVC, "pull", cwd=clone, env=env)
    status = sh(DVC, "status", cwd=clone, env=env)
    assert "Data and pipelines are up to date" in status.stdout
    assert snapshot(clone) == before


@pytest.mark.slow
def test_exp_run_temp_finds_the_relative_mirror(tmp_path: Path, mirror: Path) -> None:
    """`dvc exp run --temp` runs stages in .dvc/tmp/exps/<copy>; `../shared/data` must still resolve."""
    shared = tmp_path / "shared" / "data"
    for source in small_params(None)["data"]["sources"]:
        (shared / source["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / source["path"], shared / source["path"])
    params = small_params("../shared/data")
    for source in params["data"]["sources"]:
        source["url"] = UNREACHABLE  # downloads fail: the mirror must be found
    env = make_env(tmp_path)  # no LLM_DATA_MIRROR
    repo = make_repo(tmp_path / "main", env, params)
    sh(DVC, "exp", "run", "--temp", "-S", "sample.context_length=48", cwd=repo, env=env)
    shown = sh(DVC, "exp", "show", "--json", cwd=repo, env=env).stdout
    metrics = [m["data"] for m in find_key(json.loads(shown), "metrics/sample.json") if "data" in m]
    assert not (repo / "metrics").exists()  # the workspace never ran: these come from the experiment
    assert len(metrics) == 1 and metrics[0]["n_windows_train"] > 0


def find_key(tree: Any, key: str) -> Iterator[Any]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from [v] if k == key else find_key(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from find_key(v, key)


def write_params(workspace: Path, mirror: Path, **sections: dict[str, Any]) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    params = small_params(str(mirror))
    for name, values in sections.items():
        params[name].update(values)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def write_corpus(workspace: Path, mirror: Path, files: dict[str, bytes]) -> None:
    corpus = workspace / "data/raw/corpus"
    corpus.mkdir(parents=True)
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    (workspace / "data/raw/tokenizer").mkdir(parents=True)
    shutil.copyfile(mirror / "tokenizer/r50k_base.tiktoken", workspace / "data/raw/tokenizer/r50k_base.tiktoken")


def unreachable(path: str) -> dict[str, Any]:
    """A source the mirror lacks (or has with other content) and whose URL fails at once."""
    return {"name": Path(path).stem, "url": UNREACHABLE, "sha256": "0" * 64, "path": path}


BAD_INPUTS = {
    "missing source": ("fetch", {"data": {"sources": [unreachable("corpus/gone.txt")]}}, None,
                       r"source 'gone' \(corpus/gone\.txt\) is missing: not in the mirror"),
    "sha256 mismatch": ("fetch", {"data": {"sources": [unreachable("the-verdict.txt")]}}, None,
                        r"the-verdict\.txt .*sha256 mismatch: expected 0{64}, got b41e41a68f0398a3"),
    "invalid utf-8": ("tokenize", {}, {"a.txt": b"fine", "b.txt": b"caf\xe9 ok"},
                      r"b\.txt: invalid UTF-8 at byte offset 3 \(bytes e9\)"),
    "empty corpus": ("tokenize", {}, {"a.txt": b"", "b.txt": b"\xef\xbb\xbf"}, r"is empty: its 2 text file"),
    "no text files": ("tokenize", {}, {".notes.md": b"hello", ".data.csv": b"1,2"}, r"has no files to read; it holds"),
    "context too long": ("sample", {"sample": {"context_length": 100_000, "chunk_tokens": 256}},
                         {"a.txt": b"word " * 3000}, r"context_length 100000 does not fit the train split"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_error_without_partial_outputs(tmp_path: Path, mirror: Path, case: str) -> None:
    stage, sections, corpus, message = BAD_INPUTS[case]
    ws, env = tmp_path / "ws", make_env(tmp_path)
    write_params(ws, mirror, **sections)
    if corpus is not None:
        write_corpus(ws, mirror, corpus)
    if stage == "sample":
        sh(sys.executable, "-m", "stages.tokenize", cwd=ws, env=env)
    before = files_in(ws)
    result = sh(sys.executable, "-m", f"stages.{stage}", cwd=ws, env=env, ok=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert files_in(ws) == before  # no partial outputs, no temporary files


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_invalid_utf8_is_accepted_when_params_allow_replacement(tmp_path: Path, mirror: Path) -> None:
    ws = tmp_path / "ws"
    write_params(ws, mirror, tokenize={"allow_replacement": True})
    write_corpus(ws, mirror, {"b.txt": b"caf\xe9 ok"})
    sh(sys.executable, "-m", "stages.tokenize", cwd=ws, env=make_env(tmp_path))
    assert json.loads((ws / "metrics/data.json").read_text(encoding="utf-8"))["documents"] == 1


@pytest.mark.slow
def test_a_file_of_yours_in_fetchs_folder_is_never_deleted_and_data_corpus_is_the_way(
    tmp_path: Path, mirror: Path
) -> None:
    """The bug of issue #16: a book put in data/raw/corpus/ vanished at the next `dvc repro` (DVC restored fetch's
    cached folder over it). Now fetch stops naming it; in data/corpus/ under `dvc add` it joins the corpus."""
    env = make_env(tmp_path, LLM_DATA_MIRROR=str(mirror))
    repo = make_repo(tmp_path / "repo", env, small_params(None))
    sh(DVC, "repro", "tokenize", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "data", cwd=repo, env=env)
    book = b"My own book.\nIt has two lines.\n"
    (repo / "data/raw/corpus/my_book.txt").write_bytes(book)
    refused = sh(DVC, "repro", "tokenize", cwd=repo, env=env, ok=False)
    assert refused.returncode != 0 and (repo / "data/raw/corpus/my_book.txt").read_bytes() == book
    assert "data/raw/corpus/my_book.txt: not fetched" in refused.stderr and "dvc add data/corpus" in refused.stderr

    (repo / "data/corpus").mkdir()
    (repo / "data/raw/corpus/my_book.txt").rename(repo / "data/corpus/my_book.txt")
    sh(DVC, "add", "data/corpus", cwd=repo, env=env)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["tokenize"]["inputs"].append({"path": "data/corpus"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    undeclared = sh(DVC, "repro", "tokenize", cwd=repo, env=env, ok=False)
    assert "add `- data/corpus` under stages.tokenize.deps in dvc.yaml" in undeclared.stderr

    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    pipeline["stages"]["tokenize"]["deps"].insert(1, "data/corpus")  # the one line the error names
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    assert ran(sh(DVC, "repro", "tokenize", cwd=repo, env=env)) == ["tokenize"]
    table = pq.read_table(repo / "data/tokens/corpus.parquet")
    assert table["source"].to_pylist()[-1] == "my_book.txt" and table.num_rows == 3
    assert table["tokens"][-1].as_py() == get_tokenizer(mirror / "tokenizer/r50k_base.tiktoken").encode_ordinary(
        book.decode()
    )
    (repo / "data/corpus/my_book.txt").write_bytes(book + b"A third line.\n")
    assert ran(sh(DVC, "repro", "tokenize", cwd=repo, env=env)) == ["tokenize"]  # a change reruns tokenize only
