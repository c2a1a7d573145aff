import math

import pytest
import torch

import llm.generate
from llm.config import get_preset
from llm.errors import LLMError
from llm.generate import FINISHED, GenerationConfig, decode_stream, generate, sample, stream
from llm.model import GPT, KVCache
from llm.tokenizer import get_tokenizer

VOCAB, CONTEXT = 61, 16


@pytest.fixture(scope="module")
def model() -> GPT:
    """A tiny model with large weights, so next-token distributions are peaked and argmax margins clear."""
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny", vocab_size=VOCAB, context_length=CONTEXT))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3)
    return model.eval()


def recompute(model: GPT, prompt: list[int], steps: int, config: GenerationConfig) -> list[int]:
    """Reference decoding: a full forward pass over the last CONTEXT tokens for every new token."""
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-CONTEXT:]]))[:, -1]
        ids.append(int(sample(logits, config, generator)))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=5, top_p=0.9, seed=11)],
)
def test_kv_cache_gives_the_tokens_of_full_recomputation(model: GPT, settings: dict) -> None:
    config = GenerationConfig(max_new_tokens=30, **settings)  # 6 + 30 tokens: crosses the 16-token context
    prompt = [5, 17, 3, 44, 9, 60]
    expected = recompute(model, prompt, 30, config)
    assert generate(model, [prompt], config, use_cache=True) == [expected]
    assert generate(model, [prompt], config, use_cache=False) == [expected]
    long_prompt = list(range(40))  # longer than the context from the start: cropped
    assert generate(model, [long_prompt], config) == [recompute(model, long_prompt, 30, config)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model: GPT, use_cache: bool) -> None:
    prompts = [[1, 2, 3], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [30, 31, 32, 33, 34]]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0, use_cache=use_cache)
    single = [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert batched == single
    assert [recompute(model, p, 12, GenerationConfig(temperature=0)) for p in prompts] == single
    assert len({tuple(s) for s in single}) > 1  # the prompts really lead to different continuations


def test_compiled_decoding_gives_the_eager_tokens(model: GPT) -> None:
    """Through inductor (fused single-row dot products, eager cache writes); 11 + 12 tokens cross the context, after
    which the cropped window is recomputed eagerly."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=10, seed=5)
    for prompts in ([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]], [[1, 2, 3], [7], [30, 31, 32, 33, 34]]):
        assert generate(model, prompts, config, compile=True) == generate(model, prompts, config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_decoding_goes_on_in_eager_mode_when_compilation_fails(
    model: GPT, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(model: GPT, idx: torch.Tensor, pad_mask: None, cache: KVCache) -> None:
        model.hidden_states(idx, cache=cache)  # fails after the cache recorded the token
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(llm.generate, "_compiled_next_logits", lambda: broken)
    prompts = [[1, 2, 3], [7]]
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    assert generate(model, prompts, config, compile=True) == generate(model, prompts, config)
    warning = "warning: torch.compile failed (RuntimeError: inductor: no C++ compiler); decoding in eager mode\n"
    assert capsys.readouterr().err == warning  # once: eager from then on


def test_eos_stops_each_row(model: GPT) -> None:
    prompts = [[1, 2, 3], [40, 41]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0)
    eos = free[0][3]
    cut = [row[: row.index(eos)] if eos in row else row for row in free]
    assert generate(model, prompts, max_new_tokens=10, temperature=0, eos_id=eos) == cut
    steps = list(stream(model, prompts[:1], max_new_tokens=10, temperature=0, eos_id=eos))
    assert len(steps) == free[0].index(eos) + 1 and int(steps[-1][0]) == FINISHED  # stops early, EOS hidden
    if eos not in free[1]:  # the other row keeps going after the first finished
        both = list(stream(model, prompts, max_new_tokens=10, temperature=0, eos_id=eos))
        assert len(both) == 10 and all(int(s[0]) == FINISHED for s in both[len(cut[0]) :])


def test_stream_is_incremental_and_seeded(model: GPT) -> None:
    it = stream(model, [[1, 2]], max_new_tokens=5, seed=7)
    first = next(it)
    assert first.shape == (1,) and first.dtype == torch.long
    rest = list(it)
    assert len(rest) == 4
    runs = [generate(model, [[1, 2]], max_new_tokens=20, temperature=2.0, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_restores_training_mode(model: GPT) -> None:
    model.train()
    generate(model, [[1]], max_new_tokens=2)
    assert model.training
    model.eval()


def support(logits: list[float], n: int = 4000, **settings: object) -> dict[int, float]:
    """Sampled token frequencies for one hand-built logits row."""
    config = GenerationConfig(seed=0, **settings)
    rows = torch.tensor(logits).expand(n, -1)
    tokens = sample(rows, config, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(logits))
    return {i: c / n for i, c in enumerate(counts.tolist()) if c}


def test_top_k_samples_only_the_k_most_likely() -> None:
    logits = [0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5]
    assert set(support(logits, top_k=3)) == {1, 3, 5}
    assert set(support(logits, top_k=1)) == {1}
    assert set(support(logits, top_k=100)) == set(range(7))


def test_top_p_samples_the_smallest_set_reaching_p() -> None:
    probs = [0.05, 0.3, 0.15, 0.5]  # sorted: 3 (0.5), 1 (0.3), 2 (0.15), 0 (0.05)
    logits = [math.log(p) for p in probs]
    assert set(support(logits, top_p=0.4)) == {3}
    freq = support(logits, top_p=0.75)
    assert set(freq) == {1, 3}
    assert freq[3] == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised over the kept set
    assert set(support(logits, top_p=0.9)) == {1, 2, 3}
    assert set(support(logits, top_p=1.0)) == {0, 1, 2, 3}
    assert set(support(logits, top_p=0.9, top_k=2)) == {1, 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_of_equal_maxima(dtype: torch.dtype) -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]], dtype=dtype)
    ties = torch.randint(0, 4, (64, 50257), generator=torch.Generator().manual_seed(0)).to(dtype)  # many ties
    for rows in (logits, ties):
        greedy = sample(rows, GenerationConfig(temperature=0))
        assert torch.equal(greedy, rows.argmax(dim=-1))
    assert sample(logits, GenerationConfig(temperature=0)).tolist() == [1, 0, 0]


def test_temperature() -> None:
    logits = [1.0, 2.0, 0.0]
    assert support(logits, temperature=0) == {1: 1.0}
    sharp, flat = support(logits, temperature=0.25), support(logits, temperature=4.0)
    assert sharp[1] > 0.95 and set(flat) == {0, 1, 2} and flat[1] < 0.5


def test_bad_settings_and_prompts(model: GPT) -> None:
    for bad, match in [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-2), "max_new_tokens must be >= 0"),
        (dict(top_kk=3), "unknown key 'top_kk'"),
    ]:
        with pytest.raises(LLMError, match=match):
            generate(model, [[1]], **bad)
    with pytest.raises(LLMError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(LLMError, match=r"outside the model's vocabulary \[0, 61\)"):
        generate(model, [[1, VOCAB]])


def test_decode_stream_holds_split_characters() -> None:
    tokenizer = get_tokenizer()
    text = "naïve café 😀 — 日本語 done"
    tokens = tokenizer.encode(text)
    pieces = list(decode_stream(tokens, tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(tokens)  # some tokens were only parts of a character
