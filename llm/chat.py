"""Chat messages → the prompt text an instruction-tuned model sees: the one place a conversation is rendered.

The pipeline's instruct models are trained on the Alpaca format (`llm.data.instructions.format_prompt`), which
knows one instruction and one response. A conversation maps onto it as follows:
- system (or developer) messages replace the Alpaca preamble ("Below is an instruction ..."), joined by blank
  lines; without one the preamble stays, so a single user message renders exactly as `format_prompt` renders
  that instruction (what the model was trained on);
- the other messages must alternate user, assistant, ..., user: each earlier exchange becomes an
  `### Instruction:` / `### Response:` pair and the last user message the open instruction;
- the model's reply ends at end-of-text or at a new `###` header (a model imitating the format), as
  `llm instruct` cuts it: `STOP` lists those stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llm.data.instructions import PREAMBLE, RESPONSE_HEADER, Instruction, format_prompt
from llm.errors import LLMError

STOP = ("###",)
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Message:
    role: str  # system | developer | user | assistant
    content: str


def render_chat(messages: Sequence[Message]) -> str:
    """The prompt text for `messages` (see the module docstring); an LLMError names what cannot be rendered."""
    system = [m.content for m in messages if m.role in SYSTEM_ROLES]
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise LLMError(
                f"messages must alternate user and assistant after any system messages; got {message.role!r} "
                f"where {expected!r} was expected"
            )
    if not turns or turns[-1].role != "user":
        raise LLMError("the last message (after any system messages) must come from the user")
    history = "".join(
        f"### Instruction:\n{user.content}\n\n{RESPONSE_HEADER}{assistant.content}\n\n"
        for user, assistant in zip(turns[:-1:2], turns[1::2], strict=True)
    )
    question = format_prompt(Instruction(turns[-1].content, "", ""))
    preamble = "\n\n".join(system) if system else PREAMBLE
    return preamble + "\n\n" + history + question.removeprefix(PREAMBLE + "\n\n")
