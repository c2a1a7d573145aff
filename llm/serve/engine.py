"""Continuous batching: one thread owns the model and decodes every active request together.

Each iteration of the engine's loop drops cancelled requests, admits waiting ones while rows are free (their
prompts are prefilled together, left-padded as `llm.generate` pads a batch, and each samples its first token),
then runs one batched decoding step (one token per active row, through the shared `SlotCache`) and samples
every row's next token with that request's own settings (`llm.generate.sample`; rows with equal settings and no
seed in one call). Finished requests leave between steps, so a new request never waits for a batch to end.

A request ends at end-of-text ("stop", the token is not returned), at one of its stop strings ("stop", the text
from the stop string on is dropped; text that may start a stop string is held back until it cannot), after
`max_new_tokens` ("length"), when its sequence fills the model's context ("length"), or when cancelled
("cancelled", e.g. the client went away). Events go to each request's `emit` callback from the engine thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import tiktoken
import torch

from llm.generate import GenerationConfig, TextDecoder, left_pad, next_logits, sample
from llm.model import GPT
from llm.serve.slots import SlotCache


class Delta(NamedTuple):
    text: str


class Done(NamedTuple):
    finish_reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    error: str = ""


Event = Delta | Done


@dataclass(eq=False)
class Job:
    """One request. config: max_new_tokens, temperature, top_k, top_p and seed (eos_id is the engine's)."""

    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    cancelled: bool = False
    done: bool = False
    tokens: int = 0  # completion tokens so far
    decoder: TextDecoder | None = None
    held: str = ""  # text not yet emitted: it may be the start of a stop string
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop generating (thread-safe; the engine ends the job with "cancelled" before its next step)."""
        self.cancelled = True


class Engine:
    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, eos_id: int | None, max_batch: int) -> None:
        self.model = model.eval()
        self.device = model.tok_emb.weight.device
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.slots = SlotCache(model, max_batch)
        self.active: list[Job] = []  # active[i] decodes in slot row i
        self.last: list[int] = []  # the token each active row feeds next
        self.waiting: list[Job] = []
        self.generated = 0  # completion tokens produced since start
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End every request ("cancelled") and the engine thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        if job.config.seed is not None:
            job.generator = torch.Generator(device=self.device).manual_seed(job.config.seed)
        job.decoder = TextDecoder(self.tokenizer)
        with self._wake:
            self.waiting.append(job)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.active or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                free = self.slots.capacity - len(self.active)
                admitted, self.waiting = self.waiting[:free], self.waiting[free:]
            try:
                self._admit(admitted)
                if self.active:
                    self._decode()
            except Exception as err:  # a bug or an out-of-memory: fail these requests, keep serving
                for job in admitted + self.active:
                    self._finish(job, "error", error=f"{type(err).__name__}: {err}")
                self.active, self.last, self.slots = [], [], SlotCache(self.model, self.slots.capacity)
        with self._wake:
            for job in self.waiting + self.active:
                self._finish(job, "cancelled")
            self.waiting, self.active = [], []

    @torch.no_grad()
    def _admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together, sample their first tokens, and give a slot row to each that goes on."""
        jobs = [job for job in jobs if not self._ended(job)]
        if not jobs:
            return
        idx, pad_mask = left_pad([job.prompt for job in jobs], self.model.config.vocab_size, self.device)
        prefill = self.model.new_cache(len(jobs), idx.shape[1])
        logits = next_logits(self.model, idx, None if pad_mask.all() else pad_mask, prefill)
        for row, (job, token) in enumerate(zip(jobs, self._sample(logits, jobs), strict=True)):
            if self._take(job, token, len(job.prompt)):
                self.slots.add(prefill, row)
                self.active.append(job)
                self.last.append(token)

    @torch.no_grad()
    def _decode(self) -> None:
        """One token for every active row; then the finished rows leave."""
        for row in reversed(range(len(self.active))):
            if self._ended(self.active[row]):
                self._drop(row)
        if not self.active:
            return
        rows = self.slots.view()
        idx = torch.tensor(self.last, device=self.device)[:, None]
        logits = next_logits(self.model, idx, None, rows)
        self.slots.advance()
        tokens = self._sample(logits, self.active)
        lengths = self.slots.lengths()
        self.last = tokens
        for row in reversed(range(len(self.active))):
            if not self._take(self.active[row], tokens[row], lengths[row]):
                self._drop(row)

    def _drop(self, row: int) -> None:
        self.slots.remove(row)
        self.active[row], self.last[row] = self.active[-1], self.last[-1]
        self.active.pop()
        self.last.pop()

    def _sample(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """The next token of each row of logits (B, V): rows with equal settings and no seed share one call."""
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            c = job.config
            groups.setdefault((c.temperature, c.top_k, c.top_p, id(job) if job.generator else 0), []).append(i)
        if len(groups) == 1:  # the common case: no copy of the logits
            return sample(logits, jobs[0].config, jobs[0].generator).tolist()
        tokens = torch.empty(len(jobs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            job = jobs[rows[0]]
            tokens[rows] = sample(logits[rows], job.config, job.generator)
        return tokens.tolist()

    def _ended(self, job: Job) -> bool:
        if job.cancelled:
            self._finish(job, "cancelled")
        return job.cancelled

    def _take(self, job: Job, token: int, length: int) -> bool:
        """Record `token` for `job`, whose sequence holds `length` tokens before it; False when the job ended."""
        if token == self.eos_id:
            self._finish(job, "stop")
            return False
        job.tokens += 1
        self.generated += 1
        assert job.decoder is not None
        if self._emit_text(job, job.decoder.push(token)):
            return False
        if job.tokens >= job.config.max_new_tokens or length >= self.model.config.context_length:
            self._finish(job, "length")
            return False
        return True

    def _emit_text(self, job: Job, text: str) -> bool:
        """Emit `text` minus what may start a stop string; True when a stop string ended the job."""
        text = job.held + text
        if (cut := stop_index(text, job.stop)) is not None:
            job.held = ""
            if text[:cut]:
                job.emit(Delta(text[:cut]))
            self._finish(job, "stop", flush=False)
            return True
        keep = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        job.held = text[len(text) - keep :]
        if text[: len(text) - keep]:
            job.emit(Delta(text[: len(text) - keep]))
        return False

    def _finish(self, job: Job, reason: str, *, flush: bool = True, error: str = "") -> None:
        """Emit the text still held (unless a stop string ended the job) and the job's Done, once."""
        if job.done:
            return
        job.done = True
        if flush:
            assert job.decoder is not None
            rest, job.held = job.held + job.decoder.flush(), ""
            if (cut := stop_index(rest, job.stop)) is not None:
                rest, reason = rest[:cut], "stop"
            if rest:
                job.emit(Delta(rest))
        job.emit(Done(reason, len(job.prompt), job.tokens, error))


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
