"""The bad-input matrix: every stage and the CLI, fed one bad input each, run as a real subprocess.

Each case must end with exit status 1 and exactly one stderr line, `error: ...`, that names the input and the
problem (no traceback), and must leave every file of the workspace as it was: earlier outputs untouched, no
partial or temporary files. The workspace is a tiny but complete pipeline state (raw data, Parquet, windows,
base and instruction models, upstream metrics), built once per session and copied per case.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.config import GPTConfig, from_mapping
from llm.data.classification import read_labeled_tsv
from llm.data.corpus import tokenize_corpus
from llm.data.instructions import load_instructions, split_entries
from llm.data.windows import write_splits
from llm.errors import LLMError
from llm.hf import export_hf
from llm.io import write_json
from llm.model import GPT
from llm.model_dir import WEIGHTS_FILE, save_model
from llm.tokenizer import RANKS_SHA256, RANKS_URL, get_tokenizer
from llm.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNREACHABLE_URL = "https://127.0.0.1:9/nothing-here"
VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
TINY = GPTConfig(context_length=64, emb_dim=16, n_heads=2, n_layers=1)
SPLIT_SEED = 123
PARAMS: dict[str, Any] = {
    "data": {
        "mirror": None,
        "sources": [{"name": "the-verdict", "url": UNREACHABLE_URL, "sha256": VERDICT_SHA, "path": "the-verdict.txt"}],
    },
    "tokenize": {},
    "sample": {"context_length": 32, "chunk_tokens": 1024},
    "model": {"init": "scratch", "preset": "cpu-tiny", "overrides": {"emb_dim": 16, "n_layers": 1}},
    "pretrain": {"train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0}, "eval_windows": 2, "sample_tokens": 2},
    "finetune_classifier": {"epochs": 1, "classifier": {"max_length": 32}, "train": {"batch_size": 8}},
    "finetune_instructions": {
        "train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0},
        "split_seed": SPLIT_SEED,
        "generation": {"max_new_tokens": 1},
    },
    "evaluate": {"heldout_max_tokens": 256, "examples": 1},
}


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A workspace as the pipeline leaves it, on tiny data and models (built in-process, once)."""
    ws = tmp_path_factory.mktemp("bad-inputs") / "ws"
    raw = ws / "data/raw"
    for name in ("tokenizer/r50k_base.tiktoken", "sms_spam_collection.tsv", "instruction-data.json", "the-verdict.txt"):
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / name, raw / name)
    for folder in ("corpus", "heldout"):
        (raw / folder).mkdir()
        shutil.copyfile(mirror / "the-verdict.txt", raw / folder / "the-verdict.txt")
    tokenizer = get_tokenizer(raw / "tokenizer/r50k_base.tiktoken")
    stats = tokenize_corpus(raw / "corpus", ws / "data/tokens/corpus.parquet", tokenizer, progress=False)
    write_json(ws / "metrics/data.json", stats.to_dict())
    meta = write_splits(
        ws / "data/tokens/corpus.parquet", ws / "data/windows", val_fraction=0.1, chunk_tokens=1024, seed=1,
        context_length=32, progress=False,
    )  # fmt: skip
    write_json(ws / "data/windows/meta.json", meta)
    torch.manual_seed(0)
    for name in ("base", "instruct"):
        save_model(GPT(TINY), ws / "models" / name)
    test = split_entries(load_instructions(raw / "instruction-data.json"), SPLIT_SEED)["test"]
    rows = [{"instruction": e.instruction, "input": e.input, "reference": e.output, "response": "ok"} for e in test]
    write_json(ws / "reports/responses.json", rows)
    for stage in ("pretrain", "finetune_classifier", "finetune_instructions", "evaluate"):
        write_json(ws / f"metrics/{stage}.json", {"test": {"accuracy": 0.5}, "from": "an earlier run"})
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False), encoding="utf-8")
    return ws


@pytest.fixture
def ws(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template, tmp_path / "ws")
    (tmp_path / "mirror").mkdir()  # the fetch stage's data mirror: empty unless a case fills it
    return tmp_path / "ws"


def env_for(ws: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        LLM_ALLOCATOR="system",  # no re-exec, no allocator line on stderr
        LLM_MLFLOW="off",
        LLM_DATA_MIRROR=str(ws.parent / "mirror"),
        LLM_TOKENIZER_FILE=str(ws / "data/raw/tokenizer/r50k_base.tiktoken"),
        HF_HUB_OFFLINE="1",
    )
    return env | extra


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) and the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def set_params(ws: Path, path: str, value: Any) -> None:
    """Set params.yaml entry `path` (dotted, e.g. "pretrain.train.batch_size") to `value`."""
    params = yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8"))
    *parents, key = path.split(".")
    node = params
    for name in parents:
        node = node.setdefault(name, {})
    node[key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def write(ws: Path, rel: str, data: bytes | str) -> None:
    path = ws / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def truncate(ws: Path, rel: str, keep: float = 0.5) -> None:
    data = (ws / rel).read_bytes()
    (ws / rel).write_bytes(data[: int(len(data) * keep)])


def damage_middle(ws: Path, rel: str) -> None:
    data = bytearray((ws / rel).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    (ws / rel).write_bytes(bytes(data))


def mirror_file(ws: Path, rel: str, data: bytes) -> None:
    """Put `data` at `rel` in the workspace's data mirror (the fetch stage's LLM_DATA_MIRROR)."""
    write(ws.parent, f"mirror/{rel}", data)


class Payload:
    """Unpickling this runs `touch PWNED` in the working directory: proof that a file was unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, ("touch PWNED",)


def pickled_hf_model(ws: Path) -> None:
    """An HF GPT-2 directory whose weights are a malicious pickle (pytorch_model.bin) instead of safetensors."""
    torch.manual_seed(0)
    export_hf(GPT(TINY), ws / "hf")
    (ws / "hf" / WEIGHTS_FILE).unlink()
    write(ws, "hf/pytorch_model.bin", pickle.dumps(Payload(), protocol=2))


def save_tiny(directory: Path, **changes: Any) -> None:
    torch.manual_seed(0)
    save_model(GPT(TINY.replace(**changes)), directory)


def instructions(ws: Path, data: Any) -> None:
    write(ws, "data/raw/instruction-data.json", json.dumps(data))


def spam_lines(ws: Path, *lines: str) -> None:
    """The real SMS file with `lines` inserted as lines 3, 4, …."""
    real = (ws / "data/raw/sms_spam_collection.tsv").read_bytes().split(b"\n")
    write(ws, "data/raw/sms_spam_collection.tsv", b"\n".join([*real[:2], *(s.encode() for s in lines), *real[2:]]))


class Judge(http.server.BaseHTTPRequestHandler):
    """A stand-in LLM-judge endpoint answering every POST with `status` and `body`."""

    status, body = 200, b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[Callable[[int, bytes], str]]:
    """Start a fake judge with a given reply; returns its base URL."""
    servers: list[http.server.HTTPServer] = []

    def start(status: int, body: bytes) -> str:
        handler = type("FakeJudge", (Judge,), {"status": status, "body": body})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()


@dataclass(frozen=True)
class Case:
    """Run `cmd` (a stage name, or `llm` CLI arguments) after `setup(ws)`; stderr must match `error`."""

    cmd: str | tuple[str, ...]
    setup: Callable[[Path], None]
    error: str
    judge: tuple[int, bytes] | None = None  # start a fake judge endpoint with this reply
    env: dict[str, str] = field(default_factory=dict)


def _judge(url: str) -> Callable[[Path], None]:
    return lambda ws: set_params(ws, "evaluate.judge", {"url": url, "timeout": 10})


CASES: dict[str, Case] = {
    # -- raw files (fetch) --
    "raw file missing": Case("fetch", lambda ws: None,
        r"source 'the-verdict' \(the-verdict\.txt\) is missing: not in the mirror .* download from https://127"),
    "raw file mis-hashed": Case("fetch", lambda ws: mirror_file(ws, "the-verdict.txt", b"a different story\n"),
        rf"the-verdict\.txt \(the-verdict, from .*mirror/the-verdict\.txt\): sha256 mismatch: expected {VERDICT_SHA}"),
    "raw file truncated": Case("fetch",
        lambda ws: mirror_file(ws, "the-verdict.txt", (ws / "data/raw/the-verdict.txt").read_bytes()[:5000]),
        rf"the-verdict\.txt .*sha256 mismatch: expected {VERDICT_SHA}, got (?!{VERDICT_SHA})[0-9a-f]{{64}}"),
    "source over plain http": Case("fetch", lambda ws: set_params(ws, "data.sources", [
        {**PARAMS["data"]["sources"][0], "url": "http://example.com/the-verdict.txt"}]),
        r"source 'the-verdict': url must start with https://, got 'http://example\.com/the-verdict\.txt'"),
    "source path escapes data/raw": Case("fetch", lambda ws: set_params(ws, "data.sources", [
        {**PARAMS["data"]["sources"][0], "path": "../../outside.txt"}]),
        r"source 'the-verdict': path must be relative inside data/raw/, got '\.\./\.\./outside\.txt'"),
    "source sha256 malformed": Case("fetch", lambda ws: set_params(ws, "data.sources", [
        {**PARAMS["data"]["sources"][0], "sha256": "b41e41a6"}]),
        r"source 'the-verdict': sha256 must be 64 lowercase hex digits, got 'b41e41a6'"),
    "params: typo in data": Case("fetch", lambda ws: set_params(ws, "data.mirorr", "../shared/data"),
        r"params\.yaml:data: unknown key 'mirorr' \(did you mean 'mirror'\?\); valid keys: mirror, sources"),
    "params: typo in a source": Case("fetch", lambda ws: set_params(ws, "data.sources", [
        {**PARAMS["data"]["sources"][0], "sha265": VERDICT_SHA}]),
        r"params\.yaml:data\.sources\[0\]: unknown key 'sha265' \(did you mean 'sha256'\?\); "
        r"valid keys: name, url, sha256, path, member"),
    # -- corpus text (tokenize) --
    "corpus: non-UTF-8 file": Case("tokenize", lambda ws: write(ws, "data/raw/corpus/latin1.txt", "café au lait"
        .encode("latin-1")), r"data/raw/corpus/latin1\.txt: invalid UTF-8 at byte offset 3 \(bytes e9\)"),
    "corpus: binary file": Case("tokenize", lambda ws: write(ws, "data/raw/corpus/image.txt",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), r"data/raw/corpus/image\.txt: invalid UTF-8 at byte offset 0"),
    "corpus: file cut inside a character": Case("tokenize", lambda ws: write(ws, "data/raw/corpus/cut.txt",
        "a naïve".encode()[:5]), r"data/raw/corpus/cut\.txt: invalid UTF-8 at byte offset 4 \(bytes c3\)"),
    "corpus: only empty documents": Case("tokenize", lambda ws: (
        write(ws, "data/raw/corpus/the-verdict.txt", b""), write(ws, "data/raw/corpus/bom.txt", b"\xef\xbb\xbf")),
        r"corpus data/raw/corpus is empty: its 2 text file\(s\) hold no text"),
    "corpus: no text files": Case("tokenize", lambda ws: (
        (ws / "data/raw/corpus/the-verdict.txt").rename(ws / "data/raw/corpus/.the-verdict.txt")),
        r"data/raw/corpus has no files to read; it holds \.the-verdict\.txt \(hidden files are skipped\)"),
    "tokenizer ranks truncated": Case("tokenize", lambda ws: truncate(ws, "data/raw/tokenizer/r50k_base.tiktoken"),
        r"tokenizer ranks file .*r50k_base\.tiktoken has sha256 [0-9a-f]{64}, expected 306cd27f"),
    "params: wrong type in tokenize": Case("tokenize", lambda ws: set_params(ws, "tokenize.allow_replacement", "yes"),
        r"params\.yaml:tokenize\.allow_replacement: expected bool, got 'yes'"),
    # -- the corpus Parquet file and windows (sample) --
    "corrupt Parquet file": Case("sample", lambda ws: write(ws, "data/tokens/corpus.parquet", b"PAR1" + b"\0" * 64),
        r"data/tokens/corpus\.parquet is corrupt or truncated \(Parquet magic bytes not found.*dvc repro tokenize"),
    "truncated Parquet file": Case("sample", lambda ws: truncate(ws, "data/tokens/corpus.parquet"),
        r"data/tokens/corpus\.parquet is corrupt or truncated \(.*\); re-run it: dvc repro tokenize"),
    "Parquet with a damaged data page": Case("sample", lambda ws: damage_middle(ws, "data/tokens/corpus.parquet"),
        r"data/tokens/corpus\.parquet: row group 0 is corrupt \(.*\); re-run it: dvc repro tokenize"),
    "Parquet from an unknown tokenizer": Case("sample", lambda ws: pq.write_table(pq.read_table(
        ws / "data/tokens/corpus.parquet").replace_schema_metadata(None), ws / "data/tokens/corpus.parquet"),
        r"data/tokens/corpus\.parquet was tokenized with an unknown tokenizer, expected .*re-run the tokenize stage"),
    "zero context_length": Case("sample", lambda ws: set_params(ws, "sample.context_length", 0),
        r"context_length must be a positive integer, got 0"),
    "negative stride": Case("sample", lambda ws: set_params(ws, "sample.stride", -8),
        r"params\.yaml:sample\.stride must be >= 0, got -8"),
    "val_fraction above 1": Case("sample", lambda ws: set_params(ws, "sample.val_fraction", 1.5),
        r"val_fraction must be between 0 and 1 \(exclusive\), got 1\.5"),
    "params: typo in sample": Case("sample", lambda ws: set_params(ws, "sample.context_lenght", 64),
        r"params\.yaml:sample: unknown key 'context_lenght' \(did you mean 'context_length'\?\); "
        r"valid keys: context_length, stride, val_fraction, chunk_tokens, seed"),
    "params: string for an int": Case("sample", lambda ws: set_params(ws, "sample.context_length", "64"),
        r"params\.yaml:sample\.context_length: expected an integer, got '64'"),
    # -- pretrain --
    "zero batch size": Case("pretrain", lambda ws: set_params(ws, "pretrain.train.batch_size", 0),
        r"batch_size must be at least 1, got 0"),
    "negative learning rate": Case("pretrain", lambda ws: set_params(ws, "pretrain.train.lr", -0.001),
        r"lr must be positive, got -0\.001"),
    "zero learning rate": Case("pretrain", lambda ws: (
        set_params(ws, "pretrain.train.lr", 0), set_params(ws, "pretrain.train.min_lr", 0)),
        r"lr must be positive, got 0"),
    "negative max_steps": Case("pretrain", lambda ws: set_params(ws, "pretrain.train.max_steps", -5),
        r"max_steps must be >= 0, got -5"),
    "zero model width": Case("pretrain", lambda ws: set_params(ws, "model.overrides.emb_dim", 0),
        r"emb_dim must be a positive integer, got 0"),
    "heads do not divide width": Case("pretrain", lambda ws: set_params(ws, "model.overrides.n_heads", 3),
        r"emb_dim \(16\) must be divisible by n_heads \(3\)"),
    "unknown model preset": Case("pretrain", lambda ws: set_params(ws, "model.preset", "cpu-tinny"),
        r"unknown model preset 'cpu-tinny' \(did you mean 'cpu-tiny'\?\); valid: gpt2, .*cpu-tiny"),
    "params: typo in pretrain": Case("pretrain", lambda ws: set_params(ws, "pretrain.train.learning_rate", 0.01),
        r"params\.yaml:pretrain\.train: unknown key 'learning_rate'.*valid keys: max_steps, batch_size, .*\blr\b"),
    "params: string for a float in pretrain.train": Case("pretrain",
        lambda ws: set_params(ws, "pretrain.train.lr", "fast"),
        r"params\.yaml:pretrain\.train\.lr: expected a number, got 'fast'"),
    "params: typo in model overrides": Case("pretrain", lambda ws: set_params(ws, "model.overrides.n_layer", 2),
        r"unknown key 'n_layer' \(did you mean 'n_layers'\?\); valid keys: vocab_size, context_length"),
    "windows longer than a loaded model's context": Case("pretrain", lambda ws: (
        save_tiny(ws / "small", context_length=16), set_params(ws, "model", {"init": "small"})),
        r"model 'small' has context_length 16, shorter than the windows' 32"),
    "windows longer than the scratch model's context": Case("pretrain",
        lambda ws: set_params(ws, "model.overrides.context_length", 16),
        r"model 'scratch' has context_length 16, shorter than the windows' 32: lower sample\.context_length"),
    "windows missing": Case("pretrain", lambda ws: (ws / "data/windows/meta.json").unlink(),
        r"data/windows/meta\.json not found"),
    "token file of odd size": Case("pretrain", lambda ws: write(ws, "data/windows/train.bin",
        (ws / "data/windows/train.bin").read_bytes() + b"\0"), r"data/windows/train\.bin has \d+ bytes, not a whole"),
    # -- model files (CLI and stages) --
    "truncated safetensors": Case(("generate", "--model", "models/base", "--prompt", "Hi"),
        lambda ws: truncate(ws, f"models/base/{WEIGHTS_FILE}"),
        r"models/base/model\.safetensors is not a valid safetensors file, it may be truncated or corrupt"),
    "checkpoint from a different config": Case(("generate", "--model", "models/base", "--prompt", "Hi"),
        lambda ws: write(ws, "models/base/config.json", json.dumps({"model": TINY.replace(n_layers=2).to_dict()})),
        r"models/base/model\.safetensors does not match its config \(2 layers\): missing blocks\.1\."),
    "corrupt config.json": Case(("generate", "--model", "models/base", "--prompt", "Hi"),
        lambda ws: truncate(ws, "models/base/config.json"), r"models/base/config\.json is not valid JSON"),
    "negative max_new_tokens": Case(("generate", "--model", "models/base", "--prompt", "Hi", "--max-new-tokens", "-1"),
        lambda ws: None, r"max_new_tokens must be >= 0, got -1"),
    "base model truncated (finetune)": Case("finetune_instructions",
        lambda ws: truncate(ws, f"models/base/{WEIGHTS_FILE}"),
        r"models/base/model\.safetensors is not a valid safetensors file"),
    # -- SMS spam file (finetune_classifier) --
    "spam: third column": Case("finetune_classifier", lambda ws: spam_lines(ws, "ham\thello\textra"),
        r"data/raw/sms_spam_collection\.tsv line 3: expected 2 tab-separated fields \(label, text\), found 3"),
    "spam: unknown label": Case("finetune_classifier", lambda ws: spam_lines(ws, "ham\tfine", "eggs\thello"),
        r"data/raw/sms_spam_collection\.tsv line 4: unknown label 'eggs'; expected one of ham, spam"),
    "spam: empty text": Case("finetune_classifier", lambda ws: spam_lines(ws, "spam\t   "),
        r"data/raw/sms_spam_collection\.tsv line 3: empty text"),
    "spam: classifier max_length above the model's": Case("finetune_classifier",
        lambda ws: set_params(ws, "finetune_classifier.classifier.max_length", 65),
        r"classifier max_length 65 exceeds the base model's context_length 64"),
    "spam: split fractions": Case("finetune_classifier",
        lambda ws: set_params(ws, "finetune_classifier.data.split", [0.7, 0.2, 0.2]),
        r"split fractions must be three non-negative numbers .* summing to 1, got \[0\.7, 0\.2, 0\.2\]"),
    "spam: zero epochs": Case("finetune_classifier", lambda ws: set_params(ws, "finetune_classifier.epochs", 0),
        r"finetune_classifier\.epochs must be a positive integer, got 0"),
    # -- instruction data (finetune_instructions) --
    "instructions: not a list": Case("finetune_instructions", lambda ws: instructions(ws, {"instruction": "x"}),
        r"data/raw/instruction-data\.json: expected a JSON list of entries, got dict"),
    "instructions: missing key": Case("finetune_instructions",
        lambda ws: instructions(ws, [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a"}]),
        r"data/raw/instruction-data\.json: entry 1: missing key 'input' \(expected exactly instruction, input, out"),
    "instructions: wrong type": Case("finetune_instructions",
        lambda ws: instructions(ws, [{"instruction": "a", "input": 3, "output": "b"}]),
        r"data/raw/instruction-data\.json: entry 0: 'input' must be a string, got int"),
    "instructions: empty string": Case("finetune_instructions",
        lambda ws: instructions(ws, [{"instruction": " ", "input": "", "output": "b"}]),
        r"data/raw/instruction-data\.json: entry 0: 'instruction' is empty"),
    "instructions: truncated JSON": Case("finetune_instructions",
        lambda ws: truncate(ws, "data/raw/instruction-data.json"),
        r"data/raw/instruction-data\.json: invalid JSON at line \d+ column \d+"),
    "instructions: unknown method": Case("finetune_instructions",
        lambda ws: set_params(ws, "finetune_instructions.method", "qlora"),
        r"params\.yaml:finetune_instructions\.method: 'qlora' is not one of 'full', 'lora'"),
    # -- evaluate and the judge --
    "judge unreachable": Case("evaluate", _judge("http://127.0.0.1:9/v1"),
        r"judge at http://127\.0\.0\.1:9/v1/chat/completions is unreachable"),
    "judge answers garbage": Case("evaluate", lambda ws: None,
        r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions did not return a chat completion: b'<html>",
        judge=(200, b"<html>busy</html>")),
    "judge answers HTTP 500": Case("evaluate", lambda ws: None,
        r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions answered HTTP 500: overloaded",
        judge=(500, b"overloaded")),
    "stale responses": Case("evaluate", lambda ws: write(ws, "reports/responses.json", "[]"),
        r"reports/responses\.json does not match the test split; run: dvc repro finetune_instructions"),
    # -- params.yaml itself --
    "params.yaml not YAML": Case("sample", lambda ws: write(ws, "params.yaml", "sample: [1, 2\n"),
        r"params\.yaml is not valid YAML"),
    "params.yaml with a Python object tag": Case("sample",
        lambda ws: write(ws, "params.yaml", "sample: !!python/object/apply:os.system ['touch PWNED']\n"),
        r"params\.yaml is not valid YAML at line 1, column 9: could not determine a constructor for the tag "
        r"'tag:yaml\.org,2002:python/object/apply:os\.system'"),
    "pickled weights instead of safetensors": Case(("generate", "--model", "hf", "--prompt", "Hi"), pickled_hf_model,
        r"hf has no model\.safetensors \(only safetensors weights are read, never pickles\)"),
    "params.yaml section missing": Case("evaluate", lambda ws: write(ws, "params.yaml", "sample: {}\n"),
        r"params\.yaml: section 'evaluate' is missing"),
}  # fmt: skip


def run(ws: Path, cmd: str | tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", f"stages.{cmd}"] if isinstance(cmd, str) else [str(BIN / "llm"), *cmd]
    return subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name: str, ws: Path, judge_server: Callable[[int, bytes], str]) -> None:
    case = CASES[name]
    case.setup(ws)
    if case.judge is not None:
        _judge(judge_server(*case.judge))(ws)
    before = snapshot(ws)
    assert_one_error(run(ws, case.cmd, env_for(ws, **case.env)), case.error)
    assert snapshot(ws) == before  # earlier outputs untouched, nothing half-written, no temp files left


def test_spam_file_with_crlf_endings_reads_like_lf(template: Path, tmp_path: Path) -> None:
    """CRLF line ends are not an error: the examples are exactly those of the LF file."""
    lf = template / "data/raw/sms_spam_collection.tsv"
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    assert read_labeled_tsv(crlf, ("ham", "spam")) == read_labeled_tsv(lf, ("ham", "spam"))
    assert len(read_labeled_tsv(crlf, ("ham", "spam")).examples) == 5574


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    """A training checkpoint made for another architecture is never loaded into the model."""
    torch.manual_seed(0)
    state = {"step": 1, "world_size": 1, "config": {}, "train": {}, "optimizer": {}, "scaler": {}}
    save_checkpoint(tmp_path, GPT(TINY.replace(n_layers=2)), state, best={})
    with pytest.raises(LLMError, match=r"does not fit this model \(missing .*unexpected \['blocks\.1\."):
        load_checkpoint(tmp_path, GPT(TINY))


def test_unreachable_mlflow_store_is_one_warning_and_the_stage_still_completes(ws: Path) -> None:
    """Tracking never stops training: an MLflow store that is down costs one warning line naming it."""
    set_params(ws, "pretrain.train.max_steps", 1)
    env = env_for(ws, LLM_MLFLOW="on", MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    result = run(ws, "pretrain", env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: MLflow")]
    assert result.returncode == 0, result.stderr
    assert len(warnings) == 1 and "http://127.0.0.1:9 failed" in warnings[0], result.stderr
    assert json.loads((ws / "runs/pretrain.json").read_text(encoding="utf-8"))["run_id"] is None
    assert (ws / "models/base" / WEIGHTS_FILE).stat().st_size > 0


@pytest.mark.parametrize(
    "bad", [{"batch_size": 0}, {"grad_accum": -1}, {"max_steps": -1}, {"lr": -1.0}, {"lr": 0.0, "min_lr": 0.0}]
)
def test_train_config_rejects_nonpositive_sizes_directly(bad: dict[str, Any]) -> None:
    """The schema itself (not only the stages) refuses zero or negative sizes and learning rates."""
    with pytest.raises(LLMError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_a_misspelt_params_section_is_an_error(ws: Path) -> None:
    """`pretrian:` beside `pretrain:` must not be silently ignored: every stage refuses an unknown section."""
    set_params(ws, "pretrian", {"lr": 0.01})
    before = snapshot(ws)
    assert_one_error(
        run(ws, "sample", env_for(ws)), r"params\.yaml: unknown section 'pretrian' \(did you mean 'pretrain'"
    )
    assert snapshot(ws) == before


def test_value_errors_name_the_params_section() -> None:
    """A bad value is reported with its params.yaml path, like unknown keys and wrong types are."""
    with pytest.raises(LLMError, match=r"^params\.yaml:finetune_classifier\.train: .*batch_size"):
        from_mapping(TrainConfig, {"batch_size": 0}, where="params.yaml:finetune_classifier.train")


def test_a_pickle_posing_as_a_training_checkpoint_is_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state.pt is read with torch.load(weights_only=True): a malicious pickle is refused, its code never runs."""
    monkeypatch.chdir(tmp_path)
    state = {"step": 1, "world_size": 1, "config": {}, "train": {}, "optimizer": {}, "scaler": {}}
    path = save_checkpoint(tmp_path / "checkpoints", GPT(TINY), state, best={})
    (path / "state.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    assert load_checkpoint(tmp_path / "checkpoints", GPT(TINY)) is None  # skipped with a warning
    assert not (tmp_path / "PWNED").exists()


UNSAFE = {
    "torch.load without weights_only=True": r"torch\.load\((?![^)]*weights_only=True)",
    "unpickling": r"\b(pickle|marshal|dill|joblib)\.loads?\(",
    "eval/exec": r"(?<![.\w])(eval|exec)\(",
    "a shell": r"shell=True|os\.system\(|os\.popen\(",
    "unsafe YAML": r"yaml\.(unsafe_)?load\(|yaml\.Loader\b|FullLoader",
    "remote code": r"trust_remote_code",
    "archive extraction": r"extractall\(",
}


@pytest.mark.parametrize("what", UNSAFE)
def test_the_code_has_no_unsafe_calls(what: str) -> None:
    """The static part of the security review (SECURITY.md): none of these appear in the library or the stages."""
    files = [*ROOT.glob("llm/**/*.py"), *ROOT.glob("stages/*.py")]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(UNSAFE[what], line)]  # fmt: skip
    assert len(files) > 20 and hits == []


def test_every_configured_download_is_https_and_sha256_pinned() -> None:
    """Each source of params.yaml (and the tokenizer ranks) is fetched over HTTPS and verified by sha256."""
    sources = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["data"]["sources"]
    assert sources and all(
        s["url"].startswith("https://") and re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in sources
    )
    assert RANKS_URL.startswith("https://") and re.fullmatch(r"[0-9a-f]{64}", RANKS_SHA256)
