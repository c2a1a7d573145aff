"""Autoregressive sampling: greedy, temperature, top-k and top-p (nucleus), stopping at an EOS token.

Prompts of different lengths are decoded together by left padding them (the model's `pad_mask`). With
`use_cache` (the default) each step feeds only the new token through a KV cache; the tokens produced are
the ones recomputing the whole context each step gives. The model's positions are learned and absolute,
so once a sequence outgrows `context_length` the cache cannot slide: every further step recomputes the
last `context_length` tokens (the cropped window), exactly as `use_cache=False` does.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken
import torch

from llm.config import from_mapping
from llm.errors import LLMError
from llm.model import GPT, KVCache

FINISHED = -1  # the token `stream` yields for a row that has already stopped at EOS


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample.

    max_new_tokens: tokens to generate per prompt (fewer when EOS comes first).
    temperature: logits are divided by it before sampling; 0 means greedy (argmax).
    top_k: sample only among the k most probable tokens (None = all).
    top_p: sample only among the smallest set of most probable tokens whose probability sums to >= top_p.
    eos_id: stop a prompt when this token is sampled (it is not returned); None = never stop early.
    seed: seeds a private torch.Generator, so equal seeds give equal samples; None uses torch's global RNG.
    use_cache: decode with a KV cache (same tokens, much faster) instead of recomputing the context.
    compile: run the one-token steps of cached decoding through torch.compile: they compile on the first call
        (inductor caches the result on disk), which delays the first token, and then run faster (see
        BENCHMARKS.md). The prompt and uncached steps stay eager. Falls back to eager mode with a warning if
        compilation fails.
    """

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    seed: int | None = None
    use_cache: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails every comparison
            raise LLMError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise LLMError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LLMError(f"top_p must be in (0, 1], got {self.top_p}")


def stream(
    model: GPT, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, **overrides: Any
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, one (B,) long tensor per step, for up to max_new_tokens steps.

    prompts: B non-empty lists of token ids (lengths may differ). `overrides` replace fields of `config`.
    A row that has sampled `eos_id` yields FINISHED (-1) from then on (the EOS itself included); the
    stream ends early once every row has finished. The model runs in eval mode (restored afterwards).
    """
    config = _settings(config, overrides)
    idx, pad_mask = left_pad(prompts, model.config.vocab_size, model.tok_emb.weight.device)
    context = model.config.context_length
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(config.seed)
    cache = model.new_cache(len(prompts), idx.shape[1] + config.max_new_tokens) if config.use_cache else None
    cached = 0  # columns of idx already in the cache
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=idx.device)
    decode_step = _compiled_next_logits() if config.compile else next_logits
    was_training = model.training
    model.eval()
    try:
        for _ in range(config.max_new_tokens):
            if cache is not None and idx.shape[1] > context:
                cache = None  # the positions ran out: from now on recompute the cropped window
            if cache is not None and cached:  # one new token per row, never padding
                logits, decode_step = _run_step(decode_step, model, idx[:, cached:], cache)
            else:  # the prompt, or the cropped window recomputed
                start = 0 if cache is not None else max(0, idx.shape[1] - context)
                window = pad_mask[:, start:]
                logits = next_logits(model, idx[:, start:], None if window.all() else window, cache)
            token = sample(logits, config, generator)
            cached = idx.shape[1]
            if config.eos_id is not None:
                finished |= token == config.eos_id
            yield token.masked_fill(finished, FINISHED)
            if finished.all():
                return
            idx = torch.cat([idx, token[:, None]], dim=1)
            pad_mask = torch.cat([pad_mask, torch.ones_like(pad_mask[:, :1])], dim=1)
    finally:
        model.train(was_training)


def generate(
    model: GPT, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, **overrides: Any
) -> list[list[int]]:
    """The new tokens for each prompt (EOS and anything after it excluded); see `stream` for the arguments."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, config, **overrides):
        for row, token in zip(out, step.tolist(), strict=True):
            if token != FINISHED:
                row.append(token)
    return out


def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row (B,) from next-token logits (B, V), following config's temperature/top_k/top_p."""
    if config.temperature == 0:  # argmax (the first of equal maxima), by max's kernel: 2-4x faster on CPU
        return logits.max(dim=-1).indices
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        values, indices = logits.topk(config.top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p  # the mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


class TextDecoder:
    """Text of token ids fed one at a time; characters split across tokens are held until complete."""

    def __init__(self, tokenizer: tiktoken.Encoding) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text completed by `token` (may be empty)."""
        return self._utf8.decode(self._tokenizer.decode_single_token_bytes(token))

    def flush(self) -> str:
        """The text still held at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def decode_stream(tokens: Iterable[int], tokenizer: tiktoken.Encoding) -> Iterator[str]:
    """Text pieces for a stream of token ids; characters split across tokens are held until complete."""
    decoder = TextDecoder(tokenizer)
    for token in tokens:
        if text := decoder.push(token):
            yield text
    if text := decoder.flush():
        yield text


@torch.no_grad()
def next_logits(model: GPT, idx: torch.Tensor, pad_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
    """Next-token logits (B, V) after idx (B, T); with a cache, idx holds only the tokens not yet in it.
    pad_mask: bool (B, T), False = padding; None when every token is real."""
    h = model.hidden_states(idx, cache=cache, pad_mask=pad_mask)
    return model.lm_head(h[:, -1])


def _run_step(
    step: Callable[..., torch.Tensor], model: GPT, idx: torch.Tensor, cache: KVCache
) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """step(model, idx, None, cache) for a decoding step, and the step to use from now on: if the compiled step
    fails (torch.compile raises when it compiles, e.g. without a C++ compiler), warn, rewind the cache and go on
    in eager mode."""
    past = cache.length
    try:
        return step(model, idx, None, cache), step
    except LLMError:
        raise
    except Exception as err:
        if step is next_logits:
            raise
        print(f"warning: torch.compile failed ({type(err).__name__}: {err}); decoding in eager mode", file=sys.stderr)
        cache.rewind(past)  # forget what the failed call may have recorded
        return next_logits(model, idx, None, cache), next_logits


@functools.cache
def _compiled_next_logits() -> Callable[..., torch.Tensor]:
    """`next_logits` through torch.compile (made on first use: importing dynamo takes a second)."""
    return torch.compile(next_logits)


def _settings(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    base = dataclasses.asdict(config or GenerationConfig())
    return from_mapping(GenerationConfig, {**base, **overrides}, where="generation settings")


def left_pad(
    prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) left-padded with 0 and the bool mask (B, L) of real tokens."""
    if not prompts:
        raise LLMError("no prompts given")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise LLMError(f"prompt {i} is empty: give at least one token")
        if not all(0 <= t < vocab_size for t in prompt):
            raise LLMError(f"prompt {i} holds token ids outside the model's vocabulary [0, {vocab_size})")
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    pad_mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        idx[i, width - len(prompt) :] = torch.tensor(prompt)
        pad_mask[i, width - len(prompt) :] = True
    return idx.to(device), pad_mask.to(device)
