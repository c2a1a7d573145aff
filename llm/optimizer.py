"""The optimizer of every training run: AdamW with decoupled weight decay, and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llm.errors import LLMError
from llm.train_config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for 0-based optimizer step `step`: linear warmup, then cosine decay to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min((step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1), 1.0)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on 2+-D weights, none on biases and norms.

    Uses the fused kernel where the device supports it, else foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LLMError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": tuple(config.betas)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
