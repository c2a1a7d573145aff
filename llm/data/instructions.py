"""Instruction data: validated entries (Alpaca or chat), their prompts (the chat template of `llm.chat`), a seeded
split, the training collate and the saved responses to the test entries.

A file is a JSON array or JSONL (one entry per line) of entries of either kind:
- Alpaca: `{"instruction": str, "input": str, "output": str}`, instruction and output non-empty; other keys are
  ignored (and counted);
- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`: an optional system
  message first, then user and assistant turns alternating, ending with the assistant's (one or more exchanges).

Every entry becomes an `Instruction`: its last user message and the reply to it (`output`), with the messages
before them (`context`). A training example is the template's pieces tokenized; the collate appends one
end-of-text token that the model learns to emit after the last reply.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import tiktoken
import torch
from tqdm import tqdm

from llm.chat import PREAMBLE as PREAMBLE
from llm.chat import RESPONSE_HEADER as RESPONSE_HEADER
from llm.chat import Message, end_reply, pieces, render_chat, tokenize, user_text
from llm.data import SPLITS
from llm.errors import LLMError
from llm.generate import GenerationConfig, generate
from llm.io import read_utf8
from llm.model import GPT
from llm.tokenizer import EOT_ID

KEYS = ("instruction", "input", "output")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Instruction:
    """An entry: `instruction` (+ `input`) is the last user message, `output` the reply to learn or the reference;
    `context` the messages before them in a chat entry (an optional system message, then earlier exchanges)."""

    instruction: str
    input: str
    output: str
    context: tuple[Message, ...] = ()


@dataclass(frozen=True)
class InstructionData:
    """path: a JSON array or JSONL file of entries. format: auto (by suffix: .jsonl or .ndjson is jsonl, else json),
    json or jsonl. skip_bad_entries: skip invalid entries (counted) instead of stopping at the first one."""

    path: str = "data/raw/instruction-data.json"
    format: Literal["auto", "json", "jsonl"] = "auto"
    skip_bad_entries: bool = False


@dataclass
class InstructionSet:
    """The entries read from a file; `ignored_keys`: extra key → entries that carried it; `skipped`: one line per
    bad entry left out (with skip_bad_entries)."""

    entries: list[Instruction]
    ignored_keys: Counter[str] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, str | int]:
        """What was left out, as run params: "key: entries, ..." of the ignored keys, and the skipped entries."""
        ignored = ", ".join(f"{key}: {n}" for key, n in self.ignored_keys.most_common())
        return {"ignored_keys": ignored, "skipped_entries": len(self.skipped)}

    def report(self) -> str:
        """One line of what was left out, or "" when nothing was."""
        notes = [f"ignored keys {dict(self.ignored_keys)} (entries per key)"] if self.ignored_keys else []
        notes += [f"skipped {len(self.skipped)} bad entries (first: {self.skipped[0]})"] if self.skipped else []
        return "; ".join(notes)


class InstructionExample(NamedTuple):
    """A tokenized entry: `ids` = the template's pieces (no final end-of-text); the first `prompt_len` are prompt,
    and so are the (start, end) ranges in `later_prompts` (the user turns after the first reply of a chat)."""

    ids: list[int]
    prompt_len: int
    later_prompts: tuple[tuple[int, int], ...] = ()


def messages(entry: Instruction) -> list[Message]:
    """The entry as a conversation: its context, the user message, then the reply (`output`)."""
    user = Message("user", user_text(entry.instruction, entry.input))
    return [*entry.context, user, Message("assistant", entry.output)]


def format_prompt(entry: Instruction) -> str:
    """The prompt the model answers: for an Alpaca entry the preamble, `### Instruction:`, `### Input:` (only when
    input is non-empty) and the header `### Response:\n`; for a chat entry its whole conversation before the reply."""
    return render_chat(messages(entry)[:-1])


def _text(item: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise LLMError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise LLMError(f"{where}: {key!r} is empty")
    return value


def _chat_entry(turns: Any, where: str) -> Instruction:
    if not isinstance(turns, list) or not turns:
        raise LLMError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    conversation = []
    for i, turn in enumerate(turns):
        at = f"{where}: message {i}"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise LLMError(f"{at} must be an object with keys role and content")
        expected = ("system", "user") if i == 0 else ("user",) if conversation[-1].role != "user" else ("assistant",)
        if turn["role"] not in ROLES:
            raise LLMError(f"{at}: role {turn['role']!r} is not one of {', '.join(ROLES)}")
        if turn["role"] not in expected:
            raise LLMError(
                f"{at}: expected role {' or '.join(map(repr, expected))}, got {turn['role']!r} (an optional system "
                "message first, then user and assistant alternating)"
            )
        conversation.append(Message(turn["role"], _text(turn, "content", at)))
    if conversation[-1].role != "assistant":
        raise LLMError(f"{where}: the last message must be the assistant's (the reply to learn)")
    return Instruction(conversation[-2].content, "", conversation[-1].content, tuple(conversation[:-2]))


def parse_entry(item: Any, where: str) -> tuple[Instruction, list[str]]:
    """One decoded entry, validated, and its ignored keys; an LLMError starting with `where` says what is wrong."""
    if not isinstance(item, dict):
        raise LLMError(f"{where} must be an object with keys {', '.join(KEYS)}, got {type(item).__name__}")
    if "messages" in item:
        mixed = [k for k in KEYS if k in item]
        if mixed:
            raise LLMError(f"{where}: mixes a chat entry's 'messages' with the Alpaca key {mixed[0]!r}")
        return _chat_entry(item["messages"], where), [k for k in item if k != "messages"]
    missing = [k for k in KEYS if k not in item]
    if missing:
        raise LLMError(
            f"{where}: missing key {missing[0]!r} (expected exactly {', '.join(KEYS)}, or messages for a chat entry)"
        )
    values = [_text(item, key, where, required=key != "input") for key in KEYS]
    return Instruction(*values), [k for k in item if k not in KEYS]


def collect(items: Iterator[tuple[str, Any]], source: str, *, skip_bad: bool = False) -> InstructionSet:
    """Validate (where, decoded entry) pairs; with `skip_bad`, invalid entries (or undecodable lines: an LLMError
    for a value) are left out and listed. No entry left is an LLMError."""
    found = InstructionSet([])
    for where, item in items:
        try:
            if isinstance(item, LLMError):
                raise item
            entry, extra = parse_entry(item, where)
        except LLMError as err:
            if not skip_bad:
                raise
            found.skipped.append(str(err))
            continue
        found.entries.append(entry)
        found.ignored_keys.update(extra)
    if not found.entries:
        raise LLMError(f"{source}: no valid entry" + (f" ({len(found.skipped)} skipped)" if found.skipped else ""))
    return found


def _decode(text: str, where: str, *, one_line: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if one_line else f"line {err.lineno} column {err.colno}"
        raise LLMError(f"{where}: invalid JSON at {at}: {err.msg}") from err
    except RecursionError as err:  # json's C parser recurses once per level
        raise LLMError(f"{where}: JSON nested too deeply") from err


def _array_items(data: Any, source: str) -> Iterator[tuple[str, Any]]:
    if not isinstance(data, list):
        raise LLMError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise LLMError(f"{source}: the list of entries is empty")
    return ((f"{source}: entry {i}", item) for i, item in enumerate(data))


def parse_entries(data: Any, source: str = "instruction data") -> list[Instruction]:
    """Validate a decoded JSON array of entries (strictly: the first bad entry is an LLMError naming its index)."""
    return collect(_array_items(data, source), source).entries


def _jsonl_items(text: str, source: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{source}: line {number}"
            try:
                yield where, _decode(line, where, one_line=True)
            except LLMError as err:  # collect() raises it or skips it
                yield where, err


def read_instruction_set(data: InstructionData) -> InstructionSet:
    """Read and validate the entries of `data.path` (see InstructionData); an LLMError names the file and the entry
    (JSON: its index) or line (JSONL)."""
    path = Path(data.path)
    text = read_utf8(path, missing=" (the default data: dvc repro fetch; your own: finetune_instructions.data.path)")
    fmt = data.format if data.format != "auto" else "jsonl" if path.suffix in (".jsonl", ".ndjson") else "json"
    if fmt == "jsonl":
        return collect(_jsonl_items(text, str(path)), str(path), skip_bad=data.skip_bad_entries)
    items = _array_items(_decode(text, str(path)), str(path))
    return collect(items, str(path), skip_bad=data.skip_bad_entries)


def load_instructions(path: str | Path) -> list[Instruction]:
    """The entries of a JSON or JSONL file (format by suffix), strictly validated."""
    return read_instruction_set(InstructionData(str(path))).entries


def read_responses(path: str | Path, test: Sequence[Instruction]) -> list[str]:
    """The responses to the `test` entries saved at `path`: a JSON list of one object per entry, in order, holding
    (at least) its "instruction", "input" and "response". An unreadable file, or one saved for other entries (a
    stale file), is an LLMError."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if [(r["instruction"], r["input"]) for r in rows] == [(e.instruction, e.input) for e in test]:
            return [str(r["response"]) for r in rows]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as err:  # ValueError: JSON, UTF-8
        raise LLMError(f"cannot read {path} ({str(err)[:200]}); run: dvc repro finetune_instructions") from err
    raise LLMError(f"{path} does not match the test split; run: dvc repro finetune_instructions")


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
    """Tokenize each entry's conversation by the chat template's pieces (an Alpaca entry: prompt, then output);
    special-token text in the data is encoded as ordinary text."""
    examples = []
    for tokens in tokenize([pieces(messages(e)) for e in entries], tokenizer):
        ids: list[int] = []
        later = []
        for i, piece in enumerate(tokens):
            if i and i % 2 == 0:
                later.append((len(ids), len(ids) + len(piece)))
            ids += piece
        examples.append(InstructionExample(ids, len(tokens[0]), tuple(later)))
    return examples


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
    targets that predict prompt tokens (`prompt_len`, `later_prompts`) when `mask_prompt` is set (the model
    learns only the assistant's replies).
    """
    if not batch:
        raise LLMError("cannot collate an empty batch")
    length = max(len(ex.ids) for ex in batch) + 1
    inputs = torch.full((len(batch), length - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), length - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len, later_prompts) in enumerate(batch):
        n = len(ids)
        seq = torch.tensor([*ids, pad_id], dtype=torch.long)
        inputs[row, :n] = seq[:n]
        targets[row, :n] = seq[1:]
        if mask_prompt:
            targets[row, : prompt_len - 1] = ignore_index
            for start, end in later_prompts:
                targets[row, start - 1 : end - 1] = ignore_index
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
    """The model's reply to each entry's prompt (its conversation before `output`), in order: batched (prompts of
    similar length together), KV-cached, stopping at end-of-text; text from a `STOP` string on (a model imitating
    the format with a new `###` header) is cut."""
    tokenized = tokenize([pieces(messages(e)[:-1]) for e in entries], tokenizer)
    prompts = [[token for piece in tokens for token in piece] for tokens in tokenized]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    config = dataclasses.replace(config, eos_id=EOT_ID)
    responses = [""] * len(prompts)
    for start in tqdm(
        range(0, len(order), batch_size), desc="responses", unit="batch", disable=None if progress else True
    ):
        rows = order[start : start + batch_size]
        for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], config), strict=True):
            responses[i] = end_reply(tokenizer.decode(ids))
    return responses
