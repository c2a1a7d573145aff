"""llm.model_dir: model directories (config.json + model.safetensors) round-trip exactly; damaged ones are named."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm.config import get_preset
from llm.errors import LLMError
from llm.model import GPT
from llm.model_dir import load_model, provenance, read_config, save_model


def tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", vocab_size=101, context_length=24, **overrides)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path: Path, tie: bool) -> None:
    model = tiny(tie_weights=tie, qkv_bias=not tie)
    save_model(model, tmp_path / "m", extra={"step": 7})
    assert read_config(tmp_path / "m") == {"model": model.config.to_dict(), "step": 7}
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tie  # a tied head is stored once
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) is tie
    x = torch.randint(0, 101, (2, 9))
    assert torch.equal(loaded(x), model(x))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_no_leftover_temporary_files(tmp_path: Path) -> None:
    save_model(tiny(), tmp_path)
    save_model(tiny(), tmp_path)  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=r"model directory .*nope not found"):
        load_model(tmp_path / "nope")
    save_model(tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LLMError, match=r"model.safetensors not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LLMError, match=r"config.json not found"):
        load_model(tmp_path)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_weights(tmp_path: Path, cut: int) -> None:
    save_model(tiny(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(LLMError, match=r"model\.safetensors is not a valid safetensors file.*truncated or corrupt"):
        load_model(tmp_path)


def test_corrupt_config(tmp_path: Path) -> None:
    save_model(tiny(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LLMError, match=r"config.json is not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(LLMError, match=r"no 'model' section"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"emb_dim": 64, "n_hedas": 2}}))
    with pytest.raises(LLMError, match=r"unknown key .n_hedas. \(did you mean .n_heads.\?\)"):
        load_model(tmp_path)


def test_config_weight_mismatch(tmp_path: Path) -> None:
    save_model(tiny(), tmp_path)
    config = read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {**config["model"], "n_layers": 3}}))
    with pytest.raises(LLMError, match=r"does not match its config .*missing blocks.2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {**config["model"], "vocab_size": 100}}))
    with pytest.raises(LLMError, match=r"tok_emb.weight has shape \(101, 64\), the config expects \(100, 64\)"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {**config["model"], "tie_weights": False}}))
    with pytest.raises(LLMError, match=r"missing lm_head.weight"):
        load_model(tmp_path)


def test_reserved_extra_key(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=r"reserved"):
        save_model(tiny(), tmp_path, extra={"model": {}})


def test_provenance_keeps_what_made_the_model_but_no_timings_or_run_ids() -> None:
    summary = {"steps": 10, "epochs": 1.5, "train_seconds": 3.2, "avg_tokens_per_s": 900.0, "run_id": "abc"}
    assert provenance("pretrain", summary) == {"training": {"stage": "pretrain", "steps": 10, "epochs": 1.5}}
