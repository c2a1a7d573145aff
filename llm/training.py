"""One training loop for every stage: AdamW, warmup + cosine LR, clipping, accumulation, mixed precision,
optional torch.compile, periodic evaluation and text samples, exact checkpoint/resume, signals, and DDP.

Data come from `train_batch(i)`: the i-th micro-batch (a tuple of tensors, i = step * grad_accum + micro),
a pure function of i, so a resumed run sees exactly the data it would have seen. Under DDP (`torchrun`,
read from RANK / WORLD_SIZE / LOCAL_RANK) each process returns its own shard of the global micro-batch.
The loss is `loss_fn(model, batch)` (default `lm_loss`: next-token cross-entropy); it must call the model's
forward (DDP synchronises gradients there).

Randomness (dropout) is reseeded from (seed, step, rank) at every step, so the RNG state is a function of
the step: restoring the step restores it, and evaluation or sampling never shifts the training trajectory.
Checkpoints (`llm.checkpoint`) hold everything a resumed run needs; process rank 0 writes them and logs.
The run's settings are a `llm.train_config.TrainConfig`; the optimizer and LR schedule are in `llm.optimizer`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from llm.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from llm.device import autocast, resolve_device, resolve_dtype
from llm.distributed import data_parallel, distributed_env, maybe_no_sync, process_group
from llm.errors import Interrupted, LLMError
from llm.flops import flops_per_token
from llm.io import PathLike
from llm.optimizer import lr_at, make_optimizer
from llm.signals import stop_requested
from llm.tracking import Tracker
from llm.train_config import TrainConfig

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainState:
    """What a run has done so far; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0  # tokens trained on, all processes
    seconds: float = 0.0  # wall time spent in training steps (excluding evaluation and checkpoints)
    best: float = math.inf  # lowest best_metric seen
    best_step: int = 0
    stale_evals: int = 0  # evaluations since the best one
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step: "step" + metrics


@dataclass
class TrainResult:
    state: TrainState
    metrics: dict[str, float]  # the last value of every logged metric, plus tokens, train_seconds, avg_tokens_per_s
    best: dict[str, float]  # the metrics of the best evaluation (with its "step"); empty without evaluate
    stopped_early: bool


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy: batch = (inputs, targets), both (B, T) token ids; -100 targets ignored."""
    inputs, targets = batch[:2]
    return model(inputs, targets)


def loss_evaluator(batches: Sequence[Batch], loss_fn: LossFn = lm_loss, prefix: str = "val") -> Evaluate:
    """An `evaluate` hook: the mean of `loss_fn` over a fixed list of batches and its perplexity,
    as {"<prefix>_loss": nats per token, "<prefix>_ppl": exp(loss)}. Batches are moved to the model's device."""
    if not batches:
        raise LLMError(f"the {prefix} set is empty: need at least one batch to evaluate on")

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        loss = sum(float(loss_fn(model, to_device(batch, device))) for batch in batches) / len(batches)
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}

    return evaluate


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train(
    model: nn.Module,
    train_batch: Callable[[int], Batch],
    config: TrainConfig,
    *,
    loss_fn: LossFn = lm_loss,
    evaluate: Evaluate | None = None,
    sample: Callable[[nn.Module], str] | None = None,
    checkpoint_dir: PathLike | None = None,
    tracker: Tracker | None = None,
) -> TrainResult:
    """Train `model` in place for `config.max_steps` optimizer steps (resuming from `checkpoint_dir`).

    evaluate(model) -> metrics runs every eval_every steps and at the end, in eval mode without gradients;
    config.best_metric (lower is better) among its results picks the best step. sample(model) -> text runs
    every sample_every steps and at the end. Both see the plain model (not DDP-wrapped) and run on rank 0;
    metrics are broadcast to the other ranks. The tracker (rank 0 only; None elsewhere) gets per-step metrics
    loss, lr, grad_norm, tokens_per_s (and mfu), the evaluation metrics, and the samples as text artifacts.

    SIGINT/SIGTERM finish the current step, write a checkpoint and raise `Interrupted`. A non-finite loss or
    gradient raises LLMError naming the step before the optimizer touches the weights (checkpoints stay good).
    """
    _, world, local_rank = distributed_env()
    device = resolve_device(config.device, local_rank)
    with process_group(device, world), stop_requested() as stop:
        hooks = {"loss_fn": loss_fn, "evaluate": evaluate, "sample": sample, "tracker": tracker}
        return _Loop(model, train_batch, config, device, checkpoint_dir, stop, **hooks).run()


class _Loop:
    """The state of one `train` call; `run` is the loop."""

    def __init__(
        self,
        model: nn.Module,
        train_batch: Callable[[int], Batch],
        config: TrainConfig,
        device: torch.device,
        checkpoint_dir: PathLike | None,
        stop: list[int],
        *,
        loss_fn: LossFn,
        evaluate: Evaluate | None,
        sample: Callable[[nn.Module], str] | None,
        tracker: Tracker | None,
    ) -> None:
        self.rank, self.world, _ = distributed_env()
        self.model, self.train_batch, self.config = model.to(device), train_batch, config
        self.device, self.stop = device, stop
        self.loss_fn, self.evaluate, self.sample = loss_fn, evaluate, sample
        self.tracker = tracker if self.rank == 0 else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.dtype = resolve_dtype(config.precision, device)
        self.optimizer = make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] = {}
        self.last_checkpoint: Path | None = None
        self.start_step = 0

    def run(self) -> TrainResult:
        config, model = self.config, self.model
        self._resume()
        state = self.state
        net = data_parallel(torch.compile(model) if config.compile else model, self.device, self.world)
        stopped_early = False
        bar = tqdm(
            total=config.max_steps, initial=state.step, unit="step", desc="train", disable=self.rank != 0 or None
        )
        model.train()
        while state.step < config.max_steps and not stopped_early:
            try:
                metrics, interrupted = self._step(net)
            except Exception as err:  # torch.compile fails on the first call; anything else is re-raised
                if net is model or not config.compile or state.step != self.start_step:
                    raise
                print(f"warning: torch.compile failed ({type(err).__name__}: {err}); using eager mode", file=sys.stderr)
                net = data_parallel(model, self.device, self.world)
                self.optimizer.zero_grad(set_to_none=True)
                metrics, interrupted = self._step(net)
            bar.update()
            bar.set_postfix_str(
                f"loss {metrics['loss']:.3f}, lr {metrics['lr']:.2e}, {metrics['tokens_per_s']:,.0f} tok/s",
                refresh=False,
            )
            last = state.step == config.max_steps
            if self.evaluate is not None and (last or _every(state.step, config.eval_every)):
                metrics |= self._run_eval()
                stopped_early = bool(config.patience) and state.stale_evals >= config.patience
                bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            self._record(metrics)
            if last or stopped_early or interrupted or _every(state.step, config.checkpoint_every):
                self._save_checkpoint()
            if self.sample is not None and (last or _every(state.step, config.sample_every)):
                self._run_sample(bar)
            if interrupted:
                bar.close()
                raise Interrupted(self.stop[0], self._interrupted_message())
        bar.close()
        if self.evaluate is not None and not (state.history and config.best_metric in state.history[-1]):
            self._record(self._run_eval())  # max_steps 0, or resumed after the last step
        if self.stop[0]:  # a signal arrived during the final evaluation or checkpoint
            raise Interrupted(self.stop[0], self._interrupted_message())
        if config.restore_best and self.best_weights:
            model.load_state_dict(self.best_weights, strict=False)
        return self._result(stopped_early)

    def _step(self, net: nn.Module) -> tuple[dict[str, float], bool]:
        """One optimizer step; its metrics and whether any process was asked to stop."""
        config, state = self.config, self.state
        step = state.step  # 0-based index of this step; it is step number `step + 1` once done
        lr = lr_at(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(int(np.random.SeedSequence([config.seed, step, self.rank]).generate_state(1)[0]))
        start = time.perf_counter()
        loss, tokens, seq_len = self._accumulate(net, step)
        totals = torch.tensor([loss, float(self.stop[0] > 0)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals)
        loss = totals[0].item() / self.world
        if not math.isfinite(loss):
            raise LLMError(self._diverged(f"loss is {loss}", step + 1))
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip or math.inf))
        if not math.isfinite(norm) and not self.scaler.is_enabled():
            raise LLMError(self._diverged(f"gradient norm is {norm}", step + 1))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        state.step, state.tokens, state.seconds = step + 1, state.tokens + tokens, state.seconds + seconds
        metrics = {"loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / seconds}
        if config.peak_flops:
            flops = flops_per_token(self.model, seq_len) * metrics["tokens_per_s"]
            metrics["mfu"] = flops / (config.peak_flops * self.world)
        return metrics, totals[1].item() > 0

    def _record(self, metrics: dict[str, float]) -> None:
        self.state.history.append({"step": self.state.step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.state.step)

    def _accumulate(self, net: nn.Module, step: int) -> tuple[float, int, int]:
        """Forward and backward over the step's micro-batches; (mean loss, tokens on all ranks, seq length)."""
        total, tokens, seq_len = torch.zeros((), device=self.device), 0, 0
        accum = self.config.grad_accum
        for micro in range(accum):
            batch = to_device(self.train_batch(step * accum + micro), self.device)
            tokens, seq_len = tokens + batch[0].numel() * self.world, batch[0].shape[-1]
            with maybe_no_sync(net, sync=micro == accum - 1), autocast(self.device, self.dtype):
                loss = self.loss_fn(net, batch) / accum
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        return total.item(), tokens, seq_len

    def _run_eval(self) -> dict[str, float]:
        """Evaluate on rank 0, share the metrics with every rank, and track the best (lowest best_metric)."""
        assert self.evaluate is not None
        metrics: list[Any] = [None]
        if self.rank == 0:
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.dtype):
                metrics[0] = {k: float(v) for k, v in self.evaluate(self.model).items()}
            self.model.train()
        if self.world > 1:
            dist.broadcast_object_list(metrics, src=0)
        result: dict[str, float] = metrics[0]
        key, state = self.config.best_metric, self.state
        if key not in result:
            raise LLMError(f"best_metric {key!r} is not among the evaluation metrics {sorted(result)}")
        if result[key] < state.best:
            state.best, state.best_step, state.stale_evals = result[key], state.step, 0
            if self.config.restore_best:
                trainable = ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
                self.best_weights = {n: p.detach().cpu().clone() for n, p in trainable}
        else:
            state.stale_evals += 1
        return result

    def _run_sample(self, bar: tqdm) -> None:
        """Generate the text sample on rank 0, in the model's own precision (decoding gains little from autocast)."""
        if self.rank != 0:
            return
        assert self.sample is not None
        self.model.eval()
        with torch.no_grad():
            text = self.sample(self.model)
        self.model.train()
        bar.write(f"sample at step {self.state.step}: {text!r}")
        if self.tracker is not None:
            self.tracker.log_text(text, f"samples/step_{self.state.step:08d}.txt")

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        if self.checkpoint_dir is None or self.rank != 0:
            return
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir,
            self.model,
            {
                "step": self.state.step,
                "world_size": self.world,
                "config": dataclasses.asdict(self.config),
                "train": dataclasses.asdict(self.state),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            best=self.best_weights,
        )
        for old in list_checkpoints(self.checkpoint_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        """Load the newest intact checkpoint, if any, and replay its metric history into the tracker."""
        loaded = load_checkpoint(self.checkpoint_dir, self.model) if self.checkpoint_dir is not None else None
        if loaded is not None:
            path, saved, best = loaded
            config = dataclasses.asdict(self.config)
            changed = sorted(k for k in config if saved["config"].get(k) != config[k])
            if changed or saved["world_size"] != self.world:
                what = ", ".join(f"{k} {saved['config'].get(k)!r} -> {config[k]!r}" for k in changed) or (
                    f"processes {saved['world_size']} -> {self.world}"
                )
                raise LLMError(
                    f"checkpoint {path} was made with other settings ({what}); resuming would not reproduce "
                    f"either run: delete {path.parent} to start over, or restore the settings"
                )
            self.optimizer.load_state_dict(saved["optimizer"])
            if saved["scaler"]:
                self.scaler.load_state_dict(saved["scaler"])
            self.state = TrainState(**saved["train"])
            self.best_weights, self.last_checkpoint = best, path
            if self.rank == 0:
                print(f"resuming from {path} (step {self.state.step}/{self.config.max_steps})", file=sys.stderr)
            if self.tracker is not None:
                self.tracker.set_tags({"train.resumed_from_step": self.state.step})
                for entry in self.state.history:
                    self.tracker.log_metrics({k: v for k, v in entry.items() if k != "step"}, int(entry["step"]))
        self.start_step = self.state.step

    def _diverged(self, what: str, step: int) -> str:
        where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint"
        return f"training diverged: {what} at step {step} ({where}); lower lr, keep grad_clip on, or use fp32"

    def _interrupted_message(self) -> str:
        name = signal.Signals(self.stop[0]).name
        where = f"checkpoint saved in {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint directory"
        return f"interrupted by {name} at step {self.state.step}/{self.config.max_steps}; {where}; run again to resume"

    def _result(self, stopped_early: bool) -> TrainResult:
        state, latest, best = self.state, {}, {}
        for entry in state.history:
            latest |= entry
            if entry["step"] == state.best_step and self.config.best_metric in entry:
                best = dict(entry)
        seconds = max(state.seconds, 1e-9)
        latest |= {"tokens": state.tokens, "train_seconds": state.seconds, "avg_tokens_per_s": state.tokens / seconds}
        return TrainResult(state, latest, best, stopped_early)


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
