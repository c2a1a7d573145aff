import pytest
import torch

from llm.config import get_preset
from llm.errors import LLMError
from llm.model import GPT


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", vocab_size=97, context_length=32)).eval()


def test_logits_shape_and_loss(model: GPT) -> None:
    x = torch.randint(0, 97, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, 97)
    y = torch.randint(0, 97, (3, 11))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), y.reshape(-1))
    torch.testing.assert_close(model(x, y), expected)
    y[:, :5] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), y[:, 5:].reshape(-1))
    torch.testing.assert_close(model(x, y), expected)


def test_causality(model: GPT) -> None:
    x = torch.randint(0, 97, (1, 12))
    changed = x.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :8], model(changed)[:, :8])


def test_cache_in_chunks_equals_full_forward(model: GPT) -> None:
    x = torch.randint(0, 97, (2, 20))
    cache = model.new_cache(2)
    pieces = [model(x[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 13), (13, 20)]]
    torch.testing.assert_close(torch.cat(pieces, 1), model(x), atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_left_padding_matches_unpadded_row(model: GPT) -> None:
    x = torch.randint(0, 97, (2, 10))
    pad_mask = torch.ones(2, 10, dtype=torch.bool)
    pad_mask[1, :4] = False
    padded = x.clone()
    padded[1, :4] = 0
    out = model(padded, pad_mask=pad_mask)
    torch.testing.assert_close(out[1, 4:], model(x[1:, 4:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], model(x[:1])[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    cache = model.new_cache(2)
    stepwise = torch.cat(
        [model(padded[:, :6], cache=cache, pad_mask=pad_mask[:, :6])]
        + [model(padded[:, i : i + 1], cache=cache) for i in range(6, 10)],
        1,
    )
    torch.testing.assert_close(stepwise[1, 4:], out[1, 4:], atol=1e-5, rtol=1e-5)


def test_rewound_cache_recomputes_the_forgotten_positions(model: GPT) -> None:
    x = torch.randint(0, 97, (2, 9))
    pad_mask = torch.ones(2, 6, dtype=torch.bool)
    pad_mask[1, :2] = False
    cache = model.new_cache(2)
    model(x[:, :6], cache=cache, pad_mask=pad_mask)
    first = model(x[:, 6:8], cache=cache)
    model(x[:, 8:], cache=cache)
    cache.rewind(6)
    assert (cache.length, cache.n_real.tolist(), cache.has_padding) == (6, [6, 4], True)
    torch.testing.assert_close(model(x[:, 6:8], cache=cache), first)
    cache.rewind(0)
    assert (cache.length, cache.n_real.tolist(), cache.has_padding) == (0, [0, 0], False)


def test_context_overflow_is_a_clear_error(model: GPT) -> None:
    with pytest.raises(LLMError, match="exceeds the model's context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(LLMError, match="KV cache holds 8 positions"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_tied_head_shares_storage() -> None:
    tied = GPT(get_preset("cpu-tiny"))
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPT(get_preset("cpu-tiny").replace(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_dropout_only_in_training() -> None:
    torch.manual_seed(1)
    model = GPT(get_preset("cpu-tiny", vocab_size=97, dropout=0.5))
    x = torch.randint(0, 97, (1, 9))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
