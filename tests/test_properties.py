"""Property-based tests (hypothesis) for the parsers, the collates and the window sampler.

Parsers: text decoding and Gutenberg stripping, the SMS spam TSV, instruction entries, judge scores and the
params schema. Collates: instruction (inputs/targets with masking) and classification (right padding).
Windows: the window count, TokenWindows over a token file, batch_indices (epochs, ranks, resume) and the
train/val split writer.
"""

from __future__ import annotations

import codecs
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.config import GPTConfig, from_mapping
from llm.data import classification, instructions
from llm.data.corpus import SCHEMA, TOKENIZER_KEY
from llm.data.text import decode_text, strip_gutenberg
from llm.data.windows import TokenWindows, batch_indices, count_windows, write_splits
from llm.errors import LLMError
from llm.evaluation import parse_score
from llm.tokenizer import EOT_ID, tokenizer_fingerprint

BOM = codecs.BOM_UTF8
LABELS = ("ham", "spam")
relaxed = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# -- text decoding ---------------------------------------------------------------------------------------------


@relaxed
@given(st.text(), st.booleans())
def test_decoding_utf8_text_round_trips_with_normalised_line_ends(text: str, bom: bool) -> None:
    data = (BOM if bom else b"") + text.encode("utf-8")
    decoded = decode_text(data, "doc.txt")
    expected = text if bom else text.removeprefix("\ufeff")  # exactly one leading BOM is dropped
    assert decoded == expected.replace("\r\n", "\n")


@relaxed
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_is_text_or_an_error_at_the_first_bad_byte(data: bytes) -> None:
    body = data.removeprefix(BOM)
    try:
        expected = body.decode("utf-8")
    except UnicodeDecodeError as err:
        with pytest.raises(
            LLMError, match=rf"^blob\.bin: invalid UTF-8 at byte offset {len(data) - len(body) + err.start} "
        ):
            decode_text(data, "blob.bin")
    else:
        assert decode_text(data, "blob.bin") == expected.replace("\r\n", "\n")
    replaced = decode_text(data, "blob.bin", allow_replacement=True)  # never raises
    assert replaced == body.decode("utf-8", errors="replace").replace("\r\n", "\n")


MARKER_FREE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="*"), max_size=300)


@relaxed
@given(MARKER_FREE)
def test_text_without_gutenberg_markers_is_not_stripped(text: str) -> None:
    assert strip_gutenberg(text) == text


@relaxed
@given(MARKER_FREE.filter(lambda t: "END OF" not in t.upper() and "ETEXT" not in t.upper()), st.booleans())
def test_gutenberg_header_and_footer_are_cut_exactly(body: str, footer: bool) -> None:
    header = "The Project Gutenberg eBook of X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
    tail = "\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence text\n" if footer else ""
    assert strip_gutenberg(header + body + tail) == (body + "\n" if footer else body).strip("\n")


# -- SMS spam TSV ------------------------------------------------------------------------------------------------

SMS_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), min_size=1, max_size=40
).filter(str.strip)
ROWS = st.lists(st.tuples(st.sampled_from(LABELS), SMS_TEXT), min_size=1, max_size=12)


def write_tsv(rows: list[str], crlf: bool, final_newline: bool) -> Path:
    end = "\r\n" if crlf else "\n"
    path = Path(tempfile.mkdtemp()) / "sms.tsv"
    path.write_bytes((end.join(rows) + (end if final_newline else "")).encode("utf-8"))
    return path


@relaxed
@given(ROWS, st.booleans(), st.booleans())
def test_spam_rows_round_trip_with_lf_or_crlf(rows: list[tuple[str, str]], crlf: bool, final_newline: bool) -> None:
    path = write_tsv([f"{label}\t{text}" for label, text in rows], crlf, final_newline)
    parsed = classification.read_labeled_tsv(path, LABELS)
    assert parsed.skipped == []
    assert parsed.examples == [
        classification.ClassificationExample(text, LABELS.index(label), i + 1) for i, (label, text) in enumerate(rows)
    ]


BAD_ROWS = {
    "third column": ("ham\tone\ttwo", r"expected 2 tab-separated fields \(label, text\), found 3"),
    "no tab": ("ham only", r"expected 2 tab-separated fields \(label, text\), found 1"),
    "unknown label": ("eggs\thello", r"unknown label 'eggs'; expected one of ham, spam"),
    "empty text": ("spam\t  ", r"empty text"),
}


@relaxed
@given(ROWS, st.data(), st.sampled_from(sorted(BAD_ROWS)), st.booleans())
def test_a_bad_spam_row_is_named_by_line_or_skipped(
    rows: list[tuple[str, str]], data: st.DataObject, kind: str, crlf: bool
) -> None:
    lines = [f"{label}\t{text}" for label, text in rows]
    at = data.draw(st.integers(0, len(lines)))
    bad, reason = BAD_ROWS[kind]
    path = write_tsv([*lines[:at], bad, *lines[at:]], crlf, True)
    with pytest.raises(LLMError, match=rf"sms\.tsv line {at + 1}: {reason}"):
        classification.read_labeled_tsv(path, LABELS)
    parsed = classification.read_labeled_tsv(path, LABELS, skip_bad_rows=True)
    assert len(parsed.skipped) == 1 and re.fullmatch(rf"line {at + 1}: {reason}.*", parsed.skipped[0])
    assert [(LABELS[e.label], e.text) for e in parsed.examples] == rows


# -- instruction entries ------------------------------------------------------------------------------------------

NONEMPTY = st.text(max_size=30).filter(str.strip)
ENTRY = st.fixed_dictionaries({"instruction": NONEMPTY, "input": st.text(max_size=30), "output": NONEMPTY})


@relaxed
@given(st.lists(ENTRY, min_size=1, max_size=8))
def test_valid_instruction_entries_parse_to_the_same_values(entries: list[dict[str, str]]) -> None:
    parsed = instructions.parse_entries(entries, "data.json")
    assert [(e.instruction, e.input, e.output) for e in parsed] == [
        tuple(d[k] for k in instructions.KEYS) for d in entries
    ]
    for entry in parsed:
        prompt = instructions.format_prompt(entry)
        assert prompt.endswith(instructions.RESPONSE_HEADER) and f"### Instruction:\n{entry.instruction}" in prompt
        assert ("### Input:" in prompt) == bool(entry.input) or "### Input:" in entry.instruction


CORRUPTIONS = {
    "drop instruction": (lambda e: {k: v for k, v in e.items() if k != "instruction"}, r"missing key 'instruction'"),
    "drop output": (lambda e: {k: v for k, v in e.items() if k != "output"}, r"missing key 'output'"),
    "chat key beside Alpaca keys": (lambda e: {**e, "messages": []}, r"mixes a chat entry's 'messages'"),
    "int input": (lambda e: {**e, "input": 7}, r"'input' must be a string, got int"),
    "null output": (lambda e: {**e, "output": None}, r"'output' must be a string, got NoneType"),
    "blank instruction": (lambda e: {**e, "instruction": " \n"}, r"'instruction' is empty"),
    "empty output": (lambda e: {**e, "output": ""}, r"'output' is empty"),
    "not an object": (
        lambda e: [e["instruction"]],
        r"must be an object with keys instruction, input, output, got list",
    ),
}


@relaxed
@given(st.lists(ENTRY, min_size=1, max_size=8), st.data(), st.sampled_from(sorted(CORRUPTIONS)))
def test_a_corrupt_instruction_entry_is_named_by_index(
    entries: list[dict[str, str]], data: st.DataObject, kind: str
) -> None:
    at = data.draw(st.integers(0, len(entries) - 1))
    corrupt, reason = CORRUPTIONS[kind]
    entries = [*entries[:at], corrupt(entries[at]), *entries[at + 1 :]]
    with pytest.raises(LLMError, match=rf"^data\.json: entry {at}:? .*{reason}"):
        instructions.parse_entries(entries, "data.json")


@relaxed
@given(st.one_of(st.none(), st.integers(), st.text(), st.dictionaries(st.text(), st.integers()), st.just([])))
def test_instruction_data_that_is_not_a_nonempty_list_is_refused(data: object) -> None:
    with pytest.raises(
        LLMError, match=r"^data\.json: (expected a JSON list of entries, got \w+|the list of entries is empty)"
    ):
        instructions.parse_entries(data, "data.json")


# -- judge replies and the params schema --------------------------------------------------------------------------


@relaxed
@given(st.integers(-50, 150), st.sampled_from(["{}", " {} ", "{}/100", "{}.", "{} / 100", "{}.0"]))
def test_judge_scores_parse_only_in_range(score: int, form: str) -> None:
    assert parse_score(form.format(score)) == (float(score) if 0 <= score <= 100 else None)


@relaxed
@given(st.text(max_size=40))
def test_judge_reply_parsing_never_raises(reply: str) -> None:
    score = parse_score(reply)
    assert score is None or 0 <= score <= 100


@dataclass(frozen=True)
class Section:
    size: int = 1
    rate: float = 0.5
    name: str = "x"


@relaxed
@given(st.text(min_size=1, max_size=12).filter(lambda k: k not in ("size", "rate", "name")))
def test_an_unknown_params_key_is_named_with_the_valid_keys(key: str) -> None:
    with pytest.raises(LLMError) as err:
        from_mapping(Section, {key: 1}, where="params.yaml:demo")
    assert str(err.value).startswith(f"params.yaml:demo: unknown key {key!r}")
    assert str(err.value).endswith("valid keys: size, rate, name")


@relaxed
@given(
    st.sampled_from(["size", "rate", "name"]), st.one_of(st.booleans(), st.text(max_size=5), st.lists(st.integers()))
)
def test_a_wrongly_typed_params_value_is_named(key: str, value: object) -> None:
    if key == "name" and isinstance(value, str):
        return
    with pytest.raises(LLMError, match=rf"^params\.yaml:demo\.{key}: expected "):
        from_mapping(Section, {key: value}, where="params.yaml:demo")


@relaxed
@given(st.sampled_from(["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"]), st.integers(-3, 0))
def test_nonpositive_model_sizes_are_refused(key: str, value: int) -> None:
    with pytest.raises(LLMError, match=rf"GPTConfig\.{key} must be a positive integer, got {value}"):
        GPTConfig(**{key: value})


# -- collates ----------------------------------------------------------------------------------------------------

TOKENS = st.lists(st.integers(0, EOT_ID), min_size=1, max_size=20)


@st.composite
def instruction_examples(draw: st.DrawFn) -> instructions.InstructionExample:
    ids = draw(TOKENS)
    return instructions.InstructionExample(ids, draw(st.integers(1, len(ids))))


@relaxed
@given(
    st.lists(instruction_examples(), min_size=1, max_size=6), st.booleans(), st.one_of(st.none(), st.integers(1, 25))
)
def test_instruction_collate_shifts_pads_and_masks(
    batch: list[instructions.InstructionExample], mask_prompt: bool, limit: int | None
) -> None:
    inputs, targets = instructions.collate_instructions(batch, mask_prompt=mask_prompt, allowed_max_length=limit)
    longest = max(len(ex.ids) for ex in batch)
    width = longest if limit is None else min(longest, limit)
    assert inputs.shape == targets.shape == (len(batch), width) and inputs.dtype == targets.dtype == torch.long
    for row, (ids, prompt_len, _) in enumerate(batch):  # no later prompts: one exchange
        n = len(ids)
        full_in = [*ids, *[EOT_ID] * (longest - n)]
        full_tgt = [*ids[1:], EOT_ID, *[-100] * (longest - n)]  # the appended end-of-text is learned
        if mask_prompt:
            full_tgt[: prompt_len - 1] = [-100] * (prompt_len - 1)
        assert inputs[row].tolist() == full_in[:width]
        assert targets[row].tolist() == full_tgt[:width]


@relaxed
@given(st.lists(st.tuples(TOKENS, st.integers(0, 1)), min_size=1, max_size=6))
def test_classification_collate_right_pads_and_keeps_the_last_real_token(items: list[tuple[list[int], int]]) -> None:
    batch = classification.collate_classification(items)
    longest = max(len(ids) for ids, _ in items)
    assert batch.ids.shape == (len(items), longest)
    assert batch.lengths.tolist() == [len(ids) for ids, _ in items]
    assert batch.labels.tolist() == [label for _, label in items]
    assert batch.pad_mask.sum(1).tolist() == batch.lengths.tolist()
    for row, (ids, _) in enumerate(items):
        assert batch.ids[row].tolist() == ids + [EOT_ID] * (longest - len(ids))
        assert batch.ids[row, batch.lengths[row] - 1].item() == ids[-1]


# -- windows and the sampler ---------------------------------------------------------------------------------------


@relaxed
@given(st.integers(0, 500), st.integers(1, 60), st.integers(1, 60))
def test_window_count_is_the_number_of_windows_that_fit(n_tokens: int, context: int, stride: int) -> None:
    fitting = sum(1 for i in range(n_tokens + 1) if i * stride + context + 1 <= n_tokens)
    assert count_windows(n_tokens, context, stride) == fitting


@relaxed
@given(st.data(), st.integers(1, 16), st.one_of(st.none(), st.integers(1, 16)))
def test_token_windows_are_the_slices_of_the_stream(data: st.DataObject, context: int, stride: int | None) -> None:
    tokens = np.array(data.draw(st.lists(st.integers(0, 65535), min_size=context + 1, max_size=120)), np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        tokens.tofile(path)
        ds = TokenWindows(path, context, stride)
        step = stride or context
        assert len(ds) == count_windows(len(tokens), context, step) > 0
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.tolist() == tokens[i * step : i * step + context].tolist()
            assert y.tolist() == tokens[i * step + 1 : i * step + context + 1].tolist()
        idx = data.draw(st.lists(st.integers(0, len(ds) - 1), max_size=5))
        xs, ys = ds.batch(idx)
        assert xs.shape == ys.shape == (len(idx), context)
        for row, i in enumerate(idx):
            assert torch.equal(xs[row], ds[i][0]) and torch.equal(ys[row], ds[i][1])
        del ds


@relaxed
@given(st.integers(1, 50), st.integers(1, 9), st.integers(0, 2**31), st.booleans())
def test_an_epoch_visits_every_window_once(n_windows: int, batch_size: int, seed: int, shuffle: bool) -> None:
    steps = -(-n_windows // batch_size)
    stream = np.concatenate(
        [batch_indices(n_windows, batch_size, s, seed=seed, shuffle=shuffle) for s in range(steps)]
    )[:n_windows]
    assert sorted(stream.tolist()) == list(range(n_windows))
    if not shuffle:
        assert stream.tolist() == list(range(n_windows))


@relaxed
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 4), st.integers(0, 30), st.integers(0, 2**31))
def test_ranks_split_the_global_batch_and_a_step_is_a_pure_function(
    n_windows: int, batch_size: int, world: int, step: int, seed: int
) -> None:
    global_batch = batch_indices(n_windows, batch_size * world, step, seed=seed)
    shards = [batch_indices(n_windows, batch_size, step, seed=seed, rank=r, world_size=world) for r in range(world)]
    assert np.concatenate(shards).tolist() == global_batch.tolist()
    assert all(
        s.dtype == np.int64 and s.shape == (batch_size,) and s.min() >= 0 and s.max() < n_windows for s in shards
    )
    assert batch_indices(n_windows, batch_size * world, step, seed=seed).tolist() == global_batch.tolist()  # resume


@relaxed
@given(st.sampled_from([0, -1]), st.sampled_from(["n_windows", "batch_size", "world_size"]))
def test_nonpositive_sampler_sizes_are_refused(value: int, name: str) -> None:
    sizes = {"n_windows": 10, "batch_size": 2, "world_size": 1} | {name: value}
    with pytest.raises(LLMError, match=rf"{name} must be a positive integer, got {value}"):
        batch_indices(sizes["n_windows"], sizes["batch_size"], 0, seed=0, world_size=sizes["world_size"])


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=6),
    st.integers(8, 64),
    st.sampled_from([0.2, 0.3, 0.5]),
    st.integers(0, 1000),
)
def test_the_split_writer_keeps_every_token_once(
    doc_lengths: list[int], chunk: int, val_fraction: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, EOT_ID, n, dtype=np.uint16) for n in doc_lengths]  # no EOT inside documents
    n_chunks = sum(-(-n // chunk) for n in doc_lengths)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        table = pa.table(
            {
                "doc_id": pa.array(range(len(docs)), pa.int64()),
                "source": [f"d{i}.txt" for i in range(len(docs))],
                "n_tokens": pa.array(doc_lengths, pa.int32()),
                "tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint16())),
            },
            schema=SCHEMA.with_metadata({TOKENIZER_KEY: tokenizer_fingerprint().encode()}),
        )
        pq.write_table(table, corpus, row_group_size=2)
        try:
            meta = write_splits(
                corpus, tmp, val_fraction=val_fraction, chunk_tokens=chunk, seed=seed, context_length=2, progress=False
            )
        except LLMError as err:  # too few chunks or tokens for two non-empty splits: refused before writing
            assert not 0 < round(val_fraction * n_chunks) < n_chunks or "does not fit" in str(err)
            assert not (Path(tmp) / "train.bin").exists() and not (Path(tmp) / "val.bin").exists()
            return
        splits = {name: np.fromfile(Path(tmp) / f"{name}.bin", np.uint16) for name in ("train", "val")}
    for name, stream in splits.items():
        assert meta["n_tokens"][name] == len(stream) and meta["n_windows"][name] == count_windows(len(stream), 2, 2)
    kept = np.concatenate([s[s != EOT_ID] for s in splits.values()])
    assert sorted(kept.tolist()) == sorted(np.concatenate(docs).tolist())
    assert meta["n_chunks"]["train"] + meta["n_chunks"]["val"] == n_chunks
    assert meta["n_chunks"]["val"] == round(val_fraction * n_chunks)
