"""The chat template (llm.chat), chat and JSONL instruction sets, the loss mask over assistant turns,
`llm instruct --chat` driven through stdin, and the finetune_instructions stage on a chat JSONL file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llm.chat import PREAMBLE, Message, end_reply, fit_context, pieces, prompt_ids, render_chat, user_text
from llm.cli import main as cli_main
from llm.config import get_preset
from llm.data import instructions
from llm.data.instructions import (
    Instruction,
    InstructionData,
    collate_instructions,
    encode,
    format_prompt,
    read_instruction_set,
)
from llm.errors import LLMError
from llm.model import GPT
from llm.model_dir import save_model
from llm.tokenizer import EOT_ID, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
X = -100
CHAT = {
    "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Grass colour?"},
        {"role": "assistant", "content": "Green."},
    ]
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_template_text_of_a_multi_turn_chat() -> None:
    entry = instructions.parse_entries([CHAT])[0]
    assert entry == Instruction(
        "Grass colour?", "", "Green.", (Message("system", "You answer in one word."), Message("user", "Sky colour?"),
                                        Message("assistant", "Blue."))
    )  # fmt: skip
    assert "".join(pieces(instructions.messages(entry))) == (
        "You answer in one word.\n\n### Instruction:\nSky colour?\n\n### Response:\nBlue."
        "\n\n### Instruction:\nGrass colour?\n\n### Response:\nGreen."
    )
    assert format_prompt(entry) == render_chat(instructions.messages(entry)[:-1])
    assert format_prompt(entry).endswith("Blue.\n\n### Instruction:\nGrass colour?\n\n### Response:\n")


def test_alpaca_entries_render_as_the_alpaca_prompt() -> None:
    entry = Instruction("Translate to French.", "Hello", "Bonjour")
    assert user_text(entry.instruction, entry.input) == "Translate to French.\n\n### Input:\nHello"
    assert render_chat([Message("user", user_text(entry.instruction, entry.input))]) == (
        f"{PREAMBLE}\n\n### Instruction:\nTranslate to French.\n\n### Input:\nHello\n\n### Response:\n"
    )
    assert end_reply(" Bonjour.\n\n### Instruction:\nmore") == "Bonjour."


def test_the_loss_covers_exactly_the_assistant_tokens_of_every_turn(mirror: Path) -> None:
    tok = get_tokenizer()
    entry = instructions.parse_entries([CHAT])[0]
    (example,) = encode([entry], tok)
    assert tok.decode(example.ids) == "".join(pieces(instructions.messages(entry)))
    _, masked = collate_instructions([example], mask_prompt=True)
    learned = [t for t in masked[0].tolist() if t != X]
    assert learned == tok.encode_ordinary("Blue.") + tok.encode_ordinary("Green.") + [EOT_ID]
    _, unmasked = collate_instructions([example], mask_prompt=False)
    assert [t for t in unmasked[0].tolist() if t != X] == [*example.ids[1:], EOT_ID]
    # the prompt of the answer is the training prefix, tokenized the same way
    prompt = prompt_ids(instructions.messages(entry)[:-1], tok)
    assert example.ids[: len(prompt)] == prompt and example.ids[len(prompt) :] == tok.encode_ordinary("Green.")


def test_jsonl_alpaca_with_extra_keys_and_chat_entries(tmp_path: Path) -> None:
    alpaca = {"instruction": "Name a colour.", "input": "", "output": "Red.", "id": 7, "source": "web"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [alpaca, CHAT, {**CHAT, "id": 3}])
    found = read_instruction_set(InstructionData(str(path)))
    assert [e.instruction for e in found.entries] == ["Name a colour.", "Grass colour?", "Grass colour?"]
    assert found.ignored_keys == {"id": 2, "source": 1} and not found.skipped
    assert "ignored keys {'id': 2, 'source': 1}" in found.report()
    assert found.counts() == {"ignored_keys": "id: 2, source: 1", "skipped_entries": 0}
    array = tmp_path / "array.json"
    array.write_text(json.dumps([alpaca, CHAT]), encoding="utf-8")
    assert read_instruction_set(InstructionData(str(array))).entries == found.entries[:2]
    with pytest.raises(LLMError, match=r"array\.json: line 1 must be an object"):
        read_instruction_set(InstructionData(str(array), format="jsonl"))


BAD_CHATS = [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0 must be an object with keys role and content"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: role 'bot' is not one of system"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0: expected role 'system' or 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1: expected role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}, "0: 'content' is empty"),
    ({"messages": [*CHAT["messages"][:3], {"role": "system", "content": "s"}]}, "message 3: expected role 'user'"),
    ({**CHAT, "instruction": "x"}, "mixes a chat entry's 'messages' with the Alpaca key 'instruction'"),
    ({"instruction": "x", "output": "y"}, "missing key 'input'"),
    ("[[[", "invalid JSON at column 4"),
    ([1], "must be an object"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CHATS)
def test_bad_jsonl_entries_name_file_and_line_or_are_skipped(tmp_path: Path, bad: Any, message: str) -> None:
    path = tmp_path / "set.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(f"{json.dumps(CHAT)}\n{bad_line}\n\n{json.dumps(CHAT)}\n", encoding="utf-8")
    with pytest.raises(LLMError, match=rf"set\.jsonl: line 2\b.*{message}"):
        read_instruction_set(InstructionData(str(path)))
    skipping = read_instruction_set(InstructionData(str(path), skip_bad_entries=True))
    assert len(skipping.entries) == 2 and len(skipping.skipped) == 1 and "skipped 1 bad entries" in skipping.report()


def test_bad_json_arrays_and_deep_nesting(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([CHAT, {"messages": "hi"}]), encoding="utf-8")
    with pytest.raises(LLMError, match=r"set\.json: entry 1: 'messages' must be a non-empty list"):
        read_instruction_set(InstructionData(str(path)))
    assert len(read_instruction_set(InstructionData(str(path), skip_bad_entries=True)).entries) == 1
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(LLMError, match=r"set\.json: JSON nested too deeply"):
        read_instruction_set(InstructionData(str(path)))
    write_jsonl(path, [{"messages": "x"}])
    with pytest.raises(LLMError, match=r"set\.json: no valid entry \(1 skipped\)"):
        read_instruction_set(InstructionData(str(path), format="jsonl", skip_bad_entries=True))


def test_fit_context_drops_the_oldest_exchanges_never_the_system_prompt(mirror: Path) -> None:
    tok = get_tokenizer()
    system, turns = Message("system", "Be brief."), [Message("user", "A?"), Message("assistant", "B."),
                                                      Message("user", "C?"), Message("assistant", "D."),
                                                      Message("user", "E?")]  # fmt: skip
    whole = [system, *turns]
    assert fit_context(whole, tok, len(prompt_ids(whole, tok))) == whole
    shorter = [system, *turns[2:]]
    assert fit_context(whole, tok, len(prompt_ids(whole, tok)) - 1) == shorter
    assert fit_context(whole, tok, len(prompt_ids(shorter, tok)) - 1) == [system, turns[-1]]
    with pytest.raises(LLMError, match="prompt tokens; at most 3 fit in the context"):
        fit_context(whole, tok, 3)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_model(GPT(get_preset("cpu-tiny", context_length=64)), tmp_path / "model")
    return tmp_path / "model"


def test_instruct_chat_keeps_the_conversation_and_trims_it(
    tiny_model: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[Instruction, str]] = []
    real = instructions.respond

    def respond(model: GPT, entries: list[Instruction], *args: Any, **kwargs: Any) -> list[str]:
        replies = real(model, entries, *args, **kwargs)
        asked.extend(zip(entries, replies, strict=True))
        return replies

    monkeypatch.setattr(instructions, "respond", respond)
    questions = ["Hi there", "And now a second, somewhat longer question?", "Third one", "Fourth"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n\nnot read after the empty line\n"))
    args = ["instruct", "--chat", "--model", str(tiny_model), "--system", "Be brief.", "--max-new-tokens", "20"]
    assert cli_main([*args, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert [entry.instruction for entry, _ in asked] == questions and all(reply in out for _, reply in asked)
    # every prompt is the conversation so far, its oldest exchanges dropped to leave 20 of the 64 tokens for the reply
    tok, system, conversation = get_tokenizer(), Message("system", "Be brief."), [Message("system", "Be brief.")]
    for question, (entry, reply) in zip(questions, asked, strict=True):
        expected = fit_context([*conversation, Message("user", question)], tok, 64 - 20)
        assert instructions.messages(entry)[:-1] == expected and expected[0] == system
        conversation = [*expected, Message("assistant", reply)]
    assert "dropped the oldest 2 messages to fit the context" in err
    assert cli_main(["instruct", "--system", "x", "Hi"]) == 1
    assert "give an INSTRUCTION, or --chat" in capsys.readouterr().err


def test_stage_tunes_on_a_chat_jsonl_file(tmp_path: Path, mirror: Path, tiny_model: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    tiny_model.rename(repo / "models/base")
    rows = [
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Add {i} and 1."},
                      {"role": "assistant", "content": f"{i + 1}."}, {"role": "user", "content": "Double it."},
                      {"role": "assistant", "content": f"{2 * i + 2}."}], "id": i}
        for i in range(24)
    ]  # fmt: skip
    (repo / "data").mkdir()
    write_jsonl(repo / "data/chat.jsonl", rows)
    section = {
        "data": {"path": "data/chat.jsonl"},
        "train": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "sample_every": 2,
                  "checkpoint_every": 2, "precision": "fp32"},
        "generation": {"max_new_tokens": 4},
    }  # fmt: skip
    (repo / "params.yaml").write_text(yaml.safe_dump({"finetune_instructions": section}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_MLFLOW": "off", "LLM_DATA_MIRROR": str(mirror)}
    cmd = [sys.executable, "-m", "stages.finetune_instructions"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data/chat.jsonl: ignored keys {'id': 24}" in done.stdout
    metrics = json.loads((repo / "metrics/finetune_instructions.json").read_text())
    assert metrics["steps"] == 4 and metrics["best_val_loss"] > 0
    responses = json.loads((repo / "reports/responses.json").read_text())
    assert len(responses) == 2 and all(r["instruction"] == "Double it." for r in responses)
    assert (repo / "models/instruct/config.json").is_file()
