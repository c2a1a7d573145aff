"""finetune_instructions: instruction-tune the base model on Alpaca-style data, then answer the test split.

Reads models/base/ and data/raw/instruction-data.json (split train/test/val 85/10/5 by `split_seed`); trains
every weight (`method: full`) or LoRA adapters (`method: lora`, merged into the weights at the end) with the
shared engine; writes models/instruct/ (a plain model directory), reports/responses.json (instruction, input,
reference and response of every test entry, greedy and KV-cached by default), metrics/finetune_instructions.json,
plots/finetune_instructions/*.csv and runs/finetune_instructions.json (the MLflow run).

The section holds every `llm.train_config.TrainConfig` field plus the stage's own (`InstructParams`). An interrupted
run resumes from checkpoints/finetune_instructions/<fingerprint of base weights and params>/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llm.data.instructions import (
    Instruction,
    InstructionExample,
    collate_instructions,
    encode,
    load_instructions,
    respond,
    split_entries,
    trainable,
)
from llm.data.windows import batch_indices
from llm.errors import LLMError
from llm.evaluation import mean_loss
from llm.generate import GenerationConfig
from llm.io import sha256_file, write_json
from llm.lora import LoRAConfig, apply_lora, parameter_report, remove_lora
from llm.model_dir import WEIGHTS_FILE, load_model, provenance, save_model
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker
from llm.train_config import TrainConfig
from llm.training import train
from stages.common import params_section, run

STAGE = "finetune_instructions"
BASE_DIR = Path("models/base")
INSTRUCT_DIR = Path("models/instruct")
DATA_FILE = Path("data/raw/instruction-data.json")
RANKS_FILE = Path("data/raw/tokenizer/r50k_base.tiktoken")  # from the fetch stage; else the mirror's
RESPONSES = Path("reports/responses.json")


@dataclass(frozen=True)
class InstructParams(TrainConfig):
    """TrainConfig plus: method (full | lora) and lora (rank, alpha, targets); mask_prompt (train only on the
    response tokens); allowed_max_length (tokens kept per example, 0 = the model's context); split_seed;
    eval_batch_size; generation (how test responses are sampled; eos is always end-of-text) and
    response_batch_size; checkpoint_root (see the module doc)."""

    method: Literal["full", "lora"] = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mask_prompt: bool = False
    allowed_max_length: int = 0
    split_seed: int = 123
    eval_batch_size: int = 16
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64, temperature=0))
    response_batch_size: int = 16
    checkpoint_root: str = "checkpoints/finetune_instructions"


def instruction_splits(params: InstructParams) -> dict[str, list[Instruction]]:
    """The validated instruction data split train / test / val by `params.split_seed`."""
    return split_entries(load_instructions(DATA_FILE), params.split_seed)


def example_limit(params: InstructParams, context_length: int) -> int:
    """Tokens kept per example: `allowed_max_length`, at most the model's context (0 = the whole context)."""
    return min(params.allowed_max_length or context_length, context_length)


def val_batches(
    examples: list[InstructionExample], params: InstructParams, limit: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `examples` that keep a target within `limit` tokens (see `trainable`), in order, collated as in
    training, `params.eval_batch_size` per batch: the val loss of this stage and of `evaluate` alike."""
    kept = trainable(examples, limit, mask_prompt=params.mask_prompt)
    size = params.eval_batch_size
    return [
        collate_instructions(kept[i : i + size], mask_prompt=params.mask_prompt, allowed_max_length=limit)
        for i in range(0, len(kept), size)
    ]


def main() -> None:
    params = params_section(STAGE, InstructParams)
    started = time.perf_counter()
    splits = instruction_splits(params)
    tokenizer = get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)
    model = load_model(BASE_DIR)
    limit = example_limit(params, model.config.context_length)
    encoded = {name: encode(splits[name], tokenizer) for name in ("train", "val")}
    train_set, val_set = (trainable(encoded[name], limit, mask_prompt=params.mask_prompt) for name in ("train", "val"))
    dropped = {name: len(encoded[name]) - len(kept) for name, kept in (("train", train_set), ("val", val_set))}
    if not train_set or not val_set:
        raise LLMError(
            f"no {'training' if not train_set else 'validation'} example has a response token within "
            f"{limit} tokens (every prompt is longer); raise allowed_max_length or the base model's context_length"
        )
    if params.method == "lora":
        torch.manual_seed(params.seed)  # the adapters' initialisation
        lora = params.lora
        apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout)
    sizes = parameter_report(model)

    def train_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = batch_indices(len(train_set), params.batch_size, i, seed=params.seed)
        batch = [train_set[j] for j in picked]
        return collate_instructions(batch, mask_prompt=params.mask_prompt, allowed_max_length=limit)

    evaluation = val_batches(val_set, params, limit)
    probe = splits["val"][0]
    settings = dataclasses.replace(params.generation, max_new_tokens=min(params.generation.max_new_tokens, 32))

    def sample(net: torch.nn.Module) -> str:
        return f"{probe.instruction} → {respond(net, [probe], tokenizer, settings, progress=False)[0]}"

    base_sha = sha256_file(BASE_DIR / WEIGHTS_FILE)
    fingerprint = json.dumps([base_sha, dataclasses.asdict(params)], sort_keys=True, default=str)
    checkpoints = Path(params.checkpoint_root) / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    tokens_per_epoch = sum(min(len(ex.ids), limit) for ex in train_set)
    print(
        f"{params.method}: {sizes['trainable']:,} of {sizes['total']:,} parameters trainable; "
        f"examples train {len(train_set)}, val {len(val_set)}, test {len(splits['test'])}"
        + (
            f" (prompt longer than {limit} tokens, skipped: train {dropped['train']}, val {dropped['val']})"
            if any(dropped.values())
            else ""
        )
    )
    with Tracker(STAGE, upstream=("pretrain",)) as tracker:
        tracker.log_params(
            {
                STAGE: dataclasses.asdict(params),
                "base_weights_sha256": base_sha,
                "trainable_params": sizes["trainable"],
                "examples": {name: len(entries) for name, entries in splits.items()},
                "examples_skipped": dropped,
            }
        )
        result = train(
            model,
            train_batch,
            params,
            evaluate=lambda net: {"val_loss": mean_loss(net, evaluation)},
            sample=sample,
            checkpoint_dir=checkpoints,
            tracker=tracker,
        )
        model = model.cpu().eval()
        if params.method == "lora":
            remove_lora(model)  # merged: models/instruct/ is a plain model directory
        summary = {
            "steps": result.state.step,
            "epochs": result.state.step * params.batch_size * params.grad_accum / len(train_set),
            "train_seconds": result.state.seconds,
            "best_val_loss": result.state.best,
            "trainable_params": sizes["trainable"],
        }
        save_model(model, INSTRUCT_DIR, extra=provenance(STAGE, summary))
        responses = respond(model, splits["test"], tokenizer, params.generation, batch_size=params.response_batch_size)
        rows = [
            {"instruction": e.instruction, "input": e.input, "reference": e.output, "response": r}
            for e, r in zip(splits["test"], responses, strict=True)
        ]
        write_json(RESPONSES, rows)
        tracker.log_artifact(RESPONSES, "reports")
        tracker.log_metrics(
            {**summary, "wall_seconds": time.perf_counter() - started, "tokens_per_epoch": tokens_per_epoch}
        )
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(
        f"{STAGE}: val_loss {tracker.latest.get('val_loss', float('nan')):.4f} after {summary['steps']} steps "
        f"({summary['epochs']:.2f} epochs, {summary['train_seconds']:.0f} s) → {INSTRUCT_DIR}/, {RESPONSES}"
    )


if __name__ == "__main__":
    run(main)
