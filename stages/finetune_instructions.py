"""finetune_instructions: instruction-tune models/base/ on an instruction set, then answer the test split.

Params `finetune_instructions` (llm.instruction_tuning.InstructConfig): the data (`data.path`, default
data/raw/instruction-data.json: Alpaca or chat entries, JSON or JSONL), its split (train/test/val 85/10/5 by
`split_seed`), full or LoRA tuning (adapters merged at the end), the run (`train`) and the test responses. Writes
models/instruct/ (a plain model directory), reports/responses.json (instruction, input, reference and response of
every test entry), metrics/finetune_instructions.json, plots/finetune_instructions/*.csv and
runs/finetune_instructions.json. An interrupted run resumes from checkpoints/finetune_instructions/<key of the
base weights and the params>/.
"""

from __future__ import annotations

import dataclasses
import time

from llm.data.instructions import read_instruction_set, split_entries
from llm.instruction_tuning import InstructConfig, response_rows, run_summary
from llm.io import replaced_dir, sha256_file, write_json
from llm.lora import parameter_report
from llm.model_dir import WEIGHTS_FILE, load_model, provenance, save_model
from llm.training import train
from stages.common import (
    BASE_MODEL,
    INSTRUCT_MODEL,
    RESPONSES,
    checkpoint_dir,
    params_section,
    run,
    summary,
    tokenizer,
    tracked_run,
)

STAGE = "finetune_instructions"


def main() -> None:
    params = params_section(STAGE, InstructConfig)
    started, encoding = time.perf_counter(), tokenizer()
    data = read_instruction_set(params.data)
    splits = split_entries(data.entries, params.split_seed)
    if data.report():
        print(f"{STAGE}: {params.data.path}: {data.report()}")
    model = load_model(BASE_MODEL)
    limit = params.example_limit(model.config.context_length)
    kept = params.kept(splits, encoding, limit, "train", "val")
    params.add_adapters(model)
    trainable, base_sha = parameter_report(model)["trainable"], sha256_file(BASE_MODEL / WEIGHTS_FILE)
    logged = {STAGE: dataclasses.asdict(params), "base_weights_sha256": base_sha, "trainable_params": trainable}
    logged["data"] = {"sha256": sha256_file(params.data.path), **data.counts()}
    checkpoints = checkpoint_dir(STAGE, base_sha, logged[STAGE], logged["data"]["sha256"])
    evaluate, logged["examples"] = params.evaluator(kept["val"], limit), {k: len(v) for k, v in splits.items()}
    logged["examples_skipped"] = {name: len(splits[name]) - len(examples) for name, examples in kept.items()}
    registered = {"model": INSTRUCT_MODEL, "registry": params.registry, "generation": params.generation}
    with tracked_run(STAGE, logged, checkpoints, "pretrain", **registered) as tracker:
        batches, sample = params.train_batches(kept["train"], limit), params.sampler(splits["val"][0], encoding)
        hooks = {"evaluate": evaluate, "sample": sample, "checkpoint_dir": checkpoints, "tracker": tracker}
        result = train(model, batches, params.train, **hooks)
        model = model.cpu().eval()
        params.merge_adapters(model)  # models/instruct/ is a plain model directory
        done = run_summary(result, params, len(kept["train"]), trainable)
        rows = response_rows(splits["test"], params.responses(model, splits["test"], encoding))
        with replaced_dir(INSTRUCT_MODEL) as staged:  # written only once everything is computed
            save_model(model, staged, extra=provenance(STAGE, done))
        write_json(RESPONSES, rows)
        tracker.log_artifact(RESPONSES, "reports")
        tokens = sum(min(len(ex.ids), limit) for ex in kept["train"])
        tracker.log_metrics({**done, "wall_seconds": time.perf_counter() - started, "tokens_per_epoch": tokens})
    summary(STAGE, {"val_loss": tracker.latest.get("val_loss", float("nan")), **done}, INSTRUCT_MODEL, RESPONSES)


if __name__ == "__main__":
    run(main)
