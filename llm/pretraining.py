"""Pretraining on token windows: the model a run starts from (`ModelInit`), the run's settings (`PretrainConfig`),
and the pieces it hands the training loop: training batches, the fixed validation subset and the text sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tiktoken
import torch

from llm.config import get_preset
from llm.data.windows import TokenWindows, batch_indices
from llm.errors import LLMError
from llm.generate import generate
from llm.hf import load_any
from llm.model import GPT
from llm.registry import RegistryParams
from llm.train_config import TrainConfig
from llm.training import Evaluate, TrainResult, loss_evaluator


@dataclass(frozen=True)
class ModelInit:
    """init: scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (OpenAI's weights) | a model directory (ours or
    Hugging Face's). preset, overrides: the architecture for init scratch (llm.config presets; GPTConfig fields
    to replace; context_length defaults to the windows')."""

    init: str = "scratch"
    preset: str = "cpu-small"
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, context_length: int) -> GPT:
        """A fresh GPT (init scratch) or the named/local pretrained one, checked to fit `context_length`."""
        if self.init == "scratch":
            model = GPT(get_preset(self.preset, **{"context_length": context_length, **self.overrides}))
        elif self.overrides:
            raise LLMError(f"model.overrides apply to init: scratch only; {self.init!r} keeps its own architecture")
        else:
            model = load_any(self.init)
        if model.config.context_length < context_length:
            raise LLMError(
                f"model {self.init!r} has context_length {model.config.context_length}, shorter than the windows' "
                f"{context_length}: lower sample.context_length"
            )
        return model


@dataclass(frozen=True)
class PretrainConfig:
    """train: the run. nproc: processes (> 1: one per GPU or CPU core, under torchrun). eval_windows: validation
    windows per evaluation, a fixed, evenly spaced subset (0 = all). shuffle: visit the training windows in a
    seeded random order per epoch. sample_prompt, sample_tokens: the text sample (temperature 0.8, top-k 50).
    registry: models/base logged to the run and registered in MLflow (llm.registry)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    nproc: int = 1
    eval_windows: int = 128
    shuffle: bool = True
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 40
    registry: RegistryParams = field(default_factory=RegistryParams)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise LLMError(f"pretrain.nproc must be at least 1 (processes), got {self.nproc}")
        for name in ("eval_windows", "sample_tokens"):
            if getattr(self, name) < 0:
                raise LLMError(f"pretrain.{name} must be >= 0, got {getattr(self, name)}")

    def train_batches(self, windows: TokenWindows, rank: int, world: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
        """Micro-batch i of this process: its shard of the i-th global batch (see batch_indices)."""
        order = {"seed": self.train.seed, "shuffle": self.shuffle, "rank": rank, "world_size": world}
        return lambda i: windows.batch(batch_indices(len(windows), self.train.batch_size, i, **order))

    def evaluator(self, val: TokenWindows) -> Evaluate:
        """Mean loss (and perplexity) over `eval_windows` evenly spaced windows of `val`, batch_size per forward."""
        n = len(val) if self.eval_windows == 0 else min(self.eval_windows, len(val))
        idx = np.unique(np.linspace(0, len(val) - 1, n).round().astype(np.int64))
        return loss_evaluator(
            [val.batch(chunk) for chunk in np.array_split(idx, -(-len(idx) // self.train.batch_size))]
        )

    def sampler(self, tokenizer: tiktoken.Encoding) -> Callable[[torch.nn.Module], str]:
        """The text sample: `sample_tokens` tokens after `sample_prompt`, seeded by train.seed."""
        prompt = tokenizer.encode(self.sample_prompt)

        def sample(model: torch.nn.Module) -> str:
            new = generate(
                model, [prompt], max_new_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=self.train.seed
            )
            return self.sample_prompt + tokenizer.decode(new[0])

        return sample


def run_summary(result: TrainResult, train_tokens: int, n_params: int) -> dict[str, Any]:
    """What a pretraining run did (steps, tokens, epochs over `train_tokens`, time, speed, best val loss)."""
    state = result.state
    return {
        "steps": state.step,
        "tokens": state.tokens,
        "epochs": state.tokens / train_tokens,
        "train_seconds": state.seconds,
        "avg_tokens_per_s": result.metrics["avg_tokens_per_s"],
        "best_val_loss": state.best,
        "best_step": state.best_step,
        "n_params": n_params,
    }
