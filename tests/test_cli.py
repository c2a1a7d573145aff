"""The `llm` console script: generate / import-hf / export-hf, and one-line errors without tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import cli
from llm.config import GPTConfig
from llm.errors import LLMError
from llm.generate import generate
from llm.hf import export_hf
from llm.model import GPT
from llm.model_dir import load_model, save_model
from llm.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model over the full GPT-2 vocabulary (so any prompt encodes), context 24."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=24, emb_dim=16, n_heads=2, n_layers=1))
    path = tmp_path_factory.mktemp("cli") / "tiny"
    save_model(model, path)
    return path


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home"


def run_llm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter (offline, empty HF cache unless `env` says otherwise)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llm.cli", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_generate_streams_the_greedy_continuation(
    model_dir: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "Every effort moves you"
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", prompt, "--temperature", "0", *extra]) == 0
    tokenizer = get_tokenizer()
    expected = generate(load_model(model_dir), [tokenizer.encode(prompt)], max_new_tokens=50, temperature=0)[0]
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected) + "\n"


def test_generate_is_seeded_and_crops_long_sequences(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(model_dir), "--prompt", "", "--max-new-tokens", "40", "--seed", "5"]
    outputs = []
    for extra in ([], ["--top-k", "20", "--top-p", "0.9"], []):
        assert cli.main(args + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[2] != outputs[1]
    assert len(get_tokenizer().encode(outputs[0], allowed_special="all")) > 24  # past the 24-token context


def test_import_and_export_round_trip(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export-hf", str(model_dir), str(tmp_path / "hf")]) == 0
    assert cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "wrote" in capsys.readouterr().out
    original, back = load_model(model_dir), load_model(tmp_path / "back")
    assert original.config == back.config
    for key, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["source"] == str(tmp_path / "hf")


def test_hub_name_served_from_the_cache_offline(tmp_path: Path, model_dir: Path, hf_home: Path) -> None:
    """A hub name resolves through huggingface_hub's cache without any network access."""
    repo = hf_home / "hub" / "models--openai-community--gpt2"
    export_hf(load_model(model_dir), repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    result = run_llm(
        "generate", "--model", "gpt2", "--prompt", "Hello", "--temperature", "0", env={"HF_HOME": str(hf_home)}
    )
    assert result.returncode == 0, result.stderr
    tokenizer = get_tokenizer()
    expected = generate(load_model(model_dir), [tokenizer.encode("Hello")], max_new_tokens=50, temperature=0)[0]
    assert result.stdout == "Hello" + tokenizer.decode(expected) + "\n"


def test_keyboard_interrupt_exits_130(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.hf.load_any", interrupted)
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "x"]) == 130


def test_new_commands_plug_in(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    @cli.command("echo", "print a word", lambda parser: parser.add_argument("word"))
    def echo(args: object) -> None:
        if args.word == "bad":
            raise LLMError("bad word")
        print(args.word)

    assert cli.main(["echo", "hi"]) == 0 and capsys.readouterr().out == "hi\n"
    assert cli.main(["echo", "bad"]) == 1 and capsys.readouterr().err == "error: bad word\n"


def test_error_missing_model_dir(tmp_path: Path) -> None:
    result = run_llm("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(result, "nope is neither a model directory nor a known hub name")
    assert_one_line_error(run_llm("export-hf", str(tmp_path / "nope"), str(tmp_path / "out")), "not found")


def test_device_the_machine_cannot_use_is_one_error_line(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--device goes through llm.device.resolve_device, which probes that the device can allocate."""
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "x", "--device", "xpu"]) == 1
    assert capsys.readouterr().err.startswith("error: device 'xpu' is not usable here (")
    assert cli.main(["classify", "x", "--model", str(model_dir), "--device", "gpu"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown device 'gpu'")


def test_error_hub_name_offline(tmp_path: Path) -> None:
    result = run_llm("import-hf", "gpt2-medium", str(tmp_path / "out"), env={"HF_HOME": str(tmp_path / "empty")})
    assert_one_line_error(result, "could not download openai-community/gpt2-medium")
    assert "offline? pass a local directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_error_truncated_weights(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    result = run_llm("generate", "--model", str(broken), "--prompt", "x")
    assert_one_line_error(result, "model.safetensors is not a valid safetensors file")


def test_error_invalid_config_and_settings(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["model"]["n_heads"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert_one_line_error(run_llm("export-hf", str(bad), str(tmp_path / "out")), "must be divisible by n_heads (3)")
    result = run_llm("generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0")
    assert_one_line_error(result, "top_p must be in (0, 1]")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("llm")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("generate", "import-hf", "export-hf"))
