"""llm.optimizer: the learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from llm.config import get_preset
from llm.model import GPT
from llm.optimizer import lr_at, make_optimizer
from llm.train_config import TrainConfig


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(55, c) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert lr_at(100, c) == pytest.approx(1e-4) and lr_at(500, c) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices_and_fused_adamw() -> None:
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny", vocab_size=67, context_length=16))
    model.ln_f.weight.requires_grad_(False)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_parameters(True)
    assert optimizer.defaults["fused"]
