"""pretrain: data/windows/ → models/base/ (config.json + model.safetensors); metrics/pretrain.json,
plots/pretrain/*.csv and runs/pretrain.json; one MLflow run.

`model.init` is `scratch` (the `model.preset` architecture with `model.overrides`; context_length defaults to
the windows'), a GPT-2 hub name (`gpt2` … `gpt2-xl`) or a model directory (ours or Hugging Face's); with
`pretrain.max_steps: 0` the model is only loaded, evaluated and written. The `pretrain` section holds every
`llm.train_config.TrainConfig` field plus the stage's own (`PretrainParams`).

Resuming: checkpoints go to `<checkpoint_root>/<key>/`, outside every DVC out (git-ignored), where key hashes
the `model` and `pretrain` params, the windows' meta.json and the process count. An interrupted run (Ctrl-C,
SIGTERM, a crash, a killed machine) resumes from its newest intact checkpoint when the stage runs again with the
same params, e.g. `dvc repro`; other params start afresh in their own directory. The directory is deleted once
models/base/ is written. `pretrain.nproc > 1` re-launches this stage under torchrun (one process per CPU or GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.config import get_preset
from llm.data.windows import TokenWindows, batch_indices
from llm.distributed import distributed_env
from llm.errors import LLMError
from llm.generate import generate
from llm.hf import load_any
from llm.io import read_json
from llm.model import GPT
from llm.model_dir import provenance, save_model
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker
from llm.train_config import TrainConfig
from llm.training import loss_evaluator, train
from stages.common import load_params, params_section, run

WINDOWS = Path("data/windows")
RANKS_FILE = Path("data/raw/tokenizer/r50k_base.tiktoken")  # from the fetch stage; else the mirror's
OUT = Path("models/base")


@dataclass(frozen=True)
class ModelParams:
    """init: scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a model directory.
    preset, overrides: the architecture for init scratch (llm.config presets; GPTConfig fields to replace)."""

    init: str = "scratch"
    preset: str = "cpu-small"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainParams(TrainConfig):
    """TrainConfig plus: nproc (processes; > 1 runs under torchrun), eval_windows (validation windows per
    evaluation: a fixed, evenly spaced subset; 0 = all), shuffle (visit training windows in a seeded random
    order per epoch), sample_prompt / sample_tokens (the text sample), checkpoint_root (see the module doc)."""

    nproc: int = 1
    eval_windows: int = 128
    shuffle: bool = True
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 40
    checkpoint_root: str = "checkpoints/pretrain"


def build_model(params: ModelParams, context_length: int) -> GPT:
    """A fresh GPT (init scratch) or the named/local pretrained one, checked to fit `context_length`."""
    if params.init == "scratch":
        model = GPT(get_preset(params.preset, **{"context_length": context_length, **params.overrides}))
    elif params.overrides:
        raise LLMError(f"model.overrides apply to init: scratch only; {params.init!r} keeps its own architecture")
    else:
        model = load_any(params.init)
    if model.config.context_length < context_length:
        raise LLMError(
            f"model {params.init!r} has context_length {model.config.context_length}, shorter than the windows' "
            f"{context_length}: lower sample.context_length"
        )
    return model


def main() -> None:
    params = load_params()
    model_params = params_section("model", ModelParams, params)
    config = params_section("pretrain", PretrainParams, params)
    rank, world, _ = distributed_env()
    if config.nproc > 1 and world == 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc}"]
        os.execv(sys.executable, [sys.executable, *launch, "-m", "stages.pretrain"])
    started = time.perf_counter()
    meta = read_json(WINDOWS / "meta.json")
    train_set = TokenWindows(WINDOWS / "train.bin", meta["context_length"], meta["stride"])
    val_set = TokenWindows(WINDOWS / "val.bin", meta["context_length"])  # non-overlapping
    torch.manual_seed(config.seed)
    model = build_model(model_params, meta["context_length"])

    def train_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = {"seed": config.seed, "shuffle": config.shuffle, "rank": rank, "world_size": world}
        return train_set.batch(batch_indices(len(train_set), config.batch_size, i, **order))

    n_val = len(val_set) if config.eval_windows == 0 else min(config.eval_windows, len(val_set))
    val_idx = np.unique(np.linspace(0, len(val_set) - 1, n_val).round().astype(np.int64))
    chunks = np.array_split(val_idx, -(-len(val_idx) // config.batch_size))
    evaluate = loss_evaluator([val_set.batch(chunk) for chunk in chunks])
    tokenizer = get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)
    prompt = tokenizer.encode(config.sample_prompt)

    def sample(m: torch.nn.Module) -> str:
        new = generate(m, [prompt], max_new_tokens=config.sample_tokens, temperature=0.8, top_k=50, seed=config.seed)
        return config.sample_prompt + tokenizer.decode(new[0])

    run_params = {"model": dataclasses.asdict(model_params), "pretrain": dataclasses.asdict(config), "world": world}
    key = hashlib.sha256(json.dumps([run_params, meta], sort_keys=True).encode()).hexdigest()[:12]
    checkpoint_dir = Path(config.checkpoint_root) / key
    tracker = Tracker("pretrain", upstream=("fetch", "tokenize", "sample")) if rank == 0 else None
    with tracker or contextlib.nullcontext():
        if tracker is not None:
            tracker.log_params({**run_params, "architecture": model.config.to_dict(), "data": _data_params(meta)})
            tracker.log_params({"n_params": model.num_parameters(), "checkpoint_dir": str(checkpoint_dir)})
            tracker.log_dict({**run_params, "architecture": model.config.to_dict(), "data": meta}, "config.json")
        result = train(
            model, train_batch, config, evaluate=evaluate, sample=sample, checkpoint_dir=checkpoint_dir, tracker=tracker
        )
        if tracker is None:
            return
        summary = {
            "steps": result.state.step,
            "tokens": result.state.tokens,
            "epochs": result.state.tokens / train_set.n_tokens,
            "train_seconds": result.state.seconds,
            "avg_tokens_per_s": result.metrics["avg_tokens_per_s"],
            "best_val_loss": result.state.best,
            "best_step": result.state.best_step,
            "n_params": model.num_parameters(),
        }
        save_model(model, OUT, extra=provenance("pretrain", summary))
        tracker.log_metrics({**summary, "wall_seconds": time.perf_counter() - started})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    shown = ("loss", "val_loss", "val_ppl", "avg_tokens_per_s", "wall_seconds")
    print("pretrain: " + ", ".join(f"{k} {tracker.latest[k]:.4g}" for k in shown if k in tracker.latest) + f" → {OUT}")


def _data_params(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("context_length", "stride", "tokenizer", "n_tokens", "n_windows")}


if __name__ == "__main__":
    run(main)
