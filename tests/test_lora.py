from pathlib import Path

import pytest
import torch
from torch import nn

from llm.config import get_preset
from llm.errors import LLMError
from llm.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_trainable,
    parameter_report,
    remove_lora,
    save_trainable,
)
from llm.model import GPT
from llm.model_dir import WEIGHTS_FILE, load_model, save_model

TARGETS = LoRAConfig().targets


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("cpu-tiny", vocab_size=97, context_length=32)).eval()


def randomize_adapters(model: nn.Module) -> None:
    """Trained adapters are non-zero; a fresh B is zero and would hide merge errors."""
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.05)


def test_lora_linear_init_and_update() -> None:
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2, alpha=8, dropout=0.0)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (4, 2)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    assert layer.scaling == 4.0
    randomize_adapters(layer)
    x = torch.randn(3, 6)
    expected = base(x) + 4.0 * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)


def test_fresh_adapter_leaves_outputs_unchanged() -> None:
    model = tiny_gpt()
    x = torch.randint(0, 97, (2, 12))
    before = model(x)
    wrapped = apply_lora(model, TARGETS, r=4, alpha=8)
    assert len(wrapped) == 4 * model.config.n_layers
    assert len(lora_layers(model)) == len(wrapped)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_merge_unmerge_agree() -> None:
    model = tiny_gpt()
    apply_lora(model, TARGETS, r=4, alpha=8)
    randomize_adapters(model)
    x = torch.randint(0, 97, (2, 12))
    unmerged = model(x)
    base_weight = model.blocks[0].attn.qkv.base.weight.clone()
    for layer in lora_layers(model):
        layer.merge()
    assert all(layer.merged for layer in lora_layers(model))
    assert not torch.equal(model.blocks[0].attn.qkv.base.weight, base_weight)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    for layer in lora_layers(model):
        layer.unmerge()
    torch.testing.assert_close(model.blocks[0].attn.qkv.base.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    remove_lora(model)
    assert not lora_layers(model) and isinstance(model.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


def test_only_adapters_and_head_get_gradients() -> None:
    model = tiny_gpt()
    model.lm_head = nn.Linear(model.config.emb_dim, 2)
    apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.1)
    model.lm_head.requires_grad_(True)
    model.train()
    loss = model(torch.randint(0, 97, (2, 12))).sum()
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if "lora_" in name or "lm_head" in name}
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad if "lora_A" not in name)
    report = parameter_report(model)
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert report["trainable"] == lora + 2 * model.config.emb_dim + 2
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["trainable_pct"] == pytest.approx(100 * report["trainable"] / report["total"])


def test_unknown_target_is_an_error() -> None:
    with pytest.raises(LLMError, match=r"'attn\.qkvv' matches no linear layer.*attn\.qkv"):
        apply_lora(tiny_gpt(), ["attn.qkvv"], r=2, alpha=2)


def test_adapter_file_roundtrip_and_size(tmp_path: Path) -> None:
    """The default adapter on the default CPU base model is a small fraction of the base checkpoint."""
    torch.manual_seed(0)
    save_model(GPT(get_preset("cpu-small")), tmp_path / "base")
    defaults = LoRAConfig()

    def adapted() -> GPT:
        model = load_model(tmp_path / "base")
        model.lm_head = nn.Linear(model.config.emb_dim, 2)
        apply_lora(model, defaults.targets, defaults.r, defaults.alpha)
        model.lm_head.requires_grad_(True)
        return model

    model = adapted()
    randomize_adapters(model)
    save_trainable(model, tmp_path / "adapter.safetensors")
    ratio = (tmp_path / "adapter.safetensors").stat().st_size / (tmp_path / "base" / WEIGHTS_FILE).stat().st_size
    assert ratio < 0.05
    fresh = adapted()
    load_trainable(fresh, tmp_path / "adapter.safetensors")
    x = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_adapter_file_mismatch_is_an_error(tmp_path: Path) -> None:
    model = tiny_gpt()
    apply_lora(model, TARGETS, r=4, alpha=8)
    save_trainable(model, tmp_path / "adapter.safetensors")
    other_rank = tiny_gpt()
    apply_lora(other_rank, TARGETS, r=2, alpha=8)
    with pytest.raises(LLMError, match=r"shape .* different base model"):
        load_trainable(other_rank, tmp_path / "adapter.safetensors")
    fewer_layers = tiny_gpt()
    apply_lora(fewer_layers, ["attn.qkv"], r=4, alpha=8)
    with pytest.raises(LLMError, match="does not have"):
        load_trainable(fewer_layers, tmp_path / "adapter.safetensors")
    more_trainable = tiny_gpt()
    apply_lora(more_trainable, TARGETS, r=4, alpha=8)
    more_trainable.ln_f.requires_grad_(True)
    with pytest.raises(LLMError, match="lacks trainable tensor 'ln_f"):
        load_trainable(more_trainable, tmp_path / "adapter.safetensors")
