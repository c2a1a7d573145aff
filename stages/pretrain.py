"""pretrain: data/windows/ → models/base/; metrics/pretrain.json, plots/pretrain/*.csv, runs/pretrain.json.

Params `model` (llm.pretraining.ModelInit): the model to start from; `pretrain` (llm.pretraining.PretrainConfig):
the run, `train.max_steps: 0` only loads, evaluates and writes the model. An interrupted run resumes from
checkpoints/pretrain/<key>/ when the stage runs again with the same `model` and `pretrain` params, windows and
process count (e.g. `dvc repro`). `pretrain.nproc > 1` re-launches the stage under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

from llm.data.windows import TokenWindows
from llm.distributed import distributed_env
from llm.io import read_json, replaced_dir
from llm.model_dir import provenance, save_model
from llm.pretraining import ModelInit, PretrainConfig, run_summary
from llm.training import train
from stages.common import (
    BASE_MODEL,
    WINDOWS,
    checkpoint_dir,
    load_params,
    params_section,
    run,
    summary,
    tokenizer,
    tracked_run,
)

DATA_KEYS = ("context_length", "stride", "tokenizer", "n_tokens", "n_windows")  # logged from the windows' meta.json


def main() -> None:
    params = load_params()
    init, stage = params_section("model", ModelInit, params), params_section("pretrain", PretrainConfig, params)
    rank, world, _ = distributed_env()
    if stage.nproc > 1 and world == 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.nproc}"]
        os.execv(sys.executable, [sys.executable, *launch, "-m", "stages.pretrain"])
    started, meta = time.perf_counter(), read_json(WINDOWS / "meta.json")
    train_set = TokenWindows(WINDOWS / "train.bin", meta["context_length"], meta["stride"])
    val_set = TokenWindows(WINDOWS / "val.bin", meta["context_length"])  # non-overlapping
    torch.manual_seed(stage.train.seed)
    model = init.build(meta["context_length"])
    run_params = {"model": dataclasses.asdict(init), "pretrain": dataclasses.asdict(stage), "world": world}
    checkpoints = checkpoint_dir("pretrain", run_params, meta)
    batches = stage.train_batches(train_set, rank, world)
    hooks: dict[str, Any] = {"evaluate": stage.evaluator(val_set), "sample": stage.sampler(tokenizer())}
    if rank != 0:  # the other torchrun processes train their shards; rank 0 tracks, saves and reports
        train(model, batches, stage.train, checkpoint_dir=checkpoints, **hooks)
        return
    described = {**run_params, "architecture": model.config.to_dict()}
    logged = {**described, "data": {k: meta.get(k) for k in DATA_KEYS}, "n_params": model.num_parameters()}
    logged["checkpoint_dir"] = str(checkpoints)
    with tracked_run("pretrain", logged, checkpoints, model=BASE_MODEL, registry=stage.registry) as tracker:
        tracker.log_dict({**described, "data": meta}, "config.json")
        result = train(model, batches, stage.train, checkpoint_dir=checkpoints, tracker=tracker, **hooks)
        done = run_summary(result, train_set.n_tokens, model.num_parameters())
        with replaced_dir(BASE_MODEL) as staged:  # models/base changes only whole, and only on success
            save_model(model, staged, extra=provenance("pretrain", done))
        tracker.log_metrics({**done, "wall_seconds": time.perf_counter() - started})
    shown = ("loss", "val_loss", "val_ppl", "avg_tokens_per_s", "wall_seconds")
    summary("pretrain", {k: tracker.latest[k] for k in shown if k in tracker.latest}, BASE_MODEL)


if __name__ == "__main__":
    run(main)
