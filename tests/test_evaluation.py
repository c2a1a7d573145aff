import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from llm.config import get_preset
from llm.errors import LLMError
from llm.evaluation import lcs_length, mean_loss, perplexity, rouge_l_f1, words
from llm.model import GPT


def brute_lcs(a: list[str], b: list[str]) -> int:
    for k in range(min(len(a), len(b)), 0, -1):
        subsequences = set(itertools.combinations(b, k))
        if any(c in subsequences for c in itertools.combinations(a, k)):
            return k
    return 0


@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_matches_brute_force(a: list[str], b: list[str]) -> None:
    assert lcs_length(a, b) == lcs_length(b, a) == brute_lcs(a, b)


def test_rouge_l_f1_by_hand() -> None:
    assert words("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    # LCS of "the cat sat on the mat" and "the cat is on a mat" = the cat on mat (4): P = 4/6, R = 4/6
    assert rouge_l_f1("The cat sat on the mat.", "the cat is on a mat") == pytest.approx(4 / 6)
    # P = 2/2, R = 2/5 → F1 = 2·1·0.4 / 1.4
    assert rouge_l_f1("quick fox", "the quick brown red fox") == pytest.approx(0.8 / 1.4)
    assert rouge_l_f1("Same words", "same, WORDS.") == 1.0
    assert rouge_l_f1("", "anything") == rouge_l_f1("unrelated", "text") == 0.0


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", context_length=8, vocab_size=97, tie_weights=False)).eval()


def test_perplexity_scores_every_token_once_in_context_windows(model: GPT) -> None:
    tokens = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1))
    total = 0.0
    for start in range(0, 29, 8):  # windows [0:9], [8:17], [16:25], [24:30]
        piece = tokens[start : start + 9]
        logits = model(piece[None, :-1])
        total += F.cross_entropy(logits[0], piece[1:], reduction="sum").item()
    for batch_size in (1, 3, 16):
        result = perplexity(model, tokens, batch_size=batch_size, progress=False)
        assert result.n_tokens == 29
        assert result.loss == pytest.approx(total / 29, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(total / 29), rel=1e-5)
    assert not model.training


def test_uniform_model_has_perplexity_vocab_size(model: GPT) -> None:
    torch.nn.init.zeros_(model.lm_head.weight)
    result = perplexity(model, torch.arange(50) % 97, batch_size=4, progress=False)
    assert result.perplexity == pytest.approx(97, rel=1e-4)


def test_perplexity_needs_two_tokens(model: GPT) -> None:
    with pytest.raises(LLMError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([5]), progress=False)


def test_mean_loss_weighs_every_counted_token_equally(model: GPT) -> None:
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randint(0, 97, (2, 6), generator=g), torch.randint(0, 97, (1, 3), generator=g)
    y1, y2 = torch.randint(0, 97, (2, 6), generator=g), torch.randint(0, 97, (1, 3), generator=g)
    y1[1, 4:] = -100
    per_token = torch.cat(
        [
            F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")[y.flatten() != -100]
            for x, y in [(x1, y1), (x2, y2)]
        ]
    )
    assert per_token.numel() == 13
    assert mean_loss(model, [(x1, y1), (x2, y2)]) == pytest.approx(per_token.mean().item(), rel=1e-5)
    with pytest.raises(LLMError, match="no target tokens"):
        mean_loss(model, [(x2, torch.full_like(y2, -100))])
