"""Evaluation: perplexity on a token stream (e.g. the held-out books), ROUGE-L F1, and an LLM judge behind an
OpenAI-compatible chat API.

The judge follows *Build a Large Language Model (From Scratch)*, ch. 7: a stronger model (e.g. a local Ollama
`llama3`) scores each response 0–100 against the reference, at temperature 0 with a fixed seed. Replies that
are not a number in [0, 100] are counted as unparseable, never guessed.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tiktoken
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llm.data.instructions import Instruction, format_prompt
from llm.data.text import read_text, strip_gutenberg
from llm.errors import LLMError
from llm.io import write_json
from llm.model import GPT
from llm.tokenizer import EOT_ID

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (runs of letters, digits and underscores); punctuation is dropped."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] of `candidate` against `reference`, on lowercased words (0 when either is empty)."""
    cand, ref = words(candidate), words(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Perplexity:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float  # exp(loss)
    n_tokens: int  # predicted tokens


@torch.no_grad()
def perplexity(model: GPT, tokens: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> Perplexity:
    """Perplexity of `model` on a 1-D token stream, scored in non-overlapping windows of the model's context.

    Every token but the first is predicted exactly once, from the tokens before it in its window.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    T = model.config.context_length
    if tokens.numel() < 2:
        raise LLMError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    n, width = tokens.numel(), min(T, tokens.numel() - 1)
    starts = range(0, n - 1, T)
    total = 0.0
    for i in tqdm(
        range(0, len(starts), batch_size), desc="perplexity", unit="batch", disable=None if progress else True
    ):
        group = starts[i : i + batch_size]
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)  # the short tail window is padded
        for row, s in enumerate(group):
            piece = tokens[s : s + width + 1]
            inputs[row, : len(piece) - 1], targets[row, : len(piece) - 1] = piece[:-1], piece[1:]
        logits = model(inputs.to(device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum").item()
    model.train(was_training)
    return Perplexity(total / (n - 1), math.exp(total / (n - 1)), n - 1)


@torch.no_grad()
def mean_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats) per counted target over (inputs, targets) batches of shape (B, T); targets equal
    to -100 are not counted, so the mean weighs every token equally whatever the batch it falls in."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = model(inputs.to(device))
        targets = targets.to(device).flatten()
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    if count == 0:
        raise LLMError("mean_loss: the batches hold no target tokens")
    return total / count


CLASSIFIER_SCORES = "accuracy", "precision", "recall", "f1", "roc_auc", "n"  # of the classifier's test metrics


def scoreboard(
    held: Perplexity, val_loss: float, rouge_f1: dict[str, list[float]], classifier_test: dict[str, Any]
) -> dict[str, Any]:
    """The nested scores: the base model's held-out loss and perplexity, the classifier's CLASSIFIER_SCORES of its
    `classifier_test` metrics, the instruction model's val loss, and each model's mean ROUGE-L F1 of `rouge_f1`
    ({"base"|"instruct": one per test entry}) with their ratio (None when the base model's is 0)."""
    rouge = {name: sum(values) / len(values) for name, values in rouge_f1.items()}
    return {
        "base": {"heldout_loss": held.loss, "heldout_perplexity": held.perplexity, "rouge_l": rouge["base"]},
        "classifier": {k: classifier_test[k] for k in CLASSIFIER_SCORES if k in classifier_test},
        "instruct": {"val_loss": val_loss, "rouge_l": rouge["instruct"]},
        "rouge_l_ratio": rouge["instruct"] / rouge["base"] if rouge["base"] else None,
    }


def heldout_tokens(directory: str | Path, tokenizer: tiktoken.Encoding, max_tokens: int = 0) -> torch.Tensor:
    """The held-out books `directory`/*.txt (by name, Gutenberg boilerplate stripped), each followed by
    <|endoftext|>, as a 1-D int64 token tensor of at most `max_tokens` tokens (0 = all)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise LLMError(f"no held-out text in {directory}/ (run the fetch stage: dvc repro fetch)")
    tokens: list[int] = []
    for path in files:
        tokens += [*tokenizer.encode_ordinary(strip_gutenberg(read_text(path))), EOT_ID]
    return torch.tensor(tokens[:max_tokens] if max_tokens else tokens)


@dataclass(frozen=True)
class JudgeConfig:
    """The judge endpoint. url: base URL of an OpenAI-compatible API (e.g. `http://localhost:11434/v1` for
    Ollama), empty = no judge. on_unreachable: `error` stops the evaluation, `skip` leaves the score out.
    api_key_env: name of an environment variable holding a bearer token, if the endpoint needs one."""

    url: str = ""
    model: str = "llama3"
    seed: int = 123
    timeout: float = 120.0
    on_unreachable: Literal["error", "skip"] = "error"
    api_key_env: str = ""


@dataclass
class JudgeResult:
    scores: list[float | None] = field(default_factory=list)  # one per response; None = unparseable reply
    replies: list[str] = field(default_factory=list)

    @property
    def n_unparseable(self) -> int:
        return sum(s is None for s in self.scores)

    @property
    def mean_score(self) -> float:
        """Mean over parseable scores (NaN when there are none)."""
        valid = [s for s in self.scores if s is not None]
        return sum(valid) / len(valid) if valid else math.nan


class JudgeUnreachable(LLMError):
    """The judge endpoint could not be contacted (connection refused, DNS failure, timeout)."""


def judge_prompt(entry: Instruction, response: str) -> str:
    """The book's scoring prompt for one response."""
    return (
        f"Given the input `{format_prompt(entry)}` and correct output `{entry.output}`, "
        f"score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


_SCORE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*100)?\s*\.?\s*")


def parse_score(reply: str) -> float | None:
    """The score in a reply that is just a number in [0, 100] (optionally `/100` or a final period), else None."""
    match = _SCORE.fullmatch(reply)
    if match is None:
        return None
    score = float(match.group(1))
    return score if 0 <= score <= 100 else None


def chat(config: JudgeConfig, prompt: str) -> str:
    """One deterministic chat completion (temperature 0, fixed seed); returns the reply text.

    Raises JudgeUnreachable when the endpoint cannot be contacted and LLMError on an HTTP error or a
    response that is not an OpenAI-style chat completion.
    """
    url = config.url.rstrip("/") + "/chat/completions"
    body = {
        "model": config.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "seed": config.seed,
        "stream": False,
    }
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
            raise LLMError(
                f"judge: refusing to send the {config.api_key_env} token over plain HTTP to {parts.hostname}"
            )
        key = os.environ.get(config.api_key_env)
        if not key:
            raise LLMError(f"judge: environment variable {config.api_key_env} (judge.api_key_env) is not set")
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:200].decode("utf-8", "replace")
        raise LLMError(f"judge at {url} answered HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise JudgeUnreachable(f"judge at {url} is unreachable ({reason}); start it or unset the judge url") from err
    try:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    except (ValueError, RecursionError, KeyError, IndexError, TypeError) as err:  # ValueError: JSON, UTF-8
        raise LLMError(f"judge at {url} did not return a chat completion: {raw[:200]!r}") from err


def judge(
    entries: Sequence[Instruction], responses: Sequence[str], config: JudgeConfig, *, progress: bool = True
) -> JudgeResult | None:
    """Score every response with the judge; None when it is unreachable and `config.on_unreachable` is `skip`."""
    if len(entries) != len(responses):
        raise LLMError(f"judge: {len(entries)} entries but {len(responses)} responses")
    result = JudgeResult()
    for entry, response in tqdm(
        zip(entries, responses, strict=True), total=len(entries), desc="judge", disable=None if progress else True
    ):
        try:
            reply = chat(config, judge_prompt(entry, response))
        except JudgeUnreachable:
            if config.on_unreachable == "skip":
                return None
            raise
        result.replies.append(reply)
        result.scores.append(parse_score(reply))
    return result


def judged(
    board: dict[str, Any], test: list[Instruction], responses: list[str], config: JudgeConfig, replies: Path
) -> JudgeResult:
    """The judge's verdict on the `responses`: its scores added to board["instruct"], its replies saved to `replies`
    (JSON: [{"score", "reply"}, ...])."""
    verdict = judge(test, responses, config)
    board["instruct"] |= {"judge_score": verdict.mean_score, "judge_unparseable": verdict.n_unparseable}
    write_json(replies, [{"score": s, "reply": r} for s, r in zip(verdict.scores, verdict.replies, strict=True)])
    return verdict
