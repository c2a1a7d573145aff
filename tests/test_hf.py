"""Parity with transformers' GPT-2, offline: random HF models are imported, ours exported and reloaded."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm.config import GPTConfig
from llm.errors import LLMError
from llm.generate import generate
from llm.hf import export_hf, hub_repo, import_hf, load_any
from llm.model import GPT
from llm.model_dir import save_model

transformers = pytest.importorskip("transformers")

CONFIGS = {  # odd sizes on purpose: 3 heads of 16, vocab 101, 37 positions
    "odd": dict(vocab_size=101, n_positions=37, n_embd=48, n_layer=3, n_head=3),
    "untied": dict(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False),
    "wide-head": dict(vocab_size=257, n_positions=29, n_embd=40, n_layer=1, n_head=1),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter (LayerNorms and biases included) so that any mapping mistake shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15)


def hf_model(name: str) -> torch.nn.Module:
    config = transformers.GPT2Config(**CONFIGS[name], bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    randomize(model, seed=len(name))
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def assert_same_model(ours: GPT, theirs: torch.nn.Module) -> None:
    """Logits within 1e-4 on random inputs (full context) and identical greedy continuations."""
    vocab, context = ours.config.vocab_size, ours.config.context_length
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, context), generator=generator)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-4
    for prompt in ([1, 2, 3], x[0, :7].tolist()):
        steps = context - len(prompt)
        continuation = generate(ours, [prompt], max_new_tokens=steps, temperature=0)[0]
        assert continuation == hf_greedy(theirs, prompt, steps)
        assert len(set(continuation)) > 1  # not a degenerate one-token loop


@pytest.mark.parametrize("name", CONFIGS)
def test_import_matches_transformers(tmp_path: Path, name: str) -> None:
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.config.tie_weights == CONFIGS[name].get("tie_word_embeddings", True)
    assert (ours.lm_head.weight is ours.tok_emb.weight) == ours.config.tie_weights
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers(tmp_path: Path, name: str) -> None:
    hf = CONFIGS[name]
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        tie_weights=hf.get("tie_word_embeddings", True),
        qkv_bias=name != "odd",  # no qkv bias: exported as zeros
    )
    ours = GPT(config)
    randomize(ours, seed=7)
    ours.eval()
    export_hf(ours, tmp_path / "hf")
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or newly initialised
    assert_same_model(ours, theirs.eval())
    back = import_hf(tmp_path / "hf")  # and the round trip is exact
    for key, tensor in ours.state_dict().items():
        if key.endswith("qkv.bias") and not config.qkv_bias:
            continue
        assert torch.equal(back.state_dict()[key], tensor), key


def test_openai_hub_layout_without_prefix_and_with_mask_buffers(tmp_path: Path) -> None:
    """OpenAI's files name tensors `h.0.attn.c_attn.weight` (no `transformer.`) and carry `attn.bias`."""
    theirs = hf_model("odd")
    theirs.save_pretrained(tmp_path / "saved")
    state = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "saved" / "model.safetensors").items()}
    n = CONFIGS["odd"]["n_positions"]
    for i in range(CONFIGS["odd"]["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "hub").mkdir()
    save_file(state, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    assert_same_model(import_hf(tmp_path / "hub"), theirs)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    theirs = hf_model("odd")
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert_same_model(import_hf(tmp_path), theirs)


def test_load_any_dispatches(tmp_path: Path) -> None:
    theirs = hf_model("untied")
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_any(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    again = load_any(str(tmp_path / "ours"))
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(ours(x), again(x))
    with pytest.raises(LLMError, match="neither a model directory nor a known hub name"):
        load_any(tmp_path / "missing")
    assert hub_repo("gpt2-xl") == hub_repo("openai-community/gpt2-xl") == "openai-community/gpt2-xl"
    assert hub_repo("gpt3") is None


def test_bad_hf_directories(tmp_path: Path) -> None:
    hf_model("odd").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = tmp_path / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(LLMError, match=r"model\.safetensors is not a valid safetensors file"):
        import_hf(tmp_path)
    weights.write_bytes(original)
    for change, match in [
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06 is not supported"),
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"model_type": "llama"}, "model_type 'llama' is not gpt2"),
        ({"n_head": 5}, r"config\.json: GPTConfig\.emb_dim \(48\) must be divisible by n_heads \(5\)"),
        ({"n_layer": 4}, r"does not match its config\.json: missing \['h\.3\."),
        ({"vocab_size": 100}, r"tok_emb\.weight has shape \(101, 48\), the config expects \(100, 48\)"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LLMError, match=match):
            import_hf(tmp_path)
    weights.unlink()
    with pytest.raises(LLMError, match=r"has no model\.safetensors .*never pickles"):
        import_hf(tmp_path)


def test_export_refuses_a_swapped_head(tmp_path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    model.lm_head = torch.nn.Linear(16, 2)
    with pytest.raises(LLMError, match="needs a language-model head"):
        export_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())


def hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `files` as one snapshot of `repo`, laid out as the hub client writes it: each
    content in `blobs/<sha256>`, linked from `snapshots/<commit>/<name>`. Returns the weights' blob."""
    import hashlib

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    (folder / "snapshots" / commit).mkdir(parents=True)
    blob = folder
    for name, src in files.items():
        blob = folder / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.write_bytes(src.read_bytes())
        (folder / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", blob.name))
    return blob


def test_hub_weights_are_checked_against_the_sha256_the_hub_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpt2` from the (offline) hub cache loads when the weights match the sha256 their blob is named by; a
    damaged blob stops the load with one error naming the file and both hashes."""
    import huggingface_hub.constants

    theirs = hf_model("odd")
    theirs.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = tmp_path / "saved"
    blob = hub_cache(
        tmp_path / "hub",
        "openai-community/gpt2",
        {"config.json": saved / "config.json", "model.safetensors": saved / "model.safetensors"},
    )
    assert_same_model(load_any("gpt2"), theirs)
    blob.write_bytes(blob.read_bytes()[:-1] + b" ")  # same size, one byte changed: the size check passes
    with pytest.raises(LLMError, match=rf"does not match the sha256 .*expected {blob.name}, got [0-9a-f]{{64}}"):
        load_any("gpt2")
