import json
from pathlib import Path

import pytest
import torch

from llm.config import get_preset
from llm.data.instructions import (
    Instruction,
    InstructionData,
    InstructionExample,
    collate_instructions,
    encode,
    format_prompt,
    load_instructions,
    parse_entries,
    read_instruction_set,
    respond,
    split_entries,
    trainable,
)
from llm.errors import LLMError
from llm.generate import GenerationConfig, generate
from llm.model import GPT
from llm.tokenizer import EOT_ID, get_tokenizer

E, X = EOT_ID, -100
BATCH = [InstructionExample([1, 2, 3, 4, 5], 3), InstructionExample([6, 7], 1), InstructionExample([8, 9, 10], 2)]


def test_collate_pads_shifts_and_keeps_the_first_end_of_text() -> None:
    inputs, targets = collate_instructions(BATCH)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, E, E, E], [8, 9, 10, E, E]]
    assert targets.tolist() == [[2, 3, 4, 5, E], [7, E, X, X, X], [9, 10, E, X, X]]


def test_collate_masks_the_prompt_targets() -> None:
    inputs, targets = collate_instructions(BATCH, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, E, E, E], [8, 9, 10, E, E]]
    # row 0: tokens 1..3 are prompt, so the targets 2 and 3 (predicting prompt tokens) are ignored
    assert targets.tolist() == [[X, X, 4, 5, E], [7, E, X, X, X], [X, 10, E, X, X]]


def test_collate_truncates_to_allowed_max_length() -> None:
    inputs, targets = collate_instructions(BATCH, mask_prompt=True, allowed_max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [6, 7, E], [8, 9, 10]]
    assert targets.tolist() == [[X, X, 4], [7, E, X], [X, 10, E]]


def test_trainable_drops_examples_whose_prompt_fills_the_window() -> None:
    # prompt lengths 3, 1, 2: at max_length 2 the first example's targets would all be ignored
    assert trainable(BATCH, 2, mask_prompt=True) == BATCH[1:]
    _, targets = collate_instructions(BATCH[1:], mask_prompt=True, allowed_max_length=2)
    assert bool(((targets != X).sum(dim=1) > 0).all())
    assert trainable(BATCH, 3, mask_prompt=True) == BATCH
    assert trainable(BATCH, 1, mask_prompt=False) == BATCH  # unmasked, every example keeps a target
    _, all_ignored = collate_instructions(BATCH[:1], mask_prompt=True, allowed_max_length=2)
    assert bool((all_ignored == X).all())  # what trainable() prevents
    with pytest.raises(LLMError, match="max_length must be positive"):
        trainable(BATCH, 0, mask_prompt=True)


def test_loss_on_collated_batch_counts_only_unmasked_targets() -> None:
    _, full = collate_instructions(BATCH)
    _, masked = collate_instructions(BATCH, mask_prompt=True)
    assert int((full != X).sum()) == 5 + 2 + 3 and int((masked != X).sum()) == 3 + 2 + 2


def test_alpaca_prompt_format() -> None:
    with_input = format_prompt(Instruction("Translate to French.", "Hello", "Bonjour"))
    assert with_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate to French.\n\n### Input:\nHello\n\n### Response:\n"
    )
    assert "### Input:" not in format_prompt(Instruction("Name a colour.", "", "Blue"))


def test_encode_is_prompt_then_output(mirror: Path) -> None:
    tok = get_tokenizer()
    entry = Instruction("Say <|endoftext|> literally.", "", "<|endoftext|>")
    (ex,) = encode([entry], tok)
    assert tok.decode(ex.ids) == format_prompt(entry) + entry.output
    assert tok.decode(ex.ids[: ex.prompt_len]) == format_prompt(entry)
    assert EOT_ID not in ex.ids  # special-token text in the data is ordinary text


def test_real_data_loads_and_splits_85_10_5(mirror: Path) -> None:
    entries = load_instructions(mirror / "instruction-data.json")
    assert len(entries) == 1100 and sum(bool(e.input) for e in entries) == 325
    splits = split_entries(entries, seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "test": 110, "val": 55}
    assert sorted(id(e) for split in splits.values() for e in split) == sorted(map(id, entries))  # a partition
    assert split_entries(entries, seed=123) == splits and split_entries(entries, seed=7) != splits


def good(**changes: object) -> dict[str, object]:
    return {"instruction": "Do it.", "input": "", "output": "Done.", **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"instruction": "x"}, "expected a JSON list"),
        ([], "empty"),
        ([good(), "text"], "entry 1 must be an object"),
        ([good(), good(), {"instruction": "x", "output": "y"}], "entry 2: missing key 'input'"),
        ([good(), {"messages": [{"role": "user", "content": "Hi"}]}], "entry 1: the last message must be the assis"),
        ([good(), good(input=3)], "entry 1: 'input' must be a string"),
        ([good(instruction="  ")], "entry 0: 'instruction' is empty"),
        ([good(), good(output="")], "entry 1: 'output' is empty"),
    ],
)
def test_invalid_entries_name_the_index(data: object, message: str) -> None:
    with pytest.raises(LLMError, match=message):
        parse_entries(data)


def test_extra_keys_are_ignored_and_counted(tmp_path: Path) -> None:
    assert parse_entries([good(extra="z", id=1), good(id=2)]) == parse_entries([good(), good()])
    path = tmp_path / "set.json"
    path.write_text(json.dumps([good(extra="z", id=1), good(id=2)]), encoding="utf-8")
    found = read_instruction_set(InstructionData(str(path)))
    assert len(found.entries) == 2 and found.ignored_keys == {"id": 2, "extra": 1}


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps([good(), good()])[:-7], encoding="utf-8")
    with pytest.raises(LLMError, match=r"truncated.json: invalid JSON at line 1"):
        load_instructions(truncated)
    with pytest.raises(LLMError, match="not found"):
        load_instructions(tmp_path / "missing.json")
    with pytest.raises(LLMError, match="too few"):
        split_entries(parse_entries([good()] * 5), seed=0)


def test_respond_batches_in_any_order_give_the_same_responses(mirror: Path) -> None:
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny"))
    entries = [Instruction("Name a colour" + "!" * i, "ctx" * (i % 3), "Blue") for i in range(7)]
    config = GenerationConfig(max_new_tokens=6, temperature=0.0)
    one_by_one = respond(model, entries, get_tokenizer(), config, batch_size=1, progress=False)
    batched = respond(model, entries, get_tokenizer(), config, batch_size=4, progress=False)
    assert batched == one_by_one and len(batched) == 7
    (expected,) = generate(model, [get_tokenizer().encode_ordinary(format_prompt(entries[5]))], config, eos_id=EOT_ID)
    assert batched[5] == get_tokenizer().decode(expected).split("###")[0].strip()
