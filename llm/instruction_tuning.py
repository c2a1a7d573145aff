"""Instruction tuning: the run's settings (`InstructConfig`) and what its training and its evaluation share: the
examples kept per split, their batches (validation batches are collated exactly as in training), the adapters,
and the responses to the test split."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import tiktoken
import torch

from llm.data.instructions import (
    Instruction,
    InstructionData,
    InstructionExample,
    collate_instructions,
    encode,
    respond,
    trainable,
)
from llm.data.windows import batch_indices
from llm.errors import LLMError
from llm.evaluation import mean_loss
from llm.generate import GenerationConfig
from llm.lora import LoRAConfig, apply_lora, remove_lora
from llm.model import GPT
from llm.registry import RegistryParams
from llm.train_config import TrainConfig
from llm.training import Evaluate, TrainResult

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class InstructConfig:
    """data: the instruction set (file, format, skip_bad_entries). train: the run. method: full (every weight) |
    lora (adapters per `lora`, merged into the weights at the end). mask_prompt: loss on the assistant's replies
    only (every reply of a chat, not its system and user text). allowed_max_length: tokens kept per example
    (0 = the model's context_length). split_seed: the train/test/val shuffle. eval_batch_size: val examples per
    batch.
    generation, response_batch_size: how the test responses are generated (eos is always end-of-text).
    registry: models/instruct logged to the run and registered in MLflow (llm.registry; evaluate moves its
    `champion` alias)."""

    data: InstructionData = field(default_factory=InstructionData)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Literal["full", "lora"] = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mask_prompt: bool = False
    allowed_max_length: int = 0
    split_seed: int = 123
    eval_batch_size: int = 16
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64, temperature=0))
    response_batch_size: int = 16
    registry: RegistryParams = field(default_factory=RegistryParams)

    def example_limit(self, context_length: int) -> int:
        """Tokens kept per example: `allowed_max_length`, at most the model's context (0 = the whole context)."""
        return min(self.allowed_max_length or context_length, context_length)

    def kept(
        self, splits: Mapping[str, Sequence[Instruction]], tokenizer: tiktoken.Encoding, limit: int, *names: str
    ) -> dict[str, list[InstructionExample]]:
        """Splits `names` encoded, without the examples whose prompt leaves no target within `limit` tokens (see
        `trainable`); a split left empty is an LLMError."""
        kept = {name: trainable(encode(splits[name], tokenizer), limit, mask_prompt=self.mask_prompt) for name in names}
        for name, examples in kept.items():
            if not examples:
                raise LLMError(
                    f"no {name} example has a response token within {limit} tokens (every prompt is longer); "
                    "raise allowed_max_length or the base model's context_length"
                )
        return kept

    def collate(self, examples: Sequence[InstructionExample], limit: int) -> Batch:
        return collate_instructions(examples, mask_prompt=self.mask_prompt, allowed_max_length=limit)

    def val_batches(self, examples: Sequence[InstructionExample], limit: int) -> list[Batch]:
        """`examples` in order, `eval_batch_size` per batch: the val loss of the tuning and of the evaluation."""
        size = self.eval_batch_size
        return [self.collate(examples[i : i + size], limit) for i in range(0, len(examples), size)]

    def evaluator(self, examples: Sequence[InstructionExample], limit: int) -> Evaluate:
        """The val loss hook: {"val_loss": mean loss over `val_batches(examples, limit)`}."""
        batches = self.val_batches(examples, limit)
        return lambda model: {"val_loss": mean_loss(model, batches)}

    def val_loss(self, model: GPT, splits: Mapping[str, Sequence[Instruction]], tokenizer: tiktoken.Encoding) -> float:
        """`model`'s mean loss on the val split: the examples and batches the tuning validates on."""
        limit = self.example_limit(model.config.context_length)
        return mean_loss(model, self.val_batches(self.kept(splits, tokenizer, limit, "val")["val"], limit))

    def train_batches(self, examples: Sequence[InstructionExample], limit: int) -> Callable[[int], Batch]:
        """Micro-batch i: `train.batch_size` examples in a seeded order that reshuffles every epoch."""
        size, seed = self.train.batch_size, self.train.seed
        return lambda i: self.collate([examples[j] for j in batch_indices(len(examples), size, i, seed=seed)], limit)

    def add_adapters(self, model: GPT) -> None:
        """With method lora: LoRA adapters on `lora.targets` (seeded by train.seed), the rest of the model frozen."""
        if self.method == "lora":
            torch.manual_seed(self.train.seed)
            apply_lora(model, self.lora.targets, self.lora.r, self.lora.alpha, self.lora.dropout)

    def merge_adapters(self, model: GPT) -> None:
        """With method lora: fold the adapters into the weights (a plain model again)."""
        if self.method == "lora":
            remove_lora(model)

    def sampler(self, probe: Instruction, tokenizer: tiktoken.Encoding) -> Callable[[torch.nn.Module], str]:
        """The logged text sample: the model's response to `probe` (at most 32 new tokens)."""
        settings = dataclasses.replace(self.generation, max_new_tokens=min(self.generation.max_new_tokens, 32))
        return lambda model: f"{probe.instruction} → {respond(model, [probe], tokenizer, settings, progress=False)[0]}"

    def responses(self, model: GPT, test: Sequence[Instruction], tokenizer: tiktoken.Encoding) -> list[str]:
        """The model's response to each `test` entry, in order (`generation`, `response_batch_size` at a time)."""
        return respond(model, test, tokenizer, self.generation, batch_size=self.response_batch_size)


def response_rows(test: Sequence[Instruction], responses: Sequence[str]) -> list[dict[str, Any]]:
    """One row per test entry: instruction, input, reference (its output) and the model's response."""
    return [
        {"instruction": e.instruction, "input": e.input, "reference": e.output, "response": r}
        for e, r in zip(test, responses, strict=True)
    ]


def run_summary(result: TrainResult, config: InstructConfig, n_train: int, trainable_params: int) -> dict[str, Any]:
    """What a tuning run did: steps, epochs over `n_train` examples, training time, best val loss, trainable size."""
    examples = result.state.step * config.train.batch_size * config.train.grad_accum
    return {
        "steps": result.state.step,
        "epochs": examples / n_train,
        "train_seconds": result.state.seconds,
        "best_val_loss": result.state.best,
        "trainable_params": trainable_params,
    }
