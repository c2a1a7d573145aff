"""Nothing lost under `dvc repro`: a stage that fails leaves every previous output byte-identical, whichever
command ran it (`dvc repro`, `dvc exp run`, `llm pipeline repro`), and its next successful run replaces them whole.

One tiny pipeline (tests/faults' profile, MLflow off) is run once per module with real DVC; each test breaks one
thing, checks that nothing changed, then puts it back. Also: the params-file mistakes that used to train the wrong
thing without a word (a key written twice, an empty section, a file that is not UTF-8) are one error line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults.conftest import DVC, fault_env, make_repo

from llm.errors import LLMError
from stages.common import load_params

BIN = Path(sys.executable).parent
OUTPUT_DIRS = ("data", "models", "metrics", "plots", "reports", "runs")


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file under the output folders (DVC's .gitignore files excepted), by path."""
    files = [p for d in OUTPUT_DIRS for p in (repo / d).rglob("*") if p.is_file() and p.name != ".gitignore"]
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(files)}


def run(repo: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The stage's own error lines (DVC adds its `ERROR: failed to reproduce ...`)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """The tiny pipeline after one `dvc repro`, committed (so `dvc exp run` has a baseline)."""
    tmp = tmp_path_factory.mktemp("nothing-lost")
    env = fault_env(tmp, mirror, tmp / "repo")
    path = tmp / "repo"
    make_repo(path, env)
    done = run(path, env, DVC, "repro")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "outputs"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    yield path, env


@pytest.fixture
def params(repo: tuple[Path, dict[str, str]]) -> Iterator[dict[str, Any]]:
    """The repo's params (edit, then `write`); params.yaml is put back after the test."""
    path = repo[0] / "params.yaml"
    original = path.read_bytes()
    yield yaml.safe_load(original)
    path.write_bytes(original)


def write(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dvc repro", "dvc exp run", "llm pipeline repro"])
def test_a_failing_stage_keeps_every_previous_output(
    repo: tuple[Path, dict[str, str]], params: dict[str, Any], command: str
) -> None:
    path, env = repo
    before = outputs(path)
    params["pretrain"]["train"]["lr"] = "fast"  # a typo: the stage fails before it trains
    write(path, params)
    cmd = {"dvc repro": [DVC, "repro"], "dvc exp run": [DVC, "exp", "run"]}.get(command)
    failed = run(path, env, *(cmd or [str(BIN / "llm"), "pipeline", "repro"]))
    assert failed.returncode != 0, failed.stdout
    assert error_lines(failed) == ["error: params.yaml:pretrain.train.lr: expected a number, got 'fast'"], failed.stderr
    assert "Traceback" not in failed.stderr
    after = outputs(path)
    assert after.keys() == before.keys(), sorted(before.keys() ^ after.keys())  # models, metrics, plots, runs
    assert [p for p in before if after[p] != before[p]] == []


@pytest.mark.slow
def test_a_stage_failing_after_it_trained_keeps_every_previous_output(
    repo: tuple[Path, dict[str, str]], params: dict[str, Any]
) -> None:
    """pretrain trains and writes its new model, metrics and plots, then its last write fails (`runs` is a file):
    none of them takes the place of the previous outputs, and no temporary stays behind."""
    path, env = repo
    shutil.rmtree(path / "runs")
    (path / "runs").write_text("a file where the runs folder should be\n")
    try:
        before = outputs(path)
        params["pretrain"]["train"]["lr"] *= 2  # a change: pretrain reruns
        write(path, params)
        failed = run(path, env, DVC, "repro", "pretrain")
        assert failed.returncode != 0, failed.stdout
        assert error_lines(failed) == ["error: cannot write into runs: File exists"], failed.stderr
        assert outputs(path) == before
        hidden = [p for d in OUTPUT_DIRS for p in (path / d).rglob(".*") if p.name != ".gitignore"]
        assert hidden == [], hidden
    finally:
        (path / "runs").unlink()
        subprocess.run(["git", "checkout", "--", "runs"], cwd=path, env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_fetch_with_a_bad_mirror_file_keeps_data_raw(repo: tuple[Path, dict[str, str]], mirror: Path) -> None:
    path, env = repo
    before = outputs(path)
    bad = path.parent / "bad-mirror"
    bad.mkdir()
    for entry in mirror.iterdir():
        if entry.name != "sms_spam_collection.tsv":
            (bad / entry.name).symlink_to(entry)
    (bad / "sms_spam_collection.tsv").write_bytes(b"ham\tnot the file\n")  # one of several sources
    failed = run(path, {**env, "LLM_DATA_MIRROR": str(bad)}, DVC, "repro", "--force", "--single-item", "fetch")
    assert failed.returncode != 0
    assert len(error_lines(failed)) == 1 and "sha256 mismatch" in failed.stderr, failed.stderr
    assert outputs(path) == before
    assert [p.name for p in (path / "data").iterdir() if p.name.startswith(".")] == []  # no staging left


@pytest.mark.slow
def test_the_next_successful_run_replaces_the_outputs_whole(
    repo: tuple[Path, dict[str, str]], params: dict[str, Any]
) -> None:
    path, env = repo
    before = outputs(path)
    stale = [path / "plots/pretrain/old_metric.csv", path / "models/base/old.bin"]
    leftovers = [path / "models/.base.abcdefgh.tmp", path / "plots/.pretrain.previous.tmp"]  # of a killed run
    for file in stale:
        file.write_text("from an earlier run\n")
    for folder in leftovers:
        folder.mkdir()
        (folder / "half-written").write_text("x")
    for folder in leftovers:  # git-ignored
        assert run(path, env, "git", "check-ignore", "-q", str(folder)).returncode == 0, folder
    params["pretrain"]["train"]["seed"] += 1
    write(path, params)
    done = run(path, env, DVC, "repro", "--single-item", "pretrain")
    assert done.returncode == 0, done.stderr[-3000:]
    after = outputs(path)
    for out in ("models/base/model.safetensors", "metrics/pretrain.json", "plots/pretrain/loss.csv"):
        assert after[out] != before[out], out
    assert not any(p.exists() for p in stale + leftovers)
    assert after.keys() == before.keys()
    status = run(path, env, DVC, "status", "pretrain")
    assert "changed" not in status.stdout, status.stdout


def test_a_key_written_twice_is_one_error_naming_both_lines(tmp_path: Path) -> None:
    file = tmp_path / "params.yaml"
    file.write_text("pretrain:\n  train:\n    lr: 0.002\n    batch_size: 8\n    lr: 0.02\n", encoding="utf-8")
    with pytest.raises(LLMError, match=r"at line 5, column 5: key 'lr' is written twice \(lines 3 and 5\); keep one$"):
        load_params(file)


def test_an_empty_section_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    file = tmp_path / "params.yaml"
    file.write_text("pretrain:\nsample: {}\n", encoding="utf-8")
    with pytest.raises(LLMError, match=r"section 'pretrain' is empty; give its settings, or `pretrain: \{\}`"):
        load_params(file)
    file.write_text("sample: {}\n", encoding="utf-8")
    assert load_params(file) == {"sample": {}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"pretrain:\n  train:\n    lr: 0.1\n    lr: 0.2\n", "key 'lr' is written twice (lines 3 and 4)"),
        (b"sample:\n  seed: 1\npretrain:\n", "section 'pretrain' is empty"),
        (b"sample:\n  seed: \xff\n", "params.yaml is not valid UTF-8 (byte 16)"),
    ],
)
def test_params_mistakes_stop_the_stage_with_one_line(tmp_path: Path, text: bytes, message: str) -> None:
    (tmp_path / "params.yaml").write_bytes(text)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "LLM_ALLOCATOR": "system", "PATH": str(BIN)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.sample"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_every_out_of_the_pipeline_is_persist() -> None:
    """Without `persist: true` DVC deletes an out before its stage runs, and a failing stage then loses it."""
    pipeline = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text(encoding="utf-8"))
    declared = [
        (stage, out) for stage, spec in pipeline["stages"].items() for kind in ("outs", "metrics", "plots")
        for out in spec.get(kind, [])
    ]  # fmt: skip
    assert declared
    assert [(s, o) for s, o in declared if not (isinstance(o, dict) and next(iter(o.values())).get("persist"))] == []
