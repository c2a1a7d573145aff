"""Low-rank adaptation (LoRA, Hu et al. 2021) of `nn.Linear` layers.

A wrapped layer computes `base(x) + (dropout(x) @ A.T @ B.T) * alpha / r` with A (r, in) kaiming-uniform and
B (out, r) zeros, so a fresh adapter leaves the model's outputs unchanged. `apply_lora` wraps the chosen layers
and freezes everything else; afterwards only the adapters (and whatever the caller unfreezes, e.g. a new head)
train. `trainable_state_dict` holds just those tensors, small enough to ship apart from the base weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm.errors import LLMError
from llm.model import dropout_layer
from llm.model_dir import read_safetensors, write_safetensors


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on every linear layer whose name ends in one of `targets`: rank r, scaling alpha / r."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class LoRALinear(nn.Module):
    """`base` (frozen) plus a rank-`r` update scaled by `alpha / r`. Input (..., in) → output (..., out)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise LLMError(f"LoRA rank r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise LLMError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the same init nn.Linear gives its weight
        self.dropout = dropout_layer(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update B @ A * alpha / r that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (faster inference); forward then skips the adapter."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, restoring the base weight (up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of `model`, then wrap each `nn.Linear` whose name matches a target in LoRA.

    A target matches a module named exactly so or ending in `.<target>` (e.g. `attn.qkv` matches
    `blocks.0.attn.qkv`). Returns the wrapped module names; a target matching no linear layer is an error.
    """
    model.requires_grad_(False)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped: list[str] = []
    for target in targets:
        hits = [(name, m) for name, m in linears if name == target or name.endswith(f".{target}")]
        if not hits:
            names = sorted({name.split(".", 2)[-1] for name, _ in linears})
            raise LLMError(f"LoRA target {target!r} matches no linear layer; linear layers: {', '.join(names)}")
        for name, linear in hits:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(linear, r, alpha, dropout))
            wrapped.append(name)
    return wrapped


def remove_lora(model: nn.Module) -> None:
    """Merge every adapter and put the plain `nn.Linear` back, so the model has its original structure."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad (LoRA adapters plus any unfrozen head or blocks), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    """Write `trainable_state_dict(model)` to a safetensors file (atomically)."""
    write_safetensors(path, trainable_state_dict(model))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load a `save_trainable` file into `model`, wrapped and frozen the same way: names and shapes must match."""
    tensors = read_safetensors(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise LLMError(f"adapter file {path} has tensor {unknown[0]!r} that the model does not have")
    missing = sorted(name for name, p in params.items() if p.requires_grad and name not in tensors)
    if missing:
        raise LLMError(f"adapter file {path} lacks trainable tensor {missing[0]!r} ({len(missing)} missing)")
    for name, tensor in tensors.items():
        if params[name].shape != tensor.shape:
            raise LLMError(
                f"adapter file {path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(params[name].shape)} (was the adapter trained on a different base model?)"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def parameter_report(model: nn.Module) -> dict[str, int | float]:
    """Trainable vs total parameter counts (shared tensors counted once) and the trainable share in percent."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total if total else 0.0}
