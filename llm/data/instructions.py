"""Instruction data (Alpaca style): validated entries, the prompt format, a seeded split, the training collate
and the saved responses to the test entries.

An entry is `{"instruction": str, "input": str, "output": str}`; instruction and output must be non-empty.
The prompt of an entry is everything the model sees before it answers (ending in `### Response:\\n`);
a training example is the prompt's tokens followed by the output's tokens, and the collate appends one
end-of-text token that the model learns to emit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import tiktoken
import torch
from tqdm import tqdm

from llm.data import SPLITS
from llm.errors import LLMError
from llm.generate import GenerationConfig, generate
from llm.model import GPT
from llm.tokenizer import EOT_ID

KEYS = ("instruction", "input", "output")
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_HEADER = "### Response:\n"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str


class InstructionExample(NamedTuple):
    """A tokenized entry: `ids` = prompt tokens + output tokens (no end-of-text); the first `prompt_len` are prompt."""

    ids: list[int]
    prompt_len: int


def format_prompt(entry: Instruction) -> str:
    """The Alpaca prompt: preamble, `### Instruction:`, `### Input:` (only when input is non-empty), header."""
    parts = [PREAMBLE, f"### Instruction:\n{entry.instruction}"]
    if entry.input:
        parts.append(f"### Input:\n{entry.input}")
    parts.append(RESPONSE_HEADER)
    return "\n\n".join(parts)


def parse_entries(data: Any, source: str = "instruction data") -> list[Instruction]:
    """Validate a decoded JSON value: a non-empty list of objects with exactly the string keys of `KEYS`."""
    if not isinstance(data, list):
        raise LLMError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise LLMError(f"{source}: the list of entries is empty")
    entries = []
    for i, item in enumerate(data):
        where = f"{source}: entry {i}"
        if not isinstance(item, dict):
            raise LLMError(f"{where} must be an object with keys {', '.join(KEYS)}, got {type(item).__name__}")
        missing, extra = [k for k in KEYS if k not in item], [k for k in item if k not in KEYS]
        if missing or extra:
            problem = f"missing key {missing[0]!r}" if missing else f"unknown key {extra[0]!r}"
            raise LLMError(f"{where}: {problem} (expected exactly {', '.join(KEYS)})")
        for key in KEYS:
            if not isinstance(item[key], str):
                raise LLMError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
        for key in ("instruction", "output"):
            if not item[key].strip():
                raise LLMError(f"{where}: {key!r} is empty")
        entries.append(Instruction(item["instruction"], item["input"], item["output"]))
    return entries


def load_instructions(path: str | Path) -> list[Instruction]:
    """Read and validate a JSON file of entries; missing, truncated or malformed files raise LLMError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LLMError(f"instruction data not found: {path} (run the fetch stage: dvc repro fetch)") from err
    except UnicodeDecodeError as err:
        raise LLMError(f"{path}: not valid UTF-8 at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise LLMError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    return parse_entries(data, str(path))


def read_responses(path: str | Path, test: Sequence[Instruction]) -> list[str]:
    """The responses to the `test` entries saved at `path`: a JSON list of one object per entry, in order, holding
    (at least) its "instruction", "input" and "response". An unreadable file, or one saved for other entries (a
    stale file), is an LLMError."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LLMError(f"cannot read {path} ({err}); run: dvc repro finetune_instructions") from err
    if [(r["instruction"], r["input"]) for r in rows] != [(e.instruction, e.input) for e in test]:
        raise LLMError(f"{path} does not match the test split; run: dvc repro finetune_instructions")
    return [r["response"] for r in rows]


def split_entries(
    entries: Sequence[Instruction], seed: int, fractions: tuple[float, float] = (0.85, 0.10)
) -> dict[str, list[Instruction]]:
    """Seeded shuffle, then train / test / val: the first two take `fractions` (floored), val the rest (5%)."""
    if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise LLMError(f"split fractions must be positive and leave room for val, got {fractions}")
    order = list(entries)
    random.Random(seed).shuffle(order)
    n_train, n_test = (int(f * len(order)) for f in fractions)
    splits = {"train": order[:n_train], "test": order[n_train : n_train + n_test], "val": order[n_train + n_test :]}
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise LLMError(f"{len(order)} instruction entries are too few: split {empty[0]!r} would be empty")
    return splits


def encode(entries: Sequence[Instruction], tokenizer: tiktoken.Encoding) -> list[InstructionExample]:
    """Tokenize each entry as prompt + output; special-token text in the data is encoded as ordinary text."""
    prompts = tokenizer.encode_ordinary_batch([format_prompt(e) for e in entries])
    outputs = tokenizer.encode_ordinary_batch([e.output for e in entries])
    return [InstructionExample(p + o, len(p)) for p, o in zip(prompts, outputs, strict=True)]


def trainable(
    examples: Sequence[InstructionExample], max_length: int, *, mask_prompt: bool
) -> list[InstructionExample]:
    """The examples that keep at least one target after truncation to `max_length` tokens.

    With `mask_prompt` an example whose prompt alone fills `max_length` (prompt_len > max_length) would have
    every target ignored: it teaches nothing, and a batch made only of such examples has an undefined (nan)
    mean loss. Without masking every example keeps its targets.
    """
    if max_length < 1:
        raise LLMError(f"max_length must be positive, got {max_length}")
    return [ex for ex in examples if not mask_prompt or ex.prompt_len <= max_length]


def collate_instructions(
    batch: Sequence[InstructionExample],
    *,
    mask_prompt: bool = False,
    allowed_max_length: int | None = None,
    pad_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to (inputs, targets), int64 (B, T).

    Each example gets one end-of-text token appended and is padded with `pad_id` to the longest example + 1;
    T is that length - 1 (then truncated to `allowed_max_length`). Targets are the inputs shifted by one;
    the appended end-of-text stays a target, later padding positions are `ignore_index`, and so are the
    targets that predict prompt tokens when `mask_prompt` is set (the model learns only the response).
    """
    if not batch:
        raise LLMError("cannot collate an empty batch")
    length = max(len(ex.ids) for ex in batch) + 1
    inputs = torch.full((len(batch), length - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), length - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        n = len(ids)
        seq = torch.tensor([*ids, pad_id], dtype=torch.long)
        inputs[row, :n] = seq[:n]
        targets[row, :n] = seq[1:]
        if mask_prompt:
            targets[row, : prompt_len - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def respond(
    model: GPT,
    entries: Sequence[Instruction],
    tokenizer: tiktoken.Encoding,
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The model's response to each entry's prompt, in order: batched (prompts of similar length together),
    KV-cached, stopping at end-of-text; text from a new `###` header on (a model imitating the format) is cut."""
    prompts = tokenizer.encode_ordinary_batch([format_prompt(e) for e in entries])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    config = dataclasses.replace(config, eos_id=EOT_ID)
    responses = [""] * len(prompts)
    for start in tqdm(
        range(0, len(order), batch_size), desc="responses", unit="batch", disable=None if progress else True
    ):
        rows = order[start : start + batch_size]
        for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], config), strict=True):
            responses[i] = tokenizer.decode(ids).split("###")[0].strip()
    return responses
