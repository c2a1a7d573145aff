"""The chat template: the one rendering of a conversation (`messages`) to the text an instruct model reads, shared by
instruction tuning, `llm instruct`, `llm serve` and the MLflow pyfunc.

It extends the Alpaca prompt to system prompts and several turns:

    {system message, or PREAMBLE}

    ### Instruction:
    {user message 1}

    ### Response:
    {assistant message 1}

    ### Instruction:
    {user message 2}

    ### Response:
    {assistant message 2}<|endoftext|>

An Alpaca entry is one user message, its instruction followed (when its input is non-empty) by `\\n\\n### Input:\\n`
and the input (`user_text`), so it renders exactly as the Alpaca prompt. Several system messages are joined by a
blank line. The text comes in `pieces`: prompt, reply, prompt, reply, ...; each piece is tokenized on its own (in
training and when answering alike), and the loss covers the reply pieces only (with `mask_prompt`). The reply to
answer ends at `<|endoftext|>` (the collate appends it after the last reply) or at a new `###` header (`STOP`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tiktoken

from llm.errors import LLMError

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INSTRUCTION_HEADER, INPUT_HEADER, RESPONSE_HEADER = "### Instruction:\n", "### Input:\n", "### Response:\n"
SEPARATOR = "\n\n"
STOP = ("###",)
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Message:
    role: str  # system | developer | user | assistant
    content: str


def user_text(instruction: str, input: str = "") -> str:
    """An Alpaca instruction (and its input, when non-empty) as the content of one user message."""
    return f"{instruction}{SEPARATOR}{INPUT_HEADER}{input}" if input else instruction


def pieces(messages: Sequence[Message]) -> list[str]:
    """The template's text of `messages` in pieces: even indices are prompts (headers, system and user text), odd
    ones the assistant messages verbatim. After any system messages, the turns must alternate user, assistant, ...
    beginning with the user; an LLMError says where they do not."""
    system = [m.content for m in messages if m.role in SYSTEM_ROLES]
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    if not turns:
        raise LLMError("the messages hold no user message (after any system messages)")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise LLMError(
                f"messages must alternate user and assistant after any system messages; got {message.role!r} "
                f"where {expected!r} was expected"
            )
    head = SEPARATOR.join(system) if system else PREAMBLE
    return [
        f"{head if i == 0 else ''}{SEPARATOR}{INSTRUCTION_HEADER}{m.content}{SEPARATOR}{RESPONSE_HEADER}"
        if m.role == "user"
        else m.content
        for i, m in enumerate(turns)
    ]


def prompt_pieces(messages: Sequence[Message]) -> list[str]:
    """`pieces` of a conversation whose last message is the user's: what the model reads before it answers."""
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    if not turns or turns[-1].role != "user":
        raise LLMError("the last message (after any system messages) must come from the user")
    return pieces(messages)


def render_chat(messages: Sequence[Message]) -> str:
    """The prompt text the model answers for `messages` (the last one the user's), ending in `### Response:\\n`."""
    return "".join(prompt_pieces(messages))


def end_reply(text: str) -> str:
    """A generated reply without what follows a `STOP` string, stripped."""
    for stop in STOP:
        text = text.split(stop)[0]
    return text.strip()


def tokenize(conversations: Sequence[Sequence[str]], tokenizer: tiktoken.Encoding) -> list[list[list[int]]]:
    """Each conversation's `pieces`, each piece tokenized on its own as ordinary text (`<|endoftext|>` written in a
    message stays text)."""
    flat = tokenizer.encode_ordinary_batch([piece for conversation in conversations for piece in conversation])
    out, start = [], 0
    for conversation in conversations:
        out.append(flat[start : start + len(conversation)])
        start += len(conversation)
    return out


def prompt_ids(messages: Sequence[Message], tokenizer: tiktoken.Encoding) -> list[int]:
    """The tokens of `render_chat(messages)` as training tokenizes them (piece by piece)."""
    return [token for piece in tokenize([prompt_pieces(messages)], tokenizer)[0] for token in piece]


def fit_context(messages: Sequence[Message], tokenizer: tiktoken.Encoding, max_tokens: int) -> list[Message]:
    """The newest part of a conversation (the last message the user's) whose prompt (`prompt_ids`) has at most
    `max_tokens` tokens: the oldest exchanges (a user message and its reply) go first, system messages always
    stay. An LLMError when the system messages and the last user message alone are too long."""
    system = [m for m in messages if m.role in SYSTEM_ROLES]
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    while True:
        ids = prompt_ids([*system, *turns], tokenizer)
        if len(ids) <= max_tokens:
            return [*system, *turns]
        if len(turns) < 3:
            raise LLMError(f"the message needs {len(ids)} prompt tokens; at most {max_tokens} fit in the context")
        turns = turns[2:]
