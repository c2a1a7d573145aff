"""What the pipeline writes is safe to share and never half-written: outputs follow the umask (not the 0600/0700 of
temporary files), and a full disk is one LLMError naming the file and the space, leaving nothing behind."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_bad_inputs import BIN, TINY, Case, assert_one_error, env_for, run, set_params, snapshot, template, write, ws

from llm.checkpoint import save_checkpoint
from llm.config import GPTConfig
from llm.data.sources import Source, fetch_source
from llm.errors import LLMError
from llm.hf import export_hf
from llm.io import atomic_path, replaced_dir, write_json
from llm.model import GPT
from llm.model_dir import save_model

__all__ = ["template", "ws"]  # the bad-input matrix's workspace fixtures


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1))


def test_outputs_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    write_json(tmp_path / "metrics" / "m.json", {"a": 1})
    save_model(tiny_model(), tmp_path / "models" / "base")
    step = save_checkpoint(tmp_path / "checkpoints", tiny_model(), {"step": 3}, best={})
    with replaced_dir(tmp_path / "reports") as staged:
        write_json(staged / "r.json", {})
    files = [tmp_path / "metrics" / "m.json", *(tmp_path / "models" / "base").iterdir(), *step.iterdir()]
    files.append(tmp_path / "reports" / "r.json")
    assert {f.name: mode(f) for f in files} == {f.name: 0o644 for f in files}
    for directory in (tmp_path / "metrics", tmp_path / "models" / "base", step, tmp_path / "reports"):
        assert mode(directory) == 0o755, directory
    os.umask(0o077)
    write_json(tmp_path / "private.json", {})
    assert mode(tmp_path / "private.json") == 0o600


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    "write",
    [
        lambda d: write_json(d / "m.json", {"a": 1}),
        lambda d: save_model(tiny_model(), d / "model"),
        lambda d: save_checkpoint(d / "checkpoints", tiny_model(), {"step": 1}, best={}),
    ],
    ids=["json", "model", "checkpoint"],
)
def test_a_full_disk_is_one_error_naming_the_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path], None]
) -> None:
    monkeypatch.setattr(os, "fsync", disk_full)  # the last write of every file: as late as a disk can fill up
    with pytest.raises(LLMError, match=r"no space left on the device writing .*: it needs .* bytes are free in"):
        write(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_full_disk_inside_torch_save_is_named(tmp_path: Path) -> None:
    """torch.save reports ENOSPC as RuntimeError("... unexpected pos ..."); safetensors as "os error 28"."""
    for message in ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598", "I/O error (os error 28)"):
        with (
            pytest.raises(LLMError, match=r"no space left on the device writing .*state\.pt"),
            atomic_path(tmp_path / "state.pt"),
        ):
            raise RuntimeError(message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk(tmp_path: Path) -> None:
    """On a 64 KiB tmpfs (when this process may mount one) a model does not fit: one error, nothing left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.system(f"mount -t tmpfs -o size=64k tmpfs {disk} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        model = GPT(GPTConfig(vocab_size=512, context_length=8, emb_dim=64, n_heads=2, n_layers=1))
        with pytest.raises(LLMError, match=rf"writing {disk}/model/model\.safetensors: it needs [\d,]+ bytes"):
            save_model(model, disk / "model")
        with pytest.raises(LLMError, match=rf"writing {disk}/checkpoints/"):
            save_checkpoint(disk / "checkpoints", model, {"step": 1}, best={})
        assert [p for p in disk.rglob("*") if p.is_file()] == []
    finally:
        os.system(f"umount {disk}")


def test_an_unwritable_directory_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("a file where the checkpoints directory should be")
    with pytest.raises(LLMError, match=rf"cannot write into {tmp_path}/checkpoints"):
        save_checkpoint(tmp_path / "checkpoints", tiny_model(), {"step": 1}, best={})
    with pytest.raises(LLMError, match=rf"cannot write into {tmp_path}/checkpoints"):
        write_json(tmp_path / "checkpoints" / "x.json", {})


# -- mistakes that would otherwise run the wrong training, or end in a traceback: one error line each --------------
# (the bad-input matrix's contract, tests/test_bad_inputs.py: exit 1, one `error: ...` line, workspace unchanged)
SAFETY_CASES: dict[str, Case] = {
    "pretrain.nproc 0": Case("pretrain", lambda ws: set_params(ws, "pretrain.nproc", 0),
        r"pretrain\.nproc must be at least 1 \(processes\), got 0"),
    "pretrain.eval_windows -1": Case("pretrain", lambda ws: set_params(ws, "pretrain.eval_windows", -1),
        r"pretrain\.eval_windows must be >= 0, got -1"),
    "tokenize.row_group_tokens 0": Case("tokenize", lambda ws: set_params(ws, "tokenize.row_group_tokens", 0),
        r"row_group_tokens \(params tokenize\.row_group_tokens\) must be positive, got 0"),
    "tokenize.num_threads -2": Case("tokenize", lambda ws: set_params(ws, "tokenize.num_threads", -2),
        r"params\.yaml:tokenize\.num_threads must be >= 0, got -2"),
    "checkpoints dir unwritable": Case("pretrain", lambda ws: write(ws, "checkpoints", "not a directory"),
        r"cannot write into checkpoints/pretrain"),
    "classifier.labels names a class no row has": Case("finetune_classifier",
        lambda ws: set_params(ws, "finetune_classifier.classifier.labels", ["ham", "spam", "eggs"]),
        r"label 'eggs' of classifier\.labels: no row of data/raw/sms_spam_collection\.tsv has it"),
    "labelled file with a single class": Case("finetune_classifier",
        lambda ws: (write(ws, "data/raw/sms_spam_collection.tsv", "".join(f"ham\tmessage {i}\n" for i in range(40))),
                    set_params(ws, "finetune_classifier.classifier.labels", None)),  # the classes from the data
        r"data/raw/sms_spam_collection\.tsv holds a single class \['ham'\]: a classifier needs at least two"),
    "instructions nested too deeply": Case("finetune_instructions",
        lambda ws: write(ws, "data/raw/instruction-data.json", "[" * 200_000 + "]" * 200_000),
        r"data/raw/instruction-data\.json: JSON nested too deeply"),
    "generate --temperature nan": Case(("generate", "--model", "models/base", "--prompt", "Hi", "--temperature", "nan"),
        lambda ws: None, r"temperature must be >= 0 and finite \(0 = greedy\), got nan"),
    "classify --batch-size 0": Case(("classify", "--batch-size", "0", "some text"), lambda ws: None,
        r"--batch-size must be at least 1, got 0"),
    "export-hf onto its own source": Case(("export-hf", "models/base", "models/base", "--force"), lambda ws: None,
        r"models/base is \(inside\) the source models/base: write to another directory"),
    "export-hf inside its own source": Case(("export-hf", "models/base", "models/base/hf/../hf"), lambda ws: None,
        r"models/base/hf/\.\./hf is \(inside\) the source models/base"),
    "export-hf into a non-empty folder": Case(("export-hf", "models/base", "models"), lambda ws: None,
        r"models is not empty: choose an empty or new directory, or pass --force to write into it"),
    "import-hf into a non-empty folder": Case(("import-hf", "hf", "models/base"),
        lambda ws: export_hf(GPT(TINY), ws / "hf"), r"models/base is not empty: .* pass --force"),
    "finetune_classifier.eval_batch_size 0": Case("finetune_classifier",
        lambda ws: set_params(ws, "finetune_classifier.eval_batch_size", 0),
        r"params\.yaml:finetune_classifier: eval_batch_size must be at least 1, got 0"),
    "finetune_instructions.response_batch_size 0": Case("finetune_instructions",
        lambda ws: set_params(ws, "finetune_instructions.response_batch_size", 0),
        r"params\.yaml:finetune_instructions: response_batch_size must be at least 1, got 0"),
    "evaluate.batch_size -1": Case("evaluate", lambda ws: set_params(ws, "evaluate.batch_size", -1),
        r"params\.yaml:evaluate\.batch_size must be >= 0, got -1"),
    "sample.seed -3": Case("sample", lambda ws: set_params(ws, "sample.seed", -3),
        r"params\.yaml:sample\.seed must be >= 0, got -3"),
    "pretrain.train.seed -1": Case("pretrain", lambda ws: set_params(ws, "pretrain.train.seed", -1),
        r"params\.yaml:pretrain\.train\.seed must be >= 0, got -1"),
    "model.overrides empty": Case("pretrain", lambda ws: set_params(ws, "model.overrides", None),
        r"params\.yaml:model\.overrides: expected a mapping of settings, got None"),
    "corpus JSONL nested too deeply": Case("tokenize",
        lambda ws: write(ws, "data/raw/corpus/deep.jsonl", "[" * 200_000 + "]" * 200_000 + "\n"),
        r"data/raw/corpus/deep\.jsonl:1: JSON nested too deeply"),
    "registry.name with a slash": Case("finetune_classifier",
        lambda ws: set_params(ws, "finetune_classifier.registry.name", "team/model"),
        r"params\.yaml:finetune_classifier\.registry: registry\.name 'team/model': use letters, digits"),
    "labelled test file with a single class": Case("finetune_classifier",
        lambda ws: (write(ws, "data/own/train.tsv", "".join(f"{c}\tmessage {i}\n" for i in range(20) for c in "ab")),
                    write(ws, "data/own/val.tsv", "a\tone\nb\ttwo\n"), write(ws, "data/own/test.tsv", "a\tone\n"),
                    set_params(ws, "finetune_classifier.classifier.labels", None),
                    set_params(ws, "finetune_classifier.data", {"path": "data/own", "train": "data/own/train.tsv",
                               "val": "data/own/val.tsv", "test": "data/own/test.tsv"})),
        r"data/own/test\.tsv holds a single class: a classifier needs at least two"),
}  # fmt: skip


@pytest.mark.parametrize("name", SAFETY_CASES)
def test_bad_input_is_one_error_line(name: str, ws: Path) -> None:
    case = SAFETY_CASES[name]
    case.setup(ws)
    before = snapshot(ws)
    assert_one_error(run(ws, case.cmd, env_for(ws, **case.env)), case.error)
    assert snapshot(ws) == before


def test_classify_refuses_invalid_utf8_on_stdin_as_it_does_in_a_file(ws: Path) -> None:
    """The same bytes are refused through stdin and --file (the text stream would decode them with the locale's
    error handler and classify the result)."""
    bad = "caf\u00e9 ok\n".encode("latin-1")
    write(ws, "texts.txt", bad)
    env = env_for(ws, PYTHONIOENCODING="utf-8:surrogateescape")
    for args, stdin in ((("--file", "texts.txt"), b""), ((), bad)):
        result = subprocess.run(
            [str(BIN / "llm"), "classify", *args], cwd=ws, env=env, input=stdin, capture_output=True, timeout=120
        )
        assert result.returncode == 1, result
        assert re.fullmatch(rb"error: (texts\.txt|stdin) is not valid UTF-8 \(byte 3\)\n", result.stderr), result


def test_export_hf_with_force_writes_into_a_non_empty_folder_but_never_into_its_source(ws: Path) -> None:
    (ws / "out").mkdir()
    write(ws, "out/notes.txt", "kept")
    env = env_for(ws)
    done = subprocess.run([str(BIN / "llm"), "export-hf", "models/base", "out", "--force"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (ws / "out" / "model.safetensors").is_file() and (ws / "out" / "notes.txt").read_text() == "kept"
    (ws / "link").symlink_to(ws / "models" / "base")
    before = snapshot(ws / "models")
    refused = subprocess.run([str(BIN / "llm"), "export-hf", "models/base", "link", "--force"], cwd=ws, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1 and "is (inside) the source models/base" in refused.stderr
    assert snapshot(ws / "models") == before


@pytest.mark.parametrize("origin", ["mirror", "download"])
def test_a_full_disk_while_fetching_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    """Not "source is missing ... download failed": the disk is full, and nothing is left half-written."""
    (tmp_path / "mirror").mkdir()
    if origin == "mirror":
        (tmp_path / "mirror" / "a.txt").write_text("data")
        monkeypatch.setattr(shutil, "copyfile", disk_full)
    else:
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"data"))
        monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    source = Source("a", "https://example.com/a.txt", hashlib.sha256(b"data").hexdigest(), "a.txt")
    with pytest.raises(LLMError, match=rf"no space left on the device writing {tmp_path}/raw/a\.txt"):
        fetch_source(source, tmp_path / "raw" / "a.txt", tmp_path / "mirror")
    assert list((tmp_path / "raw").iterdir()) == []
