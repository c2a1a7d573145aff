"""The settings of a training run (`TrainConfig`) and their scheduling in epochs (`per_epoch`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from llm.device import Precision
from llm.errors import LLMError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Steps count optimizer updates; lr in AdamW units.

    batch_size: sequences per micro-batch per process; a step sees batch_size * grad_accum * processes.
    warmup_steps: linear warmup from lr/warmup_steps to lr, then cosine decay to min_lr at max_steps.
    weight_decay: applied to weights of 2+ dimensions only (not to biases, LayerNorm, or 1-D params).
    grad_clip: maximum global gradient norm (0 = no clipping; the norm is logged either way).
    eval_every, sample_every, checkpoint_every: in steps (0 = only at the end).
    keep_checkpoints: how many of the latest checkpoints stay on disk.
    patience: stop after this many evaluations without a lower `best_metric` (0 = never stop early).
    restore_best: at the end, load the trainable weights of the evaluation with the lowest best_metric.
    precision / device: see llm.device ("auto" picks the fastest accurate choice for the hardware).
    compile: torch.compile the model (falls back to eager mode with a warning if compilation fails).
    peak_flops: the hardware's peak FLOP/s per process, for model FLOPs utilisation (0 = don't report MFU).
    """

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    sample_every: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    patience: int = 0
    best_metric: str = "val_loss"
    restore_best: bool = False
    precision: Precision = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    peak_flops: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LLMError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "sample_every", "checkpoint_every", "patience"):
            if getattr(self, name) < 0:
                raise LLMError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LLMError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise LLMError(f"TrainConfig needs 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise LLMError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise LLMError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")


# The fields `per_epoch` sets (a caller scheduling in epochs leaves them to it).
PER_EPOCH_FIELDS = ("max_steps", "eval_every", "checkpoint_every", "best_metric", "restore_best")


def per_epoch(config: TrainConfig, epochs: int, n_examples: int) -> TrainConfig:
    """`config` scheduled in epochs over `n_examples` examples: `epochs` passes, an evaluation and a checkpoint at
    the end of every epoch, and the trainable weights of the epoch with the lowest val_loss restored at the end.

    An epoch is ceil(n_examples / (batch_size * grad_accum)) optimizer steps; the other fields are kept.
    """
    if epochs < 1 or n_examples < 1:
        raise LLMError(f"per_epoch needs epochs >= 1 and n_examples >= 1, got {epochs} and {n_examples}")
    steps_per_epoch = math.ceil(n_examples / (config.batch_size * config.grad_accum))
    return dataclasses.replace(
        config,
        max_steps=epochs * steps_per_epoch,
        eval_every=steps_per_epoch,
        checkpoint_every=steps_per_epoch,
        best_metric="val_loss",
        restore_best=True,
    )
