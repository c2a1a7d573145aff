from dataclasses import dataclass

import pytest

from llm.config import GPTConfig, from_mapping, get_preset, list_presets
from llm.errors import LLMError
from llm.model import GPT

PUBLISHED_PARAMS = {  # distinct parameters of OpenAI's GPT-2 checkpoints (tied head counted once)
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(name: str) -> None:
    with __import__("torch").device("meta"):
        model = GPT(get_preset(name))
    assert model.num_parameters() == PUBLISHED_PARAMS[name]


def test_large_presets_shapes() -> None:
    assert get_preset("gpt2-large").emb_dim == 1280 and get_preset("gpt2-large").n_layers == 36
    assert get_preset("gpt2-xl").n_heads == 25 and get_preset("gpt2-xl").emb_dim == 1600


def test_untied_head_adds_one_embedding_matrix() -> None:
    cfg = get_preset("cpu-tiny")
    tied, untied = GPT(cfg), GPT(cfg.replace(tie_weights=False))
    assert untied.num_parameters() - tied.num_parameters() == cfg.vocab_size * cfg.emb_dim


def test_unknown_preset_names_valid_ones() -> None:
    with pytest.raises(LLMError, match=r"unknown model preset 'gpt3'.*valid: gpt2"):
        get_preset("gpt3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"emb_dim": 100, "n_heads": 3}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"context_length": 3.5}, "context_length must be a positive integer"),
    ],
)
def test_invalid_config_is_rejected(changes: dict, message: str) -> None:
    with pytest.raises(LLMError, match=message):
        GPTConfig(**changes)


def test_config_dict_round_trip_and_typos() -> None:
    cfg = get_preset("cpu-small", dropout=0.1)
    assert from_mapping(GPTConfig, cfg.to_dict(), where="model config") == cfg
    with pytest.raises(LLMError, match=r"unknown key 'n_head' \(did you mean 'n_heads'\?\).*valid keys"):
        from_mapping(GPTConfig, {**cfg.to_dict(), "n_head": 4}, where="model config")
    with pytest.raises(LLMError, match="emb_dim: expected an integer"):
        from_mapping(GPTConfig, {"emb_dim": "256"}, where="model config")


def test_from_mapping_nested_and_literal() -> None:
    from typing import Literal

    @dataclass
    class Inner:
        lr: float = 1e-3

    @dataclass
    class Outer:
        inner: Inner
        mode: Literal["a", "b"] = "a"
        size: int | None = None

    built = from_mapping(Outer, {"inner": {"lr": 1}, "mode": "b"}, where="params")
    assert built.inner.lr == 1.0 and isinstance(built.inner.lr, float) and built.mode == "b"
    with pytest.raises(LLMError, match=r"params.mode: 'c' is not one of 'a', 'b'"):
        from_mapping(Outer, {"inner": {}, "mode": "c"}, where="params")
    with pytest.raises(LLMError, match=r"params.inner.lr: expected a number"):
        from_mapping(Outer, {"inner": {"lr": "fast"}}, where="params")


def test_from_mapping_partial_nested_section_keeps_the_fields_own_default() -> None:
    from dataclasses import field

    @dataclass(frozen=True)
    class Sampling:
        tokens: int = 10
        temperature: float = 1.0

    @dataclass(frozen=True)
    class Section:
        sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0))

    built = from_mapping(Section, {"sampling": {"tokens": 4}}, where="params.yaml:stage")
    assert built.sampling == Sampling(tokens=4, temperature=0.0)  # not the class default 1.0
    assert from_mapping(Section, {}, where="params.yaml:stage").sampling.temperature == 0.0


def test_from_mapping_value_errors_name_where() -> None:
    with pytest.raises(LLMError, match=r"^params\.yaml:model: .*n_heads"):
        from_mapping(GPTConfig, {"emb_dim": 30, "n_heads": 4}, where="params.yaml:model")


def test_presets_listed() -> None:
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "cpu-small", "cpu-tiny"} <= set(list_presets())
